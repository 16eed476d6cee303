//! End to end, issue 11 item 4 (UDP services for real): a DNS service (dnsmasq on each real,
//! `lab.sh dns-start`, answering `example.com A` with the real's own address) behind VIP:53/udp,
//! in DR and in NAT: queries from the client answered through the director, new flows spread by
//! weight, each live flow counted once under InActConn (as ipvsadm shows UDP), and a real's
//! stopped DNS server taken out by the `dns` check. Needs root and dnsmasq.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{lab_config_port, Lab};
use xdpvs::admin::Status;

const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// Long enough for the spread's flows to be counted live (they take well under a second),
/// short enough to watch them expire.
const UDP_TIMEOUT: Duration = Duration::from_secs(4);

fn status(d: &common::Daemon) -> Status {
    let out = d.admin(&["list", "--json"]).expect("xdpvs list --json");
    serde_json::from_str(&out).expect("list --json parses")
}

/// `example.com A IN`, id `id`.
fn query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    q.extend_from_slice(b"\x07example\x03com\x00");
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

/// The A record's address in dnsmasq's answer to `query(id)`.
fn answer(id: u16, reply: &[u8]) -> Option<Ipv4Addr> {
    let n = reply.len();
    let ok = n == query(id).len() + 16
        && reply[..2] == id.to_be_bytes()
        && reply[2] & 0x80 != 0
        && reply[3] & 0x0f == 0
        && reply[n - 6..n - 4] == [0, 4];
    ok.then(|| Ipv4Addr::new(reply[n - 4], reply[n - 3], reply[n - 2], reply[n - 1]))
}

