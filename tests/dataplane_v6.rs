//! IPv6 through the real XDP program (BPF_PROG_TEST_RUN): DR and NAT over TCP and UDP, the
//! reverse NAT path, extension headers (skipped, or passed and counted), fragments, neighbour
//! discovery and echo left to the kernel, ICMPv6 errors about tracked flows sent to their real,
//! multi-buffer frames and the MTU counter. Every output frame is read by an independent parser
//! (`packet::parse6`, `packet::parse_icmp6`) that recomputes every checksum from scratch, and
//! compared with the input byte for byte outside the fields the path may change. Needs root.

mod common;
#[path = "support/dpnet.rs"]
mod dpnet;
#[path = "support/packet.rs"]
mod packet;

use std::net::Ipv6Addr;

use dpnet::{
    nat_service6, real_ip6, real_mac, service6_on, DpNet, Harness, VIP6, XDP_DROP, XDP_PASS, XDP_TX,
};
use packet::{
    ext_fragment, ext_opts, ext_routing, icmp6_frame, ip6_packet, parse6, parse_icmp6, Frame6,
    Parsed6, ACK, CLIENT_MAC, DIRECTOR_MAC, FIN, PSH, SYN,
};
use xdpvs::config::Protocol;
use xdpvs_common::stat;

const CLIENT: &str = "2001:2::1";
/// A router on the client's path that cannot pass a reply.
const ROUTER: &str = "2001:2::fe";
const REAL_PORT: u16 = 8080;

fn vip() -> Ipv6Addr {
    VIP6.parse().unwrap()
}

fn client() -> Ipv6Addr {
    CLIENT.parse().unwrap()
}

fn net(name: &str, reals: usize) -> DpNet {
    let net = DpNet::new(name, reals);
    net.client_neighbour(CLIENT);
    net
}

/// The client's packet to VIP6:`vport`.
fn from_client(proto: u8, sport: u16, vport: u16, flags: u8, payload: usize) -> Frame6 {
    let f = if proto == 6 {
        Frame6::tcp(CLIENT, sport, VIP6, vport, flags)
    } else {
        Frame6::udp(CLIENT, sport, VIP6, vport)
    };
    f.payload(payload)
}

/// Real n's NAT reply to the client, as it reaches the director.
fn from_real(n: usize, proto: u8, cport: u16, flags: u8, payload: usize) -> Frame6 {
    let r = real_ip6(n).to_string();
    let f = if proto == 6 {
        Frame6::tcp(&r, REAL_PORT, CLIENT, cport, flags)
    } else {
        Frame6::udp(&r, REAL_PORT, CLIENT, cport)
    };
    f.payload(payload).macs(real_mac(n), DIRECTOR_MAC)
}

/// DR: `out` is `input` sent to real n's MAC, every byte past the MACs as it was.
fn assert_dr(out: &dpnet::Out, input: &[u8], n: usize) {
    assert_eq!(out.action, XDP_TX, "forwarded");
    assert_eq!(Harness::real_of(&out.frame), Some(n), "to real {n}");
    assert_eq!(&out.frame[6..12], &DIRECTOR_MAC);
    assert_eq!(&out.frame[12..], &input[12..], "only the MACs change");
    let o = parse6(&out.frame);
    assert!(o.l4_csum_ok, "L4 checksum");
}

/// NAT: `out` is `input` with the destination translated to real n:REAL_PORT.
fn assert_to_real(out: &dpnet::Out, input: &[u8], n: usize) -> Parsed6 {
    assert_eq!(out.action, XDP_TX, "forwarded to the real");
    let (i, o) = (parse6(input), parse6(&out.frame));
    assert_eq!(o.dst_mac, real_mac(n), "real's MAC");
    assert_eq!(o.src_mac, DIRECTOR_MAC);
    assert_eq!((o.src, o.sport), (i.src, i.sport), "source untouched");
    assert_eq!((o.dst, o.dport), (real_ip6(n), REAL_PORT), "destination");
    assert!(o.l4_csum_ok, "L4 checksum, recomputed: {:#06x}", o.l4_csum);
    assert_eq!(
        o.hop_limit, i.hop_limit,
        "hop limit as sent (as the IPv4 TTL)"
    );
    assert_eq!(o.rest, i.rest, "nothing else changed");
    assert_eq!(out.frame.len(), input.len());
    o
}

/// NAT reply: `out` is the real's `input` with the source back to VIP6:`vport`, to the client.
fn assert_to_client(out: &dpnet::Out, input: &[u8], vport: u16) -> Parsed6 {
    assert_eq!(out.action, XDP_TX, "reply forwarded to the client");
    let (i, o) = (parse6(input), parse6(&out.frame));
    assert_eq!(o.dst_mac, CLIENT_MAC, "client's MAC");
    assert_eq!(o.src_mac, DIRECTOR_MAC);
    assert_eq!((o.src, o.sport), (vip(), vport), "source = VIP6:{vport}");
    assert_eq!((o.dst, o.dport), (i.dst, i.dport), "destination untouched");
    assert!(o.l4_csum_ok, "L4 checksum, recomputed: {:#06x}", o.l4_csum);
    assert_eq!(o.rest, i.rest, "nothing else changed");
    o
}

