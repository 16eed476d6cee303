//! The real XDP program on crafted frames, through BPF_PROG_TEST_RUN: a table of named cases
//! (frame in, verdict and frame out, map state after), like a spec of the packet path.
//! Needs root (loads BPF, creates a network namespace per test).

mod common;
#[path = "support/dpnet.rs"]
mod dpnet;
#[path = "support/packet.rs"]
mod packet;

use dpnet::{
    service, service6_on, service_on, DpNet, Harness, VIP, VIP6, XDP_DROP, XDP_PASS, XDP_TX,
};
use packet::{
    ext_fragment, ext_opts, ext_routing, Frame, Frame6, ACK, DIRECTOR_MAC, FIN, PSH, RST, SYN,
};
use xdpvs_common::stat;

const CLIENT: &str = "198.18.0.1";
const CLIENT6: &str = "2001:2::1";

fn syn(sport: u16) -> Frame {
    Frame::tcp(CLIENT, sport, VIP, 80, SYN)
}

#[test]
#[ignore = "needs root"]
fn vip_syn_is_sent_to_the_real_mac_and_nothing_else_changes() {
    if !common::require_root("vip_syn_is_sent_to_the_real_mac_and_nothing_else_changes") {
        return;
    }
    let net = DpNet::new("syn", 1);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![service(&[(1, 1)])]);
        let input = syn(40000).build();
        let out = h.run(&input);
        assert_eq!(out.action, XDP_TX, "VIP SYN must be sent back out");
        assert_eq!(
            &out.frame[0..6],
            &dpnet::real_mac(1),
            "destination MAC = real's"
        );
        assert_eq!(&out.frame[6..12], &DIRECTOR_MAC, "source MAC = director's");
        assert_eq!(
            &out.frame[12..],
            &input[12..],
            "IP packet untouched in DR mode"
        );
        let stats = h.dp.stats().unwrap();
        assert_eq!(stats[stat::TX as usize], 1);
        assert_eq!(stats[stat::NEW_CONN as usize], 1);
    });
}

#[test]
#[ignore = "needs root"]
fn vlan_tagged_vip_syn_is_forwarded() {
    if !common::require_root("vlan_tagged_vip_syn_is_forwarded") {
        return;
    }
    let net = DpNet::new("vlan", 1);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![service(&[(1, 1)])]);
        let mut f = syn(40001);
        f.vlan = Some(7);
        let input = f.build();
        let out = h.run(&input);
        assert_eq!(out.action, XDP_TX);
        assert_eq!(Harness::real_of(&out.frame), Some(1));
        assert_eq!(&out.frame[12..], &input[12..]);
    });
}

#[test]
#[ignore = "needs root"]
fn traffic_not_for_a_service_is_passed_unchanged() {
    if !common::require_root("traffic_not_for_a_service_is_passed_unchanged") {
        return;
    }
    let net = DpNet::new("pass", 1);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![service(&[(1, 1)])]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "other address",
                Frame::tcp(CLIENT, 1, "198.18.0.2", 80, SYN).build(),
            ),
            (
                "other port on the VIP",
                Frame::tcp(CLIENT, 1, VIP, 22, SYN).build(),
            ),
            (
                "UDP to the VIP port (service is TCP)",
                Frame::udp(CLIENT, 1, VIP, 80).build(),
            ),
            ("ARP", packet::arp()),
            ("IPv6", packet::ipv6_syn()),
        ];
        for (name, input) in cases {
            let out = h.run(&input);
            assert_eq!(out.action, XDP_PASS, "{name}: must be passed");
            assert_eq!(out.frame, input, "{name}: must be unchanged");
        }
        assert_eq!(h.dp.connections().len(), 0, "nothing tracked");
    });
}

#[test]
#[ignore = "needs root"]
fn truncated_and_malformed_frames_are_never_forwarded() {
    if !common::require_root("truncated_and_malformed_frames_are_never_forwarded") {
        return;
    }
    let net = DpNet::new("trunc", 1);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![service(&[(1, 1)])]);
        let full = syn(40002).build();
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
        for len in 14..full.len() {
            let out = h.run(&full[..len]);
            assert_ne!(out.action, XDP_TX, "truncated to {len} bytes: forwarded");
            assert!(out.action == XDP_DROP || out.action == XDP_PASS);
        }
        let mut bad: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut f = full.clone();
        f[14] = 0x44; // IHL 4 (< 5)
        bad.push(("ihl < 5", f));
        let mut f = full.clone();
        f[14] = 0x65; // version 6 in an IPv4 ethertype
        bad.push(("wrong version", f));
        let mut f = full.clone();
        f[16..18].copy_from_slice(&200u16.to_be_bytes()); // total length beyond the frame
        bad.push(("total length past the frame", f));
        let mut f = full.clone();
        f[16..18].copy_from_slice(&10u16.to_be_bytes()); // total length < header
        bad.push(("total length < header", f));
        let mut f = full.clone();
        f[14 + 20 + 12] = 0x40; // TCP data offset 4 (< 5)
        bad.push(("tcp doff < 5", f));
        for (name, input) in bad {
            let out = h.run(&input);
            assert_eq!(out.action, XDP_DROP, "{name}: must be dropped");
        }
        let stats = h.dp.stats().unwrap();
        assert!(
            stats[stat::MALFORMED as usize] >= 5,
            "malformed frames are counted"
        );
        assert_eq!(stats[stat::TX as usize], 0);
        assert_eq!(h.dp.connections().len(), 0);
    });
}

#[test]
#[ignore = "needs root"]
fn every_packet_of_a_flow_goes_to_one_real_even_after_weights_change() {
    if !common::require_root("every_packet_of_a_flow_goes_to_one_real_even_after_weights_change") {
        return;
    }
    let net = DpNet::new("flow", 3);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![service(&[(1, 1), (2, 1), (3, 1)])]);
        let mut owners = Vec::new();
        for sport in 41000..41030u16 {
            let out = h.run(&syn(sport).build());
            assert_eq!(out.action, XDP_TX);
            owners.push(Harness::real_of(&out.frame).unwrap());
        }
        // Re-weight so that every real's choice would differ for a new flow.
        h.apply(vec![service(&[(1, 0), (2, 5), (3, 1)])]);
        for (i, sport) in (41000..41030u16).enumerate() {
            for flags in [ACK, ACK | PSH, ACK, FIN | ACK] {
                let out = h.run(&Frame::tcp(CLIENT, sport, VIP, 80, flags).build());
                assert_eq!(out.action, XDP_TX);
                assert_eq!(
                    Harness::real_of(&out.frame),
                    Some(owners[i]),
                    "flow {sport} moved"
                );
            }
        }
    });
}

#[test]
#[ignore = "needs root"]
fn weight_zero_real_never_gets_a_new_flow() {
    if !common::require_root("weight_zero_real_never_gets_a_new_flow") {
        return;
    }
    let net = DpNet::new("w0", 3);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![service(&[(1, 1), (2, 0), (3, 1)])]);
        for sport in 42000..42100u16 {
            let out = h.run(&syn(sport).build());
            assert_eq!(out.action, XDP_TX);
            assert_ne!(
                Harness::real_of(&out.frame),
                Some(2),
                "weight-0 real chosen"
            );
        }
        // All weights 0 and no fallback: new connections are dropped, counted.
        h.apply(vec![service(&[(1, 0), (2, 0), (3, 0)])]);
        let out = h.run(&syn(42100).build());
        assert_eq!(out.action, XDP_DROP);
        assert_eq!(h.dp.stats().unwrap()[stat::DROP_NO_REAL as usize], 1);
    });
}

#[test]
#[ignore = "needs root"]
fn fallback_takes_new_flows_only_while_no_real_can() {
    if !common::require_root("fallback_takes_new_flows_only_while_no_real_can") {
        return;
    }
    let net = DpNet::new("fb", 3);
    net.run(|| {
        let mut h = Harness::new();
        let mut s = service(&[(1, 0), (2, 0)]);
        s.fallback = Some(std::net::SocketAddr::new(dpnet::real_ip(3).into(), 80));
        h.apply(vec![s.clone()]);
        let out = h.run(&syn(42500).build());
        assert_eq!(
            Harness::real_of(&out.frame),
            Some(3),
            "fallback while none is up"
        );
        s.reals[1].weight = 1;
        h.apply(vec![s]);
        let out = h.run(&syn(42501).build());
        assert_eq!(
            Harness::real_of(&out.frame),
            Some(2),
            "a real is back: not the fallback"
        );
    });
}

#[test]
#[ignore = "needs root"]
fn wlc_spreads_new_flows_by_weight_and_counts_ipvs_style() {
    if !common::require_root("wlc_spreads_new_flows_by_weight_and_counts_ipvs_style") {
        return;
    }
    let net = DpNet::new("wlc", 3);
    net.run(|| {
        let mut h = Harness::new();
        let s = service(&[(1, 1), (2, 2), (3, 3)]);
        h.apply(vec![s.clone()]);
        let mut per_real = [0usize; 4];
        for sport in 43000..43060u16 {
            let out = h.run(&syn(sport).build());
            per_real[Harness::real_of(&out.frame).unwrap()] += 1;
        }
        // Every flow is in SYN state (inactive, load 1): WLC keeps load/weight level.
        assert_eq!(&per_real[1..], &[10, 20, 30]);
        assert_eq!(h.conns(1, &s), (0, 10));
        assert_eq!(h.conns(3, &s), (0, 30));
        // Established connections weigh 256 inactive ones.
        for sport in 43000..43060u16 {
            h.run(&Frame::tcp(CLIENT, sport, VIP, 80, ACK).build());
        }
        assert_eq!(h.conns(1, &s), (10, 0));
        assert_eq!(h.conns(2, &s), (20, 0));
        assert_eq!(h.conns(3, &s), (30, 0));
    });
}

