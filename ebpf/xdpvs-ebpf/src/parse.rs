//! Header parsing: Ethernet (with at most one 802.1Q/802.1ad tag), IPv4 or IPv6, TCP/UDP;
//! unfragmented ICMP and ICMPv6 are handed on with their header's offset (`icmp`, `icmp6` read
//! the rest).
//!
//! IPv6 extension headers: hop-by-hop options, routing and destination options are skipped (at
//! most [`MAX_EXT`] headers, ending within [`MAX_L4_OFF`] bytes of the frame start: a bounded
//! loop, for the verifier); a fragment header is treated as IPv4 fragmentation is (a first
//! fragment to a VIP is dropped and counted, a later one, without ports, passed). AH, ESP, "no
//! next header" and the rarer extension headers, a chain longer than we follow, or a routing
//! header with segments left (the VIP is only a waypoint) are the kernel's, untouched
//! (`PASS_IPV6_EXT`). A payload length that overruns the frame, an extension
//! header that overruns the payload, or a truncated header is malformed and dropped, as for IPv4.
//!
//! Every read is bounds-checked against the end of the frame's linear part (the verifier insists,
//! and a truncated or lying header must never be forwarded). Anything we do not balance is passed
//! to the kernel untouched; anything claiming to be IPv4 but inconsistent is dropped and counted.
//!
//! Multi-buffer frames (jumbo or aggregated frames the driver splits over several pages): the
//! headers are read from the linear part only; the IP length is checked against the whole frame
//! (`bpf_xdp_get_buff_len`), asked only when the packet runs past the linear part, so ordinary
//! frames pay nothing. A header that is itself split is passed to the kernel, never guessed.
use crate::maps::count;
use aya_ebpf::{
    helpers::generated::{bpf_xdp_get_buff_len, bpf_xdp_load_bytes},
    programs::XdpContext,
};
use xdpvs_common::{
    stat, state::TCP_ACK, state::TCP_SYN, Addr, ConnKey, ServiceKey, FAMILY_V4, FAMILY_V6,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_MIN_HLEN: usize = 20;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const IPV6_HLEN: usize = 40;
/// IPv6 extension headers skipped before the chain is given to the kernel.
pub const MAX_EXT: usize = 6;
/// Largest offset of an IPv6 packet's L4 header from the frame start that we follow (room for
/// the usual few extension headers); the bound also keeps every offset provable for the
/// verifier. Masks in `nat` and `icmp6` rely on it being below 512.
pub const MAX_L4_OFF: usize = 18 + IPV6_HLEN + 256;
/// IPv6 next-header values of extension headers.
const NH_HOP: u8 = 0;
const NH_ROUTING: u8 = 43;
const NH_FRAGMENT: u8 = 44;
const NH_DSTOPTS: u8 = 60;

/// What the forwarder needs to know about a packet, addresses and ports in network order.
pub struct Packet {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub tcp_flags: u8,
    /// First fragment of a fragmented datagram.
    pub fragment: bool,
    /// IP packet length (IPv4 total length, IPv6 40 + payload length), for MTU checks.
    pub ip_len: u32,
    /// Bytes of the whole frame (linear part and fragments), for byte counters.
    pub frame_len: u32,
    /// Offsets of the IP and L4 headers in the frame (NAT rewrites them; IPv4 options and
    /// IPv6 extension headers are skipped by the L4 offset, so they are carried through
    /// untouched).
    pub l3: u16,
    pub l4: u16,
}

impl Packet {
    #[inline(always)]
    pub fn service_key(&self) -> ServiceKey {
        ServiceKey {
            addr: self.dst,
            port: self.dport,
            proto: self.proto,
            family: self.family,
        }
    }

    #[inline(always)]
    pub fn conn_key(&self) -> ConnKey {
        ConnKey {
            src: self.src,
            dst: self.dst,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            family: self.family,
            _pad: [0; 2],
        }
    }

    /// A connection-opening SYN (not a SYN-ACK).
    #[inline(always)]
    pub fn is_syn(&self) -> bool {
        self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }
}

/// [`parse`]'s verdict for a packet to handle (written to its `out`); else a `stat::*` to
/// count, with [`DROP`] set if the packet is to be dropped (passed otherwise).
pub const PACKET: u32 = u32::MAX;
pub const DROP: u32 = 1 << 16;

/// Not ours: hand to the kernel, counting `reason` (a `stat::*`).
#[inline(always)]
const fn pass(reason: u32) -> u32 {
    reason
}

/// Broken: drop, counting `reason`.
#[inline(always)]
const fn drop(reason: u32) -> u32 {
    reason | DROP
}

/// Pointer to a `T` at `off` bytes into the frame, if it lies wholly inside it.
#[inline(always)]
fn at<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *const T)
}

