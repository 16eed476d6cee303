//! Tunnel forwarding (LVS-TUN): the client's IP packet is encapsulated, whole and unchanged, in
//! an outer IPv4 header to the real, which decapsulates it and answers the client itself (the
//! VIP on its loopback, as for direct routing), so reals may sit on other networks.
//!
//! Two encapsulations, as IPVS offers them (`ipvsadm --tun-type`):
//! - `ipip`: outer IPv4 (protocol 4), the real runs an `ipip` tunnel device;
//! - `gue`: outer IPv4 + UDP to the service's `tunnel_port` + a 4-byte GUE header (version 0,
//!   no options, protocol 4), IPVS's layout; the real runs `ip fou add port P gue`. The UDP
//!   source port is a hash of the client's address and port, so the real's NIC spreads flows
//!   over its queues (RSS); the UDP checksum is 0, as RFC 768 allows over IPv4.
//!
//! The outer source is the director's own address toward the real, chosen by the kernel's FIB
//! (`BPF_FIB_LOOKUP_SRC`); TTL 64; DF is copied from the inner header, so path-MTU discovery
//! still works. The lookup is asked the outer packet's length: if the egress MTU cannot carry
//! it, a client packet with DF set is answered with ICMP "fragmentation needed" carrying the
//! MTU minus the tunnel's overhead (what IPVS's `ip_vs_tunnel_xmit` does), built here and sent
//! back with XDP_TX (`tunnel_frag_needed`); without DF it is dropped (`drop_tunnel_mtu`: XDP
//! cannot fragment). IPv6 services: `tunnel6`. VLAN-tagged frames keep their tags.
//!
//! This kernel has no ipip or fou module, so encapsulation is covered by dataplane tests only
//! (exact outer headers and checksums), never end to end here.
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use xdpvs_common::{stat, Real, FAMILY_V6};

use crate::maps::{count, FIB_SCRATCH, REAL_STATS, TUNNEL_SCRATCH};
use crate::parse::Packet;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;
const FIB_FRAG_NEEDED: i64 = 8;
/// `BPF_FIB_LOOKUP_SRC`: the lookup also fills in the source address to use (kernel 6.6+).
const FIB_LOOKUP_SRC: u32 = 1 << 4;
const IPPROTO_IPIP: u8 = 4;
pub(crate) const IPPROTO_IPV6: u8 = 41;
pub(crate) const IPPROTO_UDP: u8 = 17;
const IPV4_HLEN: usize = 20;
pub(crate) const IPV6_HLEN: usize = 40;
pub(crate) const UDP_HLEN: usize = 8;
pub(crate) const GUE_HLEN: usize = 4;
/// The smallest MTU an IPv6 link has (RFC 8200): a Packet Too Big never announces less.
const IPV6_MIN_MTU: u32 = 1280;
const IP_DF: u16 = 0x4000;
const TTL: u8 = 64;
/// Bytes of the client's packet an ICMP error quotes: its IP header (without options) and
/// the first 8 bytes of its payload (RFC 792), enough for the client to find its socket.
const QUOTE: usize = 28;
pub(crate) const ICMP_HLEN: usize = 8;
/// The quote of an ICMPv6 Packet Too Big: the IPv6 header and 8 bytes of what follows.
pub(crate) const QUOTE6: usize = 48;

/// What `too_big` keeps aside while it rewrites the frame (kernel-private scratch).
#[repr(C)]
pub struct TooBigScratch {
    /// The IPv4 error quotes the first 28 bytes, the IPv6 one 48.
    pub quote: [u16; QUOTE6 / 2],
    pub client_mac: [u8; 6],
    pub own_mac: [u8; 6],
}

/// `route`'s result for a packet too big for the tunnel: this bit, or'ed with the MTU to
/// announce (no XDP action has it).
pub const TOO_BIG: u32 = 1 << 30;

/// `route`'s result when the packet was dropped (and counted).
pub const DROPPED: u32 = 1 << 29;

