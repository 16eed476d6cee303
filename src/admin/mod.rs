//! The admin socket: how `xdpvs list`, `weight`, `drain`, `enable` and `reload` talk to the
//! running daemon.
//!
//! A Unix stream socket, mode 0600 (root only: it changes what the dataplane does). One JSON
//! request per line, one JSON response per line, then the server closes the connection. This
//! module holds the protocol, the client and the `ipvsadm -Ln`-style rendering of the status;
//! [`server`] the daemon's end of the socket (what each command does is the daemon's
//! [`server::Handler`]).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::state::Override;

pub mod server;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    List,
    /// Set a real's weight until the next reload or restart.
    Weight {
        service: String,
        real: String,
        weight: u32,
    },
    /// Weight 0 until `enable`, the next reload or restart.
    Drain {
        service: String,
        real: String,
    },
    /// Undo `weight`/`drain`: back to the configured weight.
    Enable {
        service: String,
        real: String,
    },
    Reload,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Response {
            ok: true,
            error: None,
            message: Some(message.into()),
            status: None,
        }
    }
    pub fn error(e: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(e.into()),
            message: None,
            status: None,
        }
    }
}

/// The live table, as `list` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub config: String,
    pub services: Vec<ServiceStatus>,
    pub conntrack_entries: u64,
    /// Dataplane packet counters by name (`pass_not_vip`, `tx`, `malformed`, ...).
    pub dataplane: std::collections::BTreeMap<String, u64>,
    /// bpffs directory of the pinned dataplane.
    #[serde(default)]
    pub pin_path: Option<String>,
    /// Set when no daemon answered and the table was read from the pinned maps: says so.
    #[serde(default)]
    pub offline: Option<String>,
    /// VRRP instances (empty without `[[vrrp]]`).
    #[serde(default)]
    pub vrrp: Vec<crate::ha::director::VrrpStatus>,
    /// Connection-state sync with the peer director (`None` without `[sync]`).
    #[serde(default)]
    pub sync: Option<crate::ha::sync::service::SyncStatus>,
    /// Map writes the daemon made since it started (0 when read offline).
    #[serde(default)]
    pub map_writes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceStatus {
    pub name: String,
    pub address: String,
    pub protocol: String,
    pub scheduler: String,
    pub forwarding: String,
    pub fallback: Option<String>,
    pub reals: Vec<RealStatus>,
    /// Client affinity, when the service has `persistence`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence: Option<PersistenceStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PersistenceStatus {
    pub timeout_s: u32,
    /// Client prefix length templates are kept by.
    pub prefix: u8,
    /// Live templates.
    pub templates: u64,
    /// The live templates, soonest to expire last, at most [`TEMPLATES_LISTED`] of them.
    pub list: Vec<TemplateStatus>,
}

