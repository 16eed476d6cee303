//! `[[vrrp]]` tables: the raw serde form and its validation into [`VrrpConfig`].
//!
//! Kept apart from `src/config/` so the HA pieces can be built and tested before the daemon takes
//! them; `config::parse` deserializes `vrrp: Vec<Spanned<RawVrrp>>` next to its own tables and
//! calls [`validate`], turning a [`VrrpConfigError`]'s span into line and column as it does for
//! its own errors. Messages follow the same rule: the key path, the value and what is wrong.

use serde::Deserialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::Range;
use std::time::Duration;
use toml::Spanned;

use super::vrrp::packet::{Family, MAX_ADVER_INT_CS};

/// Linux `IFNAMSIZ` minus the NUL.
/// Longest `preempt_delay` accepted: more is almost surely a typo.
const MAX_PREEMPT_DELAY: Duration = Duration::from_secs(3600);

/// One `[[vrrp]]` table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVrrp {
    name: Option<Spanned<String>>,
    interface: Option<Spanned<String>>,
    virtual_router_id: Option<Spanned<i64>>,
    priority: Option<Spanned<i64>>,
    advert_interval: Option<Spanned<String>>,
    preempt: Option<bool>,
    preempt_delay: Option<Spanned<String>>,
    addresses: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    track_services: Vec<Spanned<String>>,
}

/// A virtual address with its prefix length, as it is added to the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VirtualAddress {
    pub ip: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for VirtualAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix)
    }
}

/// One validated VRRP instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VrrpConfig {
    pub name: String,
    pub interface: String,
    pub virtual_router_id: u8,
    /// 1..=255; 255 = address owner.
    pub priority: u8,
    /// A whole number of centiseconds, 10 ms..=40.95 s.
    pub advert_interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// 1..=255, all of one family.
    pub addresses: Vec<VirtualAddress>,
    /// Services (by name) whose health lowers this instance's priority.
    pub track_services: Vec<String>,
}

impl VrrpConfig {
    pub fn family(&self) -> Family {
        // Validation guarantees at least one address, all of one family.
        self.addresses
            .first()
            .map_or(Family::V4, |a| Family::of(&a.ip))
    }

    /// Advertisement_Interval in centiseconds, as it goes on the wire.
    pub fn advert_interval_cs(&self) -> u16 {
        (self.advert_interval.as_millis() / 10) as u16
    }
}

/// A rejected `[[vrrp]]` value: where (byte span in the file) and which key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct VrrpConfigError {
    /// Byte range of the offending value or table in the file text.
    pub span: Option<Range<usize>>,
    /// Dotted key such as `vrrp[0].priority`.
    pub key: String,
    pub message: String,
}

fn err<T>(span: Range<usize>, key: String, message: String) -> Result<T, VrrpConfigError> {
    Err(VrrpConfigError {
        span: Some(span),
        key,
        message,
    })
}

/// Validates every `[[vrrp]]` table; `services` are the configured service names (for
/// `track_services`).
pub fn validate(
    raw: &[Spanned<RawVrrp>],
    services: &[&str],
) -> Result<Vec<VrrpConfig>, VrrpConfigError> {
    let mut out: Vec<VrrpConfig> = Vec::with_capacity(raw.len());
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut routers: HashMap<(String, u8, Family), usize> = HashMap::new();
    for (i, r) in raw.iter().enumerate() {
        let prefix = format!("vrrp[{i}]");
        let c = one(r, &prefix, services)?;
        if let Some(&first) = names.get(&c.name) {
            let span = r.get_ref().name.as_ref().map_or(r.span(), Spanned::span);
            return err(
                span,
                format!("{prefix}.name"),
                format!(
                    "duplicate vrrp name \"{}\" (first used by vrrp[{first}])",
                    c.name
                ),
            );
        }
        names.insert(c.name.clone(), i);
        let router = (c.interface.clone(), c.virtual_router_id, c.family());
        if let Some(&first) = routers.get(&router) {
            let span = r
                .get_ref()
                .virtual_router_id
                .as_ref()
                .map_or(r.span(), Spanned::span);
            let fam = if c.family() == Family::V4 {
                "IPv4"
            } else {
                "IPv6"
            };
            return err(
                span,
                format!("{prefix}.virtual_router_id"),
                format!(
                    "virtual router {} ({fam}) on {} is already vrrp[{first}] \"{}\"",
                    c.virtual_router_id, c.interface, out[first].name
                ),
            );
        }
        routers.insert(router, i);
        out.push(c);
    }
    Ok(out)
}

