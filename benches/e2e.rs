//! End-to-end benchmark in the netns lab (`cargo bench --bench e2e`, needs root).
//!
//! One lab (`scripts/lab.sh up xbe 3`: client, director, three nginx reals) for every case; wrk
//! runs in the client's namespace. Paths:
//!
//! - `direct`: client -> real 1 (198.18.0.11:80), no director: the limit of the lab.
//! - `xdpvs`: client -> VIP 198.18.0.100:80, xdpvs in the director's namespace (DR, wlc, three
//!   reals, weight 1); the reals answer the client directly.
//! - `haproxy`: client -> 198.18.0.2:8080, HAProxy `mode tcp`, `balance leastconn` in the
//!   director's namespace (default threads), proxying to the three reals from its own address.
//! - `nft-dnat`: client -> 198.18.0.2:8081, nftables DNAT (`numgen inc mod 3`) in the director's
//!   namespace: the kernel's own L4 NAT, standing in for IPVS-NAT (absent on this kernel). Like
//!   IPVS-NAT, the reals see the client's address and send their replies back through the
//!   director: for this case only, each real gets a host route `198.18.0.3/32 via 198.18.0.2`
//!   (removed afterwards) and the director's conntrack un-NATs them. No SNAT/masquerade.
//!
//! The client reaches the director (HAProxy, nft-dnat) from a second address, 198.18.0.3, so
//! that no path's 4-tuples at the reals collide with another's (see [`setup_lab`]); the
//! `SYN retx` column counts the client's SYN retransmissions, which would reveal such stalls.
//!
//! Modes: `close` (`Connection: close`: a new TCP connection per request, the case a load
//! balancer's connection set-up dominates) and `keep-alive` (16 connections reused).
//!
//! Each run is `wrk -t1 -c16 -d5s --timeout 2s --latency`; rounds are interleaved (every path and
//! mode once per round, the path order rotated each round, the mode order alternated) and
//! repeated (3 rounds); the table shows the median over rounds of req/s, p50 and p99, each also
//! as a ratio to `direct` in the same mode (the median of the per-round ratios, so that a drift
//! of the machine's load between rounds cancels), and the spread of req/s over rounds
//! ((max - min) / median) as the noise figure.
//! Only one of xdpvs / HAProxy / the nft table is active at a time. Environment overrides:
//! `XDPVS_E2E_ROUNDS`, `XDPVS_E2E_SECS`, `XDPVS_E2E_CONNS`.
//!
//! The markdown table goes to stdout; progress goes to stderr. Without root it prints SKIPPED
//! and exits 0. It runs only under `cargo bench` (argument `--bench`); `cargo test
//! --all-targets` builds it and returns at once.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use common::{lab_config, sh, spawn_xdpvs, Lab, DIRECTOR_IP, VIP};
use xdpvs::admin::Status;

const PREFIX: &str = "xbe";
const REALS: usize = 3;
const HAPROXY_PORT: u16 = 8080;
const NFT_PORT: u16 = 8081;
const NFT_TABLE: &str = "xdpvs_bench";
/// Second client address, the source of the client's connections to the director (HAProxy and
/// nft-dnat): see [`setup_lab`].
const CLIENT_IP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

struct Params {
    rounds: usize,
    secs: u32,
    conns: u32,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Params {
    fn from_env() -> Params {
        Params {
            rounds: env_or("XDPVS_E2E_ROUNDS", 3usize).max(1),
            secs: env_or("XDPVS_E2E_SECS", 5u32).clamp(1, 60),
            conns: env_or("XDPVS_E2E_CONNS", 16u32).clamp(1, 1000),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Path {
    Direct,
    Xdpvs,
    Haproxy,
    Nft,
}

const PATHS: [Path; 4] = [Path::Direct, Path::Xdpvs, Path::Haproxy, Path::Nft];

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct (one real)",
            Path::Xdpvs => "xdpvs (DR, wlc)",
            Path::Haproxy => "HAProxy (tcp, leastconn)",
            Path::Nft => "nftables DNAT",
        }
    }

    fn addr(self) -> SocketAddr {
        let (ip, port) = match self {
            Path::Direct => (common::real_ip(1), 80),
            Path::Xdpvs => (VIP, common::VIP_PORT),
            Path::Haproxy => (DIRECTOR_IP, HAPROXY_PORT),
            Path::Nft => (DIRECTOR_IP, NFT_PORT),
        };
        SocketAddr::V4(SocketAddrV4::new(ip, port))
    }

    fn url(self) -> String {
        format!("http://{}/", self.addr())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Close,
    KeepAlive,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Close => "close",
            Mode::KeepAlive => "keep-alive",
        }
    }
}

