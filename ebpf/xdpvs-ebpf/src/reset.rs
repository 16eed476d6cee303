//! Failing fast when a connection is lost: a TCP RST to the client, built in place.
//!
//! A mid-flow TCP segment to a service whose flow is not in the connection table (the daemon
//! was started `--fresh`, the entry expired or was evicted, the flow moved from another
//! director) cannot be sent on under a load-based scheduler: its real was chosen by load and
//! nothing remembers which. Dropping it leaves the client retransmitting for minutes. IPVS's
//! director answers such a stray segment for its local VIP with a RST from its own stack; this
//! does the same from XDP: the frame is turned around into the RST that RFC 793 (3.4, "Reset
//! Generation", CLOSED state) prescribes, and sent back out of the ingress interface. The
//! client's connection fails at once with ECONNRESET.
//!
//! Like any RST, it is not sent for a segment that itself carries RST. IPv4 without IP options
//! and IPv6 without extension headers; anything else is dropped as before (`drop_no_conn`).
use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use core::ptr::{read_unaligned, write_unaligned};
use xdpvs_common::{
    stat,
    state::{TCP_ACK as ACK, TCP_FIN as FIN, TCP_RST as RST, TCP_SYN as SYN},
    FAMILY_V4, FAMILY_V6,
};

use crate::maps::count;
use crate::parse::Packet;

/// Sum of `n` 16-bit words at `p` (read as on the wire).
#[inline(always)]
unsafe fn sum16(p: usize, n: usize) -> u32 {
    let mut s = 0u32;
    for i in 0..n {
        s += u16::from_be(read_unaligned((p + 2 * i) as *const u16)) as u32;
    }
    s
}

#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Answers the segment with a RST to its sender (XDP_TX), or drops it. Counted
/// `miss_reset` (and `tx`), or `drop_no_conn`.
#[inline(never)]
pub fn reset(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let v4 = pkt.family == FAMILY_V4 && pkt.l4 == pkt.l3 + 20;
    let v6 = pkt.family == FAMILY_V6 && pkt.l4 == pkt.l3 + 40;
    if pkt.tcp_flags & RST != 0 || !(v4 || v6) {
        count(stat::DROP_NO_CONN);
        return xdp_action::XDP_DROP;
    }
    // With or without a VLAN tag: constant offsets, so one bounds check covers every access.
    match (pkt.l3, v6) {
        (14, false) => turn::<14>(ctx, pkt),
        (18, false) => turn::<18>(ctx, pkt),
        (14, true) => turn6::<14>(ctx, pkt),
        (18, true) => turn6::<18>(ctx, pkt),
        _ => {
            count(stat::DROP_NO_CONN);
            xdp_action::XDP_DROP
        }
    }
}

/// Ethernet back to the sender (the client, or the router in front).
#[inline(always)]
unsafe fn swap_macs(start: usize) {
    let d = start as *mut [u8; 6];
    let s = (start + 6) as *mut [u8; 6];
    let mac = *d;
    *d = *s;
    *s = mac;
}

/// Rewrites the TCP header at `tcp` into the RST answering it (RFC 793 3.4), its checksum
/// from `pseudo` (the pseudo-header's sum, length 20 included); `ip_payload` is the segment's
/// length as the IP header gave it.
#[inline(always)]
unsafe fn tcp_reset(tcp: usize, flags: u8, ip_payload: u32, pseudo: u32) {
    let seq = u32::from_be(read_unaligned((tcp + 4) as *const u32));
    let ack = u32::from_be(read_unaligned((tcp + 8) as *const u32));
    let doff = ((*((tcp + 12) as *const u8) >> 4) as u32) * 4;
    // With an ACK, the reset's sequence number is that ACK; without one, it is 0 and it
    // acknowledges the whole segment (SYN and FIN count one each).
    let (rseq, rack, rflags) = if flags & ACK != 0 {
        (ack, 0, RST)
    } else {
        let data = ip_payload.saturating_sub(doff);
        let len = data + (flags & SYN != 0) as u32 + (flags & FIN != 0) as u32;
        (0, seq.wrapping_add(len), RST | ACK)
    };
    let sport = read_unaligned(tcp as *const u16);
    let dport = read_unaligned((tcp + 2) as *const u16);
    write_unaligned(tcp as *mut u16, dport);
    write_unaligned((tcp + 2) as *mut u16, sport);
    write_unaligned((tcp + 4) as *mut u32, rseq.to_be());
    write_unaligned((tcp + 8) as *mut u32, rack.to_be());
    *((tcp + 12) as *mut u8) = 5 << 4;
    *((tcp + 13) as *mut u8) = rflags;
    write_unaligned((tcp + 14) as *mut u16, 0);
    write_unaligned((tcp + 16) as *mut u16, 0);
    write_unaligned((tcp + 18) as *mut u16, 0);
    let c = fold(pseudo + sum16(tcp, 10));
    write_unaligned((tcp + 16) as *mut u16, c.to_be());
}

