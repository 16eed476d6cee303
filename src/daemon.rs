//! `xdpvs run`: the director daemon.
//!
//! Wires the parts together and owns the one path that changes the dataplane:
//! `apply()` = live config snapshot + runtime (health, admin overrides) -> [`state::desired`]
//! -> planner diff -> map writes. Everything that changes what the dataplane should do
//! (start-up, reload, a health transition, an admin command) ends in `apply()`; nothing else
//! writes the maps.
//!
//! What happens at start: the config is validated, the host checked (interface up, IP
//! forwarding on), then the dataplane is opened pinned. If an earlier daemon left one pinned
//! (a crash, a restart, an upgrade), it is adopted: the planner is rebuilt from the maps, each
//! real's health starts as the maps show it, the new program replaces the old on the pinned
//! link, and the config is applied as an ordinary diff, so no connection is dropped or moved.
//! At stop the dataplane stays pinned and forwarding (unless `on_exit = "detach"`).
//!
//! What happens on reload (SIGHUP, `xdpvs reload`, or a change of the config file): the file is
//! parsed and validated completely; if it is bad, the error is logged and nothing changes. If it
//! is good, it becomes the live snapshot (arc-swap), runtime overrides are dropped, the health
//! checker keeps the state of unchanged reals and starts added ones down, and `apply()` diffs it
//! into the maps: connections to reals that stay are untouched.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use arc_swap::ArcSwap;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{error, info, warn};
use xdpvs_common::STAT_NAMES;

use crate::admin::{RealStatus, Request, Response, ServiceStatus, Status};
use crate::config::{Config, Forwarding, OnExit, Protocol};
use crate::dataplane::{pin, plan::Planner, Dataplane, Origin};
use crate::ha::director::Vrrp;
use crate::ha::vrrp::io::Transition;
use crate::health::{HealthChecker, HealthEvent, Target};
use crate::state::{self, Health, Override, Runtime};

/// Why a reload was asked for: file-watcher events are debounced; an operator's request is not,
/// and gets the outcome back (`Err` = rejected, with why).
#[derive(Debug)]
pub enum ReloadTrigger {
    FileChanged,
    Admin(std::sync::mpsc::SyncSender<Result<(), String>>),
}

pub use crate::dataplane::Programmer;

/// Counters about the daemon itself (exported as metrics).
#[derive(Default)]
pub struct DaemonStats {
    pub reloads_ok: AtomicU64,
    pub reloads_error: AtomicU64,
    /// Unix time of the last successful (re)load.
    pub last_reload_ok: AtomicU64,
}

/// State shared by the daemon's tasks.
pub struct Shared {
    pub config_path: PathBuf,
    /// The live configuration: one immutable snapshot, swapped whole on reload.
    pub config: ArcSwap<Config>,
    pub runtime: Mutex<Runtime>,
    /// Readers (`list`, metrics scrapes, the expiry sweep) share it; only map writes exclude
    /// them, so a scrape or a sweep of a large table never waits for another.
    pub programmer: RwLock<Programmer>,
    pub stats: DaemonStats,
    /// The VRRP instances (none without `[[vrrp]]`); taken at stop to leave the elections.
    pub vrrp: Mutex<Option<Vrrp>>,
    /// Counters of the connection-state sync (none without `[sync]`).
    pub sync: Mutex<Option<Arc<crate::ha::sync::service::SyncStats>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of the daemon's locks leaves consistent data (every critical section
    // either completes its map writes or returns an error), so poisoning is not fatal.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Shared {
    /// Recomputes the desired state and writes the difference to the maps.
    pub fn apply(&self) -> Result<()> {
        self.apply_counted().map(|_| ())
    }

    /// [`apply`](Self::apply), returning how many map writes it took.
    pub fn apply_counted(&self) -> Result<usize> {
        let cfg = self.config.load();
        let desired = {
            let rt = lock(&self.runtime);
            state::desired(&cfg, &rt)
        };
        write(&self.programmer).apply(&desired)
    }

