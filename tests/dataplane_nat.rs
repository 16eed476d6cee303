//! LVS-NAT through the real XDP program (BPF_PROG_TEST_RUN): the client's packets to the real's
//! address and port, the real's replies back from VIP:port, each output frame read by an
//! independent parser (`packet::parse4`) that recomputes every checksum from scratch, and the
//! connection counts exact through whole lifecycles. Needs root.

mod common;
#[path = "support/dpnet.rs"]
mod dpnet;
#[path = "support/packet.rs"]
mod packet;

use std::net::Ipv4Addr;

use dpnet::{nat_service, real_ip, real_mac, DpNet, Harness, VIP, XDP_DROP, XDP_PASS, XDP_TX};
use packet::{parse4, Frame, Parsed4, ACK, CLIENT_MAC, DIRECTOR_MAC, FIN, PSH, RST, SYN};
use xdpvs::config::Protocol;
use xdpvs_common::stat;

const CLIENT: &str = "198.18.0.1";
const REAL_PORT: u16 = 8080;

fn vip() -> Ipv4Addr {
    VIP.parse().unwrap()
}

/// The client's packet to VIP:80.
fn from_client(proto: u8, sport: u16, flags: u8, payload: usize) -> Vec<u8> {
    let f = if proto == 6 {
        Frame::tcp(CLIENT, sport, VIP, 80, flags)
    } else {
        Frame::udp(CLIENT, sport, VIP, 80)
    };
    f.payload(payload).csum().build()
}

/// Real n's reply to the client, as it reaches the director (its default route).
fn from_real(n: usize, proto: u8, cport: u16, flags: u8, payload: usize) -> Vec<u8> {
    let r = real_ip(n).to_string();
    let f = if proto == 6 {
        Frame::tcp(&r, REAL_PORT, CLIENT, cport, flags)
    } else {
        Frame::udp(&r, REAL_PORT, CLIENT, cport)
    };
    f.payload(payload)
        .csum()
        .macs(real_mac(n), DIRECTOR_MAC)
        .build()
}

/// Asserts `out` is `input` with the destination translated to real n: MACs, address and
/// port, both checksums right, every other byte as it was.
fn assert_to_real(out: &dpnet::Out, input: &[u8], n: usize) -> Parsed4 {
    assert_eq!(out.action, XDP_TX, "forwarded to the real");
    let (i, o) = (parse4(input), parse4(&out.frame));
    assert_eq!(o.dst_mac, real_mac(n), "real's MAC");
    assert_eq!(o.src_mac, DIRECTOR_MAC);
    assert_eq!((o.src, o.sport), (i.src, i.sport), "source untouched");
    assert_eq!(
        (o.dst, o.dport),
        (real_ip(n), REAL_PORT),
        "destination = the real"
    );
    assert!(o.ip_csum_ok, "IPv4 header checksum");
    if i.l4_csum_ok.is_some() {
        assert_eq!(o.l4_csum_ok, Some(true), "L4 checksum");
    } else {
        assert_eq!(o.l4_csum, 0, "a UDP checksum of 0 stays 0");
    }
    assert_eq!(o.rest, i.rest, "nothing else changed");
    assert_eq!(out.frame.len(), input.len());
    o
}

/// Asserts `out` is the real's reply `input` with the source translated back to VIP:80 and
/// sent to the client's MAC.
fn assert_to_client(out: &dpnet::Out, input: &[u8]) -> Parsed4 {
    assert_eq!(out.action, XDP_TX, "reply forwarded to the client");
    let (i, o) = (parse4(input), parse4(&out.frame));
    assert_eq!(o.dst_mac, CLIENT_MAC, "client's MAC");
    assert_eq!(o.src_mac, DIRECTOR_MAC);
    assert_eq!((o.src, o.sport), (vip(), 80), "source = VIP:80");
    assert_eq!((o.dst, o.dport), (i.dst, i.dport), "destination untouched");
    assert!(o.ip_csum_ok, "IPv4 header checksum");
    if i.l4_csum_ok.is_some() {
        assert_eq!(o.l4_csum_ok, Some(true), "L4 checksum");
    } else {
        assert_eq!(o.l4_csum, 0, "a UDP checksum of 0 stays 0");
    }
    assert_eq!(o.rest, i.rest, "nothing else changed");
    o
}

fn net(name: &str, reals: usize) -> DpNet {
    let net = DpNet::new(name, reals);
    net.client_neighbour(CLIENT);
    net
}

