// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
// eastguard capture: one object per pod, loaded and attached by `eastguard node-agent --capture`.
//
// Programs (attached to the pod's cgroup unless noted):
//   eg_connect4/6   cgroup/connect4, connect6: app TCP connects to non-excluded destinations are
//                   rewritten to the sidecar's outbound port; the original destination is kept
//                   by socket cookie.
//   eg_sockops      sockops: at establishment the cookie entry moves to the app socket's local
//                   address (what the sidecar sees as the peer) until that socket closes;
//                   loopback app<->sidecar sockets join the short-circuit sockhash.
//   eg_getsockopt   cgroup/getsockopt: answers SO_ORIGINAL_DST for redirected connections, so the
//                   sidecar reads it exactly as it would after an iptables REDIRECT.
//   eg_sk_msg       sk_msg on the sockhash: sends between two local sockets go straight to the
//                   peer's receive queue.
//   eg_sk_lookup    sk_lookup (pod network namespace): inbound TCP to app ports is given to the
//                   sidecar's inbound listener; its local address stays the original destination.
//   eg_guard        cgroup_skb/egress: fail-closed backstop. TCP leaving the pod from anything
//                   but the sidecar is dropped unless it is loopback or excluded, so a pod whose
//                   redirect is missing or detached cannot reach the network around its sidecar.
//
// Every decision that needs configuration fails closed when the configuration is missing.

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

#define VERDICT_ALLOW 1
#define VERDICT_DENY 0

#define FLAG_SHORT_CIRCUIT 1

// Context fields are read unconditionally and through volatile loads: the verifier only accepts
// constant-offset loads from the context, and clang would otherwise merge the IPv4 and IPv6
// branches into one load from a computed offset.
#define LOAD(x) (*(volatile __typeof__(x) *)&(x))

static __always_inline void pick(__u32 *ip, int v4, __u32 a4, __u32 a0, __u32 a1, __u32 a2, __u32 a3)
{
	if (v4) {
		ip[0] = 0;
		ip[1] = 0;
		ip[2] = bpf_htonl(0xffff);
		ip[3] = a4;
	} else {
		ip[0] = a0;
		ip[1] = a1;
		ip[2] = a2;
		ip[3] = a3;
	}
}

// Shared with the loader (ebpf-redirect/src/maps.rs): layout must match.
struct eg_config {
	__u64 sidecar_cgroup; // cgroup id whose sockets are the sidecar's own (never redirected)
	__u32 ready;          // 1 once the redirect is attached; before that, app egress is denied
	__u16 outbound_port;  // sidecar outbound listener (host order), on 127.0.0.1 and ::1
	__u16 inbound_port;   // sidecar inbound listener (host order)
	__u32 flags;          // FLAG_*
	__u32 pad;
};

// An address as 16 bytes (IPv4 as ::ffff:a.b.c.d) and a port in network order.
struct eg_addr {
	__u32 ip[4];
	__u16 port;   // network order
	__u16 family; // AF_INET or AF_INET6: the family the original connect used
};

struct eg_tuple {
	__u32 ip[4];
	__u32 port; // host order
};

struct eg_sock_key {
	__u32 local[4];
	__u32 remote[4];
	__u32 local_port;  // host order
	__u32 remote_port; // host order
};

struct eg_lpm_key {
	__u32 prefixlen;
	__u32 ip[4];
};

enum eg_counter {
	C_OUT_REDIRECTED,
	C_OUT_PASSTHROUGH,
	C_OUT_DENIED,
	C_IN_STEERED,
	C_IN_PASSTHROUGH,
	C_IN_DROPPED,
	C_ORIG_DST_FOUND,
	C_ORIG_DST_MISSING,
	C_GUARD_DROPPED,
	C_SHORT_CIRCUIT_SOCKETS,
	C_COUNT,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct eg_config);
} eg_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, C_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} eg_counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct eg_addr);
} eg_orig_cookie SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct eg_tuple);
	__type(value, struct eg_addr);
} eg_orig_tuple SEC(".maps");

// Destination ports (host order) that app connects may reach directly.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} eg_skip_out SEC(".maps");

// Local ports (host order) whose inbound connections are not steered to the sidecar.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} eg_skip_in SEC(".maps");

// Destination CIDRs that app connects may reach directly.
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 64);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct eg_lpm_key);
	__type(value, __u32);
} eg_skip_cidr SEC(".maps");

// The sidecar's inbound listeners: 0 = IPv4, 1 = IPv6.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u32);
} eg_inbound SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct eg_sock_key);
	__type(value, __u32);
} eg_socks SEC(".maps");

static __always_inline void count(__u32 which)
{
	__u64 *c = bpf_map_lookup_elem(&eg_counters, &which);
	if (c)
		*c += 1;
}

