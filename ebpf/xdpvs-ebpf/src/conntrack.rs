//! The connection tables: which real each flow belongs to, and the per-real live counts.
//!
//! Two tables, so that a flood cannot shut the front door. A new flow (a TCP SYN, a UDP flow's
//! first packet) starts in `EMBRYOS`, an LRU hash: spoofed SYNs or one-packet UDP flows fill it
//! and evict their own kind, oldest first, never an established connection, and a legitimate
//! SYN always finds room. The flow moves into `CONNS` (a plain hash, never evicted) when the
//! client shows that it is there: its first ACK (in DR the director sees the client's half of
//! the handshake), or the UDP flow's second packet. [`promote`] is the one way into `CONNS`;
//! [`retire`] is the one way an entry of either table ends.
//!
//! Counting rule (IPVS's): a connection of `CONNS` is counted once, in `REAL_CONNS[real]`, as
//! active while ESTABLISHED and inactive in any other live state; an entry of `EMBRYOS` is
//! counted in `embryonic` (which the scheduler and `list` add to inactive, as IPVS counts
//! SYN_RECV). Every change of an entry's state is a compare-and-swap on the entry, and only the
//! CPU whose swap succeeds moves the counts, so counts stay exact when several CPUs (or the
//! sweep) see one flow at once. Entries are deleted only after their state became DEAD and
//! their counts were released. The one inexactness is by design: an LRU eviction is invisible
//! to the program, so an evicted embryo's +1 stays in `embryonic` until the sweep recounts the
//! table ([`xdpvs_sweep`](crate::xdpvs_sweep)); `active` and `inactive` are never touched by it.
//!
//! NAT: a NAT flow (`CONN_F_NAT`) has a second entry in the same table, keyed by the tuple of
//! the real's replies (real -> client) and flagged `CONN_F_REPLY`, which names the flow back
//! (its VIP and port; the client half is the reply's destination). It is made with the flow,
//! moves with it on promotion and is deleted when the flow is retired; it is never counted or
//! reported, and the sweep deletes one whose flow is gone (an embryo the LRU evicted). A reply
//! entry is trusted only if the flow it names is a live NAT flow to that very real and port, so
//! a stale one, or one overwritten by a colliding flow, never misdirects a packet.
use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use xdpvs_common::{
    expire_rc, stat,
    state::{self, is_active, is_live},
    sync_kind, Addr, Conn, ConnKey, ExpireRequest, Real, Service, CONN_F_EMBRYO, CONN_F_NAT,
    CONN_F_REPLY, CONN_F_SYNCED, EXPIRE_F_FORCE, NO_REAL, PROTO_TCP, REAL_F_VALID,
};

use crate::atomic;
use crate::maps::{count, CONNS, EMBRYOS, NAT_SCRATCH, REALS, REAL_CONNS, SETTINGS};
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

#[inline(always)]
pub(crate) fn is_embryo(conn: *const Conn) -> bool {
    unsafe { (*conn).flags & CONN_F_EMBRYO != 0 }
}

