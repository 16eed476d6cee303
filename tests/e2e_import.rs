//! End to end, issue 14 (switching from LVS): an `ldirectord.cf` and a `keepalived.conf` written
//! for the lab's reals are imported with `xdpvs import`, and the real daemon runs each result
//! and serves the client, spreading new connections over the reals by the imported weights and
//! taking a stopped real out with the imported HTTP check. Needs root; run under the lab lock.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{http_get_new_conn, real_of, spawn_xdpvs_with, vip_addr, Lab};

const LDIRECTORD: &str = "\
checktimeout=1
checkinterval=1
failurecount=2
quiescent=yes
virtual=198.18.0.100:80
\tservicename=web
\treal=198.18.0.11:80 gate 1
\treal=198.18.0.12:80 gate 2
\treal=198.18.0.13:80 gate 3
\tservice=http
\tscheduler=wrr
\tprotocol=tcp
\tchecktype=negotiate
\trequest=\"health\"
\treceive=\"OK\"
";

const KEEPALIVED: &str = "\
global_defs {
   router_id LAB
}
virtual_server 198.18.0.100 80 {
    delay_loop 1
    lb_algo wrr
    lb_kind DR
    protocol TCP
    real_server 198.18.0.11 80 {
        weight 1
        inhibit_on_failure
        HTTP_GET {
            url {
              path /health
              status_code 200
            }
            connect_timeout 1
            retry 1
        }
    }
    real_server 198.18.0.12 80 {
        weight 2
        inhibit_on_failure
        HTTP_GET {
            url {
              path /health
              status_code 200
            }
            connect_timeout 1
            retry 1
        }
    }
    real_server 198.18.0.13 80 {
        weight 3
        inhibit_on_failure
        HTTP_GET {
            url {
              path /health
              status_code 200
            }
            connect_timeout 1
            retry 1
        }
    }
}
";

/// `xdpvs import FROM` of `text`, made runnable in the lab: the director's interface, metrics
/// off, the lab's admin socket.
fn import(lab: &Lab, from: &str, text: &str) -> String {
    let path = lab.dir.join(format!("{from}.conf"));
    std::fs::create_dir_all(&lab.dir).expect("lab dir");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_xdpvs"))
        .args(["import", from])
        .arg(&path)
        .output()
        .expect("xdpvs import");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{from} warnings:\n{}", String::from_utf8_lossy(&out.stderr));
    let toml = String::from_utf8(out.stdout).expect("utf-8");
    assert!(toml.contains("interface = \"eth0\""), "{toml}");
    toml.replacen(
        "interface = \"eth0\"",
        &format!(
            "interface = \"d0\"\nmetrics = \"off\"\nadmin_socket = \"{}\"",
            lab.dir.join("admin.sock").display()
        ),
        1,
    )
}

/// `n` new connections from the client: requests per real.
fn spread(lab: &Lab, n: usize) -> BTreeMap<usize, usize> {
    let mut got = BTreeMap::new();
    for _ in 0..n {
        let body = lab
            .in_ns(&lab.ns("client"), || http_get_new_conn(vip_addr(), "/"))
            .expect("a request through the VIP");
        *got.entry(real_of(&body).expect("a real answered"))
            .or_insert(0) += 1;
    }
    got
}

fn serves_by_weight_and_drops_a_dead_real(lab: &Lab, from: &str, text: &str) {
    let config = import(lab, from, text);
    // Fresh: the first run's pinned dataplane (real 2 quiesced at its end) is not adopted.
    let d = spawn_xdpvs_with(lab, &config, &["--fresh"]).expect("xdpvs runs the imported config");
    let t0 = Instant::now();
    while d.list().unwrap_or_default().contains(" down ") {
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "{from}: reals not up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = spread(lab, 120);
    println!("{from}: 120 new connections: {got:?}");
    // wrr 1:2:3 over 120 new connections: 20 / 40 / 60.
    for (real, want) in [(1, 20), (2, 40), (3, 60)] {
        let n = got.get(&real).copied().unwrap_or(0);
        assert!(
            n.abs_diff(want) <= 3,
            "{from}: real {real} got {n} of 120, want about {want}"
        );
    }
    lab.stop_nginx(2).expect("stop nginx on real 2");
    let t0 = Instant::now();
    loop {
        let l = d.list().unwrap_or_default();
        if l.lines()
            .any(|x| x.contains("198.18.0.12:80") && x.contains(" down "))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(6),
            "{from}: real 2 not taken out:\n{l}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{from}: real 2 down after {:?}", t0.elapsed());
    let got = spread(lab, 40);
    assert!(
        !got.contains_key(&2),
        "{from}: the dead real got traffic: {got:?}"
    );
    lab.start_nginx(2).expect("start nginx again");
}

#[test]
#[ignore = "needs root"]
fn imported_ldirectord_and_keepalived_configs_run_and_serve() {
    if !common::require_root("imported_ldirectord_and_keepalived_configs_run_and_serve") {
        return;
    }
    let lab = Lab::up("xim", 3).expect("lab");
    serves_by_weight_and_drops_a_dead_real(&lab, "ldirectord", LDIRECTORD);
    serves_by_weight_and_drops_a_dead_real(&lab, "keepalived", KEEPALIVED);
}
