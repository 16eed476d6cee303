//! Loading, attaching and programming the XDP dataplane.
//!
//! [`Dataplane`] owns the loaded object and its maps; it executes the [`plan::Write`]s that the
//! planner derives from the desired state, reads counters for `list` and metrics, and runs the
//! connection-table sweep. It is the only code that writes the maps, and in the daemon one
//! thread holds it: the [`owner`], which takes every change as a request and gives readers a
//! read-only handle of the same maps. Map types and names come from `xdpvs-common`, shared with
//! the XDP program.
//!
//! A daemon opens the dataplane pinned ([`Dataplane::open`], [`pin`]): the maps and the XDP link
//! live in bpffs, so packets keep flowing while no daemon runs, and the next daemon adopts them
//! after checking that they have the layout it expects. Adopting reads first
//! ([`Dataplane::view`] -> [`plan::Planner::adopt`]), plans second and writes last.

pub mod owner;
pub mod pin;
pub mod plan;

use std::net::{SocketAddr, UdpSocket};

use anyhow::{anyhow, Context, Result};
use std::path::{Path, PathBuf};

use aya::maps::{
    Array, HashMap, IterableMap, MapData, MapInfo, PerCpuArray, PerCpuValues, RingBuf,
};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{TestRun, TestRunOptions, Xdp, XdpMode};
use aya::util::nr_cpus;
use aya::{Ebpf, EbpfLoader};
use xdpvs_common::{
    expire_rc, maps, progs, sched::clamp_counter, stat, state, Conn, ConnKey, ExpireRequest,
    Layout, PersistKey, Real, RealConns, RealSet, RealStats, Service, ServiceKey, ServiceState,
    Settings, SweepResult, SyncEvent, TableBlock, Template, CONN_F_REPLY,
    DEFAULT_EMBRYONIC_TABLE_SIZE, DEFAULT_TABLE_POOL_BLOCKS, EXPIRE_F_FORCE, FAMILY_NONE,
    MAX_REALS, REAL_F_VALID, TABLE_BLOCK,
};

use crate::config::XdpMode as ConfigXdpMode;
use plan::{MapsView, Write};

/// The compiled XDP object, built by build.rs from `ebpf/xdpvs-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdpvs.bpf.o"));

/// What one pass of the connection-table sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries in both tables when the sweep started.
    pub entries: usize,
    /// Entries retired (idle past their timeout, or their real was cut).
    pub retired: usize,
    /// Of `entries`, those in the embryonic table.
    pub embryos: usize,
    /// Of `retired`, those in the embryonic table.
    pub embryos_retired: usize,
    /// Embryonic counts released because the LRU had evicted their entries.
    pub embryos_evicted: u64,
}

/// Capacities of the two connection tables (`[director] conn_table_size`,
/// `embryonic_table_size`) and of the lookup-table pool (`table_pool_size`, in blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    pub conns: u32,
    pub embryos: u32,
    pub table_pool: u32,
}

impl Tables {
    /// A connection table of `conns` entries, the default embryonic table and table pool.
    pub fn conns(conns: u32) -> Tables {
        Tables {
            conns,
            embryos: DEFAULT_EMBRYONIC_TABLE_SIZE,
            table_pool: DEFAULT_TABLE_POOL_BLOCKS,
        }
    }

    /// Blocks of the table pool that `[director] table_pool_size` entries take.
    pub fn pool_blocks(entries: u32) -> u32 {
        entries.div_ceil(TABLE_BLOCK as u32)
    }
}

/// The pinned maps differ from what this build expects: adopting them would misread them.
#[derive(Debug, thiserror::Error)]
#[error(
    "the dataplane pinned at {dir} was made with another map layout: {differences}. \
     Not adopting it (its connections keep flowing meanwhile). Run the xdpvs version that \
     pinned it, or start with `xdpvs run --fresh`, which starts clean and loses the open \
     connections"
)]
pub struct LayoutMismatch {
    pub dir: PathBuf,
    pub differences: String,
}

/// The dataplane and the planner that remembers what was written to it: the one writer of the
/// maps.
pub struct Programmer {
    pub dp: Dataplane,
    pub planner: plan::Planner,
}

