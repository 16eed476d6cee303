//! `ldirectord.cf` (see ldirectord(8)) to xdpvs TOML.
//!
//! The file is global `key=value` lines, then `virtual=` blocks whose lines are indented.
//! Everything with an xdpvs equivalent is carried over; everything else becomes a [`Warning`]
//! naming its line, never a silent drop. The output always passes `xdpvs check`: a setting
//! xdpvs would refuse (an IPv6 or fwmark service, a loopback fallback, a port change in direct
//! routing) is left out or adjusted, with a warning saying which.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};

use super::{quote, Import, Warning};

/// Settings of the global section that each `virtual` inherits unless it sets them.
#[derive(Clone, Default)]
struct Defaults {
    checktimeout: Option<String>,
    negotiatetimeout: Option<String>,
    connecttimeout: Option<String>,
    checkinterval: Option<String>,
    failurecount: Option<String>,
    quiescent: Option<bool>,
    fallback: Option<(String, usize)>,
}

/// One `virtual=` block as read.
struct Virtual {
    line: usize,
    address: SocketAddr,
    keys: Vec<(String, String, usize)>,
}

/// Keys ldirectord has that xdpvs has no equivalent for (or does not need): warned about.
const IGNORED_GLOBAL: &[&str] = &[
    "logfile",
    "emailalert",
    "emailalertfreq",
    "emailalertstatus",
    "emailalertfrom",
    "callback",
    "supervised",
    "fork",
    "cleanstop",
    "readdquiescent",
    "maintenancedir",
    "smtp",
    "execute",
];

fn seconds(v: &str) -> Option<String> {
    let n: f64 = v.trim().parse().ok()?;
    (n > 0.0 && n < 86_400.0).then(|| {
        if n.fract() == 0.0 {
            format!("{}s", n as u64)
        } else {
            format!("{}ms", (n * 1000.0).round() as u64)
        }
    })
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(v)
        .to_string()
}

/// `a.b.c.d:port`, `a.b.c.d->a.b.c.e:port` (a range) or a bare address; IPv4 only.
fn reals_of(spec: &str, default_port: u16) -> Result<Vec<SocketAddr>, String> {
    let (hosts, port) = match spec.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("\"{p}\" is not a port"))?,
        ),
        None => (spec, default_port),
    };
    let parse = |s: &str| {
        s.parse::<Ipv4Addr>()
            .map_err(|_| format!("\"{s}\" is not an IPv4 address (host names are not resolved)"))
    };
    match hosts.split_once("->") {
        None => Ok(vec![SocketAddr::from((parse(hosts)?, port))]),
        Some((a, b)) => {
            let (a, b) = (u32::from(parse(a)?), u32::from(parse(b)?));
            if b < a || b - a >= 256 {
                return Err(format!(
                    "range {hosts} is empty or longer than 256 addresses"
                ));
            }
            Ok((a..=b)
                .map(|ip| SocketAddr::from((Ipv4Addr::from(ip), port)))
                .collect())
        }
    }
}

/// A name xdpvs accepts (1..=64 of A-Z a-z 0-9 _ . -) from ldirectord's `servicename`, or one
/// made of the address.
fn service_name(given: Option<&str>, address: SocketAddr, taken: &[String]) -> String {
    let base: String = match given {
        Some(g) => g
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .take(56)
            .collect(),
        None => format!("{}_{}", address.ip(), address.port()).replace('.', "_"),
    };
    let base = if base.is_empty() {
        "service".into()
    } else {
        base
    };
    let mut name = base.clone();
    let mut n = 2;
    while taken.contains(&name) {
        name = format!("{base}-{n}");
        n += 1;
    }
    name
}

