//! Dataplane micro-benchmark (`cargo bench --bench dataplane`, needs root).
//!
//! The real XDP program, loaded as the daemon loads it, run on crafted frames with
//! BPF_PROG_TEST_RUN inside a private network namespace (`tests/support/dpnet.rs`: veth `dpa`,
//! permanent neighbours for 256 reals, forwarding on), next to a *floor*: a minimal XDP program
//! written in C (compiled here with `clang-19 -O2 -g -target bpf`) that does the same header work
//! as xdpvs's parser (Ethernet with an optional 802.1Q tag, IPv4 version/IHL/total length/fragment
//! checks, TCP ports, data offset and flags) and returns XDP_PASS.
//!
//! Cases (C programs first, as references):
//! - `empty`: returns XDP_PASS (the cost of the test-run loop itself);
//! - `floor`: the C parser above, on an established-flow ACK; everything is divided by it;
//! - `floor + fib`: the floor's parsing, one `bpf_fib_lookup` toward real 1, MAC rewrite, XDP_TX
//!   (the minimum for a DR forwarder that asks the kernel's FIB on every packet);
//! - `non-VIP`: xdpvs on a TCP ACK to the director's own address (parse, one service lookup
//!   miss, XDP_PASS);
//! - `established`: xdpvs on an ACK of a tracked, ESTABLISHED flow (conntrack hit, FIB lookup,
//!   MAC rewrite, XDP_TX);
//! - `new SYN, WLC over N reals`: xdpvs on a new connection's SYN for a service of N reals (8,
//!   64, 256; weight 1): service lookup, conntrack miss, WLC scan of all N reals, entry
//!   creation, FIB lookup, MAC rewrite, XDP_TX.
//! - `new SYN, mh` / `wrr` over 64 reals: the hashing scheduler's table lookup, wrr's IPVS walk;
//!   `mh: a lost flow's ACK`: the fallback path (conntrack miss, hash, entry recreated in
//!   `CONNS`); `wlc: a lost flow's ACK answered with a RST`: the reset path. All repeat=1.
//! - IPv6 rows beside the IPv4 ones: DR established (both methods), NAT established, NAT reply,
//!   a packet too big about a NAT flow, and a new SYN over 8 reals (repeat=1 only, as for IPv4).
//!
//! Two timing methods, both the kernel's own `duration` (ns, average per iteration):
//! - `repeat=N`: one BPF_PROG_TEST_RUN call runs the program N times on the frame the previous
//!   iteration wrote. Valid only where the program rewrites nothing but MACs and the path stays
//!   the same (the C programs, non-VIP, established): the program's own cost, hot caches.
//! - `repeat=1`: one call per packet, SAMPLES calls per run; a run's figure is their mean with
//!   the slowest 1% (interrupts) left out. The only valid method for new SYNs: a repeated SYN
//!   would hit the entry its first iteration created. Each SYN of a run has its own source port
//!   and the connection table is emptied after every run (every run starts from an empty table
//!   and zero counts; the number of entries created is checked). `duration` has 1 ns resolution
//!   here (TSC clocksource), but a repeat=1 figure also carries a per-call cost (clock reads,
//!   an indirect call instead of the XDP dispatcher, caches cooled by the syscall). Every case
//!   is timed both ways where it can be, so ratios are taken within one method; the `~` repeat=N
//!   figure of a new SYN is its repeat=1 figure minus the established flow's per-call cost
//!   (established repeat=1 - repeat=N), likely an over-estimate.
//! - Cross-check: after the new-SYN runs the table is filled (65536 entries); a SYN of an
//!   untracked tuple then takes the new-connection path but its insert fails and leaves nothing,
//!   so it can be timed with repeat=N too (and with repeat=1, for comparison).
//!
//! Every case is run RUNS times (default 7); the table shows the median over runs and the spread
//! ((max - min) / median). Environment overrides: `XDPVS_DP_RUNS`, `XDPVS_DP_REPEAT`
//! (iterations per repeat=N call, default 500000), `XDPVS_DP_SAMPLES` (calls per repeat=1 run,
//! default 5000), `XDPVS_DP_CPU` (CPU the timing thread is pinned to; default the last one,
//! `none` for no pinning), `XDPVS_CLANG` (the C compiler for the floor, default `clang-19`).
//!
//! The markdown table goes to stdout; progress goes to stderr. Without root it prints SKIPPED
//! and exits 0. It runs only under `cargo bench` (argument `--bench`); `cargo test
//! --all-targets` builds it and returns at once.

#[path = "../tests/support/dpnet.rs"]
mod dpnet;
#[path = "../tests/support/packet.rs"]
mod packet;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya::Ebpf;
use dpnet::{
    nat_service6, nat_service_on, service6_on, service_on, DpNet, Harness, VIP, VIP6, XDP_DROP,
    XDP_PASS, XDP_TX,
};
use packet::{Frame, Frame6, ACK, SYN};
use xdpvs_common::{fwd_kind, stat};

const CLIENT: &str = "198.18.0.1";
const CLIENT6: &str = "2001:2::1";
/// The director's own address on `dpa`: not a service.
const DIRECTOR: &str = "198.18.0.2";
/// Services: port -> number of reals (weight 1 each).
const SERVICES: [(u16, usize); 3] = [(80, 8), (81, 64), (82, 256)];
/// The flow timed as `established` (on the port-80 service).
const EST_SPORT: u16 = 40000;
/// VIP port of the NAT service (reals on 8080).
const NAT_PORT: u16 = 83;
/// VIP ports of the mh and wrr services (64 reals each).
const MH_PORT: u16 = 84;
const WRR_PORT: u16 = 85;
/// The persistent service's port (64 reals, 300 s templates).
const PERSIST_PORT: u16 = 86;
/// The IPIP and GUE tunnel services' ports (4 reals each).
const TUN_PORT: u16 = 87;
const GUE_PORT: u16 = 88;
/// The connection table's size in `Harness::new`.
const CONN_TABLE: usize = 65536;

