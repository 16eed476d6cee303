//! Loading, attaching and programming the XDP dataplane.
//!
//! [`Dataplane`] owns the loaded object and its maps; it executes the [`plan::Write`]s that the
//! planner derives from the desired state, reads counters for `list` and metrics, and runs the
//! connection-table sweep. It is the only code that writes the maps. Map types and names come
//! from `xdpvs-common`, shared with the XDP program.

pub mod plan;

use std::net::{SocketAddr, UdpSocket};

use anyhow::{anyhow, Context, Result};
use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use aya::programs::{TestRun, TestRunOptions, Xdp, XdpMode};
use aya::util::nr_cpus;
use aya::{Ebpf, EbpfLoader};
use xdpvs_common::{
    expire_rc, maps, progs, stat, state, Conn, ConnKey, ExpireRequest, Real, RealConns, RealSet,
    RealStats, Service, ServiceKey, Settings, EXPIRE_F_FORCE, REAL_F_VALID,
};

use crate::config::XdpMode as ConfigXdpMode;
use plan::Write;

/// The compiled XDP object, built by build.rs from `ebpf/xdpvs-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdpvs.bpf.o"));

/// What one pass of the connection-table sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries in the table when the sweep started.
    pub entries: usize,
    /// Entries retired (idle past their timeout, or their real was cut).
    pub retired: usize,
}

pub struct Dataplane {
    ebpf: Ebpf,
    services: HashMap<MapData, ServiceKey, Service>,
    realsets: Array<MapData, RealSet>,
    reals: Array<MapData, Real>,
    real_conns: Array<MapData, RealConns>,
    real_stats: PerCpuArray<MapData, RealStats>,
    conns: HashMap<MapData, ConnKey, Conn>,
    settings_map: Array<MapData, Settings>,
    stats: PerCpuArray<MapData, u64>,
    settings: Settings,
    attached: Option<(String, &'static str)>,
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
    /// Loads the object and its programs (nothing is attached yet).
    pub fn load(conn_table_size: u32) -> Result<Self> {
        raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::CONNS, conn_table_size)
            .load(OBJECT)
            .context("loading the XDP object (needs root / CAP_BPF)")?;
        for name in [progs::XDP_MAIN, progs::XDP_EXPIRE] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the XDP object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel refused program {name}"))?;
        }
        Ok(Dataplane {
            services: take(&mut ebpf, maps::SERVICES)?,
            realsets: take(&mut ebpf, maps::REALSETS)?,
            reals: take(&mut ebpf, maps::REALS)?,
            real_conns: take(&mut ebpf, maps::REAL_CONNS)?,
            real_stats: take(&mut ebpf, maps::REAL_STATS)?,
            conns: take(&mut ebpf, maps::CONNS)?,
            settings_map: take(&mut ebpf, maps::SETTINGS)?,
            stats: take(&mut ebpf, maps::STATS)?,
            settings: Settings::default(),
            attached: None,
            ebpf,
        })
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