impl Programmer {
    /// Plans `desired` and writes the difference; returns how many writes it took. If a write
    /// fails part-way, the planner is rebuilt from the maps, so it never believes a state that
    /// was never written, and the next apply writes what is still missing.
    pub fn apply(&mut self, desired: &crate::state::Desired) -> Result<usize> {
        let writes = self.planner.plan(desired)?;
        if writes.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.dp.write(&writes) {
            match self.dp.view().and_then(|v| Ok(plan::Planner::adopt(&v)?)) {
                Ok(planner) => self.planner = planner,
                Err(r) => tracing::error!(
                    error = %format!("{r:#}"),
                    "re-reading the maps after a failed write failed"
                ),
            }
            return Err(
                e.context("writing the dataplane maps (the planner was resynced from them)")
            );
        }
        Ok(writes.len())
    }
}

/// How a daemon came by its dataplane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// New maps (nothing was pinned, or `--fresh`).
    Fresh,
    /// Maps pinned by an earlier daemon, with their connections and counters.
    Adopted,
}

pub struct Dataplane {
    ebpf: Ebpf,
    layout: Array<MapData, Layout>,
    /// The maps `list`, metrics and adopt read (shared with the offline reader).
    maps: Maps,
    conns: HashMap<MapData, ConnKey, Conn>,
    /// Per-service scheduler state (the wrr mark), written on set changes.
    service_state: Array<MapData, ServiceState>,
    /// The sync event ring buffer, until its reader takes it ([`Dataplane::take_sync_events`]).
    sync_events: Option<RingBuf<MapData>>,
    embryos: HashMap<MapData, ConnKey, Conn>,
    settings: Settings,
    attached: Option<(String, &'static str)>,
    /// The pin directory, when opened pinned.
    pin_dir: Option<PathBuf>,
    /// Our descriptor of the pinned link (closing it leaves the link to its pin).
    link: Option<FdLink>,
}

/// The flows of one connection table, without NAT reply entries.
fn flows(table: &HashMap<MapData, ConnKey, Conn>) -> Vec<(ConnKey, Conn)> {
    table
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(_, c)| c.flags & CONN_F_REPLY == 0)
        .collect()
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Dataplane {
    /// Loads the object and its programs with private maps (nothing is attached or pinned):
    /// for tests and benchmarks.
    pub fn load(conn_table_size: u32) -> Result<Self> {
        Self::load_tables(Tables::conns(conn_table_size))
    }

    /// As [`Dataplane::load`], with both tables' sizes.
    pub fn load_tables(tables: Tables) -> Result<Self> {
        Self::load_with(EbpfLoader::new(), tables, None)
    }

    /// Loads the object with its maps pinned in `dir`: maps pinned there by an earlier daemon
    /// are adopted if their layout matches this build's (else [`LayoutMismatch`], and nothing
    /// is touched), and created and pinned if there are none. `fresh` first removes whatever
    /// is pinned there, open connections included.
    pub fn open(dir: &Path, tables: Tables, fresh: bool) -> Result<(Self, Origin)> {
        if fresh && dir.exists() {
            pin::remove_all(dir)
                .with_context(|| format!("removing the pinned dataplane in {}", dir.display()))?;
            tracing::warn!(dir = %dir.display(), "--fresh: removed the pinned dataplane and its connections");
        }
        if let Some(w) = pin::prepare_dir(dir)? {
            tracing::warn!("{w}");
        }
        let origin = if pin::has_pins(dir) {
            match check_layout(dir, tables)? {
                LayoutCheck::Same => Origin::Adopted,
                LayoutCheck::Unwritten => {
                    // A daemon died between pinning the maps and recording their layout: it
                    // never served from them.
                    tracing::warn!(dir = %dir.display(), "removing an unfinished pinned dataplane");
                    pin::remove_all(dir)?;
                    pin::prepare_dir(dir)?;
                    Origin::Fresh
                }
            }
        } else {
            Origin::Fresh
        };
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = maps::PINNED.iter().map(|m| (*m, dir.join(m))).collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut dp = Self::load_with(loader, tables, Some(dir.to_path_buf()))?;
        if origin == Origin::Fresh {
            dp.layout.set(0, Layout::current(tables.conns), 0)?;
        }
        Ok((dp, origin))
    }

    fn load_with(
        mut loader: EbpfLoader<'_>,
        tables: Tables,
        pin_dir: Option<PathBuf>,
    ) -> Result<Self> {
        raise_memlock();
        let mut ebpf = loader
            .map_max_entries(maps::CONNS, tables.conns)
            .map_max_entries(maps::EMBRYOS, tables.embryos)
            .map_max_entries(maps::TABLES, tables.table_pool)
            .load(OBJECT)
            .context("loading the XDP object (needs root / CAP_BPF)")?;
        for name in [
            progs::XDP_MAIN,
            progs::XDP_EXPIRE,
            progs::XDP_SYNC_INSTALL,
            progs::XDP_SWEEP,
        ] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel refused program {name}"))?;
        }
        let maps = Maps {
            services: take(&mut ebpf, maps::SERVICES)?,
            realsets: take(&mut ebpf, maps::REALSETS)?,
            reals: take(&mut ebpf, maps::REALS)?,
            real_conns: take(&mut ebpf, maps::REAL_CONNS)?,
            real_stats: take(&mut ebpf, maps::REAL_STATS)?,
            settings: take(&mut ebpf, maps::SETTINGS)?,
            stats: take(&mut ebpf, maps::STATS)?,
            persist: take(&mut ebpf, maps::PERSIST)?,
            tables: take(&mut ebpf, maps::TABLES)?,
        };
        // An adopted dataplane keeps its timeouts; a new one holds zeros until the first plan.
        let settings = maps.settings.get(&0, 0).unwrap_or_default();
        Ok(Dataplane {
            layout: take(&mut ebpf, maps::LAYOUT)?,
            maps,
            conns: take(&mut ebpf, maps::CONNS)?,
            service_state: take(&mut ebpf, maps::SERVICE_STATE)?,
            sync_events: Some(take(&mut ebpf, maps::SYNC_EVENTS)?),
            embryos: take(&mut ebpf, maps::EMBRYOS)?,
            settings,
            attached: None,
            pin_dir,
            link: None,
            ebpf,
        })
    }

