//! The sync service: streams this director's connection events to its peer and installs the
//! peer's in its own table, so an established connection continues on the same real after a
//! failover (and, thanks to the dump on (re)join, after a failback too).
//!
//! Two tasks share one UDP socket bound to `[sync] listen`:
//! - the **sender** reads the dataplane's `SYNC_EVENTS` ring buffer (woken by epoll on its fd),
//!   names each connection's real by address instead of by local id ([`to_wire`]), batches up to
//!   [`wire::Sender::max_events`] events and seals them as one datagram, flushed within
//!   [`FLUSH_AFTER`]. It also answers a dump request with every live, non-half-open entry
//!   (paced), re-announces connections that saw traffic since its last refresh, and sends a
//!   heartbeat when it had nothing else to say;
//! - the **receiver** opens each datagram (every refusal counted by its [`wire::Reject`]),
//!   translates (service, real address) to this director's ids through the planner
//!   ([`to_install`]; unknown ones refused and counted) and installs through the
//!   `xdpvs_sync_install` program, whose compare-and-swap keeps `REAL_CONNS` exact.
//!
//! Why refresh only entries with traffic since the last pass: an entry that is idle here expires
//! here no later than the peer's copy (the copy's idle clock started when it was last announced,
//! which is after the entry's last packet), and its expiry is announced (END). An entry that saw
//! packets but no state change would otherwise expire at the peer while it lives here; one
//! refresh per period re-announces it, so the copy outlives the entry by at most one period.
//! Copies installed from the peer carry `CONN_F_SYNCED` and are never announced back: their
//! expiry here is silent, and events cannot echo between the directors.
//!
//! Map access follows the daemon's rule: through the dataplane [`Owner`] (installs and table
//! walks are requests to it; naming a real reads its read-only handle on the blocking pool).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use xdpvs_common::{
    install_rc, state, sync_kind, Addr, ConnKey, Real, ServiceKey, SyncEvent, CONN_F_SYNCED,
    FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
};

use super::wire::{self, ConnEvent, ConnProto, EventKind, Message, Reject, RejectCounts};
use crate::config::SyncConfig;
use crate::dataplane::owner::Owner;
use crate::dataplane::Programmer;

/// Longest an event waits in a partial batch.
pub const FLUSH_AFTER: Duration = Duration::from_millis(10);
/// Most ring-buffer records read in one pass before the batch is looked at again.
const DRAIN_MAX: usize = 4096;
/// Dump pacing: this many datagrams, then [`DUMP_PAUSE`] (about 8000 datagrams, 480,000
/// connections, a second).
const DUMP_BURST: usize = 16;
const DUMP_PAUSE: Duration = Duration::from_millis(2);
/// A dump request is repeated this often until the peer is heard.
const DUMP_RETRY: Duration = Duration::from_secs(2);
/// Attempts of an install that lost a race with the packet path or the expiry.
const INSTALL_TRIES: usize = 3;

/// Why a received event was not installed (after it passed [`wire::Receiver::open`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstallReject {
    /// No service here at that VIP:port and protocol.
    UnknownService,
    /// The service has no real at that address here.
    UnknownReal,
    /// A state that does not exist or does not fit the protocol; or the install program
    /// refused the request.
    Invalid,
    /// This director's connection table is full.
    TableFull,
    /// The entry kept changing under the install (packet path, expiry) for every attempt.
    Raced,
}

impl InstallReject {
    pub const ALL: [InstallReject; 5] = [
        InstallReject::UnknownService,
        InstallReject::UnknownReal,
        InstallReject::Invalid,
        InstallReject::TableFull,
        InstallReject::Raced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstallReject::UnknownService => "unknown_service",
            InstallReject::UnknownReal => "unknown_real",
            InstallReject::Invalid => "invalid",
            InstallReject::TableFull => "table_full",
            InstallReject::Raced => "raced",
        }
    }
}