/// The tunnel's overhead: the outer IP header (of the packet's family: IPv4 in IPv4, IPv6 in
/// IPv6), plus UDP and GUE with a GUE port.
#[inline(always)]
pub(crate) fn overhead(pkt: &Packet, gue_port: u16) -> usize {
    let ip = if pkt.family == FAMILY_V6 {
        IPV6_HLEN
    } else {
        IPV4_HLEN
    };
    if gue_port != 0 {
        ip + UDP_HLEN + GUE_HLEN
    } else {
        ip
    }
}

/// Looks up the route to `real` for the encapsulated packet (into `FIB_SCRATCH`, for
/// [`encap`]): 0 if it can go, [`TOO_BIG`] or'ed with the MTU to announce, or [`DROPPED`].
/// `gue_port` (network order) non-zero: GUE in UDP to that port instead of plain IPIP. The
/// route, the encapsulation and the too-big answer are three sibling calls, each with its own
/// small stack frame: nested under the packet path's, they would exceed the verifier's
/// 512-byte bound (and BPF calls take at most five arguments).
#[inline(never)]
pub fn route(ctx: &XdpContext, pkt: &Packet, real: &Real, gue_port: u16) -> u32 {
    let outer_len = pkt.ip_len as usize + overhead(pkt, gue_port);
    let fib = match FIB_SCRATCH.get_ptr_mut(0) {
        Some(f) => unsafe { &mut *f },
        None => return DROPPED,
    };
    *fib = unsafe { core::mem::zeroed() };
    let v6 = pkt.family == FAMILY_V6;
    fib.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    fib.__bindgen_anon_1.tot_len = outer_len as u16;
    if v6 {
        fib.family = AF_INET6;
        fib.l4_protocol = if gue_port != 0 {
            IPPROTO_UDP
        } else {
            IPPROTO_IPV6
        };
        fib.__bindgen_anon_4.ipv6_dst = real.addr.w;
    } else {
        fib.family = AF_INET;
        fib.l4_protocol = if gue_port != 0 {
            IPPROTO_UDP
        } else {
            IPPROTO_IPIP
        };
        fib.__bindgen_anon_4.ipv4_dst = real.addr.w[0];
    }
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            fib,
            core::mem::size_of::<FibParams>() as i32,
            FIB_LOOKUP_SRC,
        )
    };
    if rc == FIB_FRAG_NEEDED {
        let mtu = unsafe { fib.__bindgen_anon_1.mtu_result } as u32;
        let mut announce = mtu.saturating_sub(overhead(pkt, gue_port) as u32);
        if v6 && announce < IPV6_MIN_MTU {
            announce = IPV6_MIN_MTU;
        }
        return TOO_BIG | announce;
    }
    if rc != FIB_SUCCESS {
        count(if rc == FIB_NO_NEIGH {
            stat::DROP_NO_NEIGH
        } else {
            stat::DROP_FIB
        });
        return DROPPED;
    }
    0
}