    /// Attaches the packet program. Opened pinned: if a link is pinned for `interface`, the
    /// new program replaces the old one on it atomically (`bpf_link_update`: no packet sees
    /// no program); otherwise a new link is made and pinned. Returns the mode in use.
    pub fn attach(&mut self, interface: &str, mode: ConfigXdpMode) -> Result<&'static str> {
        let Some(dir) = self.pin_dir.clone() else {
            return self.attach_new(interface, mode);
        };
        let link_path = dir.join(pin::LINK);
        if link_path.exists() {
            let info = pin::link_info(&link_path)?;
            let ifindex = ifindex(interface)?;
            if info.ifindex == ifindex {
                let pinned = PinnedLink::from_pin(&link_path)
                    .with_context(|| format!("opening {}", link_path.display()))?;
                let link = aya::programs::xdp::XdpLink::try_from(FdLink::from(pinned))
                    .map_err(|e| anyhow!("{} is not an XDP link: {e}", link_path.display()))?;
                let prog = self.main_program_mut()?;
                let id = prog
                    .attach_to_link(link)
                    .context("replacing the program on the pinned XDP link")?;
                self.link = Some(FdLink::try_from(prog.take_link(id)?)?);
                self.attached = Some((interface.to_string(), "pinned"));
                return Ok("pinned");
            }
            tracing::warn!(
                link = %link_path.display(),
                pinned_ifindex = info.ifindex,
                ifindex,
                "the pinned XDP link is not attached to {interface} (the interface was \
                 recreated?); attaching anew"
            );
            std::fs::remove_file(&link_path)?;
        }
        let used = self.attach_new(interface, mode)?;
        Ok(used)
    }

    fn main_program_mut(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(progs::XDP_MAIN)
            .ok_or_else(|| anyhow!("program missing"))?
            .try_into()?)
    }

    /// Removes the pins (the program is detached once this process lets go of the link).
    pub fn unpin(&mut self) -> Result<()> {
        if let Some(dir) = self.pin_dir.take() {
            pin::remove_all(&dir)?;
        }
        self.link = None;
        Ok(())
    }

    /// The pin directory, when opened pinned.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }

    fn program(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// The packet program (tests run it with BPF_PROG_TEST_RUN).
    pub fn main_program(&self) -> Result<&Xdp> {
        self.program(progs::XDP_MAIN)
    }

    /// Attaches the packet program with a new link (pinned if opened pinned); returns the mode
    /// in use ("driver" or "skb").
    fn attach_new(&mut self, interface: &str, mode: ConfigXdpMode) -> Result<&'static str> {
        let pin_dir = self.pin_dir.clone();
        let prog = self.main_program_mut()?;
        let (used, id) = match mode {
            ConfigXdpMode::Driver => (
                "driver",
                prog.attach(interface, XdpMode::Driver).with_context(|| {
                    format!(
                        "attaching XDP in driver mode to {interface} ({})",
                        driver_limits(interface)
                    )
                })?,
            ),
            ConfigXdpMode::Skb => (
                "skb",
                prog.attach(interface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP in skb mode to {interface}"))?,
            ),
            ConfigXdpMode::Auto => match prog.attach(interface, XdpMode::Driver) {
                Ok(id) => ("driver", id),
                Err(e) => {
                    tracing::warn!(
                        interface,
                        error = %e,
                        why = driver_limits(interface),
                        "driver-mode XDP unavailable; falling back to skb (generic) mode, which is much slower"
                    );
                    let id = prog
                        .attach(interface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP to {interface}"))?;
                    ("skb", id)
                }
            },
        };
        if let Some(dir) = pin_dir {
            let link = FdLink::try_from(prog.take_link(id)?).map_err(|e| {
                anyhow!(
                    "the kernel attached XDP without a bpf link ({e}), which cannot be pinned: \
                     the dataplane would not outlive the daemon"
                )
            })?;
            let path = dir.join(pin::LINK);
            let pinned = link
                .pin(&path)
                .with_context(|| format!("pinning the XDP link at {}", path.display()))?;
            self.link = Some(FdLink::from(pinned));
        }
        self.attached = Some((interface.to_string(), used));
        Ok(used)
    }

    /// Executes planned writes in order.
    pub fn write(&mut self, writes: &[Write]) -> Result<()> {
        for w in writes {
            match w {
                Write::ResetReal(id) => {
                    self.maps.real_conns.set(*id, RealConns::default(), 0)?;
                    let cpus = nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
                    let zero = PerCpuValues::try_from(vec![RealStats::default(); cpus])?;
                    self.maps.real_stats.set(*id, zero, 0)?;
                }
                Write::Real(id, r) => self.maps.reals.set(*id, r, 0)?,
                Write::RealSet(i, s) => self.maps.realsets.set(*i, s.as_ref(), 0)?,
                Write::Table(first, entries) => {
                    for (i, chunk) in entries.chunks(TABLE_BLOCK).enumerate() {
                        let mut b = TableBlock::default();
                        b.e[..chunk.len()].copy_from_slice(chunk);
                        self.maps.tables.set(first + i as u32, b, 0)?;
                    }
                }
                Write::WrrChanged { service, di, mw } => {
                    let cur = self.service_state.get(service, 0)?;
                    let mark = xdpvs_common::sched::WrrMark::unpack(cur.rr_cursor);
                    let next = xdpvs_common::sched::wrr_changed(mark, *di, *mw);
                    let st = ServiceState {
                        rr_cursor: next.pack(),
                    };
                    self.service_state.set(*service, st, 0)?;
                }
                Write::ResetServiceState(id) => {
                    self.service_state.set(*id, ServiceState::default(), 0)?
                }
                Write::Service(k, s) => self.maps.services.insert(k, s, 0)?,
                Write::DeleteService(k) => match self.maps.services.remove(k) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e.into()),
                },
                Write::Settings(s) => {
                    self.maps.settings.set(0, s, 0)?;
                    self.settings = *s;
                }
            }
        }
        Ok(())
    }

    /// The tracked flows of both tables (a snapshot; the tables change while they are read).
    pub fn connections(&self) -> Vec<(ConnKey, Conn)> {
        let mut all = self.established_table();
        all.extend(self.embryonic_table());
        all
    }

    /// The flows of the connection table (`CONNS`: flows past their handshake).
    pub fn established_table(&self) -> Vec<(ConnKey, Conn)> {
        flows(&self.conns)
    }

    /// The flows of the embryonic table (`EMBRYOS`: half-open TCP, UDP seen once).
    pub fn embryonic_table(&self) -> Vec<(ConnKey, Conn)> {
        flows(&self.embryos)
    }

    /// The NAT reply entries of both tables (`CONN_F_REPLY`: they map a real's replies back
    /// to their flow and are no flows themselves).
    pub fn reply_entries(&self) -> Vec<(ConnKey, Conn)> {
        self.conns
            .iter()
            .chain(self.embryos.iter())
            .filter_map(|r| r.ok())
            .filter(|(_, c)| c.flags & CONN_F_REPLY != 0)
            .collect()
    }

    /// Retires one connection entry through the expiry program; true if it was retired.
    pub fn expire(&self, key: ConnKey, force: bool) -> Result<bool> {
        let req = ExpireRequest {
            key,
            flags: if force { EXPIRE_F_FORCE } else { 0 },
            _pad: 0,
        };
        Ok(self.test_run(progs::XDP_EXPIRE, &req)? == expire_rc::RETIRED)
    }

    /// Installs, moves or retires one entry as the sync peer reported it (ids already ours),
    /// through the install program; returns its `install_rc::*`.
    pub fn sync_install(&self, req: &SyncEvent) -> Result<u32> {
        self.test_run(progs::XDP_SYNC_INSTALL, req)
    }

    /// Runs one of the control programs with `req` as the frame; returns its return value.
    fn test_run<T: aya::Pod>(&self, prog: &str, req: &T) -> Result<u32> {
        // SAFETY: Pod types are #[repr(C)] plain integers with explicit padding.
        let bytes = unsafe {
            std::slice::from_raw_parts((req as *const T).cast::<u8>(), std::mem::size_of::<T>())
        };
        let prog = self.program(prog)?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(bytes),
            ..TestRunOptions::default()
        })?;
        Ok(r.return_value)
    }

    /// The ring buffer of connection events for the sync peer; `None` once taken (it has one
    /// reader, which owns it).
    pub fn take_sync_events(&mut self) -> Option<RingBuf<MapData>> {
        self.sync_events.take()
    }

    /// Retires every entry of both tables idle past its state's timeout, or whose real is no
    /// longer valid, and recounts the embryonic counts: one BPF_PROG_TEST_RUN of the sweep
    /// program, which walks the tables in the kernel with the packet path's compare-and-swap.
    pub fn sweep(&self) -> Result<SweepReport> {
        let frame = [0u8; std::mem::size_of::<SweepResult>()];
        let mut out = [0u8; std::mem::size_of::<SweepResult>()];
        let prog = self.program(progs::XDP_SWEEP)?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(&frame[..]),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })?;
        if (r.data_size_out as usize) < out.len() {
            return Err(anyhow!(
                "the sweep program returned {} bytes",
                r.data_size_out
            ));
        }
        // SAFETY: SweepResult is #[repr(C)] u64s; every bit pattern is valid.
        let res: SweepResult = unsafe { std::ptr::read_unaligned(out.as_ptr().cast()) };
        if res.done != 1 {
            return Err(anyhow!(
                "the sweep program did not run (rc {})",
                r.return_value
            ));
        }
        Ok(SweepReport {
            entries: (res.conns_seen + res.embryos_seen) as usize,
            retired: (res.conns_retired + res.embryos_retired) as usize,
            embryos: res.embryos_seen as usize,
            embryos_retired: res.embryos_retired as usize,
            embryos_evicted: res.embryos_evicted,
        })
    }

    /// The sweep as it was done before the kernel walk: read every entry from userspace (two
    /// syscalls per entry) and retire candidates one test run each. Kept for the benchmark
    /// that compares the two; the daemon uses [`Dataplane::sweep`].
    pub fn sweep_from_userspace(&self) -> Result<SweepReport> {
        let now = monotonic_ns();
        let mut report = SweepReport::default();
        let mut valid: std::collections::HashMap<u32, bool> = std::collections::HashMap::new();
        let mut candidates = Vec::new();
        for (key, conn) in self.connections() {
            report.entries += 1;
            let real_ok = *valid.entry(conn.real).or_insert_with(|| {
                self.maps
                    .reals
                    .get(&conn.real, 0)
                    .map(|r| r.flags & REAL_F_VALID != 0)
                    .unwrap_or(false)
            });
            let timeout = self
                .settings
                .timeout_ns
                .get(conn.state as usize)
                .copied()
                .unwrap_or(0);
            let idle = now.saturating_sub(conn.last_seen_ns);
            if !real_ok || !state::is_live(conn.state) || idle >= timeout {
                candidates.push((key, !real_ok));
            }
        }
        for (key, force) in candidates {
            if self.expire(key, force)? {
                report.retired += 1;
            }
        }
        Ok(report)
    }

    /// [`prime_neighbours`](Self::prime_neighbours) after dropping the entries of
    /// `interface` that are still resolving or failed. An entry left INCOMPLETE while the link
    /// was down is retried only at the next ARP retransmit (up to a second later), and new
    /// traffic does not hurry it: a director taking over after its link came back would drop
    /// connections to that real (`drop_no_neigh`) until then.
    pub fn reresolve_neighbours(interface: &str, addrs: impl IntoIterator<Item = SocketAddr>) {
        let addrs: Vec<SocketAddr> = addrs.into_iter().collect();
        for (flag, wanted) in [
            ("-4", addrs.iter().any(SocketAddr::is_ipv4)),
            ("-6", addrs.iter().any(SocketAddr::is_ipv6)),
        ] {
            if !wanted {
                continue;
            }
            let flushed = std::process::Command::new("ip")
                .args([flag, "neigh", "flush", "dev", interface])
                .args(["nud", "incomplete", "nud", "failed"])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            if let Err(e) = flushed {
                tracing::debug!(error = %e, "ip neigh flush failed");
            }
        }
        Self::prime_neighbours(addrs);
    }

    /// Makes the kernel resolve each real's MAC ahead of traffic (the XDP program reads the
    /// neighbour table and cannot trigger resolution itself): one empty datagram to the discard
    /// port of each address.
    /// (IPv4: ARP; IPv6: neighbour discovery, through a socket of that family).
    pub fn prime_neighbours(addrs: impl IntoIterator<Item = SocketAddr>) {
        let (mut v4, mut v6) = (None, None);
        for a in addrs {
            let sock = if a.is_ipv4() {
                v4.get_or_insert_with(|| UdpSocket::bind("0.0.0.0:0").ok())
            } else {
                v6.get_or_insert_with(|| UdpSocket::bind("[::]:0").ok())
            };
            if let Some(sock) = sock {
                let _ = sock.send_to(&[], SocketAddr::new(a.ip(), 9));
            }
        }
    }
}