#[test]
#[ignore = "needs root"]
fn counts_follow_the_tcp_lifecycle_and_expiry_returns_them_to_zero() {
    if !common::require_root("counts_follow_the_tcp_lifecycle_and_expiry_returns_them_to_zero") {
        return;
    }
    let net = DpNet::new("life", 1);
    net.run(|| {
        let mut h = Harness::new();
        let s = service(&[(1, 1)]);
        h.apply(vec![s.clone()]);
        let f = |flags| Frame::tcp(CLIENT, 44000, VIP, 80, flags).build();
        h.run(&f(SYN));
        assert_eq!(h.conns(1, &s), (0, 1), "SYN: inactive");
        h.run(&f(SYN));
        assert_eq!(h.conns(1, &s), (0, 1), "retransmitted SYN: counted once");
        let tables = |h: &Harness| (h.dp.established_table().len(), h.dp.embryonic_table().len());
        assert_eq!(tables(&h), (0, 1), "half-open: in the embryonic table only");
        assert_eq!(h.raw_conns(1, &s), (0, 0, 1), "counted as embryonic");
        h.run(&f(ACK));
        assert_eq!(h.conns(1, &s), (1, 0), "handshake ACK: active");
        assert_eq!(tables(&h), (1, 0), "the ACK promotes it");
        assert_eq!(h.raw_conns(1, &s), (1, 0, 0));
        assert_eq!(h.dp.stats().unwrap()[stat::EMBRYO_PROMOTED as usize], 1);
        h.run(&f(ACK | PSH));
        assert_eq!(h.conns(1, &s), (1, 0));
        h.run(&f(FIN | ACK));
        assert_eq!(h.conns(1, &s), (0, 1), "FIN: inactive");
        // Not idle yet (default 120 s): the sweep keeps it.
        let r = h.dp.sweep().unwrap();
        assert_eq!((r.entries, r.retired), (1, 0), "{r:?}");
        assert_eq!(h.conns(1, &s), (0, 1));
        // A new SYN on the closing tuple is a new connection, counted once.
        h.run(&f(SYN));
        assert_eq!(h.conns(1, &s), (0, 1));
        assert_eq!(h.dp.connections().len(), 1);
        // RST closes; then an idle timeout of zero expires everything.
        h.run(&f(RST));
        assert_eq!(h.conns(1, &s), (0, 1));
        let zero = std::time::Duration::ZERO;
        h.apply_desired(&xdpvs::state::Desired {
            services: vec![s.clone()],
            timeouts: xdpvs::config::Timeouts {
                tcp_established: zero,
                tcp_fin: zero,
                tcp_syn: zero,
                tcp_close: zero,
                udp: zero,
            },
            sync: false,
        });
        assert_eq!(h.dp.sweep().unwrap().retired, 1);
        assert_eq!(h.conns(1, &s), (0, 0));
        assert_eq!(h.dp.connections().len(), 0);
        // Mid-flow packets of an unknown flow are never guessed to a real (wlc): the client
        // gets a RST (an RST itself is dropped).
        let g = |flags| Frame::tcp(CLIENT, 44000, VIP, 80, flags);
        let seg = g(ACK).seq_ack(5000, 777_000).payload(10).build();
        let out = h.run(&seg);
        assert_eq!(out.action, XDP_TX);
        packet::check_reset(&seg, &out.frame).unwrap();
        assert_eq!(h.dp.stats().unwrap()[stat::MISS_RESET as usize], 1);
        let seg = g(FIN).seq_ack(5000, 0).payload(3).build();
        let out = h.run(&seg);
        assert_eq!(out.action, XDP_TX);
        packet::check_reset(&seg, &out.frame).unwrap();
        assert_eq!(h.run(&f(RST)).action, XDP_DROP);
        assert_eq!(h.dp.stats().unwrap()[stat::DROP_NO_CONN as usize], 1);
        assert_eq!(h.dp.connections().len(), 0, "nothing tracked");
    });
}

#[test]
#[ignore = "needs root"]
fn counts_stay_exact_under_concurrent_cpus() {
    if !common::require_root("counts_stay_exact_under_concurrent_cpus") {
        return;
    }
    let net = DpNet::new("cpu", 3);
    net.run(|| {
        let mut h = Harness::new();
        let s = service(&[(1, 1), (2, 1), (3, 1)]);
        h.apply(vec![s.clone()]);
        const FLOWS: u16 = 1500;
        // Two threads replay the same flows' packets at once (as two CPUs would see a
        // retransmission), so every entry's transitions race.
        let h = &h;
        std::thread::scope(|sc| {
            for t in 0..2 {
                sc.spawn(move || {
                    for i in 0..FLOWS {
                        let sport = 20000 + if t == 0 { i } else { FLOWS - 1 - i };
                        for flags in [SYN, ACK, ACK | PSH] {
                            h.run(&Frame::tcp(CLIENT, sport, VIP, 80, flags).build());
                        }
                        if i % 3 == 0 {
                            h.run(&Frame::tcp(CLIENT, sport, VIP, 80, FIN | ACK).build());
                        }
                    }
                });
            }
        });
        // Truth from the table itself.
        let mut truth = std::collections::HashMap::<u32, (u64, u64)>::new();
        for (_, c) in h.dp.connections() {
            let e = truth.entry(c.real).or_default();
            if xdpvs_common::state::is_active(c.state) {
                e.0 += 1;
            } else {
                e.1 += 1;
            }
        }
        let mut total = (0, 0);
        for n in 1..=3 {
            let id = h
                .planner
                .real_id(
                    &s.key,
                    std::net::SocketAddr::new(dpnet::real_ip(n).into(), 80),
                )
                .unwrap();
            let counted = h.conns(n, &s);
            assert_eq!(
                counted,
                truth.get(&id).copied().unwrap_or_default(),
                "real {n}"
            );
            total.0 += counted.0;
            total.1 += counted.1;
        }
        // One entry per flow (the final state of each depends on the interleaving: a SYN
        // replayed after the other thread's FIN reopens the tuple).
        assert_eq!(h.dp.connections().len(), FLOWS as usize);
        assert_eq!(total.0 + total.1, FLOWS as u64);
        assert!(
            total.0 > 0 && total.1 > 0,
            "both states exercised: {total:?}"
        );
        // Forced retirement of everything returns all counts to zero.
        for (k, _) in h.dp.connections() {
            h.dp.expire(k, true).unwrap();
        }
        for n in 1..=3 {
            assert_eq!(h.conns(n, &s), (0, 0), "real {n} after expiry");
        }
    });
}

#[test]
#[ignore = "needs root"]
fn removed_real_with_cut_drops_its_flows_and_releases_counts() {
    if !common::require_root("removed_real_with_cut_drops_its_flows_and_releases_counts") {
        return;
    }
    let net = DpNet::new("cut", 2);
    net.run(|| {
        let mut h = Harness::new();
        let mut s = service(&[(1, 1), (2, 1)]);
        s.cut_on_remove = true;
        h.apply(vec![s.clone()]);
        let mut on2 = None;
        for sport in 45000..45010u16 {
            let out = h.run(&syn(sport).build());
            if Harness::real_of(&out.frame) == Some(2) {
                on2 = Some(sport);
            }
        }
        let sport = on2.expect("some flow on real 2");
        let id2 = h
            .planner
            .real_id(
                &s.key,
                std::net::SocketAddr::new(dpnet::real_ip(2).into(), 80),
            )
            .unwrap();
        s.reals.truncate(1);
        h.apply(vec![s.clone()]);
        let out = h.run(&Frame::tcp(CLIENT, sport, VIP, 80, ACK).build());
        assert_eq!(out.action, XDP_DROP, "flow of a cut real is dropped");
        h.dp.sweep().unwrap();
        assert_eq!(h.dp.real_conns(id2).unwrap().inactive, 0);
        assert_eq!(h.dp.real_conns(id2).unwrap().active, 0);
        assert!(h.dp.connections().iter().all(|(_, c)| c.real != id2));
    });
}

#[test]
#[ignore = "needs root"]
fn a_standby_service_forwards_nothing_and_keeps_its_connections_for_a_takeover() {
    if !common::require_root(
        "a_standby_service_forwards_nothing_and_keeps_its_connections_for_a_takeover",
    ) {
        return;
    }
    let net = DpNet::new("standby", 2);
    net.run(|| {
        let mut h = Harness::new();
        let active = service(&[(1, 1), (2, 1)]);
        h.apply(vec![active.clone()]);
        let out = h.run(&syn(47000).build());
        assert_eq!(out.action, XDP_TX);
        let owner = Harness::real_of(&out.frame).expect("forwarded to a real");
        h.run(&Frame::tcp(CLIENT, 47000, VIP, 80, ACK).build());

        // VRRP backup: the VIP is not ours. Nothing is forwarded, new or established.
        let mut standby = active.clone();
        standby.standby = true;
        h.apply(vec![standby.clone()]);
        for (name, f) in [
            ("new SYN", syn(47001).build()),
            (
                "established",
                Frame::tcp(CLIENT, 47000, VIP, 80, ACK | PSH).build(),
            ),
        ] {
            assert_eq!(h.run(&f).action, XDP_DROP, "{name} on a standby service");
        }
        let stats = h.dp.stats().unwrap();
        assert_eq!(stats[stat::DROP_STANDBY as usize], 2);
        assert_eq!(
            stats[stat::TX as usize],
            2,
            "only the frames sent while master"
        );
        assert_eq!(
            h.dp.connections().len(),
            1,
            "the held entry stays, none added"
        );
        assert_eq!(h.conns(owner, &standby), (1, 0));

        // Takeover: the held connection continues on the same real.
        h.apply(vec![active.clone()]);
        let out = h.run(&Frame::tcp(CLIENT, 47000, VIP, 80, ACK | PSH).build());
        assert_eq!(out.action, XDP_TX);
        assert_eq!(Harness::real_of(&out.frame), Some(owner));
    });
}

#[test]
#[ignore = "needs root"]
fn fragments_to_a_service_are_dropped() {
    if !common::require_root("fragments_to_a_service_are_dropped") {
        return;
    }
    let net = DpNet::new("frag", 1);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![service(&[(1, 1)]), service_on(443, &[(1, 1)])]);
        let mut f = syn(46000);
        f.frag = 0x2000; // MF, offset 0
        f.payload = 8;
        assert_eq!(h.run(&f.build()).action, XDP_DROP);
        assert_eq!(h.dp.stats().unwrap()[stat::DROP_FRAGMENT as usize], 1);
    });
}

#[test]
#[ignore = "needs root"]
fn udp_flows_are_tracked_and_stick_to_one_real() {
    if !common::require_root("udp_flows_are_tracked_and_stick_to_one_real") {
        return;
    }
    let net = DpNet::new("udp", 2);
    net.run(|| {
        let mut h = Harness::new();
        let mut s = service_on(53, &[(1, 1), (2, 1)]);
        s.key = xdpvs::state::service_key(s.address, xdpvs::config::Protocol::Udp);
        h.apply(vec![s.clone()]);
        let mut owners = Vec::new();
        for sport in 47000..47010u16 {
            let out = h.run(&Frame::udp(CLIENT, sport, VIP, 53).build());
            assert_eq!(out.action, XDP_TX);
            owners.push(Harness::real_of(&out.frame).unwrap());
        }
        for (i, sport) in (47000..47010u16).enumerate() {
            let out = h.run(&Frame::udp(CLIENT, sport, VIP, 53).build());
            assert_eq!(Harness::real_of(&out.frame), Some(owners[i]));
        }
        // UDP "connections" count as inactive, like IPVS.
        let (a1, i1) = h.conns(1, &s);
        let (a2, i2) = h.conns(2, &s);
        assert_eq!((a1 + a2, i1 + i2), (0, 10));
        // The same port over TCP is not this service.
        assert_eq!(
            h.run(&Frame::tcp(CLIENT, 1, VIP, 53, SYN).build()).action,
            XDP_PASS
        );
    });
}

#[test]
#[ignore = "needs root"]
fn real_behind_another_interface_is_reached_by_redirect() {
    if !common::require_root("real_behind_another_interface_is_reached_by_redirect") {
        return;
    }
    let net = DpNet::new("redir", 1);
    // A second link with its own subnet; the real sits there.
    let ip = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(["-n", &net.ns])
            .args(args)
            .status()
            .expect("ip");
        assert!(st.success(), "ip {args:?}");
    };
    ip(&["link", "add", "dpc", "type", "veth", "peer", "name", "dpd"]);
    ip(&["link", "set", "dpc", "up"]);
    ip(&["link", "set", "dpd", "up"]);
    ip(&["addr", "add", "198.19.0.2/24", "dev", "dpc"]);
    ip(&[
        "neigh",
        "replace",
        "198.19.0.7",
        "lladdr",
        "02:00:00:00:07:07",
        "dev",
        "dpc",
        "nud",
        "permanent",
    ]);
    net.run(|| {
        let mut h = Harness::new();
        let mut s = service(&[]);
        s.reals.push(xdpvs::state::DesiredReal {
            address: "198.19.0.7:80".parse().unwrap(),
            weight: 1,
            cut: false,
        });
        h.apply(vec![s]);
        let out = h.run(&syn(48000).build());
        const XDP_REDIRECT: u32 = 4;
        assert_eq!(out.action, XDP_REDIRECT);
        assert_eq!(&out.frame[0..6], &[0x02, 0, 0, 0, 7, 7]);
        assert_eq!(h.dp.stats().unwrap()[stat::REDIRECT as usize], 1);
    });
}

