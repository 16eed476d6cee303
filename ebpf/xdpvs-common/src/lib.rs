//! The dataplane's contract: every map key, map value and constant that the XDP program and the
//! control plane both touch, defined once.
//!
//! `#![no_std]` so the XDP crate can use it; with the `user` feature the types implement
//! `aya::Pod` for the control plane. Every struct is `#[repr(C)]` with explicit padding (always
//! zeroed) so both sides agree on the bytes, and every address field holds 16 bytes so IPv6 fits
//! without a layout change. Addresses and ports are kept in network byte order, exactly as they
//! appear in the packet, so the XDP program never swaps bytes on the fast path.
//!
//! The pure decisions that must behave identically in the kernel and in tests (the WLC
//! comparison, the TCP state machine, which states count as active) live here too, so the unit
//! tests exercise the very code the XDP program runs.
#![no_std]

#[cfg(test)]
extern crate std;

pub mod layout;
pub mod sched;
pub mod state;

pub use layout::{Layout, LAYOUT_FINGERPRINT, LAYOUT_VERSION};

/// Largest number of virtual services; service ids index per-service arrays.
pub const MAX_SERVICES: u32 = 4096;
/// Largest number of real servers over all services; real ids index per-real arrays.
pub const MAX_REALS: u32 = 65536;
/// Real servers one service can schedule over (bounded loop in the XDP scheduler).
pub const MAX_REALS_PER_SERVICE: usize = 256;
/// Real sets are double-buffered: the control plane writes the idle copy, then flips the
/// service's `realset` index, so the XDP program never sees a half-written set.
pub const MAX_REALSETS: u32 = MAX_SERVICES * 2;
/// Entries in one block of the lookup-table pool (`TABLES`): hashing schedulers' tables are
/// runs of whole blocks, so a table of `n` entries takes `ceil(n / 256)` blocks.
pub const TABLE_BLOCK: usize = 256;
/// Default capacity of the lookup-table pool in blocks (8 MiB): 63 services with `mh` tables
/// of the default 65,537 entries (both buffers), or 1,024 with 4,093-entry tables.
pub const DEFAULT_TABLE_POOL_BLOCKS: u32 = 32_768;
/// Entries of an `sh` table: IPVS's `IP_VS_SH_TAB_SIZE` (`CONFIG_IP_VS_SH_TAB_BITS` = 8).
pub const SH_TABLE_SIZE: u32 = 256;
/// Default size of the connection table (the control plane may resize it at load time).
pub const DEFAULT_CONN_TABLE_SIZE: u32 = 262_144;
/// Default size of the embryonic table (half-open TCP, UDP seen once); resizable at load time.
pub const DEFAULT_EMBRYONIC_TABLE_SIZE: u32 = 131_072;
/// Capacity of the persistence-template table (an LRU: the least recently used template goes
/// first when it is full, as a client that has not come back for longest can best lose it).
pub const PERSIST_TABLE_SIZE: u32 = 65_536;
/// "No real" marker in real-id fields.
pub const NO_REAL: u32 = u32::MAX;

/// Address family codes used in keys (ours, not the kernel's AF_* numbers).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Map names, shared so the loader never spells one differently from the program.
pub mod maps {
    pub const SERVICES: &str = "SERVICES";
    pub const REALSETS: &str = "REALSETS";
    pub const REALS: &str = "REALS";
    pub const REAL_CONNS: &str = "REAL_CONNS";
    pub const REAL_STATS: &str = "REAL_STATS";
    pub const SERVICE_STATE: &str = "SERVICE_STATE";
    pub const CONNS: &str = "CONNS";
    pub const EMBRYOS: &str = "EMBRYOS";
    pub const PERSIST: &str = "PERSIST";
    pub const TALLY: &str = "TALLY";
    pub const SETTINGS: &str = "SETTINGS";
    pub const STATS: &str = "STATS";
    /// The lookup-table pool of the hashing schedulers (`sh`, `mh`).
    pub const TABLES: &str = "TABLES";
    pub const LAYOUT: &str = "LAYOUT";
    /// Ring buffer of connection events for the sync peer. Not pinned: each loaded program
    /// gets its own, read by the daemon that loaded it.
    pub const SYNC_EVENTS: &str = "SYNC_EVENTS";

