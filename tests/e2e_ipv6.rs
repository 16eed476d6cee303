//! End to end, issue 11 (IPv6): the real `xdpvs` binary balancing live HTTP over IPv6 from a
//! client namespace to three nginx reals, in DR (VIP on the reals' `lo`, never answered in
//! neighbour solicitations there) and in NAT (reals on port 8080 behind VIP port 80, their route
//! to the client via the director), in a dual-stack lab (`lab.sh up ... dual`, 2001:2::/48).
//! Each request is a new connection; weights 1:2:3 must show within 5 points, as the IPv4 tests
//! (`e2e_foundation`, `e2e_nat`) check. Needs root.

mod common;

use std::collections::HashMap;
use std::time::Instant;

use common::{
    http_get_new_conn, lab_config, real_ip6, real_of, spawn_xdpvs, vip6_addr, vip_addr, Lab,
    NAT_REAL_PORT, VIP6,
};
use xdpvs::admin::Status;

fn status(d: &common::Daemon) -> Status {
    let out = d.admin(&["list", "--json"]).expect("xdpvs list --json");
    serde_json::from_str(&out).expect("list --json parses")
}

/// An IPv6 service `name` on [VIP6]:80 over the lab's reals at `real_port`, weights `weights`.
fn service6(name: &str, weights: &[u32], forwarding: &str, real_port: u16) -> String {
    let mut c = format!(
        "\n[[service]]\nname = \"{name}\"\naddress = \"[{VIP6}]:80\"\nforwarding = \"{forwarding}\"\n\
         [service.check]\ntype = \"http\"\ninterval = \"500ms\"\ntimeout = \"400ms\"\n"
    );
    for (i, w) in weights.iter().enumerate() {
        c.push_str(&format!(
            "\n[[service.real]]\naddress = \"[{}]:{real_port}\"\nweight = {w}\n",
            real_ip6(i + 1)
        ));
    }
    c
}

/// `n` requests to `vip`, each on a new connection, from the client: requests per real.
fn spread(lab: &Lab, vip: std::net::SocketAddr, n: usize) -> HashMap<usize, usize> {
    common::in_netns(&lab.ns("client"), || {
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for i in 0..n {
            let body = http_get_new_conn(vip, "/")
                .unwrap_or_else(|e| panic!("request {i} to {vip} failed: {e:#}"));
            *counts
                .entry(real_of(&body).expect("body names a real"))
                .or_default() += 1;
        }
        counts
    })
}

fn assert_weights(what: &str, counts: &HashMap<usize, usize>, n: usize) {
    println!("{what}: {n} requests, each on a new connection:");
    println!("   real   weight  requests    share   expected");
    for (real, weight) in [(1, 1.0), (2, 2.0), (3, 3.0)] {
        let got = *counts.get(&real).unwrap_or(&0);
        let share = got as f64 / n as f64;
        let want = weight / 6.0;
        println!(
            "   r{real}     {weight:.0}     {got:>8}   {:>5.1}%   {:.0}/6 = {:.1}%",
            share * 100.0,
            weight,
            want * 100.0
        );
        assert!(
            (share - want).abs() <= 0.05,
            "{what}: real {real}: share {share:.3}, want {want:.3} +- 0.05 ({counts:?})"
        );
    }
}

/// `ip -6 neigh show ADDR` in `ns`.
fn neigh_of(lab: &Lab, ns: &str, addr: std::net::Ipv6Addr) -> String {
    lab.exec_ok(ns, &["ip", "-6", "neigh", "show", &addr.to_string()])
        .expect("ip neigh")
}

/// Waits until the director's health checks (over IPv6) have every real of every service up.
fn wait_all_up(d: &common::Daemon) {
    common::wait_for("every real up", std::time::Duration::from_secs(10), || {
        status(d)
            .services
            .iter()
            .all(|s| s.reals.iter().all(|r| r.health == "up"))
    });
}