#[test]
#[ignore = "needs root"]
fn a_full_connection_table_refuses_promotions_and_keeps_counts_exact() {
    if !common::require_root("a_full_connection_table_refuses_promotions_and_keeps_counts_exact") {
        return;
    }
    let net = DpNet::new("full", 2);
    net.run(|| {
        let mut h = Harness::with_table(64);
        let s = service(&[(1, 1), (2, 1)]);
        h.apply(vec![s.clone()]);
        let mut promoted = 0u64;
        for sport in 49000..49100u16 {
            // Every SYN finds room (the embryonic table is apart); the ACK needs `CONNS`.
            assert_eq!(h.run(&syn(sport).build()).action, XDP_TX, "SYN {sport}");
            if h.run(&Frame::tcp(CLIENT, sport, VIP, 80, ACK).build())
                .action
                == XDP_TX
            {
                promoted += 1;
            }
        }
        let tracked = h.dp.established_table().len() as u64;
        assert_eq!(promoted, tracked, "every forwarded ACK is tracked");
        assert!((60..=64).contains(&tracked), "{tracked}");
        let stats = h.dp.stats().unwrap();
        assert_eq!(stats[stat::CONNTRACK_FULL as usize], 100 - tracked);
        assert_eq!(stats[stat::EMBRYO_PROMOTED as usize], tracked);
        // The refused flows stay half-open (their retransmission may find room later).
        assert_eq!(h.dp.embryonic_table().len() as u64, 100 - tracked);
        let (a1, i1, e1) = h.raw_conns(1, &s);
        let (a2, i2, e2) = h.raw_conns(2, &s);
        assert_eq!((a1 + a2, i1 + i2), (tracked, 0), "established: exact");
        assert_eq!(e1 + e2, 100 - tracked, "embryonic: exact");
        // Tracked flows carry on; a refused one is promoted once there is room.
        let out = h.run(&Frame::tcp(CLIENT, 49000, VIP, 80, ACK).build());
        assert_eq!(out.action, XDP_TX);
        let (gone, _) = h.dp.established_table()[0];
        assert!(h.dp.expire(gone, true).unwrap());
        let refused =
            h.dp.embryonic_table()
                .first()
                .map(|(k, _)| u16::from_be(k.sport))
                .expect("a refused flow");
        let out = h.run(&Frame::tcp(CLIENT, refused, VIP, 80, ACK).build());
        assert_eq!(out.action, XDP_TX, "retransmitted ACK promoted");
        assert_eq!(h.dp.established_table().len() as u64, tracked);
    });
}

/// A SYN flood from 300,000 spoofed sources (198.19.0.0/16 and 198.18.128.0/17), far past the
/// embryonic table's 4,096 entries: established connections are untouched, a legitimate
/// client's new connection is tracked and forwarded to one real, and the counts are exact
/// after promotion, eviction (recounted by the sweep) and expiry.
#[test]
#[ignore = "needs root"]
fn a_syn_flood_evicts_only_embryos_and_new_connections_still_work() {
    if !common::require_root("a_syn_flood_evicts_only_embryos_and_new_connections_still_work") {
        return;
    }
    let net = DpNet::new("flood", 2);
    net.run(|| {
        let mut h = Harness::with_tables(xdpvs::dataplane::Tables {
            conns: 4096,
            embryos: 4096,
            ..xdpvs::dataplane::Tables::conns(0)
        });
        let s = service(&[(1, 1), (2, 1)]);
        h.apply(vec![s.clone()]);
        // 100 established connections.
        for sport in 30000..30100u16 {
            h.run(&syn(sport).build());
            h.run(&Frame::tcp(CLIENT, sport, VIP, 80, ACK).build());
        }
        let before: std::collections::HashMap<_, _> =
            h.dp.established_table()
                .into_iter()
                .map(|(k, c)| (k, c.real))
                .collect();
        assert_eq!(before.len(), 100);
        const FLOOD: u32 = 300_000;
        let mut frame = Frame::tcp("198.19.0.0", 1024, VIP, 80, SYN).build();
        for i in 0..FLOOD {
            // Every SYN a distinct flow: the source address from the low 16 bits of `i`, the
            // source port from the rest. The frame is rewritten in place (no checksums are
            // checked on the way in).
            let src = [198, 19, (i >> 8) as u8, i as u8];
            frame[26..30].copy_from_slice(&src);
            frame[34..36].copy_from_slice(&(1024 + (i >> 16) as u16).to_be_bytes());
            assert_eq!(h.run(&frame).action, XDP_TX, "flood SYN {i}");
        }
        let after = h.dp.established_table();
        assert_eq!(after.len(), 100, "no established entry evicted");
        for (k, c) in &after {
            assert_eq!(before.get(k), Some(&c.real), "established entry moved");
        }
        let embryos = h.dp.embryonic_table().len();
        assert!(
            embryos <= 4096,
            "the embryonic table stays in its bound: {embryos}"
        );
        // A legitimate new connection: tracked and forwarded to one real, every packet.
        let out = h.run(&syn(31000).build());
        assert_eq!(out.action, XDP_TX);
        let owner = Harness::real_of(&out.frame).expect("a real");
        for flags in [ACK, ACK | PSH, ACK] {
            let out = h.run(&Frame::tcp(CLIENT, 31000, VIP, 80, flags).build());
            assert_eq!(out.action, XDP_TX);
            assert_eq!(Harness::real_of(&out.frame), Some(owner));
        }
        assert_eq!(h.dp.established_table().len(), 101);
        // Active counts are exact throughout; the embryonic ones leaked by eviction until the
        // sweep recounts them.
        let raw = |h: &Harness| {
            let (a1, i1, e1) = h.raw_conns(1, &s);
            let (a2, i2, e2) = h.raw_conns(2, &s);
            (a1 + a2, i1 + i2, e1 + e2)
        };
        let (active, inactive, leaked) = raw(&h);
        assert_eq!((active, inactive), (101, 0));
        assert!(leaked > 4096, "evictions leave counts behind: {leaked}");
        let r = h.dp.sweep().unwrap();
        let live = h.dp.embryonic_table().len() as u64;
        assert_eq!(raw(&h), (101, 0, live), "recounted: {r:?}");
        assert_eq!(r.embryos_evicted, leaked - live, "{r:?}");
        let stats = h.dp.stats().unwrap();
        assert_eq!(stats[stat::EMBRYO_EVICTED as usize], leaked - live);
        assert_eq!(stats[stat::NEW_CONN as usize], 100 + FLOOD as u64 + 1);
        assert_eq!(stats[stat::CONNTRACK_FULL as usize], 0);
        assert_eq!(stats[stat::EMBRYO_REFUSED as usize], 0);
        // Expiry: the SYN timeout at zero ends every embryo, and nothing else.
        h.apply_desired(&xdpvs::state::Desired {
            services: vec![s.clone()],
            timeouts: xdpvs::config::Timeouts {
                tcp_syn: std::time::Duration::ZERO,
                ..Default::default()
            },
            sync: false,
        });
        let r = h.dp.sweep().unwrap();
        assert_eq!(r.embryos_retired as u64, live, "{r:?}");
        assert_eq!(raw(&h), (101, 0, 0));
        assert_eq!(h.dp.embryonic_table().len(), 0);
        assert_eq!(h.dp.established_table().len(), 101);
        assert_eq!(h.dp.stats().unwrap()[stat::EMBRYO_EXPIRED as usize], live);
    });
}

/// One-packet UDP flows from spoofed sources, far past the embryonic table, never evict a live
/// UDP flow (one that sent a second packet).
#[test]
#[ignore = "needs root"]
fn a_udp_flood_of_one_packet_flows_never_evicts_a_live_flow() {
    if !common::require_root("a_udp_flood_of_one_packet_flows_never_evicts_a_live_flow") {
        return;
    }
    let net = DpNet::new("udpfl", 2);
    net.run(|| {
        let mut h = Harness::with_tables(xdpvs::dataplane::Tables {
            conns: 4096,
            embryos: 2048,
            ..xdpvs::dataplane::Tables::conns(0)
        });
        let mut s = service_on(53, &[(1, 1), (2, 1)]);
        s.key = xdpvs::state::service_key(s.address, xdpvs::config::Protocol::Udp);
        h.apply(vec![s.clone()]);
        let mut owners = Vec::new();
        for sport in 40000..40020u16 {
            let f = Frame::udp(CLIENT, sport, VIP, 53).build();
            let out = h.run(&f);
            owners.push(Harness::real_of(&out.frame).unwrap());
            h.run(&f);
        }
        assert_eq!(h.dp.established_table().len(), 20, "second packet promotes");
        let mut frame = Frame::udp("198.19.0.0", 1024, VIP, 53).build();
        for i in 0..100_000u32 {
            frame[26..30].copy_from_slice(&[198, 19, (i >> 8) as u8, i as u8]);
            frame[34..36].copy_from_slice(&(1024 + (i >> 16) as u16).to_be_bytes());
            assert_eq!(h.run(&frame).action, XDP_TX);
        }
        assert!(h.dp.embryonic_table().len() <= 2048);
        for (i, sport) in (40000..40020u16).enumerate() {
            let out = h.run(&Frame::udp(CLIENT, sport, VIP, 53).build());
            assert_eq!(
                Harness::real_of(&out.frame),
                Some(owners[i]),
                "flow {sport}"
            );
        }
        assert_eq!(h.dp.established_table().len(), 20);
        h.dp.sweep().unwrap();
        let (a1, i1, e1) = h.raw_conns(1, &s);
        let (a2, i2, e2) = h.raw_conns(2, &s);
        assert_eq!((a1 + a2, i1 + i2), (0, 20), "UDP counts as inactive");
        assert_eq!(e1 + e2, h.dp.embryonic_table().len() as u64);
    });
}

