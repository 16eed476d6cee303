//! LVS-NAT address translation: the client's packets get the real's address and port as their
//! destination, the real's replies get the VIP and its port back as their source.
//!
//! Checksums are updated incrementally (RFC 1624, `HC' = ~(~HC + ~m + m')`): the IPv4 header's
//! for the address, TCP's and UDP's for the address (their pseudo-header) and the port. A UDP
//! checksum of 0 (none, allowed on IPv4) stays 0, and a computed 0 is sent as 0xffff. The sums
//! are taken over 16-bit words exactly as they lie in memory, which the one's-complement sum
//! allows (RFC 1071), so nothing is byte-swapped.
//!
//! IPv6 ([`rewrite6`]) has no header checksum: only the L4 checksum changes, for the 16-byte
//! address in its pseudo-header and the port. UDP over IPv6 must carry a checksum, so none is
//! left 0 (a computed 0 is sent as 0xffff, RFC 8200 8.1).
//!
//! What is rewritten lies at fixed offsets of the IP header and at the L4 header found past
//! any IPv4 options or IPv6 extension headers, so those are carried through untouched; the
//! packet's size never changes, so NAT needs no more MTU than DR. `parse` hands on only frames
//! whose IP and L4 headers (up to the checksum) lie whole in the linear part; a split
//! multi-buffer frame is passed untouched (`pass_split_headers`), and the check here stays as a
//! guard: nothing is ever half-written.
use aya_ebpf::programs::XdpContext;
use xdpvs_common::{Addr, FAMILY_V6, PROTO_TCP};

use crate::parse::Packet;

/// Offset of the source address in the IPv4 header (the destination follows at +4).
const IP_SRC: usize = 12;
const IP_CSUM: usize = 10;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

/// One's-complement sum of the two 16-bit words of `v` as stored.
#[inline(always)]
pub(crate) fn words(v: u32) -> u64 {
    ((v >> 16) + (v & 0xffff)) as u64
}

#[inline(always)]
fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// `csum` after words summing to `diff` (the `~m + m'` part) are applied.
#[inline(always)]
pub(crate) fn update(csum: u16, diff: u64) -> u16 {
    !fold(!csum as u64 + diff)
}

/// Rewrites the destination (`dst`, the client's packet to its real) or the source (the real's
/// reply, back to the VIP) address and port of `pkt` to `addr:port`. False if the headers are
/// not all in the linear part of the frame (nothing is written then). Not inlined, so its
/// temporaries stay off the callers' frames (see `handle`).
#[inline(never)]
pub fn rewrite(ctx: &XdpContext, pkt: &Packet, addr: Addr, port: u16, dst: bool) -> bool {
    if pkt.family == FAMILY_V6 {
        return rewrite6(ctx, pkt, &addr, port, dst);
    }
    let end = ctx.data_end();
    // Bounded for the verifier: l3 is 14 or 18, the IP header at most 60 bytes.
    let ip = ctx.data() + ((pkt.l3 as usize) & 0x1f);
    let l4 = ctx.data() + ((pkt.l4 as usize) & 0x7f);
    let tcp = pkt.proto == PROTO_TCP;
    if ip + 20 > end {
        return false;
    }
    let l4_csum = if tcp {
        if l4 + TCP_CSUM + 2 > end {
            return false;
        }
        (l4 + TCP_CSUM) as *mut u16
    } else {
        if l4 + UDP_CSUM + 2 > end {
            return false;
        }
        (l4 + UDP_CSUM) as *mut u16
    };
    let (old_addr, old_port) = if dst {
        (pkt.dst.w[0], pkt.dport)
    } else {
        (pkt.src.w[0], pkt.sport)
    };
    let new_addr = addr.w[0];
    let d_addr = words(!old_addr) + words(new_addr);
    let d_port = (!old_port) as u64 + port as u64;
    let (a, p) = if dst {
        (ip + IP_SRC + 4, l4 + 2)
    } else {
        (ip + IP_SRC, l4)
    };
    unsafe {
        let ip_csum = (ip + IP_CSUM) as *mut u16;
        *ip_csum = update(*ip_csum, d_addr);
        *(a as *mut u32) = new_addr;
        *(p as *mut u16) = port;
        let old = *l4_csum;
        if tcp || old != 0 {
            let mut new = update(old, d_addr + d_port);
            if new == 0 && !tcp {
                new = 0xffff;
            }
            *l4_csum = new;
        }
    }
    true
}

/// One's-complement sum of `~old + new` over the eight 16-bit words of two IPv6 addresses.
#[inline(always)]
pub(crate) fn addr6_diff(old: &Addr, new: &Addr) -> u64 {
    let mut d = 0;
    for i in 0..4 {
        d += words(!old.w[i]) + words(new.w[i]);
    }
    d
}

/// Offset of the source address in the IPv6 header (the destination follows at +16).
const IP6_SRC: usize = 8;

/// [`rewrite`] for IPv6: the address and port, and the L4 checksum (no IP checksum).
#[inline(never)]
fn rewrite6(ctx: &XdpContext, pkt: &Packet, addr: &Addr, port: u16, dst: bool) -> bool {
    let end = ctx.data_end();
    // Bounded for the verifier: l3 is 14 or 18, l4 below `parse::MAX_L4_OFF` (< 512).
    let ip = ctx.data() + ((pkt.l3 as usize) & 0x1f);
    let l4 = ctx.data() + ((pkt.l4 as usize) & 0x1ff);
    let tcp = pkt.proto == PROTO_TCP;
    if ip + 40 > end {
        return false;
    }
    let csum_off = if tcp { TCP_CSUM } else { UDP_CSUM };
    if l4 + csum_off + 2 > end {
        return false;
    }
    let l4_csum = (l4 + csum_off) as *mut u16;
    let (old_addr, old_port) = if dst {
        (&pkt.dst, pkt.dport)
    } else {
        (&pkt.src, pkt.sport)
    };
    let d = addr6_diff(old_addr, addr) + (!old_port) as u64 + port as u64;
    let (a, p) = if dst {
        (ip + IP6_SRC + 16, l4 + 2)
    } else {
        (ip + IP6_SRC, l4)
    };
    unsafe {
        *(a as *mut [u32; 4]) = addr.w;
        *(p as *mut u16) = port;
        let mut new = update(*l4_csum, d);
        if new == 0 && !tcp {
            new = 0xffff;
        }
        *l4_csum = new;
    }
    true
}