    /// A VRRP instance changed state: the VIPs this director owns change with it.
    fn on_vrrp(&self, t: &Transition) {
        let standby = match lock(&self.vrrp).as_ref() {
            Some(v) => v.standby_vips(),
            None => return,
        };
        let changed = {
            let mut rt = lock(&self.runtime);
            let changed = rt.standby_vips != standby;
            rt.standby_vips = standby;
            changed
        };
        let master = t.to == crate::ha::vrrp::machine::State::Master;
        if master {
            // The reals' neighbour entries may be gone or stuck (a link that lost its carrier)
            // and the XDP program cannot resolve them itself.
            let cfg = self.config.load();
            Dataplane::reresolve_neighbours(&cfg.director.interface, real_addresses(&cfg));
        }
        let role = if master {
            "forwarding for its addresses"
        } else {
            "not forwarding for its addresses"
        };
        info!(vrrp = %t.name, from = %t.from, to = %t.to, master = ?t.master, priority = t.priority, "vrrp: {role}");
        if changed {
            if let Err(e) = self.apply() {
                error!(error = %format!("{e:#}"), "applying a VRRP transition to the dataplane failed");
            }
        }
    }

    /// Tracked services: instances lower their priority while one has no healthy real.
    fn track(&self) {
        let cfg = self.config.load();
        let health = lock(&self.runtime).health.clone();
        if let Some(v) = lock(&self.vrrp).as_mut() {
            v.track(&cfg, &health);
        }
    }