/// Length of the whole frame: the linear part plus any fragments of a multi-buffer frame.
#[inline(always)]
pub(crate) fn frame_len(ctx: &XdpContext) -> usize {
    unsafe { bpf_xdp_get_buff_len(ctx.ctx) as usize }
}

/// A header that does not fit in the linear part up to `end` bytes: truncated (drop) unless
/// the frame's fragments hold the rest (pass: the kernel reads split headers, we do not).
#[inline(never)]
fn short(ctx: &XdpContext, end: usize) -> u32 {
    if frame_len(ctx) >= end {
        pass(stat::PASS_SPLIT_HEADERS)
    } else {
        drop(stat::MALFORMED)
    }
}

#[inline(always)]
fn be16(ctx: &XdpContext, off: usize) -> Option<u16> {
    at::<[u8; 2]>(ctx, off).map(|p| u16::from_be_bytes(unsafe { *p }))
}

/// The IPv4 header's fixed part, as on the wire.
#[repr(C)]
struct Ipv4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: [u8; 2],
    id: [u8; 2],
    frag: [u8; 2],
    ttl: u8,
    proto: u8,
    csum: [u8; 2],
    src: u32,
    dst: u32,
}

/// The first bytes of a TCP header (ports, sequence numbers, offset and flags); UDP uses the
/// first 8 (ports, length, checksum).
#[repr(C)]
struct L4Hdr {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    doff: u8,
    flags: u8,
    _window: u16,
    /// Read by nobody here, but NAT rewrites it: requiring it in the linear part means a frame
    /// that parses is one NAT can translate (never a half-written split frame).
    _csum: u16,
}

/// Parses the frame into `out` (written whole when the verdict is [`PACKET`]). Not inlined,
/// and writing through `out` rather than returning a packet (the verifier refuses a returned
/// pointer to the stack): its temporaries (both families' headers) stay off the program
/// entry's frame, which the verifier adds to the deepest call chain's (see `handle` in
/// main.rs). Fields are written in place, never through an intermediate copy.
#[inline(never)]
pub fn parse(ctx: &XdpContext, out: *mut Packet) -> u32 {
    let mut ethertype = match be16(ctx, 12) {
        Some(t) => t,
        None => return drop(stat::MALFORMED),
    };
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = match be16(ctx, 16) {
            Some(t) => t,
            None => return short(ctx, 18),
        };
        l3 += 4;
    }
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, l3, out),
        ETH_P_IPV6 => parse_ipv6(ctx, l3, out),
        _ => pass(stat::PASS_NOT_IP),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize, out: *mut Packet) -> u32 {
    let ip = match at::<Ipv4Hdr>(ctx, l3) {
        Some(p) => unsafe { &*p },
        None => return short(ctx, l3 + IPV4_MIN_HLEN),
    };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return drop(stat::MALFORMED);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    // The IP length must cover the header and fit in the frame (trailing padding is fine).
    if (tot_len as usize) < ihl {
        return drop(stat::MALFORMED);
    }
    let (src, dst) = (ip.src, ip.dst);
    let mut bytes = (ctx.data_end() - ctx.data()) as u32;
    if ctx.data() + l3 + tot_len as usize > ctx.data_end() {
        // Past the linear part: a multi-buffer frame, or a lie.
        let full = frame_len(ctx);
        if l3 + tot_len as usize > full {
            return drop(stat::MALFORMED);
        }
        count(stat::MULTI_BUFFER);
        bytes = full as u32;
    }
    let proto = ip.proto;
    let frag = u16::from_be_bytes(ip.frag);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        if proto == PROTO_ICMP && frag & 0x3fff == 0 {
            // Possibly an error about a tracked flow (see `icmp`); ports 0, L4 = the ICMP header.
            ip_fields(
                out,
                &[src, 0, 0, 0],
                &[dst, 0, 0, 0],
                FAMILY_V4,
                proto,
                false,
            );
            lengths(out, tot_len as u32, bytes, l3);
            return l4_fields(out, 0, 0, 0, l3 + ihl);
        }
        return pass(stat::PASS_NOT_VIP);
    }
    if frag & 0x1fff != 0 {
        // A later fragment: no ports to match a service on. The kernel reassembles or drops it.
        return pass(stat::PASS_NOT_VIP);
    }
    let fragment = frag & 0x2000 != 0;
    ip_fields(
        out,
        &[src, 0, 0, 0],
        &[dst, 0, 0, 0],
        FAMILY_V4,
        proto,
        fragment,
    );
    lengths(out, tot_len as u32, bytes, l3);
    transport(ctx, out, l3 + ihl, tot_len as usize - ihl)
}