/// Counters of the sync service, shared by its tasks and read by `list` and metrics.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub sent_datagrams: AtomicU64,
    pub sent_events: AtomicU64,
    /// Datagrams the socket refused to send (peer unreachable, buffer full).
    pub send_errors: AtomicU64,
    /// Dataplane events that could not be named for the peer (their real is gone here).
    pub untranslatable: AtomicU64,
    pub received_datagrams: AtomicU64,
    pub received_events: AtomicU64,
    /// New entries installed (including ones moved from another real).
    pub installed: AtomicU64,
    /// Existing entries that took the peer's state (or already had it).
    pub updated: AtomicU64,
    /// Entries retired because the peer ended them.
    pub retired: AtomicU64,
    /// END for an entry that is not here: nothing to do (not an error).
    pub absent: AtomicU64,
    pub dump_requests_sent: AtomicU64,
    pub dump_requests_received: AtomicU64,
    pub dump_events_sent: AtomicU64,
    pub refresh_events_sent: AtomicU64,
    /// Datagrams refused by the wire layer, by reason.
    pub rejected: RejectCounts,
    install_rejected: [AtomicU64; InstallReject::ALL.len()],
    /// When an authentic datagram was last received from the peer.
    last_heard: Mutex<Option<Instant>>,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl SyncStats {
    pub fn count_install_reject(&self, r: InstallReject) {
        add(&self.install_rejected[r as usize], 1);
    }

    pub fn install_rejected(&self, r: InstallReject) -> u64 {
        get(&self.install_rejected[r as usize])
    }

    /// Records an authentic datagram; returns how long the peer had been silent (`None`: never
    /// heard before).
    fn heard(&self) -> Option<Duration> {
        let mut h = self.last_heard.lock().unwrap_or_else(|p| p.into_inner());
        let before = h.map(|t| t.elapsed());
        *h = Some(Instant::now());
        before
    }

    fn silent_for(&self) -> Option<Duration> {
        self.last_heard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(|t| t.elapsed())
    }

    /// A snapshot for `list` and metrics; `lost` is the dataplane's `sync_events_lost`.
    pub fn status(&self, cfg: &SyncConfig, lost: u64) -> SyncStatus {
        let mut rejected = BTreeMap::new();
        for r in Reject::ALL {
            rejected.insert(r.as_str().to_string(), self.rejected.get(r));
        }
        for r in InstallReject::ALL {
            rejected.insert(r.as_str().to_string(), self.install_rejected(r));
        }
        SyncStatus {
            listen: cfg.listen.to_string(),
            peer: cfg.peer.to_string(),
            peer_last_heard_ms: self.silent_for().map(|d| d.as_millis() as u64),
            sent_datagrams: get(&self.sent_datagrams),
            sent_events: get(&self.sent_events),
            send_errors: get(&self.send_errors),
            untranslatable: get(&self.untranslatable),
            received_datagrams: get(&self.received_datagrams),
            received_events: get(&self.received_events),
            installed: get(&self.installed),
            updated: get(&self.updated),
            retired: get(&self.retired),
            absent: get(&self.absent),
            dump_requests_sent: get(&self.dump_requests_sent),
            dump_requests_received: get(&self.dump_requests_received),
            dump_events_sent: get(&self.dump_events_sent),
            refresh_events_sent: get(&self.refresh_events_sent),
            lost,
            rejected,
        }
    }
}

/// What `xdpvs list --json` and metrics show of the sync service.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyncStatus {
    pub listen: String,
    pub peer: String,
    /// Milliseconds since the peer was last heard; `None`: never.
    pub peer_last_heard_ms: Option<u64>,
    pub sent_datagrams: u64,
    pub sent_events: u64,
    pub send_errors: u64,
    pub untranslatable: u64,
    pub received_datagrams: u64,
    pub received_events: u64,
    pub installed: u64,
    pub updated: u64,
    pub retired: u64,
    pub absent: u64,
    pub dump_requests_sent: u64,
    pub dump_requests_received: u64,
    pub dump_events_sent: u64,
    pub refresh_events_sent: u64,
    /// Events the dataplane's ring buffer had no room for (`sync_events_lost`).
    pub lost: u64,
    /// Refusals by reason: the wire layer's (`auth`, `replay`, ...) and the install's
    /// (`unknown_service`, `unknown_real`, ...).
    pub rejected: BTreeMap<String, u64>,
}

// ---------------------------------------------------------------------------------------------
// Translation between the dataplane's records (local ids) and the wire (addresses).

