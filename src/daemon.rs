//! `xdpvs run`: the director daemon.
//!
//! Wires the parts together. The data flows one way: config -> [`state::desired`] (with the
//! runtime inputs: health, admin overrides, VRRP) -> planner diff -> map writes. The planner
//! and the maps belong to one thread, the dataplane [`Owner`]; everything that changes what the
//! dataplane should do (start-up, reload, a health transition, a VRRP transition, an admin
//! command, the sweep, the sync receiver) sends it a request and awaits the reply. `list` and
//! metrics read through the owner's read-only [`Reader`](crate::dataplane::owner::Reader)
//! ([`crate::status`]), so they never wait for a write.
//!
//! The event loop below only dispatches: signals, reload triggers, health and VRRP events. It
//! never blocks: a reload runs as its own task (file read and parsing on the blocking pool),
//! applies are sent to the owner, neighbour priming runs on the blocking pool. Health
//! transitions that arrive together become one apply.
//!
//! What happens at start: the config is validated, the host checked (interface up, IP
//! forwarding on), then the dataplane is opened pinned. If an earlier daemon left one pinned
//! (a crash, a restart, an upgrade), it is adopted: the planner is rebuilt from the maps, each
//! real's health starts as the maps show it, the new program replaces the old on the pinned
//! link, and the config is applied as an ordinary diff, so no connection is dropped or moved.
//! At stop the dataplane stays pinned and forwarding (unless `on_exit = "detach"`).
//!
//! What happens on reload (SIGHUP, `xdpvs reload`, or a change of the config file; see
//! `reload()`): the file is read and validated completely off the async workers; if it is bad
//! or unreadable (deleted, no permission), the error is logged and nothing changes. If it is
//! good, it becomes the live snapshot (arc-swap), runtime overrides are dropped, the health
//! checker keeps the state of unchanged reals and starts added ones down, and the owner diffs
//! it into the maps: connections to reals that stay are untouched. Triggers that arrive during
//! a reload are answered by one more reload after it. Signals, `list` and scrapes are served
//! throughout.
//!
//! The director's interface going away (`ip link del`) takes the XDP program with it: the sweep
//! notices within a second, logs it once, and re-attaches the program when an interface of
//! that name is back (the maps, and so the connection table, are kept meanwhile).
//!
//! Under systemd (`Type=notify`) each of these steps is reported through [`crate::notify`]:
//! READY=1 once the dataplane holds the configuration, RELOADING=1 ... READY=1 around every
//! reload, STOPPING=1 at stop, and a STATUS= line ([`Shared::status_line`]) that follows the
//! reals' health, the VRRP roles, the interface and the last rejected reload.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::admin::{server, Request, Response, Status};
use crate::config::{Config, OnExit, XdpMode};
use crate::dataplane::owner::{Owner, Pending};
use crate::dataplane::{pin, plan::Planner, Dataplane, Origin, Programmer};
use crate::ha::director::Vrrp;
use crate::ha::vrrp::io::Transition;
use crate::health::flap::{Due, Flaps};
use crate::health::{HealthChecker, HealthEvent, Target};
use crate::notify::Notifier;
use crate::state::{self, Health, Override, Runtime};
use crate::status::{DaemonStats, ReadModel, Sources};

/// Why a reload was asked for: file-watcher events are debounced; an operator's request is not,
/// and gets the outcome back (`Err` = rejected, with why).
#[derive(Debug)]
pub enum ReloadTrigger {
    FileChanged,
    Admin(oneshot::Sender<Result<(), String>>),
}

