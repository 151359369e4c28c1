// Same pinned map name as libbpf_maps.bpf.c, another value size: must not be reused.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} t_pinned SEC(".maps");

SEC("tc")
int tc_v2(struct __sk_buff *skb)
{
	return 0;
}

char _license[] SEC("license") = "GPL";