/// One wrk run.
#[derive(Debug, Clone, Default, PartialEq)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx responses.
    errors: u64,
    /// SYNs the client retransmitted during the run (TcpExt TCPSynRetrans): each one stalls a
    /// connection for a second, so a few hundred already lower req/s.
    syn_retrans: u64,
}

/// "421.00us", "0.86ms", "1.20s", "2.00m" -> microseconds.
fn parse_duration_us(s: &str) -> Result<f64> {
    let s = s.trim();
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| anyhow!("no unit in {s:?}"))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().with_context(|| format!("number in {s:?}"))?;
    let scale = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => bail!("unknown unit in {s:?}"),
    };
    Ok(v * scale)
}

/// Parses `wrk --latency` output.
fn parse_wrk(out: &str) -> Result<Sample> {
    let mut s = Sample::default();
    let (mut got_rps, mut got_p50, mut got_p99) = (false, false, false);
    let mut in_dist = false;
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_dist = true;
            continue;
        }
        if in_dist {
            if let Some((pct, val)) = t.split_once('%') {
                match pct.trim() {
                    "50" => {
                        s.p50_us = parse_duration_us(val)?;
                        got_p50 = true;
                    }
                    "99" => {
                        s.p99_us = parse_duration_us(val)?;
                        got_p99 = true;
                    }
                    _ => {}
                }
                continue;
            }
            in_dist = false;
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            s.rps = v.trim().parse().context("Requests/sec")?;
            got_rps = true;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    s.errors += n.parse::<u64>().unwrap_or(0);
                }
            }
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            s.errors += v.trim().parse::<u64>().unwrap_or(0);
        } else if t.contains("requests in") {
            s.requests = t
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
        }
    }
    if !(got_rps && got_p50 && got_p99) {
        bail!("cannot parse wrk output:\n{out}");
    }
    Ok(s)
}

/// The client's TcpExt TCPSynRetrans counter.
fn client_syn_retrans(lab: &Lab) -> Result<u64> {
    let t = lab.exec_ok("client", &["cat", "/proc/net/netstat"])?;
    let mut lines = t.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no TcpExt in /proc/net/netstat");
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "TCPSynRetrans")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| anyhow!("no TCPSynRetrans in /proc/net/netstat"))
}

fn run_wrk(lab: &Lab, p: &Params, path: Path, mode: Mode) -> Result<Sample> {
    let syn0 = client_syn_retrans(lab)?;
    let mut s = run_wrk_only(lab, p, path, mode)?;
    s.syn_retrans = client_syn_retrans(lab)? - syn0;
    Ok(s)
}

fn run_wrk_only(lab: &Lab, p: &Params, path: Path, mode: Mode) -> Result<Sample> {
    let d = format!("{}s", p.secs);
    let c = p.conns.to_string();
    // Bounded even if wrk hangs: `timeout` kills it well after its own duration.
    let bound = (p.secs + 30).to_string();
    let url = path.url();
    let mut args = vec![
        "timeout",
        "-k",
        "5",
        &bound,
        "wrk",
        "-t1",
        "-c",
        &c,
        "-d",
        &d,
        "--timeout",
        "2s",
        "--latency",
    ];
    if mode == Mode::Close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let out = lab.exec("client", &args)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk {url} failed ({}): {}{text}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text)
}

/// One request from the client namespace to `path` must be answered by a real.
fn check_answers(lab: &Lab, path: Path) -> Result<()> {
    let addr = path.addr();
    let body = lab.in_ns("client", || {
        // A freshly started proxy may need a moment to listen.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match common::http_get_new_conn(addr, "/") {
                Ok(b) => return Ok(b),
                Err(e) if Instant::now() >= end => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })?;
    if common::real_of(&body).is_none() {
        bail!("{} ({addr}) answered {body:?}, not a real", path.label());
    }
    Ok(())
}

/// HAProxy in the director's namespace, killed on drop.
struct Haproxy {
    child: Child,
}

