//! End to end, issue #9 item 2 (connection-state sync): two xdpvs directors in a lab with a
//! `[sync]` pair. Clients hold keep-alive connections through director A (which owns the VIP);
//! director B's table shows them on the same reals with the right ActiveConn, their closing
//! and expiry return B's counts to zero, and a B restarted with an empty table (`--fresh`) gets
//! them back by a dump. The real binary, a netns lab, nginx. Needs root; run under the lab lock.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use common::{lab_config, spawn_director, vip_addr, wait_for, Daemon, KeepAlive, Lab};
use xdpvs::admin::Status;

fn status(d: &Daemon) -> Status {
    serde_json::from_str(&d.admin(&["list", "--json"]).expect("list --json")).expect("json")
}

/// (ActiveConn, InActConn) per real address.
fn counts(st: &Status) -> BTreeMap<String, (u64, u64)> {
    st.services
        .iter()
        .flat_map(|s| {
            s.reals
                .iter()
                .map(|r| (r.address.clone(), (r.active, r.inactive)))
        })
        .collect()
}

fn active(st: &Status) -> BTreeMap<String, u64> {
    counts(st).into_iter().map(|(a, (n, _))| (a, n)).collect()
}

fn total(st: &Status) -> (u64, u64) {
    counts(st)
        .values()
        .fold((0, 0), |(a, i), (x, y)| (a + x, i + y))
}

/// A director's config: the lab's service, short FIN/CLOSE timeouts (so closed connections
/// leave the tables within seconds), and `[sync]` toward the other director.
fn config(lab: &Lab, me: &str, peer: &str, admin: &str, key: &std::path::Path) -> String {
    let base = lab_config(lab, &[1, 1, 1], "").replace(
        &format!("{}", lab.dir.join("admin.sock").display()),
        &format!("{}", lab.dir.join(admin).display()),
    );
    format!(
        "{base}\n[director.timeouts]\ntcp_fin = \"2s\"\ntcp_close = \"1s\"\n\n\
         [sync]\nlisten = \"{me}:8899\"\npeer = \"{peer}:8899\"\nkey_file = \"{}\"\nrefresh = \"2s\"\n",
        key.display()
    )
}

#[test]
#[ignore = "needs root"]
fn held_connections_appear_on_the_peer_leave_it_when_closed_and_return_by_dump() {
    if !common::require_root(
        "held_connections_appear_on_the_peer_leave_it_when_closed_and_return_by_dump",
    ) {
        return;
    }
    let lab = Lab::up_pair("xsy", 3).expect("lab up");
    // No VRRP here: A holds the VIP (answers ARP for it) as a single director would.
    lab.exec_ok(
        "dir",
        &["ip", "addr", "add", "198.18.0.100/32", "dev", "d0"],
    )
    .expect("VIP on A");
    let key = lab.dir.join("sync.key");
    std::fs::write(&key, format!("{}\n", "5a".repeat(32))).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg_a = config(&lab, "198.18.0.2", "198.18.0.3", "admin.sock", &key);
    let cfg_b = config(&lab, "198.18.0.3", "198.18.0.2", "admin2.sock", &key);
    let a = spawn_director(&lab, "dir", &cfg_a, &[]).expect("director A");
    let mut b = spawn_director(&lab, "dir2", &cfg_b, &[]).expect("director B");

    // 1. Held connections through A appear on B, on the same reals.
    let (mut held, bodies) =
        KeepAlive::open(&lab.ns("client"), vip_addr(), 30, "/").expect("30 keep-alive connections");
    assert_eq!(bodies.len(), 30);
    let t0 = Instant::now();
    wait_for("A to count 30 active", Duration::from_secs(5), || {
        total(&status(&a)).0 == 30
    });
    let want = active(&status(&a));
    wait_for("B to show A's connections", Duration::from_secs(10), || {
        active(&status(&b)) == want
    });
    println!(
        "B shows the 30 held connections {:?} after {} ms: {:?}",
        total(&status(&b)),
        t0.elapsed().as_millis(),
        active(&status(&b))
    );
    assert_eq!(
        total(&status(&b)),
        (30, 0),
        "ActiveConn 30, nothing inactive"
    );
    // They keep working (A forwards them; B's copies changed nothing there).
    let again = held
        .request_all("/")
        .expect("requests on the held connections");
    assert_eq!(again, bodies, "every connection still on its real");

    // 2. Closing them: FIN makes them inactive on A and B, their expiry on A ends them on B.
    let t1 = Instant::now();
    held.close();
    wait_for("A's counts back to zero", Duration::from_secs(15), || {
        total(&status(&a)) == (0, 0)
    });
    wait_for("B's counts back to zero", Duration::from_secs(10), || {
        total(&status(&b)) == (0, 0)
    });
    println!(
        "after close: A and B back to zero in {} ms",
        t1.elapsed().as_millis()
    );

    // 3. B restarted with an empty table gets A's open connections by a dump.
    let (mut held, bodies) =
        KeepAlive::open(&lab.ns("client"), vip_addr(), 12, "/").expect("12 keep-alive");
    wait_for("A to count 12 active", Duration::from_secs(5), || {
        total(&status(&a)).0 == 12
    });
    let want = active(&status(&a));
    wait_for("B to follow", Duration::from_secs(10), || {
        active(&status(&b)) == want
    });
    b.stop(Duration::from_secs(5)).expect("B stops");
    drop(b);
    let t2 = Instant::now();
    let b = spawn_director(&lab, "dir2", &cfg_b, &["--fresh"]).expect("director B again");
    wait_for(
        "the restarted B to get the table by dump",
        Duration::from_secs(10),
        || active(&status(&b)) == want,
    );
    println!(
        "restarted B (--fresh) holds A's 12 connections {} ms after its start",
        t2.elapsed().as_millis()
    );
    assert!(
        b.log().contains("connection sync started"),
        "B's sync is running"
    );
    assert!(
        a.log()
            .contains("sent the connection table to the sync peer"),
        "A answered a dump request:\n{}",
        a.log()
    );
    assert_eq!(held.request_all("/").expect("still working"), bodies);
    held.close();
    wait_for(
        "B's counts back to zero again",
        Duration::from_secs(20),
        || total(&status(&b)) == (0, 0),
    );
}