#[test]
#[ignore = "needs root"]
fn ipv6_dr_spreads_by_weight_beside_an_ipv4_service() {
    if !common::require_root("ipv6_dr_spreads_by_weight_beside_an_ipv4_service") {
        return;
    }
    let t0 = Instant::now();
    let lab = Lab::up_dual("x6d", 3, "dr").expect("dual-stack lab up");
    // One file, both families: the lab's IPv4 service and its IPv6 twin.
    let config = lab_config(&lab, &[1, 1, 1], "") + &service6("web6", &[1, 2, 3], "dr", 80);
    let d = spawn_xdpvs(&lab, &config).expect("xdpvs starts");
    wait_all_up(&d);
    let n = 600;
    let counts = spread(&lab, vip6_addr(), n);
    println!("(lab up and {n} requests in {:?})", t0.elapsed());
    assert_weights("IPv6 DR", &counts, n);
    // The IPv4 service keeps working beside it.
    let v4 = spread(&lab, vip_addr(), 30);
    assert_eq!(v4.values().sum::<usize>(), 30, "{v4:?}");

    let st = status(&d);
    let s6 = st
        .services
        .iter()
        .find(|s| s.name == "web6")
        .expect("web6 listed");
    assert_eq!(s6.address, format!("[{VIP6}]:80"), "ipvsadm-style address");
    assert_eq!(s6.reals[0].address, format!("[{}]:80", real_ip6(1)));
    let total: u64 = s6.reals.iter().map(|r| r.connections).sum();
    assert_eq!(
        total, n as u64,
        "new IPv6 connections counted by the dataplane"
    );
    assert_eq!(st.dataplane.get("malformed"), Some(&0));
    let listed = d.list().expect("xdpvs list");
    println!("{listed}");
    assert!(listed.contains("TCP  [2001:2::100]:80 wlc"), "{listed}");
    assert!(listed.contains("-> [2001:2::11]:80"), "{listed}");
    // Only the director answered neighbour solicitations for the VIP: the client's entry for
    // it holds the director's MAC, and no real has one of its own for it.
    let mac = |ns: &str, dev: &str| {
        let out = lab
            .exec_ok(ns, &["cat", &format!("/sys/class/net/{dev}/address")])
            .expect("MAC");
        out.trim().to_string()
    };
    for i in 1..=3 {
        assert!(
            !neigh_of(&lab, "client", VIP6).contains(&mac(&format!("r{i}"), "eth0")),
            "real {i} answered a neighbour solicitation for the VIP"
        );
    }
    let neigh = neigh_of(&lab, "client", VIP6);
    assert!(
        neigh.contains(&mac("dir", "d0")),
        "the client resolved the VIP to the director: {neigh}"
    );
    // curl -6 from the client through the VIP, as an operator would check it.
    let body = lab
        .exec_ok(
            "client",
            &[
                "curl",
                "-6",
                "-s",
                "--max-time",
                "2",
                &format!("http://[{VIP6}]/"),
            ],
        )
        .expect("curl -6");
    assert!(
        real_of(&body).is_some(),
        "curl -6 through the VIP: {body:?}"
    );
}

#[test]
#[ignore = "needs root"]
fn ipv6_nat_spreads_by_weight_to_reals_on_another_port() {
    if !common::require_root("ipv6_nat_spreads_by_weight_to_reals_on_another_port") {
        return;
    }
    let t0 = Instant::now();
    let lab = Lab::up_dual("x6n", 3, "nat").expect("dual-stack NAT lab up");
    let config = format!(
        "[director]\ninterface = \"d0\"\nmetrics = \"off\"\nadmin_socket = \"{}\"\n",
        lab.dir.join("admin.sock").display()
    ) + &service6("nat6", &[1, 2, 3], "nat", NAT_REAL_PORT);
    let d = spawn_xdpvs(&lab, &config).expect("xdpvs starts");
    wait_all_up(&d);
    let n = 600;
    let counts = spread(&lab, vip6_addr(), n);
    println!("(lab up and {n} requests in {:?})", t0.elapsed());
    assert_weights("IPv6 NAT, VIP port 80 -> reals' port 8080", &counts, n);
    let st = status(&d);
    assert_eq!(st.services[0].forwarding, "nat");
    assert_eq!(
        st.services[0].reals[2].address,
        format!("[{}]:{NAT_REAL_PORT}", real_ip6(3))
    );
    let total: u64 = st.services[0].reals.iter().map(|r| r.connections).sum();
    assert_eq!(total, n as u64, "new connections counted by the dataplane");
    let stat = |name: &str| st.dataplane.get(name).copied().unwrap_or(0);
    assert_eq!(stat("malformed"), 0);
    assert_eq!(stat("drop_reply_no_conn"), 0, "{:?}", st.dataplane);
    // Every reply was translated by the director (the real's SYN-ACK, response and FIN at least).
    assert!(
        stat("nat_reply") >= 3 * n as u64,
        "nat_reply {}",
        stat("nat_reply")
    );
    println!("{}", d.list().expect("xdpvs list"));
}

