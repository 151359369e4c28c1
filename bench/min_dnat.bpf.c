/*
 * The reference of bench/datapath.py: a minimal tc DNAT. It parses Ethernet/IPv4/TCP
 * in place, looks the frontend up in a hash map and the flow in an LRU hash map, and
 * rewrites the destination address and port with the kernel's helpers (two stores,
 * three checksum updates). No SNAT, no forwarding, no timeouts, no counters: the least
 * a tc load balancer does per packet. Its maps are filled by the bench.
 * min_dnat_new is the same for a packet of no known flow: the least a stateful one does
 * for a new flow, the frontend's one backend taken (no selection) and the flow's two
 * entries (the packet's and its replies') made with no-exist semantics in a table of its
 * own of the size of bpfgen's half-open one; no routing, no forwarding, no SNAT port.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

struct svc_key {
	__u32 addr;
	__u16 port;
	__u8 proto;
	__u8 pad;
};

struct svc_value {
	__u32 id;
	__u32 backend_addr;
	__u16 backend_port;
	__u16 pad;
};

struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 pad[3];
};

struct ct_value {
	__u32 backend_addr;
	__u16 backend_port;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_key);
	__type(value, struct svc_value);
} min_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
} min_ct SEC(".maps");

/* min_dnat_new's flows, apart: the size of bpfgen's half-open table (65,536 flows) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 131072);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
} min_ct_new SEC(".maps");

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_DST_OFF (ETH_HLEN + offsetof(struct iphdr, daddr))

static __always_inline int dnat(struct __sk_buff *skb, int create)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *iph = data + ETH_HLEN;
	struct tcphdr *th;
	struct svc_key sk = {};
	struct ct_key ck = {}, rk = {};
	struct ct_value *ct, fresh = {};
	struct svc_value *svc;
	__u32 l4_off, old_addr, new_addr;
	__u16 old_port, new_port;

	if ((void *)(iph + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (iph->protocol != IPPROTO_TCP || iph->ihl != 5)
		return TC_ACT_OK;
	th = (void *)(iph + 1);
	if ((void *)(th + 1) > data_end)
		return TC_ACT_OK;

	sk.addr = iph->daddr;
	sk.port = th->dest;
	sk.proto = IPPROTO_TCP;
	svc = bpf_map_lookup_elem(&min_svc, &sk);
	if (!svc)
		return TC_ACT_OK;
	ck.saddr = iph->saddr;
	ck.daddr = iph->daddr;
	ck.sport = th->source;
	ck.dport = th->dest;
	ck.proto = IPPROTO_TCP;
	ct = bpf_map_lookup_elem(create ? (void *)&min_ct_new : (void *)&min_ct, &ck);
	if (!ct) {
		if (!create)
			return TC_ACT_OK;
		fresh.backend_addr = svc->backend_addr;
		fresh.backend_port = svc->backend_port;
		rk.saddr = svc->backend_addr;
		rk.daddr = iph->saddr;
		rk.sport = svc->backend_port;
		rk.dport = th->source;
		rk.proto = IPPROTO_TCP;
		if (bpf_map_update_elem(&min_ct_new, &rk, &fresh, BPF_NOEXIST) ||
		    bpf_map_update_elem(&min_ct_new, &ck, &fresh, BPF_NOEXIST))
			return TC_ACT_SHOT;
		new_addr = fresh.backend_addr;
		new_port = fresh.backend_port;
	} else {
		new_addr = ct->backend_addr;
		new_port = ct->backend_port;
	}

	old_addr = iph->daddr;
	old_port = th->dest;
	l4_off = ETH_HLEN + sizeof(struct iphdr);
	bpf_l4_csum_replace(skb, l4_off + offsetof(struct tcphdr, check), old_addr, new_addr, BPF_F_PSEUDO_HDR | 4);
	bpf_l4_csum_replace(skb, l4_off + offsetof(struct tcphdr, check), old_port, new_port, 2);
	bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, 4);
	bpf_skb_store_bytes(skb, IP_DST_OFF, &new_addr, 4, 0);
	bpf_skb_store_bytes(skb, l4_off + offsetof(struct tcphdr, dest), &new_port, 2, 0);
	return TC_ACT_OK;
}

SEC("tc")
int min_dnat(struct __sk_buff *skb)
{
	return dnat(skb, 0);
}

SEC("tc")
int min_dnat_new(struct __sk_buff *skb)
{
	return dnat(skb, 1);
}

char LICENSE[] SEC("license") = "GPL";
