//! Sending a packet to its real server.
//!
//! Direct routing: the IP packet is left untouched; only the Ethernet header changes. The
//! kernel's FIB gives the next hop toward the real and its MAC (so reals are never configured
//! by MAC), and the frame leaves by the ingress interface (XDP_TX) or is redirected to the
//! egress one.
use aya_ebpf::{
    bindings::{bpf_fib_lookup as FibParams, xdp_action},
    helpers::generated::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use xdpvs_common::stat;

use crate::maps::{count, REALS, REAL_STATS};
use crate::parse::Packet;

const AF_INET: u8 = 2;
const FIB_SUCCESS: i64 = 0;
const FIB_NO_NEIGH: i64 = 7;

#[inline(always)]
pub fn count_new_conn(real: u32) {
    if let Some(s) = REAL_STATS.get_ptr_mut(real) {
        unsafe { (*s).conns += 1 };
    }
}

pub fn to_real(ctx: &XdpContext, pkt: &Packet, real_id: u32) -> u32 {
    let real = match REALS.get(real_id) {
        Some(r) => *r,
        None => {
            count(stat::DROP_NO_REAL);
            return xdp_action::XDP_DROP;
        }
    };
    let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = pkt.proto;
    fib.ifindex = ifindex;
    fib.__bindgen_anon_1.tot_len = pkt.ip_len;
    fib.__bindgen_anon_3.ipv4_src = pkt.src.w[0];
    fib.__bindgen_anon_4.ipv4_dst = real.addr.w[0];
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc != FIB_SUCCESS {
        // Passing would let the director's own stack answer for the VIP (with a reset); the
        // control plane keeps reals' neighbours resolved, so a miss is rare and retried by TCP.
        count(if rc == FIB_NO_NEIGH {
            stat::DROP_NO_NEIGH
        } else {
            stat::DROP_FIB
        });
        return xdp_action::XDP_DROP;
    }
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        count(stat::MALFORMED);
        return xdp_action::XDP_DROP;
    }
    unsafe {
        let eth = start as *mut [u8; 6];
        *eth = fib.dmac;
        *eth.add(1) = fib.smac;
    }
    if let Some(s) = REAL_STATS.get_ptr_mut(real_id) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += (ctx.data_end() - start) as u64;
        }
    }
    if fib.ifindex == ifindex {
        count(stat::TX);
        xdp_action::XDP_TX
    } else {
        count(stat::REDIRECT);
        unsafe { bpf_redirect(fib.ifindex, 0) as u32 }
    }
}