    /// The maps pinned in bpffs, outliving the daemon: everything but per-CPU caches that a
    /// new program may start empty.
    pub const PINNED: [&str; 13] = [
        LAYOUT,
        SERVICES,
        REALSETS,
        REALS,
        REAL_CONNS,
        REAL_STATS,
        SERVICE_STATE,
        CONNS,
        EMBRYOS,
        PERSIST,
        SETTINGS,
        STATS,
        TABLES,
    ];
}

/// Program names in the object.
pub mod progs {
    /// The packet path, attached to the director's interface.
    pub const XDP_MAIN: &str = "xdpvs";
    /// Retires one connection-table entry exactly once; run by the control plane through
    /// BPF_PROG_TEST_RUN so expiry and packet-driven state changes serialise on the entry.
    pub const XDP_EXPIRE: &str = "xdpvs_expire";
    /// Installs (or moves, or retires) one entry as the sync peer reported it; run through
    /// BPF_PROG_TEST_RUN with a [`super::SyncEvent`] as the frame.
    pub const XDP_SYNC_INSTALL: &str = "xdpvs_sync_install";
    /// Expires both connection tables in one call (`bpf_for_each_map_elem`) and reconciles
    /// the embryonic counts; run by the daemon's sweep through BPF_PROG_TEST_RUN.
    pub const XDP_SWEEP: &str = "xdpvs_sweep";
}

/// An IPv4 or IPv6 address in network byte order; IPv4 uses `w[0]` and leaves the rest zero.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct Addr {
    pub w: [u32; 4],
}

/// Key of `SERVICES`: a virtual service as the packet names it.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}

/// Scheduler kinds, per service.
pub mod sched_kind {
    pub const WLC: u8 = 0;
    pub const LC: u8 = 1;
    pub const RR: u8 = 2;
    pub const WRR: u8 = 3;
    pub const SH: u8 = 4;
    pub const MH: u8 = 5;
}

/// Forwarding methods, per service.
pub mod fwd_kind {
    /// Direct routing: rewrite MACs only; the real answers the client itself.
    pub const DR: u8 = 0;
    pub const NAT: u8 = 1;
    /// IPIP: the packet in an outer IPv4 header to the real.
    pub const TUNNEL: u8 = 2;
    /// GUE: the packet in UDP (to the service's `tunnel_port`) and a GUE header, in an outer
    /// IPv4 header to the real.
    pub const GUE: u8 = 3;
}

/// Value of `SERVICES`.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Service {
    /// Index into per-service arrays (`SERVICE_STATE`).
    pub id: u32,
    /// Index into `REALSETS` of the set currently in force.
    pub realset: u32,
    /// Real used for new connections while no real in the set may take one; `NO_REAL` if none.
    pub fallback: u32,
    pub sched: u8,
    pub fwd: u8,
    pub flags: u8,
    pub _pad0: u8,
    /// Persistence (client affinity, IPVS's `-p`): how long a template outlives the last new
    /// connection it placed, in seconds; 0 = off.
    pub persist_timeout_s: u32,
    /// Persistence granularity: the prefix length of the client address a template is keyed
    /// by (32 or 128 = one client; 24 = its /24, as IPVS's `-M 255.255.255.0`).
    pub persist_prefix: u8,
    pub _pad1: u8,
    /// GUE tunnels (`fwd_kind::GUE`): the reals' UDP port, network byte order.
    pub tunnel_port: u16,
}

/// Service flag: removed from the configuration, kept only so its open connections can finish;
/// new connections are not accepted (passed to the kernel as for any non-service address).
pub const SVC_F_DRAINING: u8 = 1;
/// Service flag: its VIP belongs to a VRRP instance that is not master here. Every packet to it
/// is dropped (`DROP_STANDBY`), while its connection entries are kept (a sync peer keeps them
/// current) so that a takeover continues them.
pub const SVC_F_STANDBY: u8 = 2;