/// One query on `sock` (connected to VIP:53, so only an answer from VIP:53 is received),
/// retried once as DNS clients do; the real that answered (1-based).
fn ask(sock: &UdpSocket, id: u16) -> Result<usize, String> {
    let mut buf = [0u8; 512];
    for _ in 0..2 {
        sock.send(&query(id)).map_err(|e| format!("send: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        match sock.recv(&mut buf) {
            Ok(n) => {
                let ip =
                    answer(id, &buf[..n]).ok_or_else(|| format!("bad answer {:?}", &buf[..n]))?;
                return Ok(usize::from(ip.octets()[3]) - 10);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("recv: {e}")),
        }
    }
    Err(format!("no answer to query {id}"))
}

fn flow() -> UdpSocket {
    let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
    s.connect(SocketAddr::from((VIP, 53))).expect("connect");
    s
}

/// `n` one-query flows from the client: which real answered each, and their sockets. The
/// caller keeps the sockets while flows must stay apart: a closed socket's port is soon reused,
/// and a reused tuple is the same (still tracked) flow to the director, on its old real.
fn spread(client: &str, n: usize) -> (HashMap<usize, usize>, Vec<UdpSocket>) {
    common::in_netns(client, || {
        let mut counts = HashMap::new();
        let mut open = Vec::with_capacity(n);
        for i in 0..n {
            let s = flow();
            let r = ask(&s, i as u16).unwrap_or_else(|e| panic!("query {i}: {e}"));
            *counts.entry(r).or_insert(0) += 1;
            open.push(s);
        }
        (counts, open)
    })
}

fn dns_config(lab: &Lab, nat: bool) -> String {
    let extra = format!(
        "protocol = \"udp\"\nforwarding = \"{}\"\n\n[service.check]\ntype = \"dns\"\n\
         dns_query = \"example.com\"\ninterval = \"200ms\"\ntimeout = \"300ms\"\nrise = 2\nfall = 2\n",
        if nat { "nat" } else { "dr" }
    );
    lab_config_port(lab, &[1, 2, 3], &extra, 53).replace(":80\"", ":53\"")
        + &format!(
            "\n[director.timeouts]\nudp = \"{}s\"\n",
            UDP_TIMEOUT.as_secs()
        )
}

fn run(lab: &Lab, nat: bool) {
    common::raise_nofile_limit();
    let t0 = Instant::now();
    for i in 1..=3 {
        lab.start_dns(i).expect("dnsmasq on the real");
    }
    let d = common::spawn_xdpvs(lab, &dns_config(lab, nat)).expect("xdpvs starts");
    common::wait_for("all reals up", Duration::from_secs(5), || {
        status(&d).services[0]
            .reals
            .iter()
            .all(|r| r.health == "up")
    });
    let client = lab.ns("client");
    let n = 300;
    let (counts, _held) = spread(&client, n);
    println!(
        "{n} one-query flows ({}): {counts:?}",
        if nat { "nat" } else { "dr" }
    );
    for (real, weight) in [(1, 1.0), (2, 2.0), (3, 3.0)] {
        let share = *counts.get(&real).unwrap_or(&0) as f64 / n as f64;
        let want = weight / 6.0;
        assert!(
            (share - want).abs() <= 0.06,
            "real {real}: share {share:.3}, want {want:.3} +- 0.06 ({counts:?})"
        );
    }
    // Each flow is live (younger than the udp timeout) and counted once, under InActConn, on
    // its real.
    let st = status(&d);
    let svc = &st.services[0];
    assert_eq!(svc.forwarding, if nat { "nat" } else { "dr" });
    for (i, r) in svc.reals.iter().enumerate() {
        assert_eq!(
            (r.active, r.inactive),
            (0, *counts.get(&(i + 1)).unwrap_or(&0) as u64),
            "real {} counts (ActiveConn, InActConn)",
            i + 1
        );
    }
    if nat {
        assert!(st.dataplane.get("nat_reply").copied().unwrap_or(0) >= n as u64);
    }
    // A flow that keeps querying stays on its real.
    let (same, _same_sock) = common::in_netns(&client, || {
        let s = flow();
        let same = (0..5u16)
            .map(|i| ask(&s, 1000 + i).expect("query"))
            .collect::<Vec<_>>();
        (same, s)
    });
    assert!(same.windows(2).all(|w| w[0] == w[1]), "{same:?}");

    lab.stop_dns(2).expect("stop dnsmasq on r2");
    let t = Instant::now();
    common::wait_for("r2 down", Duration::from_secs(5), || {
        let r = &status(&d).services[0].reals[1];
        r.health == "down" && r.weight == 0
    });
    println!("r2 down {:?} after its dnsmasq stopped", t.elapsed());
    // New flows (every earlier flow's port still held, so none is reused).
    let (after, _after_held) = spread(&client, 60);
    assert!(!after.contains_key(&2), "a new flow reached r2: {after:?}");
    assert!(
        after.contains_key(&1) && after.contains_key(&3),
        "{after:?}"
    );
    // Idle flows end by the udp timeout: every count back to 0.
    let t = Instant::now();
    common::wait_for("UDP flows expired", UDP_TIMEOUT * 3, || {
        let st = status(&d);
        st.conntrack_entries == 0
            && st.services[0]
                .reals
                .iter()
                .all(|r| (r.active, r.inactive) == (0, 0))
    });
    println!("all flows expired {:?} after the last query", t.elapsed());
    println!("done in {:?}", t0.elapsed());
}

#[test]
#[ignore = "needs root"]
fn udp_dns_service_in_dr_is_spread_counted_and_checked() {
    if !common::require_root("udp_dns_service_in_dr_is_spread_counted_and_checked") {
        return;
    }
    let lab = Lab::up("xu1", 3).expect("lab up");
    run(&lab, false);
}

#[test]
#[ignore = "needs root"]
fn udp_dns_service_in_nat_is_spread_counted_and_checked() {
    if !common::require_root("udp_dns_service_in_nat_is_spread_counted_and_checked") {
        return;
    }
    let lab = Lab::up_nat("xu2", 3).expect("lab up");
    run(&lab, true);
}
