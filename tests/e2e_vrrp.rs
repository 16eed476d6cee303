//! End to end, issue 9 (VRRP foundations): our [`Instance`] against a real keepalived (Debian
//! package, `vrrp_version 3`), both in network namespaces on one bridge. Checks election by
//! priority both ways round, takeover when the master stops or its link is cut, and failback
//! with preemption. Who is master is read from the kernel (the VIP on each side's interface) and
//! from our instance's state; every step is bounded in time. Needs root.
//!
//! Topology: `vrsw` holds bridge `br0`; `vrka` (keepalived, 198.18.0.3 on `k0`) and `vrxd`
//! (xdpvs, 198.18.0.2 on `x0`) hang off it by veth pairs. VIP 198.18.0.100/32, VRID 51, 100 ms
//! adverts.

mod common;

use std::fs::File;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use xdpvs::ha::config::{VirtualAddress, VrrpConfig};
use xdpvs::ha::vrrp::packet::Reject;
use xdpvs::ha::vrrp::{Counters, Instance, State, Transition};

const SW: &str = "vrsw";
const KA: &str = "vrka";
const XD: &str = "vrxd";
const VIP: &str = "198.18.0.100";
const DIR: &str = "/tmp/vrvrrp";

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The tests share the namespace names: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The namespaces, deleted on drop (also on panic).
struct Topology;

impl Topology {
    fn up() -> Topology {
        Topology::down();
        let t = Topology;
        for ns in [SW, KA, XD] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        ip(&[
            "-n",
            SW,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", SW, "link", "set", "br0", "up"]);
        for (ns, port, dev, addr) in [
            (KA, "pk", "k0", "198.18.0.3/24"),
            (XD, "px", "x0", "198.18.0.2/24"),
        ] {
            ip(&[
                "-n", SW, "link", "add", port, "type", "veth", "peer", "name", dev, "netns", ns,
            ]);
            ip(&["-n", SW, "link", "set", port, "master", "br0", "up"]);
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        std::fs::create_dir_all(DIR).expect("mkdir");
        t
    }

    fn down() {
        for ns in [SW, KA, XD] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        Topology::down();
        let _ = std::fs::remove_dir_all(DIR);
    }
}

fn addrs(ns: &str, dev: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "addr", "show", "dev", dev])
        .output()
        .expect("ip addr show");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_vip(ns: &str, dev: &str) -> bool {
    addrs(ns, dev).contains(&format!("inet {VIP}/32"))
}

const VIP6: &str = "2001:2::100";

fn has_vip6(ns: &str, dev: &str) -> bool {
    addrs(ns, dev).contains(&format!("inet6 {VIP6}/128"))
}

/// keepalived in `vrka`, VRRP only, foreground, its files under DIR; stopped on drop.
struct Keepalived {
    child: Child,
    vrrp_pidfile: String,
}

impl Keepalived {
    fn start(priority: u8) -> Keepalived {
        Keepalived::start_with(priority, &format!("{VIP}/32"))
    }

    fn start_with(priority: u8, vip: &str) -> Keepalived {
        let conf = format!("{DIR}/keepalived.conf");
        std::fs::write(
            &conf,
            format!(
                "global_defs {{\n  router_id vrka\n  vrrp_version 3\n  vrrp_garp_master_repeat 1\n}}\n\
                 vrrp_instance front {{\n  state BACKUP\n  interface k0\n  virtual_router_id 51\n  \
                 priority {priority}\n  advert_int 0.1\n  virtual_ipaddress {{\n    {vip}\n  }}\n}}\n"
            ),
        )
        .expect("write keepalived.conf");
        let vrrp_pidfile = format!("{DIR}/vrrp.pid");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                KA,
                "keepalived",
                "-n",
                "-l",
                "-D",
                "-P",
                "-f",
                &conf,
            ])
            .args(["-p", &format!("{DIR}/keepalived.pid"), "-r", &vrrp_pidfile])
            .stdin(Stdio::null())
            .stdout(File::create(format!("{DIR}/keepalived.log")).expect("log"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start keepalived (apt-get install keepalived)");
        Keepalived {
            child,
            vrrp_pidfile,
        }
    }

    /// SIGTERM: keepalived's clean stop (a master sends priority 0), waited for.
    fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let vrrp_pid = std::fs::read_to_string(&self.vrrp_pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Its VRRP child, should it have outlived the parent (it only runs in our namespace).
        if let Some(pid) = vrrp_pid {
            if std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "keepalived")
            {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.terminate();
        }
    }
}

/// Our instance on a thread inside `vrxd` with its own current-thread runtime.
struct Ours {
    counters: Arc<Counters>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    transitions: std::sync::mpsc::Receiver<Transition>,
}

impl Ours {
    fn start(priority: u8) -> Ours {
        Ours::start_with(priority, VIP.parse().unwrap(), 32)
    }

    fn start_with(priority: u8, vip: IpAddr, prefix: u8) -> Ours {
        let config = VrrpConfig {
            name: "front".into(),
            interface: "x0".into(),
            virtual_router_id: 51,
            priority,
            advert_interval: Duration::from_millis(100),
            preempt: true,
            preempt_delay: Duration::ZERO,
            addresses: vec![VirtualAddress { ip: vip, prefix }],
            track_services: vec![],
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (trans_tx, transitions) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let ns = File::open(format!("/run/netns/{XD}")).expect("open netns");
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let inst = Instance::new(config).expect("instance");
                ready_tx.send(inst.counters()).expect("ready");
                let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
                let forward = tokio::spawn(async move {
                    while let Some(t) = events_rx.recv().await {
                        let _ = trans_tx.send(t);
                    }
                });
                inst.run(events_tx, async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("run");
                let _ = forward.await;
            });
        });
        let counters = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("instance started");
        Ours {
            counters,
            stop: Some(stop_tx),
            thread: Some(thread),
            transitions,
        }
    }

