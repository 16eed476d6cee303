//! ICMP errors about tracked flows: path-MTU discovery through the director.
//!
//! A router on the way to a client that cannot pass a reply (DR: the real's, from the VIP; NAT:
//! the director's translation of it) sends "fragmentation needed" to the reply's source, the VIP,
//! so it arrives here, not at the real whose TCP must shrink its segments. As IPVS
//! (`ip_vs_in_icmp`) and Katran do, a destination-unreachable message (type 3, any code) whose
//! quoted header is a packet from the VIP of a tracked flow goes to that flow's real: unchanged
//! for DR (the real holds the VIP), translated for NAT (the outer destination and the quoted
//! source become the real's address and port, every checksum updated incrementally). Anything
//! else, malformed quotes included, is the kernel's (`PASS_ICMP`), untouched; an error about a
//! flow of a service this director holds as a VRRP backup is dropped (`DROP_STANDBY`), as the
//! flow's own packets are. Read-only on the
//! connection tables: an error is no sign of life of the flow, and never moves its state.
use aya_ebpf::{bindings::xdp_action, helpers::bpf_ktime_get_ns, programs::XdpContext};
use xdpvs_common::{
    stat, state, Addr, Conn, ConnKey, Real, ServiceKey, CONN_F_NAT, CONN_F_REPLY, FAMILY_V4,
    PROTO_TCP, PROTO_UDP, REAL_F_VALID, SVC_F_STANDBY,
};

use crate::maps::{count, CONNS, EMBRYOS, REALS, SERVICES};
use crate::nat::{update, words};
use crate::parse::Packet;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_HLEN: usize = 8;
/// `translate`'s `quote` flags: the quote holds the L4 checksum; it is TCP's.
const Q_L4CSUM: u32 = 0x100;
const Q_TCP: u32 = 0x200;