/// How many templates a status lists per service (all are counted).
pub const TEMPLATES_LISTED: usize = 1000;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TemplateStatus {
    /// The client network, `198.18.0.0/24` (or one client, `/32`).
    pub client: String,
    pub real: String,
    pub expires_in_s: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RealStatus {
    pub address: String,
    /// Effective weight (what the scheduler uses now).
    pub weight: u32,
    pub configured_weight: u32,
    /// Runtime change by `xdpvs weight`/`drain`, lasting until the next reload.
    pub admin: Option<Override>,
    pub up: bool,
    /// "up", "down", or for reals no longer configured "draining".
    pub health: String,
    pub last_failure: Option<String>,
    /// In the table: takes new connections if its weight is above 0.
    pub in_table: bool,
    /// The fallback (sorry) server of its service.
    pub fallback: bool,
    pub active: u64,
    pub inactive: u64,
    /// New connections scheduled to it since it entered the table.
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// Sends one request to the daemon and returns its response.
pub fn call(socket: &Path, req: &Request) -> Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the admin socket {} (is `xdpvs run` running, and are you root?)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut resp = String::new();
    reader.read_line(&mut resp)?;
    if resp.is_empty() {
        bail!("the daemon closed the admin connection without answering");
    }
    serde_json::from_str(&resp).context("reading the daemon's answer")
}

fn proto_upper(p: &str) -> String {
    p.to_ascii_uppercase()
}

fn forward_name(f: &str) -> &str {
    match f {
        "dr" => "Route",
        "nat" => "Masq",
        "tunnel" => "Tunnel",
        other => other,
    }
}

/// Renders the status like `ipvsadm -Ln`, with health columns added.
/// The persistence templates, like `ipvsadm -Lnc` lists them (templates only).
pub fn render_templates(status: &Status) -> String {
    let mut out = String::from("Persistence templates\n");
    out.push_str(&format!(
        "{:<4} {:<28} {:<24} {:<28} {:>8}\n",
        "Prot", "LocalAddress:Port", "Client", "RealAddress:Port", "Expires"
    ));
    for s in &status.services {
        let Some(p) = &s.persistence else { continue };
        for t in &p.list {
            out.push_str(&format!(
                "{:<4} {:<28} {:<24} {:<28} {:>5}:{:02}\n",
                proto_upper(&s.protocol),
                s.address,
                t.client,
                t.real,
                t.expires_in_s / 60,
                t.expires_in_s % 60
            ));
        }
        if p.templates > p.list.len() as u64 {
            out.push_str(&format!(
                "     ({} more templates of {} not listed)\n",
                p.templates - p.list.len() as u64,
                s.address
            ));
        }
    }
    out
}

pub fn render(status: &Status) -> String {
    let mut out = String::new();
    if let Some(note) = &status.offline {
        out.push_str(&format!("NO DAEMON RUNNING: {note}\n"));
    }
    out.push_str(&format!(
        "IP Virtual Server (xdpvs {}), config {}\n",
        status.version, status.config
    ));
    out.push_str("Prot LocalAddress:Port Scheduler Flags\n");
    out.push_str(&format!(
        "  -> {:<28} {:<7} {:>6} {:>10} {:>10} {:<9} {}\n",
        "RemoteAddress:Port", "Forward", "Weight", "ActiveConn", "InActConn", "Health", "Note"
    ));
    for s in &status.services {
        let persistent = s
            .persistence
            .as_ref()
            .map(|p| format!(" persistent {} mask /{}", p.timeout_s, p.prefix))
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<4} {} {}{persistent}\n",
            proto_upper(&s.protocol),
            s.address,
            s.scheduler
        ));
        for r in &s.reals {
            let mut notes = Vec::new();
            if r.fallback {
                notes.push("fallback".to_string());
            }
            match r.admin {
                Some(Override::Drain) => notes.push("drained by admin".to_string()),
                Some(Override::Weight(w)) => notes.push(format!("weight {w} set by admin")),
                None => {}
            }
            if r.weight != r.configured_weight && r.admin.is_none() && !r.fallback {
                notes.push(format!("configured weight {}", r.configured_weight));
            }
            if !r.in_table && !r.fallback {
                notes.push("out of table".to_string());
            }
            if let Some(f) = &r.last_failure {
                notes.push(format!("last failure: {f}"));
            }
            out.push_str(&format!(
                "  -> {:<28} {:<7} {:>6} {:>10} {:>10} {:<9} {}\n",
                r.address,
                forward_name(&s.forwarding),
                r.weight,
                r.active,
                r.inactive,
                r.health,
                notes.join("; ")
            ));
        }
    }
    out.push_str(&format!(
        "Connections tracked: {}\n",
        status.conntrack_entries
    ));
    for v in &status.vrrp {
        let mut notes = Vec::new();
        if v.priority != v.configured_priority {
            notes.push(format!(
                "configured priority {}; tracked service without a healthy real: {}",
                v.configured_priority,
                v.tracked_failed.join(", ")
            ));
        }
        let rejected: u64 = v.rejected.values().sum();
        if rejected > 0 {
            let reasons: Vec<String> = v
                .rejected
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(r, n)| format!("{r}={n}"))
                .collect();
            notes.push(format!("adverts dropped: {}", reasons.join(" ")));
        }
        out.push_str(&format!(
            "VRRP {} ({} vrid {}): {} priority {} master {} addresses {} transitions {}{}\n",
            v.name,
            v.interface,
            v.virtual_router_id,
            v.state.to_uppercase(),
            v.priority,
            v.master.as_deref().unwrap_or("unknown"),
            v.addresses.join(","),
            v.transitions,
            if notes.is_empty() {
                String::new()
            } else {
                format!("; {}", notes.join("; "))
            }
        ));
    }
    if let Some(y) = &status.sync {
        let heard = match y.peer_last_heard_ms {
            Some(ms) => format!("heard {ms} ms ago"),
            None => "never heard".to_string(),
        };
        let rejected: Vec<String> = y
            .rejected
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        out.push_str(&format!(
            "Sync with {} ({heard}): sent {} events, received {} (installed {}, updated {}, retired {}){}{}\n",
            y.peer,
            y.sent_events,
            y.received_events,
            y.installed,
            y.updated,
            y.retired,
            if y.lost > 0 {
                format!("; lost {}", y.lost)
            } else {
                String::new()
            },
            if rejected.is_empty() {
                String::new()
            } else {
                format!("; rejected {}", rejected.join(" "))
            }
        ));
    }
    // Packet counters that are not zero: drops and malformed frames show up here first.
    let counters: Vec<String> = status
        .dataplane
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !counters.is_empty() {
        out.push_str(&format!("Dataplane packets: {}\n", counters.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_json_lines() {
        let r = Request::Weight {
            service: "web".into(),
            real: "198.18.0.11:80".into(),
            weight: 3,
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"cmd":"weight","service":"web","real":"198.18.0.11:80","weight":3}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"list"}"#).unwrap(),
            Request::List
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"rm -rf"}"#).is_err());
    }

    #[test]
    fn render_looks_like_ipvsadm() {
        let st = Status {
            version: "0.1.0".into(),
            config: "/etc/xdpvs.toml".into(),
            services: vec![ServiceStatus {
                name: "web".into(),
                address: "198.18.0.100:80".into(),
                protocol: "tcp".into(),
                scheduler: "wlc".into(),
                forwarding: "dr".into(),
                fallback: None,
                reals: vec![RealStatus {
                    address: "198.18.0.11:80".into(),
                    weight: 0,
                    configured_weight: 2,
                    up: false,
                    health: "down".into(),
                    last_failure: Some("connection refused".into()),
                    in_table: true,
                    active: 10,
                    inactive: 3,
                    ..Default::default()
                }],
                persistence: None,
            }],
            ..Default::default()
        };
        let text = render(&st);
        assert!(text.contains("TCP  198.18.0.100:80 wlc"), "{text}");
        let line = text.lines().find(|l| l.contains("198.18.0.11:80")).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            &cols[..7],
            &["->", "198.18.0.11:80", "Route", "0", "10", "3", "down"]
        );
        assert!(line.contains("last failure: connection refused"));
        assert!(line.contains("configured weight 2"));
        assert!(text.contains("Connections tracked: 0"));
        assert!(
            !text.contains("Dataplane packets"),
            "zero counters are not shown"
        );
        let mut st = st;
        st.dataplane.insert("malformed".into(), 3);
        st.dataplane.insert("tx".into(), 0);
        assert!(render(&st).contains("Dataplane packets: malformed=3\n"));
        st.services[0].persistence = Some(PersistenceStatus {
            timeout_s: 300,
            prefix: 24,
            templates: 1,
            list: vec![TemplateStatus {
                client: "198.18.0.0/24".into(),
                real: "198.18.0.11:80".into(),
                expires_in_s: 299,
            }],
        });
        assert!(
            render(&st).contains("TCP  198.18.0.100:80 wlc persistent 300 mask /24\n"),
            "ipvsadm's flags column"
        );
        let t = render_templates(&st);
        let row: Vec<&str> = t.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(
            row,
            [
                "TCP",
                "198.18.0.100:80",
                "198.18.0.0/24",
                "198.18.0.11:80",
                "4:59"
            ]
        );
    }
}
