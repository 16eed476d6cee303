//! Tunnel forwarding (LVS-TUN) through the real XDP program (BPF_PROG_TEST_RUN): IPIP and GUE
//! encapsulation with exact outer headers, every checksum recomputed from scratch by the test,
//! the client's packet carried byte for byte; a packet the tunnel's overhead pushes past the
//! path MTU answered with ICMP "fragmentation needed" (DF) or dropped (no DF), both counted.
//! This kernel has no ipip/fou modules: these tests are the only coverage. Needs root.

mod common;
#[path = "support/dpnet.rs"]
mod dpnet;
#[path = "support/packet.rs"]
mod packet;

use std::net::Ipv4Addr;

use dpnet::{real_ip, real_mac, service_on, DpNet, Harness, VIP, XDP_DROP, XDP_TX};
use packet::{checksum, parse_icmp4, Frame, ACK, CLIENT_MAC, DIRECTOR_MAC, PSH, SYN};
use xdpvs::state::DesiredService;
use xdpvs_common::{fwd_kind, stat};

const CLIENT: &str = "198.18.0.1";
/// The director's address on the test interface: the outer source the FIB picks.
const DIRECTOR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const GUE_PORT: u16 = 6080;

fn tunnel(port: u16, gue: bool) -> DesiredService {
    let mut s = service_on(port, &[(1, 1)]);
    s.fwd = if gue { fwd_kind::GUE } else { fwd_kind::TUNNEL };
    s.tunnel_port = if gue { GUE_PORT } else { 0 };
    s
}

/// Checks `out` is `input`'s IP packet encapsulated to real 1 (GUE if `gue`), and returns the
/// UDP source port (0 for IPIP).
fn assert_encapsulated(out: &dpnet::Out, input: &[u8], gue: bool) -> u16 {
    assert_eq!(out.action, XDP_TX, "sent to the real");
    let f = &out.frame;
    let inner = &input[14..];
    let overhead = if gue { 32 } else { 20 };
    assert_eq!(
        f.len(),
        input.len() + overhead,
        "the outer headers only were added"
    );
    assert_eq!(&f[0..6], &real_mac(1), "real's MAC");
    assert_eq!(&f[6..12], &DIRECTOR_MAC);
    assert_eq!(&f[12..14], &[0x08, 0x00], "outer IPv4");
    let ip = &f[14..34];
    assert_eq!(ip[0], 0x45, "version 4, no options");
    assert_eq!(ip[1], inner[1], "TOS copied");
    assert_eq!(
        u16::from_be_bytes([ip[2], ip[3]]) as usize,
        inner.len() + overhead,
        "outer total length"
    );
    assert_eq!(&ip[4..6], &[0, 0], "id 0");
    assert_eq!(
        u16::from_be_bytes([ip[6], ip[7]]),
        u16::from_be_bytes([inner[6], inner[7]]) & 0x4000,
        "DF copied, no fragment"
    );
    assert_eq!(ip[8], 64, "TTL");
    assert_eq!(ip[9], if gue { 17 } else { 4 }, "protocol");
    assert_eq!(checksum(ip), 0, "outer header checksum");
    assert_eq!(
        Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap()),
        DIRECTOR
    );
    assert_eq!(
        Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap()),
        real_ip(1)
    );
    let mut sport = 0;
    if gue {
        let udp = &f[34..42];
        sport = u16::from_be_bytes([udp[0], udp[1]]);
        assert!(sport >= 49152, "source port in the dynamic range: {sport}");
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), GUE_PORT);
        assert_eq!(
            u16::from_be_bytes([udp[4], udp[5]]) as usize,
            8 + 4 + inner.len(),
            "UDP length"
        );
        assert_eq!(&udp[6..8], &[0, 0], "no UDP checksum over IPv4");
        assert_eq!(&f[42..46], &[0, 4, 0, 0], "GUE v0, no options, IPIP");
    }
    assert_eq!(
        &f[14 + overhead..],
        inner,
        "the client's packet, byte for byte"
    );
    sport
}

