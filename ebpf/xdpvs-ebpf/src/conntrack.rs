//! The connection table: which real each flow belongs to, and the per-real live counts.
//!
//! Counting rule (IPVS's): a connection is counted once, in `REAL_CONNS[real]`, as active while
//! ESTABLISHED and inactive in any other live state. Every change of an entry's state is a
//! compare-and-swap on the entry, and only the CPU whose swap succeeds moves the counts, so
//! counts stay exact when several CPUs (or the expiry sweep) see one flow at once. Entries are
//! deleted only after their state became DEAD and their counts were released.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use xdpvs_common::{
    expire_rc, stat,
    state::{self, is_active, is_live},
    sync_kind, Conn, ConnKey, ExpireRequest, Real, Service, CONN_F_SYNCED, EXPIRE_F_FORCE, NO_REAL,
    PROTO_TCP, REAL_F_VALID,
};

use crate::atomic;
use crate::maps::{count, CONNS, REALS, REAL_CONNS, SETTINGS};
use crate::parse::Packet;

/// Idle timeouts are seconds long: a millisecond of staleness in `last_seen_ns` is irrelevant.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000;

pub enum Lookup {
    /// Tracked flow: send to this real (id and entry, read once for the whole packet).
    Existing(u32, Real),
    /// No entry (or a new connection on a reused tuple): schedule.
    New,
    /// Drop the packet, counting this `stat::*`.
    Drop(u32),
}

/// Adds `delta` (+1/-1) connections in `st` to the real's counts.
#[inline(always)]
pub(crate) fn account(real: u32, st: u32, up: bool) {
    if !is_live(st) {
        return;
    }
    if let Some(c) = REAL_CONNS.get_ptr_mut(real) {
        unsafe {
            let field = if is_active(st) {
                &raw mut (*c).active
            } else {
                &raw mut (*c).inactive
            };
            if up {
                atomic::add(field, 1);
            } else {
                atomic::sub(field, 1);
            }
        }
    }
}

/// Moves an entry from `from` to `to`; the counts move (and the sync peer hears of it) only if
/// this call won the swap.
#[inline(always)]
pub(crate) fn transition(key: &ConnKey, conn: *mut Conn, real: u32, from: u32, to: u32) -> bool {
    if from == to {
        return true;
    }
    if unsafe { atomic::cas_u32(&raw mut (*conn).state, from, to) } {
        if is_active(from) != is_active(to) || !is_live(to) || !is_live(from) {
            account(real, from, false);
            account(real, to, true);
        }
        crate::sync::on_transition(key, conn, real, from, to);
        return true;
    }
    false
}

/// Retires an entry: marks it DEAD (releasing its counts once) and deletes it.
#[inline(always)]
pub(crate) fn retire(key: &ConnKey, conn: *mut Conn) -> bool {
    let (st, real) = unsafe { ((*conn).state, (*conn).real) };
    if !is_live(st) {
        return false;
    }
    if !transition(key, conn, real, st, state::DEAD) {
        return false;
    }
    let _ = CONNS.remove(key);
    true
}

#[inline(always)]
fn real_valid(real: u32) -> bool {
    match REALS.get(real) {
        Some(r) => r.flags & REAL_F_VALID != 0,
        None => false,
    }
}