/// Service flag (`sh` only): the source port is hashed with the source address (IPVS's
/// `sh-port`), so one client's connections spread over the reals.
pub const SVC_F_SH_PORT: u8 = 4;
/// Service flag (`sh` only): buckets of weight-0 reals were filled by IPVS's `sh-fallback`
/// search when the table was built. The program does not read it; it records how the service's
/// table was made, so a daemon adopting the maps knows whether the config changed it.
pub const SVC_F_SH_FALLBACK: u8 = 8;

/// One entry of a real set: which real, with which effective weight.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct RealSlot {
    pub real: u32,
    /// Effective weight: configured weight unless health or an operator says otherwise; 0 takes
    /// no new connections.
    pub weight: u32,
}

/// Value of `REALSETS`: the reals a service schedules over, in configuration order, with what
/// its scheduler derives from them. Everything here is written before the service points at
/// the set, so a packet sees the set and its table (and its wrr steps) change together.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RealSet {
    pub count: u32,
    /// Sum of the slots' weights, kept by the control plane.
    pub total_weight: u32,
    /// IPVS wrr's `mw` (largest weight minus `di - 1`; 0: no real has a weight) and `di` (gcd
    /// of the weights above 0), see `sched::wrr_params`.
    pub wrr_mw: u32,
    pub wrr_di: u32,
    /// Hashing schedulers: the set's lookup table, `table_size` entries from the start of
    /// block `table_block` of `TABLES`, each the index of a slot of this set. 0 entries: none.
    pub table_block: u32,
    pub table_size: u32,
    pub slots: [RealSlot; MAX_REALS_PER_SERVICE],
}

impl Default for RealSet {
    fn default() -> Self {
        RealSet {
            count: 0,
            total_weight: 0,
            wrr_mw: 0,
            wrr_di: 0,
            table_block: 0,
            table_size: 0,
            slots: [RealSlot::default(); MAX_REALS_PER_SERVICE],
        }
    }
}

/// Value of `TABLES`: one block of a lookup table, each entry a slot index of the real set
/// that owns the table.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TableBlock {
    pub e: [u8; TABLE_BLOCK],
}

impl Default for TableBlock {
    fn default() -> Self {
        TableBlock {
            e: [0; TABLE_BLOCK],
        }
    }
}

/// Real flags.
pub const REAL_F_VALID: u8 = 1;

/// Value of `REALS`, indexed by real id: where to send a connection's packets.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Real {
    pub addr: Addr,
    /// Network byte order; the destination port for NAT.
    pub port: u16,
    pub family: u8,
    /// `REAL_F_VALID` while the real exists; connections to a real without it are cut.
    pub flags: u8,
    /// Id of the service the real belongs to, so a daemon adopting pinned maps can rebuild
    /// which real is whose (also for reals that left every real set and are draining).
    pub service: u32,
}

/// Family value of a `REALS` slot that holds no real (ids are handed out only while it is set).
pub const FAMILY_NONE: u8 = 0;

/// Value of `REAL_CONNS`, indexed by real id: live connection counts, changed with atomic adds
/// by every writer (any CPU's packet path, the expiry program), read by the scheduler.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct RealConns {
    /// Entries of `CONNS` in ESTABLISHED: exact.
    pub active: u64,
    /// Entries of `CONNS` in any other live state: exact.
    pub inactive: u64,
    /// Entries of `EMBRYOS` (half-open TCP, UDP seen once). Exact except that an LRU eviction
    /// (invisible to the program) leaves its +1 behind; the sweep recounts it from the table.
    /// Read as u64 that may transiently wrap (see `sched::clamp_counter`).
    pub embryonic: u64,
}

/// Value of `REAL_STATS` (per-CPU), indexed by real id: monotonic traffic counters.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct RealStats {
    /// Connections scheduled to this real.
    pub conns: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Value of `SERVICE_STATE`, indexed by service id: scheduler state that outlives one packet.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct ServiceState {
    /// rr: the turn counter, advanced atomically. wrr: IPVS's mark, `sched::WrrMark` packed
    /// (current real and current weight), replaced by compare-and-swap.
    pub rr_cursor: u64,
}

