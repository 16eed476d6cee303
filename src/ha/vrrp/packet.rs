//! VRRPv3 advertisements (RFC 5798 section 5) on the wire: encode, decode, validate.
//!
//! Everything that arrives on the VRRP socket comes from the network, so this module is the one
//! place that turns bytes into an [`Advert`]: it never panics, and every packet it refuses names a
//! [`Reject`] reason from a closed set, counted in [`RejectCounts`]. The checksum covers the IPv4
//! or IPv6 pseudo-header for both families (RFC 5798 5.2.8), as keepalived computes it for v3.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};

/// IP protocol number of VRRP.
pub const IPPROTO_VRRP: u8 = 112;
/// IPv4 multicast group of VRRP (RFC 5798 5.1.1.2).
pub const GROUP_V4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
/// IPv6 multicast group of VRRP (RFC 5798 5.1.2.2).
pub const GROUP_V6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);
/// TTL / hop limit every advertisement is sent and must be received with.
pub const TTL: u8 = 255;
/// Version 3, type 1 (ADVERTISEMENT).
const VERSION: u8 = 3;
const TYPE_ADVERTISEMENT: u8 = 1;
/// Version/type, VRID, priority, count, reserved + max advert interval, checksum.
pub const HEADER_LEN: usize = 8;
/// The advert interval is 12 bits of centiseconds.
pub const MAX_ADVER_INT_CS: u16 = 0x0fff;

/// Address family of a VRRP instance: one instance never mixes them (RFC 5798 5.2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn addr_len(self) -> usize {
        match self {
            Family::V4 => 4,
            Family::V6 => 16,
        }
    }
}

/// A decoded advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    pub vrid: u8,
    pub priority: u8,
    /// Max Adver Int, in centiseconds (12 bits).
    pub max_adver_int_cs: u16,
    /// All of the advert's family.
    pub addresses: Vec<IpAddr>,
}

/// Why a received packet was dropped: the closed set counted in [`RejectCounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// The IPv4 header is malformed (version, IHL, total length, protocol, fragment).
    IpHeader,
    /// TTL / hop limit is not 255 (RFC 5798 7.1): the packet may have been routed.
    Ttl,
    /// Shorter than the 8-byte VRRP header.
    TooShort,
    /// Version is not 3.
    Version,
    /// Type is not ADVERTISEMENT (5.2.2: unknown types are discarded).
    Type,
    /// Count IPvX Addr is 0 (5.2.5: the minimum is 1).
    NoAddresses,
    /// The packet ends before the addresses its count announces.
    Truncated,
    /// Bytes after the announced addresses: length and count disagree.
    LengthMismatch,
    /// The checksum over pseudo-header and packet is wrong.
    Checksum,
    /// A VRID this instance does not serve.
    Vrid,
    /// This router is the address owner (priority 255): it takes no advertisements (7.1).
    LocalOwner,
    /// The advertised addresses differ from ours and the sender is not the owner (7.1).
    AddressList,
}

impl Reject {
    pub const ALL: [Reject; 12] = [
        Reject::IpHeader,
        Reject::Ttl,
        Reject::TooShort,
        Reject::Version,
        Reject::Type,
        Reject::NoAddresses,
        Reject::Truncated,
        Reject::LengthMismatch,
        Reject::Checksum,
        Reject::Vrid,
        Reject::LocalOwner,
        Reject::AddressList,
    ];

