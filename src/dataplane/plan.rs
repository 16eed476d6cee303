//! What a reload (or a health change) does to the maps: the diff from the last applied state
//! to a new [`Desired`] snapshot, as an ordered list of map writes.
//!
//! Pure and deterministic, so it is tested without a kernel. Three rules keep live traffic
//! safe while the maps change underneath it:
//! - ids are stable: a service or real that stays keeps its id, so its connections, counters and
//!   scheduler state carry on;
//! - a service's real set is written to the idle one of its two buffers before the service entry
//!   is pointed at it, so the XDP program never reads a half-written set;
//! - a real's id is freed only once no connection counts against it, so a tracked flow can never
//!   be delivered to a different real that reused the id.
//!
//! The hashing schedulers' lookup tables follow the real sets: a service using `sh` or `mh`
//! owns a region of the `TABLES` pool holding two tables, one per real-set buffer; the table
//! for a new set is written into the idle buffer's half before the set (which names it) and
//! the service flip, so a packet reads a set and its table as one. Tables hold slot indexes
//! computed only from the config's addresses and weights, so every director with the same
//! config holds the same bytes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;

use xdpvs_common::{
    sched, sched_kind, Real, RealSet, RealSlot, Service, ServiceKey, Settings, MAX_REALS,
    MAX_REALS_PER_SERVICE, MAX_SERVICES, NO_REAL, REAL_F_VALID, SVC_F_DRAINING, SVC_F_SH_FALLBACK,
    SVC_F_SH_PORT, SVC_F_STANDBY, TABLE_BLOCK,
};

use crate::config::Timeouts;
use crate::state::{addr, Desired};

/// One write to the dataplane's maps, in the order it must happen.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Zero `REAL_CONNS[id]` and `REAL_STATS[id]` before the id's first use.
    ResetReal(u32),
    Real(u32, Real),
    RealSet(u32, Box<RealSet>),
    /// A lookup table (slot indexes), written into `TABLES` from block `.0` on.
    Table(u32, Vec<u8>),
    Service(ServiceKey, Service),
    /// wrr: IPVS's `dest_changed` on the service's mark (`sched::wrr_changed` with the new
    /// set's `di` and `mw`), after the service points at the new set.
    WrrChanged {
        service: u32,
        di: u32,
        mw: u32,
    },
    /// A new service id's scheduler state starts from zero (IPVS's initial wrr mark).
    ResetServiceState(u32),
    DeleteService(ServiceKey),
    Settings(Settings),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("too many services (the dataplane holds {MAX_SERVICES})")]
    TooManyServices,
    #[error("too many real servers (the dataplane holds {MAX_REALS} over all services)")]
    TooManyReals,
    #[error(
        "the lookup-table pool is full: service {service} needs {need} blocks of {TABLE_BLOCK} \
         entries and the largest free run is {free} of {pool} (raise [director] table_pool_size; \
         a pinned pool keeps its size until a `--fresh` start)"
    )]
    TablePoolFull {
        service: String,
        need: u32,
        free: u32,
        pool: u32,
    },
    #[error("service {0}: {1}")]
    Table(String, String),
}

/// A service's region of the table pool: two tables of `blocks` blocks each, from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Region {
    start: u32,
    blocks: u32,
}

/// Blocks a table of `size` entries takes.
fn blocks_for(size: u32) -> u32 {
    size.div_ceil(TABLE_BLOCK as u32)
}

/// Identifies a real's dataplane id: (service key, real address).
type RealKey = (ServiceKey, SocketAddr);

#[derive(Debug, Clone)]
struct SvcEntry {
    id: u32,
    /// Which of the service's two real-set buffers is live.
    buffer: u32,
    service: Service,
    set: RealSet,
    cut_on_remove: bool,
    /// Removed from the config; kept until its reals' connections end.
    draining: bool,
    /// Its part of the table pool (hashing schedulers only).
    region: Option<Region>,
}

#[derive(Debug, Clone)]
struct RealEntry {
    id: u32,
    real: Real,
    /// In a live real set or a fallback: it may get new connections.
    in_use: bool,
}

/// The applied state of the maps, and the id allocators.
#[derive(Debug, Default)]
pub struct Planner {
    services: HashMap<ServiceKey, SvcEntry>,
    reals: HashMap<RealKey, RealEntry>,
    free_service_ids: VecDeque<u32>,
    next_service_id: u32,
    /// Freed ids are reused oldest first, which delays reuse as long as possible.
    free_real_ids: VecDeque<u32>,
    next_real_id: u32,
    settings: Option<Settings>,
    /// Capacity of `TABLES` in blocks; 0 means the default.
    table_pool: u32,
}

/// A real kept after leaving every real set, until its connections end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draining {
    pub id: u32,
    pub address: SocketAddr,
    pub service: ServiceKey,
    /// Its connections are being cut (else they are left to finish).
    pub cut: bool,
}

impl Planner {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the capacity of the table pool the maps were created with (in blocks).
    pub fn set_table_pool(&mut self, blocks: u32) {
        self.table_pool = blocks;
    }

    fn pool_blocks(&self) -> u32 {
        if self.table_pool == 0 {
            xdpvs_common::DEFAULT_TABLE_POOL_BLOCKS
        } else {
            self.table_pool
        }
    }

    /// First fit of `2 * blocks` in the pool, around the regions services hold.
    fn alloc_region(&self, name: &str, blocks: u32) -> Result<Region, PlanError> {
        let need = 2 * blocks;
        let mut held: Vec<Region> = self.services.values().filter_map(|e| e.region).collect();
        held.sort_by_key(|r| r.start);
        let mut at = 0u32;
        let mut largest = 0u32;
        let pool = self.pool_blocks();
        for r in held.iter().chain(std::iter::once(&Region {
            start: pool,
            blocks: 0,
        })) {
            let gap = r.start.saturating_sub(at);
            if gap >= need {
                return Ok(Region { start: at, blocks });
            }
            largest = largest.max(gap);
            at = at.max(r.start + 2 * r.blocks);
        }
        Err(PlanError::TablePoolFull {
            service: name.to_string(),
            need,
            free: largest,
            pool,
        })
    }