    fn real_addr(&self, service: &str, real: &str) -> Result<SocketAddr> {
        let cfg = self.config.load();
        let svc = cfg
            .service(service)
            .ok_or_else(|| anyhow!("no service named {service:?}"))?;
        let wanted: Vec<SocketAddr> = match real.parse::<SocketAddr>() {
            Ok(a) => vec![a],
            Err(_) => match real.parse::<std::net::IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, svc.address.port())],
                Err(_) => return Err(anyhow!("{real:?} is not an address (ip or ip:port)")),
            },
        };
        svc.reals
            .iter()
            .map(|r| r.address)
            .find(|a| wanted.contains(a))
            .ok_or_else(|| anyhow!("service {service} has no real {real}"))
    }

    /// Handles one admin request.
    pub fn admin(&self, req: Request, reload: &mpsc::UnboundedSender<ReloadTrigger>) -> Response {
        let change = |service: &str, real: &str, ov: Option<Override>| -> Result<String> {
            let addr = self.real_addr(service, real)?;
            {
                let mut rt = lock(&self.runtime);
                match ov {
                    Some(o) => rt.overrides.insert((service.to_string(), addr), o),
                    None => rt.overrides.remove(&(service.to_string(), addr)),
                };
            }
            self.apply()?;
            Ok(format!(
                "{service} {addr}: {}",
                match ov {
                    Some(Override::Weight(w)) =>
                        format!("weight {w} (until the next reload or restart)"),
                    Some(Override::Drain) =>
                        "draining: no new connections (until `enable`, the next reload or restart)"
                            .into(),
                    None => "back to its configured weight".into(),
                }
            ))
        };
        let result = match req {
            Request::List => {
                return match self.status() {
                    Ok(s) => Response {
                        status: Some(s),
                        ..Response::ok("")
                    },
                    Err(e) => Response::error(format!("{e:#}")),
                }
            }
            Request::Weight {
                service,
                real,
                weight,
            } => {
                if weight > 65535 {
                    Err(anyhow!("weight {weight} is out of range (0..=65535)"))
                } else {
                    change(&service, &real, Some(Override::Weight(weight)))
                }
            }
            Request::Drain { service, real } => change(&service, &real, Some(Override::Drain)),
            Request::Enable { service, real } => change(&service, &real, None),
            Request::Reload => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                if reload.send(ReloadTrigger::Admin(tx)).is_err() {
                    Err(anyhow!("the daemon is shutting down"))
                } else {
                    // Runs on the blocking pool: waiting here stalls nothing else.
                    match rx.recv_timeout(Duration::from_secs(30)) {
                        Ok(Ok(())) => Ok("reloaded".to_string()),
                        Ok(Err(why)) => Err(anyhow!(
                            "reload rejected; the running configuration keeps serving: {why}"
                        )),
                        Err(_) => Err(anyhow!("reload still in progress")),
                    }
                }
            }
        };
        match result {
            Ok(m) => Response::ok(m),
            Err(e) => Response::error(format!("{e:#}")),
        }
    }

    /// The live table: config names + effective state + dataplane counters.
    pub fn status(&self) -> Result<Status> {
        let cfg = self.config.load();
        let rt = lock(&self.runtime).clone();
        let desired = state::desired(&cfg, &rt);
        let p = read(&self.programmer);
        let mut services = Vec::new();
        for (sc, ds) in cfg.services.iter().zip(desired.services.iter()) {
            let mut reals = Vec::new();
            let counters = |addr: SocketAddr| -> Result<(u64, u64, u64, u64, u64)> {
                match p.planner.real_id(&ds.key, addr) {
                    Some(id) => {
                        let c = p.dp.real_conns(id)?;
                        let s = p.dp.real_stats(id)?;
                        Ok((c.active, c.inactive, s.conns, s.packets, s.bytes))
                    }
                    None => Ok((0, 0, 0, 0, 0)),
                }
            };
            for (rc, dr) in sc.reals.iter().zip(ds.reals.iter()) {
                let id = (sc.name.clone(), rc.address);
                let health = rt.health.get(&id);
                let up = health.map(|h| h.up).unwrap_or(true);
                let (active, inactive, connections, packets, bytes) = counters(rc.address)?;
                reals.push(RealStatus {
                    address: rc.address.to_string(),
                    weight: if dr.cut { 0 } else { dr.weight },
                    configured_weight: rc.weight,
                    admin: rt.overrides.get(&id).copied(),
                    up,
                    health: if up { "up" } else { "down" }.to_string(),
                    last_failure: health.and_then(|h| h.last_failure.clone()),
                    in_table: !dr.cut,
                    fallback: false,
                    active,
                    inactive,
                    connections,
                    packets,
                    bytes,
                });
            }
            if let Some(f) = sc.fallback {
                let (active, inactive, connections, packets, bytes) = counters(f)?;
                reals.push(RealStatus {
                    address: f.to_string(),
                    up: true,
                    health: "fallback".into(),
                    in_table: true,
                    fallback: true,
                    active,
                    inactive,
                    connections,
                    packets,
                    bytes,
                    ..Default::default()
                });
            }
            // Reals removed by a reload whose connections are still draining.
            for d in p.planner.draining() {
                if d.service == ds.key
                    && !sc.reals.iter().any(|r| r.address == d.address)
                    && sc.fallback != Some(d.address)
                {
                    let c = p.dp.real_conns(d.id)?;
                    let s = p.dp.real_stats(d.id)?;
                    reals.push(RealStatus {
                        address: d.address.to_string(),
                        health: if d.cut { "cut" } else { "draining" }.into(),
                        active: c.active,
                        inactive: c.inactive,
                        connections: s.conns,
                        packets: s.packets,
                        bytes: s.bytes,
                        ..Default::default()
                    });
                }
            }
            services.push(ServiceStatus {
                name: sc.name.clone(),
                address: sc.address.to_string(),
                protocol: match sc.protocol {
                    Protocol::Tcp => "tcp",
                    Protocol::Udp => "udp",
                }
                .into(),
                scheduler: state::sched_name(ds.sched).into(),
                forwarding: match sc.forwarding {
                    Forwarding::Dr => "dr",
                    Forwarding::Nat => "nat",
                }
                .into(),
                fallback: sc.fallback.map(|f| f.to_string()),
                reals,
            });
        }
        let stats = p.dp.stats()?;
        let dataplane = STAT_NAMES
            .iter()
            .zip(stats.iter())
            .filter(|(n, _)| !n.starts_with("unused"))
            .map(|(n, v)| (n.to_string(), *v))
            .collect();
        Ok(Status {
            version: env!("CARGO_PKG_VERSION").into(),
            config: self.config_path.display().to_string(),
            services,
            // Every live entry counts once against its real, so the sum over the reals holding
            // an id is the table's live size, without walking the table.
            conntrack_entries: p
                .planner
                .ids()
                .into_iter()
                .map(|id| {
                    p.dp.real_conns(id)
                        .map(|c| c.active + c.inactive)
                        .unwrap_or(0)
                })
                .sum(),
            dataplane,
            pin_path: p.dp.pin_dir().map(|d| d.display().to_string()),
            offline: None,
            vrrp: lock(&self.vrrp)
                .as_ref()
                .map(|v| v.status())
                .unwrap_or_default(),
            sync: match (lock(&self.sync).as_ref(), cfg.sync.as_ref()) {
                (Some(st), Some(c)) => {
                    Some(st.status(c, stats[xdpvs_common::stat::SYNC_EVENTS_LOST as usize]))
                }
                _ => None,
            },
        })
    }
}

