//! `keepalived.conf` (see keepalived.conf(5)): its `virtual_server` / `real_server` / checker
//! blocks and its `vrrp_instance` blocks to xdpvs TOML. As for ldirectord, whatever has no xdpvs
//! equivalent is a [`Warning`] with its file and line, and the output passes `xdpvs check`.
//!
//! The file is read as keepalived does: `#` and `!` start comments, a block is a keyword line
//! ending in `{` (or followed by a line that is only `{`) closed by `}`, `include FILE` reads
//! another file in place (paths without wildcards, relative to the including file).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use super::{quote, Import, Warning};

/// One statement or block of the file.
#[derive(Debug, Clone)]
struct Node {
    key: String,
    args: Vec<String>,
    file: String,
    line: usize,
    children: Vec<Node>,
    block: bool,
}

impl Node {
    fn child(&self, key: &str) -> Option<&Node> {
        self.children.iter().rev().find(|c| c.key == key)
    }
    fn arg(&self, key: &str) -> Option<&str> {
        self.child(key)
            .and_then(|c| c.args.first())
            .map(String::as_str)
    }
}

fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                if !quoted {
                    out.push(std::mem::take(&mut cur));
                }
            }
            '#' | '!' if !quoted => break,
            '{' | '}' if !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            }
            c if c.is_whitespace() && !quoted => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Reads `text` (from `file`) into a tree, following includes.
fn parse(text: &str, file: &str, depth: usize, warn: &mut Vec<Warning>) -> Vec<Node> {
    // (tokens, line) of the whole file, includes expanded.
    let mut lines: Vec<(Vec<String>, String, usize)> = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let t = tokens(l);
        if t.first().map(String::as_str) == Some("include") {
            let pat = t.get(1).cloned().unwrap_or_default();
            if pat.contains(['*', '?', '[']) || depth > 8 {
                warn.push(Warning {
                    file: file.into(),
                    line: i + 1,
                    message: format!(
                        "include {pat}: wildcards are not followed; include the files one by one"
                    ),
                });
                continue;
            }
            let base = Path::new(file).parent().unwrap_or(Path::new("."));
            let path = base.join(&pat);
            match std::fs::read_to_string(&path) {
                Ok(inner) => {
                    let name = path.display().to_string();
                    for (j, l2) in inner.lines().enumerate() {
                        lines.push((tokens(l2), name.clone(), j + 1));
                    }
                }
                Err(e) => warn.push(Warning {
                    file: file.into(),
                    line: i + 1,
                    message: format!("include {}: {e}", path.display()),
                }),
            }
            continue;
        }
        if !t.is_empty() {
            lines.push((t, file.to_string(), i + 1));
        }
    }
    // A stack of open blocks.
    let mut stack: Vec<Node> = vec![Node {
        key: String::new(),
        args: vec![],
        file: file.into(),
        line: 0,
        children: vec![],
        block: true,
    }];
    for (t, f, line) in lines {
        let mut t = t;
        while !t.is_empty() {
            if t[0] == "}" {
                t.remove(0);
                if stack.len() > 1 {
                    if let Some(done) = stack.pop() {
                        if let Some(top) = stack.last_mut() {
                            top.children.push(done);
                        }
                    }
                }
                continue;
            }
            if t[0] == "{" {
                // A `{` on its own line opens the block of the statement before it.
                t.remove(0);
                if let Some(top) = stack.last_mut() {
                    if let Some(mut prev) = top.children.pop() {
                        prev.block = true;
                        stack.push(prev);
                    }
                }
                continue;
            }
            let open = t.iter().position(|x| x == "{");
            let close = t.iter().position(|x| x == "}");
            let end = match (open, close) {
                (Some(o), Some(c)) => o.min(c),
                (Some(o), None) => o,
                (None, Some(c)) => c,
                (None, None) => t.len(),
            };
            let stmt: Vec<String> = t.drain(..end).collect();
            let node = Node {
                key: stmt[0].clone(),
                args: stmt[1..].to_vec(),
                file: f.clone(),
                line,
                children: vec![],
                block: false,
            };
            if t.first().map(String::as_str) == Some("{") {
                t.remove(0);
                let mut n = node;
                n.block = true;
                stack.push(n);
            } else if let Some(top) = stack.last_mut() {
                top.children.push(node);
            }
        }
    }
    while stack.len() > 1 {
        if let Some(done) = stack.pop() {
            if let Some(top) = stack.last_mut() {
                top.children.push(done);
            }
        }
    }
    stack.pop().map(|r| r.children).unwrap_or_default()
}