/// Key of `CONNS`: a flow as the client sends it.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct ConnKey {
    pub src: Addr,
    pub dst: Addr,
    /// Network byte order.
    pub sport: u16,
    /// Network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// `Conn.flags`: the entry lives in `EMBRYOS` (its count is `RealConns::embryonic`).
pub const CONN_F_EMBRYO: u32 = 1;

/// Key of `PERSIST`: a persistence template's client (its address masked to the service's
/// `persist_prefix`) and service, as IPVS keys its templates.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Debug)]
pub struct PersistKey {
    pub client: Addr,
    /// `Service::id`.
    pub service: u32,
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of `PERSIST`: the real the template sends its client to.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Template {
    pub real: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last new connection it placed; the template is used while
    /// `now - used_ns` is below the service's `persist_timeout_s` (read at each use, so a
    /// reload's new timeout applies to live templates).
    pub used_ns: u64,
}

/// Value of `CONNS` and `EMBRYOS`: one tracked connection.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Conn {
    pub real: u32,
    pub service: u32,
    /// One of `state::*`; changed only by compare-and-swap so that each transition's counter
    /// update happens exactly once however many CPUs see the flow.
    pub state: u32,
    pub flags: u32,
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) at creation.
    pub created_ns: u64,
    /// `bpf_ktime_get_ns` of the last packet.
    pub last_seen_ns: u64,
    /// NAT translation: the real's address and port (`CONN_F_NAT`), or, on a reply entry
    /// (`CONN_F_REPLY`), the VIP and its port.
    pub nat_addr: Addr,
    pub nat_port: u16,
    pub _pad: [u8; 6],
}

/// Conn flag: installed from the sync peer and not forwarded here since. Changes to such an
/// entry (its expiry here, the install itself) are never reported back to the peer, which owns
/// it; the first packet this director forwards on it clears the flag.
pub const CONN_F_SYNCED: u32 = 2;
/// Conn flag: the entry is keyed by the reply tuple of a NAT connection (real -> client) and
/// only maps replies back to their flow: `nat_addr`/`nat_port` hold the VIP and its port, `real`
/// and `service` are the flow's, `state` means nothing. Never counted, never reported; it lives
/// in the same table as its flow's entry and ends with it (see `conntrack`).
pub const CONN_F_REPLY: u32 = 4;
/// Conn flag: a NAT connection's entry (keyed as the client sends): `nat_addr`/`nat_port` hold
/// the real's address and port, and a `CONN_F_REPLY` entry maps the real's replies back.
pub const CONN_F_NAT: u32 = 8;

/// Value of `SETTINGS` (one element): runtime configuration the XDP program reads per packet.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Settings {
    /// Idle timeouts in nanoseconds, by connection state (index = `state::*`).
    pub timeout_ns: [u64; state::COUNT],
    pub flags: u64,
}

impl Default for Settings {
    fn default() -> Self {
        const S: u64 = 1_000_000_000;
        let mut timeout_ns = [0u64; state::COUNT];
        timeout_ns[state::SYN_RECV as usize] = 60 * S;
        timeout_ns[state::ESTABLISHED as usize] = 900 * S;
        timeout_ns[state::FIN_WAIT as usize] = 120 * S;
        timeout_ns[state::CLOSE as usize] = 10 * S;
        timeout_ns[state::UDP as usize] = 300 * S;
        Settings {
            timeout_ns,
            flags: 0,
        }
    }
}

/// Settings flag: report connection events on `SYNC_EVENTS` (a director with a sync peer).
/// Off, the packet path does not even look at the ring buffer.
pub const SETTINGS_F_SYNC: u64 = 1;
/// Settings flag: some service forwards by NAT, so a packet to no service may be a real's reply
/// to translate back. Off, such packets cost no connection-table lookup.
pub const SETTINGS_F_NAT: u64 = 2;

/// Kinds of [`SyncEvent`].
pub mod sync_kind {
    /// A connection the peer should hold: a TCP entry became established (or left the
    /// handshake otherwise), or a UDP flow was created.
    pub const NEW: u8 = 1;
    /// A synced TCP entry changed state (FIN_WAIT, CLOSE).
    pub const STATE: u8 = 2;
    /// A synced entry was retired.
    pub const END: u8 = 3;
}

