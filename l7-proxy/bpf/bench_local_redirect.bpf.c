// SPDX-License-Identifier: Apache-2.0
//
// A benchmark prototype (bench/l7-proxy, MW_BENCH_SOCKMAP=1), not part of
// the proxy: TCP connections with both ends on one address of this host
// and one end on port TARGET_PORT are put in a sockhash when they become
// established (sockops, attached to the bench's cgroup), and what either
// end sends is moved straight into the other end's receive queue
// (sk_msg), skipping TCP/IP for that hop. It measures what socket-level
// redirection would save on the proxy's node-local hop.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#ifndef TARGET_PORT
#error "build with -DTARGET_PORT=<port>"
#endif

struct sock_key {
	__u32 local_ip;
	__u32 remote_ip;
	__u32 local_port;  /* host order */
	__u32 remote_port; /* host order */
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u32);
} local_socks SEC(".maps");

/* Keys in local_socks: a send whose peer is not there (not yet, or
 * not local) goes through TCP as usual instead of being dropped. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_key);
	__type(value, __u32);
} local_keys SEC(".maps");

/* remote_port holds the port in network order, in the low 16 bits on
 * current kernels and the high 16 bits on old ones. */
static __always_inline __u32 remote_port_host(__u32 raw)
{
	if (raw > 0xffff)
		raw >>= 16;
	return bpf_ntohs((__u16)raw);
}

SEC("sockops")
int local_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != 2 /* AF_INET */)
		return 1;
	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB &&
	    skops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
#ifndef BOTH_HOPS
	/* Only the proxy's onward hop (proxy and nginx share 198.18.1.1); with
	 * BOTH_HOPS also the client's hop, whose ends (wrk in its namespace,
	 * the proxy's accepted socket) are both sockets of this host too. */
	if (skops->local_ip4 != skops->remote_ip4)
		return 1;
#endif
	struct sock_key key = {
		.local_ip = skops->local_ip4,
		.remote_ip = skops->remote_ip4,
		.local_port = skops->local_port,
		.remote_port = remote_port_host(skops->remote_port),
	};
	if (key.local_port != TARGET_PORT && key.remote_port != TARGET_PORT)
		return 1;
	__u32 one = 1;
	if (bpf_sock_hash_update(skops, &local_socks, &key, BPF_ANY) == 0)
		bpf_map_update_elem(&local_keys, &key, &one, BPF_ANY);
	return 1;
}

SEC("sk_msg")
int local_redirect(struct sk_msg_md *msg)
{
	struct sock_key peer = {
		.local_ip = msg->remote_ip4,
		.remote_ip = msg->local_ip4,
		.local_port = remote_port_host(msg->remote_port),
		.remote_port = msg->local_port,
	};
	if (!bpf_map_lookup_elem(&local_keys, &peer))
		return SK_PASS;
	return bpf_msg_redirect_hash(msg, &local_socks, &peer, BPF_F_INGRESS);
}

char LICENSE[] SEC("license") = "Apache-2.0";