fn secs(v: &str) -> Option<String> {
    let n: f64 = v.parse().ok()?;
    (n > 0.0 && n < 86_400.0).then(|| {
        if n.fract() == 0.0 {
            format!("{}s", n as u64)
        } else {
            format!("{}ms", (n * 1000.0).round() as u64)
        }
    })
}

fn name_of(s: &str) -> String {
    let n: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    if n.is_empty() {
        "service".into()
    } else {
        n
    }
}

/// A real_server's check as xdpvs TOML lines (no table header), or None if it has none.
fn check_of(
    rs: &Node,
    delay_loop: Option<&str>,
    vhost: Option<&str>,
    w: &mut dyn FnMut(&Node, String),
) -> String {
    let mut c = String::new();
    let checkers = [
        "TCP_CHECK",
        "HTTP_GET",
        "SSL_GET",
        "MISC_CHECK",
        "DNS_CHECK",
        "SMTP_CHECK",
        "PING_CHECK",
        "UDP_CHECK",
        "BFD_CHECK",
        "FILE_CHECK",
    ];
    let found: Vec<&Node> = rs
        .children
        .iter()
        .filter(|n| checkers.contains(&n.key.as_str()))
        .collect();
    let Some(ch) = found.first() else {
        let _ = writeln!(
            c,
            "type = \"none\"   # keepalived: a real_server without a checker is always up"
        );
        return c;
    };
    for extra in found.iter().skip(1) {
        w(
            extra,
            format!(
                "{}: one check per real here; only {} is translated",
                extra.key, ch.key
            ),
        );
    }
    let kind = match ch.key.as_str() {
        "TCP_CHECK" => "tcp",
        "HTTP_GET" => "http",
        "SSL_GET" => "https",
        "MISC_CHECK" => "exec",
        "DNS_CHECK" => "dns",
        other => {
            w(
                ch,
                format!("{other}: not supported, a TCP connect check instead"),
            );
            "tcp"
        }
    };
    let _ = writeln!(c, "type = \"{kind}\"");
    if let Some(p) = ch.arg("connect_port").and_then(|p| p.parse::<u16>().ok()) {
        let _ = writeln!(c, "port = {p}");
    }
    let timeout = ch
        .arg("connect_timeout")
        .or(ch.arg("misc_timeout"))
        .and_then(secs);
    if let Some(t) = timeout {
        let _ = writeln!(c, "timeout = {}", quote(&t));
    }
    let interval = ch.arg("delay_loop").or(delay_loop).and_then(secs);
    if let Some(i) = interval {
        let _ = writeln!(c, "interval = {}", quote(&i));
    }
    if let Some(r) = ch
        .arg("retry")
        .or(ch.arg("nb_get_retry"))
        .and_then(|r| r.parse::<u32>().ok())
    {
        // keepalived retries `retry` times before failing: fall = retry + 1.
        let _ = writeln!(c, "fall = {}", (r + 1).min(100));
    }
    if let Some(n) = ch.child("delay_before_retry") {
        w(n, "delay_before_retry: checks keep their interval".into());
    }
    match kind {
        "http" | "https" => {
            let urls: Vec<&Node> = ch.children.iter().filter(|n| n.key == "url").collect();
            if let Some(u) = urls.first() {
                if let Some(p) = u.arg("path") {
                    let _ = writeln!(c, "path = {}", quote(p));
                }
                if let Some(s) = u.arg("status_code") {
                    let codes: Vec<String> = u
                        .child("status_code")
                        .map(|n| n.args.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|x| x.parse::<u16>().is_ok())
                        .collect();
                    if !codes.is_empty() {
                        let _ = writeln!(c, "expect_status = [{}]", codes.join(", "));
                    } else {
                        w(u, format!("status_code {s}: ranges are not translated"));
                    }
                }
                if let Some(d) = u.child("digest") {
                    w(
                        d,
                        "digest: an MD5 of the body is not checked (use expect_body)".into(),
                    );
                }
                for extra in urls.iter().skip(1) {
                    w(extra, "url: only the first url is checked".into());
                }
            }
            if let Some(h) = ch.arg("virtualhost").or(vhost) {
                let _ = writeln!(c, "host = {}", quote(h));
            }
        }
        "exec" => match ch.child("misc_path") {
            Some(p) => {
                let _ = writeln!(c, "command = {}", quote(&p.args.join(" ")));
            }
            None => {
                w(
                    ch,
                    "MISC_CHECK without misc_path: a TCP check instead".into(),
                );
                return "type = \"tcp\"\n".into();
            }
        },
        "dns" => {
            if let Some(n) = ch.arg("name") {
                let _ = writeln!(c, "dns_query = {}", quote(n));
            }
        }
        _ => {}
    }
    c
}