impl Haproxy {
    fn start(lab: &Lab) -> Result<Haproxy> {
        let cfg_path = lab.dir.join("haproxy.cfg");
        let mut cfg = format!(
            "global\n    maxconn 4096\n\ndefaults\n    mode tcp\n    timeout connect 2s\n    \
             timeout client 30s\n    timeout server 30s\n\nlisten bench\n    bind {DIRECTOR_IP}:{HAPROXY_PORT}\n    \
             balance leastconn\n"
        );
        for i in 1..=REALS {
            cfg.push_str(&format!("    server r{i} {}:80\n", common::real_ip(i)));
        }
        std::fs::write(&cfg_path, cfg)?;
        let log = File::create(lab.dir.join("haproxy.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &lab.ns("dir"), "haproxy", "-db", "-f"])
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn haproxy")?;
        let mut h = Haproxy { child };
        if let Err(e) = check_answers(lab, Path::Haproxy) {
            let log = std::fs::read_to_string(lab.dir.join("haproxy.log")).unwrap_or_default();
            let _ = h.child.try_wait();
            bail!("haproxy does not answer: {e:#}\nlog:\n{log}");
        }
        Ok(h)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let end = Instant::now() + Duration::from_secs(3);
            while Instant::now() < end {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The nftables DNAT table in the director and the reals' return routes; removed on drop.
struct NftDnat<'a> {
    lab: &'a Lab,
}

impl<'a> NftDnat<'a> {
    fn install(lab: &'a Lab) -> Result<NftDnat<'a>> {
        let g = NftDnat { lab };
        let map: Vec<String> = (1..=REALS)
            .map(|i| format!("{} : {}", i - 1, common::real_ip(i)))
            .collect();
        let rules = format!(
            "table ip {NFT_TABLE} {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
             ip daddr {DIRECTOR_IP} tcp dport {NFT_PORT} dnat to numgen inc mod {REALS} map {{ {} }} : 80\n  }}\n}}\n",
            map.join(", ")
        );
        let f = lab.dir.join("dnat.nft");
        std::fs::write(&f, rules)?;
        let dir = lab.ns("dir");
        sh(
            Command::new("ip")
                .args(["netns", "exec", &dir, "nft", "-f"])
                .arg(&f),
            "nft -f dnat.nft",
        )?;
        // Earlier rounds' closed connections must not fill the conntrack table (120 s TIME_WAIT
        // by default, tens of thousands of connections per run): shorter TIME_WAIT. Per
        // namespace; does not change the per-packet work.
        let _ = sh(
            Command::new("ip").args([
                "netns",
                "exec",
                &dir,
                "sysctl",
                "-qw",
                "net.netfilter.nf_conntrack_tcp_timeout_time_wait=10",
            ]),
            "sysctl conntrack time_wait",
        );
        for i in 1..=REALS {
            sh(
                Command::new("ip").args([
                    "-n",
                    &lab.ns(&format!("r{i}")),
                    "route",
                    "replace",
                    &format!("{CLIENT_IP2}/32"),
                    "via",
                    &DIRECTOR_IP.to_string(),
                    "dev",
                    "eth0",
                ]),
                "route to the client via the director",
            )?;
        }
        check_answers(lab, Path::Nft)?;
        Ok(g)
    }
}

impl Drop for NftDnat<'_> {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.lab.ns("dir"),
                "nft",
                "delete",
                "table",
                "ip",
                NFT_TABLE,
            ])
            .stderr(Stdio::null())
            .status();
        for i in 1..=REALS {
            let _ = Command::new("ip")
                .args([
                    "-n",
                    &self.lab.ns(&format!("r{i}")),
                    "route",
                    "del",
                    &format!("{CLIENT_IP2}/32"),
                ])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// New connections xdpvs scheduled (sum over the service's reals).
fn xdpvs_connections(d: &common::Daemon) -> Result<u64> {
    let st: Status = serde_json::from_str(&d.admin(&["list", "--json"])?)?;
    Ok(st
        .services
        .iter()
        .flat_map(|s| &s.reals)
        .map(|r| r.connections)
        .sum())
}

/// Runs both modes on one path (setting up and tearing down what the path needs).
fn run_path(lab: &Lab, p: &Params, path: Path, modes: [Mode; 2]) -> Result<Vec<(Mode, Sample)>> {
    let mut out = Vec::new();
    let measure = |out: &mut Vec<(Mode, Sample)>| -> Result<()> {
        for m in modes {
            let s = run_wrk(lab, p, path, m)?;
            eprintln!(
                "  {:<26} {:<10} {:>9.0} req/s  p50 {:>9}  p99 {:>9}  errors {}  SYN retx {}",
                path.label(),
                m.label(),
                s.rps,
                fmt_lat(s.p50_us),
                fmt_lat(s.p99_us),
                s.errors,
                s.syn_retrans
            );
            out.push((m, s));
        }
        Ok(())
    };
    match path {
        Path::Direct => {
            check_answers(lab, path)?;
            measure(&mut out)?;
        }
        Path::Xdpvs => {
            let d = spawn_xdpvs(lab, &lab_config(lab, &[1; REALS], ""))?;
            check_answers(lab, path)?;
            let before = xdpvs_connections(&d)?;
            measure(&mut out)?;
            let scheduled = xdpvs_connections(&d)? - before;
            // Every close-mode request is a new connection through the VIP: xdpvs must have
            // scheduled them (the traffic did not bypass it).
            let sent: u64 = out
                .iter()
                .filter(|(m, _)| *m == Mode::Close)
                .map(|(_, s)| s.requests)
                .sum();
            if scheduled < sent * 9 / 10 {
                bail!("xdpvs scheduled {scheduled} connections for {sent} close-mode requests");
            }
        }
        Path::Haproxy => {
            let _h = Haproxy::start(lab)?;
            measure(&mut out)?;
        }
        Path::Nft => {
            let _n = NftDnat::install(lab)?;
            measure(&mut out)?;
        }
    }
    Ok(out)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn fmt_lat(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.2} ms", us / 1000.0)
    }
}

