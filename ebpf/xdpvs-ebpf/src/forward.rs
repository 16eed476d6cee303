//! Sending a packet to its real server.
//!
//! Direct routing: the IP packet is left untouched; only the Ethernet header changes. The
//! kernel's FIB gives the next hop toward the real and its MAC (so reals are never configured
//! by MAC), and the frame leaves by the ingress interface (XDP_TX) or is redirected to the
//! egress one. A route lookup costs about as much as the rest of the packet path, so each CPU
//! caches each real's next hop for [`NEXTHOP_TTL_NS`]; the cache is keyed by the real's address
//! as well as its id, so an id reused for another real never inherits a stale MAC.
//!
//! Frame size: a multi-buffer frame is forwarded like any other (only the linear Ethernet header
//! changes). The cached next hop serves frames of every size, so the route lookup does not check
//! the MTU; a frame larger than the egress MTU is counted (`OVER_MTU`) and still forwarded: in
//! generic mode it is a GRO aggregate the stack segments on the way out, in native mode the
//! driver decides (veth drops it, counting an `xdp_tx_errors`).
//!
//! IPv6 takes the same path with an AF_INET6 route lookup (the FIB resolves the next hop
//! through the neighbour table, as ARP does for IPv4). The hop limit, like the IPv4 TTL, is
//! left as the client sent it: the director is not a router hop for the flow (IPVS does the
//! same), and NAT replies keep the real's.
//!
//! NAT replies ([`to_client`]) go wherever the FIB routes the client; that lookup is not cached
//! (clients are many, and the next hop toward them is usually one router), so a reply costs one
//! route lookup. Like a real's, a client's next hop without a resolved MAC drops the packet
//! (`DROP_NO_NEIGH`): passed, the translated packet would be a martian to the director's stack.
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_check_mtu, bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use xdpvs_common::{stat, Addr, Real, FAMILY_V6};

use crate::maps::{count, FIB_SCRATCH, NEXTHOP, REAL_STATS};
use crate::parse::Packet;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;
/// Largest IP packet of a standard Ethernet MTU: frames up to this size skip the MTU check.
const ETH_DATA_LEN: u32 = 1500;
const MTU_CHK_FRAG_NEEDED: i64 = 1;

/// How long a cached next hop is used before the FIB is asked again (a real whose MAC changes,
/// or a route change, is followed within this time).
pub const NEXTHOP_TTL_NS: u64 = 1_000_000_000;

#[repr(C)]
pub struct NextHop {
    /// `bpf_ktime_get_ns` after which the entry must be refreshed; 0 = empty.
    pub expires_ns: u64,
    /// The real address this entry was resolved for.
    pub addr: Addr,
    pub ifindex: u32,
    pub dmac: [u8; 6],
    pub smac: [u8; 6],
}

#[inline(always)]
pub fn count_new_conn(real: u32) {
    if let Some(s) = REAL_STATS.get_ptr_mut(real) {
        unsafe { (*s).conns += 1 };
    }
}

pub fn to_real(ctx: &XdpContext, pkt: &Packet, real_id: u32, real: &Real, now: u64) -> u32 {
    let hop = match NEXTHOP.get_ptr_mut(real_id) {
        Some(h) => h,
        None => {
            count(stat::DROP_NO_REAL);
            return xdp_action::XDP_DROP;
        }
    };
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let dst = &real.addr;
    let fresh = unsafe { (*hop).expires_ns > now && (*hop).addr == *dst };
    if !fresh {
        let rc = resolve(ctx, pkt, dst, ingress, hop, now);
        if rc != FIB_SUCCESS {
            // Passing would let the director's own stack answer for the VIP (with a reset);
            // the control plane keeps reals' neighbours resolved, so a miss is rare and
            // retried by TCP.
            count(if rc == FIB_NO_NEIGH {
                stat::DROP_NO_NEIGH
            } else {
                stat::DROP_FIB
            });
            return xdp_action::XDP_DROP;
        }
    }
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        count(stat::MALFORMED);
        return xdp_action::XDP_DROP;
    }
    let egress = unsafe {
        let eth = start as *mut [u8; 6];
        *eth = (*hop).dmac;
        *eth.add(1) = (*hop).smac;
        (*hop).ifindex
    };
    if let Some(s) = REAL_STATS.get_ptr_mut(real_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += pkt.frame_len as u64;
        }
    }
    send(ctx, pkt, egress, ingress)
}

