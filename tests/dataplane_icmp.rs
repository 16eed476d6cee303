//! ICMP errors about tracked flows through the real XDP program (BPF_PROG_TEST_RUN): a
//! destination-unreachable to the VIP whose quote is a tracked flow's packet goes to the flow's
//! real, as the real itself would have received it had it sent its reply directly: unchanged
//! for DR, translated for NAT. Output frames are compared byte for byte with frames built from
//! scratch, and read by an independent parser (`packet::parse_icmp4`) that recomputes every
//! checksum (outer IP, ICMP, quoted IP, quoted TCP/UDP). Other ICMP reaches the kernel
//! untouched. Needs root.

mod common;
#[path = "support/dpnet.rs"]
mod dpnet;
#[path = "support/packet.rs"]
mod packet;

use dpnet::{
    nat_service, nat_service_on, real_ip, real_mac, service, service_on, DpNet, Harness, VIP,
    XDP_PASS, XDP_TX,
};
use packet::{
    icmp_frame, icmp_unreach, ip_packet, parse4, parse_icmp4, Frame, ACK, DIRECTOR_MAC, PSH, SYN,
};
use xdpvs::config::Protocol;
use xdpvs_common::stat;

const CLIENT: &str = "198.18.0.1";
/// A router on the client's path that cannot pass the reply.
const ROUTER: &str = "198.18.0.254";
const REAL_PORT: u16 = 8080;

/// `frame` as the director sends it to real `n`: only the MACs changed.
fn with_real_macs(frame: &[u8], n: usize) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[0..6].copy_from_slice(&real_mac(n));
    f[6..12].copy_from_slice(&DIRECTOR_MAC);
    f
}

/// Opens a TCP (SYN) or UDP flow from the client's `cport` to VIP:`vport`; its real.
fn open(h: &Harness, proto: u8, cport: u16, vport: u16) -> usize {
    let f = if proto == 6 {
        Frame::tcp(CLIENT, cport, VIP, vport, SYN)
    } else {
        Frame::udp(CLIENT, cport, VIP, vport)
    };
    let out = h.run(&f.csum().build());
    assert_eq!(out.action, XDP_TX, "flow opened");
    Harness::real_of(&out.frame).expect("to a real")
}

#[test]
#[ignore = "needs root"]
fn icmp_unreachable_about_a_dr_flow_goes_to_its_real_unchanged() {
    if !common::require_root("icmp_unreachable_about_a_dr_flow_goes_to_its_real_unchanged") {
        return;
    }
    DpNet::new("icmpdr", 2).run(|| {
        let mut h = Harness::new();
        let mut dns = service_on(53, &[(1, 1), (2, 1)]);
        dns.key = xdpvs::state::service_key(dns.address, Protocol::Udp);
        h.apply(vec![service(&[(1, 1), (2, 1)]), dns]);
        let mut sent = 0;
        for (name, proto, cport, vport, code, quote) in [
            (
                "TCP frag needed, 8 bytes quoted",
                6u8,
                40000u16,
                80u16,
                4u8,
                28usize,
            ),
            ("TCP frag needed, all quoted", 6, 40001, 80, 4, 2000),
            ("TCP host unreachable", 6, 40002, 80, 1, 28),
            ("UDP port unreachable", 17, 40003, 53, 3, 2000),
        ] {
            let r = open(&h, proto, cport, vport);
            // The real's reply, from the VIP (DR), as the router got it.
            let reply = if proto == 6 {
                Frame::tcp(VIP, vport, CLIENT, cport, ACK | PSH).payload(1400)
            } else {
                Frame::udp(VIP, vport, CLIENT, cport).payload(1400)
            };
            let q = ip_packet(&reply.csum().build());
            let icmp = icmp_unreach(ROUTER, VIP, code, 1280, &q[..quote.min(q.len())]);
            let out = h.run(&icmp);
            assert_eq!(out.action, XDP_TX, "{name}: forwarded");
            assert_eq!(out.frame, with_real_macs(&icmp, r), "{name}: only the MACs");
            let p = parse_icmp4(&out.frame);
            assert!(
                p.ip_csum_ok && p.icmp_csum_ok && p.inner_ip_csum_ok,
                "{name}: {p:?}"
            );
            sent += 1;
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::ICMP_TO_REAL as usize], sent);
        assert_eq!(st[stat::PASS_ICMP as usize], 0);
        assert_eq!(
            st[stat::TX as usize],
            2 * sent,
            "each flow's first packet and its error"
        );
    });
}