/// What a frame is, by an independent reading of its headers (not the XDP parser's code):
/// Some((dst ip, dst port, proto)) for a well-formed, unfragmented IPv4 TCP/UDP frame.
fn reference_parse(f: &[u8]) -> Option<([u8; 4], u16, u8)> {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if et == 0x8100 || et == 0x88a8 {
        et = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        l3 = 18;
    }
    if et != 0x0800 {
        return None;
    }
    let ip = f.get(l3..l3 + 20)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || tot < ihl || l3 + tot > f.len() {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let proto = ip[9];
    let l4 = f.get(l3 + ihl..l3 + tot)?;
    let min = match proto {
        6 => 20,
        17 => 8,
        _ => return None,
    };
    if l4.len() < min
        || (proto == 6
            && (usize::from(l4[12] >> 4) * 4 < 20 || usize::from(l4[12] >> 4) * 4 > l4.len()))
    {
        return None;
    }
    Some((
        [ip[16], ip[17], ip[18], ip[19]],
        u16::from_be_bytes([l4[2], l4[3]]),
        proto,
    ))
}

/// An ICMP error the program may forward, by an independent reading: Some((quoted source,
/// quoted source port, quoted proto)) for a well-formed, unfragmented IPv4 destination-
/// unreachable to the quoted packet's source, quoting an unfragmented TCP/UDP packet with its
/// ports inside the outer packet.
fn reference_icmp(f: &[u8]) -> Option<([u8; 4], u16, u8)> {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if et == 0x8100 || et == 0x88a8 {
        et = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        l3 = 18;
    }
    if et != 0x0800 {
        return None;
    }
    let ip = f.get(l3..l3 + 20)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || tot < ihl || l3 + tot > f.len() || ip[9] != 1 {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let icmp = f.get(l3 + ihl..l3 + tot)?;
    let q = icmp.get(8..)?;
    if icmp[0] != 3 || q.len() < 20 || q[0] >> 4 != 4 || !matches!(q[9], 6 | 17) {
        return None;
    }
    let qihl = usize::from(q[0] & 0x0f) * 4;
    if qihl < 20 || q.len() < qihl + 4 || u16::from_be_bytes([q[6], q[7]]) & 0x1fff != 0 {
        return None;
    }
    if ip[16..20] != q[12..16] {
        return None;
    }
    Some((
        [q[12], q[13], q[14], q[15]],
        u16::from_be_bytes([q[qihl], q[qihl + 1]]),
        q[9],
    ))
}

/// The offset of an IPv6 frame's IPv6 header and the frame's IPv6 packet (header and payload,
/// without Ethernet padding), if it is an IPv6 frame whose payload length fits.
fn ipv6_of(f: &[u8]) -> Option<(usize, &[u8])> {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    if et == 0x8100 || et == 0x88a8 {
        et = u16::from_be_bytes([*f.get(16)?, *f.get(17)?]);
        l3 = 18;
    }
    if et != 0x86dd {
        return None;
    }
    let ip = f.get(l3..l3 + 40)?;
    if ip[0] >> 4 != 6 {
        return None;
    }
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    Some((l3, f.get(l3..l3 + 40 + plen)?))
}

/// The upper-layer header of an IPv6 packet after the extension headers the program may skip
/// (hop-by-hop, routing, destination options; a fragment header only if it is an atomic
/// fragment): its offset and protocol, if every header lies inside the packet.
fn upper6(ip: &[u8]) -> Option<(usize, u8)> {
    let mut next = ip[6];
    let mut off = 40;
    while matches!(next, 0 | 43 | 60 | 44) {
        let h = ip.get(off..off + 4)?;
        let len = if next == 44 {
            // Offset and M flag (the two reserved bits are ignored, RFC 8200 4.5).
            if u16::from_be_bytes([h[2], h[3]]) & 0xfff9 != 0 {
                return None; // a real fragment, first or later
            }
            8
        } else {
            (usize::from(h[1]) + 1) * 8
        };
        next = h[0];
        off += len;
        if off > ip.len() {
            return None;
        }
    }
    Some((off, next))
}

/// The IPv6 twin of [`reference_parse`]: Some((destination, port, proto)) for a well-formed
/// unfragmented IPv6 TCP/UDP frame.
fn reference_parse6(f: &[u8]) -> Option<([u8; 16], u16, u8)> {
    let (_, ip) = ipv6_of(f)?;
    let (off, proto) = upper6(ip)?;
    let l4 = &ip[off..];
    let min = match proto {
        6 => 20,
        17 => 8,
        _ => return None,
    };
    if l4.len() < min
        || (proto == 6
            && (usize::from(l4[12] >> 4) * 4 < 20 || usize::from(l4[12] >> 4) * 4 > l4.len()))
    {
        return None;
    }
    Some((
        ip[24..40].try_into().ok()?,
        u16::from_be_bytes([l4[2], l4[3]]),
        proto,
    ))
}

/// The IPv6 twin of [`reference_icmp`]: a well-formed ICMPv6 Destination Unreachable or
/// Packet Too Big to the quoted packet's source, quoting an IPv6 TCP/UDP packet (no extension
/// headers) with its ports inside the outer packet.
fn reference_icmp6(f: &[u8]) -> Option<([u8; 16], u16, u8)> {
    let (_, ip) = ipv6_of(f)?;
    let (off, proto) = upper6(ip)?;
    if proto != 58 {
        return None;
    }
    let icmp = &ip[off..];
    let q = icmp.get(8..)?;
    if !matches!(icmp[0], 1 | 2) || q.len() < 44 || q[0] >> 4 != 6 || !matches!(q[6], 6 | 17) {
        return None;
    }
    if ip[24..40] != q[8..24] {
        return None;
    }
    Some((
        q[8..24].try_into().ok()?,
        u16::from_be_bytes([q[40], q[41]]),
        q[6],
    ))
}

/// Outcomes of a batch of frames run through [`judge`].
#[derive(Default, Debug)]
struct Tally {
    tx: u64,
    pass: u64,
    drop: u64,
    /// Of `tx`, RSTs answering a segment of no flow.
    reset: u64,
}

/// Runs `f` and checks the properties every frame must have: forwarded only if an independent
/// reading finds a well-formed TCP frame to VIP:80 or UDP frame to VIP:53, then with only the
/// MACs changed and to a configured real; passed frames untouched; nothing else.
fn judge(h: &Harness, i: usize, f: &[u8], t: &mut Tally) {
    let out = h.run(f);
    match out.action {
        XDP_TX => {
            t.tx += 1;
            let what = reference_parse(f).or_else(|| reference_icmp(f));
            let vip6: std::net::Ipv6Addr = VIP6.parse().unwrap();
            let what6 = reference_parse6(f).or_else(|| reference_icmp6(f));
            let v6_ok = matches!(what6, Some((a, 80, 6) | (a, 53, 17)) if a == vip6.octets());
            assert!(
                v6_ok
                    || matches!(
                        what,
                        Some(([198, 18, 0, 100], 80, 6) | ([198, 18, 0, 100], 53, 17))
                    ),
                "frame {i} forwarded but is neither a well-formed frame to a service nor an \
                 error about one's flow: {f:02x?}"
            );
            if out.frame.len() != f.len() || out.frame[12..] != f[12..] {
                // Not forwarded: a mid-flow segment of no flow, answered with a RST.
                let tcp6 = matches!(what6, Some((a, 80, 6)) if a == vip6.octets());
                assert!(
                    tcp6 || matches!(what, Some(([198, 18, 0, 100], 80, 6))),
                    "frame {i}: changed but not a TCP segment to the service: {f:02x?}"
                );
                let checked = if tcp6 {
                    packet::check_reset6(f, &out.frame)
                } else {
                    packet::check_reset(f, &out.frame)
                };
                if let Err(e) = checked {
                    panic!("frame {i}: {e}; in {f:02x?}");
                }
                t.reset += 1;
                return;
            }
            let real = Harness::real_of(&out.frame);
            assert!(matches!(real, Some(1) | Some(2)), "frame {i} to {real:?}");
        }
        XDP_PASS => {
            t.pass += 1;
            assert_eq!(out.frame, f, "frame {i}: passed frames are untouched");
        }
        XDP_DROP => t.drop += 1,
        other => panic!("frame {i}: unexpected action {other}"),
    }
}

/// Every frame is counted exactly once in STATS, under its outcome (`NEW_CONN`,
/// `EMBRYO_PROMOTED` and `ICMP_TO_REAL` come on top of `TX`; the unused slots stay 0).
fn assert_counted_once(h: &Harness, t: &Tally) {
    let stats = h.dp.stats().unwrap();
    let at = |s: u32| stats[s as usize];
    let drops = [
        stat::MALFORMED,
        stat::DROP_NO_REAL,
        stat::DROP_NO_NEIGH,
        stat::DROP_FIB,
        stat::DROP_NO_CONN,
        stat::DROP_REAL_GONE,
        stat::DROP_FRAGMENT,
        stat::CONNTRACK_FULL,
    ];
    assert_eq!(
        drops.iter().map(|s| at(*s)).sum::<u64>(),
        t.drop,
        "drops: {stats:?}"
    );
    assert_eq!(
        at(stat::PASS_NOT_IP)
            + at(stat::PASS_NOT_VIP)
            + at(stat::PASS_ICMP)
            + at(stat::PASS_IPV6_EXT),
        t.pass,
        "passes: {stats:?}"
    );
    assert_eq!(
        at(stat::TX) + at(stat::REDIRECT),
        t.tx,
        "forwards: {stats:?}"
    );
    assert_eq!(at(stat::MISS_RESET), t.reset, "resets: {stats:?}");
    let on_top = [
        stat::NEW_CONN,
        stat::EMBRYO_PROMOTED,
        stat::ICMP_TO_REAL,
        stat::MISS_RESET,
        stat::HASH_RECOVERED,
    ];
    let all: u64 = (0..stat::COUNT)
        .filter(|s| !on_top.contains(s))
        .map(at)
        .sum();
    assert_eq!(all, t.tx + t.pass + t.drop, "each frame once: {stats:?}");
}

/// A "fragmentation needed" from a router to the VIP quoting `quote` bytes of the reply
/// VIP:`vport` -> client:`cport` (`proto` 6 or 17).
fn icmp_about(proto: u8, cport: u16, vport: u16, quote: usize) -> Vec<u8> {
    let reply = if proto == 6 {
        Frame::tcp(VIP, vport, CLIENT, cport, ACK)
    } else {
        Frame::udp(VIP, vport, CLIENT, cport)
    };
    let q = packet::ip_packet(&reply.payload(64).csum().build());
    packet::icmp_unreach("198.18.0.254", VIP, 4, 1280, &q[..quote])
}

/// The TCP service on VIP:80 and the UDP one on VIP:53, both on reals 1 and 2.
fn fuzz_services(h: &mut Harness) {
    use xdpvs::config::Protocol;
    let mut dns = service_on(53, &[(1, 1), (2, 1)]);
    dns.key = xdpvs::state::service_key(dns.address, Protocol::Udp);
    h.apply(vec![
        service(&[(1, 1), (2, 1)]),
        dns,
        service6_on(80, Protocol::Tcp, &[(1, 1), (2, 1)]),
        service6_on(53, Protocol::Udp, &[(1, 1), (2, 1)]),
    ]);
}

/// The IPv6 twin of [`icmp_about`]: a Packet Too Big to VIP6 quoting `quote` bytes of the
/// reply VIP6:`vport` -> client:`cport`.
fn icmp6_about(proto: u8, cport: u16, vport: u16, quote: usize) -> Vec<u8> {
    let reply = if proto == 6 {
        Frame6::tcp(VIP6, vport, CLIENT6, cport, ACK)
    } else {
        Frame6::udp(VIP6, vport, CLIENT6, cport)
    }
    .payload(64)
    .build();
    let q = packet::ip6_packet(&reply);
    packet::icmp6_frame("2001:2::fe", VIP6, 2, 0, 1280, &q[..quote.min(q.len())])
}

#[test]
#[ignore = "needs root"]
fn mutated_frames_never_crash_leak_or_reach_a_wrong_real() {
    if !common::require_root("mutated_frames_never_crash_leak_or_reach_a_wrong_real") {
        return;
    }
    let net = DpNet::new("fuzz", 2);
    net.run(|| {
        let mut h = Harness::new();
        fuzz_services(&mut h);
        let seeds = [
            syn(50000).build(),
            Frame::tcp(CLIENT, 50001, VIP, 80, ACK | PSH).build(),
            Frame::udp(CLIENT, 50002, VIP, 80).build(),
            Frame::udp(CLIENT, 50004, VIP, 53).build(),
            {
                let mut f = syn(50003);
                f.vlan = Some(5);
                f.build()
            },
            // Errors about the flows the seeds above open (TCP 50000, UDP 50004).
            icmp_about(6, 50000, 80, 40),
            icmp_about(17, 50004, 53, 28),
            // IPv6: a SYN, a UDP flow, a SYN behind extension headers, errors about the flows.
            Frame6::tcp(CLIENT6, 50010, VIP6, 80, SYN).build(),
            Frame6::udp(CLIENT6, 50011, VIP6, 53).payload(12).build(),
            Frame6::tcp(CLIENT6, 50012, VIP6, 80, SYN)
                .ext(ext_opts(0, 1))
                .ext(ext_routing(1))
                .ext(ext_fragment(0, false))
                .build(),
            icmp6_about(6, 50010, 80, 60),
            icmp6_about(17, 50011, 53, 48),
        ];
        // xorshift64: deterministic, so a failure reproduces.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut t = Tally::default();
        for i in 0..30_000 {
            let mut f = seeds[i % seeds.len()].clone();
            // A few byte flips in the headers, sometimes a truncation or trailing bytes.
            // The headers: to the L4 ports (IPv6: past a few extension headers or the quote).
            let span = if f[12] == 0x86 { 130 } else { 58 };
            for _ in 0..1 + rnd() % 3 {
                let pos = (rnd() % span) as usize % f.len();
                f[pos] ^= (rnd() % 255 + 1) as u8;
            }
            match rnd() % 8 {
                0 => f.truncate(14 + (rnd() as usize % (f.len() - 13))),
                1 => f.extend(std::iter::repeat_n(0u8, (rnd() % 16) as usize)),
                _ => {}
            }
            judge(&h, i, &f, &mut t);
        }
        println!("30000 mutated frames: {t:?}");
        let st = h.dp.stats().unwrap();
        println!(
            "ICMP: {} forwarded, {} passed",
            st[stat::ICMP_TO_REAL as usize],
            st[stat::PASS_ICMP as usize]
        );
        assert!(st[stat::ICMP_TO_REAL as usize] > 0 && st[stat::PASS_ICMP as usize] > 0);
        assert!(
            t.tx > 0 && t.pass > 0 && t.drop > 0,
            "all three outcomes exercised"
        );
        assert_counted_once(&h, &t);
    });
}

/// Offset of the IPv4 header (after the Ethernet header and its tags) in a built frame.
fn l3_of(f: &[u8]) -> usize {
    let mut l3 = 14;
    while matches!(u16::from_be_bytes([f[l3 - 2], f[l3 - 1]]), 0x8100 | 0x88a8) {
        l3 += 4;
    }
    l3
}

/// Recomputes the IPv4 header checksum (so a test of one field is not just a bad checksum).
fn fix_ip_checksum(f: &mut [u8], l3: usize) {
    let ihl = usize::from(f[l3] & 0x0f) * 4;
    let Some(hdr) = f.get_mut(l3..l3 + ihl.max(20)) else {
        return;
    };
    hdr[10] = 0;
    hdr[11] = 0;
    let mut sum: u32 = hdr
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    hdr[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
}

/// Systematic cases rather than random ones: truncation at every offset (from 14: the kernel's
/// test run takes no shorter frame), every total length
/// and IHL/version byte, every value of the flags/fragment field, IP options, VLAN stacks of
/// 0-2 tags (802.1Q and QinQ TPIDs), every TCP flag combination with good and bad data offsets.
/// Together with the random test above, well over 100,000 frames per run.
#[test]
#[ignore = "needs root"]
fn systematic_malformed_frames_are_never_forwarded_and_all_counted() {
    if !common::require_root("systematic_malformed_frames_are_never_forwarded_and_all_counted") {
        return;
    }
    let net = DpNet::new("fuzs", 2);
    net.run(|| {
        let mut h = Harness::new();
        fuzz_services(&mut h);
        let mut bases: Vec<Frame> = vec![
            syn(52000),
            {
                let mut f = Frame::tcp(CLIENT, 52001, VIP, 80, ACK | PSH);
                f.payload = 32;
                f
            },
            {
                let mut f = Frame::udp(CLIENT, 52002, VIP, 53);
                f.payload = 16;
                f
            },
            {
                let mut f = syn(52003);
                f.vlan = Some(7);
                f
            },
            Frame::tcp(CLIENT, 52004, VIP, 81, SYN),
            Frame::udp(CLIENT, 52005, "198.18.0.200", 53),
        ];
        let mut t = Tally::default();
        let mut i = 0usize;
        let mut run = |h: &Harness, f: &[u8], t: &mut Tally| {
            judge(h, i, f, t);
            i += 1;
        };
        let mut counts: Vec<(&str, u64)> = Vec::new();
        let mark = |name: &'static str, t: &Tally, counts: &mut Vec<(&str, u64)>| {
            let before: u64 = counts.iter().map(|c| c.1).sum();
            counts.push((name, t.tx + t.pass + t.drop - before));
        };

        // The bases themselves: the ones to a service are forwarded (the ACK|PSH one's flow is
        // opened first, so its mutations take the established path).
        run(&h, &syn(52001).build(), &mut t);
        for b in &bases {
            run(&h, &b.build(), &mut t);
        }
        assert_eq!(
            t.tx, 5,
            "well-formed frames to a service are forwarded: {t:?}"
        );
        mark("bases", &t, &mut counts);

        // Truncated at every offset, with the IP total length as sent and fixed up to match.
        for b in bases.iter().chain([&Frame {
            payload: 0,
            ..bases[0].clone()
        }]) {
            let full = b.build();
            let l3 = l3_of(&full);
            // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (EINVAL).
            for len in 14..full.len() {
                let mut f = full[..len].to_vec();
                run(&h, &f, &mut t);
                if len >= l3 + 20 {
                    f[l3 + 2..l3 + 4].copy_from_slice(&((len - l3) as u16).to_be_bytes());
                    fix_ip_checksum(&mut f, l3);
                    run(&h, &f, &mut t);
                }
            }
        }
        arp_and_ipv6(&h, &mut run, &mut t);
        mark("truncations", &t, &mut counts);

        // Every IPv4 total length up to the frame's size and beyond.
        for b in &bases {
            let full = b.build();
            let l3 = l3_of(&full);
            for tot in (0..=full.len() as u16 + 64).chain([1500, 65535]) {
                let mut f = full.clone();
                f[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
                fix_ip_checksum(&mut f, l3);
                run(&h, &f, &mut t);
            }
        }
        mark("total lengths", &t, &mut counts);

        // Every version/IHL byte.
        for b in &bases {
            let full = b.build();
            let l3 = l3_of(&full);
            for v in 0..=255u8 {
                let mut f = full.clone();
                f[l3] = v;
                fix_ip_checksum(&mut f, l3);
                run(&h, &f, &mut t);
            }
        }
        mark("version/IHL", &t, &mut counts);

        // Real IP options (IHL 6..15): NOPs, an EOL list, a record-route, garbage; lengths fixed.
        for b in &bases {
            let full = b.build();
            let l3 = l3_of(&full);
            for words in 1..=10usize {
                for pattern in 0..4u8 {
                    let opt: Vec<u8> = (0..words * 4)
                        .map(|k| match pattern {
                            0 => 1,
                            1 => 0,
                            2 if k == 0 => 7,
                            2 if k == 1 => (words * 4) as u8,
                            2 if k == 2 => 4,
                            _ => (k as u8).wrapping_mul(37) ^ 0xa5,
                        })
                        .collect();
                    let mut f = full[..l3 + 20].to_vec();
                    f.extend_from_slice(&opt);
                    f.extend_from_slice(&full[l3 + 20..]);
                    f[l3] = 0x45 + words as u8;
                    let tot = u16::from_be_bytes([f[l3 + 2], f[l3 + 3]]) + (words * 4) as u16;
                    f[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
                    fix_ip_checksum(&mut f, l3);
                    run(&h, &f, &mut t);
                }
            }
        }
        mark("IP options", &t, &mut counts);

        // VLAN stacks: no tag, one, two; 802.1Q, QinQ (0x88a8) and 0x9100; VIDs 0, 1, 4095.
        let tpids = [0x8100u16, 0x88a8, 0x9100];
        let vids = [0u16, 1, 4095];
        let mut stacks: Vec<Vec<(u16, u16)>> = vec![vec![]];
        for &a in &tpids {
            for &v in &vids {
                stacks.push(vec![(a, v)]);
                for &b in &tpids {
                    stacks.push(vec![(a, v), (b, 4095 - v)]);
                }
            }
        }
        bases.retain(|b| b.vlan.is_none());
        for b in &bases {
            let plain = b.build();
            for st in &stacks {
                let mut f = plain[..12].to_vec();
                for (tpid, vid) in st {
                    f.extend_from_slice(&tpid.to_be_bytes());
                    f.extend_from_slice(&vid.to_be_bytes());
                }
                f.extend_from_slice(&plain[12..]);
                run(&h, &f, &mut t);
            }
        }
        mark("VLAN stacks", &t, &mut counts);

        // Every TCP flag byte, on new flows and on an established one, with data offsets 5 (good),
        // 4 (too short) and 15 (beyond the frame).
        let established = Frame::tcp(CLIENT, 52100, VIP, 80, SYN);
        run(&h, &established.build(), &mut t);
        for flags in 0..=255u8 {
            for (k, doff) in [5u8, 4, 15].into_iter().enumerate() {
                for new in [true, false] {
                    let sport = if new {
                        53000 + u16::from(flags) * 3 + k as u16
                    } else {
                        52100
                    };
                    let mut f = Frame::tcp(CLIENT, sport, VIP, 80, flags).build();
                    f[14 + 20 + 12] = doff << 4;
                    run(&h, &f, &mut t);
                }
            }
        }
        mark("TCP flags", &t, &mut counts);

        // Every value of the flags/fragment-offset field (DF, MF, offsets), TCP and UDP.
        for b in [syn(52200), Frame::udp(CLIENT, 52201, VIP, 53)] {
            let full = b.build();
            for frag in 0..=u16::MAX {
                let mut f = full.clone();
                f[14 + 6..14 + 8].copy_from_slice(&frag.to_be_bytes());
                fix_ip_checksum(&mut f, 14);
                run(&h, &f, &mut t);
            }
        }
        mark("fragment field", &t, &mut counts);

        // ICMP errors about a tracked flow (52000, opened by the bases): truncated at every
        // length (IP length as sent and fixed up), every byte of the ICMP header and of the
        // quoted IP header and ports set to a few values, every outer total length.
        for full in [icmp_about(6, 52000, 80, 48), icmp_about(17, 52002, 53, 28)] {
            run(&h, &full, &mut t);
            for len in 14..full.len() {
                let mut f = full[..len].to_vec();
                run(&h, &f, &mut t);
                if len >= 34 {
                    f[16..18].copy_from_slice(&((len - 14) as u16).to_be_bytes());
                    fix_ip_checksum(&mut f, 14);
                    run(&h, &f, &mut t);
                }
            }
            for pos in 34..full.len().min(34 + 8 + 24) {
                for v in [0u8, 1, 3, 4, 0x0f, 0x40, 0x45, 0x4f, 0x80, 0xff] {
                    let mut f = full.clone();
                    f[pos] = v;
                    run(&h, &f, &mut t);
                }
            }
            for tot in 0..=full.len() as u16 + 8 {
                let mut f = full.clone();
                f[16..18].copy_from_slice(&tot.to_be_bytes());
                fix_ip_checksum(&mut f, 14);
                run(&h, &f, &mut t);
            }
        }
        mark("ICMP errors", &t, &mut counts);

        ipv6_cases(&h, &mut run, &mut t);
        mark("IPv6", &t, &mut counts);

        let total = t.tx + t.pass + t.drop;
        println!("{total} systematic frames: {t:?}; by case: {counts:?}");
        assert!(total >= 80_000, "{total}");
        assert_counted_once(&h, &t);
        let stats = h.dp.stats().unwrap();
        // Fragments reached the fragment counter, and malformed frames the malformed one.
        assert!(stats[stat::DROP_FRAGMENT as usize] > 0 && stats[stat::MALFORMED as usize] > 0);
        assert!(stats[stat::PASS_IPV6_EXT as usize] > 0, "{stats:?}");
    });
}

/// Malformed and unusual IPv6 frames: every truncation (payload length as sent and fixed up),
/// every payload length, version byte and next-header value, every length and next-header byte
/// of an extension header, every value of a fragment header's offset field, and ICMPv6 errors
/// about a tracked flow mutated as the IPv4 ones are.
fn ipv6_cases(h: &Harness, run: &mut impl FnMut(&Harness, &[u8], &mut Tally), t: &mut Tally) {
    // Flows the errors below quote.
    run(h, &Frame6::tcp(CLIENT6, 52300, VIP6, 80, SYN).build(), t);
    run(h, &Frame6::udp(CLIENT6, 52301, VIP6, 53).build(), t);
    let mut vlan = Frame6::tcp(CLIENT6, 52302, VIP6, 80, SYN);
    vlan.vlan = Some(9);
    let bases: Vec<Vec<u8>> = vec![
        Frame6::tcp(CLIENT6, 52300, VIP6, 80, ACK | PSH)
            .payload(24)
            .build(),
        Frame6::udp(CLIENT6, 52301, VIP6, 53).payload(16).build(),
        Frame6::tcp(CLIENT6, 52303, VIP6, 80, SYN)
            .ext(ext_opts(0, 1))
            .ext(ext_routing(1))
            .ext(ext_opts(60, 2))
            .build(),
        Frame6::udp(CLIENT6, 52304, VIP6, 53)
            .ext(ext_fragment(0, false))
            .payload(3)
            .build(),
        vlan.build(),
        Frame6::tcp(CLIENT6, 52305, "2001:2::2", 80, SYN).build(),
    ];
    let l3 = |f: &[u8]| if f[12] == 0x81 { 18 } else { 14 };
    for full in &bases {
        let l3 = l3(full);
        for len in 14..full.len() {
            let mut f = full[..len].to_vec();
            run(h, &f, t);
            if len >= l3 + 40 {
                f[l3 + 4..l3 + 6].copy_from_slice(&((len - l3 - 40) as u16).to_be_bytes());
                run(h, &f, t);
            }
        }
        let plen = full.len() - l3 - 40;
        for p in (0..=plen as u16 + 64).chain([1500, 65535]) {
            let mut f = full.clone();
            f[l3 + 4..l3 + 6].copy_from_slice(&p.to_be_bytes());
            run(h, &f, t);
        }
        for v in 0..=255u8 {
            let mut f = full.clone();
            f[l3] = v;
            run(h, &f, t);
            let mut f = full.clone();
            f[l3 + 6] = v;
            run(h, &f, t);
        }
    }
    // The extension headers of base 2 (hop-by-hop, routing, destination options): each one's
    // next-header and length byte at every value.
    let ext = &bases[2];
    for hdr in [54usize, 62, 86] {
        for v in 0..=255u8 {
            for at in [hdr, hdr + 1] {
                let mut f = ext.clone();
                f[at] = v;
                run(h, &f, t);
            }
        }
    }
    // Every offset/M value of the fragment header of base 3.
    for om in 0..=u16::MAX {
        let mut f = bases[3].clone();
        f[56..58].copy_from_slice(&om.to_be_bytes());
        run(h, &f, t);
    }
    // ICMPv6 errors about the flows: truncated (payload length as sent and fixed up), every
    // byte of the ICMPv6 header, the quoted IPv6 header and ports at a few values, every
    // payload length.
    for full in [
        icmp6_about(6, 52300, 80, 64),
        icmp6_about(17, 52301, 53, 48),
    ] {
        run(h, &full, t);
        for len in 14..full.len() {
            let mut f = full[..len].to_vec();
            run(h, &f, t);
            if len >= 54 {
                f[18..20].copy_from_slice(&((len - 54) as u16).to_be_bytes());
                run(h, &f, t);
            }
        }
        for pos in 54..full.len().min(54 + 8 + 44) {
            for v in [0u8, 1, 2, 4, 6, 17, 0x3a, 0x60, 0x80, 0xff] {
                let mut f = full.clone();
                f[pos] = v;
                run(h, &f, t);
            }
        }
        for p in 0..=(full.len() - 54) as u16 + 8 {
            let mut f = full.clone();
            f[18..20].copy_from_slice(&p.to_be_bytes());
            run(h, &f, t);
        }
    }
}

/// Non-IPv4 frames, whole and truncated: passed untouched or dropped, never forwarded.
fn arp_and_ipv6(h: &Harness, run: &mut impl FnMut(&Harness, &[u8], &mut Tally), t: &mut Tally) {
    for full in [packet::arp(), packet::ipv6_syn()] {
        for len in 14..=full.len() {
            run(h, &full[..len], t);
        }
    }
}

#[test]
#[ignore = "needs root"]
fn rr_and_wrr_take_turns_by_weight() {
    if !common::require_root("rr_and_wrr_take_turns_by_weight") {
        return;
    }
    let net = DpNet::new("wrr", 3);
    net.run(|| {
        let mut h = Harness::new();
        let mut s = service(&[(1, 1), (2, 2), (3, 3)]);
        s.sched = xdpvs_common::sched_kind::WRR;
        h.apply(vec![s.clone()]);
        let mut per_real = [0usize; 4];
        for sport in 51000..51060u16 {
            per_real[Harness::real_of(&h.run(&syn(sport).build()).frame).unwrap()] += 1;
        }
        assert_eq!(&per_real[1..], &[10, 20, 30], "wrr: exact shares per cycle");
        // rr ignores weights (but never picks a weight-0 real) and visits reals in turn.
        s.sched = xdpvs_common::sched_kind::RR;
        s.reals[0].weight = 0;
        h.apply(vec![s]);
        let seq: Vec<usize> = (51100..51106u16)
            .map(|p| Harness::real_of(&h.run(&syn(p).build()).frame).unwrap())
            .collect();
        assert!(!seq.contains(&1), "{seq:?}");
        assert!(
            seq.windows(2).all(|w| w[0] != w[1]),
            "turns alternate: {seq:?}"
        );
    });
}

/// A TCP segment of flow `sport` with `payload` bytes: above about 3.5 KB, BPF_PROG_TEST_RUN
/// hands the (frags-aware) program a multi-buffer frame, the linear part one page.
fn jumbo(sport: u16, payload: usize) -> Vec<u8> {
    let mut f = Frame::tcp(CLIENT, sport, VIP, 80, ACK | PSH);
    f.payload = payload;
    f.build()
}

#[test]
#[ignore = "needs root"]
fn multi_buffer_frames_are_forwarded_whole_in_dr_mode_and_counted() {
    if !common::require_root("multi_buffer_frames_are_forwarded_whole_in_dr_mode_and_counted") {
        return;
    }
    let net = DpNet::new("mbdr", 2);
    net.run(|| {
        let mut h = Harness::new();
        let s = service(&[(1, 1), (2, 1)]);
        h.apply(vec![s.clone()]);
        let sport = 52000;
        let owner = Harness::real_of(&h.run(&syn(sport).build()).frame).expect("SYN forwarded");
        let id = h
            .planner
            .real_id(
                &s.key,
                std::net::SocketAddr::new(dpnet::real_ip(owner).into(), 80),
            )
            .expect("real id");
        let before = h.dp.real_stats(id).unwrap();
        // Across the one-page boundary, a jumbo frame, and a GRO-sized aggregate.
        let sizes = [1400, 3400, 3600, 4100, 8960, 30000];
        let mut bytes = 0u64;
        for payload in sizes {
            let input = jumbo(sport, payload);
            assert_eq!(
                reference_parse(&input),
                Some(([198, 18, 0, 100], 80, 6)),
                "test frame of {payload} B is a well-formed TCP frame to the VIP"
            );
            let out = h.run(&input);
            assert_eq!(out.action, XDP_TX, "{payload} B payload: forwarded");
            assert_eq!(out.frame.len(), input.len(), "{payload} B: whole frame out");
            assert_eq!(Harness::real_of(&out.frame), Some(owner), "{payload} B");
            assert_eq!(&out.frame[6..12], &DIRECTOR_MAC);
            assert_eq!(
                &out.frame[12..],
                &input[12..],
                "{payload} B: only MACs change"
            );
            bytes += input.len() as u64;
        }
        let after = h.dp.real_stats(id).unwrap();
        assert_eq!(after.packets - before.packets, sizes.len() as u64);
        assert_eq!(
            after.bytes - before.bytes,
            bytes,
            "bytes count every fragment of the frames"
        );
        let st = h.dp.stats().unwrap();
        // 1400 and 3400 fit the linear part; the other four are multi-buffer frames.
        assert_eq!(st[stat::MULTI_BUFFER as usize], 4, "multi-buffer frames");
        // dpa has MTU 1500: every frame but the first exceeds it.
        assert_eq!(st[stat::OVER_MTU as usize], 5, "frames above the MTU");
        assert_eq!(st[stat::MALFORMED as usize], 0);
    });
}

#[test]
#[ignore = "needs root"]
fn multi_buffer_frames_not_for_a_service_or_lying_are_passed_or_dropped() {
    if !common::require_root("multi_buffer_frames_not_for_a_service_or_lying_are_passed_or_dropped")
    {
        return;
    }
    let net = DpNet::new("mbbad", 1);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![service(&[(1, 1)])]);
        let mut other = Frame::tcp(CLIENT, 1, "198.18.0.2", 80, ACK);
        other.payload = 9000;
        let input = other.build();
        let out = h.run(&input);
        assert_eq!(out.action, XDP_PASS, "not a service: passed");
        assert_eq!(out.frame, input, "passed whole and untouched");
        // IP total length past the end of the whole frame (fragments included).
        let mut lying = jumbo(52100, 9000);
        lying.truncate(lying.len() - 100);
        assert_eq!(reference_parse(&lying), None);
        assert_eq!(h.run(&lying).action, XDP_DROP, "length past the frame");
        // A later IP fragment, multi-buffer: no ports, passed.
        let mut frag = Frame::tcp(CLIENT, 52101, VIP, 80, ACK);
        frag.payload = 9000;
        frag.frag = 0x0100;
        let input = frag.build();
        assert_eq!(h.run(&input).action, XDP_PASS);
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::MALFORMED as usize], 1);
        assert_eq!(
            st[stat::MULTI_BUFFER as usize],
            2,
            "the two consistent ones"
        );
        assert_eq!(st[stat::TX as usize], 0);
        assert_eq!(h.dp.connections().len(), 0);
    });
}

