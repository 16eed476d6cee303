//! End to end, issue 11 item 3 (ICMP for tracked flows): a client behind a router whose link to
//! it has a small MTU (`lab.sh far-up`: 1280) downloads 4 MiB from a real through the director
//! (DR, and NAT). The real's 1500-byte segments (DF set) are too big for the router, which sends
//! "fragmentation needed" to their source, the VIP, so to the director; the director must pass
//! it to the real, whose TCP then lowers its path MTU. Without that the download stalls (a PMTU
//! black hole: TCP retransmits full-size segments forever). Needs root.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{lab_config_port, spawn_xdpvs, Lab};
use xdpvs::admin::Status;

const PORT: u16 = 9000;
const SIZE: usize = 4 << 20;
const PATH_MTU: u32 = 1280;

fn status(d: &common::Daemon) -> Status {
    let out = d.admin(&["list", "--json"]).expect("xdpvs list --json");
    serde_json::from_str(&out).expect("list --json parses")
}

#[test]
#[ignore = "needs root"]
fn a_client_behind_a_small_path_mtu_completes_a_large_download() {
    if !common::require_root("a_client_behind_a_small_path_mtu_completes_a_large_download") {
        return;
    }
    let lab = Lab::up("xp1", 1).expect("lab up");
    download(&lab, false);
}

/// The same through NAT (VIP port 9000 -> real port 9001): the router quotes the translated
/// reply (from VIP:9000), and the real gets the error about its own packet (from :9001).
#[test]
#[ignore = "needs root"]
fn a_client_behind_a_small_path_mtu_completes_a_large_download_through_nat() {
    if !common::require_root(
        "a_client_behind_a_small_path_mtu_completes_a_large_download_through_nat",
    ) {
        return;
    }
    let lab = Lab::up_nat("xp2", 1).expect("lab up");
    download(&lab, true);
}

fn download(lab: &Lab, nat: bool) {
    lab.far_up(PATH_MTU).expect("far client behind a router");
    let real_port = if nat { PORT + 1 } else { PORT };
    // The real serves SIZE bytes to each connection on PORT (bound in its namespace; DR delivers
    // to the VIP on its lo).
    let listener = lab.in_ns("r1", || {
        TcpListener::bind(("0.0.0.0", real_port)).expect("bind")
    });
    std::thread::spawn(move || {
        for c in listener.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let _ = c.write_all(&vec![0x5a; SIZE]);
            });
        }
    });
    let extra = format!(
        "forwarding = \"{}\"\n[service.check]\ntype = \"none\"\n",
        if nat { "nat" } else { "dr" }
    );
    let config = lab_config_port(lab, &[1], &extra, real_port)
        .replace("198.18.0.100:80\"", &format!("198.18.0.100:{PORT}\""));
    let d = spawn_xdpvs(lab, &config).expect("xdpvs starts");
    let far = lab.ns("far");
    let t = Instant::now();
    let got = common::in_netns(&far, || -> std::io::Result<usize> {
        let vip: SocketAddr = format!("198.18.0.100:{PORT}").parse().unwrap();
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
    let from = if nat { "198.18.0.11" } else { "198.18.0.100" };
    let st = status(&d);
    let icmp = st.dataplane.get("icmp_to_real").copied().unwrap_or(0);
    let route = lab
        .exec_ok("r1", &["ip", "route", "get", "198.19.0.1", "from", from])
        .unwrap_or_default();
    println!(
        "download ({}) through a {PATH_MTU}-byte path: {got:?} bytes in {elapsed:?}; icmp_to_real \
         {icmp}; the real's route: {}",
        if nat { "nat" } else { "dr" },
        route.trim()
    );
    assert_eq!(
        got.expect("the download completes (no PMTU black hole)"),
        SIZE
    );
    assert!(
        icmp >= 1,
        "the router's error reached the real through the director"
    );
    assert!(
        route.contains(&format!("mtu {PATH_MTU}")),
        "the real learnt the path MTU: {route}"
    );
}
