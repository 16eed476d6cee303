//! Where a new connection chooses its real server.
//!
//! The service's real set (`REALSETS[svc.realset]`) lists its reals with their effective weights;
//! `REAL_CONNS` holds their live counts. The least-connection schedulers are one scan of the set
//! that keeps the candidate with the lowest score per weight, compared by cross-multiplication
//! (`xdpvs_common::sched`), so no division happens on the packet path; the round-robin ones walk
//! a per-service cursor over the reals' shares:
//! - `wlc` (default): score = `active*256 + inactive` (embryonic entries count as inactive),
//!   divided by the weight (IPVS's WLC);
//! - `lc`: the same score, every weight counted as 1;
//! - `rr`: every real with weight > 0 takes one turn per cycle;
//! - `wrr`: the cursor walks the sum of the weights, each real owning `weight` consecutive turns
//!   per cycle (the same shares as IPVS's wrr, not its interleaving).
//!
//! Reals with weight 0 are never candidates.
use xdpvs_common::{
    sched::{clamp_counter, overhead, wlc_better},
    sched_kind, RealSet, RealSlot, Service, MAX_REALS_PER_SERVICE, NO_REAL,
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
            // Every real with weight > 0 gets one turn per cycle (weight-0 slots are skipped,
            // not handed to their neighbour).
            let live = live_slots(set);
            if live == 0 {
                return NO_REAL;
            }
            let cursor = match SERVICE_STATE.get_ptr_mut(svc_id) {
                Some(s) => unsafe { atomic::fetch_add(&raw mut (*s).rr_cursor, 1) },
                None => 0,
            };
            weighted_turn(set, cursor % live, true)
        }
        sched_kind::WRR => {
            let total = set.total_weight as u64;
            if total == 0 {
                return NO_REAL;
            }
            let cursor = match SERVICE_STATE.get_ptr_mut(svc_id) {
                Some(s) => unsafe { atomic::fetch_add(&raw mut (*s).rr_cursor, 1) },
                None => 0,
            };
            weighted_turn(set, cursor % total, false)
        }
        sched_kind::LC => scan(set, MODE_LC),
        _ => scan(set, MODE_WLC),
    }
}

/// This CPU's scratch record, reset: no candidate, zero sum.
#[inline(always)]
fn scratch() -> Option<*mut Best> {
    let b = SCRATCH.get_ptr_mut(0)?;
    unsafe {
        write_volatile(&raw mut (*b).load, 0);
        write_volatile(&raw mut (*b).real, NO_REAL);
        write_volatile(&raw mut (*b).weight, 0);
    }
    Some(b)
}

#[inline(always)]
fn scan(set: &RealSet, mode: u32) -> u32 {
    let Some(best) = scratch() else {
        return NO_REAL;
    };
    for_each_candidate(set, |slot| {
        let Some(conns) = REAL_CONNS.get_ptr(slot.real) else {
            return;
        };
        let (active, inactive, embryonic) = unsafe {
            (
                read_volatile(&raw const (*conns).active),
                read_volatile(&raw const (*conns).inactive),
                read_volatile(&raw const (*conns).embryonic),
            )
        };
        // Half-open entries count as inactive, as IPVS counts SYN_RECV.
        let inactive = clamp_counter(inactive).saturating_add(clamp_counter(embryonic));
        let load = overhead(clamp_counter(active), inactive);
        let weight = if mode == MODE_WLC { slot.weight } else { 1 };
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
    });
    unsafe { read_volatile(&raw const (*best).real) }
}

/// Round robin: the real whose share of `0..total` (in slot order) holds `pos`; a share is the
/// slot's weight, or 1 with `unit` (plain rr). Weight-0 slots have no share. The running sum
/// lives in scratch map memory for the same reason as the scan's best.
#[inline(always)]
fn weighted_turn(set: &RealSet, pos: u64, unit: bool) -> u32 {
    let Some(acc) = scratch() else {
        return NO_REAL;
    };
    for_each_candidate(set, |slot| unsafe {
        let below = read_volatile(&raw const (*acc).load);
        let found = read_volatile(&raw const (*acc).weight);
        let above = below + if unit { 1 } else { slot.weight as u64 };
        if found == 0 && pos < above {
            write_volatile(&raw mut (*acc).real, slot.real);
            write_volatile(&raw mut (*acc).weight, 1);
        }
        write_volatile(&raw mut (*acc).load, above);
    });
    unsafe { read_volatile(&raw const (*acc).real) }
}

/// How many slots have a weight above 0 (counted in scratch memory, as above).
#[inline(always)]
fn live_slots(set: &RealSet) -> u64 {
    let Some(acc) = scratch() else {
        return 0;
    };
    for_each_candidate(set, |_| unsafe {
        let c = read_volatile(&raw const (*acc).load);
        write_volatile(&raw mut (*acc).load, c + 1);
    });
    unsafe { read_volatile(&raw const (*acc).load) }
}

/// Calls `f` for each slot of the set with a weight above 0, in order: the one bounded loop all
/// schedulers share (at most `MAX_REALS_PER_SERVICE` steps, as the verifier requires).
#[inline(always)]
fn for_each_candidate(set: &RealSet, mut f: impl FnMut(RealSlot)) {
    let n = set.count;
    for i in 0..MAX_REALS_PER_SERVICE {
        if i as u32 >= n {
            break;
        }
        let slot = set.slots[i];
        if slot.weight != 0 {
            f(slot);
        }
    }
}
