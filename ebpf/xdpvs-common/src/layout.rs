//! The version of the dataplane's map layout.
//!
//! Pinned maps outlive the binary that made them: a daemon started after an upgrade must know
//! whether the maps it finds hold the bytes it expects. [`LAYOUT_FINGERPRINT`] is computed at
//! compile time from the size and field offsets of every map type and from the map sizes, so
//! any change to them changes it; [`LAYOUT_VERSION`] is the human number for the same thing,
//! bumped by hand. The unit test below records each version's fingerprint, so changing a type
//! without bumping the version fails the build's tests. Changing what a value *means* (a state
//! number, a flag bit) without changing its bytes must bump the version too, and add a new
//! line to the test's table.
//!
//! Both numbers are stored in the pinned `LAYOUT` map when the maps are created.

use core::mem::{align_of, offset_of, size_of};

use crate::{
    state, Conn, ConnKey, PersistKey, Real, RealConns, RealSet, RealSlot, RealStats, Service,
    ServiceKey, ServiceState, Settings, Template, MAX_REALS, MAX_REALSETS, MAX_REALS_PER_SERVICE,
    MAX_SERVICES, PERSIST_TABLE_SIZE,
};

/// Bump when the layout or the meaning of any map's bytes changes (and record the new
/// fingerprint in the test below).
pub const LAYOUT_VERSION: u32 = 7;

/// Value of the one-element `LAYOUT` map.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug)]
pub struct Layout {
    pub version: u32,
    /// Capacity the connection table was created with.
    pub conn_table_size: u32,
    pub fingerprint: u64,
}

impl Layout {
    /// The layout this build uses.
    pub const fn current(conn_table_size: u32) -> Layout {
        Layout {
            version: LAYOUT_VERSION,
            conn_table_size,
            fingerprint: LAYOUT_FINGERPRINT,
        }
    }
}

/// FNV-1a over the little-endian bytes of `v`.
const fn mix(mut h: u64, v: u64) -> u64 {
    let mut i = 0;
    while i < 8 {
        h ^= (v >> (i * 8)) & 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

const fn mix_str(mut h: u64, s: &str) -> u64 {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        h = mix(h, b[i] as u64);
        i += 1;
    }
    mix(h, 0xff)
}

/// Every number that decides a map's bytes, in a fixed order.
const SHAPE: [usize; 82] = [
    // ServiceKey
    size_of::<ServiceKey>(),
    align_of::<ServiceKey>(),
    offset_of!(ServiceKey, addr),
    offset_of!(ServiceKey, port),
    offset_of!(ServiceKey, proto),
    offset_of!(ServiceKey, family),
    // Service
    size_of::<Service>(),
    align_of::<Service>(),
    offset_of!(Service, id),
    offset_of!(Service, realset),
    offset_of!(Service, fallback),
    offset_of!(Service, sched),
    offset_of!(Service, fwd),
    offset_of!(Service, flags),
    offset_of!(Service, persist_timeout_s),
    offset_of!(Service, persist_prefix),
    // RealSlot, RealSet
    size_of::<RealSlot>(),
    offset_of!(RealSlot, real),
    offset_of!(RealSlot, weight),
    size_of::<RealSet>(),
    offset_of!(RealSet, count),
    offset_of!(RealSet, total_weight),
    offset_of!(RealSet, slots),
    // Real
    size_of::<Real>(),
    align_of::<Real>(),
    offset_of!(Real, addr),
    offset_of!(Real, port),
    offset_of!(Real, family),
    offset_of!(Real, flags),
    offset_of!(Real, service),
    // RealConns, RealStats, ServiceState
    size_of::<RealConns>(),
    offset_of!(RealConns, active),
    offset_of!(RealConns, inactive),
    offset_of!(RealConns, embryonic),
    size_of::<RealStats>(),
    offset_of!(RealStats, conns),
    offset_of!(RealStats, packets),
    offset_of!(RealStats, bytes),
    size_of::<ServiceState>(),
    offset_of!(ServiceState, rr_cursor),
    // ConnKey
    size_of::<ConnKey>(),
    align_of::<ConnKey>(),
    offset_of!(ConnKey, src),
    offset_of!(ConnKey, dst),
    offset_of!(ConnKey, sport),
    offset_of!(ConnKey, dport),
    offset_of!(ConnKey, proto),
    offset_of!(ConnKey, family),
    // Conn
    size_of::<Conn>(),
    align_of::<Conn>(),
    offset_of!(Conn, real),
    offset_of!(Conn, service),
    offset_of!(Conn, state),
    offset_of!(Conn, flags),
    offset_of!(Conn, created_ns),
    offset_of!(Conn, last_seen_ns),
    offset_of!(Conn, nat_addr),
    offset_of!(Conn, nat_port),
    // PersistKey, Template
    size_of::<PersistKey>(),
    offset_of!(PersistKey, client),
    offset_of!(PersistKey, service),
    offset_of!(PersistKey, family),
    size_of::<Template>(),
    offset_of!(Template, real),
    offset_of!(Template, used_ns),
    PERSIST_TABLE_SIZE as usize,
    // Settings, Layout
    size_of::<Settings>(),
    offset_of!(Settings, timeout_ns),
    offset_of!(Settings, flags),
    size_of::<Layout>(),
    // Map sizes and array bounds
    MAX_SERVICES as usize,
    MAX_REALS as usize,
    MAX_REALSETS as usize,
    MAX_REALS_PER_SERVICE,
    state::COUNT,
    crate::stat::COUNT as usize,
    // Meanings kept in the entries' bytes: the entry flags and the last state number.
    crate::CONN_F_EMBRYO as usize,
    crate::CONN_F_SYNCED as usize,
    crate::CONN_F_REPLY as usize,
    crate::CONN_F_NAT as usize,
    crate::SETTINGS_F_NAT as usize,
    state::CLOSE_WAIT as usize,
];

const fn fingerprint() -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < SHAPE.len() {
        h = mix(h, SHAPE[i] as u64);
        i += 1;
    }
    let mut j = 0;
    while j < crate::maps::PINNED.len() {
        h = mix_str(h, crate::maps::PINNED[j]);
        j += 1;
    }
    h
}