#[derive(Debug, Clone, Copy)]
struct Summary {
    rps: f64,
    p50: f64,
    p99: f64,
    spread: f64,
    errors: u64,
    syn_retrans: u64,
}

fn summarize(samples: &[Sample]) -> Summary {
    let mut rps: Vec<f64> = samples.iter().map(|s| s.rps).collect();
    let mut p50: Vec<f64> = samples.iter().map(|s| s.p50_us).collect();
    let mut p99: Vec<f64> = samples.iter().map(|s| s.p99_us).collect();
    let (lo, hi) = rps
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), &x| (l.min(x), h.max(x)));
    let m = median(&mut rps);
    Summary {
        rps: m,
        p50: median(&mut p50),
        p99: median(&mut p99),
        spread: if m > 0.0 { (hi - lo) / m } else { f64::NAN },
        errors: samples.iter().map(|s| s.errors).sum(),
        syn_retrans: samples.iter().map(|s| s.syn_retrans).sum(),
    }
}

type Results = BTreeMap<(Path, Mode), Vec<Sample>>;

/// Median over rounds of `f(path) / f(base)`, both measured in the same round: a slow drift
/// of the machine's load between rounds cancels out.
fn paired(r: &Results, path: Path, base: Path, mode: Mode, f: fn(&Sample) -> f64) -> f64 {
    let (Some(a), Some(b)) = (r.get(&(path, mode)), r.get(&(base, mode))) else {
        return f64::NAN;
    };
    let mut v: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect();
    median(&mut v)
}

/// Lab settings for this bench (all inside the lab's namespaces).
///
/// The client's connections to the director (HAProxy, nft-dnat) leave from a second address,
/// 198.18.0.3 (a /32 on its eth0, and a route to 198.18.0.2 with that source). Reason: nft-dnat
/// keeps the client's address, so without it its connections reach real 1 with the same
/// 4-tuples (198.18.0.1:port -> 198.18.0.11:80) as the direct path's, and the real still holds
/// them in TIME_WAIT from the other path with unrelated TCP timestamps: the next path's SYN is
/// refused and retried after 1 s (measured: ~8,500 SYN retransmissions and 20-50% fewer req/s on
/// a direct run following an nft run).
fn setup_lab(lab: &Lab) -> Result<()> {
    lab.exec_ok(
        "client",
        &[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT_IP2}/32"),
            "dev",
            "eth0",
        ],
    )?;
    lab.exec_ok(
        "client",
        &[
            "ip",
            "route",
            "add",
            &format!("{DIRECTOR_IP}/32"),
            "dev",
            "eth0",
            "src",
            &CLIENT_IP2.to_string(),
        ],
    )?;
    for (ns, kv) in [
        // Many short connections per run: the widest ephemeral range on the client and on the
        // director (HAProxy's server side).
        ("client", "net.ipv4.ip_local_port_range=1024 65000"),
        ("dir", "net.ipv4.ip_local_port_range=1024 65000"),
        // nft-dnat: the reals' replies enter and leave the director on d0; an ICMP redirect
        // would send them straight to the client and break the NAT.
        ("dir", "net.ipv4.conf.all.send_redirects=0"),
        ("dir", "net.ipv4.conf.d0.send_redirects=0"),
    ] {
        lab.exec_ok(ns, &["sysctl", "-qw", kv])?;
    }
    Ok(())
}

