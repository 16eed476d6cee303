//! Crafted frames for dataplane tests and benchmarks: Ethernet (optionally 802.1Q) + IPv4 or
//! IPv6 (with extension headers) + TCP/UDP/ICMP/ICMPv6, with correct checksums, and the
//! independent parsers that read the program's output frames (every checksum recomputed).
#![allow(dead_code)]

use std::net::{Ipv4Addr, Ipv6Addr};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0c, 0x01];
pub const DIRECTOR_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0d, 0x01];

/// A frame under construction; `build()` yields the bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub payload: usize,
    /// IPv4 flags+fragment offset field (host order).
    pub frag: u16,
    /// Fill in the TCP/UDP checksum (else it stays 0, which for UDP means "none").
    pub l4_csum: bool,
    /// 4-byte words of IPv4 options (NOPs ending in an EOL) after the fixed header.
    pub ip_option_words: usize,
    /// TCP sequence and acknowledgment numbers.
    pub seq: u32,
    pub ack: u32,
}

impl Frame {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Frame {
        Frame {
            src_mac: CLIENT_MAC,
            dst_mac: DIRECTOR_MAC,
            vlan: None,
            src: src.parse().expect("test address"),
            dst: dst.parse().expect("test address"),
            proto: 6,
            sport,
            dport,
            flags,
            payload: 0,
            frag: 0x4000, // DF
            l4_csum: false,
            ip_option_words: 0,
            seq: 1000,
            ack: 0,
        }
    }

