// Test object for tests/test_libbpf.py: maps of several types and two tc programs.
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} t_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 128);
	__type(key, __u64);
	__type(value, __u32);
} t_lru SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32); /* 4 bytes: per-CPU slots are padded to 8 */
} t_pcpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} t_pinned SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP); /* no batch operations: exercises the fallback */
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u32); /* ifindex */
} t_devmap SEC(".maps");

struct lpm_key {
	__u32 prefixlen;
	__u32 addr;
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lpm_key);
	__type(value, __u32);
} t_lpm SEC(".maps");

const volatile __u32 ret_value = TC_ACT_OK;

SEC("tc")
int tc_ret(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u32 *count = bpf_map_lookup_elem(&t_pcpu, &key);

	if (count)
		(*count)++;
	return ret_value;
}

SEC("tc")
int tc_other(struct __sk_buff *skb)
{
	return TC_ACT_SHOT;
}

char _license[] SEC("license") = "GPL";
