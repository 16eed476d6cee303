//! Scheduler arithmetic shared by the XDP program and the tests.
//!
//! Weighted least-connection as IPVS defines it: a real's load is `active * 256 + inactive`
//! (an established connection costs far more than one in SYN or FIN state), and a new connection
//! goes to the real with the smallest load/weight. Loads are compared by cross-multiplying, so
//! no division happens on the packet path, and reals with weight 0 are never candidates.

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

#[cfg(test)]
mod tests {
    use super::*;

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
