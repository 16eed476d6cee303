//! Connection-state sync between the two directors of a pair: [`wire`] is the authenticated,
//! replay-protected datagram format; [`service`] the tasks that stream the dataplane's
//! connection events to the peer and install the peer's.

pub mod service;
pub mod wire;