/// A connection event: emitted by the packet path on `SYNC_EVENTS` (local ids of the sender),
/// and the request passed to `XDP_SYNC_INSTALL` (local ids of the receiver, translated through
/// (service, real address) in between).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SyncEvent {
    pub key: ConnKey,
    pub real: u32,
    pub service: u32,
    /// `state::*` after the event (for END, the state it was retired from).
    pub state: u32,
    /// `sync_kind::*`.
    pub kind: u8,
    pub _pad: [u8; 3],
}

/// Return codes of `XDP_SYNC_INSTALL` (any u32: test-run reports the program's return value).
pub mod install_rc {
    /// A new entry was inserted and counted.
    pub const INSERTED: u32 = 10;
    /// An existing entry of the same real took the state (or already had it); idle clock reset.
    pub const UPDATED: u32 = 11;
    /// The entry was on another real: retired and reinserted on this one.
    pub const REPLACED: u32 = 12;
    /// END: the entry was retired.
    pub const RETIRED: u32 = 13;
    /// END for an entry that is not here (or on another real): nothing to do.
    pub const ABSENT: u32 = 14;
    /// The request is malformed (kind, state, a real that is not valid here).
    pub const INVALID: u32 = 15;
    /// The connection table is full.
    pub const FULL: u32 = 16;
    /// The entry changed under the request (the packet path or expiry won a race); retry.
    pub const RACED: u32 = 17;
}

/// Request passed as the "packet" to `XDP_EXPIRE` through BPF_PROG_TEST_RUN.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct ExpireRequest {
    pub key: ConnKey,
    /// `EXPIRE_F_*`.
    pub flags: u32,
    pub _pad: u32,
}

/// What one run of `XDP_SWEEP` did, written over the request frame (read back as data_out).
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct SweepResult {
    /// Entries of `CONNS` visited, and retired (idle past their timeout, or their real cut).
    pub conns_seen: u64,
    pub conns_retired: u64,
    /// The same for `EMBRYOS`.
    pub embryos_seen: u64,
    pub embryos_retired: u64,
    /// Embryonic counts found leaked (entries the LRU evicted) and released by the recount.
    pub embryos_evicted: u64,
    /// 1 if the whole sweep ran (0: the frame was too short, nothing done).
    pub done: u64,
}

/// Retire the entry even if it is not idle (its real was removed with connections cut).
pub const EXPIRE_F_FORCE: u32 = 1;

/// Return codes of `XDP_EXPIRE` (XDP action numbers, since that is what test-run reports).
pub mod expire_rc {
    /// Entry retired and counters adjusted.
    pub const RETIRED: u32 = 2; // XDP_PASS
    /// Entry missing, still live, or retired by someone else.
    pub const KEPT: u32 = 1; // XDP_DROP
}

