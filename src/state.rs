//! The effective state: what the dataplane should hold right now.
//!
//! Three inputs decide each real's effective weight, and they meet only here: the configured
//! weight (from the validated [`Config`]), the real's health, and an operator's runtime override
//! (`xdpvs weight` / `xdpvs drain`). The result, [`Desired`], is one immutable snapshot; the
//! dataplane programmer diffs it into the maps.

use std::collections::HashMap;
use std::net::SocketAddr;

use xdpvs_common::{fwd_kind, sched_kind, Addr, ServiceKey, FAMILY_V4, FAMILY_V6};

use crate::config::{Config, Forwarding, OnFailure, OnRemove, Protocol, Scheduler, Timeouts};

/// Identifies a real within a service: (service name, real address).
pub type RealId = (String, SocketAddr);

/// An operator's runtime change to one real; lasts until the next reload or restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Override {
    /// Use this weight instead of the configured one.
    Weight(u32),
    /// Weight 0: no new connections, open ones continue.
    Drain,
}

/// A real's health as the checkers last reported it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    pub up: bool,
    pub last_failure: Option<String>,
}

/// Everything besides the config that shapes the effective state.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    pub health: HashMap<RealId, Health>,
    pub overrides: HashMap<RealId, Override>,
    /// VIPs this director does not own right now (held by VRRP instances that are not
    /// master). A VIP no VRRP instance lists is always owned.
    pub standby_vips: std::collections::HashSet<std::net::IpAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    pub services: Vec<DesiredService>,
    pub timeouts: Timeouts,
    /// A sync peer is configured: the dataplane reports connection events.
    pub sync: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DesiredService {
    pub name: String,
    pub address: SocketAddr,
    pub key: ServiceKey,
    pub sched: u8,
    pub fwd: u8,
    pub fallback: Option<SocketAddr>,
    /// Persistence: (template timeout in seconds, client prefix length); `None` = off.
    pub persist: Option<(u32, u8)>,
    /// Reals in configuration order.
    pub reals: Vec<DesiredReal>,
    /// Cut a removed real's connections at once instead of letting them drain.
    pub cut_on_remove: bool,
    /// Its VIP belongs to a VRRP instance that is not master here: the dataplane drops its
    /// packets but keeps its connection entries for a takeover.
    pub standby: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DesiredReal {
    pub address: SocketAddr,
    /// Effective weight; ignored when `cut`.
    pub weight: u32,
    /// Out of the table with its connections cut (failed check with `on_failure = "remove"`).
    pub cut: bool,
}

/// The one place that decides a real's effective weight; `None` = not in the table at all.
pub fn effective_weight(
    configured: u32,
    health: Option<&Health>,
    on_failure: OnFailure,
    admin: Option<Override>,
) -> Option<u32> {
    let base = match admin {
        Some(Override::Weight(w)) => w,
        Some(Override::Drain) => 0,
        None => configured,
    };
    match health {
        Some(h) if !h.up => match on_failure {
            OnFailure::Quiesce => Some(0),
            OnFailure::Remove => None,
        },
        _ => Some(base),
    }
}

/// Builds the effective state from the config and the runtime inputs.
pub fn desired(config: &Config, rt: &Runtime) -> Desired {
    let services = config
        .services
        .iter()
        .map(|s| {
            let reals = s
                .reals
                .iter()
                .map(|r| {
                    let id = (s.name.clone(), r.address);
                    let w = effective_weight(
                        r.weight,
                        rt.health.get(&id),
                        s.on_failure,
                        rt.overrides.get(&id).copied(),
                    );
                    DesiredReal {
                        address: r.address,
                        weight: w.unwrap_or(0),
                        cut: w.is_none(),
                    }
                })
                .collect();
            DesiredService {
                name: s.name.clone(),
                address: s.address,
                key: service_key(s.address, s.protocol),
                sched: sched_code(s.scheduler),
                fwd: match s.forwarding {
                    Forwarding::Dr => fwd_kind::DR,
                    Forwarding::Nat => fwd_kind::NAT,
                },
                fallback: s.fallback,
                persist: s
                    .persistence
                    .map(|p| (p.timeout.as_secs().min(u32::MAX as u64) as u32, p.prefix)),
                reals,
                cut_on_remove: s.on_remove == OnRemove::Cut,
                standby: rt.standby_vips.contains(&s.address.ip()),
            }
        })
        .collect();
    Desired {
        services,
        timeouts: config.director.timeouts,
        sync: config.sync.is_some(),
    }
}

pub fn sched_code(s: Scheduler) -> u8 {
    match s {
        Scheduler::Wlc => sched_kind::WLC,
        Scheduler::Lc => sched_kind::LC,
        Scheduler::Rr => sched_kind::RR,
        Scheduler::Wrr => sched_kind::WRR,
        Scheduler::Sh => sched_kind::SH,
        Scheduler::Mh => sched_kind::MH,
    }
}

pub fn sched_name(code: u8) -> &'static str {
    match code {
        sched_kind::WLC => "wlc",
        sched_kind::LC => "lc",
        sched_kind::RR => "rr",
        sched_kind::WRR => "wrr",
        sched_kind::SH => "sh",
        sched_kind::MH => "mh",
        _ => "?",
    }
}

