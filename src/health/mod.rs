//! Health checks, in the manner of keepalived's `check/` (and ldirectord's checkers).
//!
//! A director must stop sending new connections to a real that no longer serves. This module
//! finds out which reals serve: it probes each one periodically with the check its configuration
//! names ([`CheckConfig`]) and turns the stream of probe results into an up/down state with
//! rise/fall hysteresis, so one lost packet does not flap a real.
//!
//! How it fits together:
//!
//! * one checker per module ([`tcp`], [`http`] for HTTP and HTTPS, [`exec`], [`dns`]), all behind
//!   [`probe`], which dispatches on [`CheckKind`] and bounds the whole probe by `cfg.timeout`;
//! * [`machine`] holds the rise/fall state machine, written once, outside the checkers;
//! * [`scheduler`] runs one task per (service, real) on tokio, feeds results to the state machine
//!   and sends a [`HealthEvent`] per result on a channel.
//!
//! The caller (the daemon) owns the consequences: it applies transitions to the dataplane (the
//! real's effective weight, or its removal, per the service's `on_failure`) and records metrics.
//! Nothing here touches the dataplane.

pub mod dns;
pub mod exec;
pub mod flap;
pub mod http;
pub mod machine;
pub mod scheduler;
pub mod tcp;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

pub use crate::config::{CheckConfig, CheckKind, Initially};
pub use machine::{HealthState, Transition};
pub use scheduler::{HealthChecker, HealthEvent, Target};

/// Why a probe failed, as a closed set: the `reason` label of
/// `xdpvs_health_check_failures_total`. A label set that a real server can grow (by sending a new
/// status line, an odd TLS alert, an errno text) would grow the metrics registry without bound,
/// so the free text stays in [`Failure`]'s detail (logs, `xdpvs list`) and only this goes to
/// Prometheus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    /// The check's timeout elapsed (connect, handshake, response or command).
    Timeout,
    /// The connection was refused (RST to the SYN, or ICMP port unreachable for DNS).
    Refused,
    /// The connection was reset or aborted after it was established.
    Reset,
    /// The peer closed the connection before a complete answer.
    Closed,
    /// Host or network unreachable, or no local address.
    Unreachable,
    /// The TLS handshake failed (bad certificate, alert, garbage instead of TLS).
    Tls,
    /// An HTTP status outside `expect_status`.
    HttpStatus,
    /// The body did not match `expect_body`.
    BodyMismatch,
    /// The real spoke something that is not valid HTTP (or too much of it: header limits).
    HttpProtocol,
    /// The exec command exited non-zero.
    ExecStatus,
    /// The exec command died of a signal, or was killed at its timeout.
    ExecKilled,
    /// A DNS reply with an error RCODE.
    DnsRcode,
    /// A DNS reply too short to be DNS.
    DnsMalformed,
    /// The check cannot run as configured (no command, bad query name, `type = "off"`, ...).
    Config,
    /// Any other local or socket error.
    Other,
}

impl FailureKind {
    /// Every kind, for tests and documentation.
    pub const ALL: [FailureKind; 15] = [
        FailureKind::Timeout,
        FailureKind::Refused,
        FailureKind::Reset,
        FailureKind::Closed,
        FailureKind::Unreachable,
        FailureKind::Tls,
        FailureKind::HttpStatus,
        FailureKind::BodyMismatch,
        FailureKind::HttpProtocol,
        FailureKind::ExecStatus,
        FailureKind::ExecKilled,
        FailureKind::DnsRcode,
        FailureKind::DnsMalformed,
        FailureKind::Config,
        FailureKind::Other,
    ];

    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::Refused => "refused",
            FailureKind::Reset => "reset",
            FailureKind::Closed => "closed",
            FailureKind::Unreachable => "unreachable",
            FailureKind::Tls => "tls",
            FailureKind::HttpStatus => "http_status",
            FailureKind::BodyMismatch => "body_mismatch",
            FailureKind::HttpProtocol => "http_protocol",
            FailureKind::ExecStatus => "exec_status",
            FailureKind::ExecKilled => "exec_killed",
            FailureKind::DnsRcode => "dns_rcode",
            FailureKind::DnsMalformed => "dns_malformed",
            FailureKind::Config => "config",
            FailureKind::Other => "other",
        }
    }
}

/// Why a probe failed: its [`FailureKind`] and a short, human-readable detail ("connection
/// refused", "status 503", "timeout after 500ms"), shown in logs, `list` output and events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    kind: FailureKind,
    detail: String,
}