/// The outcome of comparing pinned maps with this build.
enum LayoutCheck {
    Same,
    /// Pinned, but the layout record was never written.
    Unwritten,
}

/// Compares the maps pinned in `dir` with this build's object and config: every pinned map
/// present with the same key size, value size and capacity, and the recorded layout version
/// and fingerprint equal to this build's. Reads only.
fn check_layout(dir: &Path, tables: Tables) -> Result<LayoutCheck> {
    let conn_table_size = tables.conns;
    let mismatch = |differences: Vec<String>| LayoutMismatch {
        dir: dir.to_path_buf(),
        differences: differences.join("; "),
    };
    let obj = aya_obj::Object::parse(OBJECT).context("parsing the embedded XDP object")?;
    let mut diffs = Vec::new();
    for name in maps::PINNED {
        let path = dir.join(name);
        let spec = obj
            .maps
            .get(name)
            .ok_or_else(|| anyhow!("map {name} missing from the XDP object"))?;
        let want_entries = match name {
            maps::CONNS => conn_table_size,
            maps::EMBRYOS => tables.embryos,
            maps::TABLES => tables.table_pool,
            _ => spec.max_entries(),
        };
        match MapInfo::from_pin(&path) {
            Err(_) => diffs.push(format!("map {name} is not pinned")),
            Ok(info) => {
                let (k, v, n) = (info.key_size(), info.value_size(), info.max_entries());
                if (k, v) != (spec.key_size(), spec.value_size()) {
                    diffs.push(format!(
                        "map {name} has {k}-byte keys and {v}-byte values, this build uses {} and {}",
                        spec.key_size(),
                        spec.value_size()
                    ));
                } else if n != want_entries && name == maps::CONNS {
                    diffs.push(format!(
                        "the pinned connection table holds {n} entries but [director] \
                         conn_table_size is {conn_table_size} (set it back to {n} to adopt)"
                    ));
                } else if n != want_entries && name == maps::EMBRYOS {
                    diffs.push(format!(
                        "the pinned embryonic table holds {n} entries but [director] \
                         embryonic_table_size is {} (set it back to {n} to adopt)",
                        tables.embryos
                    ));
                } else if n != want_entries && name == maps::TABLES {
                    diffs.push(format!(
                        "the pinned lookup-table pool holds {} entries but [director] \
                         table_pool_size is {} (set it back to {} to adopt)",
                        n as u64 * TABLE_BLOCK as u64,
                        tables.table_pool as u64 * TABLE_BLOCK as u64,
                        n as u64 * TABLE_BLOCK as u64
                    ));
                } else if n != want_entries {
                    diffs.push(format!(
                        "map {name} holds {n} entries, this build uses {want_entries}"
                    ));
                }
            }
        }
    }
    if !diffs.is_empty() {
        return Err(mismatch(diffs).into());
    }
    let layout: Array<MapData, Layout> = pinned_map(dir, maps::LAYOUT)?;
    let rec = layout.get(&0, 0)?;
    if rec == Layout::default() {
        return Ok(LayoutCheck::Unwritten);
    }
    let cur = Layout::current(conn_table_size);
    if (rec.version, rec.fingerprint) != (cur.version, cur.fingerprint) {
        return Err(mismatch(vec![format!(
            "layout version {} (fingerprint {:#018x}) is pinned, this build uses version {} \
             ({:#018x})",
            rec.version, rec.fingerprint, cur.version, cur.fingerprint
        )])
        .into());
    }
    Ok(LayoutCheck::Same)
}