#[test]
#[ignore = "needs root"]
fn dr_over_ipv6_tcp_and_udp_changes_only_the_macs() {
    if !common::require_root("dr_over_ipv6_tcp_and_udp_changes_only_the_macs") {
        return;
    }
    net("v6dr", 3).run(|| {
        let mut h = Harness::new();
        let tcp = service6_on(80, Protocol::Tcp, &[(1, 1), (2, 2), (3, 3)]);
        let udp = service6_on(53, Protocol::Udp, &[(1, 1), (2, 1)]);
        h.apply(vec![tcp.clone(), udp.clone()]);
        // 60 new connections spread 1:2:3 by WLC, each SYN forwarded with only its MACs changed.
        let mut per = [0usize; 4];
        for sport in 40000..40060u16 {
            let input = from_client(6, sport, 80, SYN, 0).build();
            let out = h.run(&input);
            let n = Harness::real_of(&out.frame).expect("to a real");
            assert_dr(&out, &input, n);
            per[n] += 1;
            // The handshake's ACK and data follow the flow.
            for (flags, payload) in [(ACK, 0), (ACK | PSH, 100)] {
                let input = from_client(6, sport, 80, flags, payload).build();
                assert_dr(&h.run(&input), &input, n);
            }
        }
        assert_eq!(&per[1..], &[10, 20, 30], "weights 1:2:3");
        for (n, want) in per.iter().enumerate().skip(1) {
            assert_eq!(h.conns(n, &tcp), (*want as u64, 0), "real {n} ActiveConn");
        }
        // UDP: a flow sticks to its real; a payload of every size keeps its checksum.
        for sport in 41000..41010u16 {
            let first = from_client(17, sport, 53, 0, 20).build();
            let out = h.run(&first);
            let n = Harness::real_of(&out.frame).expect("to a real");
            assert_dr(&out, &first, n);
            for payload in [0, 1, 77, 512] {
                let input = from_client(17, sport, 53, 0, payload).build();
                assert_dr(&h.run(&input), &input, n);
            }
        }
        let (a, i) = (h.conns(1, &udp), h.conns(2, &udp));
        assert_eq!((a.0, i.0), (0, 0), "UDP is never active");
        assert_eq!(a.1 + i.1, 10, "10 UDP flows, InActConn");
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::NEW_CONN as usize], 70);
        assert_eq!(st[stat::TX as usize], 60 * 3 + 10 * 5);
        // The keys carry the family: an IPv4 packet to the same port is not the v6 service.
        let v4 = packet::Frame::tcp("198.18.0.1", 40000, "198.18.0.100", 80, SYN).build();
        assert_eq!(h.run(&v4).action, XDP_PASS);
    });
}

/// (name, from the client?, TCP flags, payload bytes, (active, inactive, embryonic) after).
type Step = (&'static str, bool, u8, usize, (u64, u64, u64));

#[test]
#[ignore = "needs root"]
fn nat_over_ipv6_tcp_translates_both_ways_and_counts_exactly() {
    if !common::require_root("nat_over_ipv6_tcp_translates_both_ways_and_counts_exactly") {
        return;
    }
    net("v6nat", 1).run(|| {
        let mut h = Harness::new();
        let svc = nat_service6(80, Protocol::Tcp, REAL_PORT, &[(1, 1)]);
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
                from_client(6, cp, 80, *flags, *payload).build()
            } else {
                from_real(1, 6, cp, *flags, *payload).build()
            };
            let out = h.run(&input);
            if *up {
                assert_to_real(&out, &input, 1);
            } else {
                assert_to_client(&out, &input, 80);
            }
            assert_eq!(h.raw_conns(1, &svc), *want, "{name}");
        }
        // Many ports and payloads: the incremental checksum is right for every one of them
        // (including those whose result folds to 0 or 0xffff).
        for cp in 41000..41300u16 {
            let syn = from_client(6, cp, 80, SYN, (cp % 7) as usize).build();
            assert_to_real(&h.run(&syn), &syn, 1);
            let back = from_real(1, 6, cp, SYN | ACK, (cp % 5) as usize).build();
            assert_to_client(&h.run(&back), &back, 80);
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::NAT_REPLY as usize], 4 + 300);
        // A reply of no connection is not ours: passed, untouched.
        let stray = from_real(1, 6, 9, ACK, 0).build();
        let out = h.run(&stray);
        assert_eq!((out.action, &out.frame), (XDP_PASS, &stray));
    });
}

