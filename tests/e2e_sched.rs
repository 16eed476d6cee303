//! The hashing schedulers end to end: real daemons in a netns lab, their pinned maps read back.
//! Needs root.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{
    io_error_kind, lab_config, real_of, spawn_director, spawn_xdpvs, spawn_xdpvs_with, vip_addr,
    KeepAlive, Lab,
};
use xdpvs::dataplane::Maps;

/// Every lookup table a pinned dataplane holds, by service key, with the real set naming it
/// (slot weights, table block and size) and the table's bytes.
fn tables(pin_dir: &Path) -> Vec<(String, Vec<u32>, u32, Vec<u8>)> {
    let maps = Maps::open_pinned(pin_dir).expect("open the pinned maps");
    let view = maps.view().expect("read the maps");
    let mut out: Vec<_> = view
        .services
        .iter()
        .map(|(k, s)| {
            let set = maps.realset(s.realset).expect("real set");
            let weights = set.slots[..set.count as usize]
                .iter()
                .map(|x| x.weight)
                .collect();
            let table = maps.table(set.table_block, set.table_size).expect("table");
            (
                format!("VIP port {}", u16::from_be(k.port)),
                weights,
                set.table_size,
                table,
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
#[ignore = "needs root"]
fn two_directors_started_with_one_config_hold_identical_tables() {
    if !common::require_root("two_directors_started_with_one_config_hold_identical_tables") {
        return;
    }
    let lab = Lab::up_pair("xsc", 3).expect("lab up");
    let extra = "scheduler = \"mh\"\n";
    // A second, sh service on port 81 on the same reals (sh_fallback, a weight-0 real).
    let more = |cfg: String| {
        format!(
            "{cfg}\n[[service]]\nname = \"src\"\naddress = \"198.18.0.100:81\"\nscheduler = \"sh\"\nsh_fallback = true\n\
             [[service.real]]\naddress = \"198.18.0.11:81\"\nweight = 3\n\
             [[service.real]]\naddress = \"198.18.0.12:81\"\nweight = 0\n\
             [[service.real]]\naddress = \"198.18.0.13:81\"\nweight = 1\n"
        )
    };
    let cfg_a = more(lab_config(&lab, &[1, 2, 3], extra));
    let sock2 = lab.dir.join("admin2.sock");
    let cfg_b = cfg_a.replace(
        &lab.dir.join("admin.sock").display().to_string(),
        &sock2.display().to_string(),
    );
    let mut a = spawn_director(&lab, "dir", &cfg_a, &["--fresh"]).expect("director A");
    let mut b = spawn_director(&lab, "dir2", &cfg_b, &["--fresh"]).expect("director B");
    let pins = |host: &str| PathBuf::from(format!("/sys/fs/bpf/xdpvs/{}/d0", lab.ns(host)));
    let ta = tables(&pins("dir"));
    let tb = tables(&pins("dir2"));
    assert_eq!(ta.len(), 2, "two services");
    for ((ka, wa, sa, xa), (kb, wb, sb, xb)) in ta.iter().zip(&tb) {
        assert_eq!((ka, wa, sa), (kb, wb, sb));
        assert_eq!(xa.len(), *sa as usize);
        assert!(xa == xb, "{ka}: the directors' tables differ");
        let mut per_slot = vec![0usize; wa.len()];
        for e in xa {
            per_slot[*e as usize] += 1;
        }
        println!("{ka}: {sa} entries, identical on both directors; entries per real {per_slot:?}");
    }
    a.stop(std::time::Duration::from_secs(5)).expect("stop A");
    b.stop(std::time::Duration::from_secs(5)).expect("stop B");
}

#[test]
#[ignore = "needs root"]
fn under_mh_held_connections_survive_a_fresh_restart() {
    if !common::require_root("under_mh_held_connections_survive_a_fresh_restart") {
        return;
    }
    let lab = Lab::up("xsm", 3).expect("lab up");
    let cfg = lab_config(&lab, &[1, 2, 3], "scheduler = \"mh\"\n");
    let mut d = spawn_xdpvs(&lab, &cfg).expect("daemon");
    let n = 60;
    let (mut held, bodies) =
        KeepAlive::open(&lab.ns("client"), vip_addr(), n, "/").expect("keep-alive connections");
    let before: Vec<Option<usize>> = bodies.iter().map(|b| real_of(b)).collect();
    let mut spread = [0usize; 4];
    for r in before.iter().flatten() {
        spread[*r] += 1;
    }
    // The daemon dies and a new one starts clean: every connection entry is gone.
    d.signal(libc::SIGKILL).expect("kill");
    let _ = d.stop(Duration::from_secs(2));
    let mut d = spawn_xdpvs_with(&lab, &cfg, &["--fresh"]).expect("fresh daemon");
    let after = held.try_request_all("/");
    let kept = after
        .iter()
        .zip(&before)
        .filter(|(r, b)| matches!(r, Ok(body) if real_of(body) == **b))
        .count();
    println!(
        "mh 1:2:3: {kept}/{n} keep-alive connections opened before a kill and a --fresh restart \
         kept working on their real (reals 1..3 held {:?})",
        &spread[1..]
    );
    let st: xdpvs::admin::Status =
        serde_json::from_str(&d.admin(&["list", "--json"]).expect("list")).expect("json");
    println!(
        "hash_recovered {}, miss_reset {}",
        st.dataplane["hash_recovered"], st.dataplane["miss_reset"]
    );
    assert_eq!(
        st.dataplane["hash_recovered"], n as u64,
        "each recovery counted"
    );
    for (i, r) in after.iter().enumerate() {
        if let Err(e) = r {
            panic!("connection {i} lost: {e:#}");
        }
    }
    assert_eq!(kept, n);
    d.stop(Duration::from_secs(5)).expect("stop");
    held.close();
}

#[test]
#[ignore = "needs root"]
fn under_wlc_a_lost_connection_is_reset_within_a_second() {
    if !common::require_root("under_wlc_a_lost_connection_is_reset_within_a_second") {
        return;
    }
    let lab = Lab::up("xsw", 2).expect("lab up");
    let cfg = lab_config(&lab, &[1, 1], "");
    let mut d = spawn_xdpvs(&lab, &cfg).expect("daemon");
    let (mut held, _) =
        KeepAlive::open(&lab.ns("client"), vip_addr(), 4, "/").expect("keep-alive connections");
    d.signal(libc::SIGKILL).expect("kill");
    let _ = d.stop(Duration::from_secs(2));
    let mut d = spawn_xdpvs_with(&lab, &cfg, &["--fresh"]).expect("fresh daemon");
    for i in 0..held.len() {
        let t0 = Instant::now();
        let r = held.request(i, "/");
        let took = t0.elapsed();
        let e = r.expect_err("a lost connection must fail");
        println!(
            "wlc, connection {i} lost by --fresh: failed after {} ms ({:?})",
            took.as_millis(),
            io_error_kind(&e)
        );
        assert_eq!(
            io_error_kind(&e),
            Some(std::io::ErrorKind::ConnectionReset),
            "reset, not a timeout: {e:#}"
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
    let st: xdpvs::admin::Status =
        serde_json::from_str(&d.admin(&["list", "--json"]).expect("list")).expect("json");
    assert!(
        st.dataplane["miss_reset"] >= held.len() as u64,
        "each reset counted: {:?}",
        st.dataplane
    );
    d.stop(Duration::from_secs(5)).expect("stop");
}

#[test]
#[ignore = "needs root"]
fn a_restarted_daemon_adopts_the_tables_and_writes_nothing() {
    if !common::require_root("a_restarted_daemon_adopts_the_tables_and_writes_nothing") {
        return;
    }
    let lab = Lab::up("xsa", 3).expect("lab up");
    let cfg = format!(
        "{}\n[[service]]\nname = \"src\"\naddress = \"198.18.0.100:81\"\nscheduler = \"sh\"\nsh_port = true\n\
         [[service.real]]\naddress = \"198.18.0.11:81\"\n[[service.real]]\naddress = \"198.18.0.12:81\"\n",
        lab_config(&lab, &[1, 2, 3], "scheduler = \"mh\"\nmh_table_size = 4093\n")
    );
    let mut d = spawn_xdpvs_with(&lab, &cfg, &["--fresh"]).expect("daemon");
    let pins = PathBuf::from(format!("/sys/fs/bpf/xdpvs/{}/d0", lab.ns("dir")));
    let before = tables(&pins);
    d.signal(libc::SIGKILL).expect("kill");
    let _ = d.stop(Duration::from_secs(2));
    let mut d = spawn_xdpvs(&lab, &cfg).expect("restart");
    let log = d.log();
    assert!(log.contains("adopted the pinned dataplane"), "{log}");
    assert!(
        log.contains("map_writes=0"),
        "an unchanged config writes nothing:\n{log}"
    );
    assert!(
        tables(&pins) == before,
        "the tables changed across the restart"
    );
    println!(
        "restart: adopted {} tables ({:?} entries), nothing written",
        before.len(),
        before.iter().map(|t| t.2).collect::<Vec<_>>()
    );
    d.stop(Duration::from_secs(5)).expect("stop");
}
