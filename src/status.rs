//! The read model: what `xdpvs list` and the metrics show, built from the live config, the
//! runtime state (health, admin overrides, VRRP) and the dataplane's counters.
//!
//! It only reads: the dataplane through the owner's [`Reader`] (a read-only handle of the
//! maps), so building a status never waits for a map write, however long, and never delays
//! one. The daemon implements [`ReadModel`]; the metrics and the admin server depend on this
//! module, not on the daemon.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicU64;

use anyhow::Result;
use xdpvs_common::{PersistKey, Template, STAT_NAMES};

use crate::admin::{
    PersistenceStatus, RealStatus, ServiceStatus, Status, TemplateStatus, TEMPLATES_LISTED,
};
use crate::config::{Config, Forwarding, Protocol};
use crate::dataplane::owner::Reader;
use crate::ha::director::VrrpStatus;
use crate::ha::sync::service::SyncStats;
use crate::state::{self, Runtime};

/// Counters about the daemon itself (exported as metrics).
#[derive(Default)]
pub struct DaemonStats {
    pub reloads_ok: AtomicU64,
    pub reloads_error: AtomicU64,
    /// Unix time of the last successful (re)load.
    pub last_reload_ok: AtomicU64,
}

/// Where `list` and metrics read the daemon's state.
pub trait ReadModel: Send + Sync + 'static {
    /// The live table (reads only; safe on the blocking pool at any time).
    fn status(&self) -> Result<Status>;
    fn daemon_stats(&self) -> &DaemonStats;
}

/// What a status is built from.
pub struct Sources<'a> {
    pub config_path: &'a Path,
    pub config: &'a Config,
    pub runtime: &'a Runtime,
    pub dataplane: &'a Reader,
    pub vrrp: Vec<VrrpStatus>,
    pub sync: Option<&'a SyncStats>,
}