    /// Every table block a service holds, by service name order: for tests and for comparing
    /// directors. (start, blocks per table) by service key.
    pub fn table_regions(&self) -> Vec<(ServiceKey, u32, u32)> {
        let mut v: Vec<_> = self
            .services
            .iter()
            .filter_map(|(k, e)| e.region.map(|r| (*k, r.start, r.blocks)))
            .collect();
        v.sort_by_key(|x| x.1);
        v
    }

    /// The dataplane id of a real of a service, if it holds one.
    pub fn real_id(&self, service: &ServiceKey, real: SocketAddr) -> Option<u32> {
        self.reals.get(&(*service, real)).map(|r| r.id)
    }

    /// Every (service, real) that holds an id, with its id.
    pub fn real_ids(&self) -> HashMap<(ServiceKey, SocketAddr), u32> {
        self.reals.iter().map(|(k, r)| (*k, r.id)).collect()
    }

    /// The weight every real has in its service's live set (reals out of the set are absent):
    /// what the dataplane schedules with now.
    pub fn live_weights(&self) -> HashMap<(ServiceKey, SocketAddr), u32> {
        let by_id: HashMap<u32, RealKey> = self.reals.iter().map(|(k, r)| (r.id, *k)).collect();
        let mut out = HashMap::new();
        for e in self.services.values() {
            for slot in &e.set.slots[..(e.set.count as usize).min(MAX_REALS_PER_SERVICE)] {
                if let Some(k) = by_id.get(&slot.real) {
                    out.insert(*k, slot.weight);
                }
            }
        }
        out
    }

    /// Every service that holds an id, with its id.
    pub fn service_ids(&self) -> HashMap<ServiceKey, u32> {
        self.services.iter().map(|(k, e)| (*k, e.id)).collect()
    }

    /// The dataplane id of a service (live or draining), if it holds one.
    pub fn service_id(&self, service: &ServiceKey) -> Option<u32> {
        self.services.get(service).map(|e| e.id)
    }

    /// A real's weight in its service's live set; `None` if it is not in the set.
    pub fn live_weight(&self, service: &ServiceKey, real: SocketAddr) -> Option<u32> {
        let id = self.real_id(service, real)?;
        let e = self.services.get(service)?;
        e.set.slots[..(e.set.count as usize).min(MAX_REALS_PER_SERVICE)]
            .iter()
            .find(|s| s.real == id)
            .map(|s| s.weight)
    }

