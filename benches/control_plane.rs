//! Control-plane benchmark (`cargo bench --bench control_plane`, needs root).
//!
//! The real `xdpvs run` in a namespace of its own (`xbcpdir`: a veth pair `c0`/`c1`, the XDP
//! program on `c0`, forwarding on, the reals' addresses 198.18.1.1..10/32 on `lo`), configured
//! with 1,000 services x 10 reals: service `i` is 198.18.0.100:(10000+i) with reals
//! 198.18.1.1..10 on the same port (DR: real port = VIP port), `[service.check] type = "tcp"
//! interval = "1s" timeout = "500ms"`. Every (ip, port) pair has a listener: a tokio task per
//! socket in this process, on a thread inside that namespace, accepting and closing at once (and
//! counting: the accept rate proves the checks really run).
//!
//! Figures:
//! - start-up: spawn of `xdpvs run` -> its `ready` log line, and -> the first `xdpvs list`
//!   answered (includes the config parse, the XDP load/attach and programming 10,000 reals);
//! - health checking: the daemon's CPU time (utime + stime from /proc/PID/stat) over 10 s once
//!   checks have settled, as cores used (CPU-seconds per second), and its RSS (VmRSS);
//! - reload: the wall time of `xdpvs reload --socket S` (which returns once the reload is
//!   applied) for an unchanged config, a config changing every real's weight, one adding 1,000
//!   services (10,000 more reals: the same 10,000 real addresses behind a second VIP,
//!   198.18.0.101, so the same listeners serve their checks) and one removing them again; plus
//!   `xdpvs check` of the 1,000-service file (parse + validate alone: the floor of a reload).
//!   `xdpvs reload` gives up after 10 s while the daemon carries on; the bench then times until
//!   the daemon logs the reload's outcome, and says so.
//!
//! The markdown table goes to stdout; progress to stderr. Without root it prints SKIPPED and
//! exits 0. It runs only under `cargo bench` (argument `--bench`). The namespace and the daemon
//! are removed on exit, also on an error or a panic (guards' Drop).

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use common::{sh, spawn_xdpvs, Daemon, Lab};
use xdpvs::admin::Status;

/// Namespace `xbcpdir`: a [`Lab`] value with this prefix owns it (its Drop runs `lab.sh down`,
/// which kills what runs in the namespace and deletes it), and `spawn_xdpvs` runs the daemon
/// in `<prefix>dir`.
const PREFIX: &str = "xbcp";
const SERVICES: usize = 1000;
const REALS_PER_SERVICE: usize = 10;
const BASE_PORT: u16 = 10000;
/// Seconds over which the daemon's CPU time is measured.
const CPU_WINDOW: Duration = Duration::from_secs(10);
/// Time for the checks to settle after start-up (first probes are spread over one interval).
const SETTLE: Duration = Duration::from_secs(3);

fn real_ip(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 1 + j as u8)
}

fn ip(args: &[&str]) -> Result<()> {
    sh(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
    )
    .map(|_| ())
}

/// Builds the namespace (the caller's `Lab` value tears it down).
fn setup_netns(ns: &str) -> Result<()> {
    ip(&["netns", "add", ns])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&[
        "-n", ns, "link", "add", "c0", "type", "veth", "peer", "name", "c1",
    ])?;
    ip(&["-n", ns, "addr", "add", "198.18.2.1/24", "dev", "c0"])?;
    ip(&["-n", ns, "addr", "add", "198.18.0.100/32", "dev", "c0"])?;
    ip(&["-n", ns, "addr", "add", "198.18.0.101/32", "dev", "c0"])?;
    ip(&["-n", ns, "link", "set", "c0", "up"])?;
    ip(&["-n", ns, "link", "set", "c1", "up"])?;
    for j in 0..REALS_PER_SERVICE {
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/32", real_ip(j)),
            "dev",
            "lo",
        ])?;
    }
    sh(
        Command::new("ip").args([
            "netns",
            "exec",
            ns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ]),
        "sysctl",
    )?;
    Ok(())
}

/// Raises the soft RLIMIT_NOFILE to the hard one; fails if that is below `n` (the hard limit
/// cannot be raised without CAP_SYS_RESOURCE, which containers often lack).
fn raise_nofile(n: u64) -> Result<()> {
    common::raise_nofile_limit();
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        bail!("getrlimit: {}", std::io::Error::last_os_error());
    }
    if l.rlim_cur < n {
        bail!("RLIMIT_NOFILE is {}, {n} needed (ulimit -n)", l.rlim_cur);
    }
    Ok(())
}