    /// With these TCP sequence and acknowledgment numbers.
    pub fn seq_ack(mut self, seq: u32, ack: u32) -> Frame {
        self.seq = seq;
        self.ack = ack;
        self
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Frame {
        Frame {
            proto: 17,
            ..Frame::tcp(src, sport, dst, dport, 0)
        }
    }

    pub fn flags(mut self, f: u8) -> Frame {
        self.flags = f;
        self
    }

    /// With a correct TCP/UDP checksum.
    pub fn csum(mut self) -> Frame {
        self.l4_csum = true;
        self
    }

    pub fn payload(mut self, n: usize) -> Frame {
        self.payload = n;
        self
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Frame {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(tag) = self.vlan {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&tag.to_be_bytes());
        }
        f.extend_from_slice(&[0x08, 0x00]);
        let l4_len = if self.proto == 6 { 20 } else { 8 } + self.payload;
        let ihl = 20 + 4 * self.ip_option_words;
        let tot = (ihl + l4_len) as u16;
        let ip_start = f.len();
        f.extend_from_slice(&[0x40 | (ihl / 4) as u8, 0]);
        f.extend_from_slice(&tot.to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34]);
        f.extend_from_slice(&self.frag.to_be_bytes());
        f.extend_from_slice(&[64, self.proto, 0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        for w in 0..self.ip_option_words {
            let last = w + 1 == self.ip_option_words;
            f.extend_from_slice(&[1, 1, 1, if last { 0 } else { 1 }]);
        }
        let sum = checksum(&f[ip_start..ip_start + ihl]);
        f[ip_start + 10..ip_start + 12].copy_from_slice(&sum.to_be_bytes());
        let l4_start = f.len();
        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == 6 {
            f.extend_from_slice(&self.seq.to_be_bytes());
            f.extend_from_slice(&self.ack.to_be_bytes());
            f.extend_from_slice(&[0x50, self.flags]);
            f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]); // window, csum, urg
        } else {
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        f.extend((0..self.payload).map(|i| 0xab ^ i as u8));
        if self.l4_csum {
            let at = l4_start + if self.proto == 6 { 16 } else { 6 };
            let mut sum = l4_checksum(
                &self.src.octets(),
                &self.dst.octets(),
                self.proto,
                &f[l4_start..],
            );
            if sum == 0 && self.proto == 17 {
                sum = 0xffff;
            }
            f[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        }
        f
    }
}

/// The TCP/UDP checksum of `seg` (its checksum field included: 0 on a segment being built, the
/// stored value on one being checked, when a correct one gives 0) with the IPv4 pseudo-header.
pub fn l4_checksum(src: &[u8; 4], dst: &[u8; 4], proto: u8, seg: &[u8]) -> u16 {
    let mut b = Vec::with_capacity(12 + seg.len());
    b.extend_from_slice(src);
    b.extend_from_slice(dst);
    b.extend_from_slice(&[0, proto]);
    b.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    b.extend_from_slice(seg);
    checksum(&b)
}

/// An IPv4 TCP/UDP frame as read by the tests, independently of the program: every field the
/// NAT path may touch, and whether each checksum is right (recomputed from scratch).
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed4 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub ip_csum_ok: bool,
    /// None: a UDP datagram without a checksum (field 0).
    pub l4_csum_ok: Option<bool>,
    /// The stored L4 checksum field.
    pub l4_csum: u16,
    /// Everything after the L4 ports and checksum that NAT must not change: IP options,
    /// TTL/ID/flags, the L4 header's other fields and the payload.
    pub rest: Vec<u8>,
}

pub fn parse4(f: &[u8]) -> Parsed4 {
    assert_eq!(&f[12..14], &[0x08, 0x00], "IPv4 ethertype");
    let ip = &f[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let proto = ip[9];
    let src: [u8; 4] = ip[12..16].try_into().unwrap();
    let dst: [u8; 4] = ip[16..20].try_into().unwrap();
    let seg = &ip[ihl..tot];
    let csum_at = if proto == 6 { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([seg[csum_at], seg[csum_at + 1]]);
    let l4_csum_ok = if proto == 17 && l4_csum == 0 {
        None
    } else {
        Some(l4_checksum(&src, &dst, proto, seg) == 0)
    };
    let mut rest = ip[0..10].to_vec();
    rest.extend_from_slice(&ip[20..ihl]);
    rest.extend_from_slice(&seg[4..csum_at]);
    rest.extend_from_slice(&seg[csum_at + 2..]);
    Parsed4 {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src: src.into(),
        dst: dst.into(),
        sport: u16::from_be_bytes([seg[0], seg[1]]),
        dport: u16::from_be_bytes([seg[2], seg[3]]),
        proto,
        ip_csum_ok: checksum(&ip[..ihl]) == 0,
        l4_csum_ok,
        l4_csum,
        rest,
    }
}

pub fn checksum(b: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in b.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Whether `out` is the RST that RFC 793 (3.4, reset generation for a connection that does not
/// exist) answers the TCP segment `inp` with, sent back to its sender: MACs, addresses and
/// ports swapped; with an ACK in `inp`, sequence number = its ACK and flags RST; without, seq 0
/// and ACK = seq + segment length (SYN and FIN one each), flags RST|ACK; a 20-byte header and
/// no payload; both checksums right (recomputed here). Read with its own parser.
pub fn check_reset(inp: &[u8], out: &[u8]) -> Result<(), String> {
    let l3 = if inp[12..14] == [0x81, 0x00] { 18 } else { 14 };
    if out.len() < l3 + 40 || out[l3 - 2..l3] != [0x08, 0x00] {
        return Err(format!("not an IPv4 frame of 40 bytes: {out:02x?}"));
    }
    let (i, o) = (&inp[l3..], &out[l3..]);
    let ihl = ((i[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([i[2], i[3]]) as usize;
    let mut errs = vec![];
    let mut want = |what: &str, ok: bool| {
        if !ok {
            errs.push(what.to_string());
        }
    };
    want("frame ends after the TCP header", out.len() == l3 + 40);
    want("IPv4, no options", o[0] == 0x45);
    want("total length 40", u16::from_be_bytes([o[2], o[3]]) == 40);
    want("protocol TCP", o[9] == 6);
    want("TTL set", o[8] > 0);
    want(
        "addresses swapped",
        o[12..16] == i[16..20] && o[16..20] == i[12..16],
    );
    want("IP checksum", checksum(&o[..20]) == 0);
    let (src, dst): ([u8; 4], [u8; 4]) =
        (o[12..16].try_into().unwrap(), o[16..20].try_into().unwrap());
    let t = &o[20..40];
    want("TCP checksum", l4_checksum(&src, &dst, 6, t) == 0);
    rst_fields(inp, out, l3, &i[ihl..tot], t, &mut errs);
    reset_result(errs, out)
}

/// The IPv6 twin of [`check_reset`]: `out` is the RST answering the TCP segment `inp` (no
/// extension headers), checked field by field, its checksum with the IPv6 pseudo-header.
pub fn check_reset6(inp: &[u8], out: &[u8]) -> Result<(), String> {
    let l3 = if inp[12..14] == [0x81, 0x00] { 18 } else { 14 };
    if out.len() < l3 + 60 || out[l3 - 2..l3] != [0x86, 0xdd] {
        return Err(format!("not an IPv6 frame of 60 bytes: {out:02x?}"));
    }
    let (i, o) = (&inp[l3..], &out[l3..]);
    let plen = u16::from_be_bytes([i[4], i[5]]) as usize;
    let mut errs = vec![];
    let mut want = |what: &str, ok: bool| {
        if !ok {
            errs.push(what.to_string());
        }
    };
    want("frame ends after the TCP header", out.len() == l3 + 60);
    want("IPv6", o[0] >> 4 == 6);
    want("payload length 20", u16::from_be_bytes([o[4], o[5]]) == 20);
    want("next header TCP", o[6] == 6);
    want("hop limit set", o[7] > 0);
    want(
        "addresses swapped",
        o[8..24] == i[24..40] && o[24..40] == i[8..24],
    );
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&o[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&o[24..40]).unwrap());
    let t = &o[40..60];
    want("TCP checksum", l4_checksum6(&src, &dst, 6, t) == 0);
    rst_fields(inp, out, l3, &i[40..40 + plen], t, &mut errs);
    reset_result(errs, out)
}

/// What both families' RSTs share: the Ethernet header turned around (a tag kept), and the
/// TCP header `t` answering segment `seg` as RFC 793 (3.4) prescribes.
fn rst_fields(inp: &[u8], out: &[u8], l3: usize, seg: &[u8], t: &[u8], errs: &mut Vec<String>) {
    let flags = seg[13];
    let doff = ((seg[12] >> 4) as usize) * 4;
    let seq = u32::from_be_bytes(seg[4..8].try_into().unwrap());
    let ack = u32::from_be_bytes(seg[8..12].try_into().unwrap());
    let (want_seq, want_ack, want_flags) = if flags & ACK != 0 {
        (ack, 0, RST)
    } else {
        let len =
            (seg.len() - doff) as u32 + u32::from(flags & SYN != 0) + u32::from(flags & FIN != 0);
        (0, seq.wrapping_add(len), RST | ACK)
    };
    let mut want = |what: &str, ok: bool| {
        if !ok {
            errs.push(what.to_string());
        }
    };
    want("dst MAC is the sender's", out[0..6] == inp[6..12]);
    want("src MAC is the one it was sent to", out[6..12] == inp[0..6]);
    want("a VLAN tag kept", out[12..l3] == inp[12..l3]);
    want(
        "ports swapped",
        t[0..2] == seg[2..4] && t[2..4] == seg[0..2],
    );
    want(
        "sequence number",
        u32::from_be_bytes(t[4..8].try_into().unwrap()) == want_seq,
    );
    want(
        "acknowledgment number",
        u32::from_be_bytes(t[8..12].try_into().unwrap()) == want_ack,
    );
    want("header 20 bytes", t[12] >> 4 == 5);
    want("flags", t[13] == want_flags);
}

fn reset_result(errs: Vec<String>, out: &[u8]) -> Result<(), String> {
    if errs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "not the RST for the segment: {errs:?}; out {out:02x?}"
        ))
    }
}

/// An ARP request frame (not IP: must be passed).
pub fn arp() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[198, 18, 0, 1]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[198, 18, 0, 100]);
    f
}

/// A minimal IPv6 TCP SYN frame (not handled yet: must be passed).
pub fn ipv6_syn() -> Vec<u8> {
    let mut f = DIRECTOR_MAC.to_vec();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, 6, 64]);
    f.extend_from_slice(&[0x20, 0x01, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&[0x20, 0x01, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x64]);
    f.extend_from_slice(&[
        0x30, 0x39, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, SYN, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    f
}

/// An ICMP destination-unreachable frame (type 3, `code`; `mtu` is the next-hop MTU of code 4,
/// "fragmentation needed") from `from` to `to`, quoting `quoted` (an IPv4 packet from its IP
/// header on, as much of it as a router quotes), both checksums computed from scratch.
pub fn icmp_unreach(from: &str, to: &str, code: u8, mtu: u16, quoted: &[u8]) -> Vec<u8> {
    icmp_frame(from, to, 3, code, mtu, quoted)
}

/// Any ICMP message: `ty`, `code`, the second header word's low half `rest`, then `body`.
pub fn icmp_frame(from: &str, to: &str, ty: u8, code: u8, rest: u16, body: &[u8]) -> Vec<u8> {
    let (src, dst): (Ipv4Addr, Ipv4Addr) = (from.parse().unwrap(), to.parse().unwrap());
    let mut f = DIRECTOR_MAC.to_vec();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let tot = (20 + 8 + body.len()) as u16;
    f.extend_from_slice(&[0x45, 0xc0]);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&[0x56, 0x78, 0, 0, 64, 1, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    let sum = checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&[ty, code, 0, 0, 0, 0]);
    f.extend_from_slice(&rest.to_be_bytes());
    f.extend_from_slice(body);
    let sum = checksum(&f[34..]);
    f[36..38].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The IPv4 packet of a built frame (from its IP header on, without Ethernet padding).
pub fn ip_packet(frame: &[u8]) -> Vec<u8> {
    let tot = u16::from_be_bytes([frame[16], frame[17]]) as usize;
    frame[14..14 + tot].to_vec()
}

/// An ICMP error frame as read by the tests, independently of the program, every checksum
/// recomputed from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedIcmp4 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub ip_csum_ok: bool,
    pub icmp_type: u8,
    pub code: u8,
    pub icmp_csum_ok: bool,
    pub inner_src: Ipv4Addr,
    pub inner_dst: Ipv4Addr,
    pub inner_sport: u16,
    pub inner_dport: u16,
    pub inner_ip_csum_ok: bool,
    /// The quoted TCP/UDP checksum, when the whole quoted segment is there (None if cut short,
    /// or a UDP datagram without one).
    pub inner_l4_csum_ok: Option<bool>,
}

pub fn parse_icmp4(f: &[u8]) -> ParsedIcmp4 {
    assert_eq!(&f[12..14], &[0x08, 0x00], "IPv4 ethertype");
    let ip = &f[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    assert_eq!(ip[9], 1, "ICMP");
    let icmp = &ip[ihl..tot];
    let inner = &icmp[8..];
    let iihl = ((inner[0] & 0x0f) as usize) * 4;
    let itot = u16::from_be_bytes([inner[2], inner[3]]) as usize;
    let seg = &inner[iihl..];
    let (isrc, idst): ([u8; 4], [u8; 4]) = (
        inner[12..16].try_into().unwrap(),
        inner[16..20].try_into().unwrap(),
    );
    let iproto = inner[9];
    let inner_l4_csum_ok =
        if inner.len() < itot || (iproto == 17 && u16::from_be_bytes([seg[6], seg[7]]) == 0) {
            None
        } else {
            Some(l4_checksum(&isrc, &idst, iproto, &inner[iihl..itot]) == 0)
        };
    ParsedIcmp4 {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src: <[u8; 4]>::try_from(&ip[12..16]).unwrap().into(),
        dst: <[u8; 4]>::try_from(&ip[16..20]).unwrap().into(),
        ip_csum_ok: checksum(&ip[..ihl]) == 0,
        icmp_type: icmp[0],
        code: icmp[1],
        icmp_csum_ok: checksum(icmp) == 0,
        inner_src: isrc.into(),
        inner_dst: idst.into(),
        inner_sport: u16::from_be_bytes([seg[0], seg[1]]),
        inner_dport: u16::from_be_bytes([seg[2], seg[3]]),
        inner_ip_csum_ok: checksum(&inner[..iihl]) == 0,
        inner_l4_csum_ok,
    }
}

// ---- IPv6 ----

/// An IPv6 frame under construction (TCP or UDP, optionally behind extension headers);
/// `build()` yields the bytes with a correct L4 checksum (UDP over IPv6 must carry one).
#[derive(Clone, Debug)]
pub struct Frame6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan: Option<u16>,
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
    pub payload: usize,
    pub hop_limit: u8,
    /// Extension headers in order: (type, bytes). Each one's first byte (its next-header
    /// field) is filled in by `build()`; the rest is as given.
    pub ext: Vec<(u8, Vec<u8>)>,
}

/// Hop-by-hop (0) or destination-options (60) header of `len8` 8-octet units, padded with PadN.
pub fn ext_opts(ty: u8, len8: usize) -> (u8, Vec<u8>) {
    let len = len8 * 8;
    let mut b = vec![0, (len8 - 1) as u8, 1, (len - 4) as u8];
    b.resize(len, 0);
    (ty, b)
}

/// A routing header (43) of type 4 (segment routing) with no segment left and `n` addresses.
pub fn ext_routing(n: usize) -> (u8, Vec<u8>) {
    let len = 8 + 16 * n;
    let mut b = vec![0, (2 * n) as u8, 4, 0];
    b.resize(len, 0);
    for i in 0..n {
        b[8 + 16 * i] = 0x20;
        b[8 + 16 * i + 15] = i as u8;
    }
    (43, b)
}

/// A fragment header (44): `offset` in 8-octet units, `more` the M flag.
pub fn ext_fragment(offset: u16, more: bool) -> (u8, Vec<u8>) {
    let om = (offset << 3) | u16::from(more);
    let mut b = vec![0, 0];
    b.extend_from_slice(&om.to_be_bytes());
    b.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    (44, b)
}

impl Frame6 {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Frame6 {
        Frame6 {
            src_mac: CLIENT_MAC,
            dst_mac: DIRECTOR_MAC,
            vlan: None,
            src: src.parse().expect("test address"),
            dst: dst.parse().expect("test address"),
            proto: 6,
            sport,
            dport,
            flags,
            payload: 0,
            hop_limit: 64,
            ext: Vec::new(),
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Frame6 {
        Frame6 {
            proto: 17,
            ..Frame6::tcp(src, sport, dst, dport, 0)
        }
    }

    pub fn payload(mut self, n: usize) -> Frame6 {
        self.payload = n;
        self
    }

    pub fn macs(mut self, src: [u8; 6], dst: [u8; 6]) -> Frame6 {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    pub fn ext(mut self, e: (u8, Vec<u8>)) -> Frame6 {
        self.ext.push(e);
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut f = Vec::with_capacity(128);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if let Some(tag) = self.vlan {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&tag.to_be_bytes());
        }
        f.extend_from_slice(&[0x86, 0xdd]);
        let l4_len = if self.proto == 6 { 20 } else { 8 } + self.payload;
        let ext_len: usize = self.ext.iter().map(|e| e.1.len()).sum();
        let first = self.ext.first().map_or(self.proto, |e| e.0);
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((ext_len + l4_len) as u16).to_be_bytes());
        f.extend_from_slice(&[first, self.hop_limit]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        for (i, (_, b)) in self.ext.iter().enumerate() {
            let next = self.ext.get(i + 1).map_or(self.proto, |e| e.0);
            f.push(next);
            f.extend_from_slice(&b[1..]);
        }
        let l4_start = f.len();
        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == 6 {
            f.extend_from_slice(&1000u32.to_be_bytes());
            f.extend_from_slice(&0u32.to_be_bytes());
            f.extend_from_slice(&[0x50, self.flags]);
            f.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0]);
        } else {
            f.extend_from_slice(&(l4_len as u16).to_be_bytes());
            f.extend_from_slice(&[0, 0]);
        }
        f.extend((0..self.payload).map(|i| 0xab ^ i as u8));
        let at = l4_start + if self.proto == 6 { 16 } else { 6 };
        let mut sum = l4_checksum6(&self.src, &self.dst, self.proto, &f[l4_start..]);
        if sum == 0 && self.proto == 17 {
            sum = 0xffff;
        }
        f[at..at + 2].copy_from_slice(&sum.to_be_bytes());
        f
    }
}

/// The checksum of an upper-layer `seg` (TCP, UDP, ICMPv6) with the IPv6 pseudo-header
/// (RFC 8200 8.1): 0 over a segment whose stored checksum is right.
pub fn l4_checksum6(src: &Ipv6Addr, dst: &Ipv6Addr, proto: u8, seg: &[u8]) -> u16 {
    let mut b = Vec::with_capacity(40 + seg.len());
    b.extend_from_slice(&src.octets());
    b.extend_from_slice(&dst.octets());
    b.extend_from_slice(&(seg.len() as u32).to_be_bytes());
    b.extend_from_slice(&[0, 0, 0, proto]);
    b.extend_from_slice(seg);
    checksum(&b)
}

/// The offset of the upper-layer header of an IPv6 packet `ip` and its protocol, following
/// hop-by-hop, routing, destination-options and fragment headers (independent of the program).
pub fn upper_layer6(ip: &[u8]) -> (usize, u8) {
    let mut next = ip[6];
    let mut off = 40;
    while matches!(next, 0 | 43 | 60 | 44) {
        let len = if next == 44 {
            8
        } else {
            (usize::from(ip[off + 1]) + 1) * 8
        };
        next = ip[off];
        off += len;
    }
    (off, next)
}

/// An IPv6 TCP/UDP frame as read by the tests, independently of the program: every field the
/// NAT path may touch, and whether the L4 checksum is right (recomputed from scratch).
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub hop_limit: u8,
    pub l4_csum_ok: bool,
    pub l4_csum: u16,
    /// Everything NAT must not change: the IPv6 header but its addresses, the extension
    /// headers, the L4 header's other fields and the payload.
    pub rest: Vec<u8>,
}

pub fn parse6(f: &[u8]) -> Parsed6 {
    assert_eq!(&f[12..14], &[0x86, 0xdd], "IPv6 ethertype");
    let ip = &f[14..];
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let ip = &ip[..40 + plen];
    let (off, proto) = upper_layer6(ip);
    let src: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst: [u8; 16] = ip[24..40].try_into().unwrap();
    let seg = &ip[off..];
    let csum_at = if proto == 6 { 16 } else { 6 };
    let l4_csum = u16::from_be_bytes([seg[csum_at], seg[csum_at + 1]]);
    let (s6, d6) = (Ipv6Addr::from(src), Ipv6Addr::from(dst));
    let mut rest = ip[0..8].to_vec();
    rest.extend_from_slice(&ip[40..off]);
    rest.extend_from_slice(&seg[4..csum_at]);
    rest.extend_from_slice(&seg[csum_at + 2..]);
    Parsed6 {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src: s6,
        dst: d6,
        sport: u16::from_be_bytes([seg[0], seg[1]]),
        dport: u16::from_be_bytes([seg[2], seg[3]]),
        proto,
        hop_limit: ip[7],
        // A TCP checksum may be 0; a UDP one over IPv6 never is (0 would mean "none").
        l4_csum_ok: l4_checksum6(&s6, &d6, proto, seg) == 0 && (proto != 17 || l4_csum != 0),
        l4_csum,
        rest,
    }
}

/// An ICMPv6 frame from `from` to `to`: `ty`, `code`, the 32-bit second word `rest` (the MTU
/// of a Packet Too Big), then `body`; its checksum computed from scratch.
pub fn icmp6_frame(from: &str, to: &str, ty: u8, code: u8, rest: u32, body: &[u8]) -> Vec<u8> {
    let (src, dst): (Ipv6Addr, Ipv6Addr) = (from.parse().unwrap(), to.parse().unwrap());
    let mut f = DIRECTOR_MAC.to_vec();
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&((8 + body.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&[ty, code, 0, 0]);
    f.extend_from_slice(&rest.to_be_bytes());
    f.extend_from_slice(body);
    let sum = l4_checksum6(&src, &dst, 58, &f[54..]);
    f[56..58].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The IPv6 packet of a built frame (from its IP header on, without Ethernet padding).
pub fn ip6_packet(frame: &[u8]) -> Vec<u8> {
    let plen = u16::from_be_bytes([frame[18], frame[19]]) as usize;
    frame[14..14 + 40 + plen].to_vec()
}

/// An ICMPv6 error frame as read by the tests, every checksum recomputed from scratch.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedIcmp6 {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub icmp_type: u8,
    pub code: u8,
    pub mtu: u32,
    pub icmp_csum_ok: bool,
    pub inner_src: Ipv6Addr,
    pub inner_dst: Ipv6Addr,
    pub inner_sport: u16,
    pub inner_dport: u16,
    /// The quoted TCP/UDP checksum, when the whole quoted segment is there.
    pub inner_l4_csum_ok: Option<bool>,
}

pub fn parse_icmp6(f: &[u8]) -> ParsedIcmp6 {
    assert_eq!(&f[12..14], &[0x86, 0xdd], "IPv6 ethertype");
    let ip = &f[14..];
    let plen = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    assert_eq!(ip[6], 58, "ICMPv6");
    let (src, dst) = (
        Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap()),
        Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap()),
    );
    let icmp = &ip[40..40 + plen];
    let inner = &icmp[8..];
    let (isrc, idst) = (
        Ipv6Addr::from(<[u8; 16]>::try_from(&inner[8..24]).unwrap()),
        Ipv6Addr::from(<[u8; 16]>::try_from(&inner[24..40]).unwrap()),
    );
    let iplen = u16::from_be_bytes([inner[4], inner[5]]) as usize;
    let seg = &inner[40..];
    let inner_l4_csum_ok =
        (seg.len() >= iplen).then(|| l4_checksum6(&isrc, &idst, inner[6], &seg[..iplen]) == 0);
    ParsedIcmp6 {
        dst_mac: f[0..6].try_into().unwrap(),
        src_mac: f[6..12].try_into().unwrap(),
        src,
        dst,
        icmp_type: icmp[0],
        code: icmp[1],
        mtu: u32::from_be_bytes(icmp[4..8].try_into().unwrap()),
        icmp_csum_ok: l4_checksum6(&src, &dst, 58, icmp) == 0,
        inner_src: isrc,
        inner_dst: idst,
        inner_sport: u16::from_be_bytes([seg[0], seg[1]]),
        inner_dport: u16::from_be_bytes([seg[2], seg[3]]),
        inner_l4_csum_ok,
    }
}