    /// Every real id held (in use or draining).
    pub fn ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.reals.values().map(|r| r.id).collect();
        v.sort_unstable();
        v
    }

    /// Reals that hold an id but take no new connections.
    pub fn draining(&self) -> Vec<Draining> {
        let mut v: Vec<Draining> = self
            .reals
            .iter()
            .filter(|(_, r)| !r.in_use)
            .map(|((svc, address), r)| Draining {
                id: r.id,
                address: *address,
                service: *svc,
                cut: r.real.flags & REAL_F_VALID == 0,
            })
            .collect();
        v.sort_by_key(|d| d.id);
        v
    }

    fn alloc_real(&mut self) -> Result<u32, PlanError> {
        if let Some(id) = self.free_real_ids.pop_front() {
            return Ok(id);
        }
        if self.next_real_id >= MAX_REALS {
            return Err(PlanError::TooManyReals);
        }
        self.next_real_id += 1;
        Ok(self.next_real_id - 1)
    }

    fn alloc_service(&mut self) -> Result<u32, PlanError> {
        if let Some(id) = self.free_service_ids.pop_front() {
            return Ok(id);
        }
        if self.next_service_id >= MAX_SERVICES {
            return Err(PlanError::TooManyServices);
        }
        self.next_service_id += 1;
        Ok(self.next_service_id - 1)
    }

    /// Takes (or re-validates) a real's id and marks it in use.
    fn use_real(
        &mut self,
        key: RealKey,
        service: u32,
        writes: &mut Vec<Write>,
    ) -> Result<u32, PlanError> {
        let (a, family) = addr(key.1.ip());
        let real = Real {
            addr: a,
            port: key.1.port().to_be(),
            family,
            flags: REAL_F_VALID,
            service,
        };
        if let Some(e) = self.reals.get_mut(&key) {
            e.in_use = true;
            if e.real != real {
                e.real = real;
                writes.push(Write::Real(e.id, real));
            }
            return Ok(e.id);
        }
        let id = self.alloc_real()?;
        writes.push(Write::ResetReal(id));
        writes.push(Write::Real(id, real));
        self.reals.insert(
            key,
            RealEntry {
                id,
                real,
                in_use: true,
            },
        );
        Ok(id)
    }

    /// Takes a real out of use and invalidates it, so its connections are cut. A real without
    /// an id has no connections: nothing to do.
    fn cut_real(&mut self, key: RealKey, writes: &mut Vec<Write>) {
        if let Some(e) = self.reals.get_mut(&key) {
            e.in_use = false;
            if e.real.flags & REAL_F_VALID != 0 {
                e.real.flags &= !REAL_F_VALID;
                writes.push(Write::Real(e.id, e.real));
            }
        }
    }

    /// The writes that take the maps from the last planned state to `desired`. On error nothing
    /// was planned and the applied state is unchanged.
    pub fn plan(&mut self, desired: &Desired) -> Result<Vec<Write>, PlanError> {
        let snapshot = (
            self.services.clone(),
            self.reals.clone(),
            self.free_service_ids.clone(),
            self.next_service_id,
            self.free_real_ids.clone(),
            self.next_real_id,
        );
        let r = self.plan_inner(desired);
        if r.is_err() {
            (
                self.services,
                self.reals,
                self.free_service_ids,
                self.next_service_id,
                self.free_real_ids,
                self.next_real_id,
            ) = snapshot;
        }
        r
    }

    fn plan_inner(&mut self, desired: &Desired) -> Result<Vec<Write>, PlanError> {
        let mut writes = Vec::new();
        let nat = desired
            .services
            .iter()
            .any(|s| s.fwd == xdpvs_common::fwd_kind::NAT);
        let settings = settings(&desired.timeouts, desired.sync, nat);
        if self.settings != Some(settings) {
            writes.push(Write::Settings(settings));
            self.settings = Some(settings);
        }

        let mut seen_services = HashSet::new();
        let mut seen_reals: HashSet<RealKey> = HashSet::new();
        for ds in &desired.services {
            seen_services.insert(ds.key);
            // The service's id first: every real records whose it is.
            let (id, buffer, old) = match self.services.get(&ds.key) {
                Some(e) => (e.id, e.buffer, Some((e.service, e.set, e.region))),
                None => (self.alloc_service()?, 1, None),
            };
            let mut set = RealSet::default();
            let mut addresses = Vec::new();
            for r in ds.reals.iter().take(MAX_REALS_PER_SERVICE) {
                let key = (ds.key, r.address);
                seen_reals.insert(key);
                if r.cut {
                    self.cut_real(key, &mut writes);
                    continue;
                }
                let real = self.use_real(key, id, &mut writes)?;
                set.slots[set.count as usize] = RealSlot {
                    real,
                    weight: r.weight,
                };
                set.count += 1;
                set.total_weight = set.total_weight.saturating_add(r.weight);
                addresses.push(r.address);
            }
            let (di, mw) =
                sched::wrr_params(set.slots[..set.count as usize].iter().map(|s| s.weight));
            set.wrr_di = di;
            set.wrr_mw = mw;
            let fallback = match ds.fallback {
                Some(f) => {
                    let key = (ds.key, f);
                    seen_reals.insert(key);
                    self.use_real(key, id, &mut writes)?
                }
                None => NO_REAL,
            };
            // The lookup table, for the hashing schedulers: its region of the pool (kept while
            // its size is), and its entries for this set.
            let hashing = matches!(ds.sched, sched_kind::SH | sched_kind::MH) && ds.table_size > 0;
            let old_region = old.and_then(|(_, _, r)| r);
            let region = if !hashing {
                None
            } else {
                let blocks = blocks_for(ds.table_size);
                match old_region {
                    Some(r) if r.blocks == blocks => Some(r),
                    _ => Some(self.alloc_region(&ds.name, blocks)?),
                }
            };
            if hashing {
                set.table_size = ds.table_size;
            }
            let sched_flags = ds.sched_flags & (SVC_F_SH_PORT | SVC_F_SH_FALLBACK);
            let mut buffer = buffer;
            let set_changed = match old {
                None => true,
                Some((old_svc, old_set, _)) => {
                    let mut a = old_set;
                    a.table_block = 0;
                    a != set
                        || old_region != region
                        || (old_svc.flags ^ sched_flags) & SVC_F_SH_FALLBACK != 0
                }
            };
            if set_changed {
                buffer ^= 1;
                if let Some(r) = region {
                    set.table_block = r.start + buffer * r.blocks;
                    let table = table_entries(ds, &set, &addresses)?;
                    writes.push(Write::Table(set.table_block, table));
                }
                writes.push(Write::RealSet(id * 2 + buffer, Box::new(set)));
            } else if let Some((_, old_set, _)) = old {
                set.table_block = old_set.table_block;
            }
            let service = Service {
                id,
                realset: id * 2 + buffer,
                fallback,
                sched: ds.sched,
                fwd: ds.fwd,
                flags: if ds.standby { SVC_F_STANDBY } else { 0 } | sched_flags,
                persist_timeout_s: ds.persist.map_or(0, |p| p.0),
                persist_prefix: ds.persist.map_or(0, |p| p.1),
                tunnel_port: ds.tunnel_port.to_be(),
                ..Service::default()
            };
            let wrr = ds.sched == sched_kind::WRR;
            if wrr && old.is_none() {
                writes.push(Write::ResetServiceState(id));
            }
            if old.map(|(s, _, _)| s != service).unwrap_or(true) {
                writes.push(Write::Service(ds.key, service));
            }
            let was_wrr = old.map(|(s, _, _)| s.sched == sched_kind::WRR);
            if wrr && was_wrr.is_some() && (set_changed || was_wrr == Some(false)) {
                writes.push(Write::WrrChanged {
                    service: id,
                    di,
                    mw,
                });
            }
            self.services.insert(
                ds.key,
                SvcEntry {
                    id,
                    buffer,
                    service,
                    set,
                    cut_on_remove: ds.cut_on_remove,
                    draining: false,
                    region,
                },
            );
        }

        // Services no longer configured: cut at once, or kept (flagged draining, taking no new
        // connections) so their open connections can finish.
        let mut gone: Vec<ServiceKey> = self
            .services
            .iter()
            .filter(|(k, e)| !seen_services.contains(k) && !e.draining)
            .map(|(k, _)| *k)
            .collect();
        gone.sort_by_key(|k| self.services.get(k).map(|e| e.id));
        let mut cut_services = HashSet::new();
        for key in gone {
            let cut = self
                .services
                .get(&key)
                .map(|e| e.cut_on_remove)
                .unwrap_or(true);
            if cut {
                if let Some(e) = self.services.remove(&key) {
                    writes.push(Write::DeleteService(key));
                    self.free_service_ids.push_back(e.id);
                }
                cut_services.insert(key);
            } else if let Some(e) = self.services.get_mut(&key) {
                e.draining = true;
                e.service.flags |= SVC_F_DRAINING;
                writes.push(Write::Service(key, e.service));
            }
        }

        // Reals no longer configured: drain (stay valid, out of every set) or cut.
        let mut unused: Vec<RealKey> = self
            .reals
            .keys()
            .filter(|k| !seen_reals.contains(k))
            .copied()
            .collect();
        unused.sort_by_key(|k| self.reals.get(k).map(|r| r.id));
        for key in unused {
            let cut = cut_services.contains(&key.0)
                || self
                    .services
                    .get(&key.0)
                    .map(|s| s.cut_on_remove)
                    .unwrap_or(false);
            if cut {
                self.cut_real(key, &mut writes);
            } else if let Some(e) = self.reals.get_mut(&key) {
                e.in_use = false;
            }
        }
        Ok(writes)
    }

    /// Frees the ids of reals out of use whose connection count (`conns(id)`) is zero, returning
    /// the writes that invalidate them.
    pub fn release(&mut self, conns: impl Fn(u32) -> u64) -> Vec<Write> {
        let mut writes = Vec::new();
        let mut freed: Vec<(RealKey, u32)> = self
            .reals
            .iter()
            .filter(|(_, r)| !r.in_use && conns(r.id) == 0)
            .map(|(k, r)| (*k, r.id))
            .collect();
        freed.sort_by_key(|(_, id)| *id);
        for (key, id) in freed {
            if self.reals.remove(&key).is_some() {
                // An empty slot (family 0) is how an adopting daemon tells a free id.
                writes.push(Write::Real(id, Real::default()));
                self.free_real_ids.push_back(id);
            }
        }
        // A draining service goes once none of its reals holds an id.
        let mut done: Vec<ServiceKey> = self
            .services
            .iter()
            .filter(|(k, e)| e.draining && !self.reals.keys().any(|(s, _)| s == *k))
            .map(|(k, _)| *k)
            .collect();
        done.sort_by_key(|k| self.services.get(k).map(|e| e.id));
        for key in done {
            if let Some(e) = self.services.remove(&key) {
                writes.push(Write::DeleteService(key));
                self.free_service_ids.push_back(e.id);
            }
        }
        writes
    }
}