/// Makes one of the loaded program's maps read-only for the control plane (BPF_MAP_FREEZE), so
/// the next write to it fails: a fault injected into the real map-write path.
fn freeze_map(dp: &xdpvs::dataplane::Dataplane, name: &str) {
    use std::os::fd::{AsFd, AsRawFd};
    let info = dp.main_program().unwrap().info().unwrap();
    let ids = info.map_ids().unwrap().expect("map ids");
    let map = ids
        .into_iter()
        .map(|id| aya::maps::MapInfo::from_id(id).unwrap())
        .find(|m| m.name_as_str() == Some(name))
        .unwrap_or_else(|| panic!("the program uses no map {name}"));
    let fd = map.fd().unwrap();
    let attr = [fd.as_fd().as_raw_fd() as u32, 0, 0, 0];
    const BPF_MAP_FREEZE: libc::c_long = 22;
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_FREEZE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert_eq!(rc, 0, "freeze: {}", std::io::Error::last_os_error());
}

#[test]
#[ignore = "needs root"]
fn a_write_failing_part_way_leaves_the_planner_resynced_from_the_maps() {
    if !common::require_root("a_write_failing_part_way_leaves_the_planner_resynced_from_the_maps") {
        return;
    }
    use xdpvs::dataplane::{plan::Planner, Programmer};
    use xdpvs::state::Desired;
    let net = DpNet::new("rsync", 3);
    net.run(|| {
        let h = Harness::new();
        let mut p = Programmer {
            dp: h.dp,
            planner: h.planner,
        };
        let desired = |s| Desired {
            services: vec![s],
            timeouts: Default::default(),
            sync: false,
        };
        let two = service(&[(1, 1), (2, 1)]);
        p.apply(&desired(two.clone())).expect("first apply");
        // Adding a real plans: its Real slot, then the service's new real set, then the
        // service. With REALSETS frozen the slot lands and the set does not.
        freeze_map(&p.dp, "REALSETS");
        let three = service(&[(1, 1), (2, 1), (3, 1)]);
        let r3 = three.reals[2].address;
        let e = p
            .apply(&desired(three.clone()))
            .expect_err("the set write must fail");
        assert!(format!("{e:#}").contains("resynced"), "{e:#}");
        // The planner believes the maps: real 3 holds the id its slot was written with, but it
        // is in no live set; the service still points at the two-real set.
        let from_maps = Planner::adopt(&p.dp.view().unwrap()).unwrap();
        assert_eq!(p.planner.ids(), from_maps.ids());
        assert!(p.planner.real_id(&three.key, r3).is_some());
        assert_eq!(p.planner.live_weight(&three.key, r3), None);
        assert_eq!(
            p.planner.live_weight(&two.key, two.reals[0].address),
            Some(1)
        );
        // So a retry plans the missing set again (a planner that believed its own plan would
        // write nothing and leave real 3 out for good).
        let retry = p.planner.plan(&desired(three)).unwrap();
        assert!(
            retry
                .iter()
                .any(|w| matches!(w, xdpvs::dataplane::plan::Write::RealSet(..))),
            "{retry:?}"
        );
    });
}