fn one(
    r: &Spanned<RawVrrp>,
    prefix: &str,
    services: &[&str],
) -> Result<VrrpConfig, VrrpConfigError> {
    let table = r.span();
    let r = r.get_ref();
    let key = |k: &str| format!("{prefix}.{k}");

    let Some(name) = &r.name else {
        return err(table, key("name"), "missing required key `name`".into());
    };
    let n = name.get_ref();
    if n.is_empty()
        || n.len() > 64
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return err(
            name.span(),
            key("name"),
            format!("\"{n}\" is not a valid vrrp name (1..=64 characters of A-Z a-z 0-9 _ . -)"),
        );
    }

    let Some(interface) = &r.interface else {
        return err(
            table,
            key("interface"),
            format!("missing required key `interface` (where vrrp \"{n}\" advertises)"),
        );
    };
    let ifname = interface.get_ref();
    if !crate::config::valid_interface_name(ifname) {
        return err(
            interface.span(),
            key("interface"),
            format!(
                "\"{ifname}\" is not a valid interface name (1..={} characters, no '/', ':' or spaces)",
                crate::config::MAX_IFNAME
            ),
        );
    }

    let Some(vrid) = &r.virtual_router_id else {
        return err(
            table,
            key("virtual_router_id"),
            format!("missing required key `virtual_router_id` (1..=255) of vrrp \"{n}\""),
        );
    };
    let virtual_router_id = int(vrid, &key("virtual_router_id"), 1, 255)? as u8;

    let priority = match &r.priority {
        None => 100,
        Some(p) => int(p, &key("priority"), 1, 255)? as u8,
    };

    let advert_interval = match &r.advert_interval {
        None => Duration::from_secs(1),
        Some(v) => {
            let d = duration(v, &key("advert_interval"))?;
            let max = Duration::from_millis(u64::from(MAX_ADVER_INT_CS) * 10);
            if !d.as_nanos().is_multiple_of(10_000_000) {
                return err(
                    v.span(),
                    key("advert_interval"),
                    format!(
                        "\"{}\" is not a whole number of centiseconds (VRRPv3 counts in 10 ms steps)",
                        v.get_ref()
                    ),
                );
            }
            if d < Duration::from_millis(10) || d > max {
                return err(
                    v.span(),
                    key("advert_interval"),
                    format!("\"{}\" is out of range (10ms..=40.95s)", v.get_ref()),
                );
            }
            d
        }
    };

    let preempt_delay = match &r.preempt_delay {
        None => Duration::ZERO,
        Some(v) => {
            let d = duration(v, &key("preempt_delay"))?;
            if d > MAX_PREEMPT_DELAY {
                return err(
                    v.span(),
                    key("preempt_delay"),
                    format!("\"{}\" is longer than the maximum of 1h", v.get_ref()),
                );
            }
            d
        }
    };
    let preempt = r.preempt.unwrap_or(true);
    if !preempt {
        if let Some(v) = &r.preempt_delay {
            return err(
                v.span(),
                key("preempt_delay"),
                "has no effect with `preempt = false`".into(),
            );
        }
    }

    let Some(addrs) = &r.addresses else {
        return err(
            table,
            key("addresses"),
            format!("missing required key `addresses` (the virtual addresses of vrrp \"{n}\")"),
        );
    };
    let list = addrs.get_ref();
    if list.is_empty() || list.len() > 255 {
        return err(
            addrs.span(),
            key("addresses"),
            format!("has {} addresses; a virtual router has 1..=255", list.len()),
        );
    }
    let mut addresses: Vec<VirtualAddress> = Vec::with_capacity(list.len());
    for (j, a) in list.iter().enumerate() {
        let k = format!("{prefix}.addresses[{j}]");
        let va = virtual_address(a, &k)?;
        if let Some(first) = addresses.first() {
            if Family::of(&first.ip) != Family::of(&va.ip) {
                return err(
                    a.span(),
                    k,
                    format!(
                        "{} is not of the same family as {}; one vrrp instance is IPv4 or IPv6 (use two instances)",
                        va.ip, first.ip
                    ),
                );
            }
        }
        if let Some(dup) = addresses.iter().position(|x| x.ip == va.ip) {
            return err(
                a.span(),
                k,
                format!("{} is listed twice (also addresses[{dup}])", va.ip),
            );
        }
        addresses.push(va);
    }

    let mut track_services = Vec::with_capacity(r.track_services.len());
    for (j, s) in r.track_services.iter().enumerate() {
        let k = format!("{prefix}.track_services[{j}]");
        let name = s.get_ref();
        if !services.contains(&name.as_str()) {
            return err(s.span(), k, format!("no service is named \"{name}\""));
        }
        if track_services.contains(name) {
            return err(s.span(), k, format!("\"{name}\" is listed twice"));
        }
        track_services.push(name.clone());
    }

    Ok(VrrpConfig {
        name: n.clone(),
        interface: ifname.clone(),
        virtual_router_id,
        priority,
        advert_interval,
        preempt,
        preempt_delay,
        addresses,
        track_services,
    })
}

