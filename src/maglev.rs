//! Weighted Maglev lookup tables (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016, section 3.4), built by the control plane for the `mh`
//! scheduler and for choosing a real for a flow no director has seen (roadmap: Maglev fallback,
//! ECMP scale-out). The dataplane will only index the table with a flow hash.
//!
//! Two properties matter, and the tests hold the table to them:
//! - **Identical on every director** for the same reals and weights: each real is named by its
//!   address (never by a local id), hashed with a fixed, platform-independent function (FNV-1a),
//!   and the reals are taken in the order of their hashes, not of the config file.
//! - **Balanced by weight and minimally disrupted**: each real gets its weight's share of the
//!   slots (to one slot, by largest remainder), and removing one of N reals moves about 1/N of
//!   the slots (those it held) plus a little.
//!
//! Weights follow the paper's suggestion: the population loop is the original one (each real in
//! turn claims the next free slot of its own permutation), but a real stops claiming once it
//! holds its share.

use std::net::SocketAddr;

/// Default table size: a prime, so every skip value generates a full permutation. 65,537
/// entries of 4 bytes: 256 KiB per service.
pub const DEFAULT_SIZE: u32 = 65_537;

/// Slots of the table that hold no real (no real has a weight above 0).
pub const EMPTY: u32 = u32::MAX;

/// One real for the table: its address and its weight (0: no slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
}

/// Whether `n` is prime (table sizes are checked with it).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u64;
    while d * d <= u64::from(n) {
        if u64::from(n).is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// FNV-1a, 64 bits, with a seed mixed in first: fixed by its definition, so every director
/// (any build, any CPU) computes the same value.
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits are weak for short inputs: finish with a murmur3-style avalanche.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h
}

/// The bytes naming a real: its IP address and port, the same on every director.
fn name(a: &SocketAddr) -> Vec<u8> {
    let mut v = match a.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    v.extend_from_slice(&a.port().to_be_bytes());
    v
}

/// Each real's share of `size` slots by weight: floors, then the remainders largest first
/// (ties by the reals' order), so the shares sum to `size` exactly.
fn shares(weights: &[u32], size: u32) -> Vec<u64> {
    let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let size = u64::from(size);
    let mut out: Vec<u64> = weights
        .iter()
        .map(|w| u64::from(*w) * size / total)
        .collect();
    let mut left = size - out.iter().sum::<u64>();
    let mut rest: Vec<(u64, usize)> = weights
        .iter()
        .enumerate()
        .map(|(i, w)| (u64::from(*w) * size % total, i))
        .collect();
    rest.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (r, i) in rest {
        if left == 0 {
            break;
        }
        if r > 0 {
            out[i] += 1;
            left -= 1;
        }
    }
    out
}

