//! Prometheus metrics: `GET /metrics` in the text exposition format.
//!
//! Two sources feed a scrape:
//!
//! * a [`Snapshot`] taken at scrape time from the read model ([`ReadModel::status`]: the live config,
//!   health, and the dataplane's per-CPU counters summed), turned into metric families by the
//!   pure function [`render`];
//! * health-check results, recorded as they happen ([`record_health`], called by the daemon for
//!   every probe) into a long-lived registry (durations as a histogram, failures by reason).
//!   Both stay bounded: the `reason` label is a [`FailureKind`] (a closed set; the free-text
//!   detail goes to the log and `list`), and each scrape deletes the series of reals and services
//!   the live config no longer has, so reloads that churn reals do not grow the registry.
//!
//! Dataplane counters restart at 0 when a real gets a new dataplane id (removed and re-added by
//! a reload), so exported counters go through [`Monotonic`], which keeps per series the last
//! value seen and an offset: a drop, or the series vanishing from a snapshot, folds the last
//! value into the offset, so the exported value never goes backwards.
//!
//! A scrape runs on the blocking pool and reads the maps through the dataplane owner's read-only
//! handle (inside `status()`), so it neither waits for a map write nor delays one, and does not
//! stall the event loop, the checkers or the dataplane (which never waits for user space).

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::proto::MetricFamily;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use crate::config::CheckKind;
use crate::health::{FailureKind, HealthEvent};
use crate::status::ReadModel;

/// Health-check duration buckets (seconds): checks mostly take well under a second; exec
/// checks and timeouts may take a few.
pub const HEALTH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One real's state and counters at scrape time (dataplane counters as read, not yet monotonic).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RealSnapshot {
    pub service: String,
    /// "ip:port".
    pub real: String,
    /// New connections scheduled to it (`REAL_STATS.conns`).
    pub connections: u64,
    pub packets: u64,
    pub bytes: u64,
    pub active: u64,
    pub inactive: u64,
    pub up: bool,
    /// Effective weight.
    pub weight: u32,
}

/// Everything a scrape exports besides the health-check metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub reals: Vec<RealSnapshot>,
    /// Live persistence templates per persistent service.
    pub templates: Vec<(String, u64)>,
    /// Dataplane packet counters by action (`STAT_NAMES` without the unused slots).
    pub dataplane: Vec<(String, u64)>,
    pub conntrack_entries: u64,
    pub reloads_ok: u64,
    pub reloads_error: u64,
    /// Unix time of the last successful (re)load, start-up included.
    pub last_reload_ok: u64,
    pub version: String,
    pub vrrp: Vec<crate::ha::director::VrrpStatus>,
    pub sync: Option<crate::ha::sync::service::SyncStatus>,
}

impl Snapshot {
    /// Reads the daemon's state.
    pub fn take(shared: &dyn ReadModel) -> Result<Snapshot> {
        let st = shared.status().context("reading the dataplane")?;
        let reals = st
            .services
            .iter()
            .flat_map(|s| {
                s.reals.iter().map(move |r| RealSnapshot {
                    service: s.name.clone(),
                    real: r.address.clone(),
                    connections: r.connections,
                    packets: r.packets,
                    bytes: r.bytes,
                    active: r.active,
                    inactive: r.inactive,
                    up: r.up,
                    weight: r.weight,
                })
            })
            .collect();
        let templates = st
            .services
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.persistence.as_ref()?.templates)))
            .collect();
        Ok(Snapshot {
            reals,
            templates,
            dataplane: st.dataplane.into_iter().collect(),
            conntrack_entries: st.conntrack_entries,
            reloads_ok: shared.daemon_stats().reloads_ok.load(Ordering::SeqCst),
            reloads_error: shared.daemon_stats().reloads_error.load(Ordering::SeqCst),
            last_reload_ok: shared.daemon_stats().last_reload_ok.load(Ordering::SeqCst),
            version: st.version,
            vrrp: st.vrrp,
            sync: st.sync,
        })
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Series {
    /// The raw value last seen.
    last: u64,
    /// Sum of the values lost to resets.
    offset: u64,
    /// Generation (scrape) in which it was last seen.
    seen: u64,
}

