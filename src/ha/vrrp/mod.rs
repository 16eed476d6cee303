//! VRRPv3 (RFC 5798): [`packet`] is the wire format and its validation, [`machine`] the pure
//! election state machine, [`io`] the sockets and timers that drive it ([`Instance`]).

pub mod io;
pub mod machine;
pub mod packet;

pub use io::{Counters, Instance, Transition};
pub use machine::State;
