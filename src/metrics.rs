//! Prometheus metrics (in progress).
use std::net::SocketAddr;
use std::sync::Arc;

use crate::daemon::Shared;
use crate::health::HealthEvent;

pub async fn serve(_addr: SocketAddr, _shared: Arc<Shared>) -> anyhow::Result<()> {
    Ok(())
}

pub fn record_health(_ev: &HealthEvent) {}