/// Indexes of `STATS` (per-CPU u64 counters of what the dataplane did with packets).
pub mod stat {
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed to the kernel.
    pub const PASS_NOT_IP: u32 = 0;
    /// IP but not to a virtual service: passed.
    pub const PASS_NOT_VIP: u32 = 1;
    /// Sent back out of the ingress interface (XDP_TX).
    pub const TX: u32 = 2;
    /// Redirected to another interface.
    pub const REDIRECT: u32 = 3;
    /// Header truncated or inconsistent: never forwarded.
    pub const MALFORMED: u32 = 4;
    /// A new connection found no real with weight > 0 and no fallback.
    pub const DROP_NO_REAL: u32 = 5;
    /// The real's next hop has no resolved MAC yet.
    pub const DROP_NO_NEIGH: u32 = 6;
    /// Route lookup to the real failed.
    pub const DROP_FIB: u32 = 7;
    /// Connection table full: a flow's promotion from the embryonic table failed and its
    /// packet is dropped (the client retries).
    pub const CONNTRACK_FULL: u32 = 8;
    /// New connections scheduled.
    pub const NEW_CONN: u32 = 9;
    /// Mid-flow TCP packet with no connection entry, dropped: an RST (never answered), IP
    /// options or IPv6 (not answered yet), or an entry being retired this very moment. Other
    /// misses are answered (`MISS_RESET`) or recovered (`HASH_RECOVERED`).
    pub const DROP_NO_CONN: u32 = 10;
    /// Packet of a connection whose real was removed: dropped, entry retired.
    pub const DROP_REAL_GONE: u32 = 11;
    /// IPv4 or IPv6 fragment to a virtual service address: dropped (no L4 header to schedule on).
    pub const DROP_FRAGMENT: u32 = 12;
    /// IP frame whose packet extends past the linear part of the XDP buffer (multi-buffer
    /// XDP: jumbo frames, GRO-aggregated frames); counted whatever happens to it next.
    pub const MULTI_BUFFER: u32 = 13;
    /// Frame forwarded although its IP packet is larger than the egress interface's MTU (GRO
    /// aggregates in generic mode are segmented later; a native-mode driver may drop it).
    pub const OVER_MTU: u32 = 14;
    /// Multi-buffer frame whose headers do not all lie in the linear part: passed to the
    /// kernel, which can read them (the XDP program reads and rewrites only linear bytes).
    pub const PASS_SPLIT_HEADERS: u32 = 15;
    /// Packet to a service whose VIP this director does not own right now (a VRRP backup):
    /// dropped, never forwarded, so two directors never both send a flow to the reals.
    pub const DROP_STANDBY: u32 = 16;
    /// A connection event the sync ring buffer had no room for (the daemon reads too slowly,
    /// or no daemon runs): the peer misses it until the next refresh or dump.
    pub const SYNC_EVENTS_LOST: u32 = 17;
    /// IPv6 packet whose header chain the program does not follow (AH, ESP, no next header,
    /// mobility/HIP/shim6/experimental headers, a routing header with segments left, or more
    /// extension headers than it skips):
    /// passed to the kernel untouched. Hop-by-hop, routing and destination options are skipped;
    /// a fragment header is handled like IPv4 fragmentation.
    pub const PASS_IPV6_EXT: u32 = 18;
    /// Half-open TCP entries (client's first ACK) and UDP flows (second packet) moved from
    /// the embryonic table into the connection table.
    pub const EMBRYO_PROMOTED: u32 = 20;
    /// Embryonic entries retired idle (their state's timeout) by the sweep.
    pub const EMBRYO_EXPIRED: u32 = 21;
    /// Embryonic entries the LRU evicted to make room for newer ones (a flood), as found by
    /// the sweep's recount (the eviction itself is invisible to the program).
    pub const EMBRYO_EVICTED: u32 = 22;
    /// A new flow's first packet dropped because the embryonic table refused the entry.
    pub const EMBRYO_REFUSED: u32 = 23;
    /// A real's reply on a NAT connection, its source rewritten back to VIP:port and sent to
    /// the client.
    pub const NAT_REPLY: u32 = 24;
    /// A packet matching a NAT reply entry whose connection is gone (or whose real was cut):
    /// dropped, never passed (the kernel would leak it to the client from the real's address).
    pub const DROP_REPLY_NO_CONN: u32 = 25;
    /// An ICMP destination-unreachable (fragmentation needed among them) whose quoted header
    /// is a tracked flow's packet from its VIP: sent to that flow's real (translated for NAT),
    /// so path-MTU discovery works through the director. Counted on top of `TX`/`REDIRECT`.
    pub const ICMP_TO_REAL: u32 = 26;
    /// Any other ICMP (echo, errors about no tracked flow, quotes too short to read): passed
    /// to the kernel untouched.
    pub const PASS_ICMP: u32 = 27;
    /// A mid-flow TCP segment that missed the connection table, under a hashing scheduler
    /// (`sh`, `mh`): sent to the real the hash picks (the one the flow had while the set is
    /// unchanged) and its entry recreated. Counted on top of `TX`/`REDIRECT`.
    pub const HASH_RECOVERED: u32 = 28;
    /// A mid-flow TCP segment that missed the connection table under a load-based scheduler
    /// (or a hashing one with no real): answered with a RST to the client (XDP_TX), so it
    /// fails at once instead of retransmitting for minutes. Counted on top of `TX`.
    pub const MISS_RESET: u32 = 29;
    /// A new connection sent to its client's real by a persistence template (not scheduled).
    pub const PERSIST_HIT: u32 = 31;
    /// A client's packet too big for a tunnel to its real (outer header + packet above the
    /// path MTU) with DF set: answered with ICMP "fragmentation needed" (the MTU less the
    /// tunnel's overhead), so the client's TCP shrinks its segments.
    pub const TUNNEL_FRAG_NEEDED: u32 = 32;
    /// The same without DF (XDP cannot fragment), or a tagged one: dropped.
    pub const DROP_TUNNEL_MTU: u32 = 33;
    /// An IPv6 packet with extension headers to a GUE tunnel service: dropped (its outer UDP
    /// checksum is computed from the headers that follow the IPv6 header directly).
    pub const DROP_TUNNEL_EXT: u32 = 34;
    /// Slots 19, 30 and 35..40 are reserved (named `unused_N`), so a new counter does not
    /// change the map layout of pinned maps.
    pub const COUNT: u32 = 40;
}