fn int(v: &Spanned<i64>, key: &str, min: i64, max: i64) -> Result<i64, VrrpConfigError> {
    let n = *v.get_ref();
    if n < min || n > max {
        return err(
            v.span(),
            key.to_string(),
            format!("{n} is out of range ({min}..={max})"),
        );
    }
    Ok(n)
}

fn virtual_address(v: &Spanned<String>, key: &str) -> Result<VirtualAddress, VrrpConfigError> {
    let s = v.get_ref();
    let (ip_text, prefix_text) = match s.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (s.as_str(), None),
    };
    let Ok(ip) = ip_text.parse::<IpAddr>() else {
        return err(
            v.span(),
            key.to_string(),
            format!("\"{s}\" is not an address (expected IP or IP/PREFIX, e.g. 198.18.0.100/32)"),
        );
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_text {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max => n,
            _ => {
                return err(
                    v.span(),
                    key.to_string(),
                    format!("\"{s}\" has an invalid prefix length (0..={max})"),
                )
            }
        },
    };
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || is_broadcast(ip) {
        return err(
            v.span(),
            key.to_string(),
            format!(
                "{ip} cannot be a virtual address (unspecified, loopback, multicast or broadcast)"
            ),
        );
    }
    Ok(VirtualAddress { ip, prefix })
}

