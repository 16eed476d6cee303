//! The maps, declared once; their types and names come from `xdpvs-common`.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use xdpvs_common::{
    Conn, ConnKey, Layout, PersistKey, Real, RealConns, RealSet, RealStats, Service, ServiceKey,
    ServiceState, Settings, TableBlock, Template, DEFAULT_CONN_TABLE_SIZE,
    DEFAULT_EMBRYONIC_TABLE_SIZE, DEFAULT_TABLE_POOL_BLOCKS, MAX_REALS, MAX_REALSETS, MAX_SERVICES,
    PERSIST_TABLE_SIZE,
};

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

#[map(name = "REALSETS")]
pub static REALSETS: Array<RealSet> = Array::with_max_entries(MAX_REALSETS, 0);

#[map(name = "REALS")]
pub static REALS: Array<Real> = Array::with_max_entries(MAX_REALS, 0);

#[map(name = "REAL_CONNS")]
pub static REAL_CONNS: Array<RealConns> = Array::with_max_entries(MAX_REALS, 0);

#[map(name = "REAL_STATS")]
pub static REAL_STATS: PerCpuArray<RealStats> = PerCpuArray::with_max_entries(MAX_REALS, 0);

#[map(name = "SERVICE_STATE")]
pub static SERVICE_STATE: Array<ServiceState> = Array::with_max_entries(MAX_SERVICES, 0);

#[map(name = "CONNS")]
pub static CONNS: HashMap<ConnKey, Conn> = HashMap::with_max_entries(DEFAULT_CONN_TABLE_SIZE, 0);

/// Half-open TCP connections and UDP flows seen once, apart from `CONNS` so that a flood of
/// them evicts only its own kind (LRU), never an established entry. See `conntrack`.
#[map(name = "EMBRYOS")]
pub static EMBRYOS: LruHashMap<ConnKey, Conn> =
    LruHashMap::with_max_entries(DEFAULT_EMBRYONIC_TABLE_SIZE, 0);

/// Persistence templates (see `persist`).
#[map(name = "PERSIST")]
pub static PERSIST: LruHashMap<PersistKey, Template> =
    LruHashMap::with_max_entries(PERSIST_TABLE_SIZE, 0);

/// The sweep's per-real recount of `EMBRYOS` (scratch of `xdpvs_sweep`; zeroed as it is read).
#[map(name = "TALLY")]
pub static TALLY: Array<u64> = Array::with_max_entries(MAX_REALS, 0);

/// The lookup-table pool of the hashing schedulers: each real set of an `sh` or `mh` service
/// owns a run of blocks (`RealSet::table_block`, `table_size`), written by the control plane
/// before the service points at the set. Sized at load time (`[director] table_pool_size`).
#[map(name = "TABLES")]
pub static TABLES: Array<TableBlock> = Array::with_max_entries(DEFAULT_TABLE_POOL_BLOCKS, 0);

#[map(name = "SETTINGS")]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// The layout the pinned maps were created with; written once by the control plane, read by
/// the next daemon before it adopts them. The program never reads it.
#[map(name = "LAYOUT")]
pub static LAYOUT: Array<Layout> = Array::with_max_entries(1, 0);

#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(xdpvs_common::stat::COUNT, 0);

/// Connection events for the sync peer (`sync::emit`), read by the daemon that loaded this
/// program; not pinned, so a program swapped in on the pinned link starts with an empty one.
/// 1 MiB holds 16384 events (56 bytes plus the kernel's 8-byte header each).
#[map(name = "SYNC_EVENTS")]
pub static SYNC_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Bumps one of the per-CPU `stat::*` counters.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        unsafe { *p += 1 };
    }
}

/// Adds `n` to one of the per-CPU `stat::*` counters.
#[inline(always)]
pub fn count_n(index: u32, n: u64) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        unsafe { *p += n };
    }
}

/// Per-CPU scratch for the scheduler's running best (see `schedule::Best`).
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<crate::schedule::Best> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU cache of each real's next hop (kernel-private: the control plane never reads it).
#[map(name = "NEXTHOP")]
pub static NEXTHOP: PerCpuArray<crate::forward::NextHop> =
    PerCpuArray::with_max_entries(MAX_REALS, 0);

/// Per-CPU scratch for the route lookup of a NAT reply (kernel-private, off the stack).
#[map(name = "FIB_SCRATCH")]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// A NAT reply entry being built (kernel-private): see `conntrack::insert_reply`.
#[repr(C)]
pub struct NatScratch {
    pub key: ConnKey,
    pub conn: Conn,
}

/// A persistence template being looked up or written (kernel-private): see `persist`.
#[map(name = "PERSIST_SCRATCH")]
pub static PERSIST_SCRATCH: PerCpuArray<crate::persist::PersistScratch> =
    PerCpuArray::with_max_entries(1, 0);

/// An ICMP error being built for a packet too big for its tunnel (kernel-private).
#[map(name = "TUNNEL_SCRATCH")]
pub static TUNNEL_SCRATCH: PerCpuArray<crate::tunnel::TooBigScratch> =
    PerCpuArray::with_max_entries(1, 0);

#[map(name = "NAT_SCRATCH")]
pub static NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);