#[test]
#[ignore = "needs root"]
fn the_owner_coalesces_queued_applies_and_reads_never_wait_for_it() {
    if !common::require_root("the_owner_coalesces_queued_applies_and_reads_never_wait_for_it") {
        return;
    }
    use xdpvs::dataplane::{owner::Owner, Programmer};
    use xdpvs::state::Desired;
    let net = DpNet::new("owner", 2);
    net.run(|| {
        let h = Harness::new();
        let owner = Owner::start(Programmer {
            dp: h.dp,
            planner: h.planner,
        })
        .expect("owner");
        let desired = |w: u32| Desired {
            services: vec![service(&[(1, w), (2, 1)])],
            timeouts: Default::default(),
            sync: false,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            owner.apply(desired(1)).await.expect("first apply");
            let writes0 = owner.reader().map_writes();
            let svc = service(&[(1, 1)]);
            let r1 = svc.reals[0].address;
            let id = owner.reader().index().real_id(&svc.key, r1).expect("real 1 has an id");
            // Keep the owner busy (a long write), queue 200 applies behind it.
            let (release, wait) = std::sync::mpsc::channel::<()>();
            let o = owner.clone();
            let busy = tokio::spawn(async move {
                o.write(move |_| {
                    let _ = wait.recv();
                })
                .await
            });
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let pending: Vec<_> = (2..=201).map(|w| owner.send_apply(desired(w))).collect();
            // Reads answer while the owner is busy.
            let t = std::time::Instant::now();
            let conns = owner.reader().real_conns(id).expect("read while busy");
            let stats = owner.reader().stats().expect("stats while busy");
            let read_took = t.elapsed();
            assert_eq!(conns.active, 0);
            assert!(stats.iter().all(|v| *v == 0));
            release.send(()).unwrap();
            busy.await.unwrap().expect("busy job");
            for p in pending {
                p.await.expect("every queued apply answered Ok");
            }
            let writes = owner.reader().map_writes() - writes0;
            let weight = owner
                .read(move |p| p.planner.live_weight(&svc.key, r1))
                .await
                .unwrap();
            println!(
                "200 applies queued behind a busy owner: {writes} map writes; a read while busy took {read_took:?}"
            );
            // The newest state won, written once (not 200 times).
            assert_eq!(weight, Some(201));
            assert!(writes <= 3, "{writes} writes for 200 coalesced applies");
            assert!(read_took < std::time::Duration::from_secs(1));
        });
    });
}