#[test]
#[ignore = "needs root"]
fn nat_over_ipv6_udp_translates_both_ways_and_never_sends_a_zero_checksum() {
    if !common::require_root(
        "nat_over_ipv6_udp_translates_both_ways_and_never_sends_a_zero_checksum",
    ) {
        return;
    }
    net("v6natu", 2).run(|| {
        let mut h = Harness::new();
        let svc = nat_service6(53, Protocol::Udp, REAL_PORT, &[(1, 1), (2, 1)]);
        h.apply(vec![svc.clone()]);
        let mut zeros = 0;
        for cp in 42000..42400u16 {
            let q = from_client(17, cp, 53, 0, (cp % 13) as usize).build();
            let out = h.run(&q);
            let n = Harness::real_of(&out.frame).expect("to a real");
            let o = assert_to_real(&out, &q, n);
            assert_ne!(o.l4_csum, 0, "UDP over IPv6 always carries a checksum");
            let back = from_real(n, 17, cp, 0, (cp % 11) as usize).build();
            let o = assert_to_client(&h.run(&back), &back, 53);
            assert_ne!(o.l4_csum, 0);
            zeros += usize::from(o.l4_csum == 0xffff);
        }
        println!("replies whose checksum computed to 0 and went out as 0xffff: {zeros}");
        let (c1, c2) = (h.conns(1, &svc), h.conns(2, &svc));
        assert_eq!((c1.0, c2.0), (0, 0));
        assert_eq!(c1.1 + c2.1, 400, "400 UDP flows, InActConn");
    });
}

#[test]
#[ignore = "needs root"]
fn extension_headers_are_skipped_and_carried_through() {
    if !common::require_root("extension_headers_are_skipped_and_carried_through") {
        return;
    }
    net("v6ext", 1).run(|| {
        let mut h = Harness::new();
        let dr = service6_on(80, Protocol::Tcp, &[(1, 1)]);
        let nat = nat_service6(81, Protocol::Tcp, REAL_PORT, &[(1, 1)]);
        let natu = nat_service6(53, Protocol::Udp, REAL_PORT, &[(1, 1)]);
        h.apply(vec![dr, nat, natu]);
        type Chain = Vec<(u8, Vec<u8>)>;
        let chains: Vec<(&str, Chain)> = vec![
            ("hop-by-hop", vec![ext_opts(0, 1)]),
            ("destination options", vec![ext_opts(60, 2)]),
            ("routing (SRH, no segment left)", vec![ext_routing(2)]),
            ("atomic fragment", vec![ext_fragment(0, false)]),
            (
                "hop-by-hop, dst opts, routing, dst opts",
                vec![
                    ext_opts(0, 1),
                    ext_opts(60, 1),
                    ext_routing(1),
                    ext_opts(60, 3),
                ],
            ),
        ];
        let mut port = 43000;
        for (name, chain) in &chains {
            port += 1;
            let mut f = from_client(6, port, 80, SYN, 10);
            f.ext = chain.clone();
            let input = f.build();
            let out = h.run(&input);
            assert_eq!(out.action, XDP_TX, "DR, {name}");
            assert_dr(&out, &input, 1);
            for (vport, proto) in [(81, 6), (53, 17)] {
                let mut f = from_client(proto, port, vport, SYN, 10);
                f.ext = chain.clone();
                let input = f.build();
                let out = h.run(&input);
                assert_to_real(&out, &input, 1);
                // And the real's reply, with the same headers, back to the client.
                let mut back = from_real(1, proto, port, SYN | ACK, 3);
                back.ext = chain.clone();
                let back = back.build();
                let o = assert_to_client(&h.run(&back), &back, vport);
                assert_eq!(
                    o.rest.len(),
                    parse6(&back).rest.len(),
                    "{name}: headers kept"
                );
            }
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::PASS_IPV6_EXT as usize], 0);
        assert_eq!(st[stat::NEW_CONN as usize], 15);
    });
}

