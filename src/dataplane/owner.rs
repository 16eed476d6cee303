//! The one owner of the dataplane: a dedicated thread holds the [`Programmer`] (the maps and
//! the planner that remembers what was written to them) and takes requests over a channel.
//!
//! Every map write of the daemon goes through here: applying a desired state (start-up,
//! reload, health, VRRP, admin overrides), the sweep and the release of drained ids, the
//! installs of the sync receiver. Callers send a request and await its reply; nothing else
//! holds the maps for writing, so there is no lock to wait on and no writer can interleave
//! with another.
//!
//! Applies that queue up while the owner is busy (a burst of health transitions during a
//! large reload) are coalesced: each carries the whole desired state computed when it was
//! sent, so only the newest of a run of queued applies is planned and written, and every
//! sender gets that outcome.
//!
//! Reads for `list` and metrics never queue behind a write: they go through a [`Reader`], a
//! second handle of the same kernel maps (duplicated descriptors) plus the planner's id index,
//! which the owner publishes after each change. A read during a long write sees the counters
//! as they are and the ids as of the last completed write (a real added by the write in
//! progress shows no counters until it completes).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use arc_swap::ArcSwap;
use aya::maps::{IterableMap, MapData};
use tokio::sync::oneshot;
use xdpvs_common::{Conn, ConnKey, ServiceKey};

use super::plan::Draining;
use super::{Maps, Programmer, SweepReport};
use crate::state::Desired;

type Job = Box<dyn FnOnce(&mut Programmer) + Send>;

enum Request {
    Apply {
        desired: Box<Desired>,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    /// Runs with the programmer; `changes` says whether the planner may have changed (the
    /// index is republished after it).
    Run { job: Job, changes: bool },
}

/// Which id holds which real, as of the last completed write.
#[derive(Debug, Default)]
pub struct Index {
    reals: HashMap<(ServiceKey, SocketAddr), u32>,
    /// Each real's weight in the maps, as of the last apply.
    weights: HashMap<(ServiceKey, SocketAddr), u32>,
    services: HashMap<ServiceKey, u32>,
    draining: Vec<Draining>,
}

impl Index {
    fn of(p: &Programmer) -> Index {
        Index {
            reals: p.planner.real_ids(),
            weights: p.planner.live_weights(),
            services: p.planner.service_ids(),
            draining: p.planner.draining(),
        }
    }

    pub fn real_id(&self, service: &ServiceKey, real: SocketAddr) -> Option<u32> {
        self.reals.get(&(*service, real)).copied()
    }

    /// The weight the dataplane schedules `real` with now (0 if it is out of the set): the
    /// last apply's, which may trail a health change by the owner's write.
    pub fn live_weight(&self, service: &ServiceKey, real: SocketAddr) -> u32 {
        self.weights.get(&(*service, real)).copied().unwrap_or(0)
    }

    pub fn service_id(&self, service: &ServiceKey) -> Option<u32> {
        self.services.get(service).copied()
    }

    /// Which (service, real) each real id is.
    pub fn real_addrs(&self) -> HashMap<u32, SocketAddr> {
        self.reals.iter().map(|((_, a), id)| (*id, *a)).collect()
    }

    /// Every id in use (live and draining).
    pub fn ids(&self) -> Vec<u32> {
        self.reals.values().copied().collect()
    }

    pub fn draining(&self) -> &[Draining] {
        &self.draining
    }
}

/// A read-only view of the owner's maps, usable from any thread at any time.
pub struct Reader {
    pub maps: Maps,
    conns: aya::maps::HashMap<MapData, ConnKey, Conn>,
    embryos: aya::maps::HashMap<MapData, ConnKey, Conn>,
    index: ArcSwap<Index>,
    pin_dir: Option<PathBuf>,
    /// Map writes made by the owner since it started (applies and releases).
    writes: AtomicU64,
}

impl Reader {
    /// Map writes made by the owner since it started.
    pub fn map_writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn index(&self) -> Arc<Index> {
        self.index.load_full()
    }

    pub fn pin_dir(&self) -> Option<&std::path::Path> {
        self.pin_dir.as_deref()
    }

    /// The tracked flows of both tables (a snapshot; the tables change while they are read).
    pub fn connections(&self) -> Vec<(ConnKey, Conn)> {
        let mut all: Vec<_> = self.conns.iter().filter_map(|r| r.ok()).collect();
        all.extend(self.embryos.iter().filter_map(|r| r.ok()));
        all
    }
}

impl std::ops::Deref for Reader {
    type Target = Maps;
    fn deref(&self) -> &Maps {
        &self.maps
    }
}

/// A handle to the owner thread (cheap to clone). The thread ends, dropping the programmer
/// (the pins stay), once every handle is gone.
#[derive(Clone)]
pub struct Owner {
    tx: std_mpsc::Sender<Request>,
    reader: Arc<Reader>,
}

impl Owner {
    /// Starts the owner thread with `p`.
    pub fn start(p: Programmer) -> Result<Owner> {
        let reader = Arc::new(Reader {
            maps: p.dp.maps.try_clone()?,
            conns: super::dup(p.dp.conns.map())?,
            embryos: super::dup(p.dp.embryos.map())?,
            index: ArcSwap::from_pointee(Index::of(&p)),
            pin_dir: p.dp.pin_dir().map(|d| d.to_path_buf()),
            writes: AtomicU64::new(0),
        });
        let (tx, rx) = std_mpsc::channel();
        let r = reader.clone();
        std::thread::Builder::new()
            .name("xdpvs-dataplane".into())
            .spawn(move || serve(p, rx, &r))?;
        Ok(Owner { tx, reader })
    }