fn pinned_map<T>(dir: &Path, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let map = aya::maps::Map::from_map_data(data)?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

fn dup<T>(m: &MapData) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    use std::os::fd::AsFd;
    let fd = m.fd().as_fd().try_clone_to_owned()?;
    let map = aya::maps::Map::from_map_data(MapData::from_fd(fd)?)?;
    Ok(T::try_from(map)?)
}

/// The interface's index; `None` if there is no such interface (now).
pub fn interface_index(interface: &str) -> Option<u32> {
    ifindex(interface).ok()
}

fn ifindex(interface: &str) -> Result<u32> {
    let c = std::ffi::CString::new(interface)?;
    // SAFETY: a valid NUL-terminated name.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(anyhow!("no interface named {interface}")),
        i => Ok(i),
    }
}

/// The maps that are read by `list`, metrics and adopt: the daemon's through [`Dataplane`]
/// (which derefs to them), or opened read-only from the pins while no daemon runs.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, Service>,
    realsets: Array<MapData, RealSet>,
    reals: Array<MapData, Real>,
    real_conns: Array<MapData, RealConns>,
    real_stats: PerCpuArray<MapData, RealStats>,
    settings: Array<MapData, Settings>,
    stats: PerCpuArray<MapData, u64>,
    persist: HashMap<MapData, PersistKey, Template>,
    tables: Array<MapData, TableBlock>,
}