#[test]
#[ignore = "needs root"]
fn unknown_extension_headers_and_long_chains_are_passed_and_counted() {
    if !common::require_root("unknown_extension_headers_and_long_chains_are_passed_and_counted") {
        return;
    }
    net("v6unk", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![service6_on(80, Protocol::Tcp, &[(1, 1)])]);
        // AH (RFC 4302: length in 4-octet units minus 2), ESP (opaque), no next header, and
        // mobility; then chains longer than the program follows.
        let ah = (51u8, {
            let mut b = vec![0u8, 4, 0, 0];
            b.resize(24, 0x5a);
            b
        });
        let esp = (50u8, vec![0u8; 16]);
        let nonext = 59u8;
        let mobility = (135u8, vec![0u8, 0, 0, 0, 0, 0, 0, 0]);
        let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
        for (name, e) in [("AH", ah), ("ESP", esp), ("mobility", mobility)] {
            let mut f = from_client(6, 44000, 80, SYN, 0);
            f.ext = vec![ext_opts(0, 1), e];
            cases.push((name.to_string(), f.build()));
        }
        {
            // No next header: the IPv6 header says 59 and nothing follows.
            let mut f = from_client(6, 44001, 80, SYN, 0).build();
            f[14 + 6] = nonext;
            f.truncate(14 + 40);
            f[18..20].copy_from_slice(&0u16.to_be_bytes());
            cases.push(("no next header".into(), f));
        }
        let mut f = from_client(6, 44004, 80, SYN, 0);
        let mut routed = ext_routing(2);
        routed.1[3] = 1; // one segment left: the VIP is a waypoint
        f.ext = vec![routed];
        cases.push(("a routing header with a segment left".into(), f.build()));
        let mut f = from_client(6, 44002, 80, SYN, 0);
        f.ext = (0..7).map(|_| ext_opts(60, 1)).collect();
        cases.push(("7 destination-options headers".into(), f.build()));
        let mut f = from_client(6, 44003, 80, SYN, 0);
        f.ext = vec![ext_opts(0, 33)];
        cases.push(("a 264-byte hop-by-hop header".into(), f.build()));
        for (name, input) in &cases {
            let out = h.run(input);
            assert_eq!(out.action, XDP_PASS, "{name}: passed");
            assert_eq!(&out.frame, input, "{name}: untouched");
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(
            st[stat::PASS_IPV6_EXT as usize],
            cases.len() as u64,
            "each counted once in pass_ipv6_ext"
        );
        assert_eq!(st[stat::NEW_CONN as usize], 0);
        assert_eq!(h.dp.connections().len(), 0);
    });
}

#[test]
#[ignore = "needs root"]
fn ipv6_fragments_to_a_service_are_dropped_like_ipv4_ones() {
    if !common::require_root("ipv6_fragments_to_a_service_are_dropped_like_ipv4_ones") {
        return;
    }
    net("v6frag", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![
            service6_on(80, Protocol::Tcp, &[(1, 1)]),
            service6_on(53, Protocol::Udp, &[(1, 1)]),
        ]);
        for (proto, vport) in [(6, 80), (17, 53)] {
            // A first fragment (offset 0, more to come): dropped, counted.
            let mut f = from_client(proto, 45000, vport, SYN, 40);
            f.ext = vec![ext_fragment(0, true)];
            assert_eq!(h.run(&f.build()).action, XDP_DROP, "first fragment");
            // A later fragment: no ports, the kernel's.
            let mut f = from_client(proto, 45000, vport, SYN, 40);
            f.ext = vec![ext_fragment(8, false)];
            let input = f.build();
            let out = h.run(&input);
            assert_eq!(
                (out.action, &out.frame),
                (XDP_PASS, &input),
                "later fragment"
            );
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::DROP_FRAGMENT as usize], 2);
        assert_eq!(st[stat::PASS_NOT_VIP as usize], 2);
        assert_eq!(h.dp.connections().len(), 0);
    });
}

/// A neighbour-discovery or echo message from the client to `to`.
fn nd(ty: u8, to: &str) -> Vec<u8> {
    let mut body = vec![0u8; 4];
    if ty == 135 || ty == 136 || ty == 137 {
        body.extend_from_slice(&vip().octets());
    }
    if ty == 137 {
        body.extend_from_slice(&real_ip6(1).octets());
    }
    icmp6_frame(CLIENT, to, ty, 0, 0, &body[4..])
}

#[test]
#[ignore = "needs root"]
fn neighbour_discovery_and_echo_go_to_the_kernel_untouched() {
    if !common::require_root("neighbour_discovery_and_echo_go_to_the_kernel_untouched") {
        return;
    }
    net("v6nd", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![
            service6_on(80, Protocol::Tcp, &[(1, 1)]),
            nat_service6(81, Protocol::Tcp, REAL_PORT, &[(1, 1)]),
        ]);
        let solicited = "ff02::1:ff00:100";
        let cases = [
            ("router solicitation", nd(133, "ff02::2")),
            ("router advertisement", nd(134, "ff02::1")),
            ("neighbour solicitation for the VIP", nd(135, solicited)),
            ("neighbour solicitation, unicast", nd(135, VIP6)),
            ("neighbour advertisement", nd(136, VIP6)),
            ("redirect", nd(137, VIP6)),
            (
                "echo request to the VIP",
                icmp6_frame(CLIENT, VIP6, 128, 0, 7, b"ping"),
            ),
            ("echo reply", icmp6_frame(CLIENT, VIP6, 129, 0, 7, b"pong")),
        ];
        for (name, input) in &cases {
            let out = h.run(input);
            assert_eq!(out.action, XDP_PASS, "{name}");
            assert_eq!(&out.frame, input, "{name}: untouched");
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::PASS_ICMP as usize], cases.len() as u64);
        assert_eq!(st[stat::ICMP_TO_REAL as usize], 0);
    });
}