static __always_inline struct eg_config *config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&eg_config, &zero);
}

static __always_inline void map_v4(__u32 *ip, __u32 v4)
{
	ip[0] = 0;
	ip[1] = 0;
	ip[2] = bpf_htonl(0xffff);
	ip[3] = v4;
}

static __always_inline int is_mapped(const __u32 *ip)
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0xffff);
}

// 127.0.0.0/8, ::ffff:127.0.0.0/104 and ::1.
static __always_inline int is_loopback(const __u32 *ip)
{
	if (is_mapped(ip))
		return (bpf_ntohl(ip[3]) >> 24) == 127;
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
}

static __always_inline int port_skipped(void *map, __u32 port)
{
	return bpf_map_lookup_elem(map, &port) != 0;
}

static __always_inline int cidr_skipped(const __u32 *ip)
{
	struct eg_lpm_key key = { .prefixlen = 128 };
	key.ip[0] = ip[0];
	key.ip[1] = ip[1];
	key.ip[2] = ip[2];
	key.ip[3] = ip[3];
	return bpf_map_lookup_elem(&eg_skip_cidr, &key) != 0;
}

// The shared part of connect4/connect6: 1 = rewrite, 0 = leave alone, -1 = deny.
static __always_inline int outbound_verdict(struct eg_config *cfg, const __u32 *ip, __u32 port)
{
	if (!cfg)
		return -1;
	if (bpf_get_current_cgroup_id() == cfg->sidecar_cgroup)
		return 0;
	if (is_loopback(ip))
		return 0;
	if (port_skipped(&eg_skip_out, port) || cidr_skipped(ip))
		return 0;
	if (!cfg->ready || cfg->outbound_port == 0)
		return -1;
	return 1;
}

static __always_inline int remember(void *ctx, const __u32 *ip, __u16 port_be, __u16 family)
{
	struct eg_addr orig = {};
	orig.ip[0] = ip[0];
	orig.ip[1] = ip[1];
	orig.ip[2] = ip[2];
	orig.ip[3] = ip[3];
	orig.port = port_be;
	orig.family = family;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	return bpf_map_update_elem(&eg_orig_cookie, &cookie, &orig, BPF_ANY);
}

// connect4/connect6 after reading the destination: -1 deny, 0 leave alone, 1 rewrite (the
// original destination is remembered). Counted here, except the redirect itself.
static __always_inline int decide_outbound(struct bpf_sock_addr *ctx, struct eg_config *cfg,
					   const __u32 *ip, __u16 port_be, __u16 family)
{
	int v = outbound_verdict(cfg, ip, bpf_ntohs(port_be));
	if (v == 0) {
		count(C_OUT_PASSTHROUGH);
		return 0;
	}
	if (v < 0 || remember(ctx, ip, port_be, family)) {
		count(C_OUT_DENIED);
		return -1;
	}
	return 1;
}

SEC("cgroup/connect4")
int eg_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return VERDICT_ALLOW;
	struct eg_config *cfg = config();
	__u32 ip[4];
	map_v4(ip, ctx->user_ip4);
	int v = decide_outbound(ctx, cfg, ip, (__u16)ctx->user_port, AF_INET);
	if (v < 0 || !cfg)
		return VERDICT_DENY;
	if (v == 0)
		return VERDICT_ALLOW;
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(cfg->outbound_port);
	count(C_OUT_REDIRECTED);
	return VERDICT_ALLOW;
}

SEC("cgroup/connect6")
int eg_connect6(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM)
		return VERDICT_ALLOW;
	struct eg_config *cfg = config();
	__u32 ip[4];
	ip[0] = LOAD(ctx->user_ip6[0]);
	ip[1] = LOAD(ctx->user_ip6[1]);
	ip[2] = LOAD(ctx->user_ip6[2]);
	ip[3] = LOAD(ctx->user_ip6[3]);
	int mapped = is_mapped(ip);
	int v = decide_outbound(ctx, cfg, ip, (__u16)ctx->user_port, mapped ? AF_INET : AF_INET6);
	if (v < 0 || !cfg)
		return VERDICT_DENY;
	if (v == 0)
		return VERDICT_ALLOW;
	if (mapped) {
		// A dual-stack socket reaching an IPv4 peer goes to the IPv4 outbound listener.
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = bpf_htonl(0xffff);
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(cfg->outbound_port);
	count(C_OUT_REDIRECTED);
	return VERDICT_ALLOW;
}

static __always_inline void sockops_local(struct bpf_sock_ops *skops, __u32 *ip)
{
	__u32 family = LOAD(skops->family), a4 = LOAD(skops->local_ip4);
	__u32 a0 = LOAD(skops->local_ip6[0]), a1 = LOAD(skops->local_ip6[1]);
	__u32 a2 = LOAD(skops->local_ip6[2]), a3 = LOAD(skops->local_ip6[3]);
	pick(ip, family == AF_INET, a4, a0, a1, a2, a3);
}

