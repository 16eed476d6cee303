//! Connection-state sync, kernel side: what the packet path reports to the peer, and how an
//! entry the peer reported is installed here.
//!
//! Reports go to the `SYNC_EVENTS` ring buffer, only while `SETTINGS_F_SYNC` is set (so a
//! director without a peer pays one flag test per state change, nothing per packet). Reported:
//! a flow entering the connection table from the embryonic one (NEW: a TCP connection's first
//! ACK, a UDP flow's second packet; the peer only needs flows that can continue), its later
//! state changes (STATE), and its retirement (END). Embryos are never reported. Entries installed from the peer carry `CONN_F_SYNCED` and are never
//! reported back, so their expiry here cannot end the peer's live connection, and events never
//! echo between the two directors.
//!
//! [`install`] is the receiving end, run by the control plane through BPF_PROG_TEST_RUN like
//! the expiry program: the same compare-and-swap on the entry as the packet path, so the counts
//! in `REAL_CONNS` stay exact whatever the interleaving.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use xdpvs_common::{
    fwd_kind, install_rc, stat,
    state::{self, is_live},
    sync_kind, Conn, ConnKey, Real, ServiceKey, SyncEvent, CONN_F_EMBRYO, CONN_F_NAT,
    CONN_F_SYNCED, REAL_F_VALID, SETTINGS_F_SYNC,
};

use crate::conntrack::{account, insert_reply, retire, transition};
use crate::maps::{count, CONNS, REALS, SERVICES, SETTINGS, SYNC_EVENTS};

#[inline(always)]
fn enabled() -> bool {
    match SETTINGS.get(0) {
        Some(s) => s.flags & SETTINGS_F_SYNC != 0,
        None => false,
    }
}

/// Reports one event; a full ring buffer loses it (counted).
#[inline(always)]
pub fn emit(key: &ConnKey, real: u32, service: u32, st: u32, kind: u8) {
    if !enabled() {
        return;
    }
    let ev = SyncEvent {
        key: *key,
        real,
        service,
        state: st,
        kind,
        _pad: [0; 3],
    };
    if SYNC_EVENTS.output::<SyncEvent>(&ev, 0).is_err() {
        count(stat::SYNC_EVENTS_LOST);
    }
}

/// Reports the state change `conntrack::transition` has just won (`to` = DEAD: retired).
#[inline(always)]
pub fn on_transition(key: &ConnKey, conn: *const Conn, real: u32, from: u32, to: u32) {
    let (flags, service) = unsafe { ((*conn).flags, (*conn).service) };
    if flags & (CONN_F_SYNCED | CONN_F_EMBRYO) != 0 {
        // Installed from the peer, or an embryo (reported when promoted, see
        // `conntrack::promote`): nothing to report.
        return;
    }
    let (kind, st) = if to == state::DEAD {
        (sync_kind::END, from)
    } else {
        (sync_kind::STATE, to)
    };
    emit(key, real, service, st, kind);
}

/// Inserts a new entry for `req`, counted first as `conntrack::create` does. A flow of a NAT
/// service gets its translation (from the real, as here) and its reply entry.
#[inline(always)]
fn insert(req: &SyncEvent, real: &Real, now: u64, ok: u32) -> u32 {
    let skey = ServiceKey {
        addr: req.key.dst,
        port: req.key.dport,
        proto: req.key.proto,
        family: req.key.family,
    };
    let nat = match unsafe { SERVICES.get(&skey) } {
        Some(s) => s.fwd == fwd_kind::NAT,
        None => false,
    };
    let mut conn = Conn {
        real: req.real,
        service: req.service,
        state: req.state,
        flags: CONN_F_SYNCED,
        created_ns: now,
        last_seen_ns: now,
        ..Conn::default()
    };
    if nat {
        conn.flags |= CONN_F_NAT;
        conn.nat_addr = real.addr;
        conn.nat_port = real.port;
        if !insert_reply(&req.key, &conn, false) {
            return install_rc::FULL;
        }
    }
    account(req.real, req.state, false, true);
    match CONNS.insert(&req.key, &conn, BPF_NOEXIST as u64) {
        Ok(()) => ok,
        Err(_) => {
            account(req.real, req.state, false, false);
            if CONNS.get_ptr(&req.key).is_some() {
                install_rc::RACED
            } else {
                install_rc::FULL
            }
        }
    }
}

/// Applies one event from the peer (its ids already translated to ours).
pub fn install(req: &SyncEvent) -> u32 {
    let key = req.key;
    let existing = CONNS.get_ptr_mut(&key);
    if req.kind == sync_kind::END {
        let Some(conn) = existing else {
            return install_rc::ABSENT;
        };
        if unsafe { (*conn).real } != req.real {
            return install_rc::ABSENT;
        }
        unsafe { (*conn).flags |= CONN_F_SYNCED };
        return if retire(&key, conn) {
            install_rc::RETIRED
        } else {
            install_rc::ABSENT
        };
    }
    if (req.kind != sync_kind::NEW && req.kind != sync_kind::STATE) || !is_live(req.state) {
        return install_rc::INVALID;
    }
    let target = match REALS.get(req.real) {
        Some(r) if r.flags & REAL_F_VALID != 0 && r.service == req.service => *r,
        _ => return install_rc::INVALID,
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(conn) = existing else {
        return insert(req, &target, now, install_rc::INSERTED);
    };
    let (cur, real) = unsafe { ((*conn).state, (*conn).real) };
    if !is_live(cur) {
        return install_rc::RACED;
    }
    // Marked first, so neither the move below nor a later expiry is reported back.
    unsafe { (*conn).flags |= CONN_F_SYNCED };
    if real == req.real {
        if !transition(&key, conn, real, cur, req.state) {
            return install_rc::RACED;
        }
        unsafe { (*conn).last_seen_ns = now };
        return install_rc::UPDATED;
    }
    if !retire(&key, conn) {
        return install_rc::RACED;
    }
    insert(req, &target, now, install_rc::REPLACED)
}