impl Failure {
    pub fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Failure {
            kind,
            detail: detail.into(),
        }
    }

    /// "timeout after 500ms".
    pub fn timeout(after: Duration) -> Self {
        Failure::new(
            FailureKind::Timeout,
            format!("timeout after {}", fmt_duration(after)),
        )
    }

    /// A short reason for a socket error ("connection refused", "host unreachable", ...).
    pub fn io(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        use FailureKind as F;
        let (kind, short) = match e.kind() {
            K::ConnectionRefused => (F::Refused, "connection refused"),
            K::ConnectionReset => (F::Reset, "connection reset"),
            K::ConnectionAborted => (F::Reset, "connection aborted"),
            K::TimedOut => (F::Timeout, "timed out"),
            K::AddrNotAvailable => (F::Unreachable, "address not available"),
            K::UnexpectedEof => (F::Closed, "connection closed"),
            _ => match e.raw_os_error() {
                Some(libc::EHOSTUNREACH) => (F::Unreachable, "host unreachable"),
                Some(libc::ENETUNREACH) => (F::Unreachable, "network unreachable"),
                _ => return Failure::new(F::Other, e.to_string()),
            },
        };
        Failure::new(kind, short)
    }

    pub fn kind(&self) -> FailureKind {
        self.kind
    }

    pub fn as_str(&self) -> &str {
        &self.detail
    }

    pub fn into_string(self) -> String {
        self.detail
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for Failure {}

/// The port a check connects to: the check's `port`, else the real's.
pub fn check_port(cfg: &CheckConfig, real: SocketAddr) -> u16 {
    cfg.port.unwrap_or(real.port())
}

/// The address a check connects to: the real's IP and [`check_port`].
pub fn check_addr(cfg: &CheckConfig, real: SocketAddr) -> SocketAddr {
    SocketAddr::new(real.ip(), check_port(cfg, real))
}

/// Runs one probe of `real` (its IP; the port is [`check_port`]). `Ok(())` means up.
///
/// The whole probe (connect, TLS, request, body) is bounded by `cfg.timeout`. `exec` and `dns`
/// apply the same timeout themselves: `exec` must kill the command's process group rather than
/// merely drop it, and `dns` reports a silent server as "no answer".
pub async fn probe(cfg: &CheckConfig, real: SocketAddr) -> Result<(), Failure> {
    // Boxed: the checkers' state machines (HTTPS above all) are large, and a task per real
    // holds this future for its whole life; boxing allocates that state only while probing.
    match cfg.kind {
        CheckKind::None => Ok(()),
        CheckKind::Off => Err(Failure::new(FailureKind::Config, "check type off")),
        CheckKind::Exec => Box::pin(exec::probe(cfg, real)).await,
        CheckKind::Tcp => Box::pin(bounded(cfg.timeout, tcp::probe(cfg, real))).await,
        CheckKind::Http => Box::pin(bounded(cfg.timeout, http::probe(cfg, real, false))).await,
        CheckKind::Https => Box::pin(bounded(cfg.timeout, http::probe(cfg, real, true))).await,
        CheckKind::Dns => Box::pin(dns::probe(cfg, real)).await,
    }
}

async fn bounded<F>(limit: Duration, fut: F) -> Result<(), Failure>
where
    F: std::future::Future<Output = Result<(), Failure>>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(result) => result,
        Err(_) => Err(Failure::timeout(limit)),
    }
}

/// "500ms", "2s", "1.5s": durations as operators write them.
pub(crate) fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    let (secs, rem) = (ms / 1000, ms % 1000);
    match (secs, rem) {
        (0, 0) if !d.is_zero() => format!("{}us", d.as_micros()),
        (0, _) => format!("{ms}ms"),
        (_, 0) => format!("{secs}s"),
        _ => {
            let frac = format!("{rem:03}");
            format!("{secs}.{}s", frac.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// A check of `kind` with short test timings.
    pub fn cfg(kind: CheckKind) -> CheckConfig {
        CheckConfig {
            kind,
            interval: Duration::from_millis(50),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
            ..CheckConfig::default_tcp()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(fmt_duration(Duration::from_secs(2)), "2s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::ZERO), "0ms");
        assert_eq!(
            Failure::timeout(Duration::from_millis(500)).to_string(),
            "timeout after 500ms"
        );
    }

    #[test]
    fn io_reasons() {
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(Failure::io(&e).as_str(), "connection refused");
        let e = std::io::Error::from_raw_os_error(libc::EHOSTUNREACH);
        assert_eq!(Failure::io(&e).as_str(), "host unreachable");
        assert_eq!(Failure::io(&e).kind(), FailureKind::Unreachable);
        // An error nobody classified keeps its text as detail and is "other" for metrics.
        let e = std::io::Error::other("frobnicator jammed 0x7f3a");
        let f = Failure::io(&e);
        assert_eq!(f.as_str(), "frobnicator jammed 0x7f3a");
        assert_eq!(f.kind().label(), "other");
    }

    #[tokio::test]
    async fn none_and_off() {
        let real: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(probe(&testutil::cfg(CheckKind::None), real).await, Ok(()));
        assert_eq!(
            probe(&testutil::cfg(CheckKind::Off), real).await,
            Err(Failure::new(FailureKind::Config, "check type off"))
        );
    }

    #[test]
    fn failure_labels_are_a_closed_set_of_metric_names() {
        let labels: std::collections::HashSet<_> =
            FailureKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels.len(), FailureKind::ALL.len(), "labels are distinct");
        for l in labels {
            assert!(
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{l}"
            );
        }
    }

    #[test]
    fn addresses() {
        let real: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let mut c = testutil::cfg(CheckKind::Tcp);
        assert_eq!(check_addr(&c, real), real);
        c.port = Some(8080);
        assert_eq!(check_addr(&c, real), "10.0.0.1:8080".parse().unwrap());
    }
}

#[cfg(test)]
mod size_tests {
    /// Each real's check task holds a probe future for its whole life; an unboxed one would be
    /// as large as the largest checker's state machine (HTTPS: many KiB) for every real.
    #[test]
    fn a_probe_future_is_small() {
        let cfg = crate::config::CheckConfig::default_tcp();
        let real: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        let size = std::mem::size_of_val(&super::probe(&cfg, real));
        assert!(size <= 256, "probe future is {size} bytes");
    }
}
