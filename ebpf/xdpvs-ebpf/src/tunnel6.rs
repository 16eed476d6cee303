//! Tunnel forwarding for IPv6 services: the client's IPv6 packet in an outer IPv6 header to the
//! real (next header 41, an `ip6tnl`/`ip6ip6` device on the real), or in UDP + GUE (IPVS's GUE
//! over IPv6; `ip fou add port P gue -6` on the real). See `tunnel` for what both families share.
//!
//! Over IPv6 a UDP checksum is mandatory. It is computed from headers only: the client's
//! packet is a TCP or UDP segment (or an ICMPv6 message) whose own checksum, with its
//! pseudo-header, already sums to zero, so its bytes sum to the complement of its pseudo-header
//! and need not be read. That holds for the upper-layer header right after the IPv6 header; a
//! packet with extension headers between the two is dropped under GUE and counted
//! (`drop_tunnel_ext`), as summing them is not done here. Traffic class is copied, the flow
//! label is a per-flow hash (RFC 6437), the hop limit 64. A packet too big for the tunnel gets
//! an ICMPv6 Packet Too Big from the VIP (every IPv6 packet: IPv6 routers never fragment),
//! announcing the path MTU less the tunnel's overhead, at least 1280.
use aya_ebpf::{
    bindings::xdp_action, helpers::generated::bpf_xdp_adjust_head,
    helpers::generated::bpf_xdp_adjust_tail, programs::XdpContext,
};
use xdpvs_common::{stat, Real};

use crate::maps::{count, FIB_SCRATCH, REAL_STATS, TUNNEL_SCRATCH};
use crate::parse::Packet;
use crate::tunnel::{
    flow_hash, fold, move_tags, overhead, turn_around, GUE_HLEN, ICMP_HLEN, IPPROTO_IPV6,
    IPPROTO_UDP, IPV6_HLEN, QUOTE6, UDP_HLEN,
};

const HOP_LIMIT: u8 = 64;
const ICMPV6: u8 = 58;
const PACKET_TOO_BIG: u8 = 2;

/// One's-complement sum of the 16-bit words of `n` bytes at `p` (as stored), `n` constant.
#[inline(always)]
unsafe fn sum16(p: usize, n: usize) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i < n {
        s += *((p + i) as *const u16) as u32;
        i += 2;
    }
    s
}

