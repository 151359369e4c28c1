/* An old-style object: maps as struct bpf_map_def records in SEC("maps"), a
 * SEC("version") word, and no BTF (the tests compile it without -g).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Modern libbpf headers no longer define it. */
struct bpf_map_def {
	unsigned int type;
	unsigned int key_size;
	unsigned int value_size;
	unsigned int max_entries;
	unsigned int map_flags;
};

struct bpf_map_def SEC("maps") counters = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u64),
	.max_entries = 256,
};

struct bpf_map_def SEC("maps") sessions = {
	.type = BPF_MAP_TYPE_LRU_HASH,
	.key_size = 16,
	.value_size = 32,
	.max_entries = 65536,
	.map_flags = BPF_F_NO_COMMON_LRU,
};

__u32 _version SEC("version") = 0x050a00; /* 5.10.0 */

SEC("socket")
int count_packets(struct __sk_buff *skb)
{
	__u32 key = skb->protocol & 0xff;
	__u64 *n = bpf_map_lookup_elem(&counters, &key);

	if (n)
		__sync_fetch_and_add(n, 1);
	return 0;
}

char _license[] SEC("license") = "GPL";