fn is_broadcast(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

/// `"100ms"`, `"1s"`, `"1.5s"`, `"2m"`, `"1h"`: the duration syntax of the rest of the config.
fn duration(v: &Spanned<String>, key: &str) -> Result<Duration, VrrpConfigError> {
    crate::config::parse_duration(v.get_ref()).or_else(|m| err(v.span(), key.to_string(), m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct File {
        vrrp: Vec<Spanned<RawVrrp>>,
    }

    const BASE: &str = "name = \"front\"\ninterface = \"eth0\"\nvirtual_router_id = 51\naddresses = [\"198.18.0.100/32\"]\n";

    fn parse(text: &str) -> Result<Vec<VrrpConfig>, VrrpConfigError> {
        let f: File = toml::from_str(text).expect("toml");
        validate(&f.vrrp, &["web", "dns"])
    }

    fn one(extra: &str) -> Result<VrrpConfig, VrrpConfigError> {
        parse(&format!("[[vrrp]]\n{BASE}{extra}")).map(|mut v| v.remove(0))
    }

    /// Expects an error on `key` whose message contains `msg` and whose span covers `at`.
    fn expect_err(text: &str, key: &str, msg: &str, at: &str) {
        let e = parse(text).expect_err("should fail");
        assert_eq!(e.key, key, "{e}");
        assert!(
            e.message.contains(msg),
            "message {:?} lacks {msg:?}",
            e.message
        );
        let span = e.span.expect("span");
        assert!(text[span].contains(at), "span does not cover {at:?}");
    }

    #[test]
    fn defaults() {
        let c = one("").unwrap();
        assert_eq!(c.name, "front");
        assert_eq!(c.virtual_router_id, 51);
        assert_eq!(c.priority, 100);
        assert_eq!(c.advert_interval, Duration::from_secs(1));
        assert_eq!(c.advert_interval_cs(), 100);
        assert!(c.preempt);
        assert_eq!(c.preempt_delay, Duration::ZERO);
        assert_eq!(
            c.addresses,
            vec![VirtualAddress {
                ip: "198.18.0.100".parse().unwrap(),
                prefix: 32
            }]
        );
        assert_eq!(c.family(), Family::V4);
    }

    #[test]
    fn the_issue_example() {
        let c = one("priority = 150\nadvert_interval = \"100ms\"\npreempt = true\npreempt_delay = \"2.5s\"\ntrack_services = [\"web\"]\n").unwrap();
        assert_eq!(c.priority, 150);
        assert_eq!(c.advert_interval_cs(), 10);
        assert_eq!(c.preempt_delay, Duration::from_millis(2500));
        assert_eq!(c.track_services, vec!["web".to_string()]);
    }

    #[test]
    fn ipv6_without_prefix_is_a_host_address() {
        let text = "[[vrrp]]\nname = \"v6\"\ninterface = \"eth0\"\nvirtual_router_id = 7\naddresses = [\"2001:2::100\", \"2001:2::101/64\"]\n";
        let c = parse(text).unwrap().remove(0);
        assert_eq!(c.family(), Family::V6);
        assert_eq!(c.addresses[0].prefix, 128);
        assert_eq!(c.addresses[1].prefix, 64);
    }

    #[test]
    fn errors_name_key_value_and_reason() {
        let t = |extra: &str| format!("[[vrrp]]\n{BASE}{extra}");
        let cases: Vec<(String, &str, &str, &str)> = vec![
            (t("priority = 0\n"), "vrrp[0].priority", "0 is out of range (1..=255)", "0"),
            (t("priority = 256\n"), "vrrp[0].priority", "256 is out of range", "256"),
            (
                "[[vrrp]]\nname = \"a\"\ninterface = \"eth0\"\nvirtual_router_id = 0\naddresses = [\"198.18.0.100\"]\n".into(),
                "vrrp[0].virtual_router_id",
                "0 is out of range (1..=255)",
                "0",
            ),
            (t("advert_interval = \"15ms\"\n"), "vrrp[0].advert_interval", "not a whole number of centiseconds", "15ms"),
            (t("advert_interval = \"41s\"\n"), "vrrp[0].advert_interval", "out of range (10ms..=40.95s)", "41s"),
            (t("advert_interval = \"1\"\n"), "vrrp[0].advert_interval", "has no unit", "\"1\""),
            (t("preempt = false\npreempt_delay = \"1s\"\n"), "vrrp[0].preempt_delay", "no effect with `preempt = false`", "1s"),
            (t("preempt_delay = \"2h\"\n"), "vrrp[0].preempt_delay", "longer than the maximum of 1h", "2h"),
            (t("track_services = [\"mail\"]\n"), "vrrp[0].track_services[0]", "no service is named \"mail\"", "mail"),
            (t("track_services = [\"web\", \"web\"]\n"), "vrrp[0].track_services[1]", "listed twice", "web"),
            (
                "[[vrrp]]\nname = \"a\"\ninterface = \"eth0\"\nvirtual_router_id = 1\naddresses = [\"198.18.0.100\", \"2001:2::1\"]\n".into(),
                "vrrp[0].addresses[1]",
                "not of the same family as 198.18.0.100",
                "2001:2::1",
            ),
            (
                "[[vrrp]]\nname = \"a\"\ninterface = \"eth0\"\nvirtual_router_id = 1\naddresses = [\"198.18.0.100\", \"198.18.0.100/24\"]\n".into(),
                "vrrp[0].addresses[1]",
                "listed twice (also addresses[0])",
                "198.18.0.100/24",
            ),
            (
                "[[vrrp]]\nname = \"a\"\ninterface = \"eth0\"\nvirtual_router_id = 1\naddresses = [\"198.18.0.100/33\"]\n".into(),
                "vrrp[0].addresses[0]",
                "invalid prefix length (0..=32)",
                "/33",
            ),
            (
                "[[vrrp]]\nname = \"a\"\ninterface = \"eth0\"\nvirtual_router_id = 1\naddresses = [\"224.0.0.18\"]\n".into(),
                "vrrp[0].addresses[0]",
                "cannot be a virtual address",
                "224.0.0.18",
            ),
            (
                "[[vrrp]]\nname = \"a\"\ninterface = \"eth0\"\nvirtual_router_id = 1\naddresses = []\n".into(),
                "vrrp[0].addresses",
                "has 0 addresses; a virtual router has 1..=255",
                "[]",
            ),
            (
                "[[vrrp]]\nname = \"a\"\ninterface = \"eth0\"\nvirtual_router_id = 1\n".into(),
                "vrrp[0].addresses",
                "missing required key `addresses`",
                "name",
            ),
            (
                "[[vrrp]]\nname = \"a b\"\ninterface = \"eth0\"\nvirtual_router_id = 1\naddresses = [\"198.18.0.100\"]\n".into(),
                "vrrp[0].name",
                "not a valid vrrp name",
                "a b",
            ),
            (
                "[[vrrp]]\nname = \"a\"\ninterface = \"eth0/1\"\nvirtual_router_id = 1\naddresses = [\"198.18.0.100\"]\n".into(),
                "vrrp[0].interface",
                "not a valid interface name",
                "eth0/1",
            ),
            (
                format!("[[vrrp]]\n{BASE}[[vrrp]]\n{BASE}"),
                "vrrp[1].name",
                "duplicate vrrp name \"front\" (first used by vrrp[0])",
                "front",
            ),
            (
                format!("[[vrrp]]\n{BASE}[[vrrp]]\n{}", BASE.replace("front", "other")),
                "vrrp[1].virtual_router_id",
                "virtual router 51 (IPv4) on eth0 is already vrrp[0] \"front\"",
                "51",
            ),
        ];
        for (text, key, msg, at) in cases {
            expect_err(&text, key, msg, at);
        }
    }

    #[test]
    fn same_vrid_for_both_families_or_other_interfaces_is_fine() {
        let v6 = BASE
            .replace("front", "front6")
            .replace("198.18.0.100/32", "2001:2::100");
        let eth1 = BASE.replace("front", "front1").replace("eth0", "eth1");
        let all = parse(&format!("[[vrrp]]\n{BASE}[[vrrp]]\n{v6}[[vrrp]]\n{eth1}")).unwrap();
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = format!("[[vrrp]]\n{BASE}advert_int = 1\n");
        assert!(toml::from_str::<File>(&text).is_err());
    }

    #[test]
    fn durations() {
        let s = |t: &str| duration(&Spanned::new(0..0, t.to_string()), "k");
        assert_eq!(s("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(s("0.1s"), Ok(Duration::from_millis(100)));
        assert_eq!(s("1.25s"), Ok(Duration::from_millis(1250)));
        assert_eq!(s("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "s", "1", "1 s", ".5s", "1.s", "1.2.3s", "-1s", "1d"] {
            assert!(s(bad).is_err(), "{bad:?} accepted");
        }
    }
}
