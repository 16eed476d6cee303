//! A private network namespace for running the real XDP program under BPF_PROG_TEST_RUN.
//!
//! The program's route lookup (`bpf_fib_lookup`) reads the namespace it runs in, so each test
//! gets its own: a veth `dpa` (the "director" side, 198.18.0.2/16 and 2001:2::2/48, MAC
//! `DIRECTOR_MAC`) with permanent neighbour entries for the reals, IPv4 and IPv6 (MAC
//! `02:00:00:00:HI:LO` for real n), forwarding on for both families. Nothing touches the root namespace; `Drop` deletes the namespace.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;

use super::packet::DIRECTOR_MAC;
use aya::programs::{TestRun, TestRunOptions};
use xdpvs::dataplane::{plan::Planner, Dataplane};
use xdpvs::state::{Desired, DesiredReal, DesiredService};

pub const VIP: &str = "198.18.0.100";
/// The IPv6 VIP (RFC 5180 benchmarking prefix, as the lab).
pub const VIP6: &str = "2001:2::100";

/// The IPv6 lab address of real n (1-based), reachable on `dpa`.
pub fn real_ip6(n: usize) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 1, 0, 0, 0, n as u16)
}

/// The lab address of real n (1-based), reachable on `dpa`.
pub fn real_ip(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1 + (n / 250) as u8, (n % 250) as u8 + 1)
}

pub fn real_mac(n: usize) -> [u8; 6] {
    [0x02, 0, 0, 0, (n >> 8) as u8, n as u8]
}

fn ip(ns: Option<&str>, args: &[&str]) -> std::io::Result<()> {
    let mut c = Command::new("ip");
    if let Some(ns) = ns {
        c.args(["-n", ns]);
    }
    let st = c.args(args).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("ip {args:?} failed: {st}")))
    }
}

pub struct DpNet {
    pub ns: String,
}

impl DpNet {
    /// Creates namespace `xdt-<name>` with `reals` neighbours.
    pub fn new(name: &str, reals: usize) -> DpNet {
        let ns = format!("xdt-{name}");
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(std::process::Stdio::null())
            .status();
        ip(None, &["netns", "add", &ns]).expect("ip netns add");
        let net = DpNet { ns: ns.clone() };
        let n = Some(ns.as_str());
        let mac = DIRECTOR_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        ip(
            n,
            &[
                "link", "add", "dpa", "address", &mac, "type", "veth", "peer", "name", "dpb",
            ],
        )
        .expect("veth");
        ip(n, &["link", "set", "lo", "up"]).expect("lo up");
        ip(n, &["link", "set", "dpa", "up"]).expect("dpa up");
        ip(n, &["link", "set", "dpb", "up"]).expect("dpb up");
        ip(n, &["addr", "add", "198.18.0.2/16", "dev", "dpa"]).expect("addr");
        ip(n, &["addr", "add", "2001:2::2/48", "dev", "dpa", "nodad"]).expect("addr6");
        for sysctl in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            let st = Command::new("ip")
                .args(["netns", "exec", &ns, "sysctl", "-qw", sysctl])
                .status()
                .expect("sysctl");
            assert!(st.success(), "{sysctl}");
        }
        let mut batch = String::new();
        for i in 1..=reals {
            let m = real_mac(i);
            for a in [IpAddr::from(real_ip(i)), IpAddr::from(real_ip6(i))] {
                batch.push_str(&format!(
                    "neigh replace {} lladdr {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} dev dpa nud permanent\n",
                    a, m[0], m[1], m[2], m[3], m[4], m[5]
                ));
            }
        }
        let path = std::env::temp_dir().join(format!("{ns}.neigh"));
        std::fs::write(&path, batch).expect("write batch");
        ip(n, &["-batch", &path.to_string_lossy()]).expect("neighbours");
        let _ = std::fs::remove_file(path);
        net
    }

    /// A permanent neighbour entry for the test client (NAT replies are routed to it).
    pub fn client_neighbour(&self, client: &str) {
        let m = super::packet::CLIENT_MAC;
        let mac = m
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        ip(
            Some(&self.ns),
            &[
                "neigh",
                "replace",
                client,
                "lladdr",
                &mac,
                "dev",
                "dpa",
                "nud",
                "permanent",
            ],
        )
        .expect("client neighbour");
    }

    /// Runs `f` on a thread inside the namespace (where test runs resolve `dpa`).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::scope(|s| {
            s.spawn(move || {
                let file = std::fs::File::open(&path).expect("open netns");
                use std::os::fd::AsRawFd;
                // SAFETY: setns on this thread only, with a valid namespace fd.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}");
                f()
            })
            .join()
            .expect("netns thread panicked")
        })
    }
}