    /// Stable label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::IpHeader => "ip_header",
            Reject::Ttl => "ttl",
            Reject::TooShort => "too_short",
            Reject::Version => "version",
            Reject::Type => "type",
            Reject::NoAddresses => "no_addresses",
            Reject::Truncated => "truncated",
            Reject::LengthMismatch => "length_mismatch",
            Reject::Checksum => "checksum",
            Reject::Vrid => "vrid",
            Reject::LocalOwner => "local_owner",
            Reject::AddressList => "address_list",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One counter per [`Reject`] reason; shared between the receive loop and readers.
#[derive(Debug, Default)]
pub struct RejectCounts([AtomicU64; Reject::ALL.len()]);

impl RejectCounts {
    pub fn count(&self, r: Reject) {
        self.0[r.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, r: Reject) -> u64 {
        self.0[r.index()].load(Ordering::Relaxed)
    }

    /// Every reason with its count, in [`Reject::ALL`] order.
    pub fn snapshot(&self) -> Vec<(Reject, u64)> {
        Reject::ALL.iter().map(|&r| (r, self.get(r))).collect()
    }

    pub fn total(&self) -> u64 {
        Reject::ALL.iter().map(|&r| self.get(r)).sum()
    }
}

/// Why an advertisement could not be built (a bug or a config the validator should have refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("an advertisement carries 1..=255 addresses, not {0}")]
    AddressCount(usize),
    #[error("address {0} is not of the advertisement's family")]
    MixedFamily(IpAddr),
    #[error("advert interval {0} cs does not fit in 12 bits")]
    Interval(u16),
}

/// Internet checksum (RFC 1071) over the pseudo-header of `src`/`dst` and `vrrp`.
///
/// IPv4 pseudo-header: src, dst, zero, protocol, length (16 bits); IPv6 (RFC 2460 8.1): src, dst,
/// length (32 bits), three zero bytes, next header. The caller zeroes the checksum field first
/// when computing, or leaves it in when verifying (a correct packet then sums to 0).
pub fn checksum(src: IpAddr, dst: IpAddr, vrrp: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        let mut chunks = bytes.chunks_exact(2);
        for c in &mut chunks {
            sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
        }
        if let [last] = chunks.remainder() {
            sum += u64::from(*last) << 8;
        }
    };
    let len = vrrp.len() as u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
            add(&[0, IPPROTO_VRRP]);
            add(&(len as u16).to_be_bytes());
        }
        (s, d) => {
            add(&v6_bytes(s));
            add(&v6_bytes(d));
            add(&len.to_be_bytes());
            add(&[0, 0, 0, IPPROTO_VRRP]);
        }
    }
    add(vrrp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn v6_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// The VRRP payload (no IP header) of `advert` sent from `src` to `dst`, checksum filled in.
pub fn encode(advert: &Advert, src: IpAddr, dst: IpAddr) -> Result<Vec<u8>, EncodeError> {
    let n = advert.addresses.len();
    if n == 0 || n > 255 {
        return Err(EncodeError::AddressCount(n));
    }
    if advert.max_adver_int_cs > MAX_ADVER_INT_CS {
        return Err(EncodeError::Interval(advert.max_adver_int_cs));
    }
    let family = Family::of(&src);
    let mut out = Vec::with_capacity(HEADER_LEN + n * family.addr_len());
    out.push((VERSION << 4) | TYPE_ADVERTISEMENT);
    out.push(advert.vrid);
    out.push(advert.priority);
    out.push(n as u8);
    out.extend_from_slice(&advert.max_adver_int_cs.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    for a in &advert.addresses {
        match (family, a) {
            (Family::V4, IpAddr::V4(v4)) => out.extend_from_slice(&v4.octets()),
            (Family::V6, IpAddr::V6(v6)) => out.extend_from_slice(&v6.octets()),
            _ => return Err(EncodeError::MixedFamily(*a)),
        }
    }
    let sum = checksum(src, dst, &out);
    out[6..8].copy_from_slice(&sum.to_be_bytes());
    Ok(out)
}

/// A packet as the socket layer hands it over: the IP fields validation needs and the payload.
#[derive(Debug, Clone, Copy)]
pub struct Received<'a> {
    /// TTL (IPv4) or hop limit (IPv6) it arrived with.
    pub ttl: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The VRRP packet (after the IP header).
    pub payload: &'a [u8],
}

/// What the receiving instance is: the fields 7.1 validates against.
#[derive(Debug, Clone, Copy)]
pub struct Local<'a> {
    pub vrid: u8,
    /// This router's own priority (255: the address owner).
    pub priority: u8,
    /// The configured virtual addresses.
    pub addresses: &'a [IpAddr],
}

