//! xdpvs: a Layer-4 load-balancing director with an XDP dataplane.
//!
//! Data flows one way: the config file is parsed and validated into the desired state
//! ([`config`]); health results ([`health`]) and operator overrides adjust each real's effective
//! weight; the result is diffed into the dataplane's maps. The XDP program (in `ebpf/`) picks a
//! real for every new connection from those maps.

pub mod config;
pub mod dataplane;
pub mod health;
pub mod state;