/// Adds (`up`) or removes one connection in `st` to the real's counts; an embryo counts in
/// `embryonic` whatever its state.
#[inline(always)]
pub(crate) fn account(real: u32, st: u32, embryo: bool, up: bool) {
    if !is_live(st) {
        return;
    }
    if let Some(c) = REAL_CONNS.get_ptr_mut(real) {
        unsafe {
            let field = if embryo {
                &raw mut (*c).embryonic
            } else if is_active(st) {
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
            let embryo = is_embryo(conn);
            account(real, from, embryo, false);
            account(real, to, embryo, true);
        }
        crate::sync::on_transition(key, conn, real, from, to);
        return true;
    }
    false
}

/// Deletes an entry from the table it lives in.
#[inline(always)]
fn remove(key: &ConnKey, embryo: bool) {
    let _ = if embryo {
        EMBRYOS.remove(key)
    } else {
        CONNS.remove(key)
    };
}

/// Retires an entry of either table: marks it DEAD (releasing its counts once) and deletes it.
#[inline(always)]
pub(crate) fn retire(key: &ConnKey, conn: *mut Conn) -> bool {
    let (st, real) = unsafe { ((*conn).state, (*conn).real) };
    if !is_live(st) {
        return false;
    }
    if !transition(key, conn, real, st, state::DEAD) {
        return false;
    }
    remove(key, is_embryo(conn));
    if unsafe { (*conn).flags } & CONN_F_NAT != 0 {
        remove_reply(key, conn, IN_CONNS | IN_EMBRYOS);
    }
    true
}

/// Tables for [`remove_reply`].
const IN_CONNS: u32 = 1;
const IN_EMBRYOS: u32 = 2;

/// The key of a NAT flow's reply entry: the real's packets back to the client.
#[inline(always)]
pub(crate) fn reply_key(key: &ConnKey, nat_addr: Addr, nat_port: u16) -> ConnKey {
    ConnKey {
        src: nat_addr,
        dst: key.src,
        sport: nat_port,
        dport: key.sport,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// The reply entry of the NAT flow `key` to `nat_addr:nat_port`, as stored.
#[inline(always)]
fn reply_entry(key: &ConnKey, conn: &Conn, embryo: bool) -> Conn {
    Conn {
        real: conn.real,
        service: conn.service,
        state: conn.state,
        flags: CONN_F_REPLY | if embryo { CONN_F_EMBRYO } else { 0 },
        created_ns: conn.created_ns,
        last_seen_ns: conn.last_seen_ns,
        nat_addr: key.dst,
        nat_port: key.dport,
        ..Conn::default()
    }
}

/// The reply entry `r` names the flow `key`.
#[inline(always)]
fn names(r: *const Conn, key: &ConnKey) -> bool {
    unsafe {
        (*r).flags & CONN_F_REPLY != 0 && (*r).nat_addr == key.dst && (*r).nat_port == key.dport
    }
}

/// Deletes the reply entry of the NAT flow `key` from the `tables` (`IN_*`), unless a
/// colliding flow has taken its key since. Not inlined, as [`insert_reply`].
#[inline(never)]
fn remove_reply(key: &ConnKey, conn: *const Conn, tables: u32) {
    let rkey = unsafe { reply_key(key, (*conn).nat_addr, (*conn).nat_port) };
    if tables & IN_CONNS != 0 {
        if let Some(r) = CONNS.get_ptr(&rkey) {
            if names(r, key) {
                let _ = CONNS.remove(&rkey);
            }
        }
    }
    if tables & IN_EMBRYOS != 0 {
        if let Some(r) = EMBRYOS.get_ptr(&rkey) {
            if names(r, key) {
                let _ = EMBRYOS.remove(&rkey);
            }
        }
    }
}

/// Inserts (or overwrites: a stale entry of an evicted flow, or a colliding flow's, which the
/// real could not tell from this one either) the reply entry of the NAT flow `key`, in
/// `EMBRYOS` or `CONNS`. Not inlined: its key and entry stay off the packet path's stack frame,
/// which the verifier bounds (with every frame of the deepest call chain) at 512 bytes.
#[inline(never)]
pub(crate) fn insert_reply(key: &ConnKey, conn: *const Conn, embryo: bool) -> bool {
    // Built in per-CPU map memory: the helpers take map values as keys and values.
    let Some(sc) = NAT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    unsafe {
        (*sc).key = reply_key(key, (*conn).nat_addr, (*conn).nat_port);
        (*sc).conn = reply_entry(key, &*conn, embryo);
        if embryo {
            EMBRYOS.insert(&(*sc).key, &(*sc).conn, 0).is_ok()
        } else {
            CONNS.insert(&(*sc).key, &(*sc).conn, 0).is_ok()
        }
    }
}

#[inline(always)]
fn real_valid(real: u32) -> bool {
    match REALS.get(real) {
        Some(r) => r.flags & REAL_F_VALID != 0,
        None => false,
    }
}

/// Refreshing the idle clock at most once a millisecond keeps the entry's cache line from
/// being written by every packet (and bounced between CPUs) on a busy flow.
#[inline(always)]
fn touch(conn: *mut Conn, now: u64) {
    unsafe {
        if now.wrapping_sub((*conn).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*conn).last_seen_ns = now;
        }
    }
}

pub fn lookup(key: &ConnKey, pkt: &Packet, now: u64) -> Lookup {
    match CONNS.get_ptr_mut(key) {
        Some(conn) => tracked(key, conn, pkt, now),
        None => match EMBRYOS.get_ptr_mut(key) {
            Some(e) => embryo(key, e, pkt, now),
            None => Lookup::New,
        },
    }
}

/// A packet of a flow in `CONNS`.
#[inline(always)]
fn tracked(key: &ConnKey, conn: *mut Conn, pkt: &Packet, now: u64) -> Lookup {
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
    touch(conn, now);
    Lookup::Existing(real, entry)
}

/// A packet of a flow in `EMBRYOS`: a retransmitted SYN or an RST leaves it there; the client's
/// ACK (or FIN) and a UDP flow's second packet promote the flow into `CONNS`.
#[inline(always)]
fn embryo(key: &ConnKey, e: *mut Conn, pkt: &Packet, now: u64) -> Lookup {
    let (st, real) = unsafe { ((*e).state, (*e).real) };
    if st == state::DEAD {
        // Being promoted or retired by another CPU this very moment.
        return Lookup::Drop(stat::DROP_NO_CONN);
    }
    let entry = match REALS.get(real) {
        Some(r) if r.flags & REAL_F_VALID != 0 => *r,
        _ => {
            retire(key, e);
            return Lookup::Drop(stat::DROP_REAL_GONE);
        }
    };
    let mut next = st;
    if pkt.proto == PROTO_TCP {
        if pkt.is_syn() && state::syn_reopens(st) {
            retire(key, e);
            return Lookup::New;
        }
        next = state::tcp_next(st, pkt.tcp_flags);
        if next == st || next == state::CLOSE {
            // A retransmitted SYN, or an RST: the flow stays embryonic (an RST'd one in CLOSE,
            // as IPVS keeps it, until its timeout or the LRU ends it).
            transition(key, e, real, st, next);
            touch(e, now);
            return Lookup::Existing(real, entry);
        }
    }
    match promote(key, e, real, st, next, now) {
        Some(reason) => Lookup::Drop(reason),
        None => Lookup::Existing(real, entry),
    }
}

/// Moves a flow from `EMBRYOS` (in state `from`) to `CONNS` (in state `to`): the one way into
/// the connection table. Returns the drop reason if the flow could not be moved; a flow that
/// found `CONNS` full stays embryonic, so the client's retransmission tries again.
#[inline(always)]
fn promote(key: &ConnKey, e: *mut Conn, real: u32, from: u32, to: u32, now: u64) -> Option<u32> {
    let (service, created_ns, flags, nat_addr, nat_port) = unsafe {
        (
            (*e).service,
            (*e).created_ns,
            (*e).flags,
            (*e).nat_addr,
            (*e).nat_port,
        )
    };
    let conn = Conn {
        real,
        service,
        state: to,
        flags: flags & CONN_F_NAT,
        created_ns,
        last_seen_ns: now,
        nat_addr,
        nat_port,
        ..Conn::default()
    };
    let nat = flags & CONN_F_NAT != 0;
    // A NAT flow's reply entry first, so the flow is never in `CONNS` without it.
    if nat && !insert_reply(key, &conn, false) {
        return Some(stat::CONNTRACK_FULL);
    }
    // Count first, so no other CPU can move this entry's counts before they exist.
    account(real, to, false, true);
    match CONNS.insert(key, &conn, BPF_NOEXIST as u64) {
        Ok(()) => {
            if nat {
                remove_reply(key, &conn, IN_EMBRYOS);
            }
            // The flow is tracked; the embryo ends. Losing this swap means another CPU (or
            // the sweep) moved the embryo meanwhile; whoever did releases its count, and a
            // left-over embryo is shadowed by the entry in `CONNS` until it expires.
            if transition(key, e, real, from, state::DEAD) {
                remove(key, true);
            }
            count(stat::EMBRYO_PROMOTED);
            // The peer hears of a flow once it can continue: here, when it leaves the
            // embryonic table (embryos are never reported).
            crate::sync::emit(key, real, service, to, sync_kind::NEW);
            None
        }
        Err(_) => {
            account(real, to, false, false);
            if CONNS.get_ptr(key).is_some() {
                // Another CPU promoted it at this very moment: its entry (and the reply
                // entry, the same as ours) stands.
                None
            } else {
                // Full of connections that completed their handshakes.
                if nat {
                    remove_reply(key, &conn, IN_CONNS);
                }
                Some(stat::CONNTRACK_FULL)
            }
        }
    }
}

/// Recreates the entry of a TCP flow that missed the table mid-flow, under a hashing
/// scheduler: straight into `CONNS` (the client's segment shows the handshake is long done), in
/// the state the segment leads an established connection to, counted and reported to the sync
/// peer like a promotion. Returns the real that owns the flow (another CPU may have recreated
/// it first), or `NO_REAL` if the table is full (counted `conntrack_full`). (At most five
/// arguments: BPF passes no more in registers.)
#[inline(never)]
pub fn recreate(
    key: &ConnKey,
    svc: &Service,
    real: u32,
    nat: Option<(Addr, u16)>,
    tcp_flags: u8,
) -> u32 {
    let now = unsafe { bpf_ktime_get_ns() };
    let st = state::tcp_next(state::ESTABLISHED, tcp_flags);
    let (flags, (nat_addr, nat_port)) = match nat {
        Some(n) => (CONN_F_NAT, n),
        None => (0, (Addr::default(), 0)),
    };
    let conn = Conn {
        real,
        service: svc.id,
        state: st,
        flags,
        created_ns: now,
        last_seen_ns: now,
        nat_addr,
        nat_port,
        ..Conn::default()
    };
    if nat.is_some() && !insert_reply(key, &conn, false) {
        count(stat::CONNTRACK_FULL);
        return NO_REAL;
    }
    account(real, st, false, true);
    match CONNS.insert(key, &conn, BPF_NOEXIST as u64) {
        Ok(()) => {
            count(stat::HASH_RECOVERED);
            crate::sync::emit(key, real, svc.id, st, sync_kind::NEW);
            real
        }
        Err(_) => {
            account(real, st, false, false);
            match CONNS.get_ptr(key) {
                Some(c) => unsafe { (*c).real },
                None => {
                    if nat.is_some() {
                        remove_reply(key, &conn, IN_CONNS);
                    }
                    count(stat::CONNTRACK_FULL);
                    NO_REAL
                }
            }
        }
    }
}

/// Tracks a new flow to `real` in `EMBRYOS` and returns the real that owns the flow (another
/// CPU may have tracked the same flow first), or `NO_REAL` if the table refused the entry (an
/// untracked flow's later packets would find no entry and be dropped, so the first packet is
/// dropped now and retried by the client).
/// `nat`: `(address, port)` of the real for a NAT service (the flow also gets its reply entry).
pub fn create(
    key: &ConnKey,
    svc: &Service,
    real: u32,
    nat: Option<(Addr, u16)>,
    pkt: &Packet,
    now: u64,
) -> u32 {
    let st = if pkt.proto == PROTO_TCP {
        state::SYN_RECV
    } else {
        state::UDP
    };
    let (flags, (nat_addr, nat_port)) = match nat {
        Some(n) => (CONN_F_EMBRYO | CONN_F_NAT, n),
        None => (CONN_F_EMBRYO, (Addr::default(), 0)),
    };
    let conn = Conn {
        real,
        service: svc.id,
        state: st,
        flags,
        created_ns: now,
        last_seen_ns: now,
        nat_addr,
        nat_port,
        ..Conn::default()
    };
    account(real, st, true, true);
    match EMBRYOS.insert(key, &conn, BPF_NOEXIST as u64) {
        Ok(()) => {
            if nat.is_some() {
                insert_reply(key, &conn, true);
            }
            count(stat::NEW_CONN);
            crate::forward::count_new_conn(real);
            real
        }
        Err(_) => {
            account(real, st, true, false);
            match EMBRYOS.get_ptr(key) {
                // Another CPU won: follow its choice.
                Some(c) => unsafe { (*c).real },
                None => {
                    count(stat::EMBRYO_REFUSED);
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

/// Retires `conn` (of either table) if it is idle past its state's timeout, its real is gone,
/// or `force`; returns whether this call retired it.
#[inline(always)]
pub fn expire_entry(key: &ConnKey, conn: *mut Conn, force: bool, now: u64) -> bool {
    if unsafe { (*conn).flags } & CONN_F_REPLY != 0 {
        expire_reply(key, conn);
        return false;
    }
    let (st, last, real) = unsafe { ((*conn).state, (*conn).last_seen_ns, (*conn).real) };
    let force = force || !real_valid(real);
    let idle = now.saturating_sub(last);
    if !force && is_live(st) && idle < timeout_ns(st) {
        return false;
    }
    if !is_live(st) {
        // Not counted (DEAD left behind by an interrupted retire): just delete it.
        remove(key, is_embryo(conn));
        return true;
    }
    retire(key, conn)
}

/// The NAT flow a reply entry names: its key, and its entry if it is a live NAT flow whose
/// translation is the reply's source.
#[inline(always)]
pub(crate) fn flow_of(rkey: &ConnKey, r: *const Conn) -> (ConnKey, Option<*mut Conn>) {
    let key = unsafe {
        ConnKey {
            src: rkey.dst,
            dst: (*r).nat_addr,
            sport: rkey.dport,
            dport: (*r).nat_port,
            proto: rkey.proto,
            family: rkey.family,
            _pad: [0; 2],
        }
    };
    let conn = match CONNS.get_ptr_mut(&key) {
        Some(c) => Some(c),
        None => EMBRYOS.get_ptr_mut(&key),
    };
    let conn = conn.filter(|&c| unsafe {
        (*c).flags & CONN_F_NAT != 0
            && is_live((*c).state)
            && (*c).nat_addr == rkey.src
            && (*c).nat_port == rkey.sport
    });
    (key, conn)
}

/// Deletes a reply entry whose flow is gone (an LRU-evicted embryo's); the flow's own retire
/// deletes the others.
#[inline(never)]
fn expire_reply(rkey: &ConnKey, r: *mut Conn) {
    if flow_of(rkey, r).1.is_none() {
        remove(rkey, is_embryo(r));
    }
}

pub enum Reply {
    /// Not a reply of a tracked NAT flow.
    None,
    /// A reply of a flow to this VIP and port (network order), its state moved by the reply.
    Flow(Addr, u16),
    Drop(u32),
}

/// A packet to no service: the real's reply on a NAT flow if a reply entry matches it.
#[inline(always)]
pub fn reply(rkey: &ConnKey, pkt: &Packet, now: u64) -> Reply {
    let r = match CONNS.get_ptr(rkey) {
        Some(r) => r,
        None => match EMBRYOS.get_ptr(rkey) {
            Some(r) => r,
            None => return Reply::None,
        },
    };
    if unsafe { (*r).flags } & CONN_F_REPLY == 0 {
        // A flow whose client sends from this address and port: not a reply.
        return Reply::None;
    }
    let (key, conn) = flow_of(rkey, r);
    let Some(conn) = conn else {
        return Reply::Drop(stat::DROP_REPLY_NO_CONN);
    };
    let (st, real) = unsafe { ((*conn).state, (*conn).real) };
    if !real_valid(real) {
        retire(&key, conn);
        return Reply::Drop(stat::DROP_REAL_GONE);
    }
    if pkt.proto == PROTO_TCP {
        transition(
            &key,
            conn,
            real,
            st,
            state::tcp_next_reply(st, pkt.tcp_flags),
        );
    }
    touch(conn, now);
    Reply::Flow(key.dst, key.dport)
}

/// `XDP_EXPIRE`: one entry, looked up in the connection table, then the embryonic one.
pub fn expire(req: &ExpireRequest) -> u32 {
    let key = req.key;
    let conn = match CONNS.get_ptr_mut(&key) {
        Some(c) => c,
        None => match EMBRYOS.get_ptr_mut(&key) {
            Some(c) => c,
            None => return expire_rc::KEPT,
        },
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if expire_entry(&key, conn, req.flags & EXPIRE_F_FORCE != 0, now) {
        expire_rc::RETIRED
    } else {
        expire_rc::KEPT
    }
}