/// The entries of a hashing scheduler's table for `set` (whose reals have `addresses`, in slot
/// order): slot indexes, `ds.table_size` of them.
fn table_entries(
    ds: &crate::state::DesiredService,
    set: &RealSet,
    addresses: &[SocketAddr],
) -> Result<Vec<u8>, PlanError> {
    let weights: Vec<u32> = set.slots[..set.count as usize]
        .iter()
        .map(|s| s.weight)
        .collect();
    let size = ds.table_size as usize;
    if ds.sched == sched_kind::SH {
        let fallback = ds.sched_flags & SVC_F_SH_FALLBACK != 0;
        // An empty set gets zeros: slot 0 is beyond its count, so no real.
        let t = sched::sh_table(&weights, fallback).unwrap_or([0; 256]);
        let mut v = t.to_vec();
        v.resize(size, 0);
        return Ok(v);
    }
    let backends: Vec<crate::maglev::Backend> = addresses
        .iter()
        .zip(&weights)
        .map(|(a, w)| crate::maglev::Backend {
            address: *a,
            weight: *w,
        })
        .collect();
    let t = crate::maglev::table(&backends, ds.table_size)
        .map_err(|e| PlanError::Table(ds.name.clone(), e))?;
    // No real with a weight: every entry names slot 0, which has weight 0 (or is beyond an
    // empty set), so the program finds no real.
    Ok(t.iter()
        .map(|e| {
            if *e == crate::maglev::EMPTY {
                0
            } else {
                *e as u8
            }
        })
        .collect())
}

/// What the maps hold, read back by a daemon adopting a pinned dataplane.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MapsView {
    pub services: Vec<(ServiceKey, Service)>,
    /// The real sets the services point at, by `REALSETS` index.
    pub realsets: HashMap<u32, RealSet>,
    /// Every `REALS` slot that holds a real (family set), by id.
    pub reals: Vec<(u32, Real)>,
    pub settings: Settings,
    /// Capacity of the lookup-table pool, in blocks.
    pub table_pool: u32,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("the pinned maps are inconsistent: {0}")]
pub struct AdoptError(String);

impl Planner {
    /// Rebuilds the planner from what the maps hold, so a restarted daemon carries on with the
    /// same ids, sets and buffers: its first plan for an unchanged config writes nothing, and a
    /// changed config is an ordinary diff. Reads only: nothing is written to the maps here.
    ///
    /// Which config key a real slot belongs to comes from `Real::service`. A real whose service
    /// is gone (cut by an earlier reload while its connections were still being retired) keeps
    /// its id under a placeholder key (family 0, the id as address) until its count reaches 0.
    pub fn adopt(view: &MapsView) -> Result<Planner, AdoptError> {
        let bad = |m: String| Err(AdoptError(m));
        let mut p = Planner::new();
        let mut key_of: HashMap<u32, ServiceKey> = HashMap::new();
        for (key, svc) in &view.services {
            if svc.id >= MAX_SERVICES {
                return bad(format!("service id {} out of range", svc.id));
            }
            let buffer = match svc.realset.checked_sub(svc.id * 2) {
                Some(b @ (0 | 1)) => b,
                _ => {
                    return bad(format!(
                        "service {} points at real set {}, not one of its own",
                        svc.id, svc.realset
                    ))
                }
            };
            let Some(set) = view.realsets.get(&svc.realset).copied() else {
                return bad(format!("real set {} was not read", svc.realset));
            };
            if set.count as usize > MAX_REALS_PER_SERVICE {
                return bad(format!("real set {} has count {}", svc.realset, set.count));
            }
            if key_of.insert(svc.id, *key).is_some() {
                return bad(format!("service id {} is used twice", svc.id));
            }
            let region = if set.table_size == 0 {
                None
            } else {
                let blocks = blocks_for(set.table_size);
                match set.table_block.checked_sub(buffer * blocks) {
                    Some(start) => Some(Region { start, blocks }),
                    None => {
                        return bad(format!(
                            "real set {} names table block {}, below its service's region",
                            svc.realset, set.table_block
                        ))
                    }
                }
            };
            p.services.insert(
                *key,
                SvcEntry {
                    id: svc.id,
                    buffer,
                    service: *svc,
                    set,
                    // Decided again by the first plan for every configured service.
                    cut_on_remove: false,
                    draining: svc.flags & SVC_F_DRAINING != 0,
                    region,
                },
            );
        }
        let mut in_use = HashSet::new();
        for e in p.services.values().filter(|e| !e.draining) {
            in_use.extend(e.set.slots[..e.set.count as usize].iter().map(|s| s.real));
            if e.service.fallback != NO_REAL {
                in_use.insert(e.service.fallback);
            }
        }
        let mut held = HashSet::new();
        for (id, real) in &view.reals {
            if *id >= MAX_REALS || !held.insert(*id) {
                return bad(format!("real id {id} out of range or read twice"));
            }
            let Some(ip) = crate::state::ip_of(&real.addr, real.family) else {
                return bad(format!("real {id} has family {}", real.family));
            };
            let address = SocketAddr::new(ip, u16::from_be(real.port));
            let service = match key_of.get(&real.service) {
                Some(k) => *k,
                None => ServiceKey {
                    addr: xdpvs_common::Addr { w: [*id, 0, 0, 0] },
                    ..ServiceKey::default()
                },
            };
            let entry = RealEntry {
                id: *id,
                real: *real,
                in_use: in_use.contains(id),
            };
            if p.reals.insert((service, address), entry).is_some() {
                return bad(format!("two real ids for {address} in one service"));
            }
        }
        if let Some(id) = in_use.iter().find(|id| !held.contains(id)) {
            return bad(format!(
                "a real set or fallback names real {id}, which is free"
            ));
        }
        p.next_real_id = held.iter().max().map_or(0, |m| m + 1);
        p.free_real_ids = (0..p.next_real_id).filter(|i| !held.contains(i)).collect();
        let service_ids: HashSet<u32> = key_of.keys().copied().collect();
        p.next_service_id = service_ids.iter().max().map_or(0, |m| m + 1);
        p.free_service_ids = (0..p.next_service_id)
            .filter(|i| !service_ids.contains(i))
            .collect();
        p.settings = Some(view.settings);
        p.table_pool = view.table_pool;
        Ok(p)
    }
}

