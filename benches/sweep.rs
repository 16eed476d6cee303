//! Connection-table sweep benchmark (`cargo bench --bench sweep`, needs root).
//!
//! The daemon expires idle connections once a second. This compares the two ways
//! `Dataplane` can do it, on the same loaded tables in the same run:
//! - `kernel`: [`Dataplane::sweep`], one BPF_PROG_TEST_RUN of `xdpvs_sweep`, which walks both
//!   tables with `bpf_for_each_map_elem` and recounts the embryonic counts (`bpf_loop` over the
//!   reals);
//! - `userspace`: [`Dataplane::sweep_from_userspace`], the walk it replaced: every entry read
//!   from userspace (`get_next_key` + lookup: two syscalls per entry), then one test run of
//!   `xdpvs_expire` per candidate.
//!
//! Tables: for each size N (262,144 and 1,000,000 by default) a dataplane is loaded with
//! `conn_table_size` = N and `embryonic_table_size` = N/4, inside a private network namespace
//! (`tests/support/dpnet.rs`) with one service of 8 reals. `CONNS` is filled to N entries (full)
//! through the sync install program (`xdpvs_sync_install`, one test run per entry: the path
//! that keeps `REAL_CONNS` exact), and `EMBRYOS` with N/8 half-open entries by crafted SYNs run
//! through the packet program. Two cases per size:
//! - `none expiring`: every entry live (timeouts far away); nothing changes, so the same
//!   tables are swept again and again;
//! - `10% expiring`: a tenth of `CONNS` in state CLOSE with the CLOSE timeout set to 0; every
//!   sweep retires exactly them, and they are installed again before the next one.
//!
//! Before filling, a kernel sweep of the empty tables is timed too: the fixed part of every
//! sweep (visiting every bucket, the embryo recount over every real slot, the syscall).
//!
//! Each sweep's report is checked (entries seen, entries retired) and after the run the reals'
//! counts are checked against the entries, so a figure never comes from a sweep that did not do
//! its work. Kernel and userspace runs alternate; each is run RUNS times (default 5) and the
//! table shows the median and the spread ((max - min) / median). Environment:
//! `XDPVS_SWEEP_RUNS`, `XDPVS_SWEEP_SIZES` (comma-separated table sizes).
//!
//! The markdown table goes to stdout, progress to stderr. Without root it prints SKIPPED and
//! exits 0; it runs only under `cargo bench` (argument `--bench`).

#[path = "../tests/support/dpnet.rs"]
mod dpnet;
#[path = "../tests/support/packet.rs"]
mod packet;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use dpnet::{service_on, DpNet, Harness, VIP, XDP_TX};
use packet::{Frame, SYN};
use xdpvs::config::Timeouts;
use xdpvs::dataplane::{SweepReport, Tables};
use xdpvs::ha::sync::service::conn_key;
use xdpvs::ha::sync::wire::ConnProto;
use xdpvs::state::{Desired, DesiredService};
use xdpvs_common::{install_rc, state, sync_kind, SyncEvent};

const REALS: usize = 8;
const PORT: u16 = 80;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Per-run wall times of one sweep method.
struct Runs(Vec<Duration>);