/// A Packet Too Big (type 2, `mtu`) or Destination Unreachable (type 1) from the router to the
/// VIP, quoting `quote` bytes of the reply VIP6:`vport` -> client:`cport`.
fn icmp6_about(ty: u8, proto: u8, cport: u16, vport: u16, quote: usize) -> Vec<u8> {
    let reply = if proto == 6 {
        Frame6::tcp(VIP6, vport, CLIENT, cport, ACK | PSH)
    } else {
        Frame6::udp(VIP6, vport, CLIENT, cport)
    }
    .payload(1400)
    .build();
    let q = ip6_packet(&reply);
    icmp6_frame(
        ROUTER,
        VIP6,
        ty,
        0,
        if ty == 2 { 1280 } else { 0 },
        &q[..quote.min(q.len())],
    )
}

#[test]
#[ignore = "needs root"]
fn icmpv6_errors_about_a_dr_flow_go_to_its_real_unchanged() {
    if !common::require_root("icmpv6_errors_about_a_dr_flow_go_to_its_real_unchanged") {
        return;
    }
    net("v6icmpdr", 2).run(|| {
        let mut h = Harness::new();
        h.apply(vec![
            service6_on(80, Protocol::Tcp, &[(1, 1), (2, 1)]),
            service6_on(53, Protocol::Udp, &[(1, 1), (2, 1)]),
        ]);
        for (proto, vport) in [(6u8, 80u16), (17, 53)] {
            for cport in 46000..46004u16 {
                let open = from_client(proto, cport, vport, SYN, 0).build();
                let n = Harness::real_of(&h.run(&open).frame).expect("flow opened");
                for (ty, quote) in [(2u8, 1232), (2, 48), (1, 1232)] {
                    let input = icmp6_about(ty, proto, cport, vport, quote);
                    let out = h.run(&input);
                    assert_eq!(out.action, XDP_TX, "type {ty} about flow {cport}");
                    assert_eq!(Harness::real_of(&out.frame), Some(n), "to the flow's real");
                    assert_eq!(&out.frame[12..], &input[12..], "unchanged for DR");
                    let p = parse_icmp6(&out.frame);
                    assert!(p.icmp_csum_ok);
                    assert_eq!((p.inner_src, p.inner_sport), (vip(), vport));
                }
            }
        }
        // About no tracked flow, or not from the VIP: the kernel's.
        for input in [
            icmp6_about(2, 6, 9, 80, 1232),
            icmp6_about(2, 6, 46000, 8080, 1232),
            icmp6_frame(ROUTER, VIP6, 2, 0, 1280, &[0x60, 0, 0, 0]),
        ] {
            let out = h.run(&input);
            assert_eq!((out.action, &out.frame), (XDP_PASS, &input));
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::ICMP_TO_REAL as usize], 2 * 4 * 3);
        assert_eq!(st[stat::PASS_ICMP as usize], 3);
    });
}

