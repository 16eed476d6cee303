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
mod schedule;
mod sweep;
mod sync;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use xdpvs_common::{
    fwd_kind, stat, ConnKey, ExpireRequest, Real, Service, SyncEvent, NO_REAL, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_TCP, SETTINGS_F_NAT, SVC_F_DRAINING, SVC_F_STANDBY,
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
            Some(svc) => handle(&ctx, pkt, svc),
            None => not_a_service(&ctx, pkt),
        },
    }
}

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
        Lookup::Existing(id, real) => return to_real(ctx, pkt, id, &real, nat, now),
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
                // Never guess a real for a mid-flow packet: it would reach a server that
                // knows nothing of the connection.
                count(stat::DROP_NO_CONN);
                return xdp_action::XDP_DROP;
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
        Some(r) => to_real(ctx, pkt, real, r, nat, now),
        None => {
            count(stat::DROP_NO_REAL);
            xdp_action::XDP_DROP
        }
    }
}

/// Forwards to the real, its address and port as the destination for NAT.
#[inline(always)]
fn to_real(ctx: &XdpContext, pkt: &Packet, id: u32, real: &Real, nat: bool, now: u64) -> u32 {
    if nat && !nat::rewrite(ctx, pkt, real.addr, real.port, true) {
        count(stat::PASS_SPLIT_HEADERS);
        return xdp_action::XDP_DROP;
    }
    forward::to_real(ctx, pkt, id, real, now)
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
