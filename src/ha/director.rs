//! The daemon's side of VRRP: one running [`Instance`] per `[[vrrp]]` table, and the one input
//! it gives the desired state, which VIPs this director owns right now.
//!
//! A VIP that some `[[vrrp]]` lists is owned while one of the instances listing it is master;
//! every other listed VIP is *standby*: its services stay in the maps (connection entries kept
//! current by the sync peer) but the dataplane drops their packets, so two directors never both
//! send a flow to the reals. A VIP no instance lists is always owned (a director without HA).
//!
//! Tracked services: while a tracked service has no real that is up with a weight above 0, the
//! instance advertises priority 1 (lowest a non-stopping router can send), so a healthier peer
//! takes over by preemption; when one comes back the configured priority returns.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::config::VrrpConfig;
use super::vrrp::io::{Counters, Instance, Transition};
use super::vrrp::machine::State;
use crate::config::Config;
use crate::state::{Health, RealId};

/// Priority advertised while a tracked service has no healthy real.
pub const TRACK_FAILED_PRIORITY: u8 = 1;

struct Running {
    config: VrrpConfig,
    counters: Arc<Counters>,
    priority: watch::Sender<u8>,
    primary: IpAddr,
    task: JoinHandle<()>,
    /// Tracked services that have no healthy real now.
    failed: Vec<String>,
}

/// The running VRRP instances of a daemon.
pub struct Vrrp {
    running: Vec<Running>,
    shutdown: watch::Sender<bool>,
}

/// One instance as `xdpvs list` and metrics show it.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct VrrpStatus {
    pub name: String,
    pub interface: String,
    pub virtual_router_id: u8,
    /// "master", "backup", "initialize", or "fault" while the interface has no carrier.
    pub state: String,
    /// Running priority (lowered while a tracked service fails).
    pub priority: u8,
    pub configured_priority: u8,
    /// Primary address of the master as last heard (ours while master).
    pub master: Option<String>,
    /// Our own primary address, the one adverts leave from.
    pub primary: String,
    pub addresses: Vec<String>,
    pub transitions: u64,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub adverts_accepted: u64,
    /// Received adverts dropped, by reason (the closed set of `vrrp::packet::Reject`).
    pub rejected: BTreeMap<String, u64>,
    pub gratuitous_sent: u64,
    pub address_errors: u64,
    /// Tracked services that have no healthy real now.
    pub tracked_failed: Vec<String>,
}

impl Vrrp {
    /// Opens every instance's sockets and starts its election; their transitions arrive on
    /// `events`. Fails (nothing started) if any instance cannot open its interface or sockets.
    pub fn start(
        configs: &[VrrpConfig],
        events: mpsc::UnboundedSender<Transition>,
    ) -> anyhow::Result<Vrrp> {
        let mut instances = Vec::new();
        for c in configs {
            let inst = Instance::new(c.clone())
                .map_err(|e| anyhow::anyhow!("vrrp \"{}\": {e}", c.name))?;
            instances.push((c.clone(), inst));
        }
        let (shutdown, _) = watch::channel(false);
        let mut running = Vec::new();
        for (config, inst) in instances {
            let counters = inst.counters();
            let priority = inst.priority_handle();
            let primary = inst.primary();
            let mut stop = shutdown.subscribe();
            let events = events.clone();
            let name = config.name.clone();
            let task = tokio::spawn(async move {
                let stopped = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                if let Err(e) = inst.run(events, stopped).await {
                    warn!(vrrp = %name, "vrrp instance stopped: {e}");
                }
            });
            running.push(Running {
                config,
                counters,
                priority,
                primary,
                task,
                failed: Vec::new(),
            });
        }
        Ok(Vrrp { running, shutdown })
    }

    /// Every VIP some instance of `configs` lists.
    pub fn listed(configs: &[VrrpConfig]) -> HashSet<IpAddr> {
        configs
            .iter()
            .flat_map(|c| c.addresses.iter().map(|a| a.ip))
            .collect()
    }

    /// Listed VIPs that no master instance holds: the dataplane must not forward for them.
    pub fn standby_vips(&self) -> HashSet<IpAddr> {
        let owned: HashSet<IpAddr> = self
            .running
            .iter()
            .filter(|r| r.counters.state() == State::Master)
            .flat_map(|r| r.config.addresses.iter().map(|a| a.ip))
            .collect();
        self.running
            .iter()
            .flat_map(|r| r.config.addresses.iter().map(|a| a.ip))
            .filter(|ip| !owned.contains(ip))
            .collect()
    }

    /// Sets each instance's running priority from its tracked services' health.
    pub fn track(&mut self, cfg: &Config, health: &HashMap<RealId, Health>) {
        for r in &mut self.running {
            let failed = failed_services(&r.config.track_services, cfg, health);
            if failed == r.failed {
                continue;
            }
            let priority = if failed.is_empty() {
                r.config.priority
            } else {
                TRACK_FAILED_PRIORITY
            };
            if failed.is_empty() {
                info!(vrrp = %r.config.name, priority, "tracked services healthy again: configured priority restored");
            } else {
                warn!(vrrp = %r.config.name, priority, services = ?failed, "a tracked service has no healthy real: priority lowered");
            }
            r.failed = failed;
            let _ = r.priority.send(priority);
        }
    }