/// The first `words` words of `cmd arg`'s first output line.
fn tool_version(cmd: &str, arg: &str, words: usize) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let t = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let first = t.lines().next().unwrap_or("");
            first
                .split_whitespace()
                .take(words)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".into())
}

fn run() -> Result<String> {
    let p = Params::from_env();
    for tool in ["wrk", "haproxy", "nft", "nginx", "timeout"] {
        sh(
            Command::new("sh").args(["-c", &format!("command -v {tool}")]),
            &format!("looking for {tool} (run scripts/setup.sh)"),
        )?;
    }
    let started = Instant::now();
    common::raise_nofile_limit();
    eprintln!("e2e: lab {PREFIX} with {REALS} reals");
    let lab = Lab::up(PREFIX, REALS)?;
    setup_lab(&lab)?;
    let mut results: Results = BTreeMap::new();
    for round in 0..p.rounds {
        eprintln!("e2e: round {}/{}", round + 1, p.rounds);
        let modes = if round % 2 == 0 {
            [Mode::Close, Mode::KeepAlive]
        } else {
            [Mode::KeepAlive, Mode::Close]
        };
        for k in 0..PATHS.len() {
            let path = PATHS[(k + round) % PATHS.len()];
            for (m, s) in run_path(&lab, &p, path, modes).context(path.label())? {
                results.entry((path, m)).or_default().push(s);
            }
        }
    }
    let elapsed = started.elapsed();
    drop(lab);

    let sums: BTreeMap<(Path, Mode), Summary> =
        results.iter().map(|(k, v)| (*k, summarize(v))).collect();
    let mut md = String::new();
    let kernel = sh(Command::new("uname").arg("-r"), "uname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    md.push_str("## End-to-end (netns lab, nginx reals)\n\n");
    md.push_str(&format!(
        "wrk -t1 -c{} -d{}s --latency from the client namespace; {} interleaved rounds; values are \
         medians over rounds; ratios are to `direct` in the same mode and round, median over rounds \
         (req/s: higher is better; latency: lower is better); spread = (max - min) / median of \
         req/s over rounds. Kernel {kernel}, {cpus} CPUs, {}, {}. \
         {:.0} s.\n\n",
        p.conns,
        p.secs,
        p.rounds,
        tool_version("haproxy", "-v", 3),
        tool_version("nft", "--version", 2),
        elapsed.as_secs_f64()
    ));
    md.push_str(
        "| path | mode | req/s | req/s vs direct | p50 | p50 vs direct | p99 | p99 vs direct | spread | errors | SYN retx |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let rps = |s: &Sample| s.rps;
    let p50 = |s: &Sample| s.p50_us;
    let p99 = |s: &Sample| s.p99_us;
    for mode in [Mode::Close, Mode::KeepAlive] {
        for path in PATHS {
            let Some(s) = sums.get(&(path, mode)) else {
                continue;
            };
            let ratio = |f| paired(&results, path, Path::Direct, mode, f);
            md.push_str(&format!(
                "| {} | {} | {:.0} | {:.2}x | {} | {:.2}x | {} | {:.2}x | {:.0}% | {} | {} |\n",
                path.label(),
                mode.label(),
                s.rps,
                ratio(rps),
                fmt_lat(s.p50),
                ratio(p50),
                fmt_lat(s.p99),
                ratio(p99),
                s.spread * 100.0,
                s.errors,
                s.syn_retrans
            ));
        }
    }
    let vs_direct = paired(&results, Path::Xdpvs, Path::Direct, Mode::Close, rps);
    let vs_haproxy = paired(&results, Path::Xdpvs, Path::Haproxy, Mode::Close, rps);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    md.push_str(&format!(
        "\nTargets (reported, not asserted), new connection per request (req/s, per-round ratios' \
         median):\n\
         - xdpvs >= 0.9x direct: {vs_direct:.2}x, {}\n\
         - xdpvs >= 2x HAProxy: {vs_haproxy:.2}x, {}\n",
        met(vs_direct >= 0.9),
        met(vs_haproxy >= 2.0)
    ));
    Ok(md)
}

fn main() {
    // The lab is torn down by Lab's Drop, also on a panic or an error.
    common::bench_main("e2e", "End-to-end", run);
}