fn ip_of(a: &Addr, family: u8) -> Option<IpAddr> {
    crate::state::ip_of(a, family)
}

fn socket(a: &Addr, port_be: u16, family: u8) -> Option<SocketAddr> {
    Some(SocketAddr::new(ip_of(a, family)?, u16::from_be(port_be)))
}

/// The connection-table key of a connection the peer named.
pub fn conn_key(proto: ConnProto, client: SocketAddr, service: SocketAddr) -> ConnKey {
    let (src, family) = crate::state::addr(client.ip());
    let (dst, _) = crate::state::addr(service.ip());
    ConnKey {
        src,
        dst,
        sport: client.port().to_be(),
        dport: service.port().to_be(),
        proto: match proto {
            ConnProto::Tcp => PROTO_TCP,
            ConnProto::Udp => PROTO_UDP,
        },
        family,
        _pad: [0; 2],
    }
}

/// Names a dataplane event for the peer: `real` is what `REALS` holds for the event's real id.
/// `None` if the record is inconsistent (the real slot was freed or reused meanwhile).
pub fn to_wire(ev: &SyncEvent, real: &Real) -> Option<ConnEvent> {
    let k = &ev.key;
    if (k.family != FAMILY_V4 && k.family != FAMILY_V6)
        || real.family != k.family
        || real.service != ev.service
    {
        return None;
    }
    let proto = match k.proto {
        PROTO_TCP => ConnProto::Tcp,
        PROTO_UDP => ConnProto::Udp,
        _ => return None,
    };
    let kind = match ev.kind {
        sync_kind::NEW => EventKind::New,
        sync_kind::STATE => EventKind::StateChange,
        sync_kind::END => EventKind::End,
        _ => return None,
    };
    Some(ConnEvent {
        kind,
        proto,
        state: u8::try_from(ev.state).ok()?,
        client: socket(&k.src, k.sport, k.family)?,
        service: socket(&k.dst, k.dport, k.family)?,
        real: socket(&real.addr, real.port, real.family)?,
    })
}

/// Whether `st` is a state the peer may report for `proto`.
fn state_fits(proto: ConnProto, st: u8, kind: EventKind) -> bool {
    let st = u32::from(st);
    match proto {
        ConnProto::Udp => st == state::UDP,
        // The peer never sends half-open entries, but END may name any state it left.
        ConnProto::Tcp => {
            matches!(st, state::ESTABLISHED | state::FIN_WAIT | state::CLOSE)
                || (st == state::SYN_RECV && kind == EventKind::End)
        }
    }
}

/// The install request for a peer's event, with this director's ids: `ids` gives (service id,
/// real id) for a service key and a real address, as the planner holds them.
pub fn to_install(
    ev: &ConnEvent,
    service_id: impl Fn(&ServiceKey) -> Option<u32>,
    real_id: impl Fn(&ServiceKey, SocketAddr) -> Option<u32>,
) -> Result<SyncEvent, InstallReject> {
    if ev.client.is_ipv4() != ev.service.is_ipv4() || ev.real.is_ipv4() != ev.service.is_ipv4() {
        return Err(InstallReject::Invalid);
    }
    if !state_fits(ev.proto, ev.state, ev.kind) {
        return Err(InstallReject::Invalid);
    }
    let skey = crate::state::service_key(
        ev.service,
        match ev.proto {
            ConnProto::Tcp => crate::config::Protocol::Tcp,
            ConnProto::Udp => crate::config::Protocol::Udp,
        },
    );
    let service = service_id(&skey).ok_or(InstallReject::UnknownService)?;
    let real = real_id(&skey, ev.real).ok_or(InstallReject::UnknownReal)?;
    Ok(SyncEvent {
        key: conn_key(ev.proto, ev.client, ev.service),
        real,
        service,
        state: u32::from(ev.state),
        kind: match ev.kind {
            EventKind::New => sync_kind::NEW,
            EventKind::StateChange => sync_kind::STATE,
            EventKind::End => sync_kind::END,
        },
        _pad: [0; 3],
    })
}

/// Collects events into datagram-sized batches.
#[derive(Debug, Default)]
pub struct Batcher {
    pending: Vec<ConnEvent>,
    v6: bool,
    since: Option<Instant>,
}