/// An ICMP packet (`pkt.l4` is its header). Not inlined: its own frame, apart from `handle`'s.
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
    // Offsets bounded for the verifier: l4 <= 18 + 60, the quoted IHL <= 60.
    let l4 = (pkt.l4 as usize) & 0x7f;
    let icmp = base + l4;
    let inner = icmp + ICMP_HLEN;
    if inner + 20 > end {
        return None;
    }
    let (ty, vihl, iproto, ifrag, isrc, idst) = unsafe {
        (
            *(icmp as *const u8),
            *(inner as *const u8),
            *((inner + 9) as *const u8),
            *((inner + 6) as *const u16),
            *((inner + 12) as *const u32),
            *((inner + 16) as *const u32),
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    // A quoted later fragment has no ports (frag offset bits, as stored: big-endian).
    if ty != ICMP_DEST_UNREACH
        || vihl >> 4 != 4
        || ihl < 20
        || (iproto != PROTO_TCP && iproto != PROTO_UDP)
        || u16::from_be(ifrag) & 0x1fff != 0
        || isrc != pkt.dst.w[0]
    {
        return None;
    }
    let il4_off = l4 + ICMP_HLEN + (ihl & 0x3c);
    // The quoted ports, inside the frame and inside the outer IP packet.
    let ip_end = ((pkt.l3 as usize) & 0x1f) + pkt.ip_len as usize;
    if base + il4_off + 4 > end || il4_off + 4 > ip_end {
        return None;
    }
    let ports = unsafe { *((base + il4_off) as *const [u16; 2]) };
    // The quoted packet went VIP -> client: the flow is keyed client -> VIP.
    let key = ConnKey {
        src: Addr { w: [idst, 0, 0, 0] },
        dst: Addr { w: [isrc, 0, 0, 0] },
        sport: ports[1],
        dport: ports[0],
        proto: iproto,
        family: FAMILY_V4,
        _pad: [0; 2],
    };
    // A VRRP backup never sends a flow's packets to its real (see `handle` in main.rs).
    let svc = ServiceKey {
        addr: key.dst,
        port: key.dport,
        proto: iproto,
        family: FAMILY_V4,
    };
    let (real_id, real, nat) = match flow_of(&svc, &key) {
        Flow::Kernel => return None,
        Flow::Drop => return Some(xdp_action::XDP_DROP),
        Flow::To { id, real, nat } => (id, real, nat),
    };
    if let Some((nat_addr, nat_port)) = nat {
        let l4csum_end = il4_off + if iproto == PROTO_TCP { 18 } else { 8 };
        // The quoted L4 checksum, if the quote holds it (routers may quote only 8 bytes).
        let l4csum = l4csum_end <= ip_end;
        let quote = il4_off as u32
            | if l4csum { Q_L4CSUM } else { 0 }
            | if iproto == PROTO_TCP { Q_TCP } else { 0 };
        if !translate(ctx, pkt, quote, nat_addr.w[0], nat_port) {
            count(stat::PASS_SPLIT_HEADERS);
            return Some(xdp_action::XDP_DROP);
        }
    }
    Some(send_to_real(ctx, pkt, real_id, &real))
}

/// What an ICMP error about a quoted packet's flow is for.
pub(crate) enum Flow {
    /// No live flow (or a reply entry): the kernel's.
    Kernel,
    /// A flow of a service this director holds as a VRRP backup: dropped (counted).
    Drop,
    /// A live flow to a valid real; `nat`: its NAT address and port.
    To {
        id: u32,
        real: Real,
        nat: Option<(Addr, u16)>,
    },
}

/// The flow `key` of service `svc` an error quotes (both families: the connection tables are
/// family-wide). Read-only: an error is no sign of life of the flow.
#[inline(always)]
pub(crate) fn flow_of(svc: &ServiceKey, key: &ConnKey) -> Flow {
    match unsafe { SERVICES.get(svc) } {
        Some(s) if s.flags & SVC_F_STANDBY != 0 => {
            count(stat::DROP_STANDBY);
            return Flow::Drop;
        }
        Some(_) => {}
        None => return Flow::Kernel,
    }
    let conn: *const Conn = match CONNS.get_ptr(key) {
        Some(c) => c,
        None => match EMBRYOS.get_ptr(key) {
            Some(c) => c,
            None => return Flow::Kernel,
        },
    };
    let (st, flags, id, nat_addr, nat_port) = unsafe {
        (
            (*conn).state,
            (*conn).flags,
            (*conn).real,
            (*conn).nat_addr,
            (*conn).nat_port,
        )
    };
    if flags & CONN_F_REPLY != 0 || !state::is_live(st) {
        return Flow::Kernel;
    }
    match REALS.get(id) {
        Some(r) if r.flags & REAL_F_VALID != 0 => Flow::To {
            id,
            real: *r,
            nat: (flags & CONN_F_NAT != 0).then_some((nat_addr, nat_port)),
        },
        _ => Flow::Kernel,
    }
}

/// Sends an error (translated if need be) to its flow's real, counted `icmp_to_real`.
#[inline(always)]
pub(crate) fn send_to_real(ctx: &XdpContext, pkt: &Packet, id: u32, real: &Real) -> u32 {
    count(stat::ICMP_TO_REAL);
    let now = unsafe { bpf_ktime_get_ns() };
    crate::forward::to_real(ctx, pkt, id, real, now)
}

/// Rewrites a NAT flow's ICMP error for its real: the outer destination (VIP -> real), the
/// quoted source address and port (VIP:port -> real:port) with the quoted IP header's checksum,
/// the quoted L4 checksum if `l4csum` (its pseudo-header and port changed), and the ICMP
/// checksum over all of that. False (nothing written) if a field is past the linear part.
/// `quote`: the quoted L4 header's offset, `Q_L4CSUM` and `Q_TCP` (packed: BPF functions take
/// at most five arguments).
#[inline(never)]
fn translate(ctx: &XdpContext, pkt: &Packet, quote: u32, addr: u32, port: u16) -> bool {
    let il4_off = (quote & 0xff) as usize;
    let l4csum = quote & Q_L4CSUM != 0;
    let tcp = quote & Q_TCP != 0;
    let base = ctx.data();
    let end = ctx.data_end();
    let ip = base + ((pkt.l3 as usize) & 0x1f);
    let icmp = base + ((pkt.l4 as usize) & 0x7f);
    let inner = icmp + ICMP_HLEN;
    let il4 = base + il4_off;
    let csum_at = il4 + if tcp { 16 } else { 6 };
    if ip + 20 > end || inner + 20 > end || il4 + 4 > end || (l4csum && csum_at + 2 > end) {
        return false;
    }
    let d_addr = words(!pkt.dst.w[0]) + words(addr);
    unsafe {
        // Outer header: the destination.
        let ocsum = (ip + 10) as *mut u16;
        *ocsum = update(*ocsum, d_addr);
        *((ip + 16) as *mut u32) = addr;
        // Quoted header: the source and its checksum.
        let icsum = (inner + 10) as *mut u16;
        let old_ic = *icsum;
        let new_ic = update(old_ic, d_addr);
        *icsum = new_ic;
        *((inner + 12) as *mut u32) = addr;
        let sport = il4 as *mut u16;
        let d_port = (!*sport) as u64 + port as u64;
        *sport = port;
        let mut d_icmp = d_addr + d_port + (!old_ic) as u64 + new_ic as u64;
        if l4csum && csum_at + 2 <= end {
            let c = csum_at as *mut u16;
            let old = *c;
            if tcp || old != 0 {
                let mut new = update(old, d_addr + d_port);
                if new == 0 && !tcp {
                    new = 0xffff;
                }
                *c = new;
                d_icmp += (!old) as u64 + new as u64;
            }
        }
        let ccsum = (icmp + 2) as *mut u16;
        *ccsum = update(*ccsum, d_icmp);
    }
    true
}
