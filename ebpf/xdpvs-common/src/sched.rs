//! Scheduler arithmetic shared by the XDP program and the tests.
//!
//! Weighted least-connection as IPVS defines it: a real's load is `active * 256 + inactive`
//! (an established connection costs far more than one in SYN or FIN state), and a new connection
//! goes to the real with the smallest load/weight. Loads are compared by cross-multiplying, so
//! no division happens on the packet path, and reals with weight 0 are never candidates.
//!
//! Weighted round robin as IPVS's `ip_vs_wrr.c` defines it ([`wrr_params`], [`wrr_next`],
//! [`wrr_changed`]): the reference the XDP program's cursor walk is tested against. Source
//! hashing as IPVS's `ip_vs_sh.c` ([`sh_hash`], [`sh_table`]) and the flow hash that indexes
//! `mh` tables ([`flow_hash`]) are used by both sides as they are.

#[inline(always)]
fn min(a: u64, b: u64) -> u64 {
    if a < b {
        a
    } else {
        b
    }
}

/// IPVS's connection overhead of a real.
#[inline(always)]
pub fn overhead(active: u64, inactive: u64) -> u64 {
    (active << 8).wrapping_add(inactive)
}

/// Whether a real with load `load_a` and weight `weight_a` is a strictly better WLC choice than
/// one with `load_b`/`weight_b`. Both weights must be non-zero. Ties keep the earlier real, as
/// IPVS does, which makes the choice deterministic.
#[inline(always)]
pub fn wlc_better(load_a: u64, weight_a: u32, load_b: u64, weight_b: u32) -> bool {
    // Real loads are bounded by the connection table (< 2^40) and weights by 2^16, so capping
    // the load at 2^47 keeps the products inside u64 (BPF has no 128-bit multiply).
    const LOAD_CAP: u64 = 1 << 47;
    let a = min(load_a, LOAD_CAP) * weight_b as u64;
    let b = min(load_b, LOAD_CAP) * weight_a as u64;
    a < b
}

/// Counters read by the scheduler can be transiently "negative" (wrapped) while another CPU is
/// between a transition's two atomic updates; treat those as zero.
#[inline(always)]
pub fn clamp_counter(v: u64) -> u64 {
    if v > (u64::MAX >> 1) {
        0
    } else {
        v
    }
}

/// IPVS wrr's step and start from a set of weights: `(di, mw)`, `di` the gcd of the weights
/// above 0 (1 if none), `mw` the largest weight minus `di - 1` (so the last pass of a cycle asks
/// for weight 1 and catches a weight that changed below `di`). `mw == 0`: no real may be chosen.
pub fn wrr_params(weights: impl Iterator<Item = u32>) -> (u32, u32) {
    let mut g = 0u32;
    let mut max = 0u32;
    for w in weights {
        if w > 0 {
            g = if g > 0 { gcd(w, g) } else { w };
        }
        if w > max {
            max = w;
        }
    }
    let di = if g > 0 { g } else { 1 };
    (di, max.saturating_sub(di - 1))
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        let t = a % b;
        a = b;
        b = t;
    }
    a
}

/// IPVS wrr's mark, packed in one u64 so it can be replaced by one compare-and-swap: the low
/// half is the current real's slot index plus one (0: the list head, where IPVS starts), the
/// high half the current weight `cw` (0: not started, which reads as `mw`, IPVS's start).
/// The all-zero value is therefore IPVS's initial state.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct WrrMark {
    pub next: u32,
    pub cw: u32,
}

impl WrrMark {
    #[inline(always)]
    pub fn pack(self) -> u64 {
        (self.cw as u64) << 32 | self.next as u64
    }
    #[inline(always)]
    pub fn unpack(v: u64) -> WrrMark {
        WrrMark {
            next: v as u32,
            cw: (v >> 32) as u32,
        }
    }
}

/// Longest walk of [`wrr_next`] over `n` slots: to the end of the list, one pass that lowers
/// `cw`, and a whole pass (the largest weight always qualifies, whatever `cw` is).
pub const fn wrr_max_steps(n: usize) -> usize {
    2 * n + 2
}

/// One IPVS wrr decision (`ip_vs_wrr_schedule` without overload flags): from `mark`, walk the
/// list to the next real whose weight is at least `cw`; at the end of the list lower `cw` by
/// `di`, back to `mw` once it reaches 0. Returns the new mark and the chosen slot index
/// (`None`: no real has a weight, the mark is unchanged). A mark out of range (the set
/// shrank) starts from the list head.
pub fn wrr_next(weights: &[u32], di: u32, mw: u32, mark: WrrMark) -> (WrrMark, Option<usize>) {
    if mw == 0 {
        return (mark, None);
    }
    let n = weights.len();
    let mut i = if mark.next as usize > n {
        0
    } else {
        mark.next as usize
    };
    let mut cw = if mark.cw == 0 || mark.cw > mw {
        mw as i64
    } else {
        mark.cw as i64
    };
    for _ in 0..wrr_max_steps(n) {
        if i >= n {
            cw -= di as i64;
            if cw <= 0 {
                cw = mw as i64;
            }
            i = 0;
            continue;
        }
        if weights[i] as i64 >= cw {
            let m = WrrMark {
                next: i as u32 + 1,
                cw: cw as u32,
            };
            return (m, Some(i));
        }
        i += 1;
    }
    (mark, None)
}

