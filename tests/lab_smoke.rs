//! The lab itself, without the xdpvs daemon: every real answers the client directly, nginx can be
//! stopped and started, the VIP belongs to the director (reals never answer ARP for it), and
//! teardown leaves nothing behind. Root only (skips loudly otherwise).
//!
//! `cargo test --test lab_smoke -- --nocapture`

mod common;

use std::io::ErrorKind;
use std::time::Instant;

use common::*;

const PREFIX: &str = "xls";
const REALS: usize = 3;

fn mac_of(lab: &Lab, ns: &str, dev: &str) -> String {
    let out = lab.exec_ok(ns, &["ip", "-o", "link", "show", dev]).unwrap();
    let mut words = out.split_whitespace();
    words.find(|w| *w == "link/ether").expect("link/ether");
    words.next().expect("mac").to_string()
}

#[test]
#[ignore = "needs root"]
fn lab_smoke() {
    if !require_root("lab_smoke") {
        return;
    }
    let t = Instant::now();
    let lab = Lab::up(PREFIX, REALS).expect("lab up");
    eprintln!("lab up ({REALS} reals) in {:?}", t.elapsed());
    let mut names = lab.namespaces();
    names.sort();
    assert_eq!(
        names,
        ["xlsclient", "xlsdir", "xlsr1", "xlsr2", "xlsr3", "xlssw"]
    );
    let client = lab.ns("client");

    // Every real answers the client directly, on / and /health.
    for i in 1..=REALS {
        let body = in_netns(&client, || http_get_new_conn(real_addr(i), "/")).unwrap();
        assert_eq!(body, format!("r{i}\n"));
        assert_eq!(real_of(&body), Some(i));
        let health = in_netns(&client, || http_get_new_conn(real_addr(i), "/health")).unwrap();
        assert_eq!(health, "OK\n");
    }

    // Keep-alive connections held from the client namespace, used later from this thread.
    let (mut ka, first) = KeepAlive::open(&client, real_addr(1), 20, "/").unwrap();
    assert!(first.iter().all(|b| b == "r1\n"), "{first:?}");
    assert!(ka
        .local_addrs()
        .iter()
        .all(|a| a.ip() == std::net::IpAddr::V4(CLIENT_IP)));

    // Stop nginx on r2: refused; the others still answer; start it again: answers.
    lab.stop_nginx(2).unwrap();
    let err = in_netns(&client, || http_get_new_conn(real_addr(2), "/")).unwrap_err();
    assert_eq!(
        io_error_kind(&err),
        Some(ErrorKind::ConnectionRefused),
        "{err:#}"
    );
    for i in [1, 3] {
        assert_eq!(
            in_netns(&client, || http_get_new_conn(real_addr(i), "/")).unwrap(),
            format!("r{i}\n")
        );
    }
    lab.start_nginx(2).unwrap();
    assert_eq!(
        in_netns(&client, || http_get_new_conn(real_addr(2), "/")).unwrap(),
        "r2\n"
    );

    let again = ka.request_all("/").unwrap();
    assert!(again.iter().all(|b| b == "r1\n"), "{again:?}");
    ka.close();

    // Without the daemon the director owns the VIP but nothing listens: refused by the
    // director, and the client's ARP entry for the VIP is the director's d0 (not a real).
    let err = lab.curl("/").unwrap_err();
    assert!(
        format!("{err:#}").contains("exit status: 7"),
        "expected refused: {err:#}"
    );
    let neigh = lab
        .exec_ok("client", &["ip", "neigh", "show", &VIP.to_string()])
        .unwrap();
    let d0 = mac_of(&lab, "dir", "d0");
    assert!(
        neigh.contains(&d0),
        "VIP neighbour {neigh:?} is not the director's d0 {d0}"
    );
    for i in 1..=REALS {
        let m = mac_of(&lab, &format!("r{i}"), "eth0");
        assert!(
            !neigh.contains(&m),
            "real r{i} answered ARP for the VIP: {neigh:?}"
        );
    }
    // curl via the helper works against a real URL.
    assert_eq!(
        lab.curl_url(&format!("http://{}/", real_ip(3))).unwrap(),
        "r3\n"
    );

    let t = Instant::now();
    drop(lab);
    eprintln!("lab down in {:?}", t.elapsed());
    assert!(
        netns_with_prefix(PREFIX).is_empty(),
        "left behind: {:?}",
        netns_with_prefix(PREFIX)
    );
    assert!(
        !std::path::Path::new("/tmp/xlslab").exists(),
        "/tmp/xlslab left behind"
    );
}