    /// Attaches the packet program; returns the mode in use ("driver" or "skb").
    pub fn attach(&mut self, interface: &str, mode: ConfigXdpMode) -> Result<&'static str> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(progs::XDP_MAIN)
            .ok_or_else(|| anyhow!("program missing"))?
            .try_into()?;
        let used = match mode {
            ConfigXdpMode::Driver => {
                prog.attach(interface, XdpMode::Driver).with_context(|| {
                    format!(
                        "attaching XDP in driver mode to {interface} ({})",
                        driver_limits(interface)
                    )
                })?;
                "driver"
            }
            ConfigXdpMode::Skb => {
                prog.attach(interface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP in skb mode to {interface}"))?;
                "skb"
            }
            ConfigXdpMode::Auto => match prog.attach(interface, XdpMode::Driver) {
                Ok(_) => "driver",
                Err(e) => {
                    tracing::warn!(
                        interface,
                        error = %e,
                        why = driver_limits(interface),
                        "driver-mode XDP unavailable; falling back to skb (generic) mode, which is much slower"
                    );
                    prog.attach(interface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP to {interface}"))?;
                    "skb"
                }
            },
        };
        self.attached = Some((interface.to_string(), used));
        Ok(used)
    }

    /// Executes planned writes in order.
    pub fn write(&mut self, writes: &[Write]) -> Result<()> {
        for w in writes {
            match w {
                Write::ResetReal(id) => {
                    self.real_conns.set(*id, RealConns::default(), 0)?;
                    let cpus = nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
                    let zero = PerCpuValues::try_from(vec![RealStats::default(); cpus])?;
                    self.real_stats.set(*id, zero, 0)?;
                }
                Write::Real(id, r) => self.reals.set(*id, r, 0)?,
                Write::RealSet(i, s) => self.realsets.set(*i, s.as_ref(), 0)?,
                Write::Service(k, s) => self.services.insert(k, s, 0)?,
                Write::DeleteService(k) => match self.services.remove(k) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e.into()),
                },
                Write::Settings(s) => {
                    self.settings_map.set(0, s, 0)?;
                    self.settings = *s;
                }
            }
        }
        Ok(())
    }

    pub fn real_conns(&self, id: u32) -> Result<RealConns> {
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

    /// The tracked connections (a snapshot; the table changes while it is read).
    pub fn connections(&self) -> Vec<(ConnKey, Conn)> {
        self.conns.iter().filter_map(|r| r.ok()).collect()
    }

    /// Retires one connection entry through the expiry program; true if it was retired.
    pub fn expire(&self, key: ConnKey, force: bool) -> Result<bool> {
        let req = ExpireRequest {
            key,
            flags: if force { EXPIRE_F_FORCE } else { 0 },
            _pad: 0,
        };
        // SAFETY: ExpireRequest is #[repr(C)] plain integers with explicit padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&req as *const ExpireRequest).cast::<u8>(),
                std::mem::size_of::<ExpireRequest>(),
            )
        };
        let prog = self.program(progs::XDP_EXPIRE)?;
        let r = prog.test_run(TestRunOptions {
            data_in: Some(bytes),
            ..TestRunOptions::default()
        })?;
        Ok(r.return_value == expire_rc::RETIRED)
    }

    /// Retires every entry idle past its state's timeout, or whose real is no longer valid.
    /// The kernel re-checks each candidate, so a packet arriving meanwhile keeps its entry.
    pub fn sweep(&self) -> Result<SweepReport> {
        let now = monotonic_ns();
        let mut report = SweepReport::default();
        let mut valid: std::collections::HashMap<u32, bool> = std::collections::HashMap::new();
        let mut candidates = Vec::new();
        for (key, conn) in self.connections() {
            report.entries += 1;
            let real_ok = *valid.entry(conn.real).or_insert_with(|| {
                self.reals
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

    /// Makes the kernel resolve each real's MAC ahead of traffic (the XDP program reads the
    /// neighbour table and cannot trigger resolution itself): one empty datagram to the discard
    /// port of each address.
    pub fn prime_neighbours(addrs: impl IntoIterator<Item = SocketAddr>) {
        let Ok(sock) = UdpSocket::bind("0.0.0.0:0") else {
            return;
        };
        for a in addrs {
            if a.is_ipv4() {
                let _ = sock.send_to(&[], SocketAddr::new(a.ip(), 9));
            }
        }
    }
}

/// Largest MTU whose frames fit one page in most drivers' XDP buffers; above it a driver needs
/// multi-buffer XDP (the program declares it, not every driver supports it).
const ONE_PAGE_MTU: u32 = 3498;

/// What a driver that refuses driver-mode XDP probably cannot do, from the interface's MTU.
fn driver_limits(interface: &str) -> String {
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{interface}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match mtu {
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