#[test]
#[ignore = "needs root"]
fn icmp_unreachable_about_a_nat_flow_is_translated_for_its_real() {
    if !common::require_root("icmp_unreachable_about_a_nat_flow_is_translated_for_its_real") {
        return;
    }
    let net = DpNet::new("icmpnat", 2);
    net.client_neighbour(CLIENT);
    net.run(|| {
        let mut h = Harness::new();
        h.apply(vec![
            nat_service(Protocol::Tcp, REAL_PORT, &[(1, 1), (2, 1)]),
            nat_service_on(53, Protocol::Udp, 5353, &[(1, 1), (2, 1)]),
        ]);
        let mut sent = 0;
        // (case, proto, client port, VIP port, real port, bytes quoted, UDP checksum, payload)
        for (name, proto, cport, vport, rport, quote, csum, payload) in [
            (
                "TCP, whole segment quoted",
                6u8,
                41000u16,
                80u16,
                REAL_PORT,
                2000usize,
                true,
                0,
            ),
            (
                "TCP, 8 bytes quoted",
                6,
                41001,
                80,
                REAL_PORT,
                28,
                true,
                1400,
            ),
            (
                "TCP, 18 bytes quoted",
                6,
                41002,
                80,
                REAL_PORT,
                38,
                true,
                1400,
            ),
            (
                "TCP, data quoted in part",
                6,
                41003,
                80,
                REAL_PORT,
                576,
                true,
                1400,
            ),
            ("UDP with a checksum", 17, 41004, 53, 5353, 2000, true, 100),
            (
                "UDP without a checksum",
                17,
                41005,
                53,
                5353,
                2000,
                false,
                100,
            ),
            ("UDP, 8 bytes quoted", 17, 41006, 53, 5353, 28, true, 100),
        ] {
            let r = open(&h, proto, cport, vport);
            let rip = real_ip(r).to_string();
            // The real's reply as the real sent it, and as the director translated it.
            let mut reply = if proto == 6 {
                Frame::tcp(&rip, rport, CLIENT, cport, ACK | PSH)
            } else {
                Frame::udp(&rip, rport, CLIENT, cport)
            }
            .payload(payload)
            .macs(real_mac(r), DIRECTOR_MAC);
            if csum {
                reply = reply.csum();
            }
            let reply = reply.build();
            let out = h.run(&reply);
            assert_eq!(out.action, XDP_TX, "{name}: reply translated");
            let seen = parse4(&out.frame);
            assert_eq!((seen.src.to_string().as_str(), seen.sport), (VIP, vport));
            // The router quotes the translated reply and tells the VIP.
            let q = ip_packet(&out.frame);
            let icmp = icmp_unreach(ROUTER, VIP, 4, 1280, &q[..quote.min(q.len())]);
            let out = h.run(&icmp);
            assert_eq!(out.action, XDP_TX, "{name}: forwarded");
            // What the real gets: the error it would have had without the director, quoting
            // its own packet, built from scratch.
            let mine = ip_packet(&reply);
            let want = icmp_unreach(ROUTER, &rip, 4, 1280, &mine[..quote.min(mine.len())]);
            let p = parse_icmp4(&out.frame);
            assert_eq!(
                out.frame,
                with_real_macs(&want, r),
                "{name}: exact frame; read as {p:?}"
            );
            assert!(
                p.ip_csum_ok && p.icmp_csum_ok && p.inner_ip_csum_ok,
                "{name}: {p:?}"
            );
            assert_eq!(p.dst, real_ip(r), "{name}");
            assert_eq!((p.inner_src, p.inner_sport), (real_ip(r), rport), "{name}");
            assert_eq!(p.inner_dport, cport, "{name}");
            let whole = quote >= mine.len();
            let expect_l4 = if !whole || !csum { None } else { Some(true) };
            assert_eq!(p.inner_l4_csum_ok, expect_l4, "{name}: quoted L4 checksum");
            sent += 1;
        }
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::ICMP_TO_REAL as usize], sent);
        assert_eq!(st[stat::PASS_ICMP as usize], 0);
    });
}