#[test]
#[ignore = "needs root"]
fn icmpv6_errors_about_a_nat_flow_are_translated_for_its_real() {
    if !common::require_root("icmpv6_errors_about_a_nat_flow_are_translated_for_its_real") {
        return;
    }
    net("v6icmpnat", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![
            nat_service6(80, Protocol::Tcp, REAL_PORT, &[(1, 1)]),
            nat_service6(53, Protocol::Udp, REAL_PORT, &[(1, 1)]),
        ]);
        for (proto, vport) in [(6u8, 80u16), (17, 53)] {
            for cport in 47000..47050u16 {
                let open = from_client(proto, cport, vport, SYN, 0).build();
                assert_eq!(h.run(&open).action, XDP_TX);
                for quote in [1232, 48, 44] {
                    let input = icmp6_about(2, proto, cport, vport, quote);
                    let out = h.run(&input);
                    assert_eq!(out.action, XDP_TX, "PTB quoting {quote} B");
                    assert_eq!(Harness::real_of(&out.frame), Some(1));
                    let (i, o) = (parse_icmp6(&input), parse_icmp6(&out.frame));
                    assert_eq!(o.src, i.src, "from the router still");
                    assert_eq!(o.dst, real_ip6(1), "outer destination = the real");
                    assert!(o.icmp_csum_ok, "ICMPv6 checksum with its pseudo-header");
                    assert_eq!((o.icmp_type, o.code, o.mtu), (2, 0, 1280));
                    assert_eq!(
                        (o.inner_src, o.inner_sport),
                        (real_ip6(1), REAL_PORT),
                        "quoted source = the real, as it sent the packet"
                    );
                    assert_eq!((o.inner_dst, o.inner_dport), (client(), cport));
                    assert_eq!(out.frame.len(), input.len());
                    // Only the fields NAT owns changed.
                    let diff: Vec<usize> = (0..input.len())
                        .filter(|&k| input[k] != out.frame[k])
                        .filter(|&k| !(0..12).contains(&k))
                        .filter(|&k| !(38..54).contains(&k)) // outer destination
                        .filter(|&k| !(56..58).contains(&k)) // ICMPv6 checksum
                        .filter(|&k| !(70..86).contains(&k)) // quoted source
                        .filter(|&k| !(102..104).contains(&k)) // quoted source port
                        .filter(|&k| k != 102 + if proto == 6 { 16 } else { 6 })
                        .filter(|&k| k != 103 + if proto == 6 { 16 } else { 6 })
                        .collect();
                    assert!(diff.is_empty(), "other bytes changed: {diff:?}");
                }
            }
        }
        // A complete small quote: its L4 checksum is recomputed and right.
        let open = from_client(17, 47999, 53, 0, 0).build();
        assert_eq!(h.run(&open).action, XDP_TX);
        let reply = Frame6::udp(VIP6, 53, CLIENT, 47999).payload(8).build();
        let q = ip6_packet(&reply);
        let input = icmp6_frame(ROUTER, VIP6, 1, 4, 0, &q);
        let out = h.run(&input);
        assert_eq!(out.action, XDP_TX);
        let o = parse_icmp6(&out.frame);
        assert!(o.icmp_csum_ok);
        assert_eq!(
            o.inner_l4_csum_ok,
            Some(true),
            "quoted UDP checksum, as the real sent it"
        );
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::ICMP_TO_REAL as usize], 2 * 50 * 3 + 1);
    });
}

#[test]
#[ignore = "needs root"]
fn ipv6_multi_buffer_frames_are_forwarded_whole_and_counted() {
    if !common::require_root("ipv6_multi_buffer_frames_are_forwarded_whole_and_counted") {
        return;
    }
    net("v6mb", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![
            service6_on(80, Protocol::Tcp, &[(1, 1)]),
            nat_service6(81, Protocol::Tcp, REAL_PORT, &[(1, 1)]),
        ]);
        let first = from_client(6, 48000, 80, SYN, 0).build();
        assert_eq!(h.run(&first).action, XDP_TX);
        for payload in [1400, 3400, 3600, 8960, 30000] {
            let input = from_client(6, 48000, 80, ACK, payload).build();
            assert_dr(&h.run(&input), &input, 1);
        }
        let st = h.dp.stats().unwrap();
        // 1400 and 3400 fit the linear part; the others are multi-buffer frames. dpa has MTU
        // 1500: every frame but the first exceeds it.
        assert_eq!(st[stat::MULTI_BUFFER as usize], 3, "multi-buffer frames");
        assert_eq!(st[stat::OVER_MTU as usize], 4, "frames above the MTU");
        // NAT of a multi-buffer frame: the headers are linear, so it is translated whole.
        let syn = from_client(6, 48001, 81, SYN, 0).build();
        assert_to_real(&h.run(&syn), &syn, 1);
        let big = from_client(6, 48001, 81, ACK, 8960).build();
        assert_to_real(&h.run(&big), &big, 1);
        // A payload length past the whole frame is a lie: dropped, never forwarded.
        let mut lie = from_client(6, 48000, 80, ACK, 3600).build();
        lie[18..20].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(h.run(&lie).action, XDP_DROP);
        assert_eq!(h.dp.stats().unwrap()[stat::MALFORMED as usize], 1);
    });
}

