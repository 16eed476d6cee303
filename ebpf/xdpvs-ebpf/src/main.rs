//! The xdpvs dataplane: an XDP program that forwards packets for virtual services.
//!
//! Per packet: [`parse`] the headers; look the destination up in `SERVICES` (a miss is passed
//! to the kernel untouched, so the director host keeps working); find the flow in the
//! connection table ([`conntrack`]) or, for a new connection, pick a real with the service's
//! scheduler ([`schedule`]); then send the frame to that real ([`forward`]). ICMP errors about
//! a tracked flow follow the flow to its real ([`icmp`], [`icmp6`]). IPv4 and IPv6 share
//! every step but parsing, the NAT rewrite and the ICMP errors.
//!
//! Runtime configuration lives in maps written by the control plane, never in compile-time
//! switches. Map types come from `xdpvs-common`, shared with the control plane.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod atomic;
mod conntrack;
mod forward;
mod icmp;
mod icmp6;
mod maps;
mod nat;
mod parse;
mod persist;
mod reset;
mod schedule;
mod sweep;
mod sync;
mod tunnel;
mod tunnel6;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use xdpvs_common::{
    fwd_kind, sched_kind, stat, ConnKey, ExpireRequest, Real, Service, SyncEvent, NO_REAL,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, SETTINGS_F_NAT, SVC_F_DRAINING, SVC_F_STANDBY,
};

use crate::conntrack::{Lookup, Reply};
use crate::maps::count;
use crate::parse::Packet;

/// `frags`: multi-buffer aware (section `xdp.frags`, loaded with BPF_F_XDP_HAS_FRAGS), so
/// drivers hand it jumbo and aggregated frames split over pages instead of refusing to attach
/// or dropping them; [`parse`] reads headers from the linear part only.
#[xdp(frags)]
pub fn xdpvs(ctx: XdpContext) -> u32 {
    // Written whole by `parse` when it returns PACKET, read only then: no zeroing per packet.
    let mut slot = core::mem::MaybeUninit::<Packet>::uninit();
    let verdict = parse::parse(&ctx, slot.as_mut_ptr());
    if verdict != parse::PACKET {
        count(verdict & !parse::DROP);
        return if verdict & parse::DROP != 0 {
            xdp_action::XDP_DROP
        } else {
            xdp_action::XDP_PASS
        };
    }
    // SAFETY: PACKET means every field was written (see `parse`).
    let pkt = unsafe { slot.assume_init_ref() };
    match pkt.proto {
        PROTO_ICMP => icmp::handle(&ctx, pkt),
        PROTO_ICMPV6 => icmp6::handle(&ctx, pkt),
        _ => match unsafe { maps::SERVICES.get(&pkt.service_key()) } {
            Some(svc) => {
                let mut verdict = handle(&ctx, pkt, svc);
                if verdict == MISS {
                    verdict = miss(&ctx, pkt, svc, svc.fwd == fwd_kind::NAT);
                }
                if verdict & TUNNEL != 0 {
                    verdict = tunnel_send(&ctx, pkt, svc, verdict & !TUNNEL);
                }
                verdict
            }
            None => not_a_service(&ctx, pkt),
        },
    }
}

/// What [`handle`] returns (instead of an XDP action) for a mid-flow TCP segment of no flow:
/// [`miss`] takes it, called by the entry point so that its frame and `handle`'s never add up.
const MISS: u32 = 0xffff;

/// What [`handle`] and [`miss`] return for a packet to tunnel to real `id`: `TUNNEL | id`.
/// [`tunnel_send`] takes it, called by the entry point for the same reason as `miss`.
const TUNNEL: u32 = 1 << 20;