/// Writes the IP header's facts into `out`.
#[inline(always)]
fn ip_fields(out: *mut Packet, src: &[u32; 4], dst: &[u32; 4], family: u8, proto: u8, frag: bool) {
    // SAFETY (here and below): `out` points to the caller's Packet slot; plain integer fields
    // are written without reading what was there.
    unsafe {
        (*out).src = Addr { w: *src };
        (*out).dst = Addr { w: *dst };
        (*out).family = family;
        (*out).proto = proto;
        (*out).fragment = frag;
    }
}

#[inline(always)]
fn lengths(out: *mut Packet, ip_len: u32, frame_len: u32, l3: usize) {
    unsafe {
        (*out).ip_len = ip_len;
        (*out).frame_len = frame_len;
        (*out).l3 = l3 as u16;
    }
}

/// Writes the L4 facts into `out`: the packet is complete.
#[inline(always)]
fn l4_fields(out: *mut Packet, sport: u16, dport: u16, tcp_flags: u8, l4: usize) -> u32 {
    unsafe {
        (*out).sport = sport;
        (*out).dport = dport;
        (*out).tcp_flags = tcp_flags;
        (*out).l4 = l4 as u16;
    }
    PACKET
}

/// The TCP or UDP header at `l4`, `l4_len` bytes to the end of the IP packet.
#[inline(always)]
fn transport(ctx: &XdpContext, out: *mut Packet, l4: usize, l4_len: usize) -> u32 {
    let proto = unsafe { (*out).proto };
    let min_len = if proto == PROTO_TCP {
        TCP_MIN_HLEN
    } else {
        UDP_HLEN
    };
    if l4_len < min_len {
        return drop(stat::MALFORMED);
    }
    let hdr = match at::<L4Hdr>(ctx, l4) {
        Some(p) => unsafe { &*p },
        // A UDP datagram shorter than a TCP header is fine: re-read its 8-byte header.
        None if proto == PROTO_UDP => {
            return match at::<[u16; 4]>(ctx, l4) {
                Some(p) => {
                    let ports = unsafe { *p };
                    l4_fields(out, ports[0], ports[1], 0, l4)
                }
                None => short(ctx, l4 + 8),
            };
        }
        None => return short(ctx, l4 + core::mem::size_of::<L4Hdr>()),
    };
    let mut tcp_flags = 0;
    if proto == PROTO_TCP {
        let hlen = ((hdr.doff >> 4) as usize) * 4;
        if hlen < TCP_MIN_HLEN || l4_len < hlen {
            return drop(stat::MALFORMED);
        }
        tcp_flags = hdr.flags;
    }
    l4_fields(out, hdr.sport, hdr.dport, tcp_flags, l4)
}

/// The IPv6 header's fixed part, as on the wire.
#[repr(C)]
struct Ipv6Hdr {
    vtcfl: [u8; 4],
    payload_len: [u8; 2],
    nexthdr: u8,
    hop_limit: u8,
    src: [u32; 4],
    dst: [u32; 4],
}

#[inline(always)]
fn parse_ipv6(ctx: &XdpContext, l3: usize, out: *mut Packet) -> u32 {
    let ip = match at::<Ipv6Hdr>(ctx, l3) {
        Some(p) => unsafe { &*p },
        None => return short(ctx, l3 + IPV6_HLEN),
    };
    if ip.vtcfl[0] >> 4 != 6 {
        return drop(stat::MALFORMED);
    }
    // No jumbograms (payload length 0 with a hop-by-hop jumbo option): not on Ethernet. A
    // payload length of 0 is fine only with nothing after the header, which the checks below
    // find malformed for TCP and UDP.
    let ip_len = IPV6_HLEN + u16::from_be_bytes(ip.payload_len) as usize;
    let (src, dst) = (ip.src, ip.dst);
    let mut next = ip.nexthdr;
    let mut bytes = (ctx.data_end() - ctx.data()) as u32;
    let ip_end = l3 + ip_len;
    if ctx.data() + ip_end > ctx.data_end() {
        let full = frame_len(ctx);
        if ip_end > full {
            return drop(stat::MALFORMED);
        }
        count(stat::MULTI_BUFFER);
        bytes = full as u32;
    }
    let mut off = l3 + IPV6_HLEN;
    let mut fragment = false;
    if is_ext(next) {
        let walked = skip_ext(ctx, off as u32, ip_end as u32, next as u32);
        match walked >> 28 {
            WALK_OK => {}
            WALK_MALFORMED => return drop(stat::MALFORMED),
            WALK_LATER_FRAGMENT => return pass(stat::PASS_NOT_VIP),
            _ => return pass(stat::PASS_IPV6_EXT),
        }
        off = (walked & 0xffff) as usize;
        next = (walked >> 16) as u8;
        fragment = walked & WALK_F_FRAGMENT != 0;
        // Re-proved here for the verifier, which sees a returned scalar.
        if off > MAX_L4_OFF || off > ip_end {
            return pass(stat::PASS_IPV6_EXT);
        }
    }
    match next {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => {}
        // Extension headers we do not follow: still a header chain (or too long a one), AH,
        // ESP, no next header, mobility, HIP, shim6, experimental.
        NH_HOP | NH_ROUTING | NH_FRAGMENT | NH_DSTOPTS | 50 | 51 | 59 | 135 | 139 | 140 | 253
        | 254 => return pass(stat::PASS_IPV6_EXT),
        _ => return pass(stat::PASS_NOT_VIP),
    }
    if next == PROTO_ICMPV6 && fragment {
        return pass(stat::PASS_NOT_VIP);
    }
    ip_fields(out, &src, &dst, FAMILY_V6, next, fragment);
    lengths(out, ip_len as u32, bytes, l3);
    if next == PROTO_ICMPV6 {
        // Possibly an error about a tracked flow (see `icmp6`); ports 0.
        return l4_fields(out, 0, 0, 0, off);
    }
    transport(ctx, out, off, ip_end - off)
}