impl Batcher {
    fn limit(&self) -> usize {
        wire::Sender::max_events(self.v6)
    }

    /// Adds one event; returns a full batch when this one completed it.
    pub fn push(&mut self, ev: ConnEvent) -> Option<Vec<ConnEvent>> {
        if ev.client.is_ipv6() && !self.v6 {
            // IPv6 events are longer: a batch that was full for IPv4 may not fit any more.
            self.v6 = true;
            if self.pending.len() >= self.limit() {
                let full = self.take();
                self.v6 = true;
                self.pending.push(ev);
                self.since = Some(Instant::now());
                return full;
            }
        }
        if self.pending.is_empty() {
            self.since = Some(Instant::now());
        }
        self.pending.push(ev);
        if self.pending.len() >= self.limit() {
            return self.take();
        }
        None
    }

    /// The pending events (if any), emptying the batch.
    pub fn take(&mut self) -> Option<Vec<ConnEvent>> {
        self.since = None;
        self.v6 = false;
        (!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending))
    }

    /// When the pending events must be sent.
    pub fn deadline(&self) -> Option<Instant> {
        self.since.map(|t| t + FLUSH_AFTER)
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

// ---------------------------------------------------------------------------------------------
// The tasks.

/// The running service; dropping it (or [`SyncHandle::stop`]) stops both tasks.
pub struct SyncHandle {
    pub stats: Arc<SyncStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SyncHandle {
    pub fn stop(self) {}
}

impl Drop for SyncHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Starts the sender and the receiver (inside the tokio runtime); `ring` is the dataplane's
/// event ring buffer (taken from it).
pub fn start(cfg: &SyncConfig, programmer: Owner, ring: RingBuf<MapData>) -> Result<SyncHandle> {
    let std_sock = std::net::UdpSocket::bind(cfg.listen)
        .with_context(|| format!("binding the sync socket to {}", cfg.listen))?;
    std_sock.set_nonblocking(true)?;
    let sock = Arc::new(UdpSocket::from_std(std_sock)?);
    // SAFETY: the ring buffer owns its map fd for as long as the AsyncFd owns the ring buffer,
    // and RingBuf::as_raw_fd always returns that fd.
    let ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| anyhow!("watching the sync ring buffer: {}", e.into_parts().1))?;
    let boot = wire::Sender::random_boot().context("reading a random boot id")?;
    let stats = Arc::new(SyncStats::default());
    let (dump_tx, dump_rx) = mpsc::channel::<Ask>(4);
    let sender = SenderTask {
        sock: sock.clone(),
        peer: cfg.peer,
        wire: wire::Sender::new(&cfg.key, boot, unix_ms()),
        stats: stats.clone(),
        programmer: programmer.clone(),
        refresh: cfg.refresh,
    };
    let receiver = ReceiverTask {
        sock,
        wire: wire::Receiver::new(&cfg.key),
        stats: stats.clone(),
        programmer,
        asks: dump_tx,
        silence: cfg.refresh * 3,
    };
    info!(listen = %cfg.listen, peer = %cfg.peer, refresh = ?cfg.refresh, "connection sync started");
    let tasks = vec![
        tokio::spawn(sender.run(ring, dump_rx)),
        tokio::spawn(receiver.run()),
    ];
    Ok(SyncHandle { stats, tasks })
}

/// What the receiver asks the sender to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// The peer asked for our table.
    Dump,
    /// Ask the peer for its table (it was just heard after a silence, or for the first time).
    RequestDump,
}

struct SenderTask {
    sock: Arc<UdpSocket>,
    peer: SocketAddr,
    wire: wire::Sender,
    stats: Arc<SyncStats>,
    programmer: Owner,
    refresh: Duration,
}