/// A packet to a virtual service. Not inlined, and a sibling of [`not_a_service`]: the
/// verifier bounds the stack of the deepest call chain at 512 bytes, so the two paths' frames
/// must not add up.
#[inline(never)]
fn handle(ctx: &XdpContext, pkt: &Packet, svc: &Service) -> u32 {
    if svc.flags & SVC_F_STANDBY != 0 {
        count(stat::DROP_STANDBY);
        return xdp_action::XDP_DROP;
    }
    if pkt.fragment {
        // A first fragment carries ports but its followers do not: tracking only part of a
        // datagram would split it between reals.
        count(stat::DROP_FRAGMENT);
        return xdp_action::XDP_DROP;
    }
    let key: ConnKey = pkt.conn_key();
    let now = unsafe { bpf_ktime_get_ns() };
    let nat = svc.fwd == fwd_kind::NAT;
    let real = match conntrack::lookup(&key, pkt, now) {
        Lookup::Existing(id, real) => return to_real(ctx, pkt, id, &real, svc, now),
        Lookup::Drop(reason) => {
            count(reason);
            return xdp_action::XDP_DROP;
        }
        Lookup::New => {
            if svc.flags & SVC_F_DRAINING != 0 {
                count(stat::PASS_NOT_VIP);
                return xdp_action::XDP_PASS;
            }
            if pkt.proto == PROTO_TCP && !pkt.is_syn() {
                return MISS;
            }
            let persistent = svc.persist_timeout_s != 0;
            let mut real = NO_REAL;
            if persistent {
                real = persist::lookup(svc, pkt, now);
                if real != NO_REAL {
                    count(stat::PERSIST_HIT);
                }
            }
            if real == NO_REAL {
                real = schedule::pick(svc, pkt);
            }
            // The sorry server is never remembered: a template outlives the outage.
            let mut remember = persistent;
            if real == NO_REAL {
                real = svc.fallback;
                remember = false;
            }
            if real == NO_REAL {
                count(stat::DROP_NO_REAL);
                return xdp_action::XDP_DROP;
            }
            let dnat = match maps::REALS.get(real) {
                Some(r) if nat => Some((r.addr, r.port)),
                _ => None,
            };
            let owner = conntrack::create(&key, svc, real, dnat, pkt, now);
            if owner == NO_REAL {
                return xdp_action::XDP_DROP;
            }
            if remember {
                persist::remember(svc, pkt, owner, now);
            }
            owner
        }
    };
    match maps::REALS.get(real) {
        Some(r) => to_real(ctx, pkt, real, r, svc, now),
        None => {
            count(stat::DROP_NO_REAL);
            xdp_action::XDP_DROP
        }
    }
}

/// A mid-flow TCP segment whose flow is not in the table. Under a hashing scheduler the hash
/// names the flow's real (the same on every director, and across a `--fresh` restart, while
/// the set is unchanged): the segment goes there and the entry is recreated. Under a load-based
/// one nothing can name it (a guess would reach a server that knows nothing of the
/// connection): the client gets a RST ([`reset`]). Not inlined, a sibling of [`handle`].
#[inline(never)]
fn miss(ctx: &XdpContext, pkt: &Packet, svc: &Service, nat: bool) -> u32 {
    if matches!(svc.sched, sched_kind::SH | sched_kind::MH) {
        let key = pkt.conn_key();
        let now = unsafe { bpf_ktime_get_ns() };
        let real = schedule::pick(svc, pkt);
        if let Some(r) = maps::REALS.get(real) {
            let r = *r;
            // An RST needs no entry: it ends the connection (the real is told).
            let mut owner = real;
            if pkt.tcp_flags & xdpvs_common::state::TCP_RST == 0 {
                let dnat = if nat { Some((r.addr, r.port)) } else { None };
                owner = conntrack::recreate(&key, svc, real, dnat, pkt.tcp_flags);
                if owner == NO_REAL {
                    return xdp_action::XDP_DROP;
                }
            }
            if owner == real {
                return to_real(ctx, pkt, real, &r, svc, now);
            }
            return match maps::REALS.get(owner) {
                Some(o) => to_real(ctx, pkt, owner, o, svc, now),
                None => {
                    count(stat::DROP_NO_REAL);
                    xdp_action::XDP_DROP
                }
            };
        }
    }
    reset::reset(ctx, pkt)
}

/// Forwards to the real: as it is (DR), its address and port as the destination (NAT), or
/// encapsulated to it (tunnel).
#[inline(always)]
fn to_real(ctx: &XdpContext, pkt: &Packet, id: u32, real: &Real, svc: &Service, now: u64) -> u32 {
    match svc.fwd {
        fwd_kind::NAT => {
            if !nat::rewrite(ctx, pkt, real.addr, real.port, true) {
                count(stat::PASS_SPLIT_HEADERS);
                return xdp_action::XDP_DROP;
            }
        }
        fwd_kind::TUNNEL | fwd_kind::GUE => return TUNNEL | id,
        _ => {}
    }
    forward::to_real(ctx, pkt, id, real, now)
}

