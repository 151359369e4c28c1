/* A small BPF object for tests/test_btf.py and tests/test_inspect.py.
 * Compiled by the tests with: clang -O2 -g -target bpf -c sample.c
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

typedef __u32 bpfgen_ip4_t;   /* IPv4 address, network byte order */
typedef __u16 bpfgen_port_t;  /* port, network byte order */
typedef __u8 bpfgen_proto_t;  /* IP protocol number */

enum backend_state {
	BACKEND_DOWN = 0,
	BACKEND_UP = 1,
	BACKEND_DRAINING = 2,
};

struct flow_key {
	bpfgen_ip4_t daddr;
	bpfgen_port_t dport;
	bpfgen_proto_t proto;
	__u8 pad;
};

struct backend {
	bpfgen_ip4_t addr;           /* offset 0 */
	bpfgen_port_t port;          /* offset 4 */
	__u16 weight : 12;           /* offset 6, bits 0..11 */
	__u16 flags : 4;             /* bits 12..15 */
	enum backend_state state;    /* offset 8 */
	char name[8];                /* offset 12 */
	__s32 delta;                 /* offset 20 */
	__u64 hits;                  /* offset 24 */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct flow_key);
	__type(value, struct backend);
} services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__type(key, __u64);
	__type(value, struct flow_key);
} conntrack SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct inner_map {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 2);
	__type(key, __u32);
	__array(values, struct inner_map);
} outer SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

const volatile bpfgen_ip4_t cfg_node_ip = 0;
const volatile __u32 cfg_flags = 0;
__u64 packets = 0;       /* .bss */
__u32 generation = 7;    /* .data */

static __attribute__((noinline)) int count(__u32 slot)
{
	__u64 *n = bpf_map_lookup_elem(&stats, &slot);

	if (!n)
		return 0;
	*n += 1;
	return 1;
}

SEC("tc")
int tc_ingress(struct __sk_buff *skb)
{
	struct flow_key key = {
		.daddr = cfg_node_ip,
		.dport = (bpfgen_port_t)skb->local_port,
		.proto = 6,
	};
	struct backend *be = bpf_map_lookup_elem(&services, &key);
	__u64 cookie = skb->hash;

	if (!be || be->state != BACKEND_UP)
		return count(0) ? TC_ACT_OK : TC_ACT_SHOT;
	bpf_map_update_elem(&conntrack, &cookie, &key, BPF_ANY);
	be->hits++;
	__sync_fetch_and_add(&packets, generation);
	return count(1 + (cfg_flags & 1)) ? TC_ACT_OK : TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