/// The floor program: the parsing xdpvs does before its first map lookup, then XDP_PASS.
const FLOOR_C: &str = r#"
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>

#define SEC(name) __attribute__((section(name), used))
#define BE16(x) __builtin_bswap16(x)

char LICENSE[] SEC("license") = "GPL";

SEC("xdp")
int xdpvs_floor(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 l3 = sizeof(struct ethhdr);
	__u16 proto;

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	proto = eth->h_proto;
	if (proto == BE16(ETH_P_8021Q) || proto == BE16(ETH_P_8021AD)) {
		__u16 *inner = data + 16;
		if ((void *)(inner + 1) > end)
			return XDP_DROP;
		proto = *inner;
		l3 += 4;
	}
	if (proto != BE16(ETH_P_IP))
		return XDP_PASS;

	struct iphdr *ip = data + l3;
	if ((void *)(ip + 1) > end)
		return XDP_DROP;
	__u32 ihl = ip->ihl * 4;
	if (ip->version != 4 || ihl < 20)
		return XDP_DROP;
	__u32 tot = BE16(ip->tot_len);
	if (tot < ihl || data + l3 + tot > end)
		return XDP_DROP;
	if (ip->protocol != IPPROTO_TCP)
		return XDP_PASS;
	if (BE16(ip->frag_off) & 0x1fff)
		return XDP_PASS;
	if (tot - ihl < 20)
		return XDP_DROP;

	struct tcphdr *tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > end)
		return XDP_DROP;
	__u32 doff = tcp->doff * 4;
	if (doff < 20 || tot - ihl < doff)
		return XDP_DROP;

	/* Use every parsed field, so the compiler keeps every load. Lab traffic never matches. */
	__u32 h = ip->saddr ^ ip->daddr ^ (((__u32)tcp->source << 16) | tcp->dest) ^
		  ((__u8 *)tcp)[13];
	if (h == 0x5a5a5a5a)
		return XDP_DROP;
	return XDP_PASS;
}

/* Reference: nothing at all (the cost of BPF_PROG_TEST_RUN's own loop). */
SEC("xdp")
int xdpvs_empty(struct xdp_md *ctx)
{
	return XDP_PASS;
}

static long (*fib_lookup)(void *ctx, struct bpf_fib_lookup *params, int plen,
			  __u32 flags) = (void *)BPF_FUNC_fib_lookup;

/* Reference: the floor's parsing, then what any direct-routing forwarder using the kernel's
 * FIB does: one bpf_fib_lookup toward a fixed real (REAL_IP), MAC rewrite, XDP_TX. */
