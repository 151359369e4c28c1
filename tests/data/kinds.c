/* BTF kinds and encodings that sample.c does not produce, for tests/test_btf.py. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define __tagged __attribute__((btf_decl_tag("bpfgen")))
#define __user __attribute__((btf_type_tag("user")))

struct opaque;

struct kinds {
	_Bool ok;                  /* INT, BOOL encoding */
	char c;                    /* INT 'char' */
	__s16 neg16;
	float f;                   /* FLOAT 4 */
	double d;                  /* FLOAT 8 */
	unsigned __int128 big;     /* INT 16 */
	__s64 neg64;
	int *__user uptr;          /* PTR -> TYPE_TAG */
	struct opaque *fwd;        /* PTR -> FWD */
	__be16 be16;
	__be32 be32;
	__be64 be64;
	union {
		__u32 word;
		__u8 bytes[4];
	} u;
	int matrix[2][3];
	__u8 mac[6];
	__u16 __pad1;
	signed char small : 3;     /* signed bitfield */
	unsigned char rest : 5;
} __tagged;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(__u32));
	__type(value, struct kinds);
} kinds_map SEC(".maps");

static __attribute__((noinline)) int sum(int *restrict a, int *restrict b)
{
	return *a + *b;
}

SEC("xdp")
int xdp_kinds(struct xdp_md *ctx)
{
	__u32 zero = 0;
	struct kinds *k = bpf_map_lookup_elem(&kinds_map, &zero);
	int a = ctx->ingress_ifindex, b = 1;

	if (!k)
		return XDP_PASS;
	return sum(&a, &b) + k->small ? XDP_PASS : XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