/// Translates the text of a `keepalived.conf` (`file` names it in warnings and anchors its
/// includes).
pub fn translate(text: &str, file: &str) -> Import {
    let mut warnings = Vec::new();
    let tree = parse(text, file, 0, &mut warnings);
    let mut warn = |n: &Node, message: String| {
        warnings.push(Warning {
            file: n.file.clone(),
            line: n.line,
            message,
        })
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Translated from {file} by `xdpvs import keepalived`; check the warnings it printed.\n"
    );
    let _ = writeln!(
        out,
        "[director]\ninterface = \"eth0\"   # the interface the VIPs arrive on: set it"
    );
    let mut services = String::new();
    let mut vrrp = String::new();
    let mut names: Vec<String> = Vec::new();
    let mut seen: Vec<(SocketAddr, String)> = Vec::new();
    let mut vrrp_keys: Vec<(String, String)> = Vec::new();
    for n in &tree {
        match n.key.as_str() {
            "global_defs" => {
                for c in &n.children {
                    if c.key != "router_id" {
                        warn(c, format!("{}: not translated", c.key));
                    }
                }
            }
            "virtual_server" => {
                let addr = match n.args.as_slice() {
                    [ip, port] => match (ip.parse::<IpAddr>(), port.parse::<u16>()) {
                        (Ok(ip @ IpAddr::V4(_)), Ok(p)) => SocketAddr::new(ip, p),
                        (Ok(IpAddr::V6(_)), _) => {
                            warn(
                                n,
                                "virtual_server: IPv6 services are not supported yet; left out"
                                    .into(),
                            );
                            continue;
                        }
                        _ => {
                            warn(
                                n,
                                format!(
                                    "virtual_server {}: not an address and port; left out",
                                    n.args.join(" ")
                                ),
                            );
                            continue;
                        }
                    },
                    _ => {
                        warn(n, format!("virtual_server {}: fwmark and group services are not supported yet; left out", n.args.join(" ")));
                        continue;
                    }
                };
                let protocol = match n.arg("protocol").map(str::to_ascii_uppercase).as_deref() {
                    Some("UDP") => "udp",
                    None | Some("TCP") => "tcp",
                    Some(p) => {
                        warn(n, format!("protocol {p}: not supported; left out"));
                        continue;
                    }
                };
                if seen.iter().any(|(a, p)| *a == addr && p == protocol) {
                    warn(
                        n,
                        format!("virtual_server {addr} {protocol} is already defined; left out"),
                    );
                    continue;
                }
                seen.push((addr, protocol.into()));
                let mut name = name_of(&format!("{}_{}", addr.ip(), addr.port()));
                let mut k = 2;
                while names.contains(&name) {
                    name = format!("{}-{k}", name_of(&format!("{}_{}", addr.ip(), addr.port())));
                    k += 1;
                }
                names.push(name.clone());
                let _ = writeln!(
                    services,
                    "\n[[service]]\nname = {}\naddress = {}\nprotocol = \"{protocol}\"",
                    quote(&name),
                    quote(&addr.to_string())
                );
                let sched = match n.arg("lb_algo").or(n.arg("lvs_sched")) {
                    Some(s @ ("rr" | "wrr" | "lc" | "wlc")) => s.to_string(),
                    Some(s) => {
                        if let Some(c) = n.child("lb_algo").or(n.child("lvs_sched")) {
                            warn(
                                c,
                                format!("lb_algo {s}: not supported yet, wlc used instead"),
                            );
                        }
                        "wlc".into()
                    }
                    None => "wlc".into(),
                };
                let _ = writeln!(services, "scheduler = \"{sched}\"");
                let fwd = match n
                    .arg("lb_kind")
                    .or(n.arg("lvs_method"))
                    .map(str::to_ascii_uppercase)
                    .as_deref()
                {
                    Some("NAT") => "nat",
                    Some("DR") | None => "dr",
                    Some(k) => {
                        warn(n, format!("lb_kind {k}: not supported; left out"));
                        continue;
                    }
                };
                let _ = writeln!(services, "forwarding = \"{fwd}\"");
                let reals: Vec<&Node> = n
                    .children
                    .iter()
                    .filter(|c| c.key == "real_server")
                    .collect();
                let inhibit = reals
                    .iter()
                    .filter(|r| r.child("inhibit_on_failure").is_some())
                    .count();
                if inhibit > 0 && inhibit < reals.len() {
                    warn(n, "inhibit_on_failure on some reals only: xdpvs decides per service, quiesce used".into());
                }
                let _ = writeln!(
                    services,
                    "on_failure = \"{}\"",
                    if inhibit > 0 { "quiesce" } else { "remove" }
                );
                if let Some(s) = n.child("sorry_server") {
                    match (s.args.first().and_then(|a| a.parse::<IpAddr>().ok()), s.args.get(1).and_then(|p| p.parse::<u16>().ok())) {
                        (Some(ip @ IpAddr::V4(v4)), Some(p)) if !v4.is_loopback() && (fwd == "nat" || p == addr.port()) => {
                            let _ = writeln!(services, "fallback = {}", quote(&SocketAddr::new(ip, p).to_string()));
                        }
                        _ => warn(s, format!("sorry_server {}: not usable here (loopback, IPv6, or a port change in DR); left out", s.args.join(" "))),
                    }
                }
                for c in &n.children {
                    match c.key.as_str() {
                        "real_server" | "protocol" | "lb_algo" | "lvs_sched" | "lb_kind"
                        | "lvs_method" | "sorry_server" | "delay_loop" | "virtualhost" => {}
                        "persistence_timeout" => {
                            // keepalived's default when the value is left out: 6 minutes.
                            let t = c.args.first().map(String::as_str).unwrap_or("360");
                            let mask = n.arg("persistence_granularity");
                            match super::persistence_lines(t, mask, addr.is_ipv6()) {
                                Ok(lines) => services.push_str(&lines),
                                Err(why) => warn(c, format!("persistence_timeout: {why}; not translated")),
                            }
                        }
                        "persistence_granularity" if n.child("persistence_timeout").is_some() => {}
                        "persistence_granularity" => warn(
                            c,
                            "persistence_granularity without persistence_timeout: nothing to translate".into(),
                        ),
                        other => warn(c, format!("{other}: not translated")),
                    }
                }
                let delay = n.arg("delay_loop");
                let vhost = n.arg("virtualhost");
                let mut service_check: Option<String> = None;
                let mut body = String::new();
                for r in &reals {
                    let (Some(ip), Some(port)) = (
                        r.args.first().and_then(|a| a.parse::<IpAddr>().ok()),
                        r.args.get(1).and_then(|p| p.parse::<u16>().ok()),
                    ) else {
                        warn(
                            r,
                            format!(
                                "real_server {}: not an address and port; left out",
                                r.args.join(" ")
                            ),
                        );
                        continue;
                    };
                    if ip.is_ipv6() {
                        warn(
                            r,
                            "real_server: IPv6 reals are not supported yet; left out".into(),
                        );
                        continue;
                    }
                    let mut port = port;
                    if fwd == "dr" && port != addr.port() {
                        warn(r, format!("real_server port {port}: direct routing cannot change the port, {} used", addr.port()));
                        port = addr.port();
                    }
                    let weight = r
                        .arg("weight")
                        .and_then(|w| w.parse::<u32>().ok())
                        .unwrap_or(1)
                        .min(65_535);
                    let check = check_of(r, delay, vhost, &mut warn);
                    for c in &r.children {
                        if ![
                            "weight",
                            "inhibit_on_failure",
                            "TCP_CHECK",
                            "HTTP_GET",
                            "SSL_GET",
                            "MISC_CHECK",
                            "DNS_CHECK",
                            "SMTP_CHECK",
                            "PING_CHECK",
                            "UDP_CHECK",
                            "BFD_CHECK",
                            "FILE_CHECK",
                        ]
                        .contains(&c.key.as_str())
                        {
                            warn(c, format!("{}: not translated", c.key));
                        }
                    }
                    let _ = write!(
                        body,
                        "\n[[service.real]]\naddress = {}\nweight = {weight}\n",
                        quote(&SocketAddr::new(ip, port).to_string())
                    );
                    match &service_check {
                        None => service_check = Some(check),
                        Some(sc) if *sc != check => {
                            let _ = write!(body, "[service.real.check]\n{check}");
                        }
                        Some(_) => {}
                    }
                }
                let _ = write!(
                    services,
                    "\n[service.check]\n{}{body}",
                    service_check.unwrap_or_else(|| "type = \"tcp\"\n".into())
                );
            }
            "vrrp_instance" => {
                let name = name_of(n.args.first().map(String::as_str).unwrap_or("vrrp"));
                let Some(iface) = n.arg("interface") else {
                    warn(n, "vrrp_instance without interface: left out".into());
                    continue;
                };
                let Some(vrid) = n
                    .arg("virtual_router_id")
                    .and_then(|v| v.parse::<u8>().ok())
                    .filter(|v| *v > 0)
                else {
                    warn(
                        n,
                        "vrrp_instance without a virtual_router_id 1..255: left out".into(),
                    );
                    continue;
                };
                let fam_key = (iface.to_string(), vrid.to_string());
                if vrrp_keys.contains(&fam_key) {
                    warn(
                        n,
                        format!("virtual router {vrid} on {iface} is already defined; left out"),
                    );
                    continue;
                }
                let mut addrs = Vec::new();
                if let Some(v) = n.child("virtual_ipaddress") {
                    for a in &v.children {
                        let ip = a.key.split('/').next().unwrap_or("");
                        match ip.parse::<IpAddr>() {
                            Ok(parsed) => {
                                let prefix =
                                    a.key.split('/').nth(1).map(str::to_string).unwrap_or_else(
                                        || {
                                            if parsed.is_ipv4() {
                                                "32".into()
                                            } else {
                                                "128".into()
                                            }
                                        },
                                    );
                                if !a.args.is_empty() {
                                    warn(a, format!("{}: the options after the address are not translated (addresses go on `interface`)", a.key));
                                }
                                if addrs.iter().any(|(a, _)| *a == parsed) {
                                    warn(a, format!("{ip} is listed twice; kept once"));
                                } else {
                                    addrs.push((parsed, format!("{ip}/{prefix}")));
                                }
                            }
                            Err(_) => warn(a, format!("{}: not an address; left out", a.key)),
                        }
                    }
                }
                let v4 = addrs.iter().filter(|(ip, _)| ip.is_ipv4()).count();
                if v4 > 0 && v4 < addrs.len() {
                    warn(n, "IPv4 and IPv6 addresses in one instance: only the IPv4 ones are kept (make a second [[vrrp]] for IPv6)".into());
                    addrs.retain(|(ip, _)| ip.is_ipv4());
                }
                if addrs.is_empty() {
                    warn(
                        n,
                        "vrrp_instance without a usable virtual_ipaddress: left out".into(),
                    );
                    continue;
                }
                if addrs.len() > 255 {
                    addrs.truncate(255);
                }
                vrrp_keys.push(fam_key);
                let prio = n
                    .arg("priority")
                    .and_then(|p| p.parse::<u8>().ok())
                    .filter(|p| *p > 0)
                    .unwrap_or(100);
                let advert = n
                    .arg("advert_int")
                    .and_then(|a| a.parse::<f64>().ok())
                    .map(|s| ((s * 100.0).round() as u64).clamp(1, 4095) * 10)
                    .unwrap_or(1000);
                let _ = writeln!(vrrp, "\n[[vrrp]]\nname = {}\ninterface = {}\nvirtual_router_id = {vrid}\npriority = {prio}\nadvert_interval = \"{advert}ms\"\npreempt = {}", quote(&name), quote(iface), n.child("nopreempt").is_none());
                if let Some(d) = n.arg("preempt_delay").and_then(secs) {
                    let _ = writeln!(vrrp, "preempt_delay = {}", quote(&d));
                }
                let list: Vec<String> = addrs.iter().map(|(_, a)| quote(a)).collect();
                let _ = writeln!(vrrp, "addresses = [{}]", list.join(", "));
                for c in &n.children {
                    match c.key.as_str() {
                        "interface" | "virtual_router_id" | "priority" | "advert_int"
                        | "nopreempt" | "preempt_delay" | "virtual_ipaddress" | "state" => {}
                        "authentication" => warn(
                            c,
                            "authentication: VRRPv3 has none (RFC 5798); not translated".into(),
                        ),
                        other => warn(c, format!("{other}: not translated")),
                    }
                }
            }
            other => warn(n, format!("{other}: not translated")),
        }
    }
    warnings.push(Warning {
        file: file.into(),
        line: 0,
        message: "[director] interface is set to \"eth0\": set the interface the VIPs arrive on"
            .into(),
    });
    out.push_str(&services);
    out.push_str(&vrrp);
    Import {
        toml: out,
        warnings,
    }
}
