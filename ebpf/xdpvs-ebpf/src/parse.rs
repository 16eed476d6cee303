//! Header parsing: Ethernet (with at most one 802.1Q/802.1ad tag), IPv4, TCP/UDP; unfragmented
//! ICMP is handed on with its header's offset (`icmp` reads the rest).
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
use aya_ebpf::{helpers::generated::bpf_xdp_get_buff_len, programs::XdpContext};
use xdpvs_common::{
    stat, state::TCP_ACK, state::TCP_SYN, Addr, ConnKey, ServiceKey, FAMILY_V4, PROTO_ICMP,
    PROTO_TCP, PROTO_UDP,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPV4_MIN_HLEN: usize = 20;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;

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
    /// IP total length (host order), for MTU checks.
    pub ip_len: u16,
    /// Bytes of the whole frame (linear part and fragments), for byte counters.
    pub frame_len: u32,
    /// Offsets of the IP and L4 headers in the frame (NAT rewrites them; IP options are
    /// skipped by the L4 offset, so they are carried through untouched).
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

pub enum Parsed {
    Packet(Packet),
    /// Not ours: hand to the kernel; the `stat::*` to count.
    Pass(u32),
    /// Broken: drop; the `stat::*` to count.
    Drop(u32),
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
fn short(ctx: &XdpContext, end: usize) -> Parsed {
    if frame_len(ctx) >= end {
        Parsed::Pass(stat::PASS_SPLIT_HEADERS)
    } else {
        Parsed::Drop(stat::MALFORMED)
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

pub fn parse(ctx: &XdpContext) -> Parsed {
    let mut ethertype = match be16(ctx, 12) {
        Some(t) => t,
        None => return Parsed::Drop(stat::MALFORMED),
    };
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        ethertype = match be16(ctx, 16) {
            Some(t) => t,
            None => return short(ctx, 18),
        };
        l3 += 4;
    }
    if ethertype != ETH_P_IP {
        return Parsed::Pass(stat::PASS_NOT_IP);
    }
    parse_ipv4(ctx, l3)
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3: usize) -> Parsed {
    let ip = match at::<Ipv4Hdr>(ctx, l3) {
        Some(p) => unsafe { &*p },
        None => return short(ctx, l3 + IPV4_MIN_HLEN),
    };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Parsed::Drop(stat::MALFORMED);
    }
    let tot_len = u16::from_be_bytes(ip.tot_len);
    // The IP length must cover the header and fit in the frame (trailing padding is fine).
    if (tot_len as usize) < ihl {
        return Parsed::Drop(stat::MALFORMED);
    }
    let (src, dst) = (ip.src, ip.dst);
    let mut bytes = (ctx.data_end() - ctx.data()) as u32;
    if ctx.data() + l3 + tot_len as usize > ctx.data_end() {
        // Past the linear part: a multi-buffer frame, or a lie.
        let full = frame_len(ctx);
        if l3 + tot_len as usize > full {
            return Parsed::Drop(stat::MALFORMED);
        }
        count(stat::MULTI_BUFFER);
        bytes = full as u32;
    }
    let proto = ip.proto;
    let frag = u16::from_be_bytes(ip.frag);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        if proto == PROTO_ICMP && frag & 0x3fff == 0 {
            // Possibly an error about a tracked flow (see `icmp`); ports 0, L4 = the ICMP header.
            return packet(
                src,
                dst,
                0,
                0,
                proto,
                0,
                false,
                tot_len,
                bytes,
                l3,
                l3 + ihl,
            );
        }
        return Parsed::Pass(stat::PASS_NOT_VIP);
    }
    if frag & 0x1fff != 0 {
        // A later fragment: no ports to match a service on. The kernel reassembles or drops it.
        return Parsed::Pass(stat::PASS_NOT_VIP);
    }
    let more_fragments = frag & 0x2000 != 0;
    let l4_len = tot_len as usize - ihl;
    let min_len = if proto == PROTO_TCP {
        TCP_MIN_HLEN
    } else {
        UDP_HLEN
    };
    if l4_len < min_len {
        return Parsed::Drop(stat::MALFORMED);
    }
    let l4 = match at::<L4Hdr>(ctx, l3 + ihl) {
        Some(p) => unsafe { &*p },
        // A UDP datagram shorter than a TCP header is fine: re-read its 8-byte header.
        None if proto == PROTO_UDP => {
            return match at::<[u16; 4]>(ctx, l3 + ihl) {
                Some(p) => {
                    let ports = unsafe { *p };
                    packet(
                        src,
                        dst,
                        ports[0],
                        ports[1],
                        proto,
                        0,
                        more_fragments,
                        tot_len,
                        bytes,
                        l3,
                        l3 + ihl,
                    )
                }
                None => short(ctx, l3 + ihl + 8),
            };
        }
        None => return short(ctx, l3 + ihl + core::mem::size_of::<L4Hdr>()),
    };
    let mut tcp_flags = 0;
    if proto == PROTO_TCP {
        let hlen = ((l4.doff >> 4) as usize) * 4;
        if hlen < TCP_MIN_HLEN || l4_len < hlen {
            return Parsed::Drop(stat::MALFORMED);
        }
        tcp_flags = l4.flags;
    }
    packet(
        src,
        dst,
        l4.sport,
        l4.dport,
        proto,
        tcp_flags,
        more_fragments,
        tot_len,
        bytes,
        l3,
        l3 + ihl,
    )
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn packet(
    src: u32,
    dst: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    tcp_flags: u8,
    fragment: bool,
    ip_len: u16,
    frame_len: u32,
    l3: usize,
    l4: usize,
) -> Parsed {
    Parsed::Packet(Packet {
        src: Addr { w: [src, 0, 0, 0] },
        dst: Addr { w: [dst, 0, 0, 0] },
        sport,
        dport,
        proto,
        family: FAMILY_V4,
        tcp_flags,
        fragment,
        ip_len,
        frame_len,
        l3: l3 as u16,
        l4: l4 as u16,
    })
}
