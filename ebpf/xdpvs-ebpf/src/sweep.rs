//! The expiry sweep, in the kernel: one BPF_PROG_TEST_RUN walks both connection tables with
//! `bpf_for_each_map_elem`, retiring idle entries through the same compare-and-swap path as
//! the packet path ([`conntrack::expire_entry`]), then recounts the embryonic entries per real
//! (`bpf_loop` over the reals) so that counts an LRU eviction left behind are released.
use core::ffi::c_void;
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_for_each_map_elem, generated::bpf_loop};
use xdpvs_common::{stat, state::is_live, Conn, ConnKey, SweepResult, CONN_F_REPLY, MAX_REALS};

use crate::atomic;
use crate::conntrack;
use crate::maps::{count_n, CONNS, EMBRYOS, REAL_CONNS, TALLY};

#[repr(C)]
struct Ctx {
    now: u64,
    res: SweepResult,
}

#[inline(never)]
extern "C" fn visit_conn(
    _map: *mut c_void,
    key: *mut ConnKey,
    value: *mut Conn,
    ctx: *mut Ctx,
) -> i64 {
    let k = unsafe { *key };
    unsafe {
        (*ctx).res.conns_seen += 1;
        if conntrack::expire_entry(&k, value, false, (*ctx).now) {
            (*ctx).res.conns_retired += 1;
        }
    }
    0
}

#[inline(never)]
extern "C" fn visit_embryo(
    _map: *mut c_void,
    key: *mut ConnKey,
    value: *mut Conn,
    ctx: *mut Ctx,
) -> i64 {
    let k = unsafe { *key };
    unsafe {
        (*ctx).res.embryos_seen += 1;
        if conntrack::expire_entry(&k, value, false, (*ctx).now) {
            (*ctx).res.embryos_retired += 1;
        } else if is_live((*value).state) && (*value).flags & CONN_F_REPLY == 0 {
            if let Some(t) = TALLY.get_ptr_mut((*value).real) {
                *t += 1;
            }
        }
    }
    0
}

/// Sets real `i`'s embryonic count to the recount, by an atomic add of the difference so that
/// packets counting meanwhile are kept; zeroes the tally for the next sweep.
#[inline(never)]
extern "C" fn reconcile(i: u64, ctx: *mut Ctx) -> i64 {
    let i = i as u32;
    let Some(t) = TALLY.get_ptr_mut(i) else {
        return 1;
    };
    let Some(c) = REAL_CONNS.get_ptr_mut(i) else {
        return 1;
    };
    unsafe {
        let tally = read_volatile(t);
        write_volatile(t, 0);
        let field = &raw mut (*c).embryonic;
        let counted = read_volatile(field);
        let leaked = counted.wrapping_sub(tally);
        if leaked != 0 {
            atomic::sub(field, leaked);
            if (leaked as i64) > 0 {
                (*ctx).res.embryos_evicted += leaked;
            }
        }
    }
    0
}

pub fn sweep(out: *mut SweepResult) {
    let mut ctx = Ctx {
        now: unsafe { bpf_ktime_get_ns() },
        res: SweepResult::default(),
    };
    let p = &mut ctx as *mut Ctx as *mut c_void;
    unsafe {
        bpf_for_each_map_elem(
            &CONNS as *const _ as *mut c_void,
            visit_conn as *mut c_void,
            p,
            0,
        );
        bpf_for_each_map_elem(
            &EMBRYOS as *const _ as *mut c_void,
            visit_embryo as *mut c_void,
            p,
            0,
        );
        bpf_loop(MAX_REALS, reconcile as *mut c_void, p, 0);
    }
    count_n(stat::EMBRYO_EXPIRED, ctx.res.embryos_retired);
    count_n(stat::EMBRYO_EVICTED, ctx.res.embryos_evicted);
    ctx.res.done = 1;
    unsafe { *out = ctx.res };
}
