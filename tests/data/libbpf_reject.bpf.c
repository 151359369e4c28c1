// A program the verifier must reject: a packet read without a bounds check.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int tc_oob(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;

	return *(__u32 *)data;
}

char _license[] SEC("license") = "GPL";