/// An extension header [`skip_ext`] walks.
#[inline(always)]
fn is_ext(nh: u8) -> bool {
    matches!(nh, NH_HOP | NH_ROUTING | NH_DSTOPTS | NH_FRAGMENT)
}

/// [`skip_ext`]'s verdict, in its top four bits.
const WALK_OK: u32 = 0;
const WALK_MALFORMED: u32 = 1;
const WALK_LATER_FRAGMENT: u32 = 2;
const WALK_TOO_LONG: u32 = 3;
const WALK_ROUTED: u32 = 4;
/// [`skip_ext`]: a fragment header said more fragments follow (a first fragment).
const WALK_F_FRAGMENT: u32 = 1 << 24;

/// Walks the IPv6 extension headers from `off` (the first one's type is `next`) up to the first
/// header that is not one of [`is_ext`], at most [`MAX_EXT`] of them and not past
/// [`MAX_L4_OFF`]. Returns the verdict (top 4 bits), `WALK_F_FRAGMENT`, the next-header value
/// (bits 16..24) and the offset of that header (low 16 bits). Reads with `bpf_xdp_load_bytes`,
/// not packet pointers: the offsets vary per iteration, and copies of the packet pointer through
/// the loop defeat the verifier's range tracking. Only packets with extension headers pay for
/// it. Not inlined: the loop stays out of `parse`'s frame and state space.
#[inline(never)]
fn skip_ext(ctx: &XdpContext, off: u32, ip_end: u32, next: u32) -> u32 {
    let mut off = off;
    let mut next = next as u8;
    let mut flags = 0;
    for _ in 0..MAX_EXT {
        if !is_ext(next) {
            return (WALK_OK << 28) | flags | ((next as u32) << 16) | off;
        }
        let mut h = [0u8; 4];
        let n = if next == NH_FRAGMENT || next == NH_ROUTING {
            4
        } else {
            2
        };
        // The header's first bytes must lie in the packet, not just in the frame's padding.
        if off + n > ip_end {
            return WALK_MALFORMED << 28;
        }
        let rc = unsafe { bpf_xdp_load_bytes(ctx.ctx, off, h.as_mut_ptr() as *mut _, n) };
        if rc != 0 {
            return WALK_MALFORMED << 28;
        }
        let len = if next == NH_FRAGMENT {
            let offset_m = u16::from_be_bytes([h[2], h[3]]);
            if offset_m & 0xfff8 != 0 {
                return WALK_LATER_FRAGMENT << 28;
            }
            // M set: the first of several; M clear: an atomic fragment, the whole datagram.
            if offset_m & 1 != 0 {
                flags = WALK_F_FRAGMENT;
            }
            8
        } else {
            if next == NH_ROUTING && h[3] != 0 {
                // Segments left: the VIP is a waypoint, not the packet's destination (and the
                // L4 checksum is over the final one, RFC 8200 8.1). The kernel's to route.
                return WALK_ROUTED << 28;
            }
            // Length in 8-octet units, not counting the first 8.
            (h[1] as u32 + 1) * 8
        };
        if off + len > ip_end {
            return WALK_MALFORMED << 28;
        }
        next = h[0];
        off += len;
        if off as usize > MAX_L4_OFF {
            return WALK_TOO_LONG << 28;
        }
    }
    if is_ext(next) {
        return WALK_TOO_LONG << 28;
    }
    (WALK_OK << 28) | flags | ((next as u32) << 16) | off
}