/// State shared by the daemon's tasks.
pub struct Shared {
    pub config_path: PathBuf,
    /// The live configuration: one immutable snapshot, swapped whole on reload.
    pub config: ArcSwap<Config>,
    pub runtime: Mutex<Runtime>,
    /// The one writer of the maps.
    pub owner: Owner,
    pub stats: DaemonStats,
    /// The VRRP instances (none without `[[vrrp]]`); taken at stop to leave the elections.
    pub vrrp: Mutex<Option<Vrrp>>,
    /// Counters of the connection-state sync (none without `[sync]`).
    pub sync: Mutex<Option<Arc<crate::ha::sync::service::SyncStats>>>,
    reload: mpsc::UnboundedSender<ReloadTrigger>,
    /// sd_notify to the service manager (a no-op outside systemd).
    notify: Notifier,
    /// What the STATUS= line says besides the reals' health.
    notes: Mutex<StatusNotes>,
}

/// The parts of the STATUS= line that are events rather than state the daemon keeps anyway.
#[derive(Default)]
struct StatusNotes {
    /// VRRP instance name -> its state ("master", "backup", ...).
    vrrp: BTreeMap<String, String>,
    /// The director's interface is gone (the XDP program with it).
    interface_gone: bool,
    /// Why the last reload was rejected, until one is accepted.
    reload_rejected: Option<String>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of the daemon's locks leaves consistent data (every critical section
    // either completes or returns an error), so poisoning is not fatal.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Awaits `p` in its own task and logs its failure: for applies sent from the event loop, which
/// must not wait for the owner.
fn log_failure(p: Pending<usize>, what: &'static str) {
    tokio::spawn(async move {
        if let Err(e) = p.await {
            error!(error = %format!("{e:#}"), "{what} failed");
        }
    });
}

impl Shared {
    /// The desired state of the live config and runtime, sent to the owner now: requests are
    /// served in the order sent, so the newest state is written last.
    pub fn send_apply(&self) -> Pending<usize> {
        // Computed and sent under the runtime lock: two callers (the event loop, an admin
        // request, the reload task) can then never send their states in the other order than
        // they read their inputs, so the owner always writes the newest state last.
        let rt = lock(&self.runtime);
        let cfg = self.config.load();
        let desired = state::desired(&cfg, &rt);
        self.owner.send_apply(desired)
    }

    /// Recomputes the desired state and writes the difference; returns how many writes it took.
    pub async fn apply(&self) -> Result<usize> {
        self.send_apply().await
    }

    /// One line for `systemctl status`: the services, how many reals are up, and what else
    /// an operator should know (VRRP roles, a lost interface, a rejected reload).
    fn status_line(&self) -> String {
        let cfg = self.config.load();
        let reals: usize = cfg.services.iter().map(|s| s.reals.len()).sum();
        let up = lock(&self.runtime).health.values().filter(|h| h.up).count();
        let services = cfg.services.len();
        let mut line = format!(
            "{services} service{}, {up}/{reals} reals up, interface {}",
            if services == 1 { "" } else { "s" },
            cfg.director.interface
        );
        let notes = lock(&self.notes);
        if notes.interface_gone {
            line.push_str(" (GONE: nothing is forwarded until it is back)");
        }
        for (name, state) in &notes.vrrp {
            line.push_str(&format!("; vrrp {name}: {state}"));
        }
        if let Some(why) = &notes.reload_rejected {
            line.push_str(&format!(
                "; last reload rejected, the previous configuration keeps serving: {why}"
            ));
        }
        line
    }

    /// Sends the STATUS= line if it changed.
    fn notify_status(&self) {
        if self.notify.enabled() {
            self.notify.status(&self.status_line());
        }
    }