/// A client behind a router whose link to it has the IPv6 minimum MTU (1280, `lab.sh far-up`
/// in a dual-stack lab) downloads 4 MiB from a real through the director. The real's 1500-byte
/// packets are too big for the router, which (an IPv6 router never fragments) sends Packet Too
/// Big to their source, the VIP, so to the director, which must hand it to the real (translated
/// for NAT). Without that the download stalls.
fn pmtu_download(lab: &Lab, nat: bool) {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Duration;
    const PORT: u16 = 9000;
    const SIZE: usize = 4 << 20;
    const PATH_MTU: u32 = 1280;
    lab.far_up(PATH_MTU).expect("far client behind a router");
    let real_port = if nat { PORT + 1 } else { PORT };
    let listener = lab.in_ns("r1", || {
        TcpListener::bind(("::", real_port)).expect("bind [::]")
    });
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let _ = c.write_all(&vec![0x5a; SIZE]);
            });
        }
    });
    let config = format!(
        "[director]\ninterface = \"d0\"\nmetrics = \"off\"\nadmin_socket = \"{}\"\n\n\
         [[service]]\nname = \"big6\"\naddress = \"[{VIP6}]:{PORT}\"\nforwarding = \"{}\"\n\
         [service.check]\ntype = \"none\"\n\n[[service.real]]\naddress = \"[{}]:{real_port}\"\n",
        lab.dir.join("admin.sock").display(),
        if nat { "nat" } else { "dr" },
        real_ip6(1)
    );
    let d = spawn_xdpvs(lab, &config).expect("xdpvs starts");
    let t = Instant::now();
    let got = common::in_netns(&lab.ns("far"), || -> std::io::Result<usize> {
        let vip = SocketAddr::new(VIP6.into(), PORT);
        let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = vec![0u8; 64 << 10];
        let mut n = 0;
        while n < SIZE {
            match s.read(&mut buf)? {
                0 => break,
                k => n += k,
            }
        }
        Ok(n)
    });
    let elapsed = t.elapsed();
    let from = if nat {
        real_ip6(1).to_string()
    } else {
        VIP6.to_string()
    };
    let st = status(&d);
    let icmp = st.dataplane.get("icmp_to_real").copied().unwrap_or(0);
    let route = lab
        .exec_ok(
            "r1",
            &["ip", "-6", "route", "get", "2001:2:1::1", "from", &from],
        )
        .unwrap_or_default();
    println!(
        "IPv6 download ({}) through a {PATH_MTU}-byte path: {got:?} bytes in {elapsed:?}; \
         icmp_to_real {icmp}; the real's route: {}",
        if nat { "nat" } else { "dr" },
        route.trim()
    );
    assert_eq!(
        got.expect("the download completes (no PMTU black hole)"),
        SIZE
    );
    assert!(icmp >= 1, "the router's Packet Too Big reached the real");
    assert!(
        route.contains(&format!("mtu {PATH_MTU}")),
        "the real learnt the path MTU: {route}"
    );
}

#[test]
#[ignore = "needs root"]
fn ipv6_client_behind_a_small_path_mtu_completes_a_large_download() {
    if !common::require_root("ipv6_client_behind_a_small_path_mtu_completes_a_large_download") {
        return;
    }
    let lab = Lab::up_dual("x6p1", 1, "dr").expect("dual-stack lab up");
    pmtu_download(&lab, false);
}

#[test]
#[ignore = "needs root"]
fn ipv6_client_behind_a_small_path_mtu_completes_a_large_download_through_nat() {
    if !common::require_root(
        "ipv6_client_behind_a_small_path_mtu_completes_a_large_download_through_nat",
    ) {
        return;
    }
    let lab = Lab::up_dual("x6p2", 1, "nat").expect("dual-stack NAT lab up");
    pmtu_download(&lab, true);
}