impl Maps {
    /// Opens the maps pinned in `dir` (their layout checked) without loading any program.
    pub fn open_pinned(dir: &Path) -> Result<Self> {
        check_layout_lenient(dir)?;
        Ok(Maps {
            services: pinned_map(dir, maps::SERVICES)?,
            realsets: pinned_map(dir, maps::REALSETS)?,
            reals: pinned_map(dir, maps::REALS)?,
            real_conns: pinned_map(dir, maps::REAL_CONNS)?,
            real_stats: pinned_map(dir, maps::REAL_STATS)?,
            settings: pinned_map(dir, maps::SETTINGS)?,
            stats: pinned_map(dir, maps::STATS)?,
            persist: pinned_map(dir, maps::PERSIST)?,
            tables: pinned_map(dir, maps::TABLES)?,
        })
    }

    /// A second handle of the same maps (duplicated descriptors), for readers on other
    /// threads.
    pub fn try_clone(&self) -> Result<Self> {
        Ok(Maps {
            services: dup(self.services.map())?,
            realsets: dup(self.realsets.map())?,
            reals: dup(self.reals.map())?,
            real_conns: dup(self.real_conns.map())?,
            real_stats: dup(self.real_stats.map())?,
            settings: dup(self.settings.map())?,
            stats: dup(self.stats.map())?,
            persist: dup(self.persist.map())?,
            tables: dup(self.tables.map())?,
        })
    }

