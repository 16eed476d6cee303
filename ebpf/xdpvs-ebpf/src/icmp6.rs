//! ICMPv6 errors about tracked flows, and the rest of ICMPv6 left to the kernel.
//!
//! The IPv6 twin of [`icmp`](crate::icmp): a Destination Unreachable (type 1) or Packet Too Big
//! (type 2, IPv6's only path-MTU signal: routers never fragment) whose quoted packet is a tracked
//! flow's packet from its VIP goes to that flow's real, unchanged for DR, translated for NAT (the
//! outer destination and the quoted source address and port become the real's; the quoted L4
//! checksum and the ICMPv6 checksum, whose pseudo-header holds the outer destination, are updated
//! incrementally; there is no IP checksum). Everything else is the kernel's, untouched
//! (`PASS_ICMP`): neighbour discovery (133-137, so the director answers for its VIPs and learns
//! its neighbours), echo, errors about no tracked flow, and quotes we do not read (an extension
//! header in the quoted packet, a quote too short for its ports). Read-only on the connection
//! tables, as for IPv4.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use xdpvs_common::{stat, Addr, ConnKey, ServiceKey, FAMILY_V6, PROTO_TCP, PROTO_UDP};

use crate::icmp::{flow_of, send_to_real, Flow};
use crate::maps::count;
use crate::nat::{addr6_diff, update};
use crate::parse::Packet;

const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_HLEN: usize = 8;
const IPV6_HLEN: usize = 40;
/// `translate`'s `quote` flags, as in `icmp`.
const Q_L4CSUM: u32 = 0x1000;
const Q_TCP: u32 = 0x2000;

/// An ICMPv6 packet (`pkt.l4` is its header). Not inlined: its own frame.
#[inline(never)]
pub fn handle(ctx: &XdpContext, pkt: &Packet) -> u32 {
    match to_real(ctx, pkt) {
        Some(action) => action,
        None => {
            count(stat::PASS_ICMP);
            xdp_action::XDP_PASS
        }
    }
}

#[inline(always)]
fn to_real(ctx: &XdpContext, pkt: &Packet) -> Option<u32> {
    let base = ctx.data();
    let end = ctx.data_end();
    // Bounded for the verifier: l4 < parse::MAX_L4_OFF < 512.
    let l4 = (pkt.l4 as usize) & 0x1ff;
    let icmp = base + l4;
    let inner = icmp + ICMP6_HLEN;
    if inner + IPV6_HLEN > end {
        return None;
    }
    let (ty, vtc, inh, isrc, idst) = unsafe {
        (
            *(icmp as *const u8),
            *(inner as *const u8),
            *((inner + 6) as *const u8),
            *((inner + 8) as *const [u32; 4]),
            *((inner + 24) as *const [u32; 4]),
        )
    };
    if (ty != ICMP6_DEST_UNREACH && ty != ICMP6_PACKET_TOO_BIG)
        || vtc >> 4 != 6
        || (inh != PROTO_TCP && inh != PROTO_UDP)
        || isrc != pkt.dst.w
    {
        return None;
    }
    let il4_off = l4 + ICMP6_HLEN + IPV6_HLEN;
    // The quoted ports, inside the frame and inside the outer IP packet.
    let ip_end = ((pkt.l3 as usize) & 0x1f) + pkt.ip_len as usize;
    if base + il4_off + 4 > end || il4_off + 4 > ip_end {
        return None;
    }
    let ports = unsafe { *((base + il4_off) as *const [u16; 2]) };
    // The quoted packet went VIP -> client: the flow is keyed client -> VIP.
    let key = ConnKey {
        src: Addr { w: idst },
        dst: Addr { w: isrc },
        sport: ports[1],
        dport: ports[0],
        proto: inh,
        family: FAMILY_V6,
        _pad: [0; 2],
    };
    let svc = ServiceKey {
        addr: key.dst,
        port: key.dport,
        proto: inh,
        family: FAMILY_V6,
    };
    let (real_id, real, nat) = match flow_of(&svc, &key) {
        Flow::Kernel => return None,
        Flow::Drop => return Some(xdp_action::XDP_DROP),
        Flow::To { id, real, nat } => (id, real, nat),
    };
    if let Some((nat_addr, nat_port)) = nat {
        let l4csum_end = il4_off + if inh == PROTO_TCP { 18 } else { 8 };
        let l4csum = l4csum_end <= ip_end;
        let quote = il4_off as u32
            | if l4csum { Q_L4CSUM } else { 0 }
            | if inh == PROTO_TCP { Q_TCP } else { 0 };
        if !translate(ctx, pkt, quote, &nat_addr, nat_port) {
            count(stat::PASS_SPLIT_HEADERS);
            return Some(xdp_action::XDP_DROP);
        }
    }
    Some(send_to_real(ctx, pkt, real_id, &real))
}

/// Rewrites a NAT flow's ICMPv6 error for its real: the outer destination (VIP -> real), the
/// quoted source address and port (VIP:port -> real:port), the quoted L4 checksum if the quote
/// holds it, and the ICMPv6 checksum (its pseudo-header's destination and the changed body).
/// False (nothing written) if a field is past the linear part. `quote`: the quoted L4 header's
/// offset, `Q_L4CSUM` and `Q_TCP`.
#[inline(never)]
fn translate(ctx: &XdpContext, pkt: &Packet, quote: u32, addr: &Addr, port: u16) -> bool {
    let il4_off = (quote & 0x3ff) as usize;
    let l4csum = quote & Q_L4CSUM != 0;
    let tcp = quote & Q_TCP != 0;
    let base = ctx.data();
    let end = ctx.data_end();
    let ip = base + ((pkt.l3 as usize) & 0x1f);
    let icmp = base + ((pkt.l4 as usize) & 0x1ff);
    let inner = icmp + ICMP6_HLEN;
    let il4 = base + il4_off;
    let csum_at = il4 + if tcp { 16 } else { 6 };
    if ip + IPV6_HLEN > end
        || inner + IPV6_HLEN > end
        || il4 + 4 > end
        || (l4csum && csum_at + 2 > end)
    {
        return false;
    }
    let d_addr = addr6_diff(&pkt.dst, addr);
    unsafe {
        // Outer destination: only the ICMPv6 pseudo-header sees it.
        *((ip + 24) as *mut [u32; 4]) = addr.w;
        // Quoted source and port.
        *((inner + 8) as *mut [u32; 4]) = addr.w;
        let sport = il4 as *mut u16;
        let d_port = (!*sport) as u64 + port as u64;
        *sport = port;
        let mut d_icmp = d_addr + d_addr + d_port;
        if l4csum && csum_at + 2 <= end {
            let c = csum_at as *mut u16;
            let old = *c;
            let mut new = update(old, d_addr + d_port);
            if new == 0 && !tcp {
                new = 0xffff;
            }
            *c = new;
            d_icmp += (!old) as u64 + new as u64;
        }
        let ccsum = (icmp + 2) as *mut u16;
        *ccsum = update(*ccsum, d_icmp);
    }
    true
}