#[test]
#[ignore = "needs root"]
fn ipip_and_gue_encapsulate_every_packet_of_a_flow_exactly() {
    if !common::require_root("ipip_and_gue_encapsulate_every_packet_of_a_flow_exactly") {
        return;
    }
    DpNet::new("tun", 1).run(|| {
        let mut h = Harness::new();
        let (ipip, gue) = (tunnel(80, false), tunnel(81, true));
        h.apply(vec![ipip.clone(), gue.clone()]);
        for (svc, is_gue) in [(&ipip, false), (&gue, true)] {
            let port = svc.address.port();
            let mut sports = Vec::new();
            for (flags, payload) in [(SYN, 0), (ACK, 0), (ACK | PSH, 1000), (ACK, 0)] {
                let mut fr = Frame::tcp(CLIENT, 40000, VIP, port, flags).csum();
                fr.payload = payload;
                let input = fr.build();
                sports.push(assert_encapsulated(&h.run(&input), &input, is_gue));
            }
            assert!(
                sports.windows(2).all(|w| w[0] == w[1]),
                "one flow, one outer source port: {sports:?}"
            );
            assert_eq!(
                h.conns(1, svc),
                (1, 0),
                "the flow is tracked as established"
            );
        }
        // A VLAN-tagged flow keeps its tag ahead of the outer header.
        let mut tagged = Frame::tcp(CLIENT, 40001, VIP, 80, SYN).csum();
        tagged.vlan = Some(7);
        let input = tagged.build();
        let out = h.run(&input);
        assert_eq!(out.action, XDP_TX);
        assert_eq!(
            &out.frame[12..18],
            &[0x81, 0x00, 0, 7, 0x08, 0x00],
            "tag, then IPv4"
        );
        assert_eq!(out.frame[18], 0x45);
        assert_eq!(checksum(&out.frame[18..38]), 0, "outer checksum");
        assert_eq!(&out.frame[38..], &input[18..], "the packet, byte for byte");
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::TX as usize], 9);
        assert_eq!(st[stat::MALFORMED as usize], 0);
    });
}

#[test]
#[ignore = "needs root"]
fn packets_too_big_for_the_tunnel_get_frag_needed_or_are_dropped() {
    if !common::require_root("packets_too_big_for_the_tunnel_get_frag_needed_or_are_dropped") {
        return;
    }
    DpNet::new("tunmtu", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![tunnel(80, false), tunnel(81, true)]);
        // The test interface's MTU is 1500: an inner packet of 1481 bytes and more does not fit
        // IPIP (20 bytes), of 1469 and more not GUE (32 bytes).
        for (port, overhead) in [(80u16, 20usize), (81, 32)] {
            let fits = 1500 - overhead;
            let mut ok = Frame::tcp(CLIENT, 41000, VIP, port, SYN).csum();
            ok.payload = fits - 40;
            let input = ok.build();
            assert_encapsulated(&h.run(&input), &input, port == 81);
            for payload in [fits - 40 + 1, 3000, 30000] {
                let mut fr = Frame::tcp(CLIENT, 41000, VIP, port, ACK | PSH).csum();
                fr.payload = payload;
                let input = fr.build();
                let out = h.run(&input);
                assert_eq!(
                    out.action, XDP_TX,
                    "{payload} B: an error back to the client"
                );
                assert_eq!(
                    out.frame.len(),
                    14 + 20 + 8 + 28,
                    "IP header + 8 bytes quoted"
                );
                let p = parse_icmp4(&out.frame);
                assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, DIRECTOR_MAC));
                assert_eq!(p.src, VIP.parse::<Ipv4Addr>().unwrap(), "from the VIP");
                assert_eq!(p.dst, CLIENT.parse::<Ipv4Addr>().unwrap());
                assert!(p.ip_csum_ok && p.icmp_csum_ok, "checksums");
                assert_eq!((p.icmp_type, p.code), (3, 4), "fragmentation needed");
                let mtu = u16::from_be_bytes([out.frame[40], out.frame[41]]) as usize;
                assert_eq!(mtu, fits, "next-hop MTU = path MTU - tunnel overhead");
                assert_eq!(
                    &out.frame[42..70],
                    &input[14..42],
                    "the packet's first 28 bytes"
                );
                assert!(p.inner_ip_csum_ok);
                assert_eq!((p.inner_sport, p.inner_dport), (41000, port));
            }
            // Without DF the client allows fragmenting, which XDP cannot do: dropped.
            let mut nodf = Frame::tcp(CLIENT, 41000, VIP, port, ACK).csum();
            nodf.payload = 3000;
            nodf.frag = 0;
            assert_eq!(h.run(&nodf.build()).action, XDP_DROP);
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::TUNNEL_FRAG_NEEDED as usize], 6);
        assert_eq!(st[stat::DROP_TUNNEL_MTU as usize], 2);
        assert_eq!(st[stat::MALFORMED as usize], 0);
    });
}