    /// What the maps hold, for [`plan::Planner::adopt`].
    pub fn view(&self) -> Result<MapsView> {
        let mut view = MapsView::default();
        for r in self.services.iter() {
            let (k, v) = r?;
            view.realsets
                .insert(v.realset, self.realsets.get(&v.realset, 0)?);
            view.services.push((k, v));
        }
        for id in 0..MAX_REALS {
            let r = self.reals.get(&id, 0)?;
            if r.family != FAMILY_NONE {
                view.reals.push((id, r));
            }
        }
        view.settings = self.settings.get(&0, 0)?;
        view.table_pool = self.tables.len();
        Ok(view)
    }

    /// The persistence templates (a snapshot; expired ones included: the program ignores them
    /// and the LRU reclaims them).
    pub fn templates(&self) -> Vec<(PersistKey, Template)> {
        self.persist.iter().filter_map(|r| r.ok()).collect()
    }

    /// Capacity of the lookup-table pool, in blocks.
    pub fn table_pool(&self) -> u32 {
        self.tables.len()
    }

    /// `n` entries of the lookup-table pool from block `first` on (what a real set's
    /// `table_block` and `table_size` name).
    pub fn table(&self, first: u32, n: u32) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(n as usize);
        let mut b = first;
        while v.len() < n as usize {
            let block = self.tables.get(&b, 0)?;
            let take = (n as usize - v.len()).min(TABLE_BLOCK);
            v.extend_from_slice(&block.e[..take]);
            b += 1;
        }
        Ok(v)
    }

    /// The real set at `REALSETS[index]`.
    pub fn realset(&self, index: u32) -> Result<RealSet> {
        Ok(self.realsets.get(&index, 0)?)
    }

    /// What `REALS` holds for an id (family `FAMILY_NONE`: no real).
    pub fn real(&self, id: u32) -> Result<Real> {
        Ok(self.reals.get(&id, 0)?)
    }

    /// A real's counts as IPVS shows them: `inactive` includes the embryonic entries (IPVS
    /// counts SYN_RECV as inactive); `embryonic` says how many of them those are.
    pub fn real_conns(&self, id: u32) -> Result<RealConns> {
        let mut c = self.real_conns_raw(id)?;
        c.embryonic = clamp_counter(c.embryonic);
        c.inactive += c.embryonic;
        Ok(c)
    }

    /// A real's counters as the map holds them (`inactive` without embryos).
    pub fn real_conns_raw(&self, id: u32) -> Result<RealConns> {
        Ok(self.real_conns.get(&id, 0)?)
    }

    /// A real's traffic counters, summed over CPUs.
    pub fn real_stats(&self, id: u32) -> Result<RealStats> {
        let per_cpu = self.real_stats.get(&id, 0)?;
        Ok(per_cpu.iter().fold(RealStats::default(), |a, s| RealStats {
            conns: a.conns.wrapping_add(s.conns),
            packets: a.packets.wrapping_add(s.packets),
            bytes: a.bytes.wrapping_add(s.bytes),
        }))
    }

    /// The dataplane's packet counters (`stat::*`), summed over CPUs.
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize]> {
        let mut out = [0u64; stat::COUNT as usize];
        for (i, v) in out.iter_mut().enumerate() {
            *v = self
                .stats
                .get(&(i as u32), 0)?
                .iter()
                .fold(0u64, |a, x| a.wrapping_add(*x));
        }
        Ok(out)
    }
}

