//! End to end, issue "operability", metrics: the real `xdpvs` binary in a netns lab serving
//! `/metrics`; known traffic must show up exactly in the counters, the exposition must pass
//! `promtool check metrics`, a real Prometheus server must scrape it and answer a query with the
//! expected count, and counters must never go backwards across reloads (also when a real is
//! removed and re-added, which restarts its dataplane counters). Needs root (except the config
//! default test).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use common::{http_get_new_conn, lab_config, real_addr, real_of, spawn_xdpvs, vip_addr, Lab};

const METRICS: &str = "127.0.0.1:9469";
const PROMETHEUS: &str = "127.0.0.1:9090";
const WAIT: Duration = Duration::from_secs(30);

/// The lab config with metrics on (loopback of the director's namespace), reloads only on
/// SIGHUP (so each reload is counted exactly once), and removed reals cut at once (so their
/// dataplane ids are released quickly).
fn config(lab: &Lab, weights: &[u32]) -> String {
    let c = lab_config(lab, weights, "on_remove = \"cut\"");
    assert!(c.contains("metrics = \"off\""), "lab_config changed: {c}");
    c.replace(
        "metrics = \"off\"",
        &format!("metrics = \"{METRICS}\"\nwatch_config = false"),
    )
}

/// A raw HTTP/1.1 request from inside namespace `ns` (full name): (status, headers, body).
fn http(ns: &str, method: &str, addr: &str, target: &str) -> Result<(u16, String, String)> {
    let addr: SocketAddr = addr.parse()?;
    let target = target.to_string();
    let method = method.to_string();
    common::in_netns(ns, move || -> Result<(u16, String, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            .with_context(|| format!("connect to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        let raw = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no end of headers in {raw:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
        Ok((status, head.to_string(), body.to_string()))
    })
}

/// `GET /metrics` from the director's namespace; the exposition text.
fn scrape(lab: &Lab) -> Result<String> {
    let (status, head, body) = http(&lab.ns("dir"), "GET", METRICS, "/metrics")?;
    if status != 200 {
        bail!("GET /metrics: status {status}: {head}\n{body}");
    }
    Ok(body)
}

/// Samples of metric `name`: (label text inside the braces, value).
fn samples(text: &str, name: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let (labels, value) = if let Some(r) = rest.strip_prefix('{') {
                let (labels, v) = r.split_once("} ")?;
                (labels.to_string(), v)
            } else {
                (String::new(), rest.strip_prefix(' ')?)
            };
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The value of label `key` in a label text (`a="x",b="y"`).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

/// Per-real values ("ip:port" -> value) of a `{service,real}` metric.
fn per_real(text: &str, name: &str) -> HashMap<String, f64> {
    samples(text, name)
        .into_iter()
        .filter_map(|(l, v)| Some((label(&l, "real")?.to_string(), v)))
        .collect()
}

/// The single sample of a metric with exactly these labels (`""` for none).
fn value(text: &str, name: &str, labels: &str) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|(l, _)| l == labels)
        .map(|(_, v)| v)
}

/// Scrapes until `f` holds for the text (bounded by [`WAIT`]); the last text.
fn scrape_until(lab: &Lab, what: &str, f: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + WAIT;
    let mut last = String::new();
    while Instant::now() < end {
        if let Ok(t) = scrape(lab) {
            if f(&t) {
                return t;
            }
            last = t;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("timed out waiting for {what}; last scrape:\n{last}");
}

/// `n` requests on new connections from the client; how many each real ("ip:port") served.
fn traffic(lab: &Lab, n: usize) -> HashMap<String, u64> {
    common::in_netns(&lab.ns("client"), || {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for i in 0..n {
            let body = http_get_new_conn(vip_addr(), "/")
                .unwrap_or_else(|e| panic!("request {i} failed: {e:#}"));
            let r = real_of(&body).unwrap_or_else(|| panic!("body {body:?} names no real"));
            *counts.entry(real_addr(r).to_string()).or_default() += 1;
        }
        counts
    })
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool (Debian package prometheus; scripts/setup.sh installs it)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- exposition ---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "promtool check metrics: ok {}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A Prometheus server in the director's namespace scraping the daemon every second; killed
/// on drop (its log printed if the test panicked).
struct Prometheus {
    child: Child,
    ns: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(ns: &str, dir: &Path) -> Prometheus {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let yml = dir.join("prometheus.yml");
        std::fs::write(
            &yml,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: xdpvs\n    static_configs:\n      - targets: ['{METRICS}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let log = dir.join("prometheus.log");
        let logf = std::fs::File::create(&log).expect("prometheus log");
        // `ip netns exec` execs prometheus: the child's pid is the server's.
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "prometheus"])
            .arg(format!("--config.file={}", yml.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf)
            .spawn()
            .expect("start prometheus (Debian package prometheus)");
        Prometheus {
            child,
            ns: ns.to_string(),
            log,
        }
    }

    /// An instant query; the scalar value of its single result, if there is one.
    fn query(&self, promql: &str) -> Result<Option<f64>> {
        let q: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, _, body) = http(
            &self.ns,
            "GET",
            PROMETHEUS,
            &format!("/api/v1/query?query={q}"),
        )?;
        if status != 200 {
            bail!("query {promql}: status {status}: {body}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)
            .with_context(|| format!("query {promql}: bad JSON {body:?}"))?;
        if v["status"] != "success" {
            bail!("query {promql}: {body}");
        }
        let result = v["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("query {promql}: no result in {body}"))?;
        match result.as_slice() {
            [] => Ok(None),
            [one] => {
                let s = one["value"][1]
                    .as_str()
                    .ok_or_else(|| anyhow!("query {promql}: no value in {body}"))?;
                Ok(Some(s.parse()?))
            }
            _ => bail!("query {promql}: several results: {body}"),
        }
    }

    /// Queries until the value is `want` (bounded by [`WAIT`]).
    fn wait_for(&self, promql: &str, want: f64) {
        let end = Instant::now() + WAIT;
        let mut last = Err(anyhow!("not queried yet"));
        while Instant::now() < end {
            last = self.query(promql);
            if matches!(last, Ok(Some(v)) if v == want) {
                eprintln!("prometheus: {promql} = {want}");
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!(
            "prometheus: {promql} never became {want} (last: {last:?}); log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- prometheus log ({}) -----\n{}",
                self.log.display(),
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

fn sum(m: &HashMap<String, f64>) -> f64 {
    m.values().sum()
}

#[test]
#[ignore = "needs root"]
fn metrics_count_traffic_pass_promtool_and_feed_prometheus() {
    if !common::require_root("metrics_count_traffic_pass_promtool_and_feed_prometheus") {
        return;
    }
    let lab = Lab::up("xm1", 3).expect("lab up");
    let d = spawn_xdpvs(&lab, &config(&lab, &[1, 1, 1])).expect("xdpvs starts");
    let dir_ns = lab.ns("dir");
    let conns = "xdpvs_real_connections_total";

    // A fresh lab: every real exported, at 0, nothing reloaded yet.
    let t0 = scrape_until(&lab, "the metrics endpoint", |t| {
        per_real(t, conns).len() == 3
    });
    assert_eq!(sum(&per_real(&t0, conns)), 0.0, "{t0}");
    assert_eq!(
        value(&t0, "xdpvs_config_reloads_total", "result=\"ok\""),
        Some(0.0)
    );
    assert_eq!(
        value(&t0, "xdpvs_config_reloads_total", "result=\"error\""),
        Some(0.0)
    );
    let started = value(
        &t0,
        "xdpvs_config_last_reload_success_timestamp_seconds",
        "",
    )
    .expect("last reload timestamp");
    assert!(
        started > 1.6e9,
        "start-up load sets the timestamp: {started}"
    );
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert_eq!(value(&t0, "xdpvs_build_info", &version), Some(1.0));

    // Known traffic: 60 new connections, 1:1:1.
    let mut made = traffic(&lab, 60);
    let t1 = scrape(&lab).expect("scrape");
    let got = per_real(&t1, conns);
    assert_eq!(sum(&got), 60.0, "{t1}");
    for (real, n) in &made {
        assert_eq!(got.get(real), Some(&(*n as f64)), "{real}: {t1}");
    }
    eprintln!("after 60 connections: {got:?}");
    for (name, min) in [
        ("xdpvs_real_packets_total", 60.0 * 3.0),
        ("xdpvs_real_bytes_total", 60.0 * 150.0),
    ] {
        let s = sum(&per_real(&t1, name));
        assert!(s >= min, "{name} sums to {s} < {min}");
    }
    for (real, w) in per_real(&t1, "xdpvs_real_weight") {
        assert_eq!(w, 1.0, "weight of {real}");
    }
    for (real, up) in per_real(&t1, "xdpvs_real_up") {
        assert_eq!(up, 1.0, "{real} up");
    }
    assert_eq!(
        value(&t1, "xdpvs_dataplane_packets_total", "action=\"new_conn\""),
        Some(60.0),
        "{t1}"
    );
    assert!(!t1.contains("unused"), "{t1}");
    // The default check (tcp) ran: durations recorded.
    let checks = samples(&t1, "xdpvs_health_check_duration_seconds_count");
    assert!(
        checks
            .iter()
            .any(|(l, v)| l.contains("type=\"tcp\"") && *v >= 1.0),
        "{t1}"
    );
    assert!(t1.contains("# TYPE xdpvs_health_check_duration_seconds histogram"));
    promtool_check(&t1);

    // Only GET, and only /metrics, the status page at / and its /status.json.
    let (status, head, _) = http(&dir_ns, "POST", METRICS, "/metrics").expect("POST");
    assert_eq!(status, 405, "{head}");
    let (status, head, _) = http(&dir_ns, "GET", METRICS, "/").expect("GET /");
    assert_eq!(status, 200, "the status page");
    assert!(head.to_ascii_lowercase().contains("text/html"), "{head}");
    let (status, _, _) = http(&dir_ns, "GET", METRICS, "/nothing").expect("GET /nothing");
    assert_eq!(status, 404);
    let (status, _, _) = http(&dir_ns, "GET", METRICS, "/metricsx").expect("GET /metricsx");
    assert_eq!(status, 404);
    let (status, head, _) = http(&dir_ns, "GET", METRICS, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    // Loopback of the director's namespace only: not reachable from the client.
    let from_client = http(
        &lab.ns("client"),
        "GET",
        &format!("{}:9469", common::DIRECTOR_IP),
        "/metrics",
    );
    assert!(from_client.is_err(), "metrics reachable from the client");

    // A real Prometheus server scrapes it and sees the 60 connections.
    let prom = Prometheus::start(&dir_ns, &lab.dir.join("prometheus"));
    prom.wait_for(&format!("sum({conns})"), 60.0);

    // Reload with a changed weight: counted once, counters do not go backwards.
    d.write_config(&config(&lab, &[1, 2, 1]))
        .expect("write config");
    d.reload().expect("SIGHUP");
    let t2 = scrape_until(&lab, "reloads_total{ok} = 1", |t| {
        value(t, "xdpvs_config_reloads_total", "result=\"ok\"") == Some(1.0)
    });
    let after = per_real(&t2, conns);
    for (real, before) in &got {
        assert!(
            after.get(real).copied().unwrap_or(0.0) >= *before,
            "{real} went backwards: {before} -> {:?}",
            after.get(real)
        );
    }
    assert_eq!(sum(&after), 60.0);
    assert_eq!(
        per_real(&t2, "xdpvs_real_weight").get(&real_addr(2).to_string()),
        Some(&2.0)
    );
    let reloaded_at = value(
        &t2,
        "xdpvs_config_last_reload_success_timestamp_seconds",
        "",
    )
    .expect("timestamp");
    assert!(reloaded_at >= started);

    // A broken file is rejected and counted; nothing else changes.
    d.write_config("[director\nthis is not toml")
        .expect("write config");
    d.reload().expect("SIGHUP");
    let t3 = scrape_until(&lab, "reloads_total{error} = 1", |t| {
        value(t, "xdpvs_config_reloads_total", "result=\"error\"") == Some(1.0)
    });
    assert_eq!(
        value(&t3, "xdpvs_config_reloads_total", "result=\"ok\""),
        Some(1.0)
    );
    assert_eq!(
        value(
            &t3,
            "xdpvs_config_last_reload_success_timestamp_seconds",
            ""
        ),
        Some(reloaded_at)
    );
    assert_eq!(per_real(&t3, conns), after);

    // Real 3's server stops: its check fails with the closed-set reason "refused" (the detail,
    // "connection refused", is for the log and `list`).
    let r3 = real_addr(3).to_string();
    let health_series = |t: &str| -> Vec<String> {
        [
            "xdpvs_health_check_duration_seconds_count",
            "xdpvs_health_check_failures_total",
        ]
        .iter()
        .flat_map(|name| samples(t, name))
        .filter(|(l, _)| label(l, "real") == Some(r3.as_str()))
        .map(|(l, _)| l)
        .collect()
    };
    lab.stop_nginx(3).expect("stop nginx 3");
    let t_down = scrape_until(&lab, "a refused check of real 3", |t| {
        samples(t, "xdpvs_health_check_failures_total")
            .iter()
            .any(|(l, v)| {
                label(l, "real") == Some(r3.as_str())
                    && label(l, "reason") == Some("refused")
                    && *v >= 1.0
            })
    });
    let allowed: Vec<&str> = xdpvs::health::FailureKind::ALL
        .iter()
        .map(|k| k.label())
        .collect();
    for (l, _) in samples(&t_down, "xdpvs_health_check_failures_total") {
        let reason = label(&l, "reason").unwrap_or_default();
        assert!(
            allowed.contains(&reason),
            "reason {reason:?} not in {allowed:?}"
        );
    }

    // Remove real 3 (cut: its dataplane id is released once its connections are gone): its
    // dataplane and health series go with it ...
    let r3_before = after[&r3];
    d.write_config(&config(&lab, &[1, 2]))
        .expect("write config");
    d.reload().expect("SIGHUP");
    let t_gone = scrape_until(&lab, "real 3 gone from the metrics", |t| {
        value(t, "xdpvs_config_reloads_total", "result=\"ok\"") == Some(2.0)
            && !per_real(t, conns).contains_key(&r3)
    });
    assert_eq!(health_series(&t_gone), Vec::<String>::new(), "{t_gone}");
    lab.start_nginx(3).expect("start nginx 3");
    // ... and add it again: a new dataplane id whose counters start at 0.
    d.write_config(&config(&lab, &[1, 2, 1]))
        .expect("write config");
    d.reload().expect("SIGHUP");
    // (An added real starts down until its check passes.)
    scrape_until(&lab, "real 3 back, up, weight 1", |t| {
        value(t, "xdpvs_config_reloads_total", "result=\"ok\"") == Some(3.0)
            && per_real(t, conns).contains_key(&r3)
            && per_real(t, "xdpvs_real_up").get(&r3) == Some(&1.0)
            && per_real(t, "xdpvs_real_weight").get(&r3) == Some(&1.0)
    });
    let more = traffic(&lab, 60);
    for (real, n) in more {
        *made.entry(real).or_default() += n;
    }
    let t4 = scrape(&lab).expect("scrape");
    let last = per_real(&t4, conns);
    eprintln!("after remove/re-add and 60 more connections: {last:?} (made {made:?})");
    assert_eq!(sum(&last), 120.0, "{t4}");
    for (real, n) in &made {
        assert_eq!(last.get(real), Some(&(*n as f64)), "{real}: {t4}");
    }
    assert!(last[&r3] > r3_before, "real 3 continues from {r3_before}");
    promtool_check(&t4);

    // Prometheus agrees, and never saw a counter reset.
    prom.wait_for(&format!("sum({conns})"), 120.0);
    prom.wait_for(&format!("sum(resets({conns}[10m]))"), 0.0);
    drop(prom);
    drop(d);
}

/// Metrics are on by default, on loopback; `"off"` disables them.
#[test]
fn metrics_default_to_loopback() {
    let path = Path::new("/tmp/xdpvs-metrics-default.toml");
    let base = "[director]\ninterface = \"d0\"\n\n[[service]]\nname = \"web\"\n\
                address = \"198.18.0.100:80\"\n\n[[service.real]]\naddress = \"198.18.0.11:80\"\n";
    let cfg = xdpvs::config::Config::parse(base, path).expect("config parses");
    let addr = cfg.director.metrics.expect("metrics on by default");
    assert_eq!(addr.to_string(), xdpvs::config::DEFAULT_METRICS);
    assert!(addr.ip().is_loopback(), "{addr}");
    let off = base.replace("[director]\n", "[director]\nmetrics = \"off\"\n");
    let cfg = xdpvs::config::Config::parse(&off, path).expect("config parses");
    assert_eq!(cfg.director.metrics, None);
}

/// If the metrics address is taken, the daemon logs an error and keeps directing traffic.
#[test]
#[ignore = "needs root"]
fn metrics_bind_failure_is_logged_and_the_daemon_keeps_running() {
    if !common::require_root("metrics_bind_failure_is_logged_and_the_daemon_keeps_running") {
        return;
    }
    let lab = Lab::up("xm2", 1).expect("lab up");
    let squatter = common::in_netns(&lab.ns("dir"), || std::net::TcpListener::bind(METRICS))
        .expect("occupy the metrics port in the director's namespace");
    let d = spawn_xdpvs(&lab, &config(&lab, &[1])).expect("xdpvs starts");
    common::wait_for("the bind error in the log", WAIT, || {
        d.log().contains("cannot serve metrics")
    });
    let seen = common::sample_reals(&lab.ns("client"), 5);
    assert_eq!(seen, vec![1; 5]);
    d.list().expect("admin socket still answers");
    drop(squatter);
}