/// Changes whenever any map type or map size changes (see the module doc).
pub const LAYOUT_FINGERPRINT: u64 = fingerprint();

#[cfg(test)]
mod tests {
    use super::*;

    /// Every layout version with the fingerprint it was released with. A failure here means a
    /// map type changed: bump `LAYOUT_VERSION` and add a line, so a daemon meeting maps pinned
    /// by an older build refuses them instead of misreading them.
    const RELEASED: &[(u32, u64)] = &[
        (1, 0x23d4_1dbb_7521_8935),
        (2, 0x6a38_7763_08dc_a4c5),
        (3, 0x80e0_77ba_eefb_953f),
        (4, 0x0df8_350f_430d_8b15),
        (7, 0x6a0e_dd17_98a6_f8c9),
    ];

    #[test]
    fn layout_version_matches_its_fingerprint() {
        let recorded = RELEASED.iter().find(|(v, _)| *v == LAYOUT_VERSION);
        assert_eq!(
            recorded.map(|(_, f)| *f),
            Some(LAYOUT_FINGERPRINT),
            "the map layout changed (fingerprint {LAYOUT_FINGERPRINT:#018x}) but LAYOUT_VERSION \
             is still {LAYOUT_VERSION}: bump it and record the new fingerprint in RELEASED"
        );
    }

    #[test]
    fn versions_are_recorded_once_each() {
        for (i, (v, f)) in RELEASED.iter().enumerate() {
            for (w, g) in &RELEASED[i + 1..] {
                assert_ne!(v, w, "version {v} recorded twice");
                assert_ne!(f, g, "versions {v} and {w} share a fingerprint");
            }
        }
    }

    #[test]
    fn fingerprint_sees_a_field_move() {
        // The same fold over a shape with one offset changed gives another value.
        let mut h1 = 0xcbf2_9ce4_8422_2325u64;
        let mut h2 = h1;
        for (i, v) in SHAPE.iter().enumerate() {
            h1 = mix(h1, *v as u64);
            h2 = mix(h2, if i == 29 { *v as u64 + 4 } else { *v as u64 });
        }
        assert_ne!(h1, h2);
    }
}