/// Cuts the frame after the RST's TCP header (payload, padding and any fragments go) and
/// sends it back.
#[inline(always)]
fn send_back(ctx: &XdpContext, pkt: &Packet, len: usize) -> u32 {
    let delta = len as i32 - pkt.frame_len as i32;
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        count(stat::DROP_NO_CONN);
        return xdp_action::XDP_DROP;
    }
    count(stat::MISS_RESET);
    count(stat::TX);
    xdp_action::XDP_TX
}

/// The IPv6 twin of [`turn`]: addresses swapped, 20 bytes of payload, hop limit 64, traffic
/// class and flow label 0.
#[inline(always)]
fn turn6<const L3: usize>(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let start = ctx.data();
    let ip = start + L3;
    let tcp = ip + 40;
    if tcp + 20 > ctx.data_end() {
        count(stat::DROP_NO_CONN);
        return xdp_action::XDP_DROP;
    }
    unsafe {
        swap_macs(start);
        let src = read_unaligned((ip + 8) as *const [u32; 4]);
        let dst = read_unaligned((ip + 24) as *const [u32; 4]);
        write_unaligned((ip + 8) as *mut [u32; 4], dst);
        write_unaligned((ip + 24) as *mut [u32; 4], src);
        write_unaligned(ip as *mut u32, (6u32 << 28).to_be());
        write_unaligned((ip + 4) as *mut u16, 20u16.to_be());
        *((ip + 7) as *mut u8) = 64;
        let payload = (pkt.ip_len as u32).saturating_sub(40);
        tcp_reset(tcp, pkt.tcp_flags, payload, sum16(ip + 8, 16) + 6 + 20);
    }
    send_back(ctx, pkt, L3 + 60)
}

#[inline(always)]
fn turn<const L3: usize>(ctx: &XdpContext, pkt: &Packet) -> u32 {
    let start = ctx.data();
    let end = ctx.data_end();
    let l3 = L3;
    let ip = start + l3;
    let tcp = ip + 20;
    if tcp + 20 > end {
        count(stat::DROP_NO_CONN);
        return xdp_action::XDP_DROP;
    }
    unsafe {
        swap_macs(start);
        // IPv4: swap the addresses, 40 bytes long, a fresh TTL, DF, no id.
        let src = read_unaligned((ip + 12) as *const u32);
        let dst = read_unaligned((ip + 16) as *const u32);
        write_unaligned((ip + 12) as *mut u32, dst);
        write_unaligned((ip + 16) as *mut u32, src);
        write_unaligned((ip + 2) as *mut u16, 40u16.to_be());
        write_unaligned((ip + 4) as *mut u16, 0);
        write_unaligned((ip + 6) as *mut u16, 0x4000u16.to_be());
        *((ip + 8) as *mut u8) = 64;
        write_unaligned((ip + 10) as *mut u16, 0);
        let c = fold(sum16(ip, 10));
        write_unaligned((ip + 10) as *mut u16, c.to_be());
        // TCP: swap the ports, no options, no window, no payload; the pseudo-header is both
        // addresses, protocol 6, length 20.
        let payload = (pkt.ip_len as u32).saturating_sub(20);
        tcp_reset(tcp, pkt.tcp_flags, payload, sum16(ip + 12, 4) + 6 + 20);
    }
    send_back(ctx, pkt, l3 + 40)
}