/// An address as the dataplane stores it (network byte order, IPv4 in the first word).
pub fn addr(ip: std::net::IpAddr) -> (Addr, u8) {
    match ip {
        std::net::IpAddr::V4(v4) => (
            Addr {
                w: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
            },
            FAMILY_V4,
        ),
        std::net::IpAddr::V6(v6) => {
            let o = v6.octets();
            let mut w = [0u32; 4];
            for (i, word) in w.iter_mut().enumerate() {
                *word = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
            }
            (Addr { w }, FAMILY_V6)
        }
    }
}

/// The inverse of [`addr`]: `None` for a family that is neither.
pub fn ip_of(a: &Addr, family: u8) -> Option<std::net::IpAddr> {
    match family {
        FAMILY_V4 => Some(std::net::Ipv4Addr::from(a.w[0].to_ne_bytes()).into()),
        FAMILY_V6 => {
            let mut o = [0u8; 16];
            for (i, word) in a.w.iter().enumerate() {
                o[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
            }
            Some(std::net::Ipv6Addr::from(o).into())
        }
        _ => None,
    }
}

pub fn service_key(address: SocketAddr, protocol: Protocol) -> ServiceKey {
    let (a, family) = addr(address.ip());
    ServiceKey {
        addr: a,
        port: address.port().to_be(),
        proto: match protocol {
            Protocol::Tcp => xdpvs_common::PROTO_TCP,
            Protocol::Udp => xdpvs_common::PROTO_UDP,
        },
        family,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> Health {
        Health {
            up: false,
            last_failure: Some("connection refused".into()),
        }
    }

    #[test]
    fn configured_weight_when_healthy() {
        let up = Health {
            up: true,
            last_failure: None,
        };
        assert_eq!(effective_weight(3, None, OnFailure::Quiesce, None), Some(3));
        assert_eq!(
            effective_weight(3, Some(&up), OnFailure::Remove, None),
            Some(3)
        );
    }

    #[test]
    fn failure_quiesces_or_removes() {
        assert_eq!(
            effective_weight(3, Some(&down()), OnFailure::Quiesce, None),
            Some(0)
        );
        assert_eq!(
            effective_weight(3, Some(&down()), OnFailure::Remove, None),
            None
        );
    }

    #[test]
    fn overrides_replace_configured_weight_but_not_health() {
        assert_eq!(
            effective_weight(3, None, OnFailure::Quiesce, Some(Override::Weight(7))),
            Some(7)
        );
        assert_eq!(
            effective_weight(3, None, OnFailure::Quiesce, Some(Override::Drain)),
            Some(0)
        );
        assert_eq!(
            effective_weight(
                3,
                Some(&down()),
                OnFailure::Quiesce,
                Some(Override::Weight(7))
            ),
            Some(0)
        );
    }

    #[test]
    fn ipv4_key_is_network_order() {
        let k = service_key("198.18.0.100:80".parse().unwrap(), Protocol::Tcp);
        assert_eq!(k.addr.w[0].to_ne_bytes(), [198, 18, 0, 100]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
        assert_eq!(k.family, FAMILY_V4);
    }
}
