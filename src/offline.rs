//! The pinned dataplane while no daemon runs: `xdpvs list` reads it straight from the maps,
//! and `xdpvs detach` removes it.
//!
//! Between two daemons (a crash, a restart, an upgrade) the XDP program keeps forwarding from
//! its pinned maps, so an operator must still be able to see what it does. Without a daemon
//! nobody checks health, so the table shows the last weights written, marked as such.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use xdpvs_common::{fwd_kind, stat, PROTO_UDP, REAL_F_VALID, STAT_NAMES};

use crate::admin::{RealStatus, ServiceStatus, Status};
use crate::config::Config;
use crate::dataplane::{pin, Maps};
use crate::state;

/// The pin directory a config's daemon uses (in this network namespace).
pub fn pin_dir_of(cfg: &Config) -> PathBuf {
    cfg.director
        .pin_path
        .clone()
        .unwrap_or_else(|| pin::default_dir(&cfg.director.interface))
}

/// The one pinned dataplane under /sys/fs/bpf/xdpvs, when there is exactly one.
pub fn only_pin_dir() -> Result<PathBuf> {
    let base = Path::new(pin::BPFFS).join("xdpvs");
    let mut found = Vec::new();
    let mut stack = vec![base.clone()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.join(xdpvs_common::maps::LAYOUT).exists() {
                found.push(p);
            } else if p.is_dir() {
                stack.push(p);
            }
        }
    }
    match found.len() {
        0 => bail!("no pinned xdpvs dataplane under {}", base.display()),
        1 => Ok(found.remove(0)),
        _ => {
            found.sort();
            bail!(
                "several pinned dataplanes ({}): name one with --config or --pin-path",
                found
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    }
}

/// The table as the pinned maps hold it, with names from `cfg` where it has them.
pub fn status(dir: &Path, cfg: Option<&Config>) -> Result<Status> {
    let maps = Maps::open_pinned(dir)?;
    let view = maps.view()?;
    let reals: HashMap<u32, SocketAddr> = view
        .reals
        .iter()
        .filter_map(|(id, r)| {
            let ip = state::ip_of(&r.addr, r.family)?;
            Some((*id, SocketAddr::new(ip, u16::from_be(r.port))))
        })
        .collect();
    let valid: HashMap<u32, bool> = view
        .reals
        .iter()
        .map(|(id, r)| (*id, r.flags & REAL_F_VALID != 0))
        .collect();
    let mut services: Vec<_> = view.services.clone();
    services.sort_by_key(|(_, s)| s.id);
    let mut out = Vec::new();
    let mut tracked = 0;
    for (key, svc) in services {
        let ip = state::ip_of(&key.addr, key.family)
            .ok_or_else(|| anyhow!("service {} has family {}", svc.id, key.family))?;
        let address = SocketAddr::new(ip, u16::from_be(key.port));
        let protocol = if key.proto == PROTO_UDP { "udp" } else { "tcp" };
        let configured = cfg.and_then(|c| {
            c.services
                .iter()
                .find(|s| s.address == address && state::service_key(s.address, s.protocol) == key)
        });
        let set = view.realsets.get(&svc.realset).copied().unwrap_or_default();
        let mut rows = Vec::new();
        let mut listed = Vec::new();
        let row = |id: u32, weight: u32, health: &str| -> Result<RealStatus> {
            let c = maps.real_conns(id)?;
            let s = maps.real_stats(id)?;
            let address = reals.get(&id).copied();
            let configured_weight = configured
                .and_then(|cs| cs.reals.iter().find(|r| Some(r.address) == address))
                .map_or(weight, |r| r.weight);
            Ok(RealStatus {
                address: address.map_or_else(|| format!("id {id}"), |a| a.to_string()),
                weight,
                configured_weight,
                up: weight > 0,
                health: health.to_string(),
                in_table: true,
                active: c.active,
                inactive: c.inactive,
                connections: s.conns,
                packets: s.packets,
                bytes: s.bytes,
                ..RealStatus::default()
            })
        };
        for slot in &set.slots[..(set.count as usize).min(set.slots.len())] {
            rows.push(row(slot.real, slot.weight, "unchecked")?);
            listed.push(slot.real);
        }
        if svc.fallback != xdpvs_common::NO_REAL {
            let mut r = row(svc.fallback, 0, "fallback")?;
            r.fallback = true;
            rows.push(r);
            listed.push(svc.fallback);
        }
        for (id, real) in &view.reals {
            if real.service == svc.id && !listed.contains(id) {
                let health = if valid.get(id) == Some(&true) {
                    "draining"
                } else {
                    "cut"
                };
                let mut r = row(*id, 0, health)?;
                r.in_table = false;
                rows.push(r);
            }
        }
        tracked += rows.iter().map(|r| r.active + r.inactive).sum::<u64>();
        out.push(ServiceStatus {
            name: configured.map_or_else(|| address.to_string(), |c| c.name.clone()),
            address: address.to_string(),
            protocol: protocol.into(),
            scheduler: state::sched_name(svc.sched).into(),
            forwarding: match svc.fwd {
                fwd_kind::NAT => "nat",
                fwd_kind::TUNNEL => "tunnel",
                _ => "dr",
            }
            .into(),
            fallback: None,
            reals: rows,
            persistence: None,
        });
    }
    let counters = maps.stats()?;
    let dataplane = STAT_NAMES
        .iter()
        .zip(counters.iter())
        .take(stat::COUNT as usize)
        .filter(|(n, _)| !n.starts_with("unused"))
        .map(|(n, v)| (n.to_string(), *v))
        .collect();
    Ok(Status {
        version: env!("CARGO_PKG_VERSION").into(),
        config: cfg.map_or_else(|| "-".into(), |c| c.source.display().to_string()),
        services: out,
        conntrack_entries: tracked,
        dataplane,
        pin_path: Some(dir.display().to_string()),
        offline: Some(format!(
            "read from the pinned dataplane at {}. It keeps forwarding (open connections to \
             their reals, new ones by the weights last written); health checks are paused \
             until `xdpvs run` adopts it",
            dir.display()
        )),
        vrrp: Vec::new(),
        sync: None,
        map_writes: 0,
    })
}

/// Detaches the program and removes the pins of `dir`; refused while a daemon holds it.
pub fn detach(dir: &Path) -> Result<String> {
    if let Some(holder) = pin::holder(dir) {
        bail!(
            "an xdpvs daemon is running on this dataplane ({holder}): stop it first, or set \
             [director] on_exit = \"detach\" so that stopping it detaches"
        );
    }
    if !dir.exists() {
        bail!("nothing is pinned at {}", dir.display());
    }
    pin::remove_all(dir)?;
    Ok(format!(
        "detached: XDP program removed and pins deleted ({}); open connections through the \
         director are gone",
        dir.display()
    ))
}