/// Health-check targets of a configuration: every configured real with its check.
pub fn targets(cfg: &Config) -> Vec<Target> {
    cfg.services
        .iter()
        .flat_map(|s| {
            s.reals.iter().map(move |r| Target {
                service: s.name.clone(),
                real: r.address,
                check: r.check.clone(),
            })
        })
        .collect()
}

/// Health states as the runtime holds them, from the checker.
fn health_from(checker: &HealthChecker) -> HashMap<(String, SocketAddr), Health> {
    checker
        .states()
        .into_iter()
        .map(|(svc, real, st)| {
            (
                (svc, real),
                Health {
                    up: st.up,
                    last_failure: st.last_failure,
                },
            )
        })
        .collect()
}

/// How `xdpvs run` was asked to start.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Discard a pinned dataplane (and its connections) instead of adopting it.
    pub fresh: bool,
}

/// Runs the daemon until SIGINT/SIGTERM.
pub async fn run(config_path: &Path, opts: RunOptions) -> Result<()> {
    let config = Config::load(config_path).map_err(|e| anyhow!("{e}"))?;
    let director = config.director.clone();
    info!(
        config = %config_path.display(),
        services = config.services.len(),
        "starting xdpvs {}",
        env!("CARGO_PKG_VERSION")
    );
    crate::preflight::check(&config)?;

    let pin_dir = director
        .pin_path
        .clone()
        .unwrap_or_else(|| pin::default_dir(&director.interface));
    let _lock = pin::lock(
        &pin_dir,
        &format!(
            "config {}, interface {}",
            config_path.display(),
            director.interface
        ),
    )?;
    let (mut dp, origin) = Dataplane::open(
        &pin_dir,
        crate::dataplane::Tables {
            conns: director.conn_table_size,
            embryos: director.embryonic_table_size,
        },
        opts.fresh,
    )?;
    let planner = match origin {
        Origin::Fresh => Planner::new(),
        Origin::Adopted => Planner::adopt(&dp.view()?)
            .context("adopting the pinned dataplane (`xdpvs run --fresh` starts clean)")?,
    };
    let mode = dp.attach(&director.interface, director.xdp_mode)?;
    match origin {
        Origin::Fresh => info!(
            interface = %director.interface,
            mode,
            pin_path = %pin_dir.display(),
            "XDP program attached; dataplane pinned"
        ),
        Origin::Adopted => info!(
            interface = %director.interface,
            pin_path = %pin_dir.display(),
            reals = planner.ids().len(),
            "adopted the pinned dataplane: new program swapped in on the pinned link, \
             connections and counters kept"
        ),
    }

    let (events_tx, mut events_rx) = mpsc::unbounded_channel::<HealthEvent>();
    let mut checker = match origin {
        Origin::Fresh => HealthChecker::start(targets(&config), events_tx),
        Origin::Adopted => {
            let known = inherited_health(&config, &planner);
            HealthChecker::start_adopted(targets(&config), events_tx, &known)
        }
    };
    let runtime = Runtime {
        health: health_from(&checker),
        overrides: HashMap::new(),
        // Until an election makes this director master, it owns none of the VRRP addresses.
        standby_vips: Vrrp::listed(&config.vrrp),
    };
    let vrrp_configs = config.vrrp.clone();
    let shared = Arc::new(Shared {
        config_path: config_path.to_path_buf(),
        config: ArcSwap::from_pointee(config),
        runtime: Mutex::new(runtime),
        programmer: RwLock::new(Programmer { dp, planner }),
        stats: DaemonStats::default(),
        vrrp: Mutex::new(None),
        sync: Mutex::new(None),
    });
    let first = shared
        .apply_counted()
        .context("programming the dataplane")?;
    if origin == Origin::Adopted {
        info!(
            map_writes = first,
            "configuration applied to the adopted dataplane"
        );
    }
    shared
        .stats
        .last_reload_ok
        .store(now_unix(), Ordering::SeqCst);
    prime_neighbours(&shared);

    // The elections start once the dataplane holds the configuration, so a director that
    // becomes master forwards at once.
    let (vrrp_tx, mut vrrp_rx) = mpsc::unbounded_channel::<Transition>();
    if !vrrp_configs.is_empty() {
        let v = Vrrp::start(&vrrp_configs, vrrp_tx).context("starting VRRP")?;
        *lock(&shared.vrrp) = Some(v);
        shared.track();
    }

    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel::<ReloadTrigger>();
    let admin_task = tokio::spawn(serve_admin(
        director.admin_socket.clone(),
        shared.clone(),
        reload_tx.clone(),
    ));
    let _watcher = if director.watch_config {
        watch_config(config_path, reload_tx.clone())
            .map_err(|e| warn!(error = %e, "not watching the config file; reload with SIGHUP"))
            .ok()
    } else {
        None
    };
    let sweeper = tokio::spawn(sweep_loop(shared.clone()));
    // Connection-state sync with the peer director (`[sync]`); the first apply above already
    // set SETTINGS_F_SYNC, so the dataplane reports events from now on.
    let sync = match shared.config.load().sync.clone() {
        None => None,
        Some(cfg) => {
            let ring = write(&shared.programmer)
                .dp
                .take_sync_events()
                .ok_or_else(|| anyhow!("the sync event ring buffer is already taken"))?;
            let tables: Arc<dyn crate::ha::sync::service::Tables> = shared.clone();
            let handle = crate::ha::sync::service::start(&cfg, tables, ring)?;
            *lock(&shared.sync) = Some(handle.stats.clone());
            Some(handle)
        }
    };
    let mut metrics_task = None;
    if let Some(addr) = director.metrics {
        metrics_task = Some(tokio::spawn(crate::metrics::serve(addr, shared.clone())));
    }

    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    info!("ready");
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                let _ = reload(&shared, &mut checker);
            }
            Some(trigger) = reload_rx.recv() => {
                if matches!(trigger, ReloadTrigger::FileChanged) {
                    // Coalesce a burst of events (editors write files in several steps).
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // One reload answers every request queued meanwhile.
                let mut waiting = Vec::new();
                let mut next = Some(trigger);
                while let Some(t) = next {
                    if let ReloadTrigger::Admin(reply) = t {
                        waiting.push(reply);
                    }
                    next = reload_rx.try_recv().ok();
                }
                let outcome = reload(&shared, &mut checker);
                for reply in waiting {
                    let _ = reply.try_send(outcome.clone());
                }
            }
            Some(ev) = events_rx.recv() => on_health(&shared, ev),
            Some(t) = vrrp_rx.recv() => shared.on_vrrp(&t),
        }
    }
    let vrrp = lock(&shared.vrrp).take();
    if let Some(v) = vrrp {
        // Leave the elections first (priority 0: the peer takes over after its Skew_Time), then
        // stop forwarding for their addresses, so a dataplane left pinned never competes with
        // the new master.
        v.stop().await;
        // The backup takes over after its Skew_Time, which is shorter than one advert interval;
        // until its gratuitous ARP the clients still send here, so keep forwarding that long.
        let grace = shared
            .config
            .load()
            .vrrp
            .iter()
            .map(|c| c.advert_interval)
            .max()
            .unwrap_or_default();
        tokio::time::sleep(grace + Duration::from_millis(20)).await;
        lock(&shared.runtime).standby_vips = Vrrp::listed(&shared.config.load().vrrp);
        if let Err(e) = shared.apply() {
            error!(error = %format!("{e:#}"), "marking the VRRP addresses standby failed");
        }
        info!("left the VRRP elections; the dataplane no longer forwards for their addresses");
    }
    checker.shutdown();
    drop(sync);
    admin_task.abort();
    sweeper.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&director.admin_socket);
    match director.on_exit {
        OnExit::Keep => info!(
            pin_path = %pin_dir.display(),
            "stopped; the dataplane stays pinned and keeps forwarding: open connections to their \
             reals, new ones by the last weights written. Health checks are paused until the \
             next `xdpvs run` adopts it (`xdpvs detach` removes it)"
        ),
        OnExit::Detach => {
            write(&shared.programmer).dp.unpin()?;
            info!(pin_path = %pin_dir.display(), "stopped; XDP program detached and pins removed (on_exit = \"detach\")");
        }
    }
    drop(shared);
    Ok(())
}