    pub fn reader(&self) -> &Arc<Reader> {
        &self.reader
    }

    /// Sends an apply now (requests are served in the order sent) and returns its reply.
    pub fn send_apply(&self, desired: Desired) -> Pending<usize> {
        let (reply, rx) = oneshot::channel();
        let sent = self.tx.send(Request::Apply {
            desired: Box::new(desired),
            reply,
        });
        Pending {
            rx: sent.ok().map(|_| rx),
        }
    }

    /// Plans `desired` and writes the difference; returns how many writes it took.
    pub async fn apply(&self, desired: Desired) -> Result<usize> {
        self.send_apply(desired).await
    }

    fn send_run<R: Send + 'static>(
        &self,
        changes: bool,
        f: impl FnOnce(&mut Programmer) -> R + Send + 'static,
    ) -> Pending<R> {
        let (reply, rx) = oneshot::channel();
        let job: Job = Box::new(move |p| {
            let _ = reply.send(Ok(f(p)));
        });
        Pending {
            rx: self.tx.send(Request::Run { job, changes }).ok().map(|_| rx),
        }
    }

    /// Runs `f` on the owner thread with the programmer (for reads that need the whole
    /// dataplane: the connection tables, the install program).
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Programmer) -> R + Send + 'static,
    ) -> Result<R> {
        self.send_run(false, move |p| f(p)).await
    }

    /// Runs `f` on the owner thread with the programmer, for changes other than an apply.
    pub async fn write<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Programmer) -> R + Send + 'static,
    ) -> Result<R> {
        self.send_run(true, f).await
    }

    /// One pass of the connection-table sweep, then the release of drained reals' ids.
    pub async fn sweep(&self) -> Result<SweepReport> {
        let reader = self.reader.clone();
        self.write(move |p| -> Result<SweepReport> {
            let report = p.dp.sweep()?;
            let Programmer { dp, planner } = p;
            let writes = planner.release(|id| {
                dp.real_conns(id)
                    .map(|c| c.active + c.inactive)
                    .unwrap_or(1)
            });
            if !writes.is_empty() {
                dp.write(&writes)?;
                reader
                    .writes
                    .fetch_add(writes.len() as u64, Ordering::Relaxed);
            }
            Ok(report)
        })
        .await?
    }
}

/// The reply to a request, awaited or waited for.
pub struct Pending<R> {
    rx: Option<oneshot::Receiver<Result<R, String>>>,
}

fn gone() -> anyhow::Error {
    anyhow!("the dataplane owner has stopped")
}

impl<R> Pending<R> {
    /// Blocks until the reply: for threads outside the async runtime (it panics on an async
    /// worker, which must await instead).
    pub fn wait(self) -> Result<R> {
        let rx = self.rx.ok_or_else(gone)?;
        rx.blocking_recv()
            .map_err(|_| gone())?
            .map_err(|e| anyhow!(e))
    }
}

impl<R> std::future::Future for Pending<R> {
    type Output = Result<R>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<R>> {
        let Some(rx) = self.rx.as_mut() else {
            return std::task::Poll::Ready(Err(gone()));
        };
        std::pin::Pin::new(rx).poll(cx).map(|r| match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(anyhow!(e)),
            Err(_) => Err(gone()),
        })
    }
}

/// After a panic the planner may not match the maps: rebuild it from them.
fn resync(p: &mut Programmer) {
    match p
        .dp
        .view()
        .and_then(|v| Ok(super::plan::Planner::adopt(&v)?))
    {
        Ok(planner) => p.planner = planner,
        Err(e) => tracing::error!(error = %format!("{e:#}"), "re-reading the maps failed"),
    }
}

fn serve(mut p: Programmer, rx: std_mpsc::Receiver<Request>, reader: &Reader) {
    while let Ok(first) = rx.recv() {
        // Everything queued meanwhile, in order, so runs of applies can be coalesced.
        let mut batch = vec![first];
        batch.extend(rx.try_iter());
        let mut batch = batch.into_iter().peekable();
        while let Some(req) = batch.next() {
            match req {
                Request::Apply { mut desired, reply } => {
                    let mut replies = vec![reply];
                    while let Some(Request::Apply { .. }) = batch.peek() {
                        if let Some(Request::Apply { desired: d, reply }) = batch.next() {
                            desired = d;
                            replies.push(reply);
                        }
                    }
                    if replies.len() > 1 {
                        tracing::debug!(coalesced = replies.len(), "applies coalesced");
                    }
                    let outcome = match catch_unwind(AssertUnwindSafe(|| p.apply(&desired))) {
                        Ok(r) => r.map_err(|e| format!("{e:#}")),
                        Err(_) => {
                            resync(&mut p);
                            Err("applying panicked (the planner was resynced from the maps)".into())
                        }
                    };
                    if let Ok(n) = outcome {
                        reader.writes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    if outcome != Ok(0) {
                        reader.index.store(Arc::new(Index::of(&p)));
                    }
                    for r in replies {
                        let _ = r.send(outcome.clone());
                    }
                }
                Request::Run { job, changes } => {
                    // A panicking job drops its reply (the caller gets an error); the owner
                    // carries on.
                    let panicked = catch_unwind(AssertUnwindSafe(|| job(&mut p))).is_err();
                    if panicked {
                        tracing::error!("a dataplane request panicked");
                        resync(&mut p);
                    }
                    if changes || panicked {
                        reader.index.store(Arc::new(Index::of(&p)));
                    }
                }
            }
        }
    }
    tracing::debug!("dataplane owner stopped");
}
