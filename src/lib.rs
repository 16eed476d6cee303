//! xdpvs: a Layer-4 load-balancing director with an XDP dataplane.
//!
//! Data flows one way: the config file is parsed and validated into the desired state
//! ([`config`]); health results ([`health`]) and operator overrides adjust each real's effective
//! weight ([`state`], the one place that decides it); the [`dataplane`] planner diffs that
//! snapshot into the XDP program's maps. The XDP program (in `ebpf/`) picks a real for every new
//! connection from those maps (`ebpf/xdpvs-ebpf/src/schedule.rs`). [`daemon`] wires it together:
//! start-up, reload, health and VRRP transitions and admin commands all end in a request to the
//! one writer of the maps, the dataplane owner ([`dataplane::owner`]). `list` and metrics read
//! the [`status`] read model, which reads the maps without waiting for a write.

pub mod admin;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod ha;
pub mod health;
pub mod import;
pub mod maglev;
pub mod metrics;
pub mod notify;
pub mod offline;
pub mod preflight;
pub mod state;
pub mod status;