    /// A VRRP instance changed state: the VIPs this director owns change with it.
    fn on_vrrp(&self, t: &Transition) {
        let standby = match lock(&self.vrrp).as_ref() {
            Some(v) => v.standby_vips(),
            None => return,
        };
        lock(&self.notes)
            .vrrp
            .insert(t.name.clone(), t.to.as_str().to_string());
        self.notify_status();
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
            let interface = cfg.director.interface.clone();
            let addrs = real_addresses(&cfg);
            tokio::task::spawn_blocking(move || Dataplane::reresolve_neighbours(&interface, addrs));
        }
        let role = if master {
            "forwarding for its addresses"
        } else {
            "not forwarding for its addresses"
        };
        info!(vrrp = %t.name, from = %t.from, to = %t.to, master = ?t.master, priority = t.priority, "vrrp: {role}");
        if changed {
            log_failure(
                self.send_apply(),
                "applying a VRRP transition to the dataplane",
            );
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

    /// `weight`, `drain`, `enable`: a runtime override, applied.
    async fn change(&self, service: &str, real: &str, ov: Option<Override>) -> Result<String> {
        let addr = self.real_addr(service, real)?;
        {
            let mut rt = lock(&self.runtime);
            match ov {
                Some(o) => rt.overrides.insert((service.to_string(), addr), o),
                None => rt.overrides.remove(&(service.to_string(), addr)),
            };
        }
        self.apply().await?;
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
    }
}

impl ReadModel for Shared {
    fn status(&self) -> Result<Status> {
        let cfg = self.config.load();
        let rt = lock(&self.runtime).clone();
        let vrrp = lock(&self.vrrp)
            .as_ref()
            .map(|v| v.status())
            .unwrap_or_default();
        let sync = lock(&self.sync).clone();
        crate::status::build(Sources {
            config_path: &self.config_path,
            config: &cfg,
            runtime: &rt,
            dataplane: self.owner.reader(),
            vrrp,
            sync: sync.as_deref(),
        })
    }