/// Translates the text of an `ldirectord.cf` (`file` names it in warnings).
pub fn translate(text: &str, file: &str) -> Import {
    let mut warnings = Vec::new();
    let mut warn = |line: usize, message: String| {
        warnings.push(Warning {
            file: file.to_string(),
            line,
            message,
        })
    };
    let mut defaults = Defaults::default();
    let mut watch = false;
    let mut virtuals: Vec<Virtual> = Vec::new();
    // Inside a block we cannot translate (fwmark, IPv6): its lines are skipped, warned once.
    let mut skipping = false;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let indented = raw.starts_with([' ', '\t']);
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let Some((k, v)) = l.split_once('=') else {
            warn(line, format!("\"{l}\" is not key=value: ignored"));
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_string());
        if !indented {
            skipping = false;
        }
        if skipping {
            continue;
        }
        if indented && !virtuals.is_empty() {
            if let Some(vs) = virtuals.last_mut() {
                vs.keys.push((k, v, line));
            }
            continue;
        }
        match k.as_str() {
            "virtual" => match unquote(&v).parse::<SocketAddr>() {
                Ok(a) if a.is_ipv4() => virtuals.push(Virtual {
                    line,
                    address: a,
                    keys: Vec::new(),
                }),
                _ => {
                    skipping = true;
                    warn(
                        line,
                        format!(
                            "virtual={v}: firewall-mark services and host names are not supported; \
                             the block is left out"
                        ),
                    );
                }
            },
            "virtual6" => {
                skipping = true;
                warn(
                    line,
                    format!(
                        "virtual6={v}: IPv6 services are not supported yet; the block is left out"
                    ),
                );
            }
            "checktimeout" => defaults.checktimeout = seconds(&v),
            "negotiatetimeout" => defaults.negotiatetimeout = seconds(&v),
            "connecttimeout" => defaults.connecttimeout = seconds(&v),
            "checkinterval" => defaults.checkinterval = seconds(&v),
            "failurecount" => defaults.failurecount = Some(v.clone()),
            "quiescent" => defaults.quiescent = Some(v.eq_ignore_ascii_case("yes")),
            "fallback" => defaults.fallback = Some((v.clone(), line)),
            "autoreload" => watch = v.eq_ignore_ascii_case("yes"),
            other if IGNORED_GLOBAL.contains(&other) || other == "fallback6" => warn(
                line,
                format!("{other}: not translated (xdpvs logs to stdout and exports metrics)"),
            ),
            other => warn(
                line,
                format!("{other}: unknown global setting, not translated"),
            ),
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Translated from {file} by `xdpvs import ldirectord`; check the warnings it printed.\n"
    );
    let _ = writeln!(
        out,
        "[director]\ninterface = \"eth0\"   # the interface the VIPs arrive on: set it"
    );
    if watch {
        let _ = writeln!(out, "watch_config = true   # ldirectord autoreload=yes");
    }
    warn(
        0,
        "[director] interface is set to \"eth0\": set the interface the VIPs arrive on".into(),
    );
    let mut names: Vec<String> = Vec::new();
    let mut seen: Vec<(SocketAddr, &str, String)> = Vec::new();
    for vs in &virtuals {
        let get = |key: &str| -> Option<(&str, usize)> {
            vs.keys
                .iter()
                .rev()
                .find(|(k, _, _)| k == key)
                .map(|(_, v, l)| (v.as_str(), *l))
        };
        let name = service_name(get("servicename").map(|(v, _)| v), vs.address, &names);
        let mut svc = String::new();
        let _ = writeln!(svc, "\n[[service]]");
        if let Some((c, _)) = get("comment") {
            let _ = writeln!(svc, "# {}", c.replace('\n', " "));
        }
        let _ = writeln!(svc, "name = {}", quote(&name));
        let _ = writeln!(svc, "address = {}", quote(&vs.address.to_string()));
        let protocol = match get("protocol").map(|(v, l)| (v.to_ascii_lowercase(), l)) {
            Some((p, _)) if p == "udp" => "udp",
            Some((p, l)) if p != "tcp" => {
                warn(
                    l,
                    format!("protocol={p}: not supported, the service is left out"),
                );
                continue;
            }
            _ => "tcp",
        };
        if let Some((_, _, first)) = seen.iter().find(|s| (s.0, s.1) == (vs.address, protocol)) {
            warn(
                vs.line,
                format!(
                    "virtual={} {protocol} is already defined (service {first:?}); this block is \
                     left out",
                    vs.address
                ),
            );
            continue;
        }
        seen.push((vs.address, protocol, name.clone()));
        names.push(name.clone());
        let _ = writeln!(svc, "protocol = \"{protocol}\"");
        let scheduler = match get("scheduler") {
            Some((s, _)) if ["rr", "wrr", "lc", "wlc"].contains(&s) => s.to_string(),
            Some((s, l)) => {
                warn(
                    l,
                    format!("scheduler={s}: not supported yet, wlc used instead"),
                );
                "wlc".into()
            }
            None => "wrr".into(), // ldirectord's default
        };
        let _ = writeln!(svc, "scheduler = \"{scheduler}\"");
        match (get("persistent"), get("netmask")) {
            (Some((t, l)), mask) => {
                match super::persistence_lines(t, mask.map(|m| m.0), vs.address.is_ipv6()) {
                    Ok(lines) => svc.push_str(&lines),
                    Err(why) => warn(l, format!("persistent={t}: {why}; not translated")),
                }
            }
            (None, Some((m, l))) => warn(
                l,
                format!("netmask={m} without persistent: nothing to translate"),
            ),
            (None, None) => {}
        }
        // Reals (and their forwarding, which xdpvs sets per service).
        let mut reals: Vec<(SocketAddr, u32)> = Vec::new();
        let mut forwarding: Option<&str> = None;
        for (k, v, l) in vs
            .keys
            .iter()
            .filter(|(k, _, _)| k == "real" || k == "real6")
        {
            if k == "real6" {
                warn(
                    *l,
                    "real6: IPv6 reals are not supported yet, left out".into(),
                );
                continue;
            }
            let mut parts = v.split_whitespace();
            let spec = parts.next().unwrap_or("");
            let method = parts.next().unwrap_or("gate").to_ascii_lowercase();
            let weight = match parts.next() {
                Some(w) => match w.parse::<u32>() {
                    Ok(w) if w <= 65_535 => w,
                    _ => {
                        warn(*l, format!("weight \"{w}\" is not 0..=65535: 1 used"));
                        1
                    }
                },
                None => 1,
            };
            if parts.next().is_some() {
                warn(
                    *l,
                    "a per-real request/receive is not translated: the service's check applies"
                        .into(),
                );
            }
            let fwd = match method.as_str() {
                "gate" => "dr",
                "masq" => "nat",
                m => {
                    warn(
                        *l,
                        format!("forwarding method {m}: not supported here, left out"),
                    );
                    continue;
                }
            };
            match forwarding {
                None => forwarding = Some(fwd),
                Some(f) if f != fwd => {
                    warn(*l, format!("{method}: xdpvs forwards a whole service one way ({f}), this real is left out"));
                    continue;
                }
                Some(_) => {}
            }
            match reals_of(spec, vs.address.port()) {
                Ok(addrs) => {
                    for mut a in addrs {
                        if fwd == "dr" && a.port() != vs.address.port() {
                            warn(
                                *l,
                                format!(
                                    "{a}: direct routing cannot change the port, {} used",
                                    vs.address.port()
                                ),
                            );
                            a.set_port(vs.address.port());
                        }
                        if !reals.iter().any(|(r, _)| *r == a) {
                            reals.push((a, weight));
                        }
                    }
                }
                Err(e) => warn(*l, format!("real={spec}: {e}; left out")),
            }
        }
        let fwd = forwarding.unwrap_or("dr");
        let _ = writeln!(svc, "forwarding = \"{fwd}\"");
        let quiescent = match get("quiescent") {
            Some((v, _)) => v.eq_ignore_ascii_case("yes"),
            None => defaults.quiescent.unwrap_or(true),
        };
        let _ = writeln!(
            svc,
            "on_failure = \"{}\"   # ldirectord quiescent={}",
            if quiescent { "quiesce" } else { "remove" },
            if quiescent { "yes" } else { "no" }
        );
        let fallback = get("fallback")
            .map(|(v, l)| (v.to_string(), l))
            .or(defaults.fallback.clone());
        if let Some((fb, l)) = fallback {
            let spec = fb.split_whitespace().next().unwrap_or("");
            match reals_of(spec, vs.address.port()).ok().and_then(|a| a.first().copied()) {
                Some(a) if a.ip().is_loopback() => warn(
                    l,
                    format!("fallback={spec}: a loopback sorry server cannot be forwarded to by XDP, left out (use a real host)"),
                ),
                Some(a) if fwd == "dr" && a.port() != vs.address.port() => warn(
                    l,
                    format!("fallback={spec}: direct routing cannot change the port, left out"),
                ),
                Some(a) => {
                    let _ = writeln!(svc, "fallback = {}", quote(&a.to_string()));
                }
                None => warn(l, format!("fallback={spec}: not an IPv4 address:port, left out")),
            }
        }
        // The check.
        let service = get("service").map(|(v, _)| v.to_ascii_lowercase());
        let checktype = get("checktype").map(|(v, l)| (v.to_ascii_lowercase(), l));
        let mut check = String::new();
        let kind = match (
            checktype.as_ref().map(|(c, l)| (c.as_str(), *l)),
            service.as_deref(),
        ) {
            (Some(("off", _)), _) => "off",
            (Some(("on", _)), _) => "none",
            (Some(("connect", _)), _) => "tcp",
            (Some(("external", _)), _) => "exec",
            (Some(("ping", l)), _) => {
                warn(
                    l,
                    "checktype=ping: not supported, a TCP connect check instead".into(),
                );
                "tcp"
            }
            (Some((c, l)), _) if c.parse::<u32>().is_ok() => {
                warn(
                    l,
                    format!(
                        "checktype={c} (connect every {c}th check): every check is a negotiate one"
                    ),
                );
                negotiate(service.as_deref())
            }
            (_, s) => {
                let k = negotiate(s);
                if k == "tcp" && checktype.as_ref().is_none_or(|(c, _)| c == "negotiate") {
                    if let Some(s) = s {
                        if s != "none" {
                            warn(vs.line, format!("service={s}: no negotiate check for it here, a TCP connect check instead"));
                        }
                    }
                }
                k
            }
        };
        let _ = writeln!(check, "type = \"{kind}\"");
        if let Some((p, l)) = get("checkport") {
            match p.parse::<u16>() {
                Ok(p) if p > 0 => {
                    let _ = writeln!(check, "port = {p}");
                }
                _ => warn(l, format!("checkport={p}: not a port, not translated")),
            }
        }
        let timeout = get("checktimeout")
            .and_then(|(v, _)| seconds(v))
            .or_else(|| match kind {
                "tcp" => defaults.connecttimeout.clone(),
                "http" | "https" | "dns" => defaults.negotiatetimeout.clone(),
                _ => None,
            })
            .or(defaults.checktimeout.clone());
        let interval = get("checkinterval")
            .and_then(|(v, _)| seconds(v))
            .or(defaults.checkinterval.clone());
        if let Some(t) = timeout {
            let _ = writeln!(check, "timeout = {}", quote(&t));
        }
        if let Some(i) = interval {
            let _ = writeln!(check, "interval = {}", quote(&i));
        }
        if let Some(f) = get("failurecount")
            .map(|(v, _)| v.to_string())
            .or(defaults.failurecount.clone())
        {
            if let Ok(n) = f.parse::<u32>() {
                if (1..=100).contains(&n) {
                    let _ = writeln!(check, "fall = {n}\nrise = 1");
                }
            }
        }
        if matches!(kind, "http" | "https") {
            if let Some((r, _)) = get("request") {
                let r = unquote(r);
                let path = if r.starts_with('/') {
                    r
                } else {
                    format!("/{r}")
                };
                let _ = writeln!(check, "path = {}", quote(&path));
            }
            if let Some((r, _)) = get("receive") {
                let _ = writeln!(
                    check,
                    "expect_body = {}   # a regex, as in ldirectord",
                    quote(&unquote(r))
                );
            }
            if let Some((h, _)) = get("virtualhost") {
                let _ = writeln!(check, "host = {}", quote(&unquote(h)));
            }
            if let Some((m, l)) = get("httpmethod") {
                if !m.eq_ignore_ascii_case("GET") {
                    warn(l, format!("httpmethod={m}: checks use GET"));
                }
            }
        }
        if kind == "dns" {
            if let Some((r, _)) = get("request") {
                let _ = writeln!(check, "dns_query = {}", quote(&unquote(r)));
            }
        }
        if kind == "exec" {
            match get("checkcommand") {
                Some((c, _)) => {
                    let _ = writeln!(check, "command = {}", quote(&unquote(c)));
                }
                None => {
                    warn(
                        vs.line,
                        "checktype=external without checkcommand: a TCP check instead".into(),
                    );
                    check = "type = \"tcp\"\n".into();
                }
            }
        }
        for (k, v, l) in &vs.keys {
            let known = [
                "real",
                "real6",
                "servicename",
                "comment",
                "protocol",
                "scheduler",
                "persistent",
                "netmask",
                "quiescent",
                "fallback",
                "service",
                "checktype",
                "checkport",
                "checktimeout",
                "checkinterval",
                "failurecount",
                "request",
                "receive",
                "virtualhost",
                "httpmethod",
                "checkcommand",
                "negotiatetimeout",
                "connecttimeout",
            ];
            if !known.contains(&k.as_str()) {
                warn(*l, format!("{k}={v}: not translated"));
            } else if ["negotiatetimeout", "connecttimeout"].contains(&k.as_str()) {
                warn(
                    *l,
                    format!("{k}: per-service value not translated (checktimeout is)"),
                );
            }
        }
        if reals.is_empty() {
            warn(
                vs.line,
                format!(
                    "virtual={}: no real could be translated; the service has none",
                    vs.address
                ),
            );
        }
        let _ = write!(svc, "\n[service.check]\n{check}");
        for (a, w) in &reals {
            let _ = write!(
                svc,
                "\n[[service.real]]\naddress = {}\nweight = {w}\n",
                quote(&a.to_string())
            );
        }
        out.push_str(&svc);
    }
    Import {
        toml: out,
        warnings,
    }
}

/// The negotiate check of an ldirectord `service`.
fn negotiate(service: Option<&str>) -> &'static str {
    match service {
        Some("http") => "http",
        Some("https") => "https",
        Some("dns") => "dns",
        Some("none") => "none",
        None => "tcp",
        Some(_) => "tcp",
    }
}