// ---------------------------------------------------------------------------------------------
// Connection-state sync: what the packet path reports, and the install program.

use std::net::SocketAddr;
use xdpvs::ha::sync::service::conn_key;
use xdpvs::ha::sync::wire::ConnProto;
use xdpvs_common::{install_rc, state, sync_kind, SyncEvent, CONN_F_SYNCED};

/// Every record waiting in the ring buffer, as (kind, state, client port, real id).
fn drain_events(rb: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<SyncEvent> {
    let mut out = Vec::new();
    while let Some(item) = rb.next() {
        assert_eq!(item.len(), std::mem::size_of::<SyncEvent>());
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<SyncEvent>()) });
    }
    out
}

fn summary(evs: &[SyncEvent]) -> Vec<(u8, u32, u16)> {
    evs.iter()
        .map(|e| (e.kind, e.state, u16::from_be(e.key.sport)))
        .collect()
}

#[test]
#[ignore = "needs root"]
fn sync_events_follow_the_tcp_lifecycle_and_udp_flows() {
    if !common::require_root("sync_events_follow_the_tcp_lifecycle_and_udp_flows") {
        return;
    }
    let net = DpNet::new("syncev", 1);
    net.run(|| {
        let mut h = Harness::new();
        let tcp = service(&[(1, 1)]);
        let mut udp = service_on(53, &[(1, 1)]);
        udp.key = xdpvs::state::service_key(udp.address, xdpvs::config::Protocol::Udp);
        h.apply_synced(vec![tcp.clone(), udp.clone()]);
        let mut rb = h.dp.take_sync_events().expect("ring buffer");
        let f = |flags| Frame::tcp(CLIENT, 48000, VIP, 80, flags).build();

        h.run(&f(SYN));
        h.run(&f(SYN));
        assert_eq!(drain_events(&mut rb), vec![], "half-open: nothing reported");
        h.run(&f(ACK));
        let evs = drain_events(&mut rb);
        assert_eq!(
            summary(&evs),
            vec![(sync_kind::NEW, state::ESTABLISHED, 48000)]
        );
        let (key, conn) = h.dp.connections()[0];
        assert_eq!(evs[0].key, key, "the event names the table's key");
        assert_eq!((evs[0].real, evs[0].service), (conn.real, conn.service));
        h.run(&f(ACK | PSH));
        h.run(&f(ACK));
        assert_eq!(drain_events(&mut rb), vec![], "data: no state change");
        h.run(&f(FIN | ACK));
        assert_eq!(
            summary(&drain_events(&mut rb)),
            vec![(sync_kind::STATE, state::FIN_WAIT, 48000)]
        );
        h.run(&f(RST));
        assert_eq!(
            summary(&drain_events(&mut rb)),
            vec![(sync_kind::STATE, state::CLOSE, 48000)]
        );
        assert!(h.dp.expire(key, true).unwrap());
        assert_eq!(
            summary(&drain_events(&mut rb)),
            vec![(sync_kind::END, state::CLOSE, 48000)]
        );

        // A half-open entry that expires was never reported: no END either.
        h.run(&Frame::tcp(CLIENT, 48001, VIP, 80, SYN).build());
        let (k2, _) = h.dp.connections()[0];
        assert!(h.dp.expire(k2, true).unwrap());
        assert_eq!(drain_events(&mut rb), vec![]);

        // A SYN reopening a closing tuple: END of the old one, then NEW once established.
        let g = |flags| Frame::tcp(CLIENT, 48002, VIP, 80, flags).build();
        for fl in [SYN, ACK, FIN | ACK, SYN, ACK] {
            h.run(&g(fl));
        }
        assert_eq!(
            summary(&drain_events(&mut rb)),
            vec![
                (sync_kind::NEW, state::ESTABLISHED, 48002),
                (sync_kind::STATE, state::FIN_WAIT, 48002),
                (sync_kind::END, state::FIN_WAIT, 48002),
                (sync_kind::NEW, state::ESTABLISHED, 48002),
            ]
        );

        // UDP: a one-datagram flow stays embryonic and unreported; the second datagram
        // promotes it and reports it, later ones nothing, expiry its end.
        h.run(&Frame::udp(CLIENT, 48100, VIP, 53).build());
        assert!(
            drain_events(&mut rb).is_empty(),
            "an embryo is never reported"
        );
        for _ in 0..2 {
            h.run(&Frame::udp(CLIENT, 48100, VIP, 53).build());
        }
        let evs = drain_events(&mut rb);
        assert_eq!(summary(&evs), vec![(sync_kind::NEW, state::UDP, 48100)]);
        assert!(h.dp.expire(evs[0].key, true).unwrap());
        assert_eq!(
            summary(&drain_events(&mut rb)),
            vec![(sync_kind::END, state::UDP, 48100)]
        );
        assert_eq!(h.dp.stats().unwrap()[stat::SYNC_EVENTS_LOST as usize], 0);
    });
}

#[test]
#[ignore = "needs root"]
fn nothing_is_reported_without_the_sync_flag() {
    if !common::require_root("nothing_is_reported_without_the_sync_flag") {
        return;
    }
    let net = DpNet::new("syncoff", 1);
    net.run(|| {
        let mut h = Harness::new();
        let mut udp = service_on(53, &[(1, 1)]);
        udp.key = xdpvs::state::service_key(udp.address, xdpvs::config::Protocol::Udp);
        h.apply(vec![service(&[(1, 1)]), udp]);
        let mut rb = h.dp.take_sync_events().expect("ring buffer");
        for fl in [SYN, ACK, ACK | PSH, FIN | ACK, RST] {
            assert_eq!(
                h.run(&Frame::tcp(CLIENT, 48200, VIP, 80, fl).build())
                    .action,
                XDP_TX
            );
        }
        h.run(&Frame::udp(CLIENT, 48201, VIP, 53).build());
        for (k, _) in h.dp.connections() {
            assert!(h.dp.expire(k, true).unwrap());
        }
        assert_eq!(drain_events(&mut rb), vec![]);
        assert_eq!(h.dp.stats().unwrap()[stat::SYNC_EVENTS_LOST as usize], 0);
    });
}