impl Drop for DpNet {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// The loaded dataplane plus the planner, driven like the daemon drives them.
pub struct Harness {
    pub dp: Dataplane,
    pub planner: Planner,
    pub ifindex: u32,
}

/// One test-run's verdict.
#[derive(Debug)]
pub struct Out {
    pub action: u32,
    pub frame: Vec<u8>,
}

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub fn service(reals: &[(usize, u32)]) -> DesiredService {
    service_on(80, reals)
}

pub fn service_on(port: u16, reals: &[(usize, u32)]) -> DesiredService {
    let address: SocketAddr = format!("{VIP}:{port}").parse().expect("vip");
    DesiredService {
        name: format!("web{port}"),
        address,
        key: xdpvs::state::service_key(address, xdpvs::config::Protocol::Tcp),
        sched: xdpvs_common::sched_kind::WLC,
        fwd: xdpvs_common::fwd_kind::DR,
        fallback: None,
        tunnel_port: 0,
        persist: None,
        reals: reals
            .iter()
            .map(|(n, w)| DesiredReal {
                address: SocketAddr::new(real_ip(*n).into(), port),
                weight: *w,
                cut: false,
            })
            .collect(),
        cut_on_remove: false,
        standby: false,
        table_size: 0,
        sched_flags: 0,
    }
}

/// The IPv6 twin of [`service_on`]: VIP6:`port` over `proto`, DR, reals `real_ip6(n)`.
pub fn service6_on(
    port: u16,
    proto: xdpvs::config::Protocol,
    reals: &[(usize, u32)],
) -> DesiredService {
    let address: SocketAddr = format!("[{VIP6}]:{port}").parse().expect("vip6");
    DesiredService {
        name: format!("v6{proto:?}{port}"),
        address,
        key: xdpvs::state::service_key(address, proto),
        sched: xdpvs_common::sched_kind::WLC,
        fwd: xdpvs_common::fwd_kind::DR,
        fallback: None,
        reals: reals
            .iter()
            .map(|(n, w)| DesiredReal {
                address: SocketAddr::new(real_ip6(*n).into(), port),
                weight: *w,
                cut: false,
            })
            .collect(),
        cut_on_remove: false,
        standby: false,
        persist: None,
        tunnel_port: 0,
        table_size: 0,
        sched_flags: 0,
    }
}

/// An IPv6 NAT service on VIP6:`port` whose reals listen on `real_port`.
pub fn nat_service6(
    port: u16,
    proto: xdpvs::config::Protocol,
    real_port: u16,
    reals: &[(usize, u32)],
) -> DesiredService {
    let mut s = service6_on(port, proto, reals);
    s.fwd = xdpvs_common::fwd_kind::NAT;
    s.name = format!("nat6{proto:?}{port}");
    for r in &mut s.reals {
        r.address.set_port(real_port);
    }
    s
}

/// A NAT service on VIP port 80 whose reals listen on `real_port`.
pub fn nat_service(
    proto: xdpvs::config::Protocol,
    real_port: u16,
    reals: &[(usize, u32)],
) -> DesiredService {
    nat_service_on(80, proto, real_port, reals)
}

/// A NAT service on VIP port `port` whose reals listen on `real_port`.
pub fn nat_service_on(
    port: u16,
    proto: xdpvs::config::Protocol,
    real_port: u16,
    reals: &[(usize, u32)],
) -> DesiredService {
    let mut s = service_on(port, reals);
    s.fwd = xdpvs_common::fwd_kind::NAT;
    s.key = xdpvs::state::service_key(s.address, proto);
    s.name = format!("nat{:?}{port}", proto);
    for r in &mut s.reals {
        r.address.set_port(real_port);
    }
    s
}

impl Harness {
    /// Call inside `DpNet::run`.
    pub fn new() -> Harness {
        Harness::with_table(65536)
    }

