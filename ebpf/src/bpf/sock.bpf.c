// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sock.bpf.c: the observer's network family: cgroup socket-address hooks (cgroup/connect4,
 * connect6, sendmsg4, sendmsg6), compiled as part of observer.bpf.c. The loader attaches them
 * as bpf_links (alongside any other program) to the cgroup v2 root, so they run for every connect and every UDP send
 * with a destination on the host; like every other family they record only tasks in an observed
 * cgroup (observed_cgroups). They run before the kernel routes the attempt, so a connect that
 * then fails (a step's empty network namespace: ENETUNREACH) is still seen with its destination.
 *
 * They observe, they never decide: every program returns 1 (allow). Enforcement is the network
 * jail's (the empty namespace, the fetch proxy), not the observer's.
 */

#define KILN_SOCK_ALLOW 1

static __always_inline struct kiln_sock_event *sock_event(struct bpf_sock_addr *ctx, __u32 hook,
							  __u64 now)
{
	struct kiln_sock_event *ev = reserve_event(KILN_EVENT_SOCK, sizeof(*ev),
						   bpf_get_current_cgroup_id(), now);

	if (!ev)
		return NULL;
	ev->hook = hook;
	ev->family = ctx->user_family;
	/* user_port: the port in network order in the low 16 bits. */
	ev->port = __builtin_bswap16((__u16)ctx->user_port);
	ev->protocol = ctx->protocol;
	ev->sock_type = ctx->type;
	__builtin_memset(ev->addr, 0, sizeof(ev->addr));
	return ev;
}

/* The context fields of the other family are not readable: one function per family. */
static __always_inline int sock4(struct bpf_sock_addr *ctx, __u32 hook)
{
	__u64 now = bpf_ktime_get_ns();
	struct kiln_sock_event *ev = sock_event(ctx, hook, now);

	if (ev) {
		__u32 ip = ctx->user_ip4;

		__builtin_memcpy(ev->addr, &ip, 4);
		bpf_ringbuf_submit(ev, wakeup_flags(now));
	}
	return KILN_SOCK_ALLOW;
}

static __always_inline int sock6(struct bpf_sock_addr *ctx, __u32 hook)
{
	__u64 now = bpf_ktime_get_ns();
	struct kiln_sock_event *ev = sock_event(ctx, hook, now);

	if (ev) {
		__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
		__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];

		__builtin_memcpy(ev->addr, &w0, 4);
		__builtin_memcpy(ev->addr + 4, &w1, 4);
		__builtin_memcpy(ev->addr + 8, &w2, 4);
		__builtin_memcpy(ev->addr + 12, &w3, 4);
		bpf_ringbuf_submit(ev, wakeup_flags(now));
	}
	return KILN_SOCK_ALLOW;
}

SEC("cgroup/connect4")
int kiln_connect4(struct bpf_sock_addr *ctx)
{
	return sock4(ctx, KILN_SOCK_CONNECT4);
}

SEC("cgroup/connect6")
int kiln_connect6(struct bpf_sock_addr *ctx)
{
	return sock6(ctx, KILN_SOCK_CONNECT6);
}

SEC("cgroup/sendmsg4")
int kiln_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4(ctx, KILN_SOCK_SENDMSG4);
}

SEC("cgroup/sendmsg6")
int kiln_sendmsg6(struct bpf_sock_addr *ctx)
{
	return sock6(ctx, KILN_SOCK_SENDMSG6);
}