/// The XDP program's idle timeouts, from the configured ones, whether it reports connection
/// events for a sync peer, and whether it looks for NAT replies.
pub fn settings(t: &Timeouts, sync: bool, nat: bool) -> Settings {
    use xdpvs_common::state;
    let mut s = Settings::default();
    let ns = |d: std::time::Duration| d.as_nanos().min(u64::MAX as u128) as u64;
    s.timeout_ns[state::SYN_RECV as usize] = ns(t.tcp_syn);
    s.timeout_ns[state::ESTABLISHED as usize] = ns(t.tcp_established);
    s.timeout_ns[state::FIN_WAIT as usize] = ns(t.tcp_fin);
    s.timeout_ns[state::CLOSE as usize] = ns(t.tcp_close);
    s.timeout_ns[state::UDP as usize] = ns(t.udp);
    // The real closed first (NAT only); IPVS's close_wait is as long as its fin_wait.
    s.timeout_ns[state::CLOSE_WAIT as usize] = ns(t.tcp_fin);
    if sync {
        s.flags |= xdpvs_common::SETTINGS_F_SYNC;
    }
    if nat {
        s.flags |= xdpvs_common::SETTINGS_F_NAT;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;
    use crate::state::{service_key, DesiredReal, DesiredService};

    fn svc(name: &str, vip: &str, reals: &[(&str, u32)]) -> DesiredService {
        let address: SocketAddr = vip.parse().unwrap();
        DesiredService {
            name: name.into(),
            address,
            key: service_key(address, Protocol::Tcp),
            sched: 0,
            fwd: 0,
            fallback: None,
            tunnel_port: 0,
            persist: None,
            reals: reals
                .iter()
                .map(|(a, w)| DesiredReal {
                    address: a.parse().unwrap(),
                    weight: *w,
                    cut: false,
                })
                .collect(),
            cut_on_remove: false,
            standby: false,
            table_size: 0,
            sched_flags: 0,
        }
    }

    /// Service "web" with reals .11 and .12 at weight 1.
    fn two_reals() -> DesiredService {
        svc(
            "web",
            "198.18.0.100:80",
            &[("198.18.0.11:80", 1), ("198.18.0.12:80", 1)],
        )
    }

    fn desired(services: Vec<DesiredService>) -> Desired {
        Desired {
            services,
            timeouts: Timeouts::default(),
            sync: false,
        }
    }

    fn sets(writes: &[Write]) -> Vec<(u32, Vec<(u32, u32)>)> {
        writes
            .iter()
            .filter_map(|w| match w {
                Write::RealSet(i, s) => Some((
                    *i,
                    s.slots[..s.count as usize]
                        .iter()
                        .map(|x| (x.real, x.weight))
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn first_apply_writes_everything_in_order() {
        let mut p = Planner::new();
        let d = desired(vec![svc(
            "web",
            "198.18.0.100:80",
            &[("198.18.0.11:80", 1), ("198.18.0.12:80", 2)],
        )]);
        let w = p.plan(&d).unwrap();
        assert!(matches!(w[0], Write::Settings(_)));
        assert_eq!(sets(&w), vec![(0, vec![(0, 1), (1, 2)])]);
        // The set is written before the service that points at it.
        let set_pos = w.iter().position(|x| matches!(x, Write::RealSet(..)));
        let svc_pos = w.iter().position(|x| matches!(x, Write::Service(..)));
        assert!(set_pos < svc_pos);
        match w.last() {
            Some(Write::Service(_, s)) => {
                assert_eq!((s.id, s.realset, s.fallback), (0, 0, NO_REAL))
            }
            other => panic!("expected a service write last, got {other:?}"),
        }
        // Same desired state again: nothing to write.
        assert_eq!(p.plan(&d).unwrap(), vec![]);
    }

    #[test]
    fn reweight_flips_buffer_and_keeps_ids() {
        let mut p = Planner::new();
        let a = [("198.18.0.11:80", 1), ("198.18.0.12:80", 2)];
        p.plan(&desired(vec![svc("web", "198.18.0.100:80", &a)]))
            .unwrap();
        let b = [("198.18.0.11:80", 1), ("198.18.0.12:80", 0)];
        let w = p
            .plan(&desired(vec![svc("web", "198.18.0.100:80", &b)]))
            .unwrap();
        assert_eq!(sets(&w), vec![(1, vec![(0, 1), (1, 0)])]);
        assert!(!w
            .iter()
            .any(|x| matches!(x, Write::ResetReal(_) | Write::Real(..))));
        let w = p
            .plan(&desired(vec![svc("web", "198.18.0.100:80", &a)]))
            .unwrap();
        assert_eq!(sets(&w), vec![(0, vec![(0, 1), (1, 2)])]);
    }

    #[test]
    fn removed_real_drains_until_its_connections_end() {
        let mut p = Planner::new();
        let a = [("198.18.0.11:80", 1), ("198.18.0.12:80", 1)];
        p.plan(&desired(vec![svc("web", "198.18.0.100:80", &a)]))
            .unwrap();
        let w = p
            .plan(&desired(vec![svc("web", "198.18.0.100:80", &a[..1])]))
            .unwrap();
        assert_eq!(sets(&w), vec![(1, vec![(0, 1)])]);
        // Draining: still valid (its flows keep going), out of the set.
        assert!(!w.iter().any(|x| matches!(x, Write::Real(..))));
        assert_eq!(p.draining().len(), 1);
        // Still has connections: kept.
        assert_eq!(p.release(|id| if id == 1 { 3 } else { 0 }), vec![]);
        // Connections gone: invalidated and its id freed for reuse.
        let w = p.release(|_| 0);
        assert!(matches!(w.as_slice(), [Write::Real(1, r)] if r.flags == 0));
        assert!(p.draining().is_empty());
        let w = p
            .plan(&desired(vec![svc(
                "web",
                "198.18.0.100:80",
                &[("198.18.0.11:80", 1), ("198.18.0.13:80", 1)],
            )]))
            .unwrap();
        assert!(w.contains(&Write::ResetReal(1)));
    }

    #[test]
    fn removed_real_with_cut_is_invalidated_at_once() {
        let mut p = Planner::new();
        let mut s = two_reals();
        s.cut_on_remove = true;
        p.plan(&desired(vec![s.clone()])).unwrap();
        s.reals.truncate(1);
        let w = p.plan(&desired(vec![s])).unwrap();
        assert!(w
            .iter()
            .any(|x| matches!(x, Write::Real(1, r) if r.flags == 0)));
    }

    #[test]
    fn failed_real_with_remove_is_cut_and_returns_with_same_id() {
        let mut p = Planner::new();
        let mut s = two_reals();
        p.plan(&desired(vec![s.clone()])).unwrap();
        s.reals[1].cut = true;
        let w = p.plan(&desired(vec![s.clone()])).unwrap();
        assert!(w
            .iter()
            .any(|x| matches!(x, Write::Real(1, r) if r.flags == 0)));
        assert_eq!(sets(&w), vec![(1, vec![(0, 1)])]);
        s.reals[1].cut = false;
        let w = p.plan(&desired(vec![s])).unwrap();
        assert!(w
            .iter()
            .any(|x| matches!(x, Write::Real(1, r) if r.flags == REAL_F_VALID)));
        assert_eq!(sets(&w), vec![(0, vec![(0, 1), (1, 1)])]);
    }

    #[test]
    fn cut_real_without_connections_holds_no_id() {
        let mut p = Planner::new();
        let mut s = two_reals();
        p.plan(&desired(vec![s.clone()])).unwrap();
        s.reals[1].cut = true;
        p.plan(&desired(vec![s.clone()])).unwrap();
        assert_eq!(p.draining().len(), 1);
        // Freeing its id empties its slot (how an adopting daemon tells a free id).
        assert_eq!(p.release(|_| 0), vec![Write::Real(1, Real::default())]);
        assert!(p.draining().is_empty());
        // Still down: planning again allocates nothing and writes nothing.
        assert_eq!(p.plan(&desired(vec![s.clone()])).unwrap(), vec![]);
        assert!(p.real_id(&s.key, s.reals[1].address).is_none());
    }

    #[test]
    fn removed_service_is_deleted_and_its_id_reused() {
        let mut p = Planner::new();
        let a = svc("a", "198.18.0.100:80", &[("198.18.0.11:80", 1)]);
        let b = svc("b", "198.18.0.101:80", &[("198.18.0.11:80", 1)]);
        p.plan(&desired(vec![a.clone(), b])).unwrap();
        let w = p.plan(&desired(vec![a.clone()])).unwrap();
        // Drains first: flagged, not deleted, while its real has connections.
        assert!(w
            .iter()
            .any(|x| matches!(x, Write::Service(_, s) if s.flags & SVC_F_DRAINING != 0)));
        assert!(!w.iter().any(|x| matches!(x, Write::DeleteService(_))));
        assert!(p.release(|_| 1).is_empty());
        let w = p.release(|_| 0);
        assert!(w.iter().any(|x| matches!(x, Write::DeleteService(_))));
        let c = svc("c", "198.18.0.102:80", &[("198.18.0.11:80", 1)]);
        let w = p.plan(&desired(vec![a, c])).unwrap();
        assert!(w
            .iter()
            .any(|x| matches!(x, Write::Service(_, s) if s.id == 1)));
    }

    #[test]
    fn fallback_gets_a_real_id() {
        let mut p = Planner::new();
        let mut s = svc("web", "198.18.0.100:80", &[("198.18.0.11:80", 1)]);
        s.fallback = Some("198.18.0.9:80".parse().unwrap());
        let w = p.plan(&desired(vec![s])).unwrap();
        assert!(w
            .iter()
            .any(|x| matches!(x, Write::Service(_, s) if s.fallback == 1)));
    }

    #[test]
    fn real_ids_exhausted_is_an_error_and_changes_nothing() {
        let mut p = Planner::new();
        p.next_real_id = MAX_REALS - 1;
        let s = two_reals();
        assert_eq!(p.plan(&desired(vec![s])), Err(PlanError::TooManyReals));
        assert!(p.services.is_empty() && p.reals.is_empty());
    }

    /// The maps as a store the planned writes are executed against, read back like the
    /// dataplane does for an adopting daemon.
    #[derive(Default)]
    struct FakeMaps {
        services: HashMap<ServiceKey, Service>,
        realsets: HashMap<u32, RealSet>,
        reals: HashMap<u32, Real>,
        settings: Settings,
        tables: HashMap<u32, Vec<u8>>,
    }

    impl FakeMaps {
        fn write(&mut self, writes: &[Write]) {
            for w in writes {
                match w {
                    Write::ResetReal(_) => {}
                    Write::Real(id, r) => {
                        self.reals.insert(*id, *r);
                    }
                    Write::RealSet(i, set) => {
                        self.realsets.insert(*i, **set);
                    }
                    Write::Service(k, v) => {
                        self.services.insert(*k, *v);
                    }
                    Write::DeleteService(k) => {
                        self.services.remove(k);
                    }
                    Write::Settings(st) => self.settings = *st,
                    Write::Table(first, t) => {
                        self.tables.insert(*first, t.clone());
                    }
                    Write::WrrChanged { .. } | Write::ResetServiceState(_) => {}
                }
            }
        }

        fn view(&self) -> MapsView {
            let mut reals: Vec<(u32, Real)> = self
                .reals
                .iter()
                .filter(|(_, r)| r.family != xdpvs_common::FAMILY_NONE)
                .map(|(i, r)| (*i, *r))
                .collect();
            reals.sort_by_key(|(i, _)| *i);
            MapsView {
                services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
                realsets: self
                    .services
                    .values()
                    .map(|s| (s.realset, self.realsets[&s.realset]))
                    .collect(),
                reals,
                settings: self.settings,
                table_pool: xdpvs_common::DEFAULT_TABLE_POOL_BLOCKS,
            }
        }
    }

    /// Plans and executes `d` on both the planner and the maps.
    fn apply(p: &mut Planner, maps: &mut FakeMaps, d: &Desired) -> Vec<Write> {
        let w = p.plan(d).unwrap();
        maps.write(&w);
        w
    }

    #[test]
    fn adopted_planner_writes_nothing_for_the_same_config() {
        let mut p = Planner::new();
        let mut maps = FakeMaps::default();
        let mut web = two_reals();
        web.fallback = Some("198.18.0.9:80".parse().unwrap());
        let dns = svc("dns", "198.18.0.101:53", &[("198.18.0.12:53", 3)]);
        let d = desired(vec![web, dns]);
        apply(&mut p, &mut maps, &d);
        // A reweight flips a buffer, so the adopted state is not just the first one.
        let mut d2 = d.clone();
        d2.services[0].reals[1].weight = 5;
        apply(&mut p, &mut maps, &d2);

        let mut q = Planner::adopt(&maps.view()).unwrap();
        assert_eq!(q.plan(&d2).unwrap(), vec![]);
        assert_eq!(q.ids(), p.ids());
        for s in &d2.services {
            for r in &s.reals {
                assert_eq!(q.real_id(&s.key, r.address), p.real_id(&s.key, r.address));
            }
        }
    }

    fn hashed(
        name: &str,
        vip: &str,
        sched: u8,
        size: u32,
        reals: &[(&str, u32)],
    ) -> DesiredService {
        let mut s = svc(name, vip, reals);
        s.sched = sched;
        s.table_size = size;
        s
    }

    /// (first block, entries) of every table write, in order, with the index of the write.
    fn table_writes(w: &[Write]) -> Vec<(usize, u32, usize)> {
        w.iter()
            .enumerate()
            .filter_map(|(i, w)| match w {
                Write::Table(b, t) => Some((i, *b, t.len())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn hashing_tables_are_written_aside_before_their_set_and_regions_never_overlap() {
        let mut p = Planner::new();
        let mh = hashed(
            "mh",
            "198.18.0.100:80",
            sched_kind::MH,
            65_537,
            &[("198.18.0.11:80", 1), ("198.18.0.12:80", 2)],
        );
        let sh = hashed(
            "sh",
            "198.18.0.101:80",
            sched_kind::SH,
            256,
            &[("198.18.0.11:80", 1), ("198.18.0.12:80", 0)],
        );
        let w = p.plan(&desired(vec![mh.clone(), sh.clone()])).unwrap();
        let t = table_writes(&w);
        assert_eq!(t.len(), 2);
        // Each table before the real set naming it, which comes before the service flip.
        for (i, block, len) in &t {
            match &w[i + 1] {
                Write::RealSet(_, set) => {
                    assert_eq!((set.table_block, set.table_size as usize), (*block, *len))
                }
                other => panic!("{other:?} after a table"),
            }
        }
        // mh: 257 blocks per table, in buffer 0 of region 0..514; sh's region after it.
        assert_eq!((t[0].1, t[0].2), (0, 65_537));
        assert_eq!((t[1].1, t[1].2), (514, 256));
        // A reweight writes the other half, then flips.
        let mut mh2 = mh.clone();
        mh2.reals[0].weight = 3;
        let w = p.plan(&desired(vec![mh2.clone(), sh.clone()])).unwrap();
        assert_eq!(
            table_writes(&w).iter().map(|x| x.1).collect::<Vec<_>>(),
            [257]
        );
        // Nothing changed: nothing written.
        assert_eq!(
            p.plan(&desired(vec![mh2.clone(), sh.clone()])).unwrap(),
            vec![]
        );
        // sh_fallback changes the table, not the set.
        let mut sh2 = sh.clone();
        sh2.sched_flags = SVC_F_SH_FALLBACK;
        let w = p.plan(&desired(vec![mh2.clone(), sh2.clone()])).unwrap();
        assert_eq!(
            table_writes(&w).iter().map(|x| x.1).collect::<Vec<_>>(),
            [515]
        );
        // A smaller mh table needs a new region: taken where no live table is.
        let mut mh3 = mh2.clone();
        mh3.table_size = 251;
        let w = p.plan(&desired(vec![mh3.clone(), sh2.clone()])).unwrap();
        let t = table_writes(&w);
        assert_eq!(t.len(), 1);
        assert!(t[0].1 >= 516, "not over the live tables: {t:?}");
        let regions = p.table_regions();
        for (i, a) in regions.iter().enumerate() {
            for b in &regions[i + 1..] {
                assert!(a.1 + 2 * a.2 <= b.1, "overlap: {regions:?}");
            }
        }
        // Leaving the hashing schedulers frees the region.
        let mut plain = mh3.clone();
        plain.sched = sched_kind::WLC;
        plain.table_size = 0;
        p.plan(&desired(vec![plain, sh2])).unwrap();
        assert_eq!(p.table_regions().len(), 1);
    }

    #[test]
    fn a_full_table_pool_is_an_error_that_changes_nothing() {
        let mut p = Planner::new();
        p.set_table_pool(600);
        let a = hashed(
            "a",
            "198.18.0.100:80",
            sched_kind::MH,
            65_537,
            &[("198.18.0.11:80", 1)],
        );
        let b = hashed(
            "b",
            "198.18.0.101:80",
            sched_kind::MH,
            65_537,
            &[("198.18.0.11:80", 1)],
        );
        p.plan(&desired(vec![a.clone()])).unwrap();
        let e = p.plan(&desired(vec![a.clone(), b])).unwrap_err();
        assert!(
            matches!(&e, PlanError::TablePoolFull { service, need: 514, free: 86, pool: 600 } if service == "b"),
            "{e}"
        );
        assert_eq!(p.plan(&desired(vec![a])).unwrap(), vec![]);
    }

    #[test]
    fn wrr_marks_are_reset_for_new_services_and_realigned_on_changes() {
        let mut p = Planner::new();
        let mut s = two_reals();
        s.sched = sched_kind::WRR;
        let w = p.plan(&desired(vec![s.clone()])).unwrap();
        assert!(w.contains(&Write::ResetServiceState(0)));
        s.reals[0].weight = 4;
        let w = p.plan(&desired(vec![s.clone()])).unwrap();
        let at = |x: &Write| w.iter().position(|y| y == x);
        let changed = Write::WrrChanged {
            service: 0,
            di: 1,
            mw: 4,
        };
        assert!(
            at(&changed).unwrap()
                > w.iter()
                    .position(|y| matches!(y, Write::Service(..)))
                    .unwrap()
        );
    }

    #[test]
    fn adopted_planner_with_hashing_services_writes_nothing_for_the_same_config() {
        let mut p = Planner::new();
        let mut maps = FakeMaps::default();
        let mh = hashed(
            "mh",
            "198.18.0.100:80",
            sched_kind::MH,
            4093,
            &[("198.18.0.11:80", 1), ("198.18.0.12:80", 2)],
        );
        let mut sh = hashed(
            "sh",
            "198.18.0.101:80",
            sched_kind::SH,
            256,
            &[("198.18.0.11:80", 1)],
        );
        sh.sched_flags = SVC_F_SH_PORT | SVC_F_SH_FALLBACK;
        let d = desired(vec![mh.clone(), sh.clone()]);
        apply(&mut p, &mut maps, &d);
        let mut d2 = d.clone();
        d2.services[0].reals[1].weight = 5;
        apply(&mut p, &mut maps, &d2);
        let mut q = Planner::adopt(&maps.view()).unwrap();
        assert_eq!(q.table_regions(), p.table_regions());
        assert_eq!(q.plan(&d2).unwrap(), vec![]);
        // And the next change lands where the original planner would put it.
        let mut d3 = d2.clone();
        d3.services[0].reals[0].weight = 7;
        assert_eq!(q.plan(&d3).unwrap(), p.plan(&d3).unwrap());
    }

    #[test]
    fn adopted_planner_makes_the_same_diff_as_the_original() {
        let mut p = Planner::new();
        let mut maps = FakeMaps::default();
        let a = svc(
            "a",
            "198.18.0.100:80",
            &[
                ("198.18.0.11:80", 1),
                ("198.18.0.12:80", 2),
                ("198.18.0.13:80", 3),
            ],
        );
        let mut b = svc("b", "198.18.0.101:80", &[("198.18.0.11:80", 1)]);
        b.cut_on_remove = true;
        let c = svc("c", "198.18.0.102:80", &[("198.18.0.14:80", 1)]);
        apply(&mut p, &mut maps, &desired(vec![a.clone(), b, c.clone()]));
        // Remove a real (it drains: still counted) and a service that cuts.
        let mut a2 = a.clone();
        a2.reals.remove(1);
        apply(&mut p, &mut maps, &desired(vec![a2.clone(), c.clone()]));
        // A released id leaves a hole the allocator must reuse the same way.
        maps.write(&p.release(|id| u64::from(id == 1)));

        let mut q = Planner::adopt(&maps.view()).unwrap();
        assert_eq!(q.draining(), p.draining());
        // The next change: a real added, a service added, one weight changed.
        let mut a3 = a2.clone();
        a3.reals.push(DesiredReal {
            address: "198.18.0.15:80".parse().unwrap(),
            weight: 4,
            cut: false,
        });
        a3.reals[0].weight = 7;
        let e = svc("e", "198.18.0.103:80", &[("198.18.0.16:80", 1)]);
        let next = desired(vec![a3, c, e]);
        assert_eq!(q.plan(&next).unwrap(), p.plan(&next).unwrap());
        // And the drained real is freed the same way once its connections end.
        assert_eq!(q.release(|_| 0), p.release(|_| 0));
    }

    #[test]
    fn adopt_refuses_a_set_naming_a_free_real() {
        let mut p = Planner::new();
        let mut maps = FakeMaps::default();
        apply(&mut p, &mut maps, &desired(vec![two_reals()]));
        maps.reals.remove(&1);
        let e = Planner::adopt(&maps.view()).unwrap_err();
        assert!(e.to_string().contains("names real 1, which is free"), "{e}");
    }

    #[test]
    fn adopt_refuses_a_service_pointing_at_another_services_set() {
        let mut p = Planner::new();
        let mut maps = FakeMaps::default();
        apply(&mut p, &mut maps, &desired(vec![two_reals()]));
        for s in maps.services.values_mut() {
            s.realset = 7;
        }
        maps.realsets.insert(7, RealSet::default());
        let e = Planner::adopt(&maps.view()).unwrap_err();
        assert!(e.to_string().contains("not one of its own"), "{e}");
    }
}
