//! Where a new connection chooses its real server.
//!
//! The service's real set (`REALSETS[svc.realset]`) lists its reals with their effective weights;
//! `REAL_CONNS` holds their live counts. Every scheduler is one scan of the set that keeps the
//! candidate with the lowest score per weight, compared by cross-multiplication
//! (`xdpvs_common::sched`), so no division happens on the packet path:
//! - `wlc` (default): score = `active*256 + inactive`, divided by the weight (IPVS's WLC);
//! - `lc`: the same score, every weight counted as 1;
//! - `rr`: score = distance from a per-service cursor, so reals take turns.
//!
//! Reals with weight 0 are never candidates.
use xdpvs_common::{
    sched::{clamp_counter, overhead, wlc_better},
    sched_kind, RealSet, Service, MAX_REALS_PER_SERVICE, NO_REAL,
};

use core::ptr::{read_volatile, write_volatile};

use crate::atomic;
use crate::maps::{REALSETS, REAL_CONNS, SCRATCH, SERVICE_STATE};
use crate::parse::Packet;

/// The best candidate so far, kept in per-CPU map memory rather than registers: the verifier
/// does not track values in map memory, so every path through one iteration reaches the next
/// with the same register state and the 256-step scan verifies in linear, not exponential, work.
#[repr(C)]
pub struct Best {
    pub load: u64,
    pub real: u32,
    pub weight: u32,
}

const MODE_WLC: u32 = 0;
const MODE_LC: u32 = 1;
const MODE_RR: u32 = 2;

#[inline(always)]
pub fn pick(svc: &Service, _pkt: &Packet) -> u32 {
    xdpvs_pick(svc.realset, svc.sched as u32, svc.id)
}

/// The scheduler proper, as a global BPF function: the verifier checks it once, on its own,
/// instead of once for every path that reaches it (parsing variants multiply those paths, and
/// with a 256-step scan that would exceed the verifier's budget). Exported by the linker
/// (`--export`, see build.rs) so it stays global.
#[no_mangle]
#[inline(never)]
pub extern "C" fn xdpvs_pick(realset: u32, sched: u32, svc_id: u32) -> u32 {
    let set = match REALSETS.get(realset) {
        Some(s) => s,
        None => return NO_REAL,
    };
    match sched as u8 {
        sched_kind::RR => {
            let n = set.count as u64;
            if n == 0 {
                return NO_REAL;
            }
            let cursor = match SERVICE_STATE.get_ptr_mut(svc_id) {
                Some(s) => unsafe { atomic::fetch_add(&raw mut (*s).rr_cursor, 1) },
                None => 0,
            };
            scan(set, MODE_RR, (cursor % n) as u32)
        }
        sched_kind::LC => scan(set, MODE_LC, 0),
        _ => scan(set, MODE_WLC, 0),
    }
}

#[inline(always)]
fn scan(set: &RealSet, mode: u32, start: u32) -> u32 {
    let best = match SCRATCH.get_ptr_mut(0) {
        Some(b) => b,
        None => return NO_REAL,
    };
    unsafe {
        write_volatile(&raw mut (*best).load, 0);
        write_volatile(&raw mut (*best).real, NO_REAL);
        write_volatile(&raw mut (*best).weight, 0);
    }
    let n = set.count;
    for i in 0..MAX_REALS_PER_SERVICE {
        if i as u32 >= n {
            break;
        }
        let slot = set.slots[i];
        if slot.weight == 0 {
            continue;
        }
        let (load, weight) = if mode == MODE_RR {
            // Turns start at the cursor and wrap around. Branch-free: a comparison against
            // `start` would split the verifier's state on every step.
            let d = (i as u32 + n - start) % n;
            (d as u64, 1)
        } else {
            let conns = match REAL_CONNS.get_ptr(slot.real) {
                Some(c) => c,
                None => continue,
            };
            let (active, inactive) = unsafe {
                (
                    read_volatile(&raw const (*conns).active),
                    read_volatile(&raw const (*conns).inactive),
                )
            };
            let load = overhead(clamp_counter(active), clamp_counter(inactive));
            (load, if mode == MODE_WLC { slot.weight } else { 1 })
        };
        // Volatile: the compiler must not keep the running best in registers (see `Best`).
        unsafe {
            let best_load = read_volatile(&raw const (*best).load);
            let best_weight = read_volatile(&raw const (*best).weight);
            // weight 0 marks "no candidate yet": a weight-0 real is never one.
            if best_weight == 0 || wlc_better(load, weight, best_load, best_weight) {
                write_volatile(&raw mut (*best).real, slot.real);
                write_volatile(&raw mut (*best).load, load);
                write_volatile(&raw mut (*best).weight, weight);
            }
        }
    }
    unsafe { read_volatile(&raw const (*best).real) }
}