/// Encapsulates `pkt` toward `real` along the route [`route`] found; returns the interface to
/// send it out of (the caller sends it: one call less deep), or 0 if it was dropped.
#[inline(never)]
pub fn encap(ctx: &XdpContext, pkt: &Packet, real_id: u32, real: &Real, gue_port: u16) -> u32 {
    let gue = gue_port != 0;
    let overhead = overhead(pkt, gue_port);
    // Little is kept across the helper call (each live value costs stack): the inner header's
    // fields are read at its new place afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        count(stat::DROP_FIB);
        return 0;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    let l3 = (pkt.l3 as usize) & 0x1f;
    // New layout: [Ethernet + tags: l3 bytes][outer headers: overhead][the client's packet].
    // The tags (and the ethertype, IPv4 before and after) move down with the new start: bytes
    // 12..22 are copied whatever l3 is (at most 22), at constant offsets the verifier can
    // check; what lands past l3 is overwritten by the outer header right after.
    let moved = if gue {
        move_tags::<{ IPV4_HLEN + UDP_HLEN + GUE_HLEN }>(start, end)
    } else {
        move_tags::<IPV4_HLEN>(start, end)
    };
    if !moved || start + l3 + overhead + IPV4_HLEN > end || l3 < 14 {
        count(stat::MALFORMED);
        return 0;
    }
    let fib = match FIB_SCRATCH.get_ptr(0) {
        Some(f) => unsafe { &*f },
        None => return xdp_action::XDP_DROP,
    };
    let outer_len = pkt.ip_len as usize + overhead;
    unsafe {
        *(start as *mut [u8; 6]) = fib.dmac;
        *((start + 6) as *mut [u8; 6]) = fib.smac;
        let ip = start + l3;
        let proto = if gue { IPPROTO_UDP } else { IPPROTO_IPIP };
        let src = fib.__bindgen_anon_3.ipv4_src;
        // Inner TOS and DF, copied to the outer header.
        let inner = ip + overhead;
        let tos = *((inner + 1) as *const u8);
        let frag = u16::from_be(*((inner + 6) as *const u16));
        write_ipv4(
            ip,
            tos,
            outer_len as u16,
            frag & IP_DF,
            proto,
            src,
            real.addr.w[0],
        );
        if gue {
            let udp = ip + IPV4_HLEN;
            let sport = 0xc000 | (flow_hash(pkt) & 0x3fff) as u16;
            *(udp as *mut u16) = sport.to_be();
            *((udp + 2) as *mut u16) = gue_port;
            *((udp + 4) as *mut u16) = ((outer_len - IPV4_HLEN) as u16).to_be();
            *((udp + 6) as *mut u16) = 0;
            // GUE version 0, C = 0, no options (hlen 0), protocol IPIP, flags 0.
            *((udp + 8) as *mut [u8; 4]) = [0, IPPROTO_IPIP, 0, 0];
        }
    }
    if let Some(s) = REAL_STATS.get_ptr_mut(real_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += pkt.frame_len as u64;
        }
    }
    fib.ifindex
}

/// Copies bytes `OVER + 12 .. OVER + 22` of the frame to `12 .. 22`; false if it is too short.
#[inline(always)]
pub(crate) fn move_tags<const OVER: usize>(start: usize, end: usize) -> bool {
    if start + OVER + 22 > end {
        return false;
    }
    unsafe {
        let mut i = 12;
        while i < 22 {
            *((start + i) as *mut u16) = *((start + OVER + i) as *const u16);
            i += 2;
        }
    }
    true
}

/// The inner IPv4 header's TOS and fragment field (host order), at `l3`.
#[inline(always)]
fn inner_tos_frag(ctx: &XdpContext, l3: usize) -> Option<(u8, u16)> {
    let ip = ctx.data() + l3;
    if ip + IPV4_HLEN > ctx.data_end() {
        return None;
    }
    unsafe {
        Some((
            *((ip + 1) as *const u8),
            u16::from_be(*((ip + 6) as *const u16)),
        ))
    }
}

/// Writes a 20-byte IPv4 header (no options, id 0) at `ip`, checksum included.
#[inline(always)]
unsafe fn write_ipv4(ip: usize, tos: u8, tot_len: u16, frag: u16, proto: u8, src: u32, dst: u32) {
    *(ip as *mut u8) = 0x45;
    *((ip + 1) as *mut u8) = tos;
    *((ip + 2) as *mut u16) = tot_len.to_be();
    *((ip + 4) as *mut u16) = 0;
    *((ip + 6) as *mut u16) = frag.to_be();
    *((ip + 8) as *mut u8) = TTL;
    *((ip + 9) as *mut u8) = proto;
    *((ip + 10) as *mut u16) = 0;
    *((ip + 12) as *mut u32) = src;
    *((ip + 16) as *mut u32) = dst;
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < IPV4_HLEN {
        sum += *((ip + i) as *const u16) as u32;
        i += 2;
    }
    *((ip + 10) as *mut u16) = !fold(sum);
}

#[inline(always)]
pub(crate) fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// A hash of the client's address and port (the GUE source port's low bits).
#[inline(always)]
pub(crate) fn flow_hash(pkt: &Packet) -> u32 {
    let a = pkt.src.w[0] ^ pkt.src.w[1] ^ pkt.src.w[2] ^ pkt.src.w[3];
    let h = a ^ (pkt.sport as u32).rotate_left(16) ^ pkt.dport as u32;
    h.wrapping_mul(0x9e37_79b1) >> 16
}