/// IPVS's `ip_vs_wrr_dest_changed`: after the set changed (a real added, removed or
/// re-weighted), the walk restarts from the list head with `cw` kept in range of the new
/// `mw` and aligned to the new `di`.
pub fn wrr_changed(mark: WrrMark, di: u32, mw: u32) -> WrrMark {
    let cw = if mark.cw > mw || mark.cw == 0 {
        mw
    } else if di > 1 {
        (mark.cw / di) * di + 1
    } else {
        mark.cw
    };
    WrrMark { next: 0, cw }
}

/// IPVS's source-hash bucket (`ip_vs_sh_hashkey` with offset 0): `hash_32(port + addr, 8)`,
/// the address folded by XOR for IPv6 (an IPv4 address has only its first word set, so one
/// formula serves both), `port` the source port with `sh-port` and 0 without. Both in network
/// byte order, as the packet has them.
#[inline(always)]
pub fn sh_hash(addr: &crate::Addr, port_be: u16) -> u32 {
    let fold = addr.w[0] ^ addr.w[1] ^ addr.w[2] ^ addr.w[3];
    let v = (u16::from_be(port_be) as u32).wrapping_add(u32::from_be(fold));
    // hash_32(): multiply by GOLDEN_RATIO_32, keep the top bits.
    v.wrapping_mul(0x61C8_8647) >> (32 - 8)
}

/// IPVS's source-hash table for the reals' weights in list order (`ip_vs_sh_reassign`): the
/// 256 buckets are dealt round the list, each real taking `weight` consecutive buckets per turn
/// (a weight-0 real takes one). Entries are slot indexes. With `fallback` (IPVS's
/// `sh-fallback`), a bucket whose real has weight 0 holds instead the real
/// `ip_vs_sh_get_fallback` finds for it: the first with a weight above 0 from bucket
/// `2 * b` on (that function starts at `offset + hash` with `offset = hash`). Without it such a
/// bucket keeps its weight-0 real, which the program refuses (no real), as IPVS does.
/// `None` for an empty list.
pub fn sh_table(weights: &[u32], fallback: bool) -> Option<[u8; SH_SIZE]> {
    if weights.is_empty() {
        return None;
    }
    let mut t = [0u8; SH_SIZE];
    let (mut p, mut d_count) = (0usize, 0u32);
    for b in t.iter_mut() {
        *b = p as u8;
        d_count += 1;
        if d_count >= weights[p] {
            p = (p + 1) % weights.len();
            d_count = 0;
        }
    }
    if fallback {
        let orig = t;
        for (b, e) in t.iter_mut().enumerate() {
            if weights[orig[b] as usize] > 0 {
                continue;
            }
            for offset in 0..SH_SIZE {
                let c = orig[(offset + 2 * b) % SH_SIZE] as usize;
                if weights[c] > 0 {
                    *e = c as u8;
                    break;
                }
            }
        }
    }
    Some(t)
}