#[test]
#[ignore = "needs root"]
fn icmp_not_about_a_tracked_flow_goes_to_the_kernel_untouched() {
    if !common::require_root("icmp_not_about_a_tracked_flow_goes_to_the_kernel_untouched") {
        return;
    }
    DpNet::new("icmppass", 1).run(|| {
        let mut h = Harness::new();
        h.apply(vec![service(&[(1, 1)])]);
        open(&h, 6, 42000, 80);
        let q = ip_packet(&Frame::tcp(VIP, 80, CLIENT, 42000, ACK).csum().build());
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut q = q.clone();
            f(&mut q);
            q
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "echo request to the VIP",
                icmp_frame(CLIENT, VIP, 8, 0, 1, &[7; 32]),
            ),
            ("time exceeded", icmp_frame(ROUTER, VIP, 11, 0, 0, &q)),
            (
                "error to another address",
                icmp_unreach(ROUTER, "198.18.0.2", 4, 1280, &q),
            ),
            (
                "an untracked client port",
                icmp_unreach(
                    ROUTER,
                    VIP,
                    4,
                    1280,
                    &with(&|q| q[22..24].copy_from_slice(&[0xa4, 0x11])),
                ),
            ),
            (
                "a quote not from the VIP",
                icmp_unreach(
                    ROUTER,
                    VIP,
                    4,
                    1280,
                    &ip_packet(&Frame::tcp(CLIENT, 42000, VIP, 80, ACK).build()),
                ),
            ),
            (
                "quote without ports",
                icmp_unreach(ROUTER, VIP, 4, 1280, &q[..22]),
            ),
            (
                "quote without its IP header",
                icmp_unreach(ROUTER, VIP, 4, 1280, &q[..19]),
            ),
            (
                "quoted UDP on a TCP flow",
                icmp_unreach(ROUTER, VIP, 4, 1280, &with(&|q| q[9] = 17)),
            ),
            (
                "quoted ICMP",
                icmp_unreach(ROUTER, VIP, 4, 1280, &with(&|q| q[9] = 1)),
            ),
            (
                "quoted IPv6 version",
                icmp_unreach(ROUTER, VIP, 4, 1280, &with(&|q| q[0] = 0x65)),
            ),
            (
                "quoted IHL 4",
                icmp_unreach(ROUTER, VIP, 4, 1280, &with(&|q| q[0] = 0x44)),
            ),
            (
                "quoted IHL 15 past the quote",
                icmp_unreach(ROUTER, VIP, 4, 1280, &with(&|q| q[0] = 0x4f)),
            ),
            (
                "quoted later fragment",
                icmp_unreach(
                    ROUTER,
                    VIP,
                    4,
                    1280,
                    &with(&|q| q[6..8].copy_from_slice(&[0, 8])),
                ),
            ),
            ("empty unreachable", icmp_unreach(ROUTER, VIP, 4, 1280, &[])),
        ];
        for (name, f) in &cases {
            let out = h.run(f);
            assert_eq!(out.action, XDP_PASS, "{name}");
            assert_eq!(&out.frame, f, "{name}: untouched");
        }
        // The outer packet's length is believed, not the frame's: a quote cut by the IP
        // length is not read past it.
        let mut cut = icmp_unreach(ROUTER, VIP, 4, 1280, &q[..28]);
        cut[17] -= 6; // total length now ends inside the quoted ports
        cut[24..26].copy_from_slice(&[0, 0]);
        let sum = !ones(&cut[14..34]);
        cut[24..26].copy_from_slice(&sum.to_be_bytes());
        let out = h.run(&cut);
        assert_eq!(out.action, XDP_PASS, "quote cut by the IP length");
        // A fragmented ICMP packet is the kernel's too.
        let mut frag = icmp_unreach(ROUTER, VIP, 4, 1280, &q);
        frag[20] = 0x20; // MF
        let out = h.run(&frag);
        assert_eq!(out.action, XDP_PASS, "fragmented ICMP");
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::PASS_ICMP as usize], cases.len() as u64 + 1);
        assert_eq!(st[stat::ICMP_TO_REAL as usize], 0);
        // The flow is still there and an error about it is forwarded.
        let out = h.run(&icmp_unreach(ROUTER, VIP, 4, 1280, &q));
        assert_eq!(out.action, XDP_TX);
    });
}