/// The lookup table: `size` slots (a prime), each the index into `backends` of the real that
/// slot sends to, or [`EMPTY`] if no real has a weight above 0. Indexes refer to `backends` as
/// given; the result does not depend on their order.
pub fn table(backends: &[Backend], size: u32) -> Result<Vec<u32>, String> {
    if !is_prime(size) {
        return Err(format!("the Maglev table size {size} is not a prime"));
    }
    if backends.len() >= size as usize {
        return Err(format!(
            "{} reals do not fit a Maglev table of {size} slots",
            backends.len()
        ));
    }
    let m = u64::from(size);
    // The reals in the order of their names' hashes (then the names: a collision of 64-bit
    // hashes still orders the same everywhere), weight 0 left out.
    let mut order: Vec<(u64, Vec<u8>, usize)> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.weight > 0)
        .map(|(i, b)| {
            let n = name(&b.address);
            (fnv1a(0, &n), n, i)
        })
        .collect();
    order.sort();
    let weights: Vec<u32> = order.iter().map(|(_, _, i)| backends[*i].weight).collect();
    let share = shares(&weights, size);
    let perm: Vec<(u64, u64)> = order
        .iter()
        .map(|(h, n, _)| {
            let offset = h % m;
            let skip = fnv1a(0x9e37_79b9_7f4a_7c15, n) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut held = vec![0u64; order.len()];
    let mut entry = vec![EMPTY; size as usize];
    let mut filled = 0u64;
    while filled < m && !order.is_empty() {
        for k in 0..order.len() {
            if held[k] >= share[k] {
                continue;
            }
            let (offset, skip) = perm[k];
            // The next slot of this real's permutation that is still free.
            let mut c = (offset + next[k] * skip) % m;
            while entry[c as usize] != EMPTY {
                next[k] += 1;
                c = (offset + next[k] * skip) % m;
            }
            entry[c as usize] = order[k].2 as u32;
            next[k] += 1;
            held[k] += 1;
            filled += 1;
            if filled == m {
                break;
            }
        }
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reals(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, w)| Backend {
                address: SocketAddr::from(([198, 18, 1, i as u8 + 1], 80)),
                weight: *w,
            })
            .collect()
    }

    fn counts(t: &[u32], n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for e in t {
            c[*e as usize] += 1;
        }
        c
    }

    #[test]
    fn sizes_must_be_prime() {
        assert!(is_prime(DEFAULT_SIZE) && is_prime(251) && is_prime(2));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0));
        assert!(table(&reals(&[1]), 65_536).is_err());
        assert!(table(&reals(&[1; 20]), 13).is_err());
    }

    #[test]
    fn slots_follow_the_weights_within_one_percent() {
        for weights in [
            vec![1, 1, 1],
            vec![1, 2, 3],
            vec![5, 1, 1, 10, 3],
            vec![100, 1],
        ] {
            let t = table(&reals(&weights), DEFAULT_SIZE).unwrap();
            let total: u32 = weights.iter().sum();
            for (i, c) in counts(&t, weights.len()).iter().enumerate() {
                let want = f64::from(DEFAULT_SIZE) * f64::from(weights[i]) / f64::from(total);
                let off = (*c as f64 - want).abs() / f64::from(DEFAULT_SIZE);
                assert!(
                    off <= 0.01,
                    "weights {weights:?}: real {i} has {c} slots, want {want:.0}"
                );
                assert!(
                    (*c as f64 - want).abs() <= 1.0,
                    "largest remainder: within a slot"
                );
            }
        }
    }

    #[test]
    fn removing_one_of_n_reals_moves_about_one_nth_of_the_slots() {
        for n in [3usize, 5, 10, 32] {
            let all = reals(&vec![1; n]);
            let before = table(&all, DEFAULT_SIZE).unwrap();
            let gone = n / 2;
            let rest: Vec<Backend> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != gone)
                .map(|(_, b)| *b)
                .collect();
            let after = table(&rest, DEFAULT_SIZE).unwrap();
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| all[**b as usize].address != rest[**a as usize].address)
                .count();
            let share = moved as f64 / f64::from(DEFAULT_SIZE);
            println!(
                "{n} reals, one removed: {:.2}% of the slots moved",
                share * 100.0
            );
            assert!(
                share <= 1.0 / n as f64 + 0.01,
                "{n} reals: {:.2}% moved",
                share * 100.0
            );
            // Every slot of the removed real moved, of course.
            assert!(share >= 1.0 / n as f64 - 0.01);
        }
    }

    #[test]
    fn the_table_depends_on_the_reals_not_on_their_order_or_the_machine() {
        let a = reals(&[1, 2, 3, 4]);
        let mut b = a.clone();
        b.reverse();
        let ta = table(&a, 251).unwrap();
        let tb = table(&b, 251).unwrap();
        let named = |t: &[u32], r: &[Backend]| -> Vec<SocketAddr> {
            t.iter().map(|i| r[*i as usize].address).collect()
        };
        assert_eq!(
            named(&ta, &a),
            named(&tb, &b),
            "config order does not matter"
        );
        // Fixed values: a table computed by another build or CPU must match byte for byte.
        assert_eq!(
            fnv1a(0, b"xdpvs"),
            0x4f10_6074_be4c_0173_u64,
            "the hash is fixed"
        );
        // Recorded from this implementation: any change to the hash, the order or the
        // population is a change every director of a group must take at once.
        assert_eq!(
            &ta[..8],
            &[3, 3, 3, 2, 2, 3, 3, 1],
            "a reference table prefix"
        );
    }

    #[test]
    fn no_weight_no_slot() {
        let t = table(&reals(&[0, 0]), 251).unwrap();
        assert!(t.iter().all(|e| *e == EMPTY));
        let t = table(&reals(&[0, 1]), 251).unwrap();
        assert!(t.iter().all(|e| *e == 1));
    }
}
