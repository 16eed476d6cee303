//! High availability: a director pair without a single point of failure (issue #9).
//!
//! [`vrrp`] elects which director owns the virtual addresses (RFC 5798, interoperable with
//! keepalived); [`config`] is the `[[vrrp]]` table it is configured from; [`sync`] carries
//! connection state to the peer so that established connections survive a failover. These modules stand on
//! their own: the daemon runs a [`vrrp::Instance`] per table and turns its reported transitions
//! into desired state (forward for the VIPs only while master).

pub mod config;
pub mod director;
pub mod sync;
pub mod vrrp;