impl std::ops::Deref for Dataplane {
    type Target = Maps;
    fn deref(&self) -> &Maps {
        &self.maps
    }
}

/// For reading only: the layout record must match, whatever the connection table's size.
fn check_layout_lenient(dir: &Path) -> Result<()> {
    let layout: Array<MapData, Layout> = pinned_map(dir, maps::LAYOUT)?;
    let rec = layout.get(&0, 0)?;
    let cur = Layout::current(0);
    if (rec.version, rec.fingerprint) != (cur.version, cur.fingerprint) {
        return Err(LayoutMismatch {
            dir: dir.to_path_buf(),
            differences: format!(
                "layout version {} is pinned, this build reads version {}",
                rec.version, cur.version
            ),
        }
        .into());
    }
    Ok(())
}

/// Largest MTU whose frames fit one page in most drivers' XDP buffers; above it a driver needs
/// multi-buffer XDP (the program declares it, not every driver supports it).
const ONE_PAGE_MTU: u32 = 3498;

/// What a driver that refuses driver-mode XDP probably cannot do, from the interface's MTU.
fn driver_limits(interface: &str) -> String {
    match crate::preflight::interface_mtu(interface) {
        Some(m) if m > ONE_PAGE_MTU => format!(
            "MTU {m}: the driver may lack native XDP, or multi-buffer XDP, which frames above \
             one page (MTU {ONE_PAGE_MTU}) need; lower the MTU or set xdp_mode = \"skb\""
        ),
        Some(m) => {
            format!("MTU {m}: the driver may have no native XDP support; set xdp_mode = \"skb\"")
        }
        None => "no such interface in this network namespace".into(),
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK; lift it (best effort).
fn raise_memlock() {
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) };
}