/// The connection-sync path carries IPv6 end to end: director A's dataplane reports an IPv6 NAT
/// flow, the event is named for the peer (`to_wire`), sealed and opened as a sync datagram, made
/// an install request with director B's ids (`to_install`) and installed in B's dataplane; B then
/// forwards the flow's next packet, translated, to the same real, and the real's reply back.
#[test]
#[ignore = "needs root"]
fn an_ipv6_flow_synced_to_the_peer_continues_there() {
    if !common::require_root("an_ipv6_flow_synced_to_the_peer_continues_there") {
        return;
    }
    use xdpvs::ha::sync::{service, wire};
    net("v6sync", 3).run(|| {
        let svc = nat_service6(80, Protocol::Tcp, REAL_PORT, &[(1, 1), (2, 1), (3, 1)]);
        let mut a = Harness::new();
        a.apply_synced(vec![svc.clone()]);
        // B knows the reals in another order, so its ids differ from A's.
        let mut svc_b = svc.clone();
        svc_b.reals.reverse();
        let mut b = Harness::new();
        b.apply(vec![svc_b.clone()]);
        let mut rb = a.dp.take_sync_events().expect("ring buffer");
        let cport = 49000;
        let syn = from_client(6, cport, 80, SYN, 0).build();
        let n = Harness::real_of(&a.run(&syn).frame).expect("to a real");
        let ack = from_client(6, cport, 80, ACK, 0).build();
        assert_to_real(&a.run(&ack), &ack, n);
        let mut events = Vec::new();
        while let Some(item) = rb.next() {
            let ev: xdpvs_common::SyncEvent =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            events.push(ev);
        }
        assert_eq!(events.len(), 1, "one NEW event: {events:?}");
        let real = a.dp.real(events[0].real).expect("REALS entry");
        let conn = service::to_wire(&events[0], &real).expect("named for the peer");
        assert_eq!(conn.client, format!("[{CLIENT}]:{cport}").parse().unwrap());
        assert_eq!(conn.service, format!("[{VIP6}]:80").parse().unwrap());
        assert_eq!(
            conn.real,
            std::net::SocketAddr::new(real_ip6(n).into(), REAL_PORT)
        );
        let key = wire::Key::from_bytes([7; 32]);
        let mut tx = wire::Sender::new(&key, [1; 16], 1);
        let datagram = tx.seal(&wire::Message::Events(vec![conn])).expect("sealed");
        let got = match wire::Receiver::new(&key).open(&datagram).expect("opened") {
            wire::Message::Events(evs) => evs,
            other => panic!("{other:?}"),
        };
        assert_eq!(got, vec![conn]);
        let req = service::to_install(
            &got[0],
            |k| b.planner.service_id(k),
            |k, addr| b.planner.real_id(k, addr),
        )
        .expect("an install request with B's ids");
        assert_eq!(
            b.dp.sync_install(&req).expect("install"),
            xdpvs_common::install_rc::INSERTED
        );
        // B continues the flow: same real, translated, and the reply back from the VIP.
        let data = from_client(6, cport, 80, ACK | PSH, 100).build();
        assert_to_real(&b.run(&data), &data, n);
        let reply = from_real(n, 6, cport, ACK | PSH, 200).build();
        assert_to_client(&b.run(&reply), &reply, 80);
        assert_eq!(b.conns(n, &svc_b), (1, 0), "ActiveConn on B");
    });
}

/// Multi-buffer IPv6 frames whose headers the linear part does not hold whole (the IPv6 header,
/// an extension header, or the TCP header up to its checksum) are passed untouched and counted
/// (`pass_split_headers`), in DR and NAT, as IPv4 ones are; extension headers in the fragments
/// are still walked (they are read with `bpf_xdp_load_bytes`), but the L4 header must be linear.
#[test]
#[ignore = "needs root"]
fn ipv6_frames_with_split_headers_are_passed_untouched_and_counted() {
    if !common::require_root("ipv6_frames_with_split_headers_are_passed_untouched_and_counted") {
        return;
    }
    net("v6split", 1).run(|| {
        let mut h = Harness::new();
        let dr = service6_on(80, Protocol::Tcp, &[(1, 1)]);
        let nat = nat_service6(81, Protocol::Tcp, REAL_PORT, &[(1, 1)]);
        h.apply(vec![dr.clone(), nat.clone()]);
        let mut passed = 0;
        for (vport, ext) in [(80u16, false), (81, false), (80, true), (81, true)] {
            let sport = 49100 + vport + if ext { 10 } else { 0 };
            let mk = |flags, payload| {
                let mut f = from_client(6, sport, vport, flags, payload);
                if ext {
                    f.ext = vec![ext_opts(0, 1)];
                }
                f.build()
            };
            assert_eq!(h.run(&mk(SYN, 0)).action, XDP_TX, "SYN forwarded");
            let input = mk(ACK | PSH, 3000);
            // Eth 14 + IPv6 40 (+ hop-by-hop 8) + TCP 20 (up to its checksum and urgent pointer).
            let whole = 74 + if ext { 8 } else { 0 };
            for linear in [14, 20, 53, 54, 58, 60, whole - 1] {
                let out = h.run_linear(&input, linear);
                assert_eq!(
                    out.action, XDP_PASS,
                    "{vport} ext {ext}: split at {linear}: passed"
                );
                assert_eq!(out.frame, input, "split at {linear}: untouched");
                passed += 1;
            }
            for linear in [whole, 200, 1500] {
                let out = h.run_linear(&input, linear);
                if vport == 80 {
                    assert_dr(&out, &input, 1);
                } else {
                    assert_to_real(&out, &input, 1);
                }
            }
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::PASS_SPLIT_HEADERS as usize], passed);
        assert_eq!(st[stat::MALFORMED as usize], 0, "a split is not malformed");
        assert_eq!(
            h.conns(1, &dr),
            (2, 0),
            "established by the forwarded ones only"
        );
        assert_eq!(h.conns(1, &nat), (2, 0));
        // A frame that really ends inside its IPv6 header is malformed, split or not.
        let mut cut = from_client(6, 49999, 80, ACK, 3000).build();
        cut.truncate(40);
        assert_eq!(h.run_linear(&cut, 20).action, XDP_DROP);
        assert_eq!(h.dp.stats().unwrap()[stat::MALFORMED as usize], 1);
    });
}