const SH_SIZE: usize = crate::SH_TABLE_SIZE as usize;

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// The hash of a flow that indexes an `mh` table: murmur3's mixing over the flow's addresses,
/// ports and protocol, read in network byte order so every director (and every test) computes
/// the same value for the same packet.
#[inline(always)]
pub fn flow_hash(src: &crate::Addr, dst: &crate::Addr, sport: u16, dport: u16, proto: u8) -> u32 {
    let mut h = 0x7864_7076u32; // "xdpv"
    for w in src.w {
        h = mix(h, u32::from_be(w));
    }
    for w in dst.w {
        h = mix(h, u32::from_be(w));
    }
    h = mix(
        h,
        (u16::from_be(sport) as u32) << 16 | u16::from_be(dport) as u32,
    );
    h = mix(h, proto as u32);
    fmix(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{vec, vec::Vec};

    /// The first `n` choices of IPVS's wrr from its initial state.
    fn wrr_seq(weights: &[u32], n: usize) -> Vec<usize> {
        let (di, mw) = wrr_params(weights.iter().copied());
        let mut mark = WrrMark::default();
        (0..n)
            .map(|_| {
                let (m, pick) = wrr_next(weights, di, mw, mark);
                mark = m;
                pick.expect("a real")
            })
            .collect()
    }

    // Sequences below are worked out by hand from ip_vs_wrr.c: passes with cw = mw, mw - di,
    // ..., 1, each listing (in list order) the reals whose weight is at least cw.

    #[test]
    fn wrr_1_2_3_interleaves() {
        // mw = 3: C | cw 2: B C | cw 1: A B C
        assert_eq!(
            wrr_seq(&[1, 2, 3], 12),
            [2, 1, 2, 0, 1, 2, 2, 1, 2, 0, 1, 2]
        );
    }

    #[test]
    fn wrr_4_3_2() {
        // cw 4: A | 3: A B | 2: A B C | 1: A B C
        assert_eq!(wrr_seq(&[4, 3, 2], 9), [0, 0, 1, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn wrr_with_a_common_divisor_steps_by_it() {
        // gcd 2, max 6: mw = 5. cw 5: C | cw 3: A C | cw 1: A B C. Period 6 = 12 / 2.
        assert_eq!(wrr_params([4, 2, 6].into_iter()), (2, 5));
        assert_eq!(
            wrr_seq(&[4, 2, 6], 12),
            [2, 0, 2, 0, 1, 2, 2, 0, 2, 0, 1, 2]
        );
        // gcd 3: mw = 1, one pass per cycle: plain alternation of the equal weights.
        assert_eq!(wrr_params([3, 3].into_iter()), (3, 1));
        assert_eq!(wrr_seq(&[3, 3], 4), [0, 1, 0, 1]);
        // gcd 50: 100:50 is 2:1. mw = 51. cw 51: A | cw 1: A B.
        assert_eq!(wrr_seq(&[100, 50], 6), [0, 0, 1, 0, 0, 1]);
    }

    #[test]
    fn wrr_never_picks_weight_zero() {
        // A weight 0 is left out of the gcd: [0, 3, 3] has di 3, mw 1: B C B C.
        assert_eq!(wrr_params([0, 3, 3].into_iter()), (3, 1));
        assert_eq!(wrr_seq(&[0, 3, 3], 4), [1, 2, 1, 2]);
        // [2, 0, 1]: cw 2: A | cw 1: A C.
        assert_eq!(wrr_seq(&[2, 0, 1], 6), [0, 0, 2, 0, 0, 2]);
        // No weight at all: nothing, the mark unchanged.
        let (di, mw) = wrr_params([0, 0].into_iter());
        assert_eq!((di, mw), (1, 0));
        let m = WrrMark { next: 1, cw: 0 };
        assert_eq!(wrr_next(&[0, 0], di, mw, m), (m, None));
    }

    #[test]
    fn wrr_shares_are_the_weights_over_a_cycle() {
        for w in [
            vec![5u32, 1, 1, 10, 3],
            vec![7, 7, 14],
            vec![1; 9],
            vec![65535, 1],
        ] {
            let (di, _) = wrr_params(w.iter().copied());
            let period: u32 = w.iter().map(|x| x / di).sum();
            let seq = wrr_seq(&w, period as usize * 2);
            for (i, x) in w.iter().enumerate() {
                let got = seq.iter().filter(|s| **s == i).count() as u32;
                assert_eq!(got, 2 * x / di, "{w:?} real {i}");
            }
        }
    }

    #[test]
    fn wrr_after_a_change_restarts_from_the_head() {
        let w = [4u32, 3, 2];
        let (di, mw) = wrr_params(w.iter().copied());
        let mut mark = WrrMark::default();
        for _ in 0..2 {
            mark = wrr_next(&w, di, mw, mark).0; // A A: now at A with cw 3
        }
        assert_eq!(mark, WrrMark { next: 1, cw: 3 });
        // C goes to weight 0: same di and mw, cw kept, walk from the head: cw 3: A B,
        // then cw 2: A B, cw 1: A B, then cw 4 again: A.
        let w2 = [4u32, 3, 0];
        let (di2, mw2) = wrr_params(w2.iter().copied());
        let mut m = wrr_changed(mark, di2, mw2);
        assert_eq!(m, WrrMark { next: 0, cw: 3 });
        let mut seq = vec![];
        for _ in 0..7 {
            let (n, p) = wrr_next(&w2, di2, mw2, m);
            m = n;
            seq.push(p.unwrap());
        }
        assert_eq!(seq, [0, 1, 0, 1, 0, 1, 0]);
        // With a new gcd the kept cw is realigned: cw 5 under di 2 becomes 5, 4 becomes 5.
        assert_eq!(wrr_changed(WrrMark { next: 3, cw: 4 }, 2, 7).cw, 5);
        assert_eq!(wrr_changed(WrrMark { next: 3, cw: 9 }, 2, 7).cw, 7);
    }

    #[test]
    fn wrr_mark_round_trips_and_zero_is_the_start() {
        let m = WrrMark { next: 7, cw: 65535 };
        assert_eq!(WrrMark::unpack(m.pack()), m);
        assert_eq!(WrrMark::unpack(0), WrrMark::default());
        // Out of range marks (the set shrank under the mark) start from the head.
        assert_eq!(
            wrr_next(&[1, 1], 1, 1, WrrMark { next: 9, cw: 1 }).1,
            Some(0)
        );
    }

    #[test]
    fn sh_hash_is_ipvs_hash_32() {
        // 10.0.0.1, no port: hash_32(0x0a000001, 8) = (0x0a000001 * 0x61c88647) >> 24.
        let a = crate::Addr {
            w: [u32::from_ne_bytes([10, 0, 0, 1]), 0, 0, 0],
        };
        let want = (0x0a00_0001u32.wrapping_mul(0x61c8_8647)) >> 24;
        assert_eq!(sh_hash(&a, 0), want);
        // sh-port adds the host-order port before hashing.
        let want = (0x0a00_0001u32 + 8080).wrapping_mul(0x61c8_8647) >> 24;
        assert_eq!(sh_hash(&a, 8080u16.to_be()), want);
        assert!(sh_hash(&a, 0) < 256);
    }

    #[test]
    fn sh_table_deals_buckets_by_weight() {
        let t = sh_table(&[1, 2, 3], false).unwrap();
        // A | B B | C C C | A | ...
        assert_eq!(&t[..8], &[0, 1, 1, 2, 2, 2, 0, 1]);
        let count = |t: &[u8; 256], i: u8| t.iter().filter(|e| **e == i).count();
        // 256 = 42 turns of 6 buckets + A B B C.
        assert_eq!((count(&t, 0), count(&t, 1), count(&t, 2)), (43, 86, 127));
        // Weight 0 takes one bucket per turn.
        let t = sh_table(&[0, 1], false).unwrap();
        assert_eq!(&t[..4], &[0, 1, 0, 1]);
        assert!(sh_table(&[], false).is_none());
    }

    #[test]
    fn sh_fallback_replaces_weight_zero_buckets_as_ipvs_searches() {
        let w = [0u32, 1, 1];
        let plain = sh_table(&w, false).unwrap();
        let fb = sh_table(&w, true).unwrap();
        for b in 0..256usize {
            if w[plain[b] as usize] > 0 {
                assert_eq!(fb[b], plain[b]);
            } else {
                // ip_vs_sh_get_fallback: buckets (offset + 2b) & 255 for offset 0.. until one
                // holds an available real.
                let want = (0..256)
                    .map(|o| plain[(o + 2 * b) % 256])
                    .find(|d| w[*d as usize] > 0)
                    .unwrap();
                assert_eq!(fb[b], want, "bucket {b}");
                assert!(w[fb[b] as usize] > 0);
            }
        }
        // All weights 0: nothing to fall back to; the buckets keep their reals.
        assert_eq!(sh_table(&[0, 0], true), sh_table(&[0, 0], false));
    }

    #[test]
    fn flow_hash_is_fixed_and_spreads() {
        let a = crate::Addr {
            w: [u32::from_ne_bytes([198, 18, 0, 1]), 0, 0, 0],
        };
        let v = crate::Addr {
            w: [u32::from_ne_bytes([198, 18, 0, 100]), 0, 0, 0],
        };
        // Recorded value: every director of a group must compute this one.
        assert_eq!(
            flow_hash(&a, &v, 40000u16.to_be(), 80u16.to_be(), 6),
            0xcb20_055b
        );
        let mut buckets = [0u32; 16];
        for p in 0..16000u16 {
            buckets[(flow_hash(&a, &v, p.to_be(), 80u16.to_be(), 6) % 16) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|b| (900..1100).contains(b)),
            "{buckets:?}"
        );
    }

    #[test]
    fn established_costs_256_inactive() {
        assert_eq!(overhead(1, 0), 256);
        assert_eq!(overhead(2, 3), 515);
    }

    #[test]
    fn lower_load_per_weight_wins() {
        // 10 conns at weight 2 (5 per weight unit) beat 6 conns at weight 1.
        assert!(wlc_better(10, 2, 6, 1));
        assert!(!wlc_better(6, 1, 10, 2));
        // Equal ratios: not strictly better, so the earlier real keeps the tie.
        assert!(!wlc_better(4, 2, 2, 1));
        assert!(!wlc_better(2, 1, 4, 2));
    }

    #[test]
    fn large_values_do_not_overflow() {
        assert!(wlc_better(1 << 40, 65535, 1 << 41, 65535));
        assert!(!wlc_better(u64::MAX, 1, u64::MAX, 65535));
    }

    #[test]
    fn wrapped_counters_read_as_zero() {
        assert_eq!(clamp_counter(0u64.wrapping_sub(1)), 0);
        assert_eq!(clamp_counter(7), 7);
    }
}