/// TCP listeners on every (ip, port) of the config, in the namespace, accepting and closing.
struct Listeners {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    accepted: Arc<AtomicU64>,
}

impl Listeners {
    fn start(ns: &str, addrs: Vec<SocketAddr>) -> Result<Listeners> {
        let path = format!("/run/netns/{ns}");
        let accepted = Arc::new(AtomicU64::new(0));
        let acc = accepted.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let setup = || -> Result<(tokio::runtime::Runtime, Vec<std::net::TcpListener>)> {
                let f = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
                if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {path}: {}", std::io::Error::last_os_error());
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let mut ls = Vec::with_capacity(addrs.len());
                for a in &addrs {
                    let l = std::net::TcpListener::bind(a).with_context(|| format!("bind {a}"))?;
                    l.set_nonblocking(true)?;
                    ls.push(l);
                }
                Ok((rt, ls))
            };
            let (rt, ls) = match setup() {
                Ok(v) => v,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                for l in ls {
                    let acc = acc.clone();
                    let l = match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    tokio::spawn(async move {
                        loop {
                            match l.accept().await {
                                Ok((s, _)) => {
                                    drop(s);
                                    acc.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                    });
                }
                let _ = ready_tx.send(Ok(()));
                let _ = stop_rx.await;
            });
        });
        let mut me = Listeners {
            stop: Some(stop_tx),
            thread: Some(thread),
            accepted,
        };
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(me),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                me.stop.take();
                Err(anyhow!("listeners not ready within 30 s"))
            }
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `services` services on 198.18.0.100 (port 10000 + i), then `extra` more with the same ports
/// and reals on 198.18.0.101 (a real may serve several VIPs, as in LVS; their checks are
/// separate and hit the same listeners).
fn config(lab: &Lab, services: usize, extra: usize, weight: u32) -> String {
    let mut c = format!(
        "[director]\ninterface = \"c0\"\nmetrics = \"off\"\nadmin_socket = \"{}\"\n\
         watch_config = false\n",
        lab.dir.join("admin.sock").display()
    );
    let all = (0..services)
        .map(|i| (i, 100))
        .chain((0..extra).map(|i| (i, 101)));
    for (i, vip) in all {
        let port = BASE_PORT as usize + i;
        c.push_str(&format!(
            "\n[[service]]\nname = \"s{vip}_{i}\"\naddress = \"198.18.0.{vip}:{port}\"\n\
             [service.check]\ntype = \"tcp\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n"
        ));
        for j in 0..REALS_PER_SERVICE {
            c.push_str(&format!(
                "[[service.real]]\naddress = \"{}:{port}\"\nweight = {weight}\n",
                real_ip(j)
            ));
        }
    }
    c
}

fn addrs(services: usize) -> Vec<SocketAddr> {
    (0..services)
        .flat_map(|i| {
            (0..REALS_PER_SERVICE)
                .map(move |j| SocketAddr::new(IpAddr::V4(real_ip(j)), BASE_PORT + i as u16))
        })
        .collect()
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').ok_or_else(|| anyhow!("bad stat"))? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// A `Vm*:` line of /proc/PID/status, in MiB.
fn status_mib(pid: i32, key: &str) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .ok_or_else(|| anyhow!("no {key} in /proc/{pid}/status"))?;
    let kb: f64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad {line}"))?
        .parse()?;
    Ok(kb / 1024.0)
}

fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Polls the daemon's log (every 2 ms) until its `ready` line: the time since `t0`.
fn watch_ready(log: PathBuf, t0: Instant) -> std::thread::JoinHandle<Option<Duration>> {
    std::thread::spawn(move || {
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(s) = std::fs::read_to_string(&log) {
                if s.lines().any(|l| l.trim_end().ends_with(": ready")) {
                    return Some(t0.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        None
    })
}

fn status(d: &Daemon) -> Result<Status> {
    Ok(serde_json::from_str(&admin_cli(d, &["list", "--json"])?.1)?)
}

/// `xdpvs <args> --socket S` (run directly: the admin socket is a path, reachable from any
/// namespace): wall time and stdout.
fn admin_cli(d: &Daemon, args: &[&str]) -> Result<(Duration, String)> {
    let t = Instant::now();
    let out = Command::new(&d.bin)
        .args(args)
        .arg("--socket")
        .arg(&d.admin_socket)
        .stdin(Stdio::null())
        .output()?;
    let el = t.elapsed();
    if !out.status.success() {
        bail!(
            "xdpvs {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok((el, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// Reloads finished (applied or rejected) according to the daemon's log.
fn reloads_logged(d: &Daemon) -> Vec<String> {
    d.log()
        .lines()
        .map(str::to_string)
        .filter(|l| l.contains("configuration reloaded") || l.contains("reload rejected"))
        .collect()
}

/// Writes `cfg` and times `xdpvs reload` until the reload is applied. The command gives up
/// after 10 s ("reload still in progress") while the daemon carries on: then the time runs
/// until the daemon logs the outcome (polled every 5 ms), and the flag is true.
fn reload_with(d: &Daemon, cfg: &str) -> Result<(Duration, bool)> {
    d.write_config(cfg)?;
    let n0 = reloads_logged(d).len();
    let t = Instant::now();
    match admin_cli(d, &["reload"]) {
        Ok((el, out)) if out.contains("reloaded") => return Ok((el, false)),
        Ok((_, out)) => bail!("xdpvs reload answered {out:?}"),
        Err(e) if format!("{e:#}").contains("still in progress") => {}
        Err(e) => return Err(e),
    }
    while t.elapsed() < Duration::from_secs(180) {
        let logged = reloads_logged(d);
        if logged.len() > n0 {
            if logged[n0].contains("reload rejected") {
                bail!("reload rejected: {}", logged[n0]);
            }
            return Ok((t.elapsed(), true));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("reload not applied within 180 s")
}

/// A reload's time, marked when `xdpvs reload` itself gave up.
fn reload_ms((t, gave_up): (Duration, bool)) -> String {
    if gave_up {
        format!("{} (CLI gave up at 10 s)", ms(t))
    } else {
        ms(t)
    }
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

struct Row(String, String, String);

/// Health-check CPU, RSS and reloads of the running daemon: rows of the table.
fn measure(
    lab: &Lab,
    d: &Daemon,
    listeners: &Listeners,
    cfg1: &str,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let n_reals = SERVICES * REALS_PER_SERVICE;
    // Health checking at 10,000 reals.
    std::thread::sleep(SETTLE);
    let pid = d.pid();
    let (a0, c0, w0) = (listeners.accepted(), cpu_seconds(pid)?, Instant::now());
    std::thread::sleep(CPU_WINDOW);
    let (a1, c1, w1) = (listeners.accepted(), cpu_seconds(pid)?, Instant::now());
    let dt = (w1 - w0).as_secs_f64();
    let cores = (c1 - c0) / dt;
    let checks = (a1 - a0) as f64 / dt;
    let rss = status_mib(pid, "VmRSS:")?;
    let st = status(d)?;
    let all: Vec<_> = st.services.iter().flat_map(|s| &s.reals).collect();
    let up = all.iter().filter(|r| r.up).count();
    eprintln!(
        "control_plane: {cores:.3} cores, {checks:.0} checks/s, RSS {rss:.1} MiB, {up}/{} up",
        all.len()
    );
    if all.len() != n_reals || up != n_reals {
        bail!("{up} of {} reals up, want {n_reals}", all.len());
    }
    rows.push(Row(
        format!("health checks: CPU of the daemon ({n_reals} reals, tcp, 1 s)"),
        format!("{cores:.3} cores"),
        format!(
            "{:.1} µs CPU per check; {checks:.0} checks/s accepted by the listeners over {dt:.0} s; \
             {} threads",
            cores * 1e6 / checks.max(1.0),
            threads(pid)
        ),
    ));
    rows.push(Row(
        format!("RSS of the daemon ({n_reals} reals, checks running)"),
        format!("{rss:.1} MiB"),
        format!("VmHWM {:.1} MiB", status_mib(pid, "VmHWM:")?),
    ));
    let (t_lst, _) = admin_cli(d, &["list", "--json"])?;
    rows.push(Row(
        format!("`xdpvs list --json` round trip ({n_reals} reals)"),
        ms(t_lst),
        String::new(),
    ));

    // Reloads.
    eprintln!("control_plane: reloads");
    let (t_check, _) = {
        let t = Instant::now();
        let out = sh(
            Command::new(&d.bin)
                .arg("check")
                .arg("--config")
                .arg(&d.config_path),
            "xdpvs check",
        )?;
        (t.elapsed(), out)
    };
    rows.push(Row(
        format!("`xdpvs check` of that config ({} KiB)", cfg1.len() / 1024),
        ms(t_check),
        "parse + validate only: the floor of any reload".into(),
    ));
    let same = reload_with(d, cfg1)?;
    rows.push(Row(
        "reload, config unchanged".into(),
        reload_ms(same),
        "parse + diff + apply; `xdpvs check` above is the parse share".into(),
    ));
    let w2 = reload_with(d, &config(lab, SERVICES, 0, 2))?;
    let w3 = reload_with(d, &config(lab, SERVICES, 0, 3))?;
    let st = status(d)?;
    let reals: Vec<_> = st.services.iter().flat_map(|s| &s.reals).collect();
    if reals.len() != n_reals || !reals.iter().all(|r| r.configured_weight == 3) {
        bail!("after the weight reloads not every real has weight 3");
    }
    rows.push(Row(
        format!("reload, every real's weight changed ({n_reals} reals)"),
        reload_ms(w2),
        format!("again (weight 2 -> 3): {}", reload_ms(w3)),
    ));
    let add = reload_with(d, &config(lab, SERVICES, SERVICES, 3))?;
    let st = status(d)?;
    if st.services.len() != 2 * SERVICES {
        bail!("after the add reload: {} services", st.services.len());
    }
    rows.push(Row(
        format!("reload, +{SERVICES} services on a 2nd VIP (+{n_reals} reals, same listeners)"),
        reload_ms(add),
        format!("RSS after: {:.1} MiB", status_mib(pid, "VmRSS:")?),
    ));
    let del = reload_with(d, &config(lab, SERVICES, 0, 3))?;
    rows.push(Row(
        format!("reload, -{SERVICES} services (back to {n_reals} reals)"),
        reload_ms(del),
        String::new(),
    ));
    Ok(())
}

fn run() -> Result<String> {
    let started = Instant::now();
    let n_reals = SERVICES * REALS_PER_SERVICE;
    raise_nofile(n_reals as u64 + 1024)?;
    let lab = Lab {
        prefix: PREFIX.to_string(),
        reals: 1,
        dirs: 1,
        dir: PathBuf::from(format!("/tmp/{PREFIX}lab")),
    };
    // A namespace left over by an interrupted earlier run.
    drop(Lab {
        prefix: PREFIX.to_string(),
        reals: 1,
        dirs: 1,
        dir: lab.dir.clone(),
    });
    std::fs::create_dir_all(&lab.dir)?;
    let ns = lab.ns("dir");
    setup_netns(&ns)?;
    eprintln!("control_plane: {n_reals} listeners in {ns}");
    let listeners = Listeners::start(&ns, addrs(SERVICES))?;

    let mut rows: Vec<Row> = Vec::new();
    let cfg1 = config(&lab, SERVICES, 0, 1);
    eprintln!(
        "control_plane: starting xdpvs with {SERVICES} services x {REALS_PER_SERVICE} reals \
         ({} KiB of config)",
        cfg1.len() / 1024
    );
    let t0 = Instant::now();
    let ready = watch_ready(lab.dir.join("xdpvs.log"), t0);
    let d = spawn_xdpvs(&lab, &cfg1)?;
    let t_list = t0.elapsed();
    let t_ready = ready.join().ok().flatten();
    rows.push(Row(
        "start-up: spawn -> `ready` logged".into(),
        t_ready.map(ms).unwrap_or_else(|| "?".into()),
        format!("{SERVICES} services x {REALS_PER_SERVICE} reals, XDP attach included"),
    ));
    rows.push(Row(
        "start-up: spawn -> first `xdpvs list` answered".into(),
        ms(t_list),
        "harness polls every 100 ms".into(),
    ));

    if let Err(e) = measure(&lab, &d, &listeners, &cfg1, &mut rows) {
        let log = d.log();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let tail: Vec<String> = tail.into_iter().rev().map(str::to_string).collect();
        bail!(
            "{e:#}\n--- last lines of the daemon's log ---\n{}",
            tail.join("\n")
        );
    }
    drop(d);
    drop(listeners);
    drop(lab);

    let mut md = String::new();
    md.push_str("## Control plane\n\n");
    md.push_str(&format!(
        "`xdpvs run` in its own namespace, {SERVICES} services x {REALS_PER_SERVICE} reals, tcp \
         checks every 1 s against local listeners; reload = wall time of `xdpvs reload` (returns \
         once applied). {:.0} s.\n\n",
        started.elapsed().as_secs_f64()
    ));
    md.push_str("| figure | value | notes |\n|---|---:|---|\n");
    for Row(a, b, c) in rows {
        md.push_str(&format!("| {a} | {b} | {c} |\n"));
    }
    Ok(md)
}

fn main() {
    common::bench_main("control_plane", "Control plane", run);
}