/// Persistence over IPv6: the template key is the client's 128-bit address masked to the
/// service's prefix, so with `/64` every client of a /64 keeps one real and other /64s spread by
/// weight; with `/128` two addresses of one /64 are two clients.
#[test]
#[ignore = "needs root"]
fn ipv6_persistence_masks_the_whole_address() {
    if !common::require_root("ipv6_persistence_masks_the_whole_address") {
        return;
    }
    net("v6pers", 3).run(|| {
        let mut h = Harness::new();
        let mut by64 = service6_on(80, Protocol::Tcp, &[(1, 1), (2, 2), (3, 3)]);
        by64.persist = Some((300, 64));
        let mut by128 = service6_on(81, Protocol::Tcp, &[(1, 1), (2, 1), (3, 1)]);
        by128.persist = Some((300, 128));
        h.apply(vec![by64, by128]);
        let connect = |client: &str, sport: u16, vport: u16| {
            let f = Frame6::tcp(client, sport, VIP6, vport, SYN).build();
            let out = h.run(&f);
            assert_eq!(out.action, XDP_TX, "SYN from [{client}]:{sport}");
            Harness::real_of(&out.frame).expect("to a real")
        };
        // 60 client /64s: spread exactly 1:2:3; then 5 more addresses and ports in each /64
        // (the host half differs, the /64 is the same) land on that /64's real.
        let mut per = [0usize; 4];
        for net64 in 0..60u16 {
            let r = connect(&format!("2001:db8:0:{net64:x}::1"), 40000, 80);
            per[r] += 1;
            for host in 2..7u16 {
                let again = connect(&format!("2001:db8:0:{net64:x}::{host:x}"), 41000 + host, 80);
                assert_eq!(again, r, "client /64 {net64:x}: same real");
            }
        }
        assert_eq!(
            &per[1..],
            &[10, 20, 30],
            "one template per /64, spread by weight"
        );
        let hits = h.dp.stats().unwrap()[stat::PERSIST_HIT as usize];
        assert_eq!(
            hits,
            60 * 5,
            "every later connection of a /64 placed by its template"
        );
        // /128: the addresses of one /64 are separate clients, spread over the three reals.
        let reals: std::collections::HashSet<usize> = (1..=30u16)
            .map(|host| connect(&format!("2001:db8:1::{host:x}"), 42000, 81))
            .collect();
        assert_eq!(reals.len(), 3, "/128 keys each address apart: {reals:?}");
        // And one of them keeps its real.
        let r = connect("2001:db8:1::1", 42001, 81);
        assert_eq!(connect("2001:db8:1::1", 42002, 81), r);
    });
}

/// A mid-flow IPv6 segment of no flow under a load-based scheduler (the daemon restarted
/// `--fresh`, the entry evicted) is answered with a RST, as for IPv4, so the client fails at
/// once; one with extension headers, or itself a RST, is dropped. Nothing is tracked.
#[test]
#[ignore = "needs root"]
fn lost_ipv6_flows_get_a_reset() {
    if !common::require_root("lost_ipv6_flows_get_a_reset") {
        return;
    }
    net("v6rst", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![service6_on(80, Protocol::Tcp, &[(1, 1)])]);
        for (flags, payload) in [(ACK, 0), (ACK | PSH, 300), (FIN, 10), (PSH, 5)] {
            let seg = Frame6::tcp(CLIENT, 45000, VIP6, 80, flags)
                .payload(payload)
                .build();
            let out = h.run(&seg);
            assert_eq!(out.action, XDP_TX, "flags {flags:#x}: answered");
            packet::check_reset6(&seg, &out.frame)
                .unwrap_or_else(|e| panic!("flags {flags:#x}: {e}"));
        }
        let with_ext = Frame6::tcp(CLIENT, 45001, VIP6, 80, ACK)
            .ext(ext_opts(60, 1))
            .build();
        assert_eq!(h.run(&with_ext).action, XDP_DROP);
        let rst = Frame6::tcp(CLIENT, 45002, VIP6, 80, packet::RST).build();
        assert_eq!(h.run(&rst).action, XDP_DROP, "never a RST for a RST");
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::MISS_RESET as usize], 4);
        assert_eq!(st[stat::DROP_NO_CONN as usize], 2);
        assert!(h.dp.connections().is_empty());
    });
}