    pub fn status(&self) -> Vec<VrrpStatus> {
        self.running
            .iter()
            .map(|r| {
                let c = &r.counters;
                let load =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                VrrpStatus {
                    name: r.config.name.clone(),
                    interface: r.config.interface.clone(),
                    virtual_router_id: r.config.virtual_router_id,
                    state: if c.link_down.load(std::sync::atomic::Ordering::Relaxed) {
                        "fault".to_string()
                    } else {
                        c.state().to_string()
                    },
                    priority: match c.priority() {
                        0 => r.config.priority,
                        p => p,
                    },
                    configured_priority: r.config.priority,
                    master: c.master().map(|m| m.to_string()),
                    primary: r.primary.to_string(),
                    addresses: r.config.addresses.iter().map(|a| a.to_string()).collect(),
                    transitions: load(&c.transitions),
                    adverts_sent: load(&c.sent),
                    adverts_received: load(&c.received),
                    adverts_accepted: load(&c.accepted),
                    rejected: c
                        .rejected
                        .snapshot()
                        .into_iter()
                        .map(|(reason, n)| (reason.as_str().to_string(), n))
                        .collect(),
                    gratuitous_sent: load(&c.gratuitous_sent),
                    address_errors: load(&c.address_errors),
                    tracked_failed: r.failed.clone(),
                }
            })
            .collect()
    }

    /// Leaves every election cleanly: a master sends priority 0 (its backup takes over after
    /// Skew_Time instead of Master_Down_Interval) and removes its addresses.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for r in self.running {
            if tokio::time::timeout(Duration::from_secs(3), r.task)
                .await
                .is_err()
            {
                warn!(vrrp = %r.config.name, "vrrp instance did not stop within 3 s");
            }
        }
    }
}

/// Tracked services (by name) with no real that is up and weighted above 0.
fn failed_services(
    tracked: &[String],
    cfg: &Config,
    health: &HashMap<RealId, Health>,
) -> Vec<String> {
    tracked
        .iter()
        .filter(|name| match cfg.service(name) {
            Some(s) => !s.reals.iter().any(|r| {
                r.weight > 0
                    && health
                        .get(&(s.name.clone(), r.address))
                        .is_none_or(|h| h.up)
            }),
            // A service removed by a reload no longer counts against the instance.
            None => false,
        })
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let text = r#"
            [director]
            interface = "eth0"
            [[service]]
            name = "web"
            address = "198.18.0.100:80"
            [[service.real]]
            address = "198.18.0.11:80"
            [[service.real]]
            address = "198.18.0.12:80"
            weight = 0
            [[vrrp]]
            name = "front"
            interface = "eth0"
            virtual_router_id = 51
            priority = 150
            addresses = ["198.18.0.100/32"]
            track_services = ["web"]
        "#;
        Config::parse(text, std::path::Path::new("t.toml")).unwrap()
    }

    fn down() -> Health {
        Health {
            up: false,
            last_failure: Some("refused".into()),
        }
    }

    #[test]
    fn a_tracked_service_fails_when_no_weighted_real_is_up() {
        let c = cfg();
        let tracked = vec!["web".to_string()];
        let mut h = HashMap::new();
        assert!(failed_services(&tracked, &c, &h).is_empty(), "unknown = up");
        // The weight-0 real being up does not keep the service alive.
        h.insert(("web".into(), "198.18.0.11:80".parse().unwrap()), down());
        assert_eq!(failed_services(&tracked, &c, &h), vec!["web".to_string()]);
        h.insert(
            ("web".into(), "198.18.0.11:80".parse().unwrap()),
            Health {
                up: true,
                last_failure: None,
            },
        );
        assert!(failed_services(&tracked, &c, &h).is_empty());
        assert!(failed_services(&["gone".to_string()], &c, &h).is_empty());
    }

    #[test]
    fn vrrp_tables_are_part_of_the_config() {
        let c = cfg();
        assert_eq!(c.vrrp.len(), 1);
        assert_eq!(c.vrrp[0].track_services, vec!["web".to_string()]);
        let listed = Vrrp::listed(&c.vrrp);
        assert!(listed.contains(&"198.18.0.100".parse::<IpAddr>().unwrap()));
    }

    #[test]
    fn a_vrrp_error_names_file_line_and_key() {
        let text = "[director]\ninterface = \"eth0\"\n[[vrrp]]\nname = \"front\"\ninterface = \"eth0\"\nvirtual_router_id = 300\npriority = 150\naddresses = [\"198.18.0.100/32\"]\n";
        let e = Config::parse(text, std::path::Path::new("/etc/xdpvs.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/xdpvs.toml:6"), "{e}");
        assert!(e.contains("vrrp[0].virtual_router_id"), "{e}");
    }
}