/// Splits an IPv4 datagram as read from a raw socket into TTL, addresses and payload.
pub fn parse_ipv4(datagram: &[u8]) -> Result<Received<'_>, Reject> {
    let [vihl, _tos, l0, l1, _, _, f0, f1, ttl, proto, ..] = *datagram else {
        return Err(Reject::IpHeader);
    };
    let ihl = usize::from(vihl & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([l0, l1]));
    // More-fragments or a fragment offset: VRRP adverts are never fragmented.
    let fragmented = u16::from_be_bytes([f0, f1]) & 0x3fff != 0;
    if vihl >> 4 != 4
        || ihl < 20
        || total < ihl
        || total > datagram.len()
        || proto != IPPROTO_VRRP
        || fragmented
    {
        return Err(Reject::IpHeader);
    }
    let addr = |at: usize| -> Result<Ipv4Addr, Reject> {
        let b: [u8; 4] = datagram
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .ok_or(Reject::IpHeader)?;
        Ok(Ipv4Addr::from(b))
    };
    Ok(Received {
        ttl,
        src: IpAddr::V4(addr(12)?),
        dst: IpAddr::V4(addr(16)?),
        payload: datagram.get(ihl..total).ok_or(Reject::IpHeader)?,
    })
}

/// Validates a received advertisement as RFC 5798 7.1 says, in its order; the advert or why not.
pub fn validate(rx: &Received<'_>, local: &Local<'_>) -> Result<Advert, Reject> {
    if rx.ttl != TTL {
        return Err(Reject::Ttl);
    }
    let p = rx.payload;
    let [vt, vrid, priority, count, i0, i1, ..] = *p else {
        return Err(Reject::TooShort);
    };
    if p.len() < HEADER_LEN {
        return Err(Reject::TooShort);
    }
    if vt >> 4 != VERSION {
        return Err(Reject::Version);
    }
    if vt & 0x0f != TYPE_ADVERTISEMENT {
        return Err(Reject::Type);
    }
    if count == 0 {
        return Err(Reject::NoAddresses);
    }
    let family = Family::of(&rx.src);
    let want = HEADER_LEN + usize::from(count) * family.addr_len();
    if p.len() < want {
        return Err(Reject::Truncated);
    }
    if p.len() > want {
        return Err(Reject::LengthMismatch);
    }
    if checksum(rx.src, rx.dst, p) != 0 {
        return Err(Reject::Checksum);
    }
    if vrid != local.vrid {
        return Err(Reject::Vrid);
    }
    if local.priority == 255 {
        return Err(Reject::LocalOwner);
    }
    let addresses: Vec<IpAddr> = p[HEADER_LEN..]
        .chunks_exact(family.addr_len())
        .map(|c| match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(c[0], c[1], c[2], c[3])),
            Family::V6 => {
                let mut b = [0u8; 16];
                b.copy_from_slice(c);
                IpAddr::V6(Ipv6Addr::from(b))
            }
        })
        .collect();
    // The same set, in any order; only the owner's adverts are taken despite a mismatch.
    if priority != 255 && !same_set(&addresses, local.addresses) {
        return Err(Reject::AddressList);
    }
    Ok(Advert {
        vrid,
        priority,
        max_adver_int_cs: u16::from_be_bytes([i0, i1]) & MAX_ADVER_INT_CS,
        addresses,
    })
}