static __always_inline void sockops_remote(struct bpf_sock_ops *skops, __u32 *ip)
{
	__u32 family = LOAD(skops->family), a4 = LOAD(skops->remote_ip4);
	__u32 a0 = LOAD(skops->remote_ip6[0]), a1 = LOAD(skops->remote_ip6[1]);
	__u32 a2 = LOAD(skops->remote_ip6[2]), a3 = LOAD(skops->remote_ip6[3]);
	pick(ip, family == AF_INET, a4, a0, a1, a2, a3);
}

static __always_inline void short_circuit(struct bpf_sock_ops *skops)
{
	struct eg_config *cfg = config();
	if (!cfg || !(cfg->flags & FLAG_SHORT_CIRCUIT))
		return;
	struct eg_sock_key key = {};
	sockops_local(skops, key.local);
	sockops_remote(skops, key.remote);
	// Only app<->sidecar connections inside the pod: both ends on loopback.
	if (!is_loopback(key.local) || !is_loopback(key.remote))
		return;
	key.local_port = LOAD(skops->local_port);
	// remote_port holds the network-order port in its upper half on little-endian machines.
	key.remote_port = bpf_ntohl(LOAD(skops->remote_port)) & 0xffff;
	if (bpf_sock_hash_update(skops, &eg_socks, &key, BPF_NOEXIST) == 0)
		count(C_SHORT_CIRCUIT_SOCKETS);
}

SEC("sockops")
int eg_sockops(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		__u64 cookie = bpf_get_socket_cookie(skops);
		struct eg_addr *orig = bpf_map_lookup_elem(&eg_orig_cookie, &cookie);
		if (orig) {
			struct eg_tuple t = {};
			sockops_local(skops, t.ip);
			t.port = LOAD(skops->local_port);
			struct eg_addr copy = *orig;
			bpf_map_update_elem(&eg_orig_tuple, &t, &copy, BPF_ANY);
			bpf_map_delete_elem(&eg_orig_cookie, &cookie);
			// Forget the entry when this socket closes, so a later socket on the same local
			// port never inherits it.
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		}
		short_circuit(skops);
		break;
	}
	case BPF_SOCK_OPS_STATE_CB:
		if (LOAD(skops->args[1]) == BPF_TCP_CLOSE) {
			struct eg_tuple t = {};
			sockops_local(skops, t.ip);
			t.port = LOAD(skops->local_port);
			bpf_map_delete_elem(&eg_orig_tuple, &t);
		}
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		short_circuit(skops);
		break;
	default:
		break;
	}
	return 1;
}

SEC("sk_msg")
int eg_sk_msg(struct sk_msg_md *msg)
{
	struct eg_sock_key peer = {};
	__u32 family = LOAD(msg->family);
	if (family != AF_INET && family != AF_INET6)
		return SK_PASS;
	__u32 r4 = LOAD(msg->remote_ip4), l4 = LOAD(msg->local_ip4);
	__u32 r0 = LOAD(msg->remote_ip6[0]), r1 = LOAD(msg->remote_ip6[1]);
	__u32 r2 = LOAD(msg->remote_ip6[2]), r3 = LOAD(msg->remote_ip6[3]);
	__u32 l0 = LOAD(msg->local_ip6[0]), l1 = LOAD(msg->local_ip6[1]);
	__u32 l2 = LOAD(msg->local_ip6[2]), l3 = LOAD(msg->local_ip6[3]);
	pick(peer.local, family == AF_INET, r4, r0, r1, r2, r3);
	pick(peer.remote, family == AF_INET, l4, l0, l1, l2, l3);
	peer.local_port = bpf_ntohl(LOAD(msg->remote_port)) & 0xffff;
	peer.remote_port = LOAD(msg->local_port);
	// Not found: the message takes the normal path (the helper only sets a redirect on a hit).
	bpf_msg_redirect_hash(msg, &eg_socks, &peer, BPF_F_INGRESS);
	return SK_PASS;
}

