//! End to end, issue 11 (LVS-NAT): the real `xdpvs` binary translating live HTTP between a
//! client namespace and three nginx reals on port 8080 behind VIP port 80, in a NAT lab
//! (`lab.sh up ... nat`: no VIP on the reals, their route to the client via the director, so
//! every reply crosses the director's XDP program). Needs root.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{
    http_get_new_conn, lab_config_port, real_of, spawn_xdpvs, vip_addr, KeepAlive, Lab,
    NAT_REAL_PORT,
};
use xdpvs::admin::Status;

fn status(d: &common::Daemon) -> Status {
    let out = d.admin(&["list", "--json"]).expect("xdpvs list --json");
    serde_json::from_str(&out).expect("list --json parses")
}

/// (active, inactive) per real of the first service.
fn conns(d: &common::Daemon) -> Vec<(u64, u64)> {
    status(d).services[0]
        .reals
        .iter()
        .map(|r| (r.active, r.inactive))
        .collect()
}

/// Waits until (active, inactive) per real and the table's entry count are `want`; panics with
/// the last ones seen.
fn wait_conns(d: &common::Daemon, what: &str, want: (&[(u64, u64)], u64), timeout: Duration) {
    let end = Instant::now() + timeout;
    loop {
        let st = status(d);
        let got: Vec<(u64, u64)> = st.services[0]
            .reals
            .iter()
            .map(|r| (r.active, r.inactive))
            .collect();
        if got == want.0 && st.conntrack_entries == want.1 {
            return;
        }
        if Instant::now() > end {
            panic!(
                "{what}: want {want:?}, have {got:?} and {} entries",
                st.conntrack_entries
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Entries in the director's pinned map `name` (`CONNS`, `EMBRYOS`), read with bpftool.
fn map_entries(lab: &Lab, name: &str) -> usize {
    let pin = format!("/sys/fs/bpf/xdpvs/{}dir/d0/{name}", lab.prefix);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", &pin])
        .output()
        .expect("bpftool runs");
    assert!(
        out.status.success(),
        "bpftool map dump {pin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    v.as_array().expect("a JSON array").len()
}

fn nat_config(lab: &Lab, weights: &[u32], extra: &str) -> String {
    let extra = format!("forwarding = \"nat\"\n{extra}");
    lab_config_port(lab, weights, &extra, NAT_REAL_PORT)
        + "\n[director.timeouts]\ntcp_fin = \"1s\"\ntcp_close = \"1s\"\n"
}

#[test]
#[ignore = "needs root"]
fn nat_spreads_by_weight_and_counts_held_connections_exactly() {
    if !common::require_root("nat_spreads_by_weight_and_counts_held_connections_exactly") {
        return;
    }
    common::raise_nofile_limit();
    let t0 = Instant::now();
    let lab = Lab::up_nat("xn1", 3).expect("lab up");
    let d = spawn_xdpvs(&lab, &nat_config(&lab, &[1, 2, 3], "")).expect("xdpvs starts");
    let client = lab.ns("client");
    let n = 600;
    let counts = common::in_netns(&client, || {
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for i in 0..n {
            let body = http_get_new_conn(vip_addr(), "/")
                .unwrap_or_else(|e| panic!("request {i} through NAT failed: {e:#}"));
            *counts
                .entry(real_of(&body).expect("body names a real"))
                .or_default() += 1;
        }
        counts
    });
    println!("{n} NAT requests in {:?}: {counts:?}", t0.elapsed());
    for (real, weight) in [(1, 1.0), (2, 2.0), (3, 3.0)] {
        let share = *counts.get(&real).unwrap_or(&0) as f64 / n as f64;
        let want = weight / 6.0;
        assert!(
            (share - want).abs() <= 0.05,
            "real {real}: share {share:.3}, want {want:.3} +- 0.05 ({counts:?})"
        );
    }
    let st = status(&d);
    assert_eq!(st.services[0].forwarding, "nat");
    let total: u64 = st.services[0].reals.iter().map(|r| r.connections).sum();
    assert_eq!(total, n as u64, "new connections counted by the dataplane");
    let stat = |name: &str| status(&d).dataplane.get(name).copied().unwrap_or(0);
    assert_eq!(stat("malformed"), 0);
    assert_eq!(stat("drop_reply_no_conn"), 0, "{:?}", status(&d).dataplane);
    // Every reply was translated by the director (the real's SYN-ACK, response and FIN at least).
    assert!(
        stat("nat_reply") >= 3 * n as u64,
        "nat_reply {}",
        stat("nat_reply")
    );

    // Closed connections (both FINs seen: CLOSE) expire after tcp_close = 1 s; then the table is empty.
    let zero = [(0, 0); 3];
    wait_conns(
        &d,
        "closed NAT flows expired",
        (&zero, 0),
        Duration::from_secs(8),
    );

    // Held keep-alive connections: ActiveConn per real is exactly how many the client holds there.
    let (mut ka, bodies) = KeepAlive::open(&client, vip_addr(), 24, "/").expect("24 connections");
    let mut held = [0u64; 3];
    for b in &bodies {
        held[real_of(b).expect("real") - 1] += 1;
    }
    let want: Vec<(u64, u64)> = held.iter().map(|&a| (a, 0)).collect();
    common::wait_for(
        &format!("ActiveConn/InActConn {want:?}"),
        Duration::from_secs(5),
        || conns(&d) == want,
    );
    // 24 connections counted; in the table a NAT flow takes two slots (the flow and its reply
    // entry, uncounted), both moved out of the embryonic table by the client's ACK.
    assert_eq!(status(&d).conntrack_entries, 24);
    assert_eq!(map_entries(&lab, "CONNS"), 2 * 24, "flow + reply entries");
    let listed = d.list().expect("list");
    println!("{listed}");
    for (i, a) in held.iter().enumerate() {
        let line = listed
            .lines()
            .find(|l| l.contains(&format!("198.18.0.{}:{NAT_REAL_PORT}", 11 + i)))
            .unwrap_or_else(|| panic!("real {} listed: {listed}", i + 1));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols.get(2), Some(&"Masq"), "{line}");
        assert_eq!(
            cols.get(4),
            Some(&a.to_string().as_str()),
            "ActiveConn: {line}"
        );
        assert_eq!(cols.get(5), Some(&"0"), "InActConn: {line}");
    }
    // The held connections keep working, each on its real.
    assert_eq!(ka.request_all("/").expect("keep-alive requests"), bodies);
    ka.close();
    // Closed by the client: inactive (FIN_WAIT/TIME_WAIT seen from both sides) until expiry.
    let closed: Vec<(u64, u64)> = held.iter().map(|&a| (0, a)).collect();
    common::wait_for(
        &format!("closed connections inactive {closed:?}"),
        Duration::from_secs(3),
        || conns(&d) == closed,
    );
    wait_conns(&d, "counts back to 0/0", (&zero, 0), Duration::from_secs(8));
    assert_eq!(
        map_entries(&lab, "CONNS"),
        0,
        "reply entries deleted with their flows"
    );
    println!("test done in {:?}", t0.elapsed());
}

#[test]
#[ignore = "needs root"]
fn nat_health_check_on_the_real_port_takes_a_stopped_real_out() {
    if !common::require_root("nat_health_check_on_the_real_port_takes_a_stopped_real_out") {
        return;
    }
    let lab = Lab::up_nat("xn2", 3).expect("lab up");
    // The check's port defaults to the real's (8080), not the VIP's.
    let check = "[service.check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\n\
                 timeout = \"300ms\"\nrise = 2\nfall = 2\nexpect_body = \"OK\"\n";
    let d = spawn_xdpvs(&lab, &nat_config(&lab, &[1, 1, 1], check)).expect("xdpvs starts");
    let client = lab.ns("client");
    common::wait_for("all reals up", Duration::from_secs(5), || {
        status(&d).services[0]
            .reals
            .iter()
            .all(|r| r.health == "up")
    });
    let seen = common::sample_reals(&client, 30);
    assert!(
        [1, 2, 3].iter().all(|r| seen.contains(r)),
        "all reals reached through NAT: {seen:?}"
    );
    lab.stop_nginx(2).expect("stop nginx on r2");
    let t = Instant::now();
    common::wait_for("r2 down", Duration::from_secs(5), || {
        let r = &status(&d).services[0].reals[1];
        r.health == "down" && r.weight == 0
    });
    println!("r2 down {:?} after its nginx stopped", t.elapsed());
    let seen = common::sample_reals(&client, 60);
    assert!(!seen.contains(&2), "a new connection reached r2: {seen:?}");
    assert!(seen.contains(&1) && seen.contains(&3), "{seen:?}");
    lab.start_nginx(2).expect("start nginx on r2");
    common::wait_for("r2 up again", Duration::from_secs(5), || {
        status(&d).services[0].reals[1].health == "up"
    });
    let seen = common::sample_reals(&client, 60);
    assert!(seen.contains(&2), "r2 back in service: {seen:?}");
}