/// Sends a real's (already translated) reply to the client, wherever the FIB routes it.
pub fn to_client(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    // In per-CPU map memory, not on the stack (see `not_a_service`).
    let fib = match FIB_SCRATCH.get_ptr_mut(0) {
        Some(f) => unsafe { &mut *f },
        None => return xdp_action::XDP_DROP,
    };
    let rc = lookup(ctx, fib, pkt, &pkt.dst, ingress);
    if rc != FIB_SUCCESS {
        count(if rc == FIB_NO_NEIGH {
            stat::DROP_NO_NEIGH
        } else {
            stat::DROP_FIB
        });
        return xdp_action::XDP_DROP;
    }
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        count(stat::MALFORMED);
        return xdp_action::XDP_DROP;
    }
    unsafe {
        let eth = start as *mut [u8; 6];
        *eth = fib.dmac;
        *eth.add(1) = fib.smac;
    }
    count(stat::NAT_REPLY);
    send(ctx, pkt, fib.ifindex, ingress)
}

/// Sends the rewritten frame out of `egress` (back out of `ingress` by XDP_TX).
#[inline(always)]
pub(crate) fn send(ctx: &XdpContext, pkt: &Packet, egress: u32, ingress: u32) -> u32 {
    if pkt.ip_len > ETH_DATA_LEN && over_mtu(ctx, egress, pkt.ip_len) {
        count(stat::OVER_MTU);
    }
    if egress == ingress {
        count(stat::TX);
        xdp_action::XDP_TX
    } else {
        count(stat::REDIRECT);
        unsafe { bpf_redirect(egress, 0) as u32 }
    }
}

/// The IP packet is larger than `ifindex`'s MTU.
#[inline(never)]
fn over_mtu(ctx: &XdpContext, ifindex: u32, ip_len: u32) -> bool {
    let mut mtu_len = ip_len;
    let rc = unsafe { bpf_check_mtu(ctx.ctx as *mut _, ifindex, &mut mtu_len, 0, 0) };
    rc == MTU_CHK_FRAG_NEEDED
}

/// Asks the FIB for the next hop toward `dst` and fills this CPU's cache entry.
#[inline(always)]
fn resolve(
    ctx: &XdpContext,
    pkt: &Packet,
    dst: &Addr,
    ingress: u32,
    hop: *mut NextHop,
    now: u64,
) -> i64 {
    // In per-CPU map memory, not on the stack (see `handle` in main.rs).
    let fib = match FIB_SCRATCH.get_ptr_mut(0) {
        Some(f) => unsafe { &mut *f },
        None => return -1,
    };
    let rc = lookup(ctx, fib, pkt, dst, ingress);
    if rc == FIB_SUCCESS {
        unsafe {
            (*hop).dmac = fib.dmac;
            (*hop).smac = fib.smac;
            (*hop).ifindex = fib.ifindex;
            (*hop).addr = *dst;
            (*hop).expires_ns = now + NEXTHOP_TTL_NS;
        }
    }
    rc
}

/// The route from `pkt`'s source to `dst` (of `pkt`'s family), into `fib`. tot_len 0: no MTU
/// check here (a real's entry is cached for frames of every size; `send` checks the MTU).
#[inline(always)]
fn lookup(ctx: &XdpContext, fib: &mut FibParams, pkt: &Packet, dst: &Addr, ingress: u32) -> i64 {
    *fib = unsafe { core::mem::zeroed() };
    fib.l4_protocol = pkt.proto;
    fib.ifindex = ingress;
    fib.__bindgen_anon_1.tot_len = 0;
    if pkt.family == FAMILY_V6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = pkt.src.w;
        fib.__bindgen_anon_4.ipv6_dst = dst.w;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = pkt.src.w[0];
        fib.__bindgen_anon_4.ipv4_dst = dst.w[0];
    }
    unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    }
}