SEC("cgroup/getsockopt")
int eg_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	// The sidecar's accepted socket: its peer is the app socket's local address.
	struct eg_tuple t = {};
	__u32 family = LOAD(sk->family);
	if (family != AF_INET && family != AF_INET6)
		return 1;
	__u32 a4 = LOAD(sk->dst_ip4);
	__u32 a0 = LOAD(sk->dst_ip6[0]), a1 = LOAD(sk->dst_ip6[1]);
	__u32 a2 = LOAD(sk->dst_ip6[2]), a3 = LOAD(sk->dst_ip6[3]);
	pick(t.ip, family == AF_INET, a4, a0, a1, a2, a3);
	t.port = bpf_ntohs(LOAD(sk->dst_port));
	struct eg_addr *orig = bpf_map_lookup_elem(&eg_orig_tuple, &t);
	if (!orig) {
		count(C_ORIG_DST_MISSING);
		return 1;
	}
	if (ctx->level == SOL_IP) {
		if (orig->family != AF_INET)
			return 1;
		__u8 *out = ctx->optval;
		if (out + 16 > (__u8 *)ctx->optval_end)
			return 1;
		__u16 family = AF_INET;
		__builtin_memcpy(out, &family, 2);
		__builtin_memcpy(out + 2, &orig->port, 2);
		__builtin_memcpy(out + 4, &orig->ip[3], 4);
		__builtin_memset(out + 8, 0, 8);
		ctx->optlen = 16;
	} else {
		if (orig->family != AF_INET6)
			return 1;
		__u8 *out = ctx->optval;
		if (out + 28 > (__u8 *)ctx->optval_end)
			return 1;
		__u16 family = AF_INET6;
		__u32 zero = 0;
		__builtin_memcpy(out, &family, 2);
		__builtin_memcpy(out + 2, &orig->port, 2);
		__builtin_memcpy(out + 4, &zero, 4);
		__builtin_memcpy(out + 8, orig->ip, 16);
		__builtin_memcpy(out + 24, &zero, 4);
		ctx->optlen = 28;
	}
	ctx->retval = 0;
	count(C_ORIG_DST_FOUND);
	return 1;
}

SEC("sk_lookup")
int eg_sk_lookup(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	__u32 ip[4];
	__u32 family = LOAD(ctx->family);
	if (family != AF_INET && family != AF_INET6)
		return SK_PASS;
	__u32 slot = family == AF_INET6 ? 1 : 0;
	__u32 a4 = LOAD(ctx->local_ip4);
	__u32 a0 = LOAD(ctx->local_ip6[0]), a1 = LOAD(ctx->local_ip6[1]);
	__u32 a2 = LOAD(ctx->local_ip6[2]), a3 = LOAD(ctx->local_ip6[3]);
	pick(ip, family == AF_INET, a4, a0, a1, a2, a3);
	if (is_loopback(ip))
		return SK_PASS;
	struct eg_config *cfg = config();
	__u32 port = LOAD(ctx->local_port);
	if (cfg && port == cfg->inbound_port) {
		count(C_IN_PASSTHROUGH);
		return SK_PASS;
	}
	if (port_skipped(&eg_skip_in, port)) {
		count(C_IN_PASSTHROUGH);
		return SK_PASS;
	}
	if (!cfg || !cfg->ready) {
		count(C_IN_DROPPED);
		return SK_DROP;
	}
	struct bpf_sock *sk = bpf_map_lookup_elem(&eg_inbound, &slot);
	if (!sk) {
		// The sidecar is not listening: nobody else may take the connection.
		count(C_IN_DROPPED);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		count(C_IN_DROPPED);
		return SK_DROP;
	}
	count(C_IN_STEERED);
	return SK_PASS;
}

SEC("cgroup_skb/egress")
int eg_guard(struct __sk_buff *skb)
{
	struct eg_config *cfg = config();
	if (cfg && bpf_skb_cgroup_id(skb) == cfg->sidecar_cgroup)
		return 1;
	__u32 ip[4];
	__u8 proto;
	__u32 l4;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		__u8 hdr[20];
		if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)))
			return 0;
		proto = hdr[9];
		__u32 daddr;
		__builtin_memcpy(&daddr, hdr + 16, 4);
		map_v4(ip, daddr);
		l4 = (hdr[0] & 0x0f) * 4;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		__u8 hdr[40];
		if (bpf_skb_load_bytes(skb, 0, hdr, sizeof(hdr)))
			return 0;
		proto = hdr[6];
		__builtin_memcpy(ip, hdr + 24, 16);
		l4 = 40;
	} else {
		return 1;
	}
	// UDP and ICMP are not captured by the sidecar (as in Istio) and pass. Anything else that is
	// not UDP/ICMP is treated like TCP: an IPv6 extension header cannot hide a TCP segment.
	if (proto == 17 || proto == 1 || proto == 58)
		return 1;
	if (is_loopback(ip))
		return 1;
	if (cidr_skipped(ip))
		return 1;
	if (proto == IPPROTO_TCP) {
		__u16 ports[2];
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)))
			return 0;
		// Excluded destinations, and replies from app ports that are not captured inbound.
		if (port_skipped(&eg_skip_out, bpf_ntohs(ports[1])) ||
		    port_skipped(&eg_skip_in, bpf_ntohs(ports[0])))
			return 1;
	}
	count(C_GUARD_DROPPED);
	return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