/// Makes counters that may restart at 0 monotonic, per series key.
#[derive(Debug, Default)]
pub struct Monotonic {
    generation: u64,
    series: HashMap<String, Series>,
}

impl Monotonic {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a new snapshot: series not [`observe`](Self::observe)d before the next
    /// [`finish`](Self::finish) count as reset.
    pub fn begin(&mut self) {
        self.generation += 1;
    }

    /// The exported value for a raw reading of series `key`.
    pub fn observe(&mut self, key: &str, raw: u64) -> u64 {
        let generation = self.generation;
        let s = self.series.entry(key.to_string()).or_default();
        if raw < s.last {
            s.offset = s.offset.saturating_add(s.last);
        }
        s.last = raw;
        s.seen = generation;
        s.offset.saturating_add(raw)
    }

    /// Ends a snapshot: a series that was not in it lost its counter (its real was released);
    /// if it comes back, it continues from where it was.
    pub fn finish(&mut self) {
        let generation = self.generation;
        for s in self.series.values_mut() {
            if s.seen != generation && s.last != 0 {
                s.offset = s.offset.saturating_add(s.last);
                s.last = 0;
            }
        }
    }
}

/// Health-check metrics, recorded as results arrive.
struct HealthMetrics {
    registry: Registry,
    duration: HistogramVec,
    failures: IntCounterVec,
}

impl HealthMetrics {
    fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "xdpvs_health_check_duration_seconds",
                "Duration of health-check probes.",
            )
            .buckets(HEALTH_BUCKETS.to_vec()),
            &["service", "real", "type"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "xdpvs_health_check_failures_total",
                "Failed health-check probes, by reason.",
            ),
            &["service", "real", "reason"],
        )?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        Ok(HealthMetrics {
            registry,
            duration,
            failures,
        })
    }

    fn record(&self, ev: &HealthEvent) {
        let real = ev.real.to_string();
        self.duration
            .with_label_values(&[&ev.service, &real, check_type(ev.kind)])
            .observe(ev.duration.as_secs_f64());
        if ev.reason.is_some() {
            let cause = ev.cause.unwrap_or(FailureKind::Other);
            self.failures
                .with_label_values(&[&ev.service, &real, cause.label()])
                .inc();
        }
    }

    /// Deletes every series whose (service, real) is not in `live` (removed by a reload).
    fn retain(&self, live: &HashSet<(&str, &str)>) {
        for fam in self.registry.gather() {
            for m in fam.get_metric() {
                let labels: HashMap<&str, &str> = m
                    .get_label()
                    .iter()
                    .map(|l| (l.get_name(), l.get_value()))
                    .collect();
                let (Some(service), Some(real)) = (labels.get("service"), labels.get("real"))
                else {
                    continue;
                };
                if live.contains(&(*service, *real)) {
                    continue;
                }
                let name = fam.get_name();
                let r = if name == "xdpvs_health_check_failures_total" {
                    let reason = labels.get("reason").copied().unwrap_or_default();
                    self.failures.remove_label_values(&[service, real, reason])
                } else {
                    let kind = labels.get("type").copied().unwrap_or_default();
                    self.duration.remove_label_values(&[service, real, kind])
                };
                if let Err(e) = r {
                    debug!(%name, error = %e, "cannot delete a health series");
                }
            }
        }
    }

    /// The families, after deleting the series of reals `snap` no longer has.
    fn families_live(&self, snap: &Snapshot) -> Vec<MetricFamily> {
        let live: HashSet<(&str, &str)> = snap
            .reals
            .iter()
            .map(|r| (r.service.as_str(), r.real.as_str()))
            .collect();
        self.retain(&live);
        self.registry.gather()
    }
}

fn health_metrics() -> Option<&'static HealthMetrics> {
    static HEALTH: OnceLock<Option<HealthMetrics>> = OnceLock::new();
    HEALTH
        .get_or_init(|| {
            HealthMetrics::new()
                .map_err(|e| error!(error = %e, "health-check metrics unavailable"))
                .ok()
        })
        .as_ref()
}