    /// With a connection table of `entries`.
    pub fn with_table(entries: u32) -> Harness {
        Harness::with_tables(xdpvs::dataplane::Tables::conns(entries))
    }

    /// With both tables' sizes.
    pub fn with_tables(tables: xdpvs::dataplane::Tables) -> Harness {
        let dp = Dataplane::load_tables(tables).expect("load XDP object");
        let ifindex = unsafe { libc::if_nametoindex(c"dpa".as_ptr()) };
        assert!(ifindex > 0, "dpa not found: not inside the test namespace?");
        Harness {
            dp,
            planner: Planner::new(),
            ifindex,
        }
    }

    pub fn apply(&mut self, services: Vec<DesiredService>) {
        self.apply_desired(&Desired {
            services,
            timeouts: Default::default(),
            sync: false,
        });
    }

    /// As [`Harness::apply`], with the dataplane reporting connection events for a sync peer.
    pub fn apply_synced(&mut self, services: Vec<DesiredService>) {
        self.apply_desired(&Desired {
            services,
            timeouts: Default::default(),
            sync: true,
        });
    }

    pub fn apply_desired(&mut self, d: &Desired) {
        let w = self.planner.plan(d).expect("plan");
        self.dp.write(&w).expect("write maps");
    }

    pub fn run(&self, frame: &[u8]) -> Out {
        self.run_repeat(frame, 1).0
    }

    /// Runs the packet program; returns the verdict and the average duration per run.
    pub fn run_repeat(&self, frame: &[u8], repeat: u32) -> (Out, std::time::Duration) {
        self.run_with(frame, frame.len(), repeat)
    }

    /// Runs the packet program on a frame whose linear part is only its first `linear` bytes
    /// (the kernel puts the rest in fragments: `xdp_md.data_end` below the data size asks for
    /// it, as a driver splitting a frame over pages would).
    pub fn run_linear(&self, frame: &[u8], linear: usize) -> Out {
        self.run_with(frame, linear, 1).0
    }

    fn run_with(&self, frame: &[u8], linear: usize, repeat: u32) -> (Out, std::time::Duration) {
        let ctx: [u32; 6] = [0, linear as u32, 0, self.ifindex, 0, 0];
        let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|v| v.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let prog = self.dp.main_program().expect("program");
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_bytes),
                repeat,
                ..TestRunOptions::default()
            })
            .expect("test run");
        out.truncate(r.data_size_out as usize);
        (
            Out {
                action: r.return_value,
                frame: out,
            },
            r.duration,
        )
    }

    /// Which real (by number) a forwarded frame went to, by its destination MAC.
    pub fn real_of(frame: &[u8]) -> Option<usize> {
        if frame.len() < 6 || frame[..4] != [0x02, 0, 0, 0] {
            return None;
        }
        Some(((frame[4] as usize) << 8) | frame[5] as usize)
    }

    /// (active, inactive, embryonic) as the map holds them (inactive without embryos).
    pub fn raw_conns(&self, real: usize, service: &DesiredService) -> (u64, u64, u64) {
        let id = self.real_id(real, service);
        let c = self.dp.real_conns_raw(id).expect("real conns");
        (c.active, c.inactive, c.embryonic)
    }

    pub fn real_id(&self, real: usize, service: &DesiredService) -> u32 {
        // The real's address in the service's family; its port: the VIP's unless the service
        // (NAT) gives it another.
        let ip: IpAddr = if service.address.is_ipv6() {
            real_ip6(real).into()
        } else {
            real_ip(real).into()
        };
        let port = service
            .reals
            .iter()
            .find(|r| r.address.ip() == ip)
            .map_or(service.address.port(), |r| r.address.port());
        self.planner
            .real_id(&service.key, SocketAddr::new(ip, port))
            .expect("real id")
    }

    /// (active, inactive) as IPVS shows them: embryonic entries count as inactive.
    pub fn conns(&self, real: usize, service: &DesiredService) -> (u64, u64) {
        let id = self.real_id(real, service);
        let c = self.dp.real_conns(id).expect("real conns");
        (c.active, c.inactive)
    }
}