#[test]
#[ignore = "needs root"]
fn sync_install_keeps_counts_exact_is_idempotent_and_forwards_to_the_installed_real() {
    if !common::require_root(
        "sync_install_keeps_counts_exact_is_idempotent_and_forwards_to_the_installed_real",
    ) {
        return;
    }
    let net = DpNet::new("syncin", 2);
    net.run(|| {
        let mut h = Harness::new();
        let s = service(&[(1, 1), (2, 1)]);
        h.apply_synced(vec![s.clone()]);
        let mut rb = h.dp.take_sync_events().expect("ring buffer");
        let id = |n| {
            h.planner
                .real_id(&s.key, SocketAddr::new(dpnet::real_ip(n).into(), 80))
                .unwrap()
        };
        let svc_id = h.planner.service_id(&s.key).unwrap();
        let client: SocketAddr = format!("{CLIENT}:49000").parse().unwrap();
        let key = conn_key(ConnProto::Tcp, client, s.address);
        let req = |real: usize, st: u32, kind: u8| SyncEvent {
            key,
            real: id(real),
            service: svc_id,
            state: st,
            kind,
            _pad: [0; 3],
        };
        let both = |h: &Harness| (h.conns(1, &s), h.conns(2, &s));

        let rc =
            h.dp.sync_install(&req(2, state::ESTABLISHED, sync_kind::NEW))
                .unwrap();
        assert_eq!(rc, install_rc::INSERTED);
        assert_eq!(both(&h), ((0, 0), (1, 0)), "established: active on real 2");
        let rc =
            h.dp.sync_install(&req(2, state::ESTABLISHED, sync_kind::NEW))
                .unwrap();
        assert_eq!(rc, install_rc::UPDATED, "twice: idempotent");
        assert_eq!(both(&h), ((0, 0), (1, 0)));
        let conns = h.dp.connections();
        assert_eq!(conns.len(), 1);
        assert_eq!(conns[0].1.flags & CONN_F_SYNCED, CONN_F_SYNCED);
        let t0 = conns[0].1.last_seen_ns;
        assert!(t0 > 0 && t0 <= xdpvs::dataplane::monotonic_ns());

        for _ in 0..2 {
            let rc =
                h.dp.sync_install(&req(2, state::FIN_WAIT, sync_kind::STATE))
                    .unwrap();
            assert_eq!(rc, install_rc::UPDATED);
            assert_eq!(both(&h), ((0, 0), (0, 1)), "FIN_WAIT: inactive");
        }
        // Another real on the same tuple: the old entry is retired, the new one counted.
        let rc =
            h.dp.sync_install(&req(1, state::ESTABLISHED, sync_kind::STATE))
                .unwrap();
        assert_eq!(rc, install_rc::REPLACED);
        assert_eq!(both(&h), ((1, 0), (0, 0)));
        assert_eq!(h.dp.connections().len(), 1);
        assert_eq!(
            drain_events(&mut rb),
            vec![],
            "installs are never reported back to the peer"
        );

        // Refused requests change nothing.
        let mut bad = req(1, state::ESTABLISHED, sync_kind::NEW);
        bad.real = 60_000; // no such real here
        assert_eq!(h.dp.sync_install(&bad).unwrap(), install_rc::INVALID);
        let mut bad = req(1, state::ESTABLISHED, sync_kind::NEW);
        bad.service = svc_id + 1; // the real is not this service's
        assert_eq!(h.dp.sync_install(&bad).unwrap(), install_rc::INVALID);
        assert_eq!(
            h.dp.sync_install(&req(1, state::DEAD, sync_kind::NEW))
                .unwrap(),
            install_rc::INVALID
        );
        assert_eq!(
            h.dp.sync_install(&req(1, state::ESTABLISHED, 9)).unwrap(),
            install_rc::INVALID
        );
        assert_eq!(
            h.dp.sync_install(&req(2, state::ESTABLISHED, sync_kind::END))
                .unwrap(),
            install_rc::ABSENT,
            "END naming another real leaves the entry"
        );
        assert_eq!(both(&h), ((1, 0), (0, 0)));

        // A packet of the installed connection goes to its real; from then on this director
        // owns the entry and reports its changes.
        let out = h.run(&Frame::tcp(CLIENT, 49000, VIP, 80, ACK | PSH).build());
        assert_eq!(out.action, XDP_TX);
        assert_eq!(Harness::real_of(&out.frame), Some(1));
        assert_eq!(h.dp.connections()[0].1.flags & CONN_F_SYNCED, 0);
        h.run(&Frame::tcp(CLIENT, 49000, VIP, 80, FIN | ACK).build());
        assert_eq!(
            summary(&drain_events(&mut rb)),
            vec![(sync_kind::STATE, state::FIN_WAIT, 49000)]
        );
        assert_eq!(both(&h), ((0, 1), (0, 0)));

        // END retires once.
        let rc =
            h.dp.sync_install(&req(1, state::FIN_WAIT, sync_kind::END))
                .unwrap();
        assert_eq!(rc, install_rc::RETIRED);
        assert_eq!(both(&h), ((0, 0), (0, 0)));
        assert_eq!(h.dp.connections().len(), 0);
        assert_eq!(
            h.dp.sync_install(&req(1, state::FIN_WAIT, sync_kind::END))
                .unwrap(),
            install_rc::ABSENT
        );
        assert_eq!(drain_events(&mut rb), vec![], "a peer's END is not echoed");

        // An installed copy that expires here (idle) ends silently: the peer owns it.
        h.dp.sync_install(&req(2, state::ESTABLISHED, sync_kind::NEW))
            .unwrap();
        assert!(h.dp.expire(key, true).unwrap());
        assert_eq!(both(&h), ((0, 0), (0, 0)));
        assert_eq!(drain_events(&mut rb), vec![]);

        // Many installs, then Ends: counts come back to exactly zero.
        let mut keys = Vec::new();
        for i in 0..200u16 {
            let c: SocketAddr = format!("{CLIENT}:{}", 50000 + i).parse().unwrap();
            let k = conn_key(ConnProto::Tcp, c, s.address);
            let st = [state::ESTABLISHED, state::FIN_WAIT, state::CLOSE][i as usize % 3];
            let mut r = req(1 + (i as usize % 2), st, sync_kind::NEW);
            r.key = k;
            assert_eq!(h.dp.sync_install(&r).unwrap(), install_rc::INSERTED);
            keys.push(r);
        }
        let (a1, i1) = h.conns(1, &s);
        let (a2, i2) = h.conns(2, &s);
        assert_eq!((a1 + a2, i1 + i2), (67, 133));
        for mut r in keys {
            r.kind = sync_kind::END;
            assert_eq!(h.dp.sync_install(&r).unwrap(), install_rc::RETIRED);
        }
        assert_eq!(both(&h), ((0, 0), (0, 0)));
        assert_eq!(h.dp.connections().len(), 0);
    });
}

#[test]
#[ignore = "needs root"]
fn sync_install_of_a_udp_flow_and_a_full_table() {
    if !common::require_root("sync_install_of_a_udp_flow_and_a_full_table") {
        return;
    }
    let net = DpNet::new("syncudp", 1);
    net.run(|| {
        let mut h = Harness::with_table(1024);
        let mut u = service_on(53, &[(1, 1)]);
        u.key = xdpvs::state::service_key(u.address, xdpvs::config::Protocol::Udp);
        h.apply(vec![u.clone()]);
        let real = h
            .planner
            .real_id(&u.key, SocketAddr::new(dpnet::real_ip(1).into(), 53))
            .unwrap();
        let svc = h.planner.service_id(&u.key).unwrap();
        let mk = |port: u32| SyncEvent {
            key: conn_key(
                ConnProto::Udp,
                SocketAddr::new(CLIENT.parse().unwrap(), (port % 60000 + 1) as u16),
                u.address,
            ),
            real,
            service: svc,
            state: state::UDP,
            kind: sync_kind::NEW,
            _pad: [0; 3],
        };
        let mut inserted = 0u64;
        let mut full = 0;
        for p in 0..1400 {
            match h.dp.sync_install(&mk(p)).unwrap() {
                install_rc::INSERTED => inserted += 1,
                install_rc::FULL => full += 1,
                other => panic!("unexpected {other}"),
            }
        }
        println!("table of 1024: {inserted} inserted, {full} refused as full");
        assert!(full > 0, "a 1024-entry table refuses some of 1400");
        assert_eq!(
            h.conns(1, &u),
            (0, inserted),
            "UDP counts as inactive, exactly"
        );
        assert_eq!(h.dp.connections().len() as u64, inserted);
        let out = h.run(&Frame::udp(CLIENT, 1, VIP, 53).build());
        assert_eq!(out.action, XDP_TX);
        assert_eq!(Harness::real_of(&out.frame), Some(1));
    });
}

#[test]
#[ignore = "needs root"]
fn multi_buffer_frames_with_split_headers_are_passed_untouched_and_counted() {
    if !common::require_root(
        "multi_buffer_frames_with_split_headers_are_passed_untouched_and_counted",
    ) {
        return;
    }
    let net = DpNet::new("mbsplit", 1);
    net.run(|| {
        let mut h = Harness::new();
        let s = service(&[(1, 1)]);
        h.apply(vec![s.clone()]);
        let sport = 52200;
        assert_eq!(h.run(&syn(sport).build()).action, XDP_TX, "SYN forwarded");
        let input = jumbo(sport, 3000);
        // Eth 14 + IPv4 20 + TCP 20 (its fixed part, up to the checksum NAT rewrites): below
        // 54 linear bytes some of it lies in the fragments.
        for linear in [14, 20, 33, 34, 40, 53] {
            let out = h.run_linear(&input, linear);
            assert_eq!(out.action, XDP_PASS, "headers split at {linear}: passed");
            assert_eq!(out.frame, input, "split at {linear}: untouched, whole");
        }
        for linear in [54, 55, 200, 1500] {
            let out = h.run_linear(&input, linear);
            assert_eq!(out.action, XDP_TX, "headers whole in {linear} B: forwarded");
            assert_eq!(Harness::real_of(&out.frame), Some(1));
            assert_eq!(&out.frame[12..], &input[12..], "{linear}: only MACs change");
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::PASS_SPLIT_HEADERS as usize], 6);
        // Counted once the IPv4 header is read (34 linear bytes on): 3 passed, 4 forwarded.
        assert_eq!(st[stat::MULTI_BUFFER as usize], 7);
        assert_eq!(st[stat::MALFORMED as usize], 0, "a split is not malformed");
        assert_eq!(st[stat::TX as usize], 5);
        assert_eq!(
            h.conns(1, &s),
            (1, 0),
            "established by the forwarded ones only"
        );
        // A frame that really ends inside its IP header is malformed, split or not.
        let mut cut = input.clone();
        cut.truncate(30);
        assert_eq!(h.run_linear(&cut, 20).action, XDP_DROP);
        assert_eq!(h.dp.stats().unwrap()[stat::MALFORMED as usize], 1);
    });
}
