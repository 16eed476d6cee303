//! Where a new connection chooses its real server.
//!
//! The service's real set (`REALSETS[svc.realset]`) lists its reals with their effective weights;
//! `REAL_CONNS` holds their live counts. The least-connection schedulers are one scan of the set
//! that keeps the candidate with the lowest score per weight, compared by cross-multiplication
//! (`xdpvs_common::sched`), so no division happens on the packet path; the round-robin ones walk
//! a per-service cursor; the hashing ones read the set's lookup table:
//! - `wlc` (default): score = `active*256 + inactive` (embryonic entries count as inactive),
//!   divided by the weight (IPVS's WLC);
//! - `lc`: the same score, every weight counted as 1;
//! - `rr`: every real with weight > 0 takes one turn per cycle;
//! - `wrr`: IPVS's sequence exactly (`ip_vs_wrr.c`: passes with a falling current weight, each
//!   listing the reals that weigh at least that much), its mark kept packed in
//!   `SERVICE_STATE.rr_cursor` and advanced by compare-and-swap (`sched::wrr_next` is the
//!   reference; the walk is at most `2n + 2` steps);
//! - `sh`: IPVS's source hash into the set's 256-bucket table; `mh`: the flow's 5-tuple hash
//!   into the set's Maglev table (`TABLES`, built by the control plane).
//!
//! Reals with weight 0 are never candidates.
use xdpvs_common::{
    sched::{clamp_counter, flow_hash, overhead, sh_hash, wlc_better, wrr_max_steps, WrrMark},
    sched_kind, RealSet, RealSlot, Service, MAX_REALS_PER_SERVICE, NO_REAL, SVC_F_SH_PORT,
    TABLE_BLOCK,
};

use core::ptr::{read_volatile, write_volatile};

use crate::atomic;
use crate::maps::{REALSETS, REAL_CONNS, SCRATCH, SERVICE_STATE, TABLES};
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
pub fn pick(svc: &Service, pkt: &Packet) -> u32 {
    let hash = match svc.sched {
        sched_kind::SH => {
            let port = if svc.flags & SVC_F_SH_PORT != 0 {
                pkt.sport
            } else {
                0
            };
            sh_hash(&pkt.src, port)
        }
        sched_kind::MH => flow_hash(&pkt.src, &pkt.dst, pkt.sport, pkt.dport, pkt.proto),
        _ => 0,
    };
    xdpvs_pick(svc.realset, svc.sched as u32, svc.id, hash)
}

/// The scheduler proper, as a global BPF function: the verifier checks it once, on its own,
/// instead of once for every path that reaches it (parsing variants multiply those paths, and
/// with a 256-step scan that would exceed the verifier's budget). Exported by the linker
/// (`--export`, see build.rs) so it stays global.
#[no_mangle]
#[inline(never)]
pub extern "C" fn xdpvs_pick(realset: u32, sched: u32, svc_id: u32, hash: u32) -> u32 {
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
            nth_live(set, cursor % live)
        }
        sched_kind::WRR => wrr(set, svc_id),
        sched_kind::SH | sched_kind::MH => hashed(set, hash),
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

/// The real of the set's lookup table at `hash` (modulo the table's size): the entry is a slot
/// index of this very set. A slot of weight 0 (an `sh` bucket of a quiesced real without
/// `sh_fallback`) gives no real, as in IPVS.
#[inline(always)]
fn hashed(set: &RealSet, hash: u32) -> u32 {
    let size = set.table_size;
    if size == 0 {
        return NO_REAL;
    }
    let e = hash % size;
    let block = set.table_block.wrapping_add(e / TABLE_BLOCK as u32);
    let Some(b) = TABLES.get(block) else {
        return NO_REAL;
    };
    let idx = b.e[(e as usize) & (TABLE_BLOCK - 1)] as usize;
    if idx as u32 >= set.count || idx >= MAX_REALS_PER_SERVICE {
        return NO_REAL;
    }
    let slot = set.slots[idx];
    if slot.weight == 0 {
        return NO_REAL;
    }
    slot.real
}

/// IPVS's wrr (`sched::wrr_next`, which the tests hold this to): from the service's mark, walk
/// to the next slot whose weight is at least the current weight `cw`, lowering `cw` by `di` at
/// the end of each pass (back to `mw` below 1). The new mark replaces the old one by
/// compare-and-swap; if another CPU moved the mark meanwhile, the walk is redone once from
/// the new mark, and a second loss takes its choice anyway (a packet is never held up: under
/// such contention two connections may get the same turn). The walk state lives in scratch
/// map memory (see `Best`): `load` = cw, `real` = the slot index, `weight` = found.
#[inline(always)]
fn wrr(set: &RealSet, svc_id: u32) -> u32 {
    let mw = set.wrr_mw as u64;
    let di = set.wrr_di as u64;
    let n = set.count;
    if mw == 0 || n == 0 {
        return NO_REAL;
    }
    let Some(st) = SERVICE_STATE.get_ptr_mut(svc_id) else {
        return NO_REAL;
    };
    let Some(acc) = scratch() else {
        return NO_REAL;
    };
    let mut chosen = NO_REAL;
    for _attempt in 0..2 {
        let old = unsafe { read_volatile(&raw const (*st).rr_cursor) };
        let mark = WrrMark::unpack(old);
        let start = if mark.next > n { 0 } else { mark.next };
        let cw = if mark.cw == 0 || mark.cw as u64 > mw {
            mw
        } else {
            mark.cw as u64
        };
        unsafe {
            write_volatile(&raw mut (*acc).real, start);
            write_volatile(&raw mut (*acc).load, cw);
            write_volatile(&raw mut (*acc).weight, 0);
        }
        for _ in 0..wrr_max_steps(MAX_REALS_PER_SERVICE) {
            let i = unsafe { read_volatile(&raw const (*acc).real) };
            let cw = unsafe { read_volatile(&raw const (*acc).load) };
            if i >= n {
                let next = if cw <= di { mw } else { cw - di };
                unsafe {
                    write_volatile(&raw mut (*acc).load, next);
                    write_volatile(&raw mut (*acc).real, 0);
                }
                continue;
            }
            if i as usize >= MAX_REALS_PER_SERVICE {
                break;
            }
            if set.slots[i as usize].weight as u64 >= cw {
                unsafe { write_volatile(&raw mut (*acc).weight, 1) };
                break;
            }
            unsafe { write_volatile(&raw mut (*acc).real, i + 1) };
        }
        let (found, i, cw) = unsafe {
            (
                read_volatile(&raw const (*acc).weight),
                read_volatile(&raw const (*acc).real),
                read_volatile(&raw const (*acc).load),
            )
        };
        if found == 0 || i as usize >= MAX_REALS_PER_SERVICE {
            return NO_REAL;
        }
        chosen = set.slots[i as usize].real;
        let new = WrrMark {
            next: i + 1,
            cw: cw as u32,
        }
        .pack();
        if unsafe { atomic::cas_u64(&raw mut (*st).rr_cursor, old, new) } {
            return chosen;
        }
    }
    chosen
}

/// Round robin: the `pos`-th slot (from 0) with a weight above 0. The running count lives in
/// scratch map memory for the same reason as the scan's best.
#[inline(always)]
fn nth_live(set: &RealSet, pos: u64) -> u32 {
    let Some(acc) = scratch() else {
        return NO_REAL;
    };
    for_each_candidate(set, |slot| unsafe {
        let below = read_volatile(&raw const (*acc).load);
        let found = read_volatile(&raw const (*acc).weight);
        let above = below + 1;
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
