//! End to end, persistence (issue "scheduling breadth", item 3): the real `xdpvs` binary with a
//! persistent service in a netns lab with nginx reals. 50 connections from one client reach
//! one real; 60 client addresses spread by weight, each keeping its real; after that real is
//! drained, the client's new connections go elsewhere. Needs root.

mod common;

use std::collections::{BTreeMap, HashSet};

use common::{http_get_new_conn, lab_config, real_of, spawn_xdpvs, vip_addr, Lab};
use xdpvs::admin::Status;

fn status(d: &common::Daemon) -> Status {
    let out = d.admin(&["list", "--json"]).expect("xdpvs list --json");
    serde_json::from_str(&out).expect("list --json parses")
}

/// One request on a new connection from source address `from`: the real that answered.
fn get_from(lab: &Lab, from: &str) -> usize {
    let body = lab
        .exec_ok(
            "client",
            &[
                "curl",
                "-sS",
                "--max-time",
                "3",
                "--interface",
                from,
                "-H",
                "Connection: close",
                &format!("http://{}/", vip_addr()),
            ],
        )
        .unwrap_or_else(|e| panic!("request from {from}: {e:#}"));
    real_of(&body).unwrap_or_else(|| panic!("body names no real: {body:?}"))
}

#[test]
#[ignore = "needs root"]
fn persistent_clients_keep_their_real_and_spread_by_weight() {
    if !common::require_root("persistent_clients_keep_their_real_and_spread_by_weight") {
        return;
    }
    let lab = Lab::up("xps", 3).expect("lab up");
    let d = spawn_xdpvs(
        &lab,
        &lab_config(&lab, &[1, 2, 3], "persistence = \"300s\"\n"),
    )
    .expect("xdpvs starts");

    // 60 client addresses, one connection each, then a second each.
    let addrs: Vec<String> = (140..200).map(|i| format!("198.18.0.{i}")).collect();
    let mut batch = String::new();
    for a in &addrs {
        batch.push_str(&format!("address add {a}/32 dev eth0\n"));
    }
    let path = lab.dir.join("client-addrs.batch");
    std::fs::write(&path, batch).expect("write batch");
    lab.exec_ok("client", &["ip", "-batch", &path.to_string_lossy()])
        .expect("client addresses");
    let first: Vec<usize> = addrs.iter().map(|a| get_from(&lab, a)).collect();
    let mut spread: BTreeMap<usize, usize> = BTreeMap::new();
    for r in &first {
        *spread.entry(*r).or_default() += 1;
    }
    println!("60 client addresses over weights 1:2:3: {spread:?}");
    // WLC places each new client by the reals' loads (each closed connection still counts,
    // as InActConn): 10/20/30, give or take the connections closing meanwhile.
    for (real, want) in [(1usize, 10i64), (2, 20), (3, 30)] {
        let got = *spread.get(&real).unwrap_or(&0) as i64;
        assert!(
            (got - want).abs() <= 3,
            "real {real}: {got} of 60 new clients, want {want} +- 3 ({spread:?})"
        );
    }
    let again: Vec<usize> = addrs.iter().map(|a| get_from(&lab, a)).collect();
    assert_eq!(
        again, first,
        "every client's second connection went to its first real"
    );

    // One client, 50 new connections: one real.
    let client = lab.ns("client");
    let reals: Vec<usize> = common::in_netns(&client, || {
        (0..50)
            .map(|i| {
                let body = http_get_new_conn(vip_addr(), "/")
                    .unwrap_or_else(|e| panic!("request {i}: {e:#}"));
                real_of(&body).expect("body names a real")
            })
            .collect()
    });
    let distinct: HashSet<usize> = reals.iter().copied().collect();
    println!("50 connections from 198.18.0.1 went to reals {distinct:?}");
    assert_eq!(distinct.len(), 1, "one client, one real: {reals:?}");
    let owner = reals[0];

    let st = status(&d);
    let p = st.services[0]
        .persistence
        .as_ref()
        .expect("persistence shown");
    assert_eq!((p.timeout_s, p.prefix), (300, 32));
    assert_eq!(p.templates, 61, "one template per client address");
    let listing = d
        .admin(&["list", "--persistence"])
        .expect("list --persistence");
    assert!(listing.contains("wlc persistent 300 mask /32"), "{listing}");
    for (a, r) in addrs.iter().zip(&first) {
        let row = listing
            .lines()
            .find(|l| l.contains(&format!(" {a}/32 ")))
            .unwrap_or_else(|| panic!("no template row for {a}:\n{listing}"));
        assert!(
            row.contains(&format!("198.18.0.1{r}:80")),
            "{a} -> r{r}: {row}"
        );
    }
    assert_eq!(
        st.dataplane.get("persist_hit").copied(),
        Some(49 + 60),
        "template hits counted"
    );

    // Drain the first client's real: its new connections go elsewhere, and stay there.
    d.admin(&["drain", "web", &format!("198.18.0.1{owner}")])
        .expect("drain");
    let after: Vec<usize> = (0..10).map(|_| get_from(&lab, "198.18.0.1")).collect();
    println!("after draining r{owner}, 10 connections from 198.18.0.1 went to {after:?}");
    assert!(after.iter().all(|r| *r != owner), "drained real skipped");
    assert!(
        after.iter().all(|r| *r == after[0]),
        "a new template: one real again"
    );
}