/// Each configured real's up/down state as an adopted dataplane shows it: up if it takes new
/// connections (weight > 0 in its service's live set), down if it is quiesced (weight 0 while
/// configured above 0) or cut. Reals the dataplane does not know are left to their check's
/// `initially`.
fn inherited_health(cfg: &Config, planner: &Planner) -> HashMap<(String, SocketAddr), bool> {
    let mut known = HashMap::new();
    for s in &cfg.services {
        let key = state::service_key(s.address, s.protocol);
        for r in &s.reals {
            let up = match planner.live_weight(&key, r.address) {
                Some(w) if w > 0 => Some(true),
                Some(_) if r.weight > 0 => Some(false),
                Some(_) => None,
                None if planner.real_id(&key, r.address).is_some() => Some(false),
                None => None,
            };
            if let Some(up) = up {
                known.insert((s.name.clone(), r.address), up);
            }
        }
    }
    known
}

fn on_health(shared: &Shared, ev: HealthEvent) {
    crate::metrics::record_health(&ev);
    let id = (ev.service.clone(), ev.real);
    let changed = {
        let mut rt = lock(&shared.runtime);
        let h = rt.health.entry(id).or_insert(Health {
            up: ev.up,
            last_failure: None,
        });
        if let Some(r) = &ev.reason {
            h.last_failure = Some(r.clone());
        }
        let changed = h.up != ev.up;
        h.up = ev.up;
        changed
    };
    if let Some(t) = &ev.transition {
        if ev.up {
            info!(service = %ev.service, real = %ev.real, "real is up: {t}");
        } else {
            warn!(service = %ev.service, real = %ev.real, "real is down: {t}");
        }
    }
    if changed {
        if let Err(e) = shared.apply() {
            error!(error = %format!("{e:#}"), "applying a health change to the dataplane failed");
        }
        shared.track();
    }
}