/// The IPv6 twin of `tunnel::encap`: returns the egress interface, or 0 if dropped.
#[inline(never)]
pub fn encap(ctx: &XdpContext, pkt: &Packet, real_id: u32, real: &Real, gue_port: u16) -> u32 {
    let gue = gue_port != 0;
    if gue && pkt.l4 as usize != pkt.l3 as usize + IPV6_HLEN {
        count(stat::DROP_TUNNEL_EXT);
        return 0;
    }
    let overhead = overhead(pkt, gue_port);
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(overhead as i32)) } != 0 {
        count(stat::DROP_FIB);
        return 0;
    }
    let start = ctx.data();
    let end = ctx.data_end();
    let l3 = (pkt.l3 as usize) & 0x1f;
    let moved = if gue {
        move_tags::<{ IPV6_HLEN + UDP_HLEN + GUE_HLEN }>(start, end)
    } else {
        move_tags::<IPV6_HLEN>(start, end)
    };
    if !moved || start + l3 + overhead + IPV6_HLEN > end || l3 < 14 {
        count(stat::MALFORMED);
        return 0;
    }
    let fib = match FIB_SCRATCH.get_ptr(0) {
        Some(f) => unsafe { &*f },
        None => return 0,
    };
    let outer_len = pkt.ip_len as usize + overhead;
    unsafe {
        *(start as *mut [u8; 6]) = fib.dmac;
        *((start + 6) as *mut [u8; 6]) = fib.smac;
        let ip = start + l3;
        let inner = ip + overhead;
        let tc = (u32::from_be(*(inner as *const u32)) >> 20) & 0xff;
        let word0 = (6u32 << 28) | (tc << 20) | (flow_hash(pkt) & 0xfffff);
        *(ip as *mut u32) = word0.to_be();
        *((ip + 4) as *mut u16) = ((outer_len - IPV6_HLEN) as u16).to_be();
        *((ip + 6) as *mut u8) = if gue { IPPROTO_UDP } else { IPPROTO_IPV6 };
        *((ip + 7) as *mut u8) = HOP_LIMIT;
        *((ip + 8) as *mut [u32; 4]) = fib.__bindgen_anon_3.ipv6_src;
        *((ip + 24) as *mut [u32; 4]) = real.addr.w;
        if gue {
            let udp = ip + IPV6_HLEN;
            let udp_len = (outer_len - IPV6_HLEN) as u16;
            let sport = 0xc000 | (flow_hash(pkt) & 0x3fff) as u16;
            *(udp as *mut u16) = sport.to_be();
            *((udp + 2) as *mut u16) = gue_port;
            *((udp + 4) as *mut u16) = udp_len.to_be();
            *((udp + 6) as *mut u16) = 0;
            *((udp + 8) as *mut [u8; 4]) = [0, IPPROTO_IPV6, 0, 0];
            // Outer pseudo-header, UDP and GUE headers, the inner IPv6 header, then the inner
            // segment's sum: the complement of its pseudo-header's (see the module doc).
            let mut s = sum16(ip + 8, 32)
                + (udp_len.to_be() as u32)
                + ((IPPROTO_UDP as u16).to_be() as u32)
                + sum16(udp, UDP_HLEN + GUE_HLEN)
                + sum16(inner, IPV6_HLEN);
            let seg_len = (pkt.ip_len as usize - IPV6_HLEN) as u16;
            let pseudo = sum16(inner + 8, 32)
                + (seg_len.to_be() as u32)
                + ((pkt.proto as u16).to_be() as u32);
            s += (!fold(pseudo)) as u32;
            let mut c = !fold(s);
            if c == 0 {
                c = 0xffff;
            }
            *((udp + 6) as *mut u16) = c;
        }
    }
    if let Some(st) = REAL_STATS.get_ptr_mut(real_id) {
        unsafe {
            (*st).packets += 1;
            (*st).bytes += pkt.frame_len as u64;
        }
    }
    fib.ifindex
}

/// Answers `pkt` with an ICMPv6 Packet Too Big announcing `mtu`, from the VIP: the frame is cut
/// to the message's size and rewritten in place (the first [`QUOTE6`] bytes of the packet
/// quoted, the MACs swapped). A tagged frame is dropped, as for IPv4.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u32) -> u32 {
    if pkt.l3 != 14 {
        count(stat::DROP_TUNNEL_MTU);
        return xdp_action::XDP_DROP;
    }
    const REPLY: usize = 14 + IPV6_HLEN + ICMP_HLEN + QUOTE6;
    let Some((keep, start)) = turn_around::<QUOTE6, REPLY>(ctx) else {
        count(stat::DROP_TUNNEL_MTU);
        return xdp_action::XDP_DROP;
    };
    let plen = (ICMP_HLEN + QUOTE6) as u16;
    unsafe {
        *((start + 12) as *mut u16) = 0x86ddu16.to_be();
        let ip = start + 14;
        *(ip as *mut u32) = (6u32 << 28).to_be();
        *((ip + 4) as *mut u16) = plen.to_be();
        *((ip + 6) as *mut u8) = ICMPV6;
        *((ip + 7) as *mut u8) = HOP_LIMIT;
        *((ip + 8) as *mut [u32; 4]) = pkt.dst.w;
        *((ip + 24) as *mut [u32; 4]) = pkt.src.w;
        let icmp = ip + IPV6_HLEN;
        *(icmp as *mut [u8; 4]) = [PACKET_TOO_BIG, 0, 0, 0];
        *((icmp + 4) as *mut u32) = mtu.to_be();
        let mut i = 0;
        while i < QUOTE6 / 2 {
            *((icmp + ICMP_HLEN + 2 * i) as *mut u16) = keep.quote[i];
            i += 1;
        }
        let s = sum16(ip + 8, 32)
            + (plen.to_be() as u32)
            + ((ICMPV6 as u16).to_be() as u32)
            + sum16(icmp, ICMP_HLEN + QUOTE6);
        *((icmp + 2) as *mut u16) = !fold(s);
    }
    count(stat::TUNNEL_FRAG_NEEDED);
    count(stat::TX);
    xdp_action::XDP_TX
}