/// One's-complement sum of 16-bit big-endian words (for fixing a header in place).
fn ones(b: &[u8]) -> u16 {
    let mut s: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

#[test]
#[ignore = "needs root"]
fn icmp_errors_leave_the_flow_and_its_counts_alone() {
    if !common::require_root("icmp_errors_leave_the_flow_and_its_counts_alone") {
        return;
    }
    let net = DpNet::new("icmpstate", 1);
    net.client_neighbour(CLIENT);
    net.run(|| {
        let mut h = Harness::new();
        let svc = nat_service(Protocol::Tcp, REAL_PORT, &[(1, 1)]);
        h.apply(vec![svc.clone()]);
        open(&h, 6, 43000, 80);
        assert_eq!(h.raw_conns(1, &svc), (0, 0, 1), "half-open");
        let q = ip_packet(&Frame::tcp(VIP, 80, CLIENT, 43000, SYN | ACK).csum().build());
        let before = h.dp.connections();
        for _ in 0..3 {
            let out = h.run(&icmp_unreach(ROUTER, VIP, 4, 1280, &q));
            assert_eq!(out.action, XDP_TX, "an embryo's error is forwarded too");
        }
        assert_eq!(
            h.raw_conns(1, &svc),
            (0, 0, 1),
            "still half-open, counted once"
        );
        assert_eq!(h.dp.connections().len(), before.len());
        // Established, then closed by an RST: errors never reopen or move it.
        let ack = Frame::tcp(CLIENT, 43000, VIP, 80, ACK).csum().build();
        assert_eq!(h.run(&ack).action, XDP_TX);
        assert_eq!(h.raw_conns(1, &svc), (1, 0, 0));
        let out = h.run(&icmp_unreach(ROUTER, VIP, 3, 0, &q));
        assert_eq!(out.action, XDP_TX);
        assert_eq!(
            h.raw_conns(1, &svc),
            (1, 0, 0),
            "an error does not close the flow"
        );
    });
}

#[test]
#[ignore = "needs root"]
fn icmp_about_a_flow_of_a_standby_service_is_dropped() {
    if !common::require_root("icmp_about_a_flow_of_a_standby_service_is_dropped") {
        return;
    }
    DpNet::new("icmpstby", 1).run(|| {
        let mut h = Harness::new();
        let mut svc = service(&[(1, 1)]);
        h.apply(vec![svc.clone()]);
        open(&h, 6, 44000, 80);
        let q = ip_packet(&Frame::tcp(VIP, 80, CLIENT, 44000, ACK).csum().build());
        let icmp = icmp_unreach(ROUTER, VIP, 4, 1280, &q);
        assert_eq!(h.run(&icmp).action, XDP_TX, "while the VIP is held");
        // A VRRP backup: the flow's packets are dropped, and so is an error about it.
        svc.standby = true;
        h.apply(vec![svc]);
        let out = h.run(&icmp);
        assert_eq!(
            out.action,
            dpnet::XDP_DROP,
            "a backup never sends to the real"
        );
        let st = h.dp.stats().unwrap();
        assert_eq!(st[stat::DROP_STANDBY as usize], 1);
        assert_eq!(st[stat::ICMP_TO_REAL as usize], 1);
    });
}