impl SenderTask {
    async fn run(mut self, mut ring: AsyncFd<RingBuf<MapData>>, mut asks: mpsc::Receiver<Ask>) {
        let mut batch = Batcher::default();
        let mut refresh =
            tokio::time::interval_at(tokio::time::Instant::now() + self.refresh, self.refresh);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(DUMP_RETRY);
        let mut last_request: Option<Instant> = None;
        let mut last_pass = crate::dataplane::monotonic_ns();
        let mut sent_since_refresh = false;
        loop {
            let deadline = batch
                .deadline()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = ring.readable_mut() => {
                    let mut guard = match r {
                        Ok(g) => g,
                        Err(e) => {
                            warn!(error = %e, "sync ring buffer poll failed; sync stops");
                            return;
                        }
                    };
                    let mut raw = drain(guard.get_inner_mut());
                    guard.clear_ready();
                    // A record submitted between the last read and clear_ready woke nobody.
                    raw.extend(drain(guard.get_inner_mut()));
                    drop(guard);
                    for ev in self.translate(raw).await {
                        if let Some(full) = batch.push(ev) {
                            self.send_events(full, None).await;
                            sent_since_refresh = true;
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline), if !batch.is_empty() => {
                    if let Some(b) = batch.take() {
                        self.send_events(b, None).await;
                        sent_since_refresh = true;
                    }
                }
                Some(ask) = asks.recv() => match ask {
                    Ask::Dump => self.dump().await,
                    Ask::RequestDump => {
                        if last_request.is_none_or(|t| t.elapsed() >= DUMP_RETRY) {
                            self.request_dump().await;
                            last_request = Some(Instant::now());
                        }
                    }
                },
                _ = retry.tick(), if self.stats.silent_for().is_none() => {
                    self.request_dump().await;
                    last_request = Some(Instant::now());
                }
                _ = refresh.tick() => {
                    let start = crate::dataplane::monotonic_ns();
                    let n = self.refresh_pass(last_pass).await;
                    last_pass = start;
                    if n == 0 && !sent_since_refresh {
                        // A heartbeat, so the peer can tell silence from a cut link.
                        self.send(&Message::Events(Vec::new())).await;
                    }
                    sent_since_refresh = false;
                }
            }
        }
    }

    async fn request_dump(&mut self) {
        if self.send(&Message::DumpRequest).await {
            add(&self.stats.dump_requests_sent, 1);
            debug!(peer = %self.peer, "asked the sync peer for its table");
        }
    }

    /// Names raw dataplane records for the peer (reading `REALS` for their reals).
    async fn translate(&self, raw: Vec<SyncEvent>) -> Vec<ConnEvent> {
        if raw.is_empty() {
            return Vec::new();
        }
        let reader = self.programmer.reader().clone();
        let stats = self.stats.clone();
        tokio::task::spawn_blocking(move || {
            let mut reals: HashMap<u32, Option<Real>> = HashMap::new();
            let mut out = Vec::with_capacity(raw.len());
            for ev in &raw {
                let real = reals
                    .entry(ev.real)
                    .or_insert_with(|| reader.real(ev.real).ok());
                match real.as_ref().and_then(|r| to_wire(ev, r)) {
                    Some(w) => out.push(w),
                    None => add(&stats.untranslatable, 1),
                }
            }
            out
        })
        .await
        .unwrap_or_default()
    }

    /// Seals and sends one message; false if it could not be sent.
    async fn send(&mut self, msg: &Message) -> bool {
        let d = match self.wire.seal(msg) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "sealing a sync datagram failed");
                add(&self.stats.send_errors, 1);
                return false;
            }
        };
        match self.sock.send_to(&d, self.peer).await {
            Ok(_) => {
                add(&self.stats.sent_datagrams, 1);
                true
            }
            Err(e) => {
                debug!(error = %e, peer = %self.peer, "sending a sync datagram failed");
                add(&self.stats.send_errors, 1);
                false
            }
        }
    }

    async fn send_events(&mut self, events: Vec<ConnEvent>, extra: Option<&AtomicU64>) {
        let n = events.len() as u64;
        if self.send(&Message::Events(events)).await {
            add(&self.stats.sent_events, n);
            if let Some(c) = extra {
                add(c, n);
            }
        }
    }

    /// Live entries of this table (for a dump: all but half-open; for a refresh: our own ones
    /// that saw a packet since `since_ns`), named for the peer.
    async fn collect(&self, since_ns: Option<u64>) -> Vec<ConnEvent> {
        let reader = self.programmer.reader().clone();
        let stats = self.stats.clone();
        tokio::task::spawn_blocking(move || {
            let mut reals: HashMap<u32, Option<Real>> = HashMap::new();
            let mut out = Vec::new();
            for (key, conn) in reader.connections() {
                if !state::is_live(conn.state) || conn.state == state::SYN_RECV {
                    continue;
                }
                if let Some(since) = since_ns {
                    if conn.flags & CONN_F_SYNCED != 0 || conn.last_seen_ns < since {
                        continue;
                    }
                }
                let ev = SyncEvent {
                    key,
                    real: conn.real,
                    service: conn.service,
                    state: conn.state,
                    kind: if since_ns.is_some() {
                        sync_kind::STATE
                    } else {
                        sync_kind::NEW
                    },
                    _pad: [0; 3],
                };
                let real = reals
                    .entry(conn.real)
                    .or_insert_with(|| reader.real(conn.real).ok());
                match real.as_ref().and_then(|r| to_wire(&ev, r)) {
                    Some(w) => out.push(w),
                    None => add(&stats.untranslatable, 1),
                }
            }
            out
        })
        .await
        .unwrap_or_default()
    }

    /// Sends `events` in full batches, pausing between bursts so a large table does not
    /// flood the link or the peer's socket buffer.
    async fn send_paced(&mut self, events: Vec<ConnEvent>, counter: fn(&SyncStats) -> &AtomicU64) {
        let mut batch = Batcher::default();
        let mut datagrams = 0usize;
        let stats = self.stats.clone();
        let mut out = Vec::new();
        for ev in events {
            if let Some(full) = batch.push(ev) {
                out.push(full);
            }
        }
        out.extend(batch.take());
        for b in out {
            self.send_events(b, Some(counter(&stats))).await;
            datagrams += 1;
            if datagrams.is_multiple_of(DUMP_BURST) {
                tokio::time::sleep(DUMP_PAUSE).await;
            }
        }
    }

    async fn dump(&mut self) {
        let events = self.collect(None).await;
        let n = events.len();
        self.send_paced(events, |s| &s.dump_events_sent).await;
        info!(peer = %self.peer, connections = n, "sent the connection table to the sync peer");
    }

    async fn refresh_pass(&mut self, since_ns: u64) -> usize {
        let events = self.collect(Some(since_ns)).await;
        let n = events.len();
        self.send_paced(events, |s| &s.refresh_events_sent).await;
        n
    }
}