fn same_set(a: &[IpAddr], b: &[IpAddr]) -> bool {
    a.len() == b.len() && a.iter().all(|x| b.contains(x)) && b.iter().all(|x| a.contains(x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SRC4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const DST4: IpAddr = IpAddr::V4(GROUP_V4);
    const VIP4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100));

    fn src6() -> IpAddr {
        "fe80::2".parse().unwrap()
    }
    fn vip6() -> IpAddr {
        "2001:2::100".parse().unwrap()
    }

    fn advert(addresses: Vec<IpAddr>) -> Advert {
        Advert {
            vrid: 51,
            priority: 100,
            max_adver_int_cs: 100,
            addresses,
        }
    }

    fn local(addresses: &[IpAddr]) -> Local<'_> {
        Local {
            vrid: 51,
            priority: 150,
            addresses,
        }
    }

    fn rx<'a>(payload: &'a [u8], src: IpAddr, dst: IpAddr) -> Received<'a> {
        Received {
            ttl: 255,
            src,
            dst,
            payload,
        }
    }

    /// An IPv4 advert (VRID 51, priority 100, 1 s, VIP 198.18.0.100, from 198.18.0.2) laid out
    /// by hand from RFC 5798 5.1, its checksum summed word by word here, not by [`checksum`].
    /// (Interop with keepalived's own checksum is checked in tests/e2e_vrrp.rs.)
    #[test]
    fn hand_built_ipv4_advert() {
        let mut p = vec![0x31, 51, 100, 1, 0x00, 0x64, 0, 0, 198, 18, 0, 100];
        // RFC 1071 by hand: sum of 16-bit words of pseudo-header + packet.
        let words: [u32; 12] = [
            0xc612, 0x0002, // src
            0xe000, 0x0012, // dst
            0x0070, 0x000c, // zero+proto, length 12
            0x3133, 0x6401, 0x0064, 0x0000, 0xc612, 0x0064,
        ];
        let mut s: u32 = words.iter().sum();
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        let expected = !(s as u16);
        p[6..8].copy_from_slice(&expected.to_be_bytes());
        let ours = encode(&advert(vec![VIP4]), SRC4, DST4).unwrap();
        assert_eq!(ours, p);
        assert_eq!(
            validate(&rx(&p, SRC4, DST4), &local(&[VIP4])),
            Ok(advert(vec![VIP4]))
        );
    }

    #[test]
    fn round_trip_both_families() {
        for (src, dst, vip) in [(SRC4, DST4, VIP4), (src6(), IpAddr::V6(GROUP_V6), vip6())] {
            let a = advert(vec![vip]);
            let p = encode(&a, src, dst).unwrap();
            assert_eq!(p.len(), HEADER_LEN + Family::of(&src).addr_len());
            assert_eq!(validate(&rx(&p, src, dst), &local(&[vip])), Ok(a));
        }
    }

    #[test]
    fn ipv6_checksum_uses_the_ipv6_pseudo_header() {
        let dst = IpAddr::V6(GROUP_V6);
        let p = encode(&advert(vec![vip6()]), src6(), dst).unwrap();
        // Same packet from another source must not verify: the source is in the pseudo-header.
        let other: IpAddr = "fe80::3".parse().unwrap();
        assert_eq!(
            validate(&rx(&p, other, dst), &local(&[vip6()])),
            Err(Reject::Checksum)
        );
    }

    /// Named malformed cases: each must be refused for exactly its reason.
    #[test]
    fn malformed_cases() {
        let good = encode(&advert(vec![VIP4]), SRC4, DST4).unwrap();
        let fix = |mut p: Vec<u8>| {
            p[6] = 0;
            p[7] = 0;
            let s = checksum(SRC4, DST4, &p);
            p[6..8].copy_from_slice(&s.to_be_bytes());
            p
        };
        let other_vip = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 101));
        let cases: Vec<(&str, Vec<u8>, u8, Reject)> = vec![
            ("empty", vec![], 255, Reject::TooShort),
            ("seven bytes", good[..7].to_vec(), 255, Reject::TooShort),
            ("ttl 254", good.clone(), 254, Reject::Ttl),
            ("ttl 1", good.clone(), 1, Reject::Ttl),
            (
                "version 2",
                fix([&[0x21], &good[1..]].concat()),
                255,
                Reject::Version,
            ),
            (
                "type 2",
                fix([&[0x32], &good[1..]].concat()),
                255,
                Reject::Type,
            ),
            (
                "count 0",
                fix([&good[..3], &[0], &good[4..8]].concat()),
                255,
                Reject::NoAddresses,
            ),
            (
                "count 2, one address",
                fix([&good[..3], &[2], &good[4..]].concat()),
                255,
                Reject::Truncated,
            ),
            (
                "trailing bytes",
                fix([&good[..], &[0, 0, 0, 0]].concat()),
                255,
                Reject::LengthMismatch,
            ),
            (
                "bad checksum",
                {
                    let mut p = good.clone();
                    p[7] ^= 1;
                    p
                },
                255,
                Reject::Checksum,
            ),
            (
                "vrid 52",
                fix([&good[..1], &[52], &good[2..]].concat()),
                255,
                Reject::Vrid,
            ),
            (
                "other address",
                encode(&advert(vec![other_vip]), SRC4, DST4).unwrap(),
                255,
                Reject::AddressList,
            ),
            (
                "subset of addresses",
                encode(&advert(vec![VIP4]), SRC4, DST4).unwrap(),
                255,
                Reject::AddressList,
            ),
        ];
        for (name, p, ttl, want) in cases {
            let locals: &[IpAddr] = if name == "subset of addresses" {
                &[VIP4, other_vip]
            } else {
                &[VIP4]
            };
            let r = Received {
                ttl,
                ..rx(&p, SRC4, DST4)
            };
            assert_eq!(validate(&r, &local(locals)), Err(want), "case {name}");
        }
    }

    #[test]
    fn owner_takes_no_adverts_and_owner_adverts_skip_the_address_check() {
        let p = encode(&advert(vec![VIP4]), SRC4, DST4).unwrap();
        let owner = Local {
            priority: 255,
            ..local(&[VIP4])
        };
        assert_eq!(
            validate(&rx(&p, SRC4, DST4), &owner),
            Err(Reject::LocalOwner)
        );
        let other = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 101));
        let from_owner = Advert {
            priority: 255,
            ..advert(vec![other])
        };
        let p = encode(&from_owner, SRC4, DST4).unwrap();
        assert_eq!(
            validate(&rx(&p, SRC4, DST4), &local(&[VIP4])),
            Ok(from_owner)
        );
    }

    #[test]
    fn address_order_does_not_matter() {
        let b = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 101));
        let p = encode(&advert(vec![b, VIP4]), SRC4, DST4).unwrap();
        assert!(validate(&rx(&p, SRC4, DST4), &local(&[VIP4, b])).is_ok());
    }

    #[test]
    fn reserved_bits_of_the_interval_are_ignored() {
        let mut p = encode(&advert(vec![VIP4]), SRC4, DST4).unwrap();
        p[4] |= 0xf0;
        p[6] = 0;
        p[7] = 0;
        let s = checksum(SRC4, DST4, &p);
        p[6..8].copy_from_slice(&s.to_be_bytes());
        let a = validate(&rx(&p, SRC4, DST4), &local(&[VIP4])).unwrap();
        assert_eq!(a.max_adver_int_cs, 100);
    }

    #[test]
    fn encode_refuses_what_cannot_be_sent() {
        assert_eq!(
            encode(&advert(vec![]), SRC4, DST4),
            Err(EncodeError::AddressCount(0))
        );
        assert_eq!(
            encode(&advert(vec![vip6()]), SRC4, DST4),
            Err(EncodeError::MixedFamily(vip6()))
        );
        let a = Advert {
            max_adver_int_cs: 0x1000,
            ..advert(vec![VIP4])
        };
        assert_eq!(encode(&a, SRC4, DST4), Err(EncodeError::Interval(0x1000)));
    }

    fn ipv4_datagram(payload: &[u8], ttl: u8) -> Vec<u8> {
        let total = (20 + payload.len()) as u16;
        let mut d = vec![0x45, 0xc0];
        d.extend_from_slice(&total.to_be_bytes());
        d.extend_from_slice(&[0, 0, 0, 0, ttl, IPPROTO_VRRP, 0, 0]);
        d.extend_from_slice(&[198, 18, 0, 2, 224, 0, 0, 18]);
        d.extend_from_slice(payload);
        d
    }

    #[test]
    fn ipv4_header_parsing() {
        let p = encode(&advert(vec![VIP4]), SRC4, DST4).unwrap();
        let d = ipv4_datagram(&p, 255);
        let r = parse_ipv4(&d).unwrap();
        assert_eq!((r.ttl, r.src, r.dst, r.payload), (255, SRC4, DST4, &p[..]));
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("short", d[..19].to_vec()),
            ("version 6", [&[0x65], &d[1..]].concat()),
            ("ihl 4", [&[0x44], &d[1..]].concat()),
            ("ihl beyond total", [&[0x4f], &d[1..]].concat()),
            (
                "total beyond datagram",
                [&d[..2], &[0x10, 0], &d[4..]].concat(),
            ),
            ("protocol 17", [&d[..9], &[17], &d[10..]].concat()),
            ("fragment", [&d[..6], &[0x20, 0], &d[8..]].concat()),
        ];
        for (name, d) in cases {
            assert_eq!(parse_ipv4(&d).err(), Some(Reject::IpHeader), "case {name}");
        }
    }

    #[test]
    fn counts_by_reason() {
        let c = RejectCounts::default();
        c.count(Reject::Ttl);
        c.count(Reject::Ttl);
        c.count(Reject::Checksum);
        assert_eq!(c.get(Reject::Ttl), 2);
        assert_eq!(c.get(Reject::Checksum), 1);
        assert_eq!(c.get(Reject::Vrid), 0);
        assert_eq!(c.total(), 3);
        // Every reason has its own slot and label.
        let labels: std::collections::HashSet<_> = Reject::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), Reject::ALL.len());
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

        /// Arbitrary bytes never panic, and whatever is accepted re-encodes to the same bytes.
        #[test]
        fn fuzz_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..96), ttl in any::<u8>(), v6 in any::<bool>()) {
            let (src, dst, vip) = if v6 { (src6(), IpAddr::V6(GROUP_V6), vip6()) } else { (SRC4, DST4, VIP4) };
            let r = Received { ttl, src, dst, payload: &bytes };
            if let Ok(a) = validate(&r, &local(&[vip])) {
                prop_assert_eq!(encode(&a, src, dst).ok(), Some(bytes.clone()).filter(|_| bytes[4] & 0xf0 == 0));
            }
            let _ = parse_ipv4(&bytes);
        }

        /// Mutations of a valid advert (one byte flipped, or cut): never a panic; a flipped byte
        /// is always caught (the checksum sees every single-byte change).
        #[test]
        fn fuzz_mutated_adverts(at in 0usize..28, xor in 1u8..=255, cut in 0usize..40, v6 in any::<bool>()) {
            let (src, dst, vip) = if v6 { (src6(), IpAddr::V6(GROUP_V6), vip6()) } else { (SRC4, DST4, VIP4) };
            let good = encode(&advert(vec![vip]), src, dst).unwrap();
            let mut p = good.clone();
            let at = at % p.len();
            p[at] ^= xor;
            let r = validate(&rx(&p, src, dst), &local(&[vip]));
            prop_assert!(r.is_err(), "flip at {} by {:#x} accepted", at, xor);
            let cut = cut.min(good.len());
            let r = validate(&rx(&good[..cut], src, dst), &local(&[vip]));
            prop_assert_eq!(r.is_ok(), cut == good.len());
            let d = ipv4_datagram(&p, 255);
            let _ = parse_ipv4(&d[..cut.min(d.len())]);
        }
    }
}