impl Runs {
    fn median(&self) -> f64 {
        let mut v: Vec<f64> = self.0.iter().map(|d| d.as_secs_f64()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    fn spread(&self) -> f64 {
        let v: Vec<f64> = self.0.iter().map(|d| d.as_secs_f64()).collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (max - min) / self.median()
    }
}

struct Row {
    size: usize,
    case: &'static str,
    /// Entries walked by each sweep (both tables).
    entries: usize,
    retired: usize,
    kernel: Runs,
    user: Runs,
}

struct SizeReport {
    rows: Vec<Row>,
    /// Wall time to install the `CONNS` entries, per entry (the sync install path).
    fill_ns: f64,
    /// A kernel sweep of the empty tables: the fixed part (every empty bucket, the embryo
    /// recount over every real slot, the syscall).
    empty: Runs,
}

/// The i-th client tuple: 198.19.0.0/16 (65,536 sources) x ports from 1024.
fn client(i: usize) -> SocketAddr {
    let host = i % 65536;
    let port = 1024 + (i / 65536) as u16;
    SocketAddr::new(
        std::net::Ipv4Addr::new(198, 19, (host >> 8) as u8, host as u8).into(),
        port,
    )
}

/// Tuples for the embryos: the same sources on ports from 30000, so they never meet `CONNS`
/// keys.
fn embryo_client(i: usize) -> (String, u16) {
    let host = i % 65536;
    (
        format!("198.19.{}.{}", host >> 8, host & 0xff),
        30000 + (i / 65536) as u16,
    )
}

fn desired(svc: &DesiredService, close_timeout: Duration) -> Desired {
    let timeouts = Timeouts {
        tcp_established: Duration::from_secs(86_400),
        tcp_fin: Duration::from_secs(86_400),
        tcp_syn: Duration::from_secs(86_400),
        tcp_close: close_timeout,
        udp: Duration::from_secs(86_400),
    };
    Desired {
        services: vec![svc.clone()],
        timeouts,
        sync: false,
    }
}

/// Installs entries `range` of `CONNS`: every tenth one (index % 10 == 0) in CLOSE, the others
/// ESTABLISHED; `only_close` installs just the CLOSE ones. Returns how many it installed.
fn install(
    h: &Harness,
    svc: &DesiredService,
    range: std::ops::Range<usize>,
    only_close: bool,
) -> Result<usize> {
    let svc_id = h.planner.service_id(&svc.key).expect("service id");
    let ids: Vec<u32> = (1..=REALS).map(|n| h.real_id(n, svc)).collect();
    let mut n = 0;
    for i in range {
        let close = i % 10 == 0;
        if only_close && !close {
            continue;
        }
        let req = SyncEvent {
            key: conn_key(ConnProto::Tcp, client(i), svc.address),
            real: ids[i % REALS],
            service: svc_id,
            state: if close {
                state::CLOSE
            } else {
                state::ESTABLISHED
            },
            kind: sync_kind::NEW,
            _pad: [0; 3],
        };
        let rc = h.dp.sync_install(&req)?;
        if rc != install_rc::INSERTED {
            bail!("installing entry {i}: rc {rc}");
        }
        n += 1;
    }
    Ok(n)
}

fn check(what: &str, r: &SweepReport, entries: usize, retired: usize) -> Result<()> {
    if r.entries != entries || r.retired != retired {
        bail!(
            "{what}: the sweep saw {} entries and retired {}, expected {entries} and {retired}",
            r.entries,
            r.retired
        );
    }
    Ok(())
}

/// The reals' counts summed: (active, inactive, embryonic) as the map holds them.
fn counts(h: &Harness, svc: &DesiredService) -> (u64, u64, u64) {
    (1..=REALS).fold((0, 0, 0), |a, n| {
        let c = h.raw_conns(n, svc);
        (a.0 + c.0, a.1 + c.1, a.2 + c.2)
    })
}

fn measure_size(size: usize, runs: usize) -> Result<SizeReport> {
    let embryos = size / 8;
    let share = size.div_ceil(10);
    let tables = Tables {
        conns: size as u32,
        embryos: (size / 4) as u32,
        ..Tables::conns(0)
    };
    let mut h = Harness::with_tables(tables);
    let svc = service_on(PORT, &(1..=REALS).map(|n| (n, 1)).collect::<Vec<_>>());
    let far = Duration::from_secs(86_400);
    h.apply_desired(&desired(&svc, far));

    let mut empty = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let r = h.dp.sweep()?;
        empty.push(t.elapsed());
        check("kernel sweep of empty tables", &r, 0, 0)?;
    }
    eprintln!("sweep bench: filling {size} connections and {embryos} embryos");
    let t = Instant::now();
    install(&h, &svc, 0..size, false)?;
    let fill_ns = t.elapsed().as_nanos() as f64 / size as f64;
    for i in 0..embryos {
        let (src, sport) = embryo_client(i);
        let out = h.run(&Frame::tcp(&src, sport, VIP, PORT, SYN).build());
        if out.action != XDP_TX {
            bail!("embryo SYN {i}: action {}", out.action);
        }
    }
    let total = size + embryos;
    let (a, i, e) = counts(&h, &svc);
    if (a, i, e) != ((size - share) as u64, share as u64, embryos as u64) {
        bail!("after filling: counts (active, inactive, embryonic) = ({a}, {i}, {e})");
    }

    let mut rows = Vec::new();
    // Nothing expiring: the tables stay as they are.
    let (mut kernel, mut user) = (Vec::new(), Vec::new());
    for run in 0..runs {
        eprintln!("sweep bench: {size}, none expiring, run {}/{runs}", run + 1);
        let t = Instant::now();
        let r = h.dp.sweep()?;
        kernel.push(t.elapsed());
        check("kernel sweep", &r, total, 0)?;
        let t = Instant::now();
        let r = h.dp.sweep_from_userspace()?;
        user.push(t.elapsed());
        check("userspace walk", &r, total, 0)?;
    }
    rows.push(Row {
        size,
        case: "none expiring",
        entries: total,
        retired: 0,
        kernel: Runs(kernel),
        user: Runs(user),
    });

    // A tenth expiring: the CLOSE entries, reinstalled before every sweep.
    h.apply_desired(&desired(&svc, Duration::ZERO));
    let (mut kernel, mut user) = (Vec::new(), Vec::new());
    for run in 0..runs {
        eprintln!("sweep bench: {size}, 10% expiring, run {}/{runs}", run + 1);
        for kernel_side in [true, false] {
            if run > 0 || !kernel_side {
                let n = install(&h, &svc, 0..size, true)?;
                if n != share {
                    bail!("reinstalled {n} entries, expected {share}");
                }
            }
            let t = Instant::now();
            let r = if kernel_side {
                h.dp.sweep()?
            } else {
                h.dp.sweep_from_userspace()?
            };
            let d = t.elapsed();
            let what = if kernel_side {
                kernel.push(d);
                "kernel sweep"
            } else {
                user.push(d);
                "userspace walk"
            };
            check(what, &r, total, share)?;
        }
    }
    let (a, i, e) = counts(&h, &svc);
    if (a, i, e) != ((size - share) as u64, 0, embryos as u64) {
        bail!("after expiring: counts (active, inactive, embryonic) = ({a}, {i}, {e})");
    }
    rows.push(Row {
        size,
        case: "10% expiring",
        entries: total,
        retired: share,
        kernel: Runs(kernel),
        user: Runs(user),
    });
    Ok(SizeReport {
        rows,
        fill_ns,
        empty: Runs(empty),
    })
}

fn render(runs: usize, reports: &[SizeReport], load: &str, elapsed: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "## Connection-table sweep\n");
    let _ = writeln!(
        s,
        "Wall time of one sweep of both tables (`CONNS` full at its size, `EMBRYOS` holding \
         size/8 half-open entries), median of {runs} runs; ns/entry = time / entries walked. \
         `kernel` = one test run of `xdpvs_sweep`; `userspace` = the old walk (two syscalls \
         per entry, one expire test run per retired entry). Spread = (max - min) / median.\n"
    );
    let _ = writeln!(
        s,
        "| CONNS size | case | entries walked | retired | kernel ms | ns/entry | userspace ms | ns/entry | userspace / kernel | spread k / u |"
    );
    let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for rep in reports {
        for r in &rep.rows {
            let (k, u) = (r.kernel.median(), r.user.median());
            let per = |t: f64| t * 1e9 / r.entries as f64;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0}x | {:.0}% / {:.0}% |",
                r.size,
                r.case,
                r.entries,
                r.retired,
                k * 1e3,
                per(k),
                u * 1e3,
                per(u),
                u / k,
                r.kernel.spread() * 100.0,
                r.user.spread() * 100.0,
            );
        }
    }
    let _ = writeln!(s);
    for rep in reports {
        if let Some(r) = rep.rows.first() {
            let _ = writeln!(
                s,
                "CONNS size {}: a kernel sweep of the empty tables (the fixed part: every empty \
                 bucket of both tables, the embryo recount over all {} real slots, the \
                 syscall) took {:.2} ms (spread {:.0}%); \
                 filling the connections through the sync install program took {:.0} ns/entry.",
                r.size,
                xdpvs_common::MAX_REALS,
                rep.empty.median() * 1e3,
                rep.empty.spread() * 100.0,
                rep.fill_ns
            );
        }
    }
    let _ = writeln!(
        s,
        "Load average at the start: {load}. Took {:.1} s.\n",
        elapsed.as_secs_f64()
    );
    s
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("sweep bench: not run (run it with `cargo bench --bench sweep`)");
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        println!("## Connection-table sweep\n\nSKIPPED (needs root)\n");
        eprintln!("SKIPPED (needs root): sweep bench");
        return;
    }
    let runs = env_or("XDPVS_SWEEP_RUNS", 5usize).max(1);
    let sizes: Vec<usize> = std::env::var("XDPVS_SWEEP_SIZES")
        .unwrap_or_else(|_| "262144,1000000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .filter(|&n| n >= 80)
        .collect();
    // Other work on this 2-core machine stretches wall times; the load says how much there was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    let started = Instant::now();
    let net = DpNet::new("sweepb", REALS);
    let res: Result<Vec<SizeReport>> =
        net.run(|| sizes.iter().map(|&size| measure_size(size, runs)).collect());
    match res {
        Ok(reports) => print!("{}", render(runs, &reports, &load, started.elapsed())),
        Err(e) => {
            eprintln!("sweep bench: failed: {e:#}");
            std::process::exit(1);
        }
    }
}