/// Turns the frame around for an error about it: keeps its first `Q` bytes after Ethernet (the
/// quote, which moves when the error's headers go in front of it) and its MACs aside in
/// per-CPU map memory (off the stack, which is near the verifier's bound here), cuts the frame
/// to `LEN` bytes and writes the MACs back swapped. Returns the quote and the new start; `None`
/// if the frame is too short or cannot be cut (the caller counts it).
#[inline(always)]
pub(crate) fn turn_around<const Q: usize, const LEN: usize>(
    ctx: &XdpContext,
) -> Option<(&'static TooBigScratch, usize)> {
    let keep = unsafe { &mut *TUNNEL_SCRATCH.get_ptr_mut(0)? };
    let start = ctx.data();
    if start + 14 + Q > ctx.data_end() {
        return None;
    }
    unsafe {
        let mut i = 0;
        while i < Q / 2 {
            keep.quote[i] = *((start + 14 + 2 * i) as *const u16);
            i += 1;
        }
        keep.client_mac = *((start + 6) as *const [u8; 6]);
        keep.own_mac = *(start as *const [u8; 6]);
    }
    let full = crate::parse::frame_len(ctx);
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, LEN as i32 - full as i32) } != 0 {
        return None;
    }
    let start = ctx.data();
    if start + LEN > ctx.data_end() {
        return None;
    }
    unsafe {
        *(start as *mut [u8; 6]) = keep.client_mac;
        *((start + 6) as *mut [u8; 6]) = keep.own_mac;
    }
    Some((keep, start))
}

/// Answers the client's packet with ICMP "fragmentation needed" (next-hop MTU `mtu`) if it has
/// DF set; drops it otherwise. The frame is cut to the error's size and rewritten in place:
/// Ethernet back to the sender, IPv4 from the VIP (whose path is too small, as IPVS answers),
/// ICMP type 3 code 4, then the first [`QUOTE`] bytes of the client's packet.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> u32 {
    let Some((tos, frag)) = inner_tos_frag(ctx, 14) else {
        count(stat::DROP_TUNNEL_MTU);
        return xdp_action::XDP_DROP;
    };
    let _ = tos;
    if frag & IP_DF == 0 || pkt.l3 != 14 {
        // Without DF the client asked to be fragmented, which XDP cannot do; a tagged frame's
        // error would need its tags rebuilt. Both are dropped and counted.
        count(stat::DROP_TUNNEL_MTU);
        return xdp_action::XDP_DROP;
    }
    const REPLY: usize = 14 + IPV4_HLEN + ICMP_HLEN + QUOTE;
    let Some((keep, start)) = turn_around::<QUOTE, REPLY>(ctx) else {
        count(stat::DROP_TUNNEL_MTU);
        return xdp_action::XDP_DROP;
    };
    unsafe {
        let ip = start + 14;
        write_ipv4(
            ip,
            0xc0, // internetwork control, as Linux sends its ICMP errors
            (IPV4_HLEN + ICMP_HLEN + QUOTE) as u16,
            IP_DF,
            1,
            pkt.dst.w[0],
            pkt.src.w[0],
        );
        let icmp = ip + IPV4_HLEN;
        *(icmp as *mut [u8; 4]) = [3, 4, 0, 0];
        *((icmp + 4) as *mut u16) = 0;
        *((icmp + 6) as *mut u16) = mtu.to_be();
        let mut i = 0;
        while i < QUOTE / 2 {
            *((icmp + ICMP_HLEN + 2 * i) as *mut u16) = keep.quote[i];
            i += 1;
        }
        let mut sum: u32 = 0;
        let mut j = 0;
        while j < ICMP_HLEN + QUOTE {
            sum += *((icmp + j) as *const u16) as u32;
            j += 2;
        }
        *((icmp + 2) as *mut u16) = !fold(sum);
    }
    count(stat::TUNNEL_FRAG_NEEDED);
    count(stat::TX);
    xdp_action::XDP_TX
}