/// Reloads the config file; `Err` says why it was rejected (nothing changed then).
fn reload(shared: &Shared, checker: &mut HealthChecker) -> Result<(), String> {
    let path = shared.config_path.clone();
    match Config::load(&path) {
        Err(e) => {
            shared.stats.reloads_error.fetch_add(1, Ordering::SeqCst);
            error!("reload rejected, the running configuration keeps serving: {e}");
            Err(e.to_string())
        }
        Ok(mut new) => {
            let old = shared.config.load_full();
            if new.director != old.director {
                // Only the idle timeouts apply live; the rest needs a restart.
                let timeouts = new.director.timeouts;
                if new.director.interface != old.director.interface
                    || new.director.xdp_mode != old.director.xdp_mode
                    || new.director.conn_table_size != old.director.conn_table_size
                    || new.director.embryonic_table_size != old.director.embryonic_table_size
                    || new.director.admin_socket != old.director.admin_socket
                    || new.director.metrics != old.director.metrics
                    || new.director.watch_config != old.director.watch_config
                {
                    warn!("[director] changes other than timeouts take effect at the next restart");
                }
                new.director = old.director.clone();
                new.director.timeouts = timeouts;
            }
            if new.vrrp != old.vrrp {
                warn!("[[vrrp]] changes take effect at the next restart; the running elections keep their settings");
                new.vrrp = old.vrrp.clone();
            }
            if new.sync != old.sync {
                warn!("[sync] changes take effect at the next restart");
                new.sync = old.sync.clone();
            }
            // The checks change only once the dataplane has taken the new state: a rejected
            // reload must leave every check of the running configuration in place (and the
            // runtime overrides too). Until then the new state uses the health the checker
            // would start from.
            let new_targets = targets(&new);
            let before = {
                let mut rt = lock(&shared.runtime);
                let before = rt.clone();
                rt.overrides.clear();
                rt.health = checker
                    .preview(&new_targets)
                    .into_iter()
                    .map(|(svc, real, st)| {
                        let h = Health {
                            up: st.up,
                            last_failure: st.last_failure,
                        };
                        ((svc, real), h)
                    })
                    .collect();
                before
            };
            let services = new.services.len();
            shared.config.store(Arc::new(new));
            match shared.apply() {
                Ok(()) => {
                    checker.update(new_targets);
                    lock(&shared.runtime).health = health_from(checker);
                    // A check that changed state since the preview (its event is still queued).
                    if let Err(e) = shared.apply() {
                        error!(error = %format!("{e:#}"), "applying health after a reload failed");
                    }
                    shared.stats.reloads_ok.fetch_add(1, Ordering::SeqCst);
                    shared
                        .stats
                        .last_reload_ok
                        .store(now_unix(), Ordering::SeqCst);
                    info!(services, "configuration reloaded");
                    shared.track();
                    prime_neighbours(shared);
                    Ok(())
                }
                Err(e) => {
                    // The planner leaves the maps as they were: restore the old snapshot and
                    // runtime (the checks were not touched).
                    shared.config.store(old);
                    *lock(&shared.runtime) = before;
                    shared.stats.reloads_error.fetch_add(1, Ordering::SeqCst);
                    error!("reload rejected by the dataplane: {e:#}");
                    Err(format!("{e:#}"))
                }
            }
        }
    }
}

