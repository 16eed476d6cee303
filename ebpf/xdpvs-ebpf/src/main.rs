//! The xdpvs dataplane: an XDP program that forwards packets for virtual services.
//!
//! Per packet: [`parse`] the headers; look the destination up in `SERVICES` (a miss is passed
//! to the kernel untouched, so the director host keeps working); find the flow in the
//! connection table ([`conntrack`]) or, for a new connection, pick a real with the service's
//! scheduler ([`schedule`]); then send the frame to that real ([`forward`]).
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
mod maps;
mod parse;
mod schedule;
mod sweep;
mod sync;

use aya_ebpf::{
    bindings::xdp_action, helpers::bpf_ktime_get_ns, macros::xdp, programs::XdpContext,
};
use xdpvs_common::{
    stat, ConnKey, ExpireRequest, Service, SyncEvent, NO_REAL, PROTO_TCP, SVC_F_DRAINING,
    SVC_F_STANDBY,
};

use crate::conntrack::Lookup;
use crate::maps::count;
use crate::parse::Packet;

/// `frags`: multi-buffer aware (section `xdp.frags`, loaded with BPF_F_XDP_HAS_FRAGS), so
/// drivers hand it jumbo and aggregated frames split over pages instead of refusing to attach
/// or dropping them; [`parse`] reads headers from the linear part only.
#[xdp(frags)]
pub fn xdpvs(ctx: XdpContext) -> u32 {
    match parse::parse(&ctx) {
        parse::Parsed::Packet(pkt) => handle(&ctx, &pkt),
        parse::Parsed::Pass(reason) => {
            count(reason);
            xdp_action::XDP_PASS
        }
        parse::Parsed::Drop(reason) => {
            count(reason);
            xdp_action::XDP_DROP
        }
    }
}

/// A parsed IP packet: route it if it belongs to a virtual service.
#[inline(always)]
fn handle(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let svc: Service = match unsafe { maps::SERVICES.get(&pkt.service_key()) } {
        Some(s) => *s,
        None => {
            count(stat::PASS_NOT_VIP);
            return xdp_action::XDP_PASS;
        }
    };
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
    let real = match conntrack::lookup(&key, pkt, now) {
        Lookup::Existing(id, real) => return forward::to_real(ctx, pkt, id, &real, now),
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
            let mut real = schedule::pick(&svc, pkt);
            if real == NO_REAL {
                real = svc.fallback;
            }
            if real == NO_REAL {
                count(stat::DROP_NO_REAL);
                return xdp_action::XDP_DROP;
            }
            let owner = conntrack::create(&key, &svc, real, pkt, now);
            if owner == NO_REAL {
                return xdp_action::XDP_DROP;
            }
            owner
        }
    };
    match maps::REALS.get(real) {
        Some(r) => forward::to_real(ctx, pkt, real, r, now),
        None => {
            count(stat::DROP_NO_REAL);
            xdp_action::XDP_DROP
        }
    }
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