/// Encapsulates a packet to real `id` ([`TUNNEL`]) and sends it, or answers it with ICMP
/// "fragmentation needed" when the tunnel's overhead pushes it past the path MTU: three calls,
/// siblings of one another, at the least depth (see `tunnel`).
#[inline(never)]
fn tunnel_send(ctx: &XdpContext, pkt: &Packet, svc: &Service, id: u32) -> u32 {
    let Some(real) = maps::REALS.get(id) else {
        count(stat::DROP_NO_REAL);
        return xdp_action::XDP_DROP;
    };
    let port = if svc.fwd == fwd_kind::GUE {
        svc.tunnel_port
    } else {
        0
    };
    let v6 = pkt.family == xdpvs_common::FAMILY_V6;
    let rc = tunnel::route(ctx, pkt, real, port);
    if rc & tunnel::TOO_BIG != 0 {
        return if v6 {
            tunnel6::too_big(ctx, pkt, rc & !tunnel::TOO_BIG)
        } else {
            tunnel::too_big(ctx, pkt, rc as u16)
        };
    }
    if rc != 0 {
        return xdp_action::XDP_DROP;
    }
    let egress = if v6 {
        tunnel6::encap(ctx, pkt, id, real, port)
    } else {
        tunnel::encap(ctx, pkt, id, real, port)
    };
    match egress {
        0 => xdp_action::XDP_DROP,
        egress => forward::send(ctx, pkt, egress, unsafe { (*ctx.ctx).ingress_ifindex }),
    }
}

/// A packet to no service: the director's own traffic (passed), or, while some service uses
/// NAT, possibly a real's reply to translate back to its VIP. Not inlined (see [`handle`]).
#[inline(never)]
fn not_a_service(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let nat = match maps::SETTINGS.get(0) {
        Some(s) => s.flags & SETTINGS_F_NAT != 0,
        None => false,
    };
    if nat {
        let now = unsafe { bpf_ktime_get_ns() };
        match conntrack::reply(&pkt.conn_key(), pkt, now) {
            Reply::None => {}
            Reply::Drop(reason) => {
                count(reason);
                return xdp_action::XDP_DROP;
            }
            Reply::Flow(vip, vport) => {
                if pkt.fragment {
                    count(stat::DROP_FRAGMENT);
                    return xdp_action::XDP_DROP;
                }
                if !nat::rewrite(ctx, pkt, vip, vport, false) {
                    count(stat::PASS_SPLIT_HEADERS);
                    return xdp_action::XDP_DROP;
                }
                return forward::to_client(ctx, pkt);
            }
        }
    }
    count(stat::PASS_NOT_VIP);
    xdp_action::XDP_PASS
}

/// Retires one connection entry if it is idle past its state's timeout (or unconditionally with
/// `EXPIRE_F_FORCE`). The control plane's expiry sweep runs this through BPF_PROG_TEST_RUN with
/// an [`ExpireRequest`] as the frame, so releasing the entry's counters is one compare-and-swap
/// in the kernel, serialised with the packet path: counters stay exact under any interleaving.
#[xdp]
pub fn xdpvs_expire(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + core::mem::size_of::<ExpireRequest>() > end {
        return xdpvs_common::expire_rc::KEPT;
    }
    let req = unsafe { *(start as *const ExpireRequest) };
    conntrack::expire(&req)
}

/// Installs one connection entry as the sync peer reported it (see [`sync::install`]); run by
/// the control plane through BPF_PROG_TEST_RUN with a [`SyncEvent`] as the frame. Returns one
/// of `install_rc::*`.
#[xdp]
pub fn xdpvs_sync_install(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + core::mem::size_of::<SyncEvent>() > end {
        return xdpvs_common::install_rc::INVALID;
    }
    let req = unsafe { *(start as *const SyncEvent) };
    sync::install(&req)
}

/// Expires both connection tables in one call and recounts the embryonic entries (see
/// [`sweep`]); the frame is a [`xdpvs_common::SweepResult`], overwritten with the result.
#[xdp]
pub fn xdpvs_sweep(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + core::mem::size_of::<xdpvs_common::SweepResult>() > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    sweep::sweep(start as *mut xdpvs_common::SweepResult);
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