/// Reads up to [`DRAIN_MAX`] records.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<SyncEvent> {
    let mut out = Vec::new();
    while out.len() < DRAIN_MAX {
        let Some(item) = ring.next() else { break };
        if item.len() >= std::mem::size_of::<SyncEvent>() {
            // SAFETY: the record holds at least one SyncEvent's bytes; any bit pattern of its
            // plain integer fields is valid; read_unaligned makes no alignment assumption.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<SyncEvent>()) });
        }
    }
    out
}

struct ReceiverTask {
    sock: Arc<UdpSocket>,
    wire: wire::Receiver,
    stats: Arc<SyncStats>,
    programmer: Owner,
    asks: mpsc::Sender<Ask>,
    /// A peer silent this long (no heartbeat) has left; hearing it again is a rejoin.
    silence: Duration,
}

impl ReceiverTask {
    async fn run(mut self) {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = match self.sock.recv_from(&mut buf).await {
                Ok((n, _)) => n,
                Err(e) => {
                    // ICMP errors of earlier sends surface here (ECONNREFUSED): not fatal.
                    debug!(error = %e, "sync socket receive error");
                    continue;
                }
            };
            let msg = match self.wire.open(&buf[..n]) {
                Ok(m) => m,
                Err(r) => {
                    self.stats.rejected.count(r);
                    debug!(reason = %r, "sync datagram rejected");
                    continue;
                }
            };
            add(&self.stats.received_datagrams, 1);
            let before = self.stats.heard();
            if before.is_none_or(|d| d >= self.silence) || msg == Message::DumpRequest {
                // First contact, a rejoin after silence, or a peer that just (re)started: what
                // it has, we may lack.
                let _ = self.asks.try_send(Ask::RequestDump);
            }
            match msg {
                Message::DumpRequest => {
                    add(&self.stats.dump_requests_received, 1);
                    let _ = self.asks.try_send(Ask::Dump);
                }
                Message::Events(events) if events.is_empty() => {}
                Message::Events(events) => {
                    add(&self.stats.received_events, events.len() as u64);
                    let stats = self.stats.clone();
                    let r = self
                        .programmer
                        .read(move |p| install_all(p, &events, &stats))
                        .await;
                    if let Ok(Err(e)) = r {
                        warn!(error = %format!("{e:#}"), "installing synced connections failed");
                    }
                }
            }
        }
    }
}