/// Human names for `stat::*`, in index order (labels of `xdpvs_dataplane_packets_total`).
pub const STAT_NAMES: [&str; stat::COUNT as usize] = [
    "pass_not_ip",
    "pass_not_vip",
    "tx",
    "redirect",
    "malformed",
    "drop_no_real",
    "drop_no_neigh",
    "drop_fib",
    "conntrack_full",
    "new_conn",
    "drop_no_conn",
    "drop_real_gone",
    "drop_fragment",
    "multi_buffer",
    "over_mtu",
    "pass_split_headers",
    "drop_standby",
    "sync_events_lost",
    "pass_ipv6_ext",
    "unused_19",
    "embryo_promoted",
    "embryo_expired",
    "embryo_evicted",
    "embryo_refused",
    "nat_reply",
    "drop_reply_no_conn",
    "icmp_to_real",
    "pass_icmp",
    "hash_recovered",
    "miss_reset",
    "unused_30",
    "persist_hit",
    "tunnel_frag_needed",
    "drop_tunnel_mtu",
    "drop_tunnel_ext",
    "unused_35",
    "unused_36",
    "unused_37",
    "unused_38",
    "unused_39",
];

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are #[repr(C)], Copy, made of integers with explicit padding fields, so every
    // bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for Service {}
    unsafe impl aya::Pod for RealSet {}
    unsafe impl aya::Pod for TableBlock {}
    unsafe impl aya::Pod for Real {}
    unsafe impl aya::Pod for RealConns {}
    unsafe impl aya::Pod for RealStats {}
    unsafe impl aya::Pod for ServiceState {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for Conn {}
    unsafe impl aya::Pod for PersistKey {}
    unsafe impl aya::Pod for Template {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Layout {}
    unsafe impl aya::Pod for SyncEvent {}
    unsafe impl aya::Pod for ExpireRequest {}
    unsafe impl aya::Pod for SweepResult {}
}

// Layout guards: a size change here is a change to the dataplane ABI.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<Service>() == 24);
const _: () = assert!(core::mem::size_of::<Real>() == 24);
const _: () = assert!(core::mem::size_of::<ConnKey>() == 40);
const _: () = assert!(core::mem::size_of::<Conn>() == 56);
const _: () = assert!(core::mem::size_of::<ExpireRequest>() == 48);
const _: () = assert!(core::mem::size_of::<Layout>() == 16);
const _: () = assert!(core::mem::size_of::<SyncEvent>() == 56);
const _: () = assert!(core::mem::size_of::<RealConns>() == 24);
const _: () = assert!(core::mem::size_of::<SweepResult>() == 48);
const _: () = assert!(core::mem::size_of::<RealSet>() == 24 + 8 * MAX_REALS_PER_SERVICE);
const _: () = assert!(core::mem::size_of::<TableBlock>() == TABLE_BLOCK);
// Slot indexes are stored in one byte.
const _: () = assert!(MAX_REALS_PER_SERVICE <= 256);
