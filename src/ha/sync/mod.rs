//! Connection-state sync between the two directors of a pair: [`wire`] is the authenticated,
//! replay-protected datagram format. (The UDP loop and the table install come with the daemon.)

pub mod wire;