/// (name, from the client?, TCP flags, payload bytes, (active, inactive, embryonic) after).
type Step = (&'static str, bool, u8, usize, (u64, u64, u64));

#[test]
#[ignore = "needs root"]
fn nat_tcp_lifecycle_translates_both_ways_and_counts_exactly() {
    if !common::require_root("nat_tcp_lifecycle_translates_both_ways_and_counts_exactly") {
        return;
    }
    net("nattcp", 1).run(|| {
        let mut h = Harness::new();
        let svc = nat_service(Protocol::Tcp, REAL_PORT, &[(1, 1)]);
        h.apply(vec![svc.clone()]);
        let cp = 40000;
        let steps: &[Step] = &[
            ("client SYN", true, SYN, 0, (0, 0, 1)),
            ("real SYN-ACK", false, SYN | ACK, 0, (0, 0, 1)),
            ("client ACK", true, ACK, 0, (1, 0, 0)),
            ("client request", true, ACK | PSH, 77, (1, 0, 0)),
            ("real response", false, ACK | PSH, 1200, (1, 0, 0)),
            ("real FIN first", false, FIN | ACK, 0, (0, 1, 0)),
            ("client ACK of it", true, ACK, 0, (0, 1, 0)),
            ("client FIN", true, FIN | ACK, 0, (0, 1, 0)),
            ("real last ACK", false, ACK, 0, (0, 1, 0)),
        ];
        for (name, up, flags, payload, want) in steps {
            let input = if *up {
                from_client(6, cp, *flags, *payload)
            } else {
                from_real(1, 6, cp, *flags, *payload)
            };
            let out = h.run(&input);
            if *up {
                assert_to_real(&out, &input, 1);
            } else {
                assert_to_client(&out, &input);
            }
            assert_eq!(
                h.raw_conns(1, &svc),
                *want,
                "{name}: (active, inactive, embryonic)"
            );
        }
        let conns = h.dp.connections();
        assert_eq!(conns.len(), 1, "one flow (its reply entry is not one)");
        assert_eq!(
            conns[0].1.state,
            xdpvs_common::state::CLOSE,
            "closed from both ends"
        );
        assert_eq!(h.dp.reply_entries().len(), 1, "one reply entry");
        let stats = h.dp.stats().unwrap();
        assert_eq!(stats[stat::NAT_REPLY as usize], 4);
        assert_eq!(stats[stat::TX as usize], 9);
        assert_eq!(stats[stat::NEW_CONN as usize], 1);
        // Expiry retires the flow and its reply entry; a late reply is then not translated.
        assert!(h.dp.expire(conns[0].0, true).unwrap());
        assert_eq!(h.raw_conns(1, &svc), (0, 0, 0));
        assert_eq!(
            h.dp.reply_entries().len(),
            0,
            "the reply entry went with its flow"
        );
        let late = from_real(1, 6, cp, ACK, 0);
        let out = h.run(&late);
        assert_eq!(out.action, XDP_PASS, "not a tracked reply: the kernel's");
        assert_eq!(out.frame, late);
    });
}

#[test]
#[ignore = "needs root"]
fn nat_real_rst_and_client_rst_close_and_a_syn_reopens() {
    if !common::require_root("nat_real_rst_and_client_rst_close_and_a_syn_reopens") {
        return;
    }
    net("natrst", 2).run(|| {
        let mut h = Harness::new();
        let svc = nat_service(Protocol::Tcp, REAL_PORT, &[(1, 1)]);
        h.apply(vec![svc.clone()]);
        for (i, s) in [SYN, ACK].into_iter().enumerate() {
            let out = h.run(&from_client(6, 41000, s, 0));
            assert_eq!(out.action, XDP_TX, "step {i}");
        }
        assert_eq!(h.raw_conns(1, &svc), (1, 0, 0));
        let rst = from_real(1, 6, 41000, RST, 0);
        assert_to_client(&h.run(&rst), &rst);
        assert_eq!(h.raw_conns(1, &svc), (0, 1, 0), "the real's RST closes");
        // A new SYN on the closed tuple is scheduled afresh: one flow, one reply entry.
        let syn = from_client(6, 41000, SYN, 0);
        assert_to_real(&h.run(&syn), &syn, 1);
        assert_eq!(h.raw_conns(1, &svc), (0, 0, 1));
        assert_eq!(h.dp.connections().len(), 1);
        assert_eq!(h.dp.reply_entries().len(), 1);
        let synack = from_real(1, 6, 41000, SYN | ACK, 0);
        assert_to_client(&h.run(&synack), &synack);
    });
}

#[test]
#[ignore = "needs root"]
fn nat_udp_with_and_without_checksums_both_ways() {
    if !common::require_root("nat_udp_with_and_without_checksums_both_ways") {
        return;
    }
    net("natudp", 1).run(|| {
        let mut h = Harness::new();
        let svc = nat_service(Protocol::Udp, REAL_PORT, &[(1, 1)]);
        h.apply(vec![svc.clone()]);
        let q = from_client(17, 5353, 0, 40);
        assert_to_real(&h.run(&q), &q, 1);
        let a = from_real(1, 17, 5353, 0, 300);
        assert_to_client(&h.run(&a), &a);
        assert_eq!(h.raw_conns(1, &svc), (0, 0, 1), "one UDP flow, embryonic");
        let q2 = from_client(17, 5353, 0, 40);
        assert_to_real(&h.run(&q2), &q2, 1);
        assert_eq!(
            h.raw_conns(1, &svc),
            (0, 1, 0),
            "second packet: an inactive UDP flow"
        );
        let a2 = from_real(1, 17, 5353, 0, 10);
        assert_to_client(&h.run(&a2), &a2);
        assert_eq!(
            h.dp.reply_entries().len(),
            1,
            "the reply entry moved with the flow"
        );

        // No checksum (0) on either side stays 0.
        let q0 = Frame::udp(CLIENT, 5400, VIP, 80).payload(20).build();
        assert_eq!(parse4(&q0).l4_csum, 0);
        let out = h.run(&q0);
        assert_to_real(&out, &q0, 1);
        let a0 = Frame::udp(&real_ip(1).to_string(), REAL_PORT, CLIENT, 5400)
            .payload(20)
            .macs(real_mac(1), DIRECTOR_MAC)
            .build();
        let out = h.run(&a0);
        assert_to_client(&out, &a0);

        // A checksum that the translation turns into 0 is sent as 0xffff (0 means "none").
        // Find a payload word making it so, translating in the test and summing from scratch.
        let zeroing = (0..=u16::MAX).find_map(|w| {
            let mut f = Frame::udp(CLIENT, 5500, VIP, 80).payload(2).build();
            let n = f.len();
            f[n - 2..].copy_from_slice(&w.to_be_bytes());
            let mut t = f[34..].to_vec();
            t[2..4].copy_from_slice(&REAL_PORT.to_be_bytes());
            let src: [u8; 4] = f[26..30].try_into().unwrap();
            (packet::l4_checksum(&src, &real_ip(1).octets(), 17, &t) == 0).then(|| {
                refill_udp_csum(&mut f);
                f
            })
        });
        let q = zeroing.expect("a payload word giving a zero checksum exists");
        let out = h.run(&q);
        let o = assert_to_real(&out, &q, 1);
        assert_eq!(o.l4_csum, 0xffff, "a computed 0 is sent as 0xffff");
        let stats = h.dp.stats().unwrap();
        assert_eq!(stats[stat::NAT_REPLY as usize], 3);
        assert_eq!(
            h.raw_conns(1, &svc),
            (0, 1, 2),
            "one promoted flow, two embryos"
        );
    });
}

/// Recomputes the UDP checksum of a frame built by `Frame` (no VLAN, no IP options).
fn refill_udp_csum(f: &mut [u8]) {
    f[40..42].copy_from_slice(&[0, 0]);
    let src: [u8; 4] = f[26..30].try_into().unwrap();
    let dst: [u8; 4] = f[30..34].try_into().unwrap();
    let mut s = packet::l4_checksum(&src, &dst, 17, &f[34..]);
    if s == 0 {
        s = 0xffff;
    }
    f[40..42].copy_from_slice(&s.to_be_bytes());
}

#[test]
#[ignore = "needs root"]
fn nat_with_ip_options_vlan_and_several_reals() {
    if !common::require_root("nat_with_ip_options_vlan_and_several_reals") {
        return;
    }
    net("natopt", 3).run(|| {
        let mut h = Harness::new();
        let svc = nat_service(Protocol::Tcp, REAL_PORT, &[(1, 1), (2, 1), (3, 1)]);
        h.apply(vec![svc.clone()]);
        // IP options: the L4 header is found past them, the options carried unchanged.
        let mut f = Frame::tcp(CLIENT, 42000, VIP, 80, SYN).payload(5).csum();
        f.ip_option_words = 2;
        let input = f.build();
        let out = h.run(&input);
        assert_eq!(out.action, XDP_TX);
        let o = parse4(&out.frame);
        assert!(o.ip_csum_ok && o.l4_csum_ok == Some(true));
        assert_eq!(o.dport, REAL_PORT);
        assert_eq!(o.rest, parse4(&input).rest, "options and payload unchanged");
        let n = Harness::real_of(&out.frame).expect("a real's MAC");
        assert_eq!(o.dst, real_ip(n), "MAC and address name the same real");
        let mut r = Frame::tcp(&real_ip(n).to_string(), REAL_PORT, CLIENT, 42000, SYN | ACK)
            .payload(3)
            .csum()
            .macs(real_mac(n), DIRECTOR_MAC);
        r.ip_option_words = 1;
        let reply = r.build();
        assert_to_client(&h.run(&reply), &reply);

        // Many flows spread over the reals; every one's reply comes back from the VIP, and
        // a reply from a real the flow is not on is not translated.
        for cp in 43000..43030u16 {
            let syn = from_client(6, cp, SYN, 0);
            let out = h.run(&syn);
            let n = Harness::real_of(&out.frame).expect("real");
            assert_to_real(&out, &syn, n);
            let reply = from_real(n, 6, cp, SYN | ACK, 0);
            assert_to_client(&h.run(&reply), &reply);
            let other = n % 3 + 1;
            let wrong = from_real(other, 6, cp, SYN | ACK, 0);
            let out = h.run(&wrong);
            assert_eq!(
                out.action, XDP_PASS,
                "a reply from the wrong real is not translated"
            );
            assert_eq!(out.frame, wrong);
        }
        assert_eq!(h.dp.connections().len(), 31);
        assert_eq!(h.dp.reply_entries().len(), 31);
        let total: u64 = (1..=3).map(|n| h.raw_conns(n, &svc).2).sum();
        assert_eq!(total, 31, "every flow counted once, reply entries never");
        // The sweep counts embryos from the table: reply entries must not add to them.
        h.dp.sweep().expect("sweep");
        let total: u64 = (1..=3).map(|n| h.raw_conns(n, &svc).2).sum();
        assert_eq!(total, 31, "the recount skips reply entries");
    });
}

#[test]
#[ignore = "needs root"]
fn nat_replies_of_a_cut_real_are_dropped_and_counts_released() {
    if !common::require_root("nat_replies_of_a_cut_real_are_dropped_and_counts_released") {
        return;
    }
    net("natcut", 2).run(|| {
        let mut h = Harness::new();
        let svc = nat_service(Protocol::Tcp, REAL_PORT, &[(1, 1)]);
        h.apply(vec![svc.clone()]);
        for s in [SYN, ACK] {
            assert_eq!(h.run(&from_client(6, 44000, s, 0)).action, XDP_TX);
        }
        let id = h.real_id(1, &svc);
        let mut next = nat_service(Protocol::Tcp, REAL_PORT, &[(2, 1)]);
        next.cut_on_remove = true;
        h.apply(vec![next]);
        let reply = from_real(1, 6, 44000, ACK, 10);
        let out = h.run(&reply);
        assert_eq!(out.action, XDP_DROP, "never passed with the real's address");
        let c = h.dp.real_conns_raw(id).unwrap();
        assert_eq!((c.active, c.inactive, c.embryonic), (0, 0, 0));
        assert_eq!(h.dp.reply_entries().len(), 0);
        assert_eq!(h.dp.connections().len(), 0);
        let stats = h.dp.stats().unwrap();
        assert_eq!(stats[stat::DROP_REAL_GONE as usize], 1);
    });
}

#[test]
#[ignore = "needs root"]
fn a_nat_flow_installed_by_the_sync_peer_translates_both_ways() {
    if !common::require_root("a_nat_flow_installed_by_the_sync_peer_translates_both_ways") {
        return;
    }
    use xdpvs::ha::sync::service::conn_key;
    use xdpvs::ha::sync::wire::ConnProto;
    use xdpvs_common::{install_rc, state, sync_kind, SyncEvent};
    net("natsync", 2).run(|| {
        let mut h = Harness::new();
        let svc = nat_service(Protocol::Tcp, REAL_PORT, &[(1, 1), (2, 1)]);
        h.apply_synced(vec![svc.clone()]);
        let client: std::net::SocketAddr = format!("{CLIENT}:45000").parse().unwrap();
        let req = |st: u32, kind: u8| SyncEvent {
            key: conn_key(ConnProto::Tcp, client, svc.address),
            real: h.real_id(2, &svc),
            service: h.planner.service_id(&svc.key).unwrap(),
            state: st,
            kind,
            _pad: [0; 3],
        };
        let rc =
            h.dp.sync_install(&req(state::ESTABLISHED, sync_kind::NEW))
                .unwrap();
        assert_eq!(rc, install_rc::INSERTED);
        assert_eq!(h.raw_conns(2, &svc), (1, 0, 0));
        assert_eq!(
            h.dp.reply_entries().len(),
            1,
            "the installed NAT flow has its reply entry"
        );
        let up = from_client(6, 45000, ACK | PSH, 30);
        assert_to_real(&h.run(&up), &up, 2);
        let down = from_real(2, 6, 45000, ACK | PSH, 300);
        assert_to_client(&h.run(&down), &down);
        let rc =
            h.dp.sync_install(&req(state::ESTABLISHED, sync_kind::END))
                .unwrap();
        assert_eq!(rc, install_rc::RETIRED);
        assert_eq!(h.raw_conns(2, &svc), (0, 0, 0));
        assert_eq!(h.dp.reply_entries().len(), 0, "retired with its flow");
    });
}

/// Jumbo and GRO-sized frames (multi-buffer under BPF_PROG_TEST_RUN above about 3.5 KB) are
/// translated both ways with checksums right over the whole frame; a frame whose headers the
/// linear part does not hold is passed untouched and counted, the flow's counts unmoved.
#[test]
#[ignore = "needs root"]
fn nat_translates_multi_buffer_frames_both_ways() {
    if !common::require_root("nat_translates_multi_buffer_frames_both_ways") {
        return;
    }
    net("natmb", 1).run(|| {
        let mut h = Harness::new();
        let tcp = nat_service(Protocol::Tcp, REAL_PORT, &[(1, 1)]);
        let udp = nat_service(Protocol::Udp, REAL_PORT, &[(1, 1)]);
        h.apply(vec![tcp.clone(), udp.clone()]);
        let cp = 41000;
        assert_to_real(
            &h.run(&from_client(6, cp, SYN, 0)),
            &from_client(6, cp, SYN, 0),
            1,
        );
        let synack = from_real(1, 6, cp, SYN | ACK, 0);
        assert_to_client(&h.run(&synack), &synack);
        let sizes = [3600, 8960, 30000];
        for payload in sizes {
            let up = from_client(6, cp, ACK | PSH, payload);
            assert_to_real(&h.run(&up), &up, 1);
            let down = from_real(1, 6, cp, ACK | PSH, payload);
            assert_to_client(&h.run(&down), &down);
            let up = from_client(17, cp, 0, payload);
            assert_to_real(&h.run(&up), &up, 1);
            let down = from_real(1, 17, cp, 0, payload);
            assert_to_client(&h.run(&down), &down);
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::MULTI_BUFFER as usize], 4 * sizes.len() as u64);
        assert_eq!(st[stat::NAT_REPLY as usize], 1 + 2 * sizes.len() as u64);
        assert_eq!(h.raw_conns(1, &tcp), (1, 0, 0), "TCP established");
        // Headers split over the fragments: passed whole, never half-translated.
        let up = from_client(6, cp, ACK | PSH, 3000);
        let out = h.run_linear(&up, 40);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(out.frame, up, "untouched");
        let down = from_real(1, 6, cp, ACK | PSH, 3000);
        let out = h.run_linear(&down, 30);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(out.frame, down, "untouched");
        // The TCP checksum NAT rewrites is bytes 50..52: a split just before it is passed too.
        let out = h.run_linear(&up, 51);
        assert_eq!(out.action, XDP_PASS);
        assert_eq!(out.frame, up, "untouched");
        // UDP: the 8-byte header must be linear.
        let udp_up = from_client(17, cp, 0, 3000);
        assert_eq!(h.run_linear(&udp_up, 40).action, XDP_PASS);
        assert_to_real(&h.run_linear(&udp_up, 42), &udp_up, 1);
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::PASS_SPLIT_HEADERS as usize], 4);
        assert_eq!(st[stat::MALFORMED as usize], 0);
        assert_eq!(h.raw_conns(1, &tcp), (1, 0, 0), "counts unmoved");
    });
}