/// The `type` label of a check.
pub fn check_type(kind: CheckKind) -> &'static str {
    match kind {
        CheckKind::Tcp => "tcp",
        CheckKind::Http => "http",
        CheckKind::Https => "https",
        CheckKind::Exec => "exec",
        CheckKind::Dns => "dns",
        CheckKind::None => "none",
        CheckKind::Off => "off",
    }
}

/// Records one probe result (the daemon calls this for every result).
pub fn record_health(ev: &HealthEvent) {
    if let Some(h) = health_metrics() {
        h.record(ev);
    }
}

/// The health-check metric families recorded so far.
#[cfg(test)]
fn health_families() -> Vec<MetricFamily> {
    health_metrics()
        .map(|h| h.registry.gather())
        .unwrap_or_default()
}

/// Snapshot -> metric families, with dataplane counters made monotonic through `mono`.
pub fn families(snap: &Snapshot, mono: &mut Monotonic) -> prometheus::Result<Vec<MetricFamily>> {
    let r = Registry::new();
    let real_labels = &["service", "real"];
    let counter = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntCounterVec> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        r.register(Box::new(c.clone()))?;
        Ok(c)
    };
    let gauge = |name: &str, help: &str, labels: &[&str]| -> prometheus::Result<IntGaugeVec> {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
        r.register(Box::new(g.clone()))?;
        Ok(g)
    };
    let conns = counter(
        "xdpvs_real_connections_total",
        "New connections scheduled to the real.",
        real_labels,
    )?;
    let active = gauge(
        "xdpvs_real_active_connections",
        "Established connections to the real.",
        real_labels,
    )?;
    let inactive = gauge(
        "xdpvs_real_inactive_connections",
        "Connections to the real in other states (opening, closing).",
        real_labels,
    )?;
    let packets = counter(
        "xdpvs_real_packets_total",
        "Packets forwarded to the real.",
        real_labels,
    )?;
    let bytes = counter(
        "xdpvs_real_bytes_total",
        "Bytes forwarded to the real.",
        real_labels,
    )?;
    let up = gauge(
        "xdpvs_real_up",
        "Whether the real passes its health check (1) or not (0).",
        real_labels,
    )?;
    let weight = gauge(
        "xdpvs_real_weight",
        "Effective weight of the real (after health and runtime overrides).",
        real_labels,
    )?;
    let templates = gauge(
        "xdpvs_service_persistence_templates",
        "Live persistence templates of the service (clients it sends to their last real).",
        &["service"],
    )?;
    for (service, n) in &snap.templates {
        templates.with_label_values(&[service]).set(clamp(*n));
    }
    let dataplane = counter(
        "xdpvs_dataplane_packets_total",
        "Packets seen by the XDP program, by what it did with them.",
        &["action"],
    )?;
    let conntrack = IntGauge::new(
        "xdpvs_conntrack_entries",
        "Entries in the connection table.",
    )?;
    r.register(Box::new(conntrack.clone()))?;
    let reloads = counter(
        "xdpvs_config_reloads_total",
        "Configuration reloads, by result (the start-up load is not counted).",
        &["result"],
    )?;
    let last_ok = IntGauge::new(
        "xdpvs_config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful configuration load (start-up or reload).",
    )?;
    r.register(Box::new(last_ok.clone()))?;
    let build = gauge(
        "xdpvs_build_info",
        "Build information; always 1.",
        &["version"],
    )?;

    let vrrp_labels = &["instance"];
    let vrrp_state = gauge(
        "xdpvs_vrrp_state",
        "VRRP state of the instance: 0 initialize, 1 backup, 2 master.",
        vrrp_labels,
    )?;
    let vrrp_priority = gauge(
        "xdpvs_vrrp_priority",
        "Running VRRP priority (lowered while a tracked service has no healthy real).",
        vrrp_labels,
    )?;
    let vrrp_transitions = counter(
        "xdpvs_vrrp_transitions_total",
        "VRRP state changes of the instance.",
        vrrp_labels,
    )?;
    let vrrp_adverts = counter(
        "xdpvs_vrrp_adverts_total",
        "VRRP advertisements, by direction (sent, received, accepted).",
        &["instance", "direction"],
    )?;
    let vrrp_rejected = counter(
        "xdpvs_vrrp_adverts_rejected_total",
        "Received VRRP packets dropped, by reason (RFC 5798 section 7.1 checks).",
        &["instance", "reason"],
    )?;
    for v in &snap.vrrp {
        let i = v.name.as_str();
        vrrp_state
            .with_label_values(&[i])
            .set(match v.state.as_str() {
                "master" => 2,
                "backup" => 1,
                _ => 0,
            });
        vrrp_priority
            .with_label_values(&[i])
            .set(i64::from(v.priority));
        vrrp_transitions
            .with_label_values(&[i])
            .inc_by(v.transitions);
        for (dir, n) in [
            ("sent", v.adverts_sent),
            ("received", v.adverts_received),
            ("accepted", v.adverts_accepted),
        ] {
            vrrp_adverts.with_label_values(&[i, dir]).inc_by(n);
        }
        for (reason, n) in &v.rejected {
            vrrp_rejected.with_label_values(&[i, reason]).inc_by(*n);
        }
    }

    if let Some(y) = &snap.sync {
        let events = counter(
            "xdpvs_sync_events_total",
            "Connection-state sync events, by what happened to them.",
            &["event"],
        )?;
        for (what, n) in [
            ("sent", y.sent_events),
            ("received", y.received_events),
            ("installed", y.installed),
            ("updated", y.updated),
            ("retired", y.retired),
            ("lost", y.lost),
            ("dump_sent", y.dump_events_sent),
            ("refresh_sent", y.refresh_events_sent),
        ] {
            events.with_label_values(&[what]).inc_by(n);
        }
        let rejected = counter(
            "xdpvs_sync_rejected_total",
            "Sync datagrams or events refused, by reason.",
            &["reason"],
        )?;
        for (reason, n) in &y.rejected {
            rejected.with_label_values(&[reason]).inc_by(*n);
        }
        let heard = IntGauge::new(
            "xdpvs_sync_peer_last_heard_milliseconds",
            "Time since the peer director was last heard (-1: never).",
        )?;
        r.register(Box::new(heard.clone()))?;
        heard.set(y.peer_last_heard_ms.map_or(-1, clamp));
    }

    mono.begin();
    let mut seen = HashSet::new();
    for rs in &snap.reals {
        // One series per (service, real) label pair: the first entry wins.
        if !seen.insert((rs.service.as_str(), rs.real.as_str())) {
            continue;
        }
        let labels = &[rs.service.as_str(), rs.real.as_str()];
        let key = |metric: &str| format!("{metric}\u{0}{}\u{0}{}", rs.service, rs.real);
        conns
            .with_label_values(labels)
            .inc_by(mono.observe(&key("conns"), rs.connections));
        packets
            .with_label_values(labels)
            .inc_by(mono.observe(&key("packets"), rs.packets));
        bytes
            .with_label_values(labels)
            .inc_by(mono.observe(&key("bytes"), rs.bytes));
        active.with_label_values(labels).set(clamp(rs.active));
        inactive.with_label_values(labels).set(clamp(rs.inactive));
        up.with_label_values(labels).set(i64::from(rs.up));
        weight.with_label_values(labels).set(i64::from(rs.weight));
    }
    for (action, v) in &snap.dataplane {
        if action.starts_with("unused") {
            continue;
        }
        dataplane
            .with_label_values(&[action])
            .inc_by(mono.observe(&format!("dataplane\u{0}{action}"), *v));
    }
    mono.finish();
    conntrack.set(clamp(snap.conntrack_entries));
    reloads.with_label_values(&["ok"]).inc_by(snap.reloads_ok);
    reloads
        .with_label_values(&["error"])
        .inc_by(snap.reloads_error);
    last_ok.set(clamp(snap.last_reload_ok));
    build.with_label_values(&[&snap.version]).set(1);
    Ok(r.gather())
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Snapshot (plus extra families, e.g. the health checks') -> text exposition.
pub fn render(
    snap: &Snapshot,
    mono: &mut Monotonic,
    extra: Vec<MetricFamily>,
) -> prometheus::Result<String> {
    let mut all = families(snap, mono)?;
    all.extend(extra);
    all.sort_by(|a, b| a.get_name().cmp(b.get_name()));
    TextEncoder::new().encode_to_string(&all)
}

/// The name of every metric family the daemon can export (a snapshot with one of everything,
/// plus the health-check families), for checks of dashboards and docs against the daemon.
pub fn metric_names() -> prometheus::Result<Vec<String>> {
    let snap = Snapshot {
        reals: vec![RealSnapshot {
            service: "s".into(),
            real: "r".into(),
            ..Default::default()
        }],
        templates: vec![("s".into(), 1)],
        dataplane: xdpvs_common::STAT_NAMES
            .iter()
            .map(|n| (n.to_string(), 1))
            .collect(),
        vrrp: vec![crate::ha::director::VrrpStatus {
            name: "v".into(),
            rejected: [("ttl".to_string(), 1)].into_iter().collect(),
            ..Default::default()
        }],
        sync: Some(crate::ha::sync::service::SyncStatus {
            rejected: [("auth".to_string(), 1)].into_iter().collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let health = HealthMetrics::new()?;
    health.record(&HealthEvent {
        service: "s".into(),
        real: SocketAddr::from(([127, 0, 0, 1], 1)),
        up: false,
        transition: None,
        reason: Some("x".into()),
        cause: Some(FailureKind::Other),
        duration: Duration::from_millis(1),
        kind: CheckKind::Tcp,
    });
    let mut names: Vec<String> = families(&snap, &mut Monotonic::new())?
        .into_iter()
        .chain(health.registry.gather())
        .map(|f| f.get_name().to_string())
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// One scrape: snapshot and render, serialised so the monotonic state sees snapshots in order.
fn scrape(shared: &dyn ReadModel, mono: &Mutex<Monotonic>) -> Result<String> {
    let mut mono = mono.lock().unwrap_or_else(|p| p.into_inner());
    let snap = Snapshot::take(shared)?;
    let health = health_metrics()
        .map(|h| h.families_live(&snap))
        .unwrap_or_default();
    Ok(render(&snap, &mut mono, health)?)
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The status page served at `/` (like HAProxy's stats page, read-only).
const STATUS_PAGE: &str = include_str!("status_page.html");

async fn handle(
    req: Request<Incoming>,
    shared: Arc<dyn ReadModel>,
    mono: Arc<Mutex<Monotonic>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    if !["/metrics", "/", "/status.json"].contains(&path.as_str()) {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, / (status page) or /status.json\n",
        ));
    }
    if req.method() != Method::GET {
        let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return Ok(r);
    }
    if path == "/" {
        // The status page: static, read-only, no external assets; it polls /status.json.
        let mut r = reply(StatusCode::OK, STATUS_PAGE);
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        r.headers_mut().insert(
            hyper::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'",
            ),
        );
        return Ok(r);
    }
    if path == "/status.json" {
        let st = tokio::task::spawn_blocking(move || shared.status()).await;
        return Ok(match st {
            Ok(Ok(st)) => match serde_json::to_vec(&st) {
                Ok(body) => {
                    let mut r = reply(StatusCode::OK, body);
                    r.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    r
                }
                Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            },
            Ok(Err(e)) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")),
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        });
    }
    let result = tokio::task::spawn_blocking(move || scrape(&*shared, &mono)).await;
    Ok(match result {
        Ok(Ok(text)) => {
            let mut r = reply(StatusCode::OK, text);
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(prometheus::TEXT_FORMAT),
            );
            r
        }
        Ok(Err(e)) => {
            warn!(error = %format!("{e:#}"), "metrics scrape failed");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("scrape failed: {e:#}\n"),
            )
        }
        Err(e) => {
            warn!(error = %e, "metrics scrape task failed");
            reply(StatusCode::INTERNAL_SERVER_ERROR, "scrape failed\n")
        }
    })
}

/// Serves `GET /metrics` at `addr` until the task is aborted. If the address cannot be bound,
/// logs an error and returns it (the daemon keeps running without metrics).
pub async fn serve(addr: SocketAddr, shared: Arc<dyn ReadModel>) -> Result<()> {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            error!(%addr, error = %e, "cannot serve metrics; running without them");
            return Err(e).with_context(|| format!("binding the metrics address {addr}"));
        }
    };
    info!(%addr, "serving metrics at http://{addr}/metrics");
    let mono = Arc::new(Mutex::new(Monotonic::new()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let mono = mono.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, shared.clone(), mono.clone()));
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_survives_resets_and_vanishing() {
        let mut m = Monotonic::new();
        m.begin();
        assert_eq!(m.observe("a", 10), 10);
        m.finish();
        m.begin();
        assert_eq!(m.observe("a", 15), 15);
        m.finish();
        // The real got a new id: its counter restarted.
        m.begin();
        assert_eq!(m.observe("a", 3), 18);
        m.finish();
        m.begin();
        assert_eq!(m.observe("a", 7), 22);
        m.finish();
        // Gone from a snapshot (released), then back with a fresh counter above the old value.
        m.begin();
        m.finish();
        m.begin();
        assert_eq!(m.observe("a", 9), 31);
        m.finish();
        // Unchanged readings stay put; other series are independent.
        m.begin();
        assert_eq!(m.observe("a", 9), 31);
        assert_eq!(m.observe("b", 0), 0);
        m.finish();
    }

    fn snapshot(conns: [u64; 2]) -> Snapshot {
        Snapshot {
            templates: Vec::new(),
            reals: vec![
                RealSnapshot {
                    service: "web".into(),
                    real: "10.0.0.1:80".into(),
                    connections: conns[0],
                    packets: 100,
                    bytes: 6400,
                    active: 2,
                    inactive: 1,
                    up: true,
                    weight: 3,
                },
                RealSnapshot {
                    service: "web".into(),
                    real: "10.0.0.2:80".into(),
                    connections: conns[1],
                    packets: 50,
                    bytes: 3200,
                    active: 0,
                    inactive: 0,
                    up: false,
                    weight: 0,
                },
            ],
            dataplane: vec![
                ("new_conn".into(), 11),
                ("tx".into(), 150),
                ("unused13".into(), 0),
            ],
            conntrack_entries: 3,
            reloads_ok: 2,
            reloads_error: 1,
            last_reload_ok: 1_700_000_000,
            version: "0.1.0".into(),
            vrrp: vec![crate::ha::director::VrrpStatus {
                name: "front".into(),
                state: "master".into(),
                priority: 150,
                configured_priority: 150,
                transitions: 3,
                adverts_sent: 40,
                adverts_received: 7,
                rejected: [("ttl".to_string(), 2u64)].into_iter().collect(),
                ..Default::default()
            }],
            sync: None,
        }
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn exposition_of_a_snapshot() {
        let mut m = Monotonic::new();
        let text = render(&snapshot([7, 4]), &mut m, Vec::new()).expect("render");
        let r1 = "{real=\"10.0.0.1:80\",service=\"web\"}";
        let r2 = "{real=\"10.0.0.2:80\",service=\"web\"}";
        for (series, want) in [
            (format!("xdpvs_real_connections_total{r1}"), 7.0),
            (format!("xdpvs_real_connections_total{r2}"), 4.0),
            (format!("xdpvs_real_packets_total{r1}"), 100.0),
            (format!("xdpvs_real_bytes_total{r2}"), 3200.0),
            (format!("xdpvs_real_active_connections{r1}"), 2.0),
            (format!("xdpvs_real_inactive_connections{r1}"), 1.0),
            (format!("xdpvs_real_up{r1}"), 1.0),
            (format!("xdpvs_real_up{r2}"), 0.0),
            (format!("xdpvs_real_weight{r1}"), 3.0),
            (
                "xdpvs_dataplane_packets_total{action=\"new_conn\"}".into(),
                11.0,
            ),
            ("xdpvs_dataplane_packets_total{action=\"tx\"}".into(), 150.0),
            ("xdpvs_conntrack_entries".into(), 3.0),
            ("xdpvs_config_reloads_total{result=\"ok\"}".into(), 2.0),
            ("xdpvs_config_reloads_total{result=\"error\"}".into(), 1.0),
            (
                "xdpvs_config_last_reload_success_timestamp_seconds".into(),
                1.7e9,
            ),
            ("xdpvs_build_info{version=\"0.1.0\"}".into(), 1.0),
            ("xdpvs_vrrp_state{instance=\"front\"}".into(), 2.0),
            ("xdpvs_vrrp_priority{instance=\"front\"}".into(), 150.0),
            (
                "xdpvs_vrrp_transitions_total{instance=\"front\"}".into(),
                3.0,
            ),
            (
                "xdpvs_vrrp_adverts_total{direction=\"sent\",instance=\"front\"}".into(),
                40.0,
            ),
            (
                "xdpvs_vrrp_adverts_rejected_total{instance=\"front\",reason=\"ttl\"}".into(),
                2.0,
            ),
        ] {
            assert_eq!(value(&text, &series), Some(want), "{series} in:\n{text}");
        }
        assert!(!text.contains("unused"), "{text}");
        assert!(text.contains("# TYPE xdpvs_real_connections_total counter"));
        assert!(text.contains("# TYPE xdpvs_real_up gauge"));
        assert!(text.contains("# HELP xdpvs_real_weight "));

        // A reload re-created real 1 (counter back to 2): the exported value keeps growing.
        let text = render(&snapshot([2, 5]), &mut m, Vec::new()).expect("render");
        assert_eq!(
            value(&text, &format!("xdpvs_real_connections_total{r1}")),
            Some(9.0)
        );
        assert_eq!(
            value(&text, &format!("xdpvs_real_connections_total{r2}")),
            Some(5.0)
        );
    }

    #[test]
    fn duplicate_reals_are_exported_once() {
        let mut s = snapshot([1, 1]);
        s.reals[1].real = s.reals[0].real.clone();
        let text = render(&s, &mut Monotonic::new(), Vec::new()).expect("render");
        let n = text
            .lines()
            .filter(|l| l.starts_with("xdpvs_real_connections_total{"))
            .count();
        assert_eq!(n, 1, "{text}");
    }

    #[test]
    fn health_events_become_histogram_and_failures() {
        let ev = HealthEvent {
            service: "mtest".into(),
            real: "10.9.9.9:80".parse().expect("addr"),
            up: false,
            transition: None,
            reason: Some("connection refused".into()),
            cause: Some(FailureKind::Refused),
            duration: Duration::from_millis(3),
            kind: CheckKind::Tcp,
        };
        record_health(&ev);
        record_health(&HealthEvent {
            reason: None,
            cause: None,
            up: true,
            ..ev.clone()
        });
        let text = render(
            &Snapshot::default(),
            &mut Monotonic::new(),
            health_families(),
        )
        .expect("render");
        let labels = "real=\"10.9.9.9:80\",service=\"mtest\",type=\"tcp\"";
        assert_eq!(
            value(
                &text,
                &format!("xdpvs_health_check_duration_seconds_count{{{labels}}}")
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                &format!("xdpvs_health_check_duration_seconds_bucket{{{labels},le=\"0.005\"}}")
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                "xdpvs_health_check_failures_total{real=\"10.9.9.9:80\",reason=\"refused\",service=\"mtest\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert!(text.contains("# TYPE xdpvs_health_check_duration_seconds histogram"));
    }

    fn event(service: &str, real: &str, reason: Option<(FailureKind, String)>) -> HealthEvent {
        HealthEvent {
            service: service.into(),
            real: real.parse().expect("addr"),
            up: reason.is_none(),
            transition: None,
            cause: reason.as_ref().map(|r| r.0),
            reason: reason.map(|r| r.1),
            duration: Duration::from_millis(1),
            kind: CheckKind::Http,
        }
    }

    /// Whatever text a real makes a checker report, the label is one of the closed set.
    #[test]
    fn failure_reasons_are_a_closed_label_set() {
        let h = HealthMetrics::new().expect("registry");
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for i in 0..500 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let text: String = (0..(seed % 40))
                .map(|j| char::from(b' ' + ((seed >> (j % 57)) as u8 % 95)))
                .collect();
            let kind = FailureKind::ALL[i % FailureKind::ALL.len()];
            // Detail only from a checker that did not classify it: still a closed label.
            let cause = if (i / 15) % 3 == 0 { None } else { Some(kind) };
            let mut ev = event("svc", "10.9.9.1:80", Some((kind, format!("status {text}"))));
            ev.cause = cause;
            h.record(&ev);
        }
        let allowed: HashSet<&str> = FailureKind::ALL.iter().map(|k| k.label()).collect();
        let fams = h.registry.gather();
        let failures = fams
            .iter()
            .find(|f| f.get_name() == "xdpvs_health_check_failures_total")
            .expect("failures family");
        let reasons: HashSet<&str> = failures
            .get_metric()
            .iter()
            .flat_map(|m| m.get_label())
            .filter(|l| l.get_name() == "reason")
            .map(|l| l.get_value())
            .collect();
        assert!(reasons.is_subset(&allowed), "{reasons:?}");
        assert_eq!(reasons.len(), allowed.len(), "{reasons:?}");
        let total: u64 = failures
            .get_metric()
            .iter()
            .map(|m| m.get_counter().get_value() as u64)
            .sum();
        assert_eq!(total, 500);
    }

    /// A reload that removes a real (or a whole service) removes its health series.
    #[test]
    fn series_of_removed_reals_and_services_are_deleted() {
        let h = HealthMetrics::new().expect("registry");
        let fail = || Some((FailureKind::Timeout, "timeout after 1s".to_string()));
        h.record(&event("web", "10.9.9.1:80", fail()));
        h.record(&event("web", "10.9.9.2:80", fail()));
        h.record(&event("web", "10.9.9.2:80", None));
        h.record(&event("dns", "10.9.9.3:53", fail()));
        let series = |fams: &[MetricFamily]| -> Vec<String> {
            let mut v: Vec<String> = fams
                .iter()
                .flat_map(|f| f.get_metric().iter().map(move |m| (f.get_name(), m)))
                .map(|(name, m)| {
                    let l: Vec<String> = m
                        .get_label()
                        .iter()
                        .filter(|l| l.get_name() != "type" && l.get_name() != "reason")
                        .map(|l| l.get_value().to_string())
                        .collect();
                    format!("{name}{{{}}}", l.join(","))
                })
                .collect();
            v.sort();
            v.dedup();
            v
        };
        assert_eq!(series(&h.registry.gather()).len(), 6);
        // The live config: "web" keeps 10.9.9.1 only; "dns" is gone.
        let mut snap = snapshot([0, 0]);
        snap.reals.truncate(1);
        snap.reals[0].service = "web".into();
        snap.reals[0].real = "10.9.9.1:80".into();
        let left = series(&h.families_live(&snap));
        assert_eq!(
            left,
            vec![
                "xdpvs_health_check_duration_seconds{10.9.9.1:80,web}".to_string(),
                "xdpvs_health_check_failures_total{10.9.9.1:80,web}".to_string(),
            ]
        );
        // Re-added later, a real starts new series.
        h.record(&event("dns", "10.9.9.3:53", None));
        snap.reals.push(RealSnapshot {
            service: "dns".into(),
            real: "10.9.9.3:53".into(),
            ..Default::default()
        });
        assert_eq!(series(&h.families_live(&snap)).len(), 3);
    }
}