const CLIENT6: &str = "2001:2::1";

fn tunnel6(port: u16, gue: bool) -> DesiredService {
    let mut s = dpnet::service6_on(port, xdpvs::config::Protocol::Tcp, &[(1, 1)]);
    s.fwd = if gue { fwd_kind::GUE } else { fwd_kind::TUNNEL };
    s.tunnel_port = if gue { GUE_PORT } else { 0 };
    s
}

/// The IPv6 twin of [`assert_encapsulated`]: the outer IPv6 header (and UDP, GUE) byte by byte,
/// GUE's UDP checksum recomputed over the whole datagram.
fn assert_encapsulated6(out: &dpnet::Out, input: &[u8], gue: bool) {
    use std::net::Ipv6Addr;
    assert_eq!(out.action, XDP_TX, "sent to the real");
    let f = &out.frame;
    let inner = &input[14..];
    let overhead = if gue { 52 } else { 40 };
    assert_eq!(f.len(), input.len() + overhead);
    assert_eq!(&f[0..6], &real_mac(1));
    assert_eq!(&f[6..12], &DIRECTOR_MAC);
    assert_eq!(&f[12..14], &[0x86, 0xdd], "outer IPv6");
    let ip = &f[14..54];
    assert_eq!(ip[0] >> 4, 6, "version");
    let tc = ((ip[0] & 0x0f) << 4) | (ip[1] >> 4);
    let inner_tc = ((inner[0] & 0x0f) << 4) | (inner[1] >> 4);
    assert_eq!(tc, inner_tc, "traffic class copied");
    assert_eq!(
        u16::from_be_bytes([ip[4], ip[5]]) as usize,
        inner.len() + overhead - 40,
        "payload length"
    );
    assert_eq!(ip[6], if gue { 17 } else { 41 }, "next header");
    assert_eq!(ip[7], 64, "hop limit");
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    assert_eq!(
        src,
        "2001:2::2".parse::<Ipv6Addr>().unwrap(),
        "the director's address"
    );
    assert_eq!(dst, dpnet::real_ip6(1));
    if gue {
        let udp = &f[54..];
        assert!(u16::from_be_bytes([udp[0], udp[1]]) >= 49152);
        assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), GUE_PORT);
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]) as usize, udp.len());
        assert_ne!(&udp[6..8], &[0, 0], "a UDP checksum is mandatory over IPv6");
        assert_eq!(
            packet::l4_checksum6(&src, &dst, 17, udp),
            0,
            "UDP checksum over the whole datagram"
        );
        assert_eq!(&udp[8..12], &[0, 41, 0, 0], "GUE v0, IPv6 inside");
    }
    assert_eq!(
        &f[14 + overhead..],
        inner,
        "the client's packet, byte for byte"
    );
}