fn real_addresses(cfg: &Config) -> Vec<SocketAddr> {
    cfg.services
        .iter()
        .flat_map(|s| s.reals.iter().map(|r| r.address).chain(s.fallback))
        .collect()
}

fn prime_neighbours(shared: &Shared) {
    Dataplane::prime_neighbours(real_addresses(&shared.config.load()));
}

/// Once a second: retire idle connection entries, free the ids of drained reals; every few
/// seconds re-prime the reals' neighbour entries.
async fn sweep_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut fib = FibWatch::default();
    loop {
        tick.tick().await;
        n += 1;
        if let Ok(stats) = read(&shared.programmer).dp.stats() {
            fib.observe(
                stats[xdpvs_common::stat::DROP_FIB as usize],
                &shared.config.load().director.interface,
            );
        }
        let s = shared.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<()> {
            let report = read(&s.programmer).dp.sweep()?;
            if report.retired > 0 {
                tracing::debug!(retired = report.retired, entries = report.entries, "sweep");
            }
            let mut p = write(&s.programmer);
            let Programmer { dp, planner } = &mut *p;
            let writes = planner.release(|id| {
                dp.real_conns(id)
                    .map(|c| c.active + c.inactive)
                    .unwrap_or(1)
            });
            if !writes.is_empty() {
                dp.write(&writes)?;
            }
            Ok(())
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %format!("{e:#}"), "connection-table sweep failed"),
            Err(e) => warn!(error = %e, "connection-table sweep task failed"),
        }
        if n.is_multiple_of(5) {
            prime_neighbours(&shared);
        }
    }
}