pub fn lookup(key: &ConnKey, pkt: &Packet, now: u64) -> Lookup {
    let conn = match CONNS.get_ptr_mut(key) {
        Some(c) => c,
        None => return Lookup::New,
    };
    let (st, real) = unsafe { ((*conn).state, (*conn).real) };
    if st == state::DEAD {
        // Being retired by another CPU or the sweep this very moment.
        return Lookup::Drop(stat::DROP_NO_CONN);
    }
    let entry = match REALS.get(real) {
        Some(r) if r.flags & REAL_F_VALID != 0 => *r,
        _ => {
            retire(key, conn);
            return Lookup::Drop(stat::DROP_REAL_GONE);
        }
    };
    // Forwarded here from now on: this director owns the entry and reports its changes.
    unsafe {
        if (*conn).flags & CONN_F_SYNCED != 0 {
            (*conn).flags &= !CONN_F_SYNCED;
        }
    }
    if pkt.proto == PROTO_TCP {
        if pkt.is_syn() && state::syn_reopens(st) {
            // A new connection on a tuple whose old one is closing: schedule it afresh, so
            // current weights apply (IPVS's conn_reuse_mode).
            retire(key, conn);
            return Lookup::New;
        }
        let next = state::tcp_next(st, pkt.tcp_flags);
        // Losing the race means another CPU moved the state; its update stands.
        transition(key, conn, real, st, next);
    }
    // Refreshing the idle clock at most once a millisecond keeps the entry's cache line from
    // being written by every packet (and bounced between CPUs) on a busy flow.
    unsafe {
        if now.wrapping_sub((*conn).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*conn).last_seen_ns = now;
        }
    }
    Lookup::Existing(real, entry)
}

/// Tracks a new connection to `real` and returns the real that owns the flow (another CPU may
/// have tracked the same flow first), or `NO_REAL` if the table is full: an untracked
/// connection's later packets would find no entry and be dropped, so the SYN is dropped now
/// (and retried by the client) rather than opening a connection that cannot continue.
pub fn create(key: &ConnKey, svc: &Service, real: u32, pkt: &Packet, now: u64) -> u32 {
    let st = if pkt.proto == PROTO_TCP {
        state::SYN_RECV
    } else {
        state::UDP
    };
    let conn = Conn {
        real,
        service: svc.id,
        state: st,
        flags: 0,
        created_ns: now,
        last_seen_ns: now,
        ..Conn::default()
    };
    // Count first, so no other CPU can move this entry's counts before they exist.
    account(real, st, true);
    match CONNS.insert(key, &conn, BPF_NOEXIST as u64) {
        Ok(()) => {
            count(stat::NEW_CONN);
            crate::forward::count_new_conn(real);
            if st == state::UDP {
                // A TCP entry is reported once it leaves the handshake (`transition`).
                crate::sync::emit(key, real, svc.id, st, sync_kind::NEW);
            }
            real
        }
        Err(_) => {
            account(real, st, false);
            match CONNS.get_ptr(key) {
                // Another CPU won: follow its choice.
                Some(c) => unsafe { (*c).real },
                None => {
                    count(stat::CONNTRACK_FULL);
                    NO_REAL
                }
            }
        }
    }
}

/// The idle timeout of an entry in `st`.
#[inline(always)]
fn timeout_ns(st: u32) -> u64 {
    match SETTINGS.get(0) {
        Some(s) => {
            let i = st as usize;
            if i < s.timeout_ns.len() {
                s.timeout_ns[i]
            } else {
                0
            }
        }
        None => 0,
    }
}

pub fn expire(req: &ExpireRequest) -> u32 {
    let key = req.key;
    let conn = match CONNS.get_ptr_mut(&key) {
        Some(c) => c,
        None => return expire_rc::KEPT,
    };
    let (st, last, real) = unsafe { ((*conn).state, (*conn).last_seen_ns, (*conn).real) };
    let now = unsafe { bpf_ktime_get_ns() };
    let force = req.flags & EXPIRE_F_FORCE != 0 || !real_valid(real);
    let idle = now.saturating_sub(last);
    if !force && is_live(st) && idle < timeout_ns(st) {
        return expire_rc::KEPT;
    }
    if !is_live(st) {
        // Not counted (DEAD left behind by an interrupted retire): just delete it.
        let _ = CONNS.remove(&key);
        return expire_rc::RETIRED;
    }
    if retire(&key, conn) {
        expire_rc::RETIRED
    } else {
        expire_rc::KEPT
    }
}