SEC("xdp")
int xdpvs_floor_fib(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	if (eth->h_proto != BE16(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = data + sizeof(*eth);
	if ((void *)(ip + 1) > end)
		return XDP_DROP;
	__u32 ihl = ip->ihl * 4;
	if (ip->version != 4 || ihl < 20)
		return XDP_DROP;
	__u32 tot = BE16(ip->tot_len);
	if (tot < ihl || data + sizeof(*eth) + tot > end)
		return XDP_DROP;
	if (ip->protocol != IPPROTO_TCP || (BE16(ip->frag_off) & 0x1fff) || tot - ihl < 20)
		return XDP_PASS;
	struct tcphdr *tcp = (void *)ip + ihl;
	if ((void *)(tcp + 1) > end)
		return XDP_DROP;
	__u32 doff = tcp->doff * 4;
	if (doff < 20 || tot - ihl < doff)
		return XDP_DROP;

	struct bpf_fib_lookup fib = {};
	fib.family = 2; /* AF_INET */
	fib.l4_protocol = ip->protocol;
	fib.tot_len = tot;
	fib.ifindex = ctx->ingress_ifindex;
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = REAL_IP;
	if (fib_lookup(ctx, &fib, sizeof(fib), 0) != 0)
		return XDP_DROP;
	__builtin_memcpy(eth->h_dest, fib.dmac, 6);
	__builtin_memcpy(eth->h_source, fib.smac, 6);
	return XDP_TX;
}
"#;

struct Params {
    runs: usize,
    repeat: u32,
    samples: usize,
    clang: String,
    cpu: Option<usize>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A case's per-run figures (ns/packet).
struct Runs(Vec<f64>);

impl Runs {
    fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    /// (max - min) / median.
    fn spread(&self) -> f64 {
        let min = self.0.iter().copied().fold(f64::INFINITY, f64::min);
        let max = self.0.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (max - min) / self.median()
    }
}

/// The C programs (floor and references), compiled and loaded.
struct CProgs {
    ebpf: Ebpf,
}

const FLOOR: &str = "xdpvs_floor";
const EMPTY: &str = "xdpvs_empty";
const FLOOR_FIB: &str = "xdpvs_floor_fib";

impl CProgs {
    fn build(clang: &str) -> Result<CProgs> {
        let dir = std::env::temp_dir().join(format!("xdpvs-bench-floor-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let res = CProgs::build_in(clang, &dir);
        let _ = std::fs::remove_dir_all(&dir);
        res
    }

    fn build_in(clang: &str, dir: &Path) -> Result<CProgs> {
        let src = dir.join("floor.c");
        let obj = dir.join("floor.o");
        std::fs::write(&src, FLOOR_C)?;
        let real = u32::from_ne_bytes(dpnet::real_ip(1).octets());
        let mut cmd = Command::new(clang);
        cmd.args(["-O2", "-g", "-target", "bpf"])
            .arg(format!("-DREAL_IP=0x{real:08x}u"));
        // <linux/types.h> includes <asm/types.h>, which Debian keeps under the multiarch
        // directory that clang does not search for the bpf target.
        let multiarch = PathBuf::from(format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH));
        if multiarch.is_dir() {
            cmd.arg("-I").arg(&multiarch);
        }
        let out = cmd
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .output()
            .with_context(|| format!("cannot run {clang} (set XDPVS_CLANG)"))?;
        if !out.status.success() {
            bail!(
                "{clang} failed on the floor program:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut ebpf = Ebpf::load_file(&obj).context("loading the floor object")?;
        for name in [FLOOR, EMPTY, FLOOR_FIB] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("{name} missing from the floor object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("the kernel refused {name}"))?;
        }
        Ok(CProgs { ebpf })
    }

    fn prog(&self, name: &str) -> Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("{name} missing"))?
            .try_into()?)
    }

    /// The same call `Harness::run_repeat` makes, on one of the C programs.
    fn run_repeat(
        &self,
        name: &str,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(u32, Duration)> {
        let ctx: [u32; 6] = [0, frame.len() as u32, 0, ifindex, 0, 0];
        let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let r = self.prog(name)?.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx_bytes),
            repeat,
            ..TestRunOptions::default()
        })?;
        Ok((r.return_value, r.duration))
    }
}

fn ns(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// `runs` calls with `repeat` iterations each; a run's figure is the kernel's average.
fn time_repeat(
    p: &Params,
    what: &str,
    expect: u32,
    mut call: impl FnMut(u32) -> Result<(u32, Duration)>,
) -> Result<Runs> {
    call(p.repeat.min(10_000))?; // warm-up
    let mut v = Vec::with_capacity(p.runs);
    for _ in 0..p.runs {
        let (action, d) = call(p.repeat)?;
        if action != expect {
            bail!("{what}: action {action}, expected {expect}");
        }
        v.push(ns(d));
    }
    Ok(Runs(v))
}

/// `runs` runs of `samples` repeat=1 calls on the frames `frame(i)`; a run's figure is the mean
/// of the kernel's per-call durations, slowest 1% left out; `after_run` resets state after every
/// run (and after the warm-up).
fn time_single(
    p: &Params,
    what: &str,
    expect: u32,
    frame: impl Fn(usize) -> Vec<u8>,
    mut call: impl FnMut(&[u8]) -> Result<(u32, Duration)>,
    mut after_run: impl FnMut(usize) -> Result<()>,
) -> Result<Runs> {
    let frames: Vec<Vec<u8>> = (0..p.samples).map(frame).collect();
    let warm = frames.len().min(64);
    for f in &frames[..warm] {
        call(f)?;
    }
    after_run(warm)?;
    let mut v = Vec::with_capacity(p.runs);
    let mut samples = Vec::with_capacity(frames.len());
    for _ in 0..p.runs {
        samples.clear();
        for f in &frames {
            let (action, d) = call(f)?;
            if action != expect {
                bail!("{what}: action {action}, expected {expect}");
            }
            samples.push(ns(d));
        }
        after_run(frames.len())?;
        // The slowest 1% are interrupts and preemptions, not the program: a single 100 us
        // interruption would otherwise move a run's mean by 20 ns.
        samples.sort_by(f64::total_cmp);
        let keep = &samples[..samples.len() - samples.len() / 100];
        v.push(keep.iter().sum::<f64>() / keep.len() as f64);
    }
    Ok(Runs(v))
}

/// Retires every tracked connection (forced): the table and the reals' counts are empty again.
/// Returns how many there were.
fn clear(h: &Harness) -> Result<usize> {
    let keys: Vec<_> = h.dp.connections().into_iter().map(|(k, _)| k).collect();
    let n = keys.len();
    for k in keys {
        h.dp.expire(k, true)?;
    }
    let left = h.dp.connections().len();
    if left != 0 {
        bail!("{left} connections left after clearing");
    }
    Ok(n)
}

fn pin_to(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_setaffinity(0) affects this thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!(
                "cannot pin to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A C reference program (not xdpvs).
    Reference,
    Floor,
    Xdpvs,
    /// Timed with repeat=1 only.
    NewSyn,
}

struct Row {
    name: String,
    kind: Kind,
    rep_n: Option<Runs>,
    rep_1: Runs,
    target: Option<(f64, &'static str)>,
}

/// The full-table cross-check of one new-SYN case.
struct SynDetail {
    reals: usize,
    /// None when the table could not be filled (see `measure`).
    full_n: Option<Runs>,
    full_1: Option<Runs>,
}

struct Report {
    rows: Vec<Row>,
    syns: Vec<SynDetail>,
    insns_xdpvs: Option<u32>,
    insns_floor: Option<u32>,
    elapsed: Duration,
}

fn measure(p: &Params) -> Result<Report> {
    let started = Instant::now();
    let c = CProgs::build(&p.clang)?;
    eprintln!("dataplane bench: floor programs compiled and loaded");
    let reals = SERVICES.iter().map(|s| s.1).max().unwrap_or(1);
    let net = DpNet::new("benchdp", reals);
    // NAT replies are routed to the client.
    net.client_neighbour(CLIENT);
    net.client_neighbour(CLIENT6);
    eprintln!("dataplane bench: namespace {} with {reals} reals", net.ns);
    net.run(|| -> Result<Report> {
        if let Some(cpu) = p.cpu {
            pin_to(cpu)?;
        }
        let mut h = Harness::new();
        let services: Vec<_> = SERVICES
            .iter()
            .map(|&(port, n)| service_on(port, &(1..=n).map(|i| (i, 1)).collect::<Vec<_>>()))
            .collect();
        h.apply(services);
        let ifindex = h.ifindex;
        let insns_xdpvs = h.dp.main_program()?.info()?.verified_instruction_count();
        let insns_floor = c.prog(FLOOR)?.info()?.verified_instruction_count();

        // The established flow: SYN then ACK, so its entry is ESTABLISHED.
        let est = Frame::tcp(CLIENT, EST_SPORT, VIP, 80, ACK).build();
        let syn = h.run(&Frame::tcp(CLIENT, EST_SPORT, VIP, 80, SYN).build());
        let ack = h.run(&est);
        if syn.action != XDP_TX || ack.action != XDP_TX || h.dp.connections().len() != 1 {
            bail!("could not set up the established flow");
        }
        let non_vip = Frame::tcp(CLIENT, EST_SPORT, DIRECTOR, 80, ACK).build();
        // The same flow's data segments: a full standard frame (1514 B, one buffer) and a jumbo
        // frame (9014 B: more than a page, so a multi-buffer frame for the frags-aware program).
        let sized = |len: usize| {
            let mut f = Frame::tcp(CLIENT, EST_SPORT, VIP, 80, ACK);
            f.payload = len - 54;
            f.build()
        };
        let (est_1514, est_9014) = (sized(1514), sized(9014));
        let xdpvs = |f: &[u8], r: u32| -> Result<(u32, Duration)> {
            let (out, d) = h.run_repeat(f, r);
            Ok((out.action, d))
        };

        let mut rows = Vec::new();
        let mut syns = Vec::new();
        let c_cases: [(&str, &str, Kind, u32); 3] = [
            (
                EMPTY,
                "reference: empty XDP program",
                Kind::Reference,
                XDP_PASS,
            ),
            (
                FLOOR,
                "**floor** (C: parse Eth/IPv4/TCP, XDP_PASS)",
                Kind::Floor,
                XDP_PASS,
            ),
            (
                FLOOR_FIB,
                "reference: floor + bpf_fib_lookup + MAC rewrite (C, XDP_TX)",
                Kind::Reference,
                XDP_TX,
            ),
        ];
        for (prog, name, kind, expect) in c_cases {
            eprintln!("dataplane bench: {prog}");
            rows.push(Row {
                name: name.into(),
                kind,
                rep_n: Some(time_repeat(p, prog, expect, |r| {
                    c.run_repeat(prog, &est, ifindex, r)
                })?),
                rep_1: time_single(
                    p,
                    prog,
                    expect,
                    |_| est.clone(),
                    |f| c.run_repeat(prog, f, ifindex, 1),
                    |_| Ok(()),
                )?,
                target: None,
            });
        }
        let x_cases = [
            ("non-VIP packet (XDP_PASS)", &non_vip, XDP_PASS, None),
            (
                "established flow (ACK: conntrack hit, FIB, MAC rewrite, XDP_TX)",
                &est,
                XDP_TX,
                Some((1.5, "<= 1.5x floor")),
            ),
            (
                "established flow, 1514-byte data frame (one buffer)",
                &est_1514,
                XDP_TX,
                None,
            ),
            (
                "established flow, 9014-byte jumbo frame (multi-buffer: whole-frame length, MTU check)",
                &est_9014,
                XDP_TX,
                None,
            ),
        ];
        for (name, frame, expect, target) in x_cases {
            eprintln!("dataplane bench: {name}");
            rows.push(Row {
                name: name.into(),
                kind: Kind::Xdpvs,
                rep_n: Some(time_repeat(p, name, expect, |r| xdpvs(frame, r))?),
                rep_1: time_single(
                    p,
                    name,
                    expect,
                    |_| frame.clone(),
                    |f| xdpvs(f, 1),
                    |_| Ok(()),
                )?,
                target,
            });
        }
        // NAT (a service on port NAT_PORT, reals on 8080): the client's packet of an
        // established flow, and the real's reply. Each rewrites the frame, so a repeat=N run
        // would time another path from its second iteration: repeat=1 only.
        let mut with_nat: Vec<_> = SERVICES
            .iter()
            .map(|&(port, n)| service_on(port, &(1..=n).map(|i| (i, 1)).collect::<Vec<_>>()))
            .collect();
        with_nat.push(nat_service_on(NAT_PORT, xdpvs::config::Protocol::Tcp, 8080, &[(1, 1), (2, 1), (3, 1), (4, 1)]));
        // Persistence: a WLC service over 64 reals whose clients keep their real (300 s, /32).
        let mut persistent = service_on(PERSIST_PORT, &(1..=64).map(|i| (i, 1)).collect::<Vec<_>>());
        persistent.persist = Some((300, 32));
        with_nat.push(persistent);
        // Tunnels: IPIP and GUE services of 4 reals.
        for (port, fwd, tport) in [(TUN_PORT, fwd_kind::TUNNEL, 0), (GUE_PORT, fwd_kind::GUE, 6080)] {
            let mut t = service_on(port, &[(1, 1), (2, 1), (3, 1), (4, 1)]);
            t.fwd = fwd;
            t.tunnel_port = tport;
            with_nat.push(t);
        }
        h.apply(with_nat.clone());
        // Re-borrowed: the closure above held `h` until the NAT service was applied.
        let xdpvs = |f: &[u8], r: u32| -> Result<(u32, Duration)> {
            let (out, d) = h.run_repeat(f, r);
            Ok((out.action, d))
        };
        let nat_est = Frame::tcp(CLIENT, EST_SPORT, VIP, NAT_PORT, ACK).build();
        let nat_syn = h.run(&Frame::tcp(CLIENT, EST_SPORT, VIP, NAT_PORT, SYN).build());
        let real = Harness::real_of(&nat_syn.frame).ok_or_else(|| anyhow!("NAT SYN not forwarded"))?;
        if h.run(&nat_est).action != XDP_TX {
            bail!("could not set up the NAT flow");
        }
        let nat_reply = Frame::tcp(&dpnet::real_ip(real).to_string(), 8080, CLIENT, EST_SPORT, ACK)
            .macs(dpnet::real_mac(real), packet::DIRECTOR_MAC)
            .build();
        // ICMP "fragmentation needed" from a router about each flow's reply (VIP -> client):
        // the DR flow (port 80, a flow of its own) and the NAT flow above.
        let icmp_sport = EST_SPORT + 1;
        for f in [SYN, ACK] {
            if h.run(&Frame::tcp(CLIENT, icmp_sport, VIP, 80, f).build()).action != XDP_TX {
                bail!("could not set up the DR flow for the ICMP rows");
            }
        }
        let quote = |vport: u16, cport: u16| {
            let q = packet::ip_packet(&Frame::tcp(VIP, vport, CLIENT, cport, ACK).payload(1400).csum().build());
            packet::icmp_unreach("198.18.0.254", VIP, 4, 1280, &q[..28])
        };
        let icmp_dr = quote(80, icmp_sport);
        let icmp_nat = quote(NAT_PORT, EST_SPORT);
        let icmp_echo = packet::icmp_frame(CLIENT, VIP, 8, 0, 1, &[7; 56]);
        let mut tunnel_est = Vec::new();
        for port in [TUN_PORT, GUE_PORT] {
            for f in [SYN, ACK] {
                if h.run(&Frame::tcp(CLIENT, EST_SPORT, VIP, port, f).build()).action != XDP_TX {
                    bail!("could not set up the tunnel flow on port {port}");
                }
            }
            tunnel_est.push(Frame::tcp(CLIENT, EST_SPORT, VIP, port, ACK).build());
        }
        let nat_cases = [
            ("NAT: non-VIP packet while a service uses NAT (reply lookup misses, XDP_PASS)", &non_vip, XDP_PASS),
            ("NAT: established flow (conntrack hit, DNAT + checksums, cached FIB, XDP_TX)", &nat_est, XDP_TX),
            ("NAT: real's reply (reply entry + flow lookup, SNAT + checksums, FIB lookup, XDP_TX)", &nat_reply, XDP_TX),
            ("ICMP: frag needed about a DR flow (quote read, flow lookup, cached FIB, XDP_TX)", &icmp_dr, XDP_TX),
            ("ICMP: frag needed about a NAT flow (+ outer and quoted headers translated)", &icmp_nat, XDP_TX),
            ("ICMP: echo request to the VIP (not an error: XDP_PASS)", &icmp_echo, XDP_PASS),
            ("tunnel IPIP: established flow (conntrack hit, FIB lookup with source, outer IPv4, XDP_TX)", &tunnel_est[0], XDP_TX),
            ("tunnel GUE: established flow (+ UDP and GUE headers)", &tunnel_est[1], XDP_TX),
        ];
        for (name, frame, expect) in nat_cases {
            eprintln!("dataplane bench: {name}");
            rows.push(Row {
                name: name.into(),
                kind: Kind::Xdpvs,
                rep_n: None,
                rep_1: time_single(
                    p,
                    name,
                    expect,
                    |_| frame.clone(),
                    |f| xdpvs(f, 1),
                    |_| Ok(()),
                )?,
                target: None,
            });
        }

        // IPv6 beside them: a DR service of 8 reals on VIP6:80 and a NAT one of 4 on
        // VIP6:NAT_PORT (reals on 8080), the same reals' IPv6 addresses.
        // The services above stay (the persistence rows below use theirs).
        let mut with_v6 = with_nat;
        with_v6.push(service6_on(80, xdpvs::config::Protocol::Tcp, &(1..=8).map(|i| (i, 1)).collect::<Vec<_>>()));
        with_v6.push(nat_service6(NAT_PORT, xdpvs::config::Protocol::Tcp, 8080, &[(1, 1), (2, 1), (3, 1), (4, 1)]));
        for (port, fwd, tport) in [(TUN_PORT, fwd_kind::TUNNEL, 0), (GUE_PORT, fwd_kind::GUE, 6080)] {
            let mut t = service6_on(port, xdpvs::config::Protocol::Tcp, &[(1, 1), (2, 1), (3, 1), (4, 1)]);
            t.fwd = fwd;
            t.tunnel_port = tport;
            with_v6.push(t);
        }
        h.apply(with_v6);
        let xdpvs = |f: &[u8], r: u32| -> Result<(u32, Duration)> {
            let (out, d) = h.run_repeat(f, r);
            Ok((out.action, d))
        };
        let v6_est = Frame6::tcp(CLIENT6, EST_SPORT, VIP6, 80, ACK).build();
        let v6_nat_est = Frame6::tcp(CLIENT6, EST_SPORT, VIP6, NAT_PORT, ACK).build();
        let mut v6_real = 0;
        for (est, vport) in [(&v6_est, 80), (&v6_nat_est, NAT_PORT)] {
            let syn = h.run(&Frame6::tcp(CLIENT6, EST_SPORT, VIP6, vport, SYN).build());
            v6_real = Harness::real_of(&syn.frame).ok_or_else(|| anyhow!("IPv6 SYN not forwarded"))?;
            if h.run(est).action != XDP_TX {
                bail!("could not set up the IPv6 flow to port {vport}");
            }
        }
        let mut v6_tunnel = Vec::new();
        for port in [TUN_PORT, GUE_PORT] {
            for f in [SYN, ACK] {
                if h.run(&Frame6::tcp(CLIENT6, EST_SPORT, VIP6, port, f).build()).action != XDP_TX {
                    bail!("could not set up the IPv6 tunnel flow on port {port}");
                }
            }
            v6_tunnel.push(Frame6::tcp(CLIENT6, EST_SPORT, VIP6, port, ACK).build());
        }
        let v6_nat_reply = Frame6::tcp(&dpnet::real_ip6(v6_real).to_string(), 8080, CLIENT6, EST_SPORT, ACK)
            .macs(dpnet::real_mac(v6_real), packet::DIRECTOR_MAC)
            .build();
        let q6 = packet::ip6_packet(&Frame6::tcp(VIP6, NAT_PORT, CLIENT6, EST_SPORT, ACK).payload(1400).build());
        let icmp6_nat = packet::icmp6_frame("2001:2::fe", VIP6, 2, 0, 1280, &q6[..1232]);
        eprintln!("dataplane bench: IPv6 DR established flow");
        let name = "IPv6 DR: established flow (ACK: conntrack hit, cached FIB, MAC rewrite, XDP_TX)";
        rows.push(Row {
            name: name.into(),
            kind: Kind::Xdpvs,
            rep_n: Some(time_repeat(p, name, XDP_TX, |r| xdpvs(&v6_est, r))?),
            rep_1: time_single(p, name, XDP_TX, |_| v6_est.clone(), |f| xdpvs(f, 1), |_| Ok(()))?,
            target: None,
        });
        let v6_cases = [
            ("IPv6 NAT: established flow (DNAT, L4 checksum with the v6 pseudo-header, XDP_TX)", &v6_nat_est),
            ("IPv6 NAT: real's reply (reply entry + flow lookup, SNAT, FIB lookup, XDP_TX)", &v6_nat_reply),
            ("ICMPv6: packet too big about a NAT flow (quote read, translated, XDP_TX)", &icmp6_nat),
            ("IPv6 tunnel (IPv6 in IPv6): established flow (FIB lookup with source, outer IPv6, XDP_TX)", &v6_tunnel[0]),
            ("IPv6 tunnel GUE: established flow (+ UDP, GUE, the UDP checksum from headers)", &v6_tunnel[1]),
        ];
        for (name, frame) in v6_cases {
            eprintln!("dataplane bench: {name}");
            rows.push(Row {
                name: name.into(),
                kind: Kind::Xdpvs,
                rep_n: None,
                rep_1: time_single(p, name, XDP_TX, |_| frame.clone(), |f| xdpvs(f, 1), |_| Ok(()))?,
                target: None,
            });
        }
        clear(&h)?;

        // A new IPv6 connection, WLC over the 8 reals of VIP6:80 (from an empty table each run).
        eprintln!("dataplane bench: IPv6 new SYN, WLC over 8 reals");
        let what = "IPv6 new SYN, WLC over 8 reals (conntrack miss, scan, create, FIB, TX)";
        let v6_syn = time_single(
            p,
            what,
            XDP_TX,
            |i| Frame6::tcp(CLIENT6, 1024 + i as u16, VIP6, 80, SYN).build(),
            |f| xdpvs(f, 1),
            |sent| {
                let tracked = clear(&h)?;
                if tracked != sent {
                    bail!("{what}: {tracked} entries for {sent} SYNs");
                }
                Ok(())
            },
        )?;
        rows.push(Row {
            name: what.into(),
            kind: Kind::Xdpvs,
            rep_n: None,
            rep_1: v6_syn,
            target: None,
        });

        // The template hit: every SYN of the client (a new source port each) finds its template,
        // checks its real's slot and refreshes it, instead of scanning 64 reals.
        if h.run(&Frame::tcp(CLIENT, 1023, VIP, PERSIST_PORT, SYN).build()).action != XDP_TX {
            bail!("could not create the persistence template");
        }
        let hits_before = h.dp.stats()?[stat::PERSIST_HIT as usize];
        let name = "new SYN, persistent WLC service of 64 reals, template hit (lookup, slot check, create, FIB, TX)";
        eprintln!("dataplane bench: {name}");
        let mut hit_syns = 0u64;
        rows.push(Row {
            name: name.into(),
            kind: Kind::NewSyn,
            rep_n: None,
            rep_1: time_single(
                p,
                name,
                XDP_TX,
                |i| Frame::tcp(CLIENT, 1024 + i as u16, VIP, PERSIST_PORT, SYN).build(),
                |f| xdpvs(f, 1),
                |sent| {
                    hit_syns += sent as u64;
                    clear(&h)?;
                    Ok(())
                },
            )?,
            target: None,
        });
        let hits = h.dp.stats()?[stat::PERSIST_HIT as usize] - hits_before;
        if hits < hit_syns {
            bail!("{name}: {hits} template hits for {hit_syns} SYNs");
        }

        // The hashing and round-robin schedulers, and a flow the table lost: a Maglev service
        // (64 reals, the default 65,537-entry table) and a wrr one (64 reals, weights 1..=4).
        let mut all: Vec<_> = SERVICES
            .iter()
            .map(|&(port, n)| service_on(port, &(1..=n).map(|i| (i, 1)).collect::<Vec<_>>()))
            .collect();
        all.push(nat_service_on(NAT_PORT, xdpvs::config::Protocol::Tcp, 8080, &[(1, 1), (2, 1), (3, 1), (4, 1)]));
        let mut mh = service_on(MH_PORT, &(1..=64).map(|i| (i, 1)).collect::<Vec<_>>());
        mh.sched = xdpvs_common::sched_kind::MH;
        mh.table_size = 65_537;
        all.push(mh);
        let mut wrr = service_on(WRR_PORT, &(1..=64).map(|i| (i, 1 + (i % 4) as u32)).collect::<Vec<_>>());
        wrr.sched = xdpvs_common::sched_kind::WRR;
        all.push(wrr);
        h.apply(all);
        let xdpvs = |f: &[u8], r: u32| -> Result<(u32, Duration)> {
            let (out, d) = h.run_repeat(f, r);
            Ok((out.action, d))
        };
        let recovered_before = h.dp.stats()?[stat::HASH_RECOVERED as usize];
        let sched_cases: [(&str, u16, u8, u32, bool); 4] = [
            ("new SYN, mh over 64 reals (flow hash, Maglev table lookup, create, FIB, TX)", MH_PORT, SYN, XDP_TX, true),
            ("new SYN, wrr over 64 reals (IPVS mark walk + compare-and-swap, create, FIB, TX)", WRR_PORT, SYN, XDP_TX, true),
            ("mh: a lost flow's ACK (conntrack miss, hash, entry recreated established, FIB, TX)", MH_PORT, ACK, XDP_TX, true),
            ("wlc: a lost flow's ACK answered with a RST (built in place, XDP_TX)", 80, ACK, XDP_TX, false),
        ];
        for (name, port, flags, expect, tracked) in sched_cases {
            eprintln!("dataplane bench: {name}");
            let rep_1 = time_single(
                p,
                name,
                expect,
                |i| Frame::tcp(CLIENT, 1024 + i as u16, VIP, port, flags).seq_ack(1, 2).build(),
                |f| xdpvs(f, 1),
                |sent| {
                    let n = clear(&h)?;
                    let want = if tracked { sent } else { 0 };
                    if n != want {
                        bail!("{name}: {n} entries after {sent} packets, expected {want}");
                    }
                    Ok(())
                },
            )?;
            rows.push(Row {
                name: name.into(),
                kind: Kind::NewSyn,
                rep_n: None,
                rep_1,
                target: None,
            });
        }
        let recovered = h.dp.stats()?[stat::HASH_RECOVERED as usize] - recovered_before;
        // The warm-up's packets and every run's.
        let want = p.samples.min(64) as u64 + p.runs as u64 * p.samples as u64;
        if recovered != want {
            bail!("lost flows recovered: {recovered} counted, expected {want}");
        }

        let mut syn_rows = Vec::new();
        for &(port, n) in &SERVICES {
            eprintln!("dataplane bench: new SYN, WLC over {n} reals");
            let what = format!("new SYN over {n} reals");
            let new_1 = time_single(
                p,
                &what,
                XDP_TX,
                // A distinct source port per SYN of a run: each one is a new connection.
                |i| Frame::tcp(CLIENT, 1024 + i as u16, VIP, port, SYN).build(),
                |f| xdpvs(f, 1),
                |sent| {
                    let tracked = clear(&h)?;
                    if tracked != sent {
                        bail!("{what}: {tracked} entries for {sent} SYNs");
                    }
                    Ok(())
                },
            )?;
            syn_rows.push((port, n, new_1));
        }

        // Cross-check with repeat=N: in a full table, a SYN of an untracked tuple takes the
        // new-connection path up to the insert (lookup miss, WLC scan, counts), the insert fails
        // and the SYN is dropped, so no entry is left and every iteration repeats the same path.
        // It skips the FIB/rewrite/TX tail of a real new connection.
        eprintln!("dataplane bench: filling the connection table ({CONN_TABLE} entries)");
        let fill_src = |i: usize| format!("198.18.0.{}", 10 + i / 60000);
        for i in 0..CONN_TABLE + 16 {
            let f = Frame::tcp(&fill_src(i), 1024 + (i % 60000) as u16, VIP, 80, SYN).build();
            xdpvs(&f, 1)?;
        }
        // Since the embryonic table (an LRU that evicts instead of refusing) takes every SYN,
        // no number of SYNs fills a table and the cross-check has nothing to time: it is then
        // left out (n/a in the table) rather than failing the whole bench.
        let full_before = h.dp.stats()?[stat::CONNTRACK_FULL as usize];
        let cross_check = full_before > 0;
        if !cross_check {
            eprintln!(
                "dataplane bench: SYNs did not fill a table (the embryonic LRU evicts): no full-table cross-check"
            );
        }
        for (port, n, new_1) in syn_rows {
            let (full_n, full_1) = if cross_check {
                eprintln!("dataplane bench: SYN into a full table, WLC over {n} reals");
                let what = format!("SYN into a full table over {n} reals");
                let untracked = Frame::tcp(CLIENT, 1, VIP, port, SYN).build();
                let full_n = time_repeat(p, &what, XDP_DROP, |r| xdpvs(&untracked, r))?;
                let full_1 = time_single(
                    p,
                    &what,
                    XDP_DROP,
                    |i| Frame::tcp(CLIENT, 1024 + i as u16, VIP, port, SYN).build(),
                    |f| xdpvs(f, 1),
                    |_| Ok(()),
                )?;
                (Some(full_n), Some(full_1))
            } else {
                (None, None)
            };
            rows.push(Row {
                name: format!(
                    "new SYN, WLC over {n} reals (conntrack miss, scan, create, FIB, TX)"
                ),
                kind: Kind::NewSyn,
                rep_n: None,
                rep_1: new_1,
                target: (n == 64).then_some((3.0, "<= 3x floor")),
            });
            syns.push(SynDetail {
                reals: n,
                full_n,
                full_1,
            });
        }
        let full_after = h.dp.stats()?[stat::CONNTRACK_FULL as usize];
        let expected = (p.runs as u64 * (u64::from(p.repeat) + p.samples as u64)) * 3;
        if cross_check && full_after - full_before < expected {
            bail!(
                "full-table SYNs: {} counted as table-full, expected at least {expected}",
                full_after - full_before
            );
        }
        eprintln!("dataplane bench: emptying the connection table");
        clear(&h)?;
        Ok(Report {
            rows,
            syns,
            insns_xdpvs,
            insns_floor,
            elapsed: started.elapsed(),
        })
    })
}

fn render(p: &Params, r: &Report) -> String {
    let med_n = |row: &Row| row.rep_n.as_ref().map(Runs::median).unwrap_or(f64::NAN);
    let floor = r
        .rows
        .iter()
        .find(|row| row.kind == Kind::Floor)
        .expect("floor row");
    let (floor_n, floor_1) = (med_n(floor), floor.rep_1.median());
    // The per-call cost a repeat=1 figure carries on top of a repeat=N one, measured on the
    // established path: of the paths timed both ways, the closest to a new SYN's.
    let est_row = r
        .rows
        .iter()
        .find(|row| row.kind == Kind::Xdpvs && row.target.is_some())
        .expect("established row");
    let per_call = est_row.rep_1.median() - med_n(est_row);

    let mut s = String::new();
    let _ = writeln!(s, "## Dataplane (BPF_PROG_TEST_RUN)\n");
    let _ = writeln!(
        s,
        "ns/packet as reported by the kernel, median of {} runs: `repeat=N` = {} iterations in one \
         call (the program's own cost, hot caches); `repeat=1` = {} one-packet calls per run \
         (mean, slowest 1% left out; adds a per-call cost). `x floor` divides by the floor timed \
         the same way. A new SYN can only be timed with repeat=1 (a repeated SYN would hit the \
         entry its first iteration created); its repeat=N column is an estimate (`~`): repeat=1 \
         minus the established flow's per-call cost ({per_call:.0} ns = its repeat=1 - repeat=N), \
         likely high, since a new SYN touches more memory per call. Spread = (max - min) / median \
         over runs.\n",
        p.runs, p.repeat, p.samples
    );
    let _ = writeln!(
        s,
        "| case | repeat=N ns/pkt | x floor | repeat=1 ns/pkt | x floor | spread N / 1 | target |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---|");
    for row in &r.rows {
        let one = row.rep_1.median();
        let ratio_1 = one / floor_1;
        let (head, mark) = match &row.rep_n {
            Some(rn) => (rn.median(), ""),
            None => (one - per_call, "~"),
        };
        let ratio_n = head / floor_n;
        let spread_n = row
            .rep_n
            .as_ref()
            .map_or("-".to_string(), |rn| format!("{:.0}%", rn.spread() * 100.0));
        let target = match row.target {
            Some((limit, label)) => {
                let verdict = match (ratio_n <= limit, ratio_1 <= limit) {
                    (true, true) => "met",
                    (false, false) => "**not met**",
                    _ => "unclear (the two methods disagree)",
                };
                format!("{label}: {verdict}")
            }
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "| {} | {mark}{head:.0} | {mark}{ratio_n:.2} | {one:.0} | {ratio_1:.2} | {spread_n} / {:.0}% | {target} |",
            row.name,
            row.rep_1.spread() * 100.0,
        );
    }

    let _ = writeln!(
        s,
        "\nCross-check, new SYN vs. a SYN into a full connection table (same path, but the insert \
         fails and nothing is left behind, so it can be repeated); ns/packet, medians:\n"
    );
    let _ = writeln!(
        s,
        "| reals | new SYN repeat=1 | new SYN ~repeat=N | full-table SYN repeat=1 | full-table SYN repeat=N (spread) |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|");
    for d in &r.syns {
        let new_1 = r
            .rows
            .iter()
            .find(|row| {
                row.kind == Kind::NewSyn
                    && row
                        .name
                        .starts_with(&format!("new SYN, WLC over {} reals", d.reals))
            })
            .map_or(f64::NAN, |row| row.rep_1.median());
        let full = match (&d.full_1, &d.full_n) {
            (Some(f1), Some(fnn)) => format!(
                "{:.0} | {:.0} ({:.0}%)",
                f1.median(),
                fnn.median(),
                fnn.spread() * 100.0
            ),
            _ => "n/a | n/a".to_string(),
        };
        let _ = writeln!(
            s,
            "| {} | {new_1:.0} | ~{:.0} | {full} |",
            d.reals,
            new_1 - per_call,
        );
    }

    let fmt = |v: Option<u32>| v.map_or("n/a".to_string(), |v| v.to_string());
    let pinned = p
        .cpu
        .map_or("not pinned".to_string(), |c| format!("pinned to CPU {c}"));
    let _ = writeln!(
        s,
        "\nVerified instructions: xdpvs {}, floor {}. Timing thread {pinned}. Took {:.1} s.\n",
        fmt(r.insns_xdpvs),
        fmt(r.insns_floor),
        r.elapsed.as_secs_f64()
    );
    s
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("dataplane bench: not run (run it with `cargo bench --bench dataplane`)");
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        println!("## Dataplane (BPF_PROG_TEST_RUN)\n\nSKIPPED (needs root)\n");
        eprintln!("SKIPPED (needs root): dataplane bench");
        return;
    }
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = match std::env::var("XDPVS_DP_CPU").ok().as_deref() {
        Some("none") => None,
        Some(v) => v.parse().ok(),
        // The last CPU by default: the one least likely to take this VM's other work first.
        None => Some(ncpu - 1),
    };
    let p = Params {
        runs: env_or("XDPVS_DP_RUNS", 7usize).max(1),
        repeat: env_or("XDPVS_DP_REPEAT", 500_000u32).max(1),
        // Each SYN of a run holds a connection entry until the run ends (table: 65536).
        samples: env_or("XDPVS_DP_SAMPLES", 5000usize).clamp(16, 60000),
        clang: std::env::var("XDPVS_CLANG").unwrap_or_else(|_| "clang-19".into()),
        cpu,
    };
    match measure(&p) {
        Ok(r) => print!("{}", render(&p, &r)),
        Err(e) => {
            eprintln!("dataplane bench: failed: {e:#}");
            std::process::exit(1);
        }
    }
}