/// Warns (at most once a minute) while `drop_fib` rises, naming the likely cause: the FIB
/// refuses lookups while forwarding is off, or has no route to a real.
#[derive(Default)]
struct FibWatch {
    last: Option<u64>,
    warned: Option<std::time::Instant>,
}

impl FibWatch {
    fn observe(&mut self, drop_fib: u64, interface: &str) {
        let rose = self.last.map(|l| drop_fib.saturating_sub(l)).unwrap_or(0);
        self.last = Some(drop_fib);
        let quiet = self
            .warned
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if rose == 0 || !quiet {
            return;
        }
        self.warned = Some(std::time::Instant::now());
        let cause = crate::preflight::forwarding_problem("ipv4", interface).unwrap_or_else(|| {
            "the kernel has no route to a real (check `ip route get REAL`) or forwarding is \
             restricted"
                .to_string()
        });
        warn!(
            dropped = rose,
            "packets to a VIP are being dropped because the FIB lookup toward the real fails \
             (drop_fib): {cause}"
        );
    }
}

async fn serve_admin(
    path: PathBuf,
    shared: Arc<Shared>,
    reload: mpsc::UnboundedSender<ReloadTrigger>,
) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    // A stale socket from a crashed run would make bind fail.
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(anyhow!(
                "another xdpvs is serving the admin socket {}",
                path.display()
            ));
        }
        std::fs::remove_file(&path)?;
    }
    // Create the socket with no permissions for group/other from the start (no window in
    // which another user could connect), then set 0600 explicitly.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(&path);
    unsafe { libc::umask(old) };
    let listener =
        listener.with_context(|| format!("binding the admin socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    info!(socket = %path.display(), "admin socket ready (mode 0600)");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let shared = shared.clone();
        let reload = reload.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_admin(stream, shared, reload).await {
                warn!(error = %format!("{e:#}"), "admin request failed");
            }
        });
    }
}

async fn handle_admin(
    stream: UnixStream,
    shared: Arc<Shared>,
    reload: mpsc::UnboundedSender<ReloadTrigger>,
) -> Result<()> {
    // Only root may talk to the daemon, whatever the socket's mode says.
    let cred = stream.peer_cred()?;
    let (read, mut write) = stream.into_split();
    let resp = if cred.uid() != 0 {
        Response::error("permission denied: the admin socket is for root")
    } else {
        let mut line = String::new();
        let mut reader = BufReader::new(read).take(64 * 1024);
        tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
            .await
            .map_err(|_| anyhow!("admin client sent no request"))??;
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => tokio::task::spawn_blocking(move || shared.admin(req, &reload)).await?,
            Err(e) => Response::error(format!("bad request: {e}")),
        }
    };
    let mut out = serde_json::to_vec(&resp)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await?;
    Ok(())
}

use tokio::io::AsyncReadExt as _;

/// Watches the config file's directory and triggers a reload when the file changes.
fn watch_config(
    path: &Path,
    reload: mpsc::UnboundedSender<ReloadTrigger>,
) -> Result<notify::RecommendedWatcher> {
    use notify::{RecursiveMode, Watcher};
    let file = path
        .canonicalize()
        .with_context(|| format!("resolving {}", path.display()))?;
    let dir = file
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", file.display()))?
        .to_path_buf();
    let name = file.file_name().map(|n| n.to_os_string());
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            let ours = ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name);
            let relevant = matches!(
                ev.kind,
                notify::EventKind::Modify(_) | notify::EventKind::Create(_)
            );
            if ours && relevant {
                let _ = reload.send(ReloadTrigger::FileChanged);
            }
        }
    })?;
    w.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(w)
}