/// Installs a batch of the peer's events, counting each outcome.
pub fn install_all(p: &Programmer, events: &[ConnEvent], stats: &SyncStats) -> Result<()> {
    for ev in events {
        let req = match to_install(
            ev,
            |k| p.planner.service_id(k),
            |k, a| p.planner.real_id(k, a),
        ) {
            Ok(r) => r,
            Err(r) => {
                stats.count_install_reject(r);
                continue;
            }
        };
        let mut rc = install_rc::RACED;
        for _ in 0..INSTALL_TRIES {
            rc = p.dp.sync_install(&req)?;
            if rc != install_rc::RACED {
                break;
            }
        }
        match rc {
            install_rc::INSERTED | install_rc::REPLACED => add(&stats.installed, 1),
            install_rc::UPDATED => add(&stats.updated, 1),
            install_rc::RETIRED => add(&stats.retired, 1),
            install_rc::ABSENT => add(&stats.absent, 1),
            install_rc::FULL => stats.count_install_reject(InstallReject::TableFull),
            install_rc::RACED => stats.count_install_reject(InstallReject::Raced),
            install_rc::INVALID => stats.count_install_reject(InstallReject::Invalid),
            other => return Err(anyhow!("the install program returned {other}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn real_slot(addr: &str, service: u32) -> Real {
        let a = sa(addr);
        let (ad, family) = crate::state::addr(a.ip());
        Real {
            addr: ad,
            port: a.port().to_be(),
            family,
            flags: xdpvs_common::REAL_F_VALID,
            service,
        }
    }

    fn dp_event(kind: u8, st: u32) -> SyncEvent {
        SyncEvent {
            key: conn_key(
                ConnProto::Tcp,
                sa("198.18.0.1:40000"),
                sa("198.18.0.100:80"),
            ),
            real: 7,
            service: 3,
            state: st,
            kind,
            _pad: [0; 3],
        }
    }

    #[test]
    fn dataplane_events_are_named_by_address_and_back_by_local_ids() {
        let ev = dp_event(sync_kind::NEW, state::ESTABLISHED);
        let w = to_wire(&ev, &real_slot("198.18.0.12:80", 3)).unwrap();
        assert_eq!(
            w,
            ConnEvent {
                kind: EventKind::New,
                proto: ConnProto::Tcp,
                state: state::ESTABLISHED as u8,
                client: sa("198.18.0.1:40000"),
                service: sa("198.18.0.100:80"),
                real: sa("198.18.0.12:80"),
            }
        );
        // The peer's ids differ from ours: only the addresses cross.
        let skey = crate::state::service_key(sa("198.18.0.100:80"), crate::config::Protocol::Tcp);
        let back = to_install(
            &w,
            |k| (*k == skey).then_some(11),
            |k, a| (*k == skey && a == sa("198.18.0.12:80")).then_some(42),
        )
        .unwrap();
        assert_eq!((back.service, back.real), (11, 42));
        assert_eq!(
            back.key, ev.key,
            "the same connection-table key on both directors"
        );
        assert_eq!((back.state, back.kind), (ev.state, ev.kind));
        for (kind, want) in [
            (sync_kind::STATE, EventKind::StateChange),
            (sync_kind::END, EventKind::End),
        ] {
            let w = to_wire(
                &dp_event(kind, state::FIN_WAIT),
                &real_slot("198.18.0.12:80", 3),
            );
            assert_eq!(w.map(|w| w.kind), Some(want));
        }
    }

    #[test]
    fn inconsistent_records_are_not_sent() {
        let ev = dp_event(sync_kind::NEW, state::ESTABLISHED);
        // The real slot now belongs to another service (freed and reused meanwhile).
        assert_eq!(to_wire(&ev, &real_slot("198.18.0.12:80", 4)), None);
        // An empty slot.
        assert_eq!(to_wire(&ev, &Real::default()), None);
        assert_eq!(
            to_wire(
                &dp_event(9, state::ESTABLISHED),
                &real_slot("198.18.0.12:80", 3)
            ),
            None
        );
    }

    #[test]
    fn unknown_services_reals_and_states_are_refused() {
        let w = ConnEvent {
            kind: EventKind::New,
            proto: ConnProto::Tcp,
            state: state::ESTABLISHED as u8,
            client: sa("198.18.0.1:40000"),
            service: sa("198.18.0.100:80"),
            real: sa("198.18.0.12:80"),
        };
        let some = |_: &ServiceKey| Some(1);
        let none = |_: &ServiceKey| None;
        let real = |_: &ServiceKey, _| Some(2);
        let no_real = |_: &ServiceKey, _| None;
        assert_eq!(
            to_install(&w, none, real),
            Err(InstallReject::UnknownService)
        );
        assert_eq!(
            to_install(&w, some, no_real),
            Err(InstallReject::UnknownReal)
        );
        let cases = [
            (ConnProto::Tcp, state::UDP, EventKind::New),
            (ConnProto::Tcp, state::SYN_RECV, EventKind::New),
            (ConnProto::Tcp, state::DEAD, EventKind::End),
            (ConnProto::Udp, state::ESTABLISHED, EventKind::New),
            (ConnProto::Tcp, 200, EventKind::StateChange),
        ];
        for (proto, st, kind) in cases {
            let e = ConnEvent {
                proto,
                state: st as u8,
                kind,
                ..w
            };
            assert_eq!(
                to_install(&e, some, real),
                Err(InstallReject::Invalid),
                "{e:?}"
            );
        }
        let mixed = ConnEvent {
            real: sa("[2001:db8::1]:80"),
            ..w
        };
        assert_eq!(to_install(&mixed, some, real), Err(InstallReject::Invalid));
        let udp = ConnEvent {
            proto: ConnProto::Udp,
            state: state::UDP as u8,
            ..w
        };
        let r = to_install(&udp, some, real).unwrap();
        assert_eq!(r.key.proto, PROTO_UDP);
    }

    fn wev(i: u16, v6: bool) -> ConnEvent {
        let (c, s, r) = if v6 {
            ("[2001:db8::1]", "[2001:db8::100]:80", "[2001:db8::11]:80")
        } else {
            ("198.18.0.1", "198.18.0.100:80", "198.18.0.11:80")
        };
        ConnEvent {
            kind: EventKind::New,
            proto: ConnProto::Tcp,
            state: 2,
            client: sa(&format!("{c}:{i}")),
            service: sa(s),
            real: sa(r),
        }
    }

    #[test]
    fn batches_fill_a_datagram_and_no_more() {
        let mut b = Batcher::default();
        assert_eq!(b.deadline(), None);
        let n4 = wire::Sender::max_events(false);
        let mut out = Vec::new();
        for i in 0..(n4 as u16 * 2 + 5) {
            out.extend(b.push(wev(i, false)));
        }
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|x| x.len() == n4));
        assert_eq!(b.len(), 5);
        let d = b.deadline().unwrap();
        assert!(d <= Instant::now() + FLUSH_AFTER);
        assert_eq!(b.take().map(|x| x.len()), Some(5));
        assert!(b.is_empty() && b.deadline().is_none() && b.take().is_none());
        // Every batch seals into one datagram, including one that turns IPv6 midway.
        let key = wire::Key::from_bytes([3; 32]);
        let mut s = wire::Sender::new(&key, [1; 16], 1);
        let mut batches = out;
        for i in 0..(n4 as u16 - 1) {
            batches.extend(b.push(wev(i, false)));
        }
        for i in 0..200 {
            batches.extend(b.push(wev(i, true)));
        }
        batches.extend(b.take());
        let total: usize = batches.iter().map(|x| x.len()).sum();
        assert_eq!(total, 2 * n4 + n4 - 1 + 200);
        for x in batches {
            let d = s.seal(&Message::Events(x)).expect("fits one datagram");
            assert!(d.len() <= wire::MAX_DATAGRAM);
        }
    }
}
