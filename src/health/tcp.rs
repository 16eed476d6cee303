//! TCP connect check: the real is up if it completes a handshake on the check port.
//!
//! The cheapest check and the default: it proves the kernel and a listener are there, not that
//! the application answers (use `http`/`exec` for that).

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::{check_addr, CheckConfig, Failure};

/// Connects to the real's IP on the check port, then closes. Unbounded in time: [`super::probe`]
/// applies the timeout.
pub async fn probe(cfg: &CheckConfig, real: SocketAddr) -> Result<(), Failure> {
    let stream = TcpStream::connect(check_addr(cfg, real))
        .await
        .map_err(|e| Failure::io(&e))?;
    drop(stream);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::cfg;
    use super::super::{probe, CheckKind};
    use std::time::Duration;
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn up_when_listening() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        assert_eq!(probe(&cfg(CheckKind::Tcp), addr).await, Ok(()));
    }

    #[tokio::test]
    async fn refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let r = probe(&cfg(CheckKind::Tcp), addr).await;
        assert_eq!(r.unwrap_err().as_str(), "connection refused");
    }

    #[tokio::test]
    async fn check_port_overrides_real_port() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let mut c = cfg(CheckKind::Tcp);
        c.port = Some(port);
        // The real's own port (1) is closed; the check port is open.
        assert_eq!(probe(&c, "127.0.0.1:1".parse().unwrap()).await, Ok(()));
    }

    #[tokio::test]
    async fn timeout_on_blackhole() {
        // TEST-NET-1 is not routed; the connect hangs (or fails fast if the host has no route).
        let mut c = cfg(CheckKind::Tcp);
        c.timeout = Duration::from_millis(200);
        let t = std::time::Instant::now();
        let r = probe(&c, "192.0.2.1:80".parse().unwrap()).await;
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}