/// The live table: config names + effective state + dataplane counters.
pub fn build(src: Sources<'_>) -> Result<Status> {
    let cfg = src.config;
    let rt = src.runtime;
    let desired = state::desired(cfg, rt);
    let dp = src.dataplane;
    let index = dp.index();
    let mut services = Vec::new();
    // One walk of the template table, only if some service uses it.
    let templates = if cfg.services.iter().any(|s| s.persistence.is_some()) {
        dp.templates()
    } else {
        Vec::new()
    };
    let real_addr = index.real_addrs();
    let now = crate::dataplane::monotonic_ns();
    for (sc, ds) in cfg.services.iter().zip(desired.services.iter()) {
        let mut reals = Vec::new();
        let counters = |addr: SocketAddr| -> Result<(u64, u64, u64, u64, u64)> {
            match index.real_id(&ds.key, addr) {
                Some(id) => {
                    let c = dp.real_conns(id)?;
                    let s = dp.real_stats(id)?;
                    Ok((c.active, c.inactive, s.conns, s.packets, s.bytes))
                }
                None => Ok((0, 0, 0, 0, 0)),
            }
        };
        for (rc, dr) in sc.reals.iter().zip(ds.reals.iter()) {
            let id = (sc.name.clone(), rc.address);
            let health = rt.health.get(&id);
            let up = health.map(|h| h.up).unwrap_or(true);
            let (active, inactive, connections, packets, bytes) = counters(rc.address)?;
            reals.push(RealStatus {
                address: rc.address.to_string(),
                // The weight in force in the dataplane (the last apply's), so `list` never
                // shows a real out of rotation before the packet path has it so.
                weight: index.live_weight(&ds.key, rc.address),
                configured_weight: rc.weight,
                admin: rt.overrides.get(&id).copied(),
                up,
                health: if up { "up" } else { "down" }.to_string(),
                last_failure: health.and_then(|h| h.last_failure.clone()),
                in_table: !dr.cut,
                fallback: false,
                active,
                inactive,
                connections,
                packets,
                bytes,
            });
        }
        if let Some(f) = sc.fallback {
            let (active, inactive, connections, packets, bytes) = counters(f)?;
            reals.push(RealStatus {
                address: f.to_string(),
                up: true,
                health: "fallback".into(),
                in_table: true,
                fallback: true,
                active,
                inactive,
                connections,
                packets,
                bytes,
                ..Default::default()
            });
        }
        // Reals removed by a reload whose connections are still draining.
        for d in index.draining() {
            if d.service == ds.key
                && !sc.reals.iter().any(|r| r.address == d.address)
                && sc.fallback != Some(d.address)
            {
                let c = dp.real_conns(d.id)?;
                let s = dp.real_stats(d.id)?;
                reals.push(RealStatus {
                    address: d.address.to_string(),
                    health: if d.cut { "cut" } else { "draining" }.into(),
                    active: c.active,
                    inactive: c.inactive,
                    connections: s.conns,
                    packets: s.packets,
                    bytes: s.bytes,
                    ..Default::default()
                });
            }
        }
        services.push(ServiceStatus {
            name: sc.name.clone(),
            address: sc.address.to_string(),
            protocol: match sc.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            }
            .into(),
            scheduler: state::sched_name(ds.sched).into(),
            forwarding: match sc.forwarding {
                Forwarding::Dr => "dr",
                Forwarding::Nat => "nat",
                Forwarding::Tunnel(_) => "tunnel",
            }
            .into(),
            fallback: sc.fallback.map(|f| f.to_string()),
            reals,
            persistence: sc.persistence.map(|p| {
                let sid = index.service_id(&ds.key);
                persistence_status(
                    p.timeout.as_secs(),
                    p.prefix,
                    templates.iter().filter(|(k, _)| Some(k.service) == sid),
                    &real_addr,
                    now,
                )
            }),
        });
    }
    let stats = dp.stats()?;
    let dataplane = STAT_NAMES
        .iter()
        .zip(stats.iter())
        .filter(|(n, _)| !n.starts_with("unused"))
        .map(|(n, v)| (n.to_string(), *v))
        .collect();
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        config: src.config_path.display().to_string(),
        services,
        // Every live entry counts once against its real, so the sum over the reals holding
        // an id is the table's live size, without walking the table.
        conntrack_entries: index
            .ids()
            .into_iter()
            .map(|id| {
                dp.real_conns(id)
                    .map(|c| c.active + c.inactive)
                    .unwrap_or(0)
            })
            .sum(),
        dataplane,
        pin_path: dp.pin_dir().map(|d| d.display().to_string()),
        offline: None,
        map_writes: dp.map_writes(),
        vrrp: src.vrrp,
        sync: match (src.sync, cfg.sync.as_ref()) {
            (Some(st), Some(c)) => {
                Some(st.status(c, stats[xdpvs_common::stat::SYNC_EVENTS_LOST as usize]))
            }
            _ => None,
        },
    })
}

/// The live templates of one service (those used within `timeout_s`), soonest to expire last.
fn persistence_status<'a>(
    timeout_s: u64,
    prefix: u8,
    templates: impl Iterator<Item = &'a (PersistKey, Template)>,
    real_addr: &HashMap<u32, SocketAddr>,
    now: u64,
) -> PersistenceStatus {
    let ttl = timeout_s.saturating_mul(1_000_000_000);
    let mut live: Vec<(u64, TemplateStatus)> = templates
        .filter_map(|(k, t)| {
            let age = now.saturating_sub(t.used_ns);
            if age >= ttl {
                return None;
            }
            let left = (ttl - age).div_ceil(1_000_000_000);
            let client = state::ip_of(&k.client, k.family)?;
            let real = real_addr
                .get(&t.real)
                .map_or_else(|| format!("(id {})", t.real), |a| a.to_string());
            Some((
                left,
                TemplateStatus {
                    client: format!("{client}/{prefix}"),
                    real,
                    expires_in_s: left,
                },
            ))
        })
        .collect();
    live.sort_by_key(|t| std::cmp::Reverse(t.0));
    PersistenceStatus {
        timeout_s: timeout_s.min(u32::MAX as u64) as u32,
        prefix,
        templates: live.len() as u64,
        list: live
            .into_iter()
            .take(TEMPLATES_LISTED)
            .map(|(_, t)| t)
            .collect(),
    }
}
