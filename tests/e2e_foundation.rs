//! End to end, issue "foundation": the real `xdpvs` binary directing live HTTP from a client
//! namespace to three nginx reals (DR mode), in a netns lab. Needs root.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{http_get_new_conn, lab_config, real_of, spawn_xdpvs, vip_addr, KeepAlive, Lab};
use xdpvs::admin::Status;

fn status(d: &common::Daemon) -> Status {
    let out = d.admin(&["list", "--json"]).expect("xdpvs list --json");
    serde_json::from_str(&out).expect("list --json parses")
}

/// (active, inactive) per real address of the first service.
fn conns(d: &common::Daemon) -> Vec<(u64, u64)> {
    status(d).services[0]
        .reals
        .iter()
        .map(|r| (r.active, r.inactive))
        .collect()
}

#[test]
#[ignore = "needs root"]
fn new_connections_are_spread_by_weight() {
    if !common::require_root("new_connections_are_spread_by_weight") {
        return;
    }
    let lab = Lab::up("xf1", 3).expect("lab up");
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1, 2, 3], "")).expect("xdpvs starts");
    let client = lab.ns("client");
    let counts = common::in_netns(&client, || {
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for i in 0..600 {
            let body = http_get_new_conn(vip_addr(), "/")
                .unwrap_or_else(|e| panic!("request {i} failed: {e:#}"));
            *counts
                .entry(real_of(&body).expect("body names a real"))
                .or_default() += 1;
        }
        counts
    });
    for (real, weight) in [(1, 1.0), (2, 2.0), (3, 3.0)] {
        let share = *counts.get(&real).unwrap_or(&0) as f64 / 600.0;
        let want = weight / 6.0;
        assert!(
            (share - want).abs() <= 0.05,
            "real {real}: share {share:.3}, want {want:.3} +- 0.05 ({counts:?})"
        );
    }
    let st = status(&d);
    let total: u64 = st.services[0].reals.iter().map(|r| r.connections).sum();
    assert!(total >= 600, "dataplane counted {total} new connections");
    assert_eq!(st.dataplane.get("malformed"), Some(&0));
}

#[test]
#[ignore = "needs root"]
fn idle_keepalive_connections_are_counted_active_then_released() {
    if !common::require_root("idle_keepalive_connections_are_counted_active_then_released") {
        return;
    }
    common::raise_nofile_limit();
    let lab = Lab::up("xf2", 3).expect("lab up");
    // A short FIN timeout so the test also sees closed connections expire.
    let config = lab_config(&lab, &[1, 1, 1], "") + "\n[director.timeouts]\ntcp_fin = \"2s\"\n";
    let d = spawn_xdpvs(&lab, &config).expect("xdpvs starts");
    let client = lab.ns("client");
    let (ka, bodies) = KeepAlive::open(&client, vip_addr(), 30, "/").expect("30 connections");
    let mut per_real: HashMap<usize, usize> = HashMap::new();
    for b in &bodies {
        *per_real.entry(real_of(b).expect("real")).or_default() += 1;
    }
    assert_eq!(
        per_real.values().copied().collect::<Vec<_>>().len(),
        3,
        "{per_real:?}"
    );
    common::wait_for("ActiveConn 10/10/10", Duration::from_secs(5), || {
        conns(&d).iter().map(|c| c.0).collect::<Vec<_>>() == vec![10, 10, 10]
    });
    let listed = d.list().expect("list");
    assert!(listed.contains("ActiveConn"), "{listed}");
    ka.close();
    common::wait_for("ActiveConn back to 0", Duration::from_secs(5), || {
        conns(&d).iter().all(|c| c.0 == 0)
    });
    // Closed connections are inactive (FIN_WAIT) until they expire, not lost...
    let inactive: u64 = conns(&d).iter().map(|c| c.1).sum();
    assert_eq!(inactive, 30);
    // ...and the expiry sweep returns every count to zero, with the table empty.
    common::wait_for("counts back to 0/0", Duration::from_secs(8), || {
        conns(&d).iter().all(|c| *c == (0, 0))
    });
    assert_eq!(status(&d).conntrack_entries, 0);
}

#[test]
#[ignore = "needs root"]
fn stopping_the_daemon_leaves_the_dataplane_and_detach_removes_it() {
    if !common::require_root("stopping_the_daemon_leaves_the_dataplane_and_detach_removes_it") {
        return;
    }
    let lab = Lab::up("xf4", 1).expect("lab up");
    let mut d = spawn_xdpvs(&lab, &lab_config(&lab, &[1], "")).expect("xdpvs starts");
    let link = || {
        lab.exec_ok("dir", &["ip", "link", "show", "d0"])
            .expect("ip link")
    };
    assert!(link().contains("xdp"), "attached while running: {}", link());
    d.stop(Duration::from_secs(5))
        .expect("clean exit on SIGTERM");
    assert!(!d.admin_socket.exists(), "admin socket removed");
    // The pinned program keeps balancing with no daemon.
    assert!(link().contains("xdp"), "detached by SIGTERM: {}", link());
    let client = lab.ns("client");
    let r = common::in_netns(&client, || http_get_new_conn(vip_addr(), "/"));
    assert_eq!(r.expect("balanced with no daemon").trim(), "r1");
    // `xdpvs detach` takes the director out of service.
    let cfg = d.config_path.to_str().unwrap().to_string();
    let out = common::xdpvs_in(&lab, &["detach", "--config", &cfg]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !link().contains("xdp"),
        "still attached after detach: {}",
        link()
    );
    // The director keeps working as a host: the VIP port is the kernel's again.
    let r = common::in_netns(&client, || http_get_new_conn(vip_addr(), "/"));
    assert!(r.is_err(), "nothing listens on the director itself");
}

#[test]
#[ignore = "needs root"]
fn weight_zero_keeps_open_connections_and_takes_no_new_ones() {
    if !common::require_root("weight_zero_keeps_open_connections_and_takes_no_new_ones") {
        return;
    }
    common::raise_nofile_limit();
    let lab = Lab::up("xf3", 3).expect("lab up");
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1, 1, 1], "")).expect("xdpvs starts");
    let client = lab.ns("client");
    let (mut ka, bodies) = KeepAlive::open(&client, vip_addr(), 9, "/").expect("connections");
    assert!(bodies.iter().any(|b| real_of(b) == Some(2)), "{bodies:?}");
    // Quiesce real 2 by editing the config and reloading.
    d.write_config(&lab_config(&lab, &[1, 0, 1], ""))
        .expect("write config");
    d.reload().expect("SIGHUP");
    common::wait_for("weight 0 in the table", Duration::from_secs(5), || {
        status(&d).services[0].reals[1].weight == 0
    });
    // Open connections to real 2 keep working.
    let again = ka
        .request_all("/")
        .expect("keep-alive requests after the change");
    assert_eq!(again, bodies, "each connection still reaches its real");
    // New connections never go to it.
    let seen = common::sample_reals(&client, 60);
    assert!(
        !seen.contains(&2),
        "a new connection reached the weight-0 real: {seen:?}"
    );
    assert!(seen.contains(&1) && seen.contains(&3));
    ka.close();
}