/// `example.com A IN`, id `id`.
fn dns_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(b"\x07example\x03com\x00");
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// One query over IPv6 to [VIP6]:53 on a new flow (socket), retried once; the real that
/// answered (dnsmasq on real i answers with 198.18.0.(10+i)), and the socket (kept by the caller
/// so that no port, hence no flow, is reused).
fn dns_ask(id: u16) -> (usize, std::net::UdpSocket) {
    let s = std::net::UdpSocket::bind("[::]:0").expect("bind [::]");
    s.connect(std::net::SocketAddr::new(VIP6.into(), 53))
        .expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(1)))
        .expect("timeout");
    let mut buf = [0u8; 512];
    for _ in 0..2 {
        s.send(&dns_query(id)).expect("send");
        if let Ok(n) = s.recv(&mut buf) {
            let r = &buf[..n];
            assert!(
                n == dns_query(id).len() + 16
                    && r[..2] == id.to_be_bytes()
                    && r[n - 6..n - 4] == [0, 4],
                "answer to {id}: {r:?}"
            );
            return (usize::from(r[n - 1]) - 10, s);
        }
    }
    panic!("no answer to query {id} over IPv6");
}

fn udp6(nat: bool) {
    use std::time::Duration;
    common::raise_nofile_limit();
    let lab = Lab::up_dual(
        if nat { "x6un" } else { "x6ud" },
        3,
        if nat { "nat" } else { "dr" },
    )
    .expect("dual-stack lab up");
    for i in 1..=3 {
        lab.start_dns(i).expect("dnsmasq on the real");
    }
    let mut config = format!(
        "[director]\ninterface = \"d0\"\nmetrics = \"off\"\nadmin_socket = \"{}\"\n\n\
         [[service]]\nname = \"dns6\"\naddress = \"[{VIP6}]:53\"\nprotocol = \"udp\"\n\
         forwarding = \"{}\"\n[service.check]\ntype = \"dns\"\ndns_query = \"example.com\"\n\
         interval = \"200ms\"\ntimeout = \"300ms\"\nrise = 2\nfall = 2\n",
        lab.dir.join("admin.sock").display(),
        if nat { "nat" } else { "dr" }
    );
    for (i, w) in [1, 2, 3].iter().enumerate() {
        config.push_str(&format!(
            "\n[[service.real]]\naddress = \"[{}]:53\"\nweight = {w}\n",
            real_ip6(i + 1)
        ));
    }
    let d = spawn_xdpvs(&lab, &config).expect("xdpvs starts");
    wait_all_up(&d);
    let client = lab.ns("client");
    let n = 300;
    let (counts, _held) = common::in_netns(&client, || {
        let mut counts: HashMap<usize, usize> = HashMap::new();
        let mut held = Vec::new();
        for i in 0..n {
            let (r, s) = dns_ask(i as u16);
            *counts.entry(r).or_default() += 1;
            held.push(s);
        }
        (counts, held)
    });
    assert_weights(
        &format!(
            "IPv6 UDP ({}), one-query flows",
            if nat { "nat" } else { "dr" }
        ),
        &counts,
        n,
    );
    let st = status(&d);
    for (i, r) in st.services[0].reals.iter().enumerate() {
        assert_eq!(
            (r.active, r.inactive),
            (0, *counts.get(&(i + 1)).unwrap_or(&0) as u64),
            "real {} (ActiveConn, InActConn): UDP flows are inactive",
            i + 1
        );
    }
    if nat {
        assert!(st.dataplane.get("nat_reply").copied().unwrap_or(0) >= n as u64);
    }
    // A real's DNS server stopped: the dns check (over IPv6) takes it out.
    lab.stop_dns(2).expect("stop dnsmasq on r2");
    let t = Instant::now();
    common::wait_for("r2 down", Duration::from_secs(5), || {
        let r = &status(&d).services[0].reals[1];
        r.health == "down" && r.weight == 0
    });
    println!("r2 down {:?} after its dnsmasq stopped", t.elapsed());
    let (after, _after_held) = common::in_netns(&client, || {
        let mut after: HashMap<usize, usize> = HashMap::new();
        let mut held = Vec::new();
        for i in 0..60 {
            let (r, s) = dns_ask(2000 + i);
            *after.entry(r).or_default() += 1;
            held.push(s);
        }
        (after, held)
    });
    assert!(!after.contains_key(&2), "a new flow reached r2: {after:?}");
    println!("{}", d.list().expect("xdpvs list"));
}

#[test]
#[ignore = "needs root"]
fn ipv6_udp_dns_service_in_dr_is_spread_counted_and_checked() {
    if !common::require_root("ipv6_udp_dns_service_in_dr_is_spread_counted_and_checked") {
        return;
    }
    udp6(false);
}

#[test]
#[ignore = "needs root"]
fn ipv6_udp_dns_service_in_nat_is_spread_counted_and_checked() {
    if !common::require_root("ipv6_udp_dns_service_in_nat_is_spread_counted_and_checked") {
        return;
    }
    udp6(true);
}