#[test]
#[ignore = "needs root"]
fn ipv6_in_ipv6_and_gue_over_ipv6_carry_the_packet_exactly() {
    if !common::require_root("ipv6_in_ipv6_and_gue_over_ipv6_carry_the_packet_exactly") {
        return;
    }
    DpNet::new("tun6", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![tunnel6(80, false), tunnel6(81, true)]);
        for (port, gue) in [(80u16, false), (81, true)] {
            for (flags, payload) in [(SYN, 0), (ACK, 0), (ACK | PSH, 1200)] {
                let input = packet::Frame6::tcp(CLIENT6, 40000, dpnet::VIP6, port, flags)
                    .payload(payload)
                    .build();
                assert_encapsulated6(&h.run(&input), &input, gue);
            }
        }
        // UDP datagrams, through a UDP service of each kind.
        let mut udp = Vec::new();
        for gue in [false, true] {
            let mut u =
                dpnet::service6_on(90 + gue as u16, xdpvs::config::Protocol::Udp, &[(1, 1)]);
            u.fwd = if gue { fwd_kind::GUE } else { fwd_kind::TUNNEL };
            u.tunnel_port = if gue { GUE_PORT } else { 0 };
            udp.push(u);
        }
        h.apply(vec![
            tunnel6(80, false),
            tunnel6(81, true),
            udp[0].clone(),
            udp[1].clone(),
        ]);
        for gue in [false, true] {
            let input = packet::Frame6::udp(CLIENT6, 5353, dpnet::VIP6, 90 + gue as u16)
                .payload(300)
                .build();
            assert_encapsulated6(&h.run(&input), &input, gue);
        }
        // GUE of a packet with extension headers: its checksum is not computed here; dropped.
        let ext = packet::Frame6::tcp(CLIENT6, 40001, dpnet::VIP6, 81, SYN)
            .ext(packet::ext_opts(60, 1))
            .build();
        assert_eq!(h.run(&ext).action, XDP_DROP);
        // Plain IPv6-in-IPv6 carries it.
        let ext80 = packet::Frame6::tcp(CLIENT6, 40001, dpnet::VIP6, 80, SYN)
            .ext(packet::ext_opts(60, 1))
            .build();
        assert_encapsulated6(&h.run(&ext80), &ext80, false);
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::DROP_TUNNEL_EXT as usize], 1);
        assert_eq!(st[stat::MALFORMED as usize], 0);
    });
}

#[test]
#[ignore = "needs root"]
fn ipv6_packets_too_big_for_the_tunnel_get_packet_too_big() {
    if !common::require_root("ipv6_packets_too_big_for_the_tunnel_get_packet_too_big") {
        return;
    }
    DpNet::new("tun6mtu", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![tunnel6(80, false), tunnel6(81, true)]);
        for (port, overhead) in [(80u16, 40usize), (81, 52)] {
            let fits = 1500 - overhead;
            let ok = packet::Frame6::tcp(CLIENT6, 41000, dpnet::VIP6, port, SYN)
                .payload(fits - 60)
                .build();
            assert_encapsulated6(&h.run(&ok), &ok, port == 81);
            for payload in [fits - 60 + 1, 9000] {
                let input = packet::Frame6::tcp(CLIENT6, 41000, dpnet::VIP6, port, ACK)
                    .payload(payload)
                    .build();
                let out = h.run(&input);
                assert_eq!(
                    out.action, XDP_TX,
                    "{payload} B: an error back to the client"
                );
                assert_eq!(out.frame.len(), 14 + 40 + 8 + 48);
                let p = packet::parse_icmp6(&out.frame);
                assert_eq!((p.dst_mac, p.src_mac), (CLIENT_MAC, DIRECTOR_MAC));
                assert_eq!(p.src.to_string(), dpnet::VIP6, "from the VIP");
                assert_eq!(p.dst.to_string(), CLIENT6);
                assert_eq!((p.icmp_type, p.code), (2, 0), "packet too big");
                assert!(p.icmp_csum_ok, "ICMPv6 checksum");
                assert_eq!(p.mtu as usize, fits, "path MTU less the tunnel's overhead");
                assert_eq!(
                    &out.frame[62..110],
                    &input[14..62],
                    "the first 48 bytes quoted"
                );
                assert_eq!((p.inner_sport, p.inner_dport), (41000, port));
            }
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::TUNNEL_FRAG_NEEDED as usize], 4);
    });
}