    fn daemon_stats(&self) -> &DaemonStats {
        &self.stats
    }
}

impl server::Handler for Shared {
    async fn handle(self: Arc<Self>, req: Request) -> Response {
        let result = match req {
            Request::List => {
                // Reads only (no owner request): answered at once, even during a long write.
                let s = self.clone();
                return match tokio::task::spawn_blocking(move || s.status()).await {
                    Ok(Ok(s)) => Response {
                        status: Some(s),
                        ..Response::ok("")
                    },
                    Ok(Err(e)) => Response::error(format!("{e:#}")),
                    Err(e) => Response::error(format!("reading the status failed: {e}")),
                };
            }
            Request::Weight {
                service,
                real,
                weight,
            } => {
                if weight > 65535 {
                    Err(anyhow!("weight {weight} is out of range (0..=65535)"))
                } else {
                    self.change(&service, &real, Some(Override::Weight(weight)))
                        .await
                }
            }
            Request::Drain { service, real } => {
                self.change(&service, &real, Some(Override::Drain)).await
            }
            Request::Enable { service, real } => self.change(&service, &real, None).await,
            Request::Reload => {
                let (tx, rx) = oneshot::channel();
                if self.reload.send(ReloadTrigger::Admin(tx)).is_err() {
                    Err(anyhow!("the daemon is shutting down"))
                } else {
                    match tokio::time::timeout(Duration::from_secs(30), rx).await {
                        Ok(Ok(Ok(()))) => Ok("reloaded".to_string()),
                        Ok(Ok(Err(why))) => Err(anyhow!(
                            "reload rejected; the running configuration keeps serving: {why}"
                        )),
                        Ok(Err(_)) => Err(anyhow!("the daemon is shutting down")),
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
    let path = config_path.to_path_buf();
    let config = tokio::task::spawn_blocking(move || Config::load(&path))
        .await?
        .map_err(|e| anyhow!("{e}"))?;
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
            table_pool: crate::dataplane::Tables::pool_blocks(director.table_pool_size),
        },
        opts.fresh,
    )?;
    let planner = match origin {
        Origin::Fresh => {
            let mut p = Planner::new();
            p.set_table_pool(dp.table_pool());
            p
        }
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
    let checker = match origin {
        Origin::Fresh => HealthChecker::start(targets(&config), events_tx.clone()),
        Origin::Adopted => {
            let known = inherited_health(&config, &planner);
            HealthChecker::start_adopted(targets(&config), events_tx.clone(), &known)
        }
    };
    let runtime = Runtime {
        health: health_from(&checker),
        overrides: HashMap::new(),
        // Until an election makes this director master, it owns none of the VRRP addresses.
        standby_vips: Vrrp::listed(&config.vrrp),
    };
    let vrrp_configs = config.vrrp.clone();
    let (reload_tx, mut reload_rx) = mpsc::unbounded_channel::<ReloadTrigger>();
    let owner = Owner::start(Programmer { dp, planner })?;
    let shared = Arc::new(Shared {
        config_path: config_path.to_path_buf(),
        config: ArcSwap::from_pointee(config),
        runtime: Mutex::new(runtime),
        owner,
        stats: DaemonStats::default(),
        vrrp: Mutex::new(None),
        sync: Mutex::new(None),
        reload: reload_tx.clone(),
        notify: Notifier::from_env(),
        notes: Mutex::new(StatusNotes::default()),
    });
    let first = shared.apply().await.context("programming the dataplane")?;
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

    let admin_task = tokio::spawn(server::serve(director.admin_socket.clone(), shared.clone()));
    let _watcher = if director.watch_config {
        watch_config(config_path, reload_tx.clone())
            .map_err(|e| warn!(error = %e, "not watching the config file; reload with SIGHUP"))
            .ok()
    } else {
        None
    };
    let sweeper = tokio::spawn(sweep_loop(shared.clone(), director.xdp_mode));
    // Connection-state sync with the peer director (`[sync]`); the first apply above already
    // set SETTINGS_F_SYNC, so the dataplane reports events from now on.
    let sync = match shared.config.load().sync.clone() {
        None => None,
        Some(cfg) => {
            let ring = shared
                .owner
                .write(|p| p.dp.take_sync_events())
                .await?
                .ok_or_else(|| anyhow!("the sync event ring buffer is already taken"))?;
            let handle = crate::ha::sync::service::start(&cfg, shared.owner.clone(), ring)?;
            *lock(&shared.sync) = Some(handle.stats.clone());
            Some(handle)
        }
    };
    let mut metrics_task = None;
    if let Some(addr) = director.metrics {
        let model: Arc<dyn ReadModel> = shared.clone();
        metrics_task = Some(tokio::spawn(crate::metrics::serve(addr, model)));
    }

    let mut sighup = signal(SignalKind::hangup())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    // The checker is lent to the reload task while one runs.
    let mut checker = Some(checker);
    let mut reloading: Option<tokio::task::JoinHandle<(HealthChecker, Result<(), String>)>> = None;
    // Operators waiting for the reload in progress, and for the next one.
    let mut answering: Vec<oneshot::Sender<Result<(), String>>> = Vec::new();
    let mut asked: Option<Vec<oneshot::Sender<Result<(), String>>>> = None;
    // File-watcher events are coalesced for this long (editors write files in several steps).
    let mut debounce: Option<tokio::time::Instant> = None;
    let mut flaps = Flaps::default();
    let mut flap_tick = tokio::time::interval(Duration::from_secs(1));
    flap_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!("ready");
    shared.notify.ready(&shared.status_line());
    let stop_reason = loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break "SIGTERM"; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break "SIGINT"; }
            _ = sighup.recv() => { asked.get_or_insert_with(Vec::new); }
            Some(trigger) = reload_rx.recv() => {
                let waiting = asked.get_or_insert_with(Vec::new);
                match trigger {
                    ReloadTrigger::Admin(reply) => waiting.push(reply),
                    ReloadTrigger::FileChanged => {
                        debounce = Some(tokio::time::Instant::now() + Duration::from_millis(100));
                    }
                }
            }
            _ = async { if let Some(d) = debounce { tokio::time::sleep_until(d).await } },
                if debounce.is_some() => { debounce = None; }
            done = async {
                match reloading.as_mut() {
                    Some(h) => h.await,
                    None => std::future::pending().await,
                }
            },
                if reloading.is_some() => {
                reloading = None;
                let outcome = match done {
                    Ok((c, outcome)) => {
                        checker = Some(c);
                        outcome
                    }
                    Err(e) => {
                        // The checker went with the task: start the checks of the live config anew.
                        error!(error = %e, "the reload task failed; restarting the health checks");
                        let c = HealthChecker::start(targets(&shared.config.load()), events_tx.clone());
                        lock(&shared.runtime).health = health_from(&c);
                        log_failure(shared.send_apply(), "applying restarted health checks");
                        checker = Some(c);
                        Err(format!("the reload task failed: {e}"))
                    }
                };
                lock(&shared.notes).reload_rejected = outcome.clone().err();
                let status = match &outcome {
                    Ok(()) => format!("reloaded; {}", shared.status_line()),
                    Err(_) => shared.status_line(),
                };
                shared.notify.ready(&status);
                for reply in answering.drain(..) {
                    let _ = reply.send(outcome.clone());
                }
            }
            // Health events wait while a reload runs: the checks change only once the dataplane
            // has taken the new state.
            Some(ev) = events_rx.recv(), if reloading.is_none() => {
                let mut batch = vec![ev];
                while let Ok(ev) = events_rx.try_recv() {
                    batch.push(ev);
                }
                on_health(&shared, batch, &mut flaps);
                shared.notify_status();
            }
            Some(t) = vrrp_rx.recv() => shared.on_vrrp(&t),
            _ = flap_tick.tick() => {
                on_flap_tick(&shared, &mut flaps);
                shared.notify_status();
            }
        }
        if reloading.is_none() && debounce.is_none() && asked.is_some() {
            if let Some(c) = checker.take() {
                answering = asked.take().unwrap_or_default();
                shared
                    .notify
                    .reloading(&format!("reloading {}", shared.config_path.display()));
                reloading = Some(tokio::spawn(reload(shared.clone(), c)));
            }
        }
    };
    shared.notify.stopping(&match director.on_exit {
        OnExit::Keep => {
            format!("stopping ({stop_reason}); the dataplane stays pinned and forwarding")
        }
        OnExit::Detach => format!("stopping ({stop_reason}); detaching the dataplane"),
    });
    if let Some(h) = reloading.take() {
        // Let the reload finish (its apply is with the owner anyway), to stop its checks.
        match tokio::time::timeout(Duration::from_secs(30), h).await {
            Ok(Ok((c, _))) => checker = Some(c),
            _ => warn!("the reload in progress did not finish; stopping without it"),
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
        if let Err(e) = shared.apply().await {
            error!(error = %format!("{e:#}"), "marking the VRRP addresses standby failed");
        }
        info!("left the VRRP elections; the dataplane no longer forwards for their addresses");
    }
    if let Some(mut c) = checker {
        c.shutdown();
    }
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
            shared.owner.write(|p| p.dp.unpin()).await??;
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

/// A batch of health results that arrived together: one apply for all their transitions.
/// Transitions of flapping reals are damped ([`Flaps`]): a return to up is held, and log lines
/// are limited to one per real per period.
fn on_health(shared: &Shared, batch: Vec<HealthEvent>, flaps: &mut Flaps) {
    let now = Instant::now();
    let mut changed = false;
    for ev in batch {
        crate::metrics::record_health(&ev);
        let id = (ev.service.clone(), ev.real);
        let verdict = ev
            .transition
            .as_ref()
            .map(|_| flaps.transition(&id, ev.up, now));
        // While its return to up is held, a flapping real stays down in the runtime.
        let up = ev.up && !flaps.held(&id);
        {
            let mut rt = lock(&shared.runtime);
            let h = rt.health.entry(id).or_insert(Health {
                up,
                last_failure: None,
            });
            if let Some(r) = &ev.reason {
                h.last_failure = Some(r.clone());
            }
            if ev.up && !up {
                h.last_failure = Some(format!(
                    "flapping: held down until it stays up for {}s",
                    crate::health::flap::HOLD.as_secs()
                ));
            }
            changed |= h.up != up;
            h.up = up;
        }
        if let (Some(t), Some(v)) = (&ev.transition, verdict) {
            let Some(suppressed) = v.log else { continue };
            let held = if ev.up && !v.apply {
                format!(
                    "; flapping, held down until it stays up for {}s",
                    crate::health::flap::HOLD.as_secs()
                )
            } else {
                String::new()
            };
            let earlier = if suppressed > 0 {
                format!(" ({suppressed} earlier transitions not logged)")
            } else {
                String::new()
            };
            if ev.up {
                info!(service = %ev.service, real = %ev.real, "real is up: {t}{held}{earlier}");
            } else {
                warn!(service = %ev.service, real = %ev.real, "real is down: {t}{earlier}");
            }
        }
    }
    if changed {
        log_failure(
            shared.send_apply(),
            "applying a health change to the dataplane",
        );
        shared.track();
    }
}

/// Once a second: held reals that stayed up go up; summaries of transitions not logged.
fn on_flap_tick(shared: &Shared, flaps: &mut Flaps) {
    let health = lock(&shared.runtime).health.clone();
    let mut changed = false;
    for due in flaps.tick(Instant::now(), |id| health.get(id).is_some_and(|h| h.up)) {
        match due {
            Due::Release(id) => {
                let mut rt = lock(&shared.runtime);
                if let Some(h) = rt.health.get_mut(&id) {
                    // Only a real whose check still says up (an event since would have
                    // ended the hold).
                    if !h.up {
                        h.up = true;
                        h.last_failure = None;
                        changed = true;
                        info!(service = %id.0, real = %id.1, "real is up: stayed up for {}s after flapping", crate::health::flap::HOLD.as_secs());
                    }
                }
            }
            Due::Summary(id, n, up) => warn!(
                service = %id.0,
                real = %id.1,
                "real is flapping: {n} transitions in the last {}s not logged; it is {} now",
                crate::health::flap::LOG_EVERY.as_secs(),
                if up { "up" } else { "down" }
            ),
        }
    }
    if changed {
        log_failure(shared.send_apply(), "applying a held real's return");
        shared.track();
    }
}

/// The reload transaction, as its own task (the event loop lends it the checker): reads and
/// validates the file on the blocking pool, swaps the snapshot in, has the owner write the
/// difference, then moves the checks over. `Err` says why it was rejected (nothing changed
/// then).
async fn reload(
    shared: Arc<Shared>,
    mut checker: HealthChecker,
) -> (HealthChecker, Result<(), String>) {
    let started = Instant::now();
    let outcome = reload_with(&shared, &mut checker).await;
    if outcome.is_ok() {
        info!(
            took_ms = started.elapsed().as_millis() as u64,
            "configuration reloaded"
        );
    }
    (checker, outcome)
}

async fn reload_with(shared: &Arc<Shared>, checker: &mut HealthChecker) -> Result<(), String> {
    let path = shared.config_path.clone();
    let loaded = tokio::task::spawn_blocking(move || Config::load(&path))
        .await
        .map_err(|e| format!("reading the config failed: {e}"))?;
    match loaded {
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
            let reals = new_targets.len();
            shared.config.store(Arc::new(new));
            match shared.apply().await {
                Ok(writes) => {
                    checker.update(new_targets);
                    lock(&shared.runtime).health = health_from(checker);
                    // A check that changed state since the preview (its event is still queued).
                    log_failure(shared.send_apply(), "applying health after a reload");
                    shared.stats.reloads_ok.fetch_add(1, Ordering::SeqCst);
                    shared
                        .stats
                        .last_reload_ok
                        .store(now_unix(), Ordering::SeqCst);
                    info!(
                        services,
                        reals,
                        map_writes = writes,
                        "new configuration applied"
                    );
                    shared.track();
                    prime_neighbours(shared);
                    Ok(())
                }
                Err(e) => {
                    // The planner leaves the maps as they were: restore the old snapshot and
                    // runtime (the checks were not touched); VRRP's part of the runtime may
                    // have moved on meanwhile and stays.
                    shared.config.store(old);
                    {
                        let mut rt = lock(&shared.runtime);
                        rt.overrides = before.overrides;
                        rt.health = before.health;
                    }
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

/// Primes the reals' neighbour entries, on the blocking pool (one datagram per real).
fn prime_neighbours(shared: &Shared) {
    let addrs = real_addresses(&shared.config.load());
    tokio::task::spawn_blocking(move || Dataplane::prime_neighbours(addrs));
}

/// Once a second: retire idle connection entries, free the ids of drained reals, watch the
/// interface; every few seconds re-prime the reals' neighbour entries.
async fn sweep_loop(shared: Arc<Shared>, mode: XdpMode) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    let mut fib = FibWatch::default();
    let interface = shared.config.load().director.interface.clone();
    let mut link = LinkWatch::new(&interface);
    loop {
        tick.tick().await;
        n += 1;
        if let Ok(stats) = shared.owner.reader().stats() {
            fib.observe(stats[xdpvs_common::stat::DROP_FIB as usize], &interface);
        }
        match shared.owner.sweep().await {
            Ok(report) if report.retired > 0 => {
                tracing::debug!(retired = report.retired, entries = report.entries, "sweep");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %format!("{e:#}"), "connection-table sweep failed"),
        }
        if link.observe() {
            let iface = interface.clone();
            match shared
                .owner
                .write(move |p| p.dp.attach(&iface, mode))
                .await
                .and_then(|r| r)
            {
                Ok(used) => {
                    link.attached();
                    info!(interface = %interface, mode = used, "the interface is back: XDP program attached again");
                    prime_neighbours(&shared);
                }
                Err(e) => {
                    warn!(interface = %interface, error = %format!("{e:#}"), "the interface is back but attaching the XDP program failed; retrying")
                }
            }
        }
        let gone = !link.forwarding();
        if std::mem::replace(&mut lock(&shared.notes).interface_gone, gone) != gone {
            shared.notify_status();
        }
        if n.is_multiple_of(5) {
            prime_neighbours(&shared);
        }
    }
}

/// Notices the director's interface going away and coming back.
struct LinkWatch {
    interface: String,
    /// The index the program is attached to; `None` while it is not.
    attached: Option<u32>,
    /// The interface's index now.
    seen: Option<u32>,
}

impl LinkWatch {
    fn new(interface: &str) -> Self {
        let idx = crate::dataplane::interface_index(interface);
        LinkWatch {
            interface: interface.to_string(),
            attached: idx,
            seen: idx,
        }
    }

    /// Logs a change; true when the program should be attached (again).
    fn observe(&mut self) -> bool {
        let now = crate::dataplane::interface_index(&self.interface);
        if now != self.seen {
            match now {
                None => error!(
                    interface = %self.interface,
                    "the director's interface is gone: its XDP program went with it and nothing \
                     is forwarded. The maps and connection table are kept; the program is attached \
                     again when an interface of that name is back"
                ),
                Some(i) => {
                    info!(interface = %self.interface, ifindex = i, "the director's interface exists again")
                }
            }
            self.seen = now;
        }
        now.is_some() && now != self.attached
    }

    fn attached(&mut self) {
        self.attached = self.seen;
    }

    /// The program is attached to the interface of that name as it is now.
    fn forwarding(&self) -> bool {
        self.seen.is_some() && self.seen == self.attached
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
        let cause = crate::preflight::forwarding_problem("ipv4", interface)
            .or_else(|| crate::preflight::forwarding_problem("ipv6", interface))
            .unwrap_or_else(|| {
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