    fn state(&self) -> State {
        self.counters.state()
    }

    fn stop(mut self) -> Arc<Counters> {
        self.shutdown();
        self.counters.clone()
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            t.join().expect("instance thread");
        }
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Waits until `f` holds; returns how long it took. Panics with `what` after `timeout`.
fn within(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if f() {
            return t0.elapsed();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// Holds for `d`: exactly one side has the VIP, the expected one.
fn stays(what: &str, d: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while t0.elapsed() < d {
        assert!(f(), "{what} did not hold after {:?}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn xdpvs_master(o: &Ours) -> bool {
    o.state() == State::Master && has_vip(XD, "x0") && !has_vip(KA, "k0")
}

fn keepalived_master(o: &Ours) -> bool {
    o.state() == State::Backup && has_vip(KA, "k0") && !has_vip(XD, "x0")
}

#[test]
#[ignore = "needs root"]
fn interop_with_keepalived() {
    if !common::require_root("interop_with_keepalived") {
        return;
    }
    let _serial = serial();
    let _topo = Topology::up();
    // 100 ms adverts: Master_Down_Interval is 300 ms + skew (< 100 ms): about 0.4 s.
    let limit = Duration::from_secs(3);

    // 1. xdpvs 150 vs keepalived 100: xdpvs is elected, keepalived accepts our adverts (it stays
    //    backup, so our v3 checksum and format pass its validation).
    let ka = Keepalived::start(100);
    let ours = Ours::start(150);
    let t = within("xdpvs master", limit + Duration::from_secs(1), || {
        xdpvs_master(&ours)
    });
    println!("xdpvs (150) master over keepalived (100) after {t:?}");
    stays(
        "xdpvs master, keepalived backup",
        Duration::from_secs(2),
        || xdpvs_master(&ours),
    );

    // 2. Our clean stop sends priority 0: keepalived takes over after its skew, well inside
    //    one Master_Down_Interval.
    let stopped = Instant::now();
    let c = ours.stop();
    assert!(c.sent.load(Ordering::Relaxed) >= 20, "adverts sent: {c:?}");
    assert_eq!(c.send_errors.load(Ordering::Relaxed), 0);
    let t = within("keepalived takes over", limit, || {
        has_vip(KA, "k0") && !has_vip(XD, "x0")
    });
    println!(
        "keepalived master {:?} after xdpvs stopped (priority 0)",
        stopped.elapsed()
    );
    assert!(
        t < Duration::from_secs(2),
        "takeover after priority 0 took {t:?}"
    );

    // 3. Failback with preempt: xdpvs (150) comes back and preempts keepalived (100).
    let ours = Ours::start(150);
    let t = within("xdpvs preempts", limit, || xdpvs_master(&ours));
    println!("xdpvs preempted keepalived after {t:?}");
    // It was backup first, and accepted keepalived's adverts (keepalived's checksum passes ours).
    let tr: Vec<Transition> = ours.transitions.try_iter().collect();
    assert_eq!(
        tr.iter().map(|t| t.to).collect::<Vec<_>>(),
        vec![State::Backup, State::Master],
        "{tr:?}"
    );
    assert_eq!(tr[1].master, Some(IpAddr::from([198, 18, 0, 2])));
    assert!(ours.counters.accepted.load(Ordering::Relaxed) >= 1);
    assert_eq!(
        ours.counters.rejected.total(),
        0,
        "{:?}",
        ours.counters.rejected.snapshot()
    );
    let c = ours.stop();
    assert_eq!(c.rejected.get(Reject::Checksum), 0);
    ka.stop();
    within("VIP gone everywhere", limit, || {
        !has_vip(KA, "k0") && !has_vip(XD, "x0")
    });

    // 4. The other way round: keepalived 200 vs xdpvs 100: keepalived is elected, we stay backup
    //    on its adverts.
    let ka = Keepalived::start(200);
    within("keepalived master", limit + Duration::from_secs(2), || {
        has_vip(KA, "k0")
    });
    let ours = Ours::start(100);
    within("xdpvs backup", limit, || ours.state() == State::Backup);
    stays(
        "keepalived master, xdpvs backup",
        Duration::from_secs(2),
        || keepalived_master(&ours),
    );
    let accepted = ours.counters.accepted.load(Ordering::Relaxed);
    assert!(
        accepted >= 10,
        "accepted {accepted} keepalived adverts in 2 s"
    );
    assert_eq!(
        ours.counters.rejected.total(),
        0,
        "{:?}",
        ours.counters.rejected.snapshot()
    );

    // 5. Cut keepalived's link at the bridge: no priority 0, so we take over on the
    //    Master_Down_Timer (3 x 100 ms + skew 60.9 ms for priority 100).
    ip(&["-n", SW, "link", "set", "pk", "down"]);
    let cut = Instant::now();
    within("xdpvs takes over", limit, || {
        ours.state() == State::Master && has_vip(XD, "x0")
    });
    let t = cut.elapsed();
    println!("xdpvs master {t:?} after keepalived's link was cut (361 ms after its last advert)");
    assert!(
        t >= Duration::from_millis(250),
        "took over before the master could be down: {t:?}"
    );

    // 6. Link back: keepalived (200, preempting by default) takes the VIP back; we give it up.
    ip(&["-n", SW, "link", "set", "pk", "up"]);
    let t = within(
        "keepalived fails back",
        limit + Duration::from_secs(2),
        || keepalived_master(&ours),
    );
    println!("keepalived failed back {t:?} after its link returned");
    stays(
        "keepalived master after failback",
        Duration::from_secs(1),
        || keepalived_master(&ours),
    );
    let c = ours.stop();
    assert_eq!(c.address_errors.load(Ordering::Relaxed), 0);
    assert!(c.gratuitous_sent.load(Ordering::Relaxed) >= 1);
    ka.stop();
}

/// Sends `payload` as a VRRP packet from `vrka` (source 198.18.0.3) to 224.0.0.18 with `ttl`.
fn inject(payload: &[u8], ttl: u32) {
    common::in_netns(KA, || {
        use socket2::{Domain, Protocol, Socket, Type};
        let s =
            Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(112))).expect("raw socket");
        s.bind_device(Some(b"k0")).expect("bind k0");
        s.set_multicast_ttl_v4(ttl).expect("ttl");
        let to = std::net::SocketAddrV4::new(xdpvs::ha::vrrp::packet::GROUP_V4, 0);
        s.send_to(payload, &to.into()).expect("send");
    });
}

#[test]
#[ignore = "needs root"]
fn malformed_adverts_are_dropped_and_counted() {
    if !common::require_root("malformed_adverts_are_dropped_and_counted") {
        return;
    }
    let _serial = serial();
    use xdpvs::ha::vrrp::packet::{checksum, encode, Advert, GROUP_V4};
    let _topo = Topology::up();
    let ours = Ours::start(100);
    let src: IpAddr = [198, 18, 0, 3].into();
    let dst = IpAddr::V4(GROUP_V4);
    let vip: IpAddr = VIP.parse().unwrap();
    let advert = |vrid, addresses| Advert {
        vrid,
        priority: 200,
        max_adver_int_cs: 10,
        addresses,
    };
    let good = encode(&advert(51, vec![vip]), src, dst).unwrap();
    let mut bad_sum = good.clone();
    bad_sum[7] ^= 0xff;
    let mut long = [&good[..], &[0, 0, 0, 0]].concat();
    long[6..8].copy_from_slice(&[0, 0]);
    let s = checksum(src, dst, &long);
    long[6..8].copy_from_slice(&s.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, u32, Reject)> = vec![
        ("ttl 64", good.clone(), 64, Reject::Ttl),
        ("bad checksum", bad_sum, 255, Reject::Checksum),
        (
            "vrid 52",
            encode(&advert(52, vec![vip]), src, dst).unwrap(),
            255,
            Reject::Vrid,
        ),
        ("trailing bytes", long, 255, Reject::LengthMismatch),
        ("truncated", good[..10].to_vec(), 255, Reject::Truncated),
        (
            "other address",
            encode(&advert(51, vec![[198, 18, 0, 101].into()]), src, dst).unwrap(),
            255,
            Reject::AddressList,
        ),
    ];
    for (name, payload, ttl, reason) in &cases {
        let before = ours.counters.rejected.get(*reason);
        inject(payload, *ttl);
        within(
            &format!("{name} counted as {reason}"),
            Duration::from_secs(2),
            || ours.counters.rejected.get(*reason) == before + 1,
        );
    }
    // None of them counted as accepted or moved the election: alone, we become master on the
    // Master_Down_Timer as if they had not been sent.
    assert_eq!(ours.counters.accepted.load(Ordering::Relaxed), 0);
    assert_eq!(ours.counters.rejected.total(), cases.len() as u64);
    // The good one is accepted, and a priority-200 master makes us backup again.
    within("master", Duration::from_secs(3), || {
        ours.state() == State::Master
    });
    inject(&good, 255);
    within(
        "backup on a valid higher advert",
        Duration::from_secs(2),
        || ours.state() == State::Backup && !has_vip(XD, "x0"),
    );
    assert_eq!(ours.counters.accepted.load(Ordering::Relaxed), 1);
    drop(ours);
}

#[test]
#[ignore = "needs root"]
fn interop_ipv6_with_keepalived() {
    if !common::require_root("interop_ipv6_with_keepalived") {
        return;
    }
    let _serial = serial();
    let _topo = Topology::up();
    // Adverts come from the link-local address, usable once its DAD is done.
    for (ns, dev) in [(KA, "k0"), (XD, "x0")] {
        within(
            &format!("link-local on {ns}"),
            Duration::from_secs(5),
            || {
                let a = addrs(ns, dev);
                a.contains("inet6 fe80") && !a.contains("tentative")
            },
        );
    }
    let limit = Duration::from_secs(3);
    let vip6: IpAddr = VIP6.parse().unwrap();

    // keepalived 200 is master; we stay backup on its IPv6 adverts: its checksum over the IPv6
    // pseudo-header, hop limit 255 and address list all pass our validation.
    let ka = Keepalived::start_with(200, &format!("{VIP6}/128"));
    within(
        "keepalived master (IPv6)",
        limit + Duration::from_secs(2),
        || has_vip6(KA, "k0"),
    );
    let ours = Ours::start_with(100, vip6, 128);
    within("xdpvs backup", limit, || ours.state() == State::Backup);
    stays(
        "keepalived master, xdpvs backup (IPv6)",
        Duration::from_secs(2),
        || ours.state() == State::Backup && has_vip6(KA, "k0") && !has_vip6(XD, "x0"),
    );
    let accepted = ours.counters.accepted.load(Ordering::Relaxed);
    assert!(accepted >= 10, "accepted {accepted} IPv6 adverts in 2 s");
    assert_eq!(
        ours.counters.rejected.total(),
        0,
        "{:?}",
        ours.counters.rejected.snapshot()
    );

    // keepalived stops (priority 0): we take over after our skew.
    let stopped = Instant::now();
    ka.stop();
    within("xdpvs master (IPv6)", limit, || {
        ours.state() == State::Master && has_vip6(XD, "x0")
    });
    println!(
        "xdpvs IPv6 master {:?} after keepalived stopped",
        stopped.elapsed()
    );

    // keepalived 50 comes back: it accepts our adverts (our IPv6 checksum passes its
    // validation) and stays backup.
    let ka = Keepalived::start_with(50, &format!("{VIP6}/128"));
    stays(
        "xdpvs master, keepalived backup (IPv6)",
        Duration::from_secs(3),
        || ours.state() == State::Master && has_vip6(XD, "x0") && !has_vip6(KA, "k0"),
    );
    let c = ours.stop();
    assert_eq!(c.send_errors.load(Ordering::Relaxed), 0);
    assert!(c.gratuitous_sent.load(Ordering::Relaxed) >= 1);
    ka.stop();
}
