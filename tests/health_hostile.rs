//! Hostile real servers against the health checkers, many times: the director's memory must not
//! grow with the number of checks a misbehaving real makes it run.
//!
//! Runs the checkers (`xdpvs::health::probe`), not the daemon, 10,000 times against servers on
//! 127.0.0.1 that stall, send endless headers, endless bodies, garbage instead of TLS, or flood
//! garbage DNS replies, and compares the process's resident set before and after. Every check
//! must fail with the expected kind within its timeout. This binary holds this one test, so no
//! other test's allocations blur the measurement. No root needed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use xdpvs::config::{CheckConfig, CheckKind};
use xdpvs::health::{probe, FailureKind};

/// Checks measured (`XDPVS_HOSTILE_CHECKS` overrides, e.g. to see whether growth levels off).
fn checks() -> usize {
    std::env::var("XDPVS_HOSTILE_CHECKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}
const WARMUP: usize = 2_000;
const PARALLEL: usize = 64;

/// Resident set size in bytes (`/proc/self/statm`, second field, in pages).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("rss field");
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

/// A TCP server running `serve` on every connection.
async fn tcp_server<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Reads the request head (bounded) so the client's write does not fail early.
async fn read_head(s: &mut tokio::net::TcpStream) {
    let mut buf = [0u8; 2048];
    let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
}

struct Case {
    name: &'static str,
    cfg: CheckConfig,
    addr: SocketAddr,
    expect: FailureKind,
}

fn check(kind: CheckKind, timeout_ms: u64) -> CheckConfig {
    CheckConfig {
        kind,
        timeout: Duration::from_millis(timeout_ms),
        tls_verify: false,
        ..CheckConfig::default_tcp()
    }
}

async fn cases() -> Vec<Case> {
    // Accepts and never answers; lets go only when the checker hangs up (a server that held
    // every socket for longer would measure its own memory, not the checker's).
    let stall = tcp_server(|mut s| async move {
        let mut buf = [0u8; 1024];
        while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    let endless_headers = tcp_server(|mut s| async move {
        read_head(&mut s).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
        let line = format!("X-Filler: {}\r\n", "f".repeat(1000));
        while s.write_all(line.as_bytes()).await.is_ok() {}
    })
    .await;
    let endless_body = tcp_server(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await;
        let chunk = format!("{:x}\r\n{}\r\n", 4096, "a".repeat(4096));
        while s.write_all(chunk.as_bytes()).await.is_ok() {}
    })
    .await;
    let garbage_tls = tcp_server(|mut s| async move {
        let junk = vec![0x5au8; 4096];
        while s.write_all(&junk).await.is_ok() {}
    })
    .await;
    // Answers every query with a burst of datagrams that are not its answer, then a short one.
    let dns = UdpSocket::bind("127.0.0.1:0").await.expect("udp bind");
    let dns_addr = dns.local_addr().expect("udp addr");
    let dns = Arc::new(dns);
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((_, peer)) = dns.recv_from(&mut buf).await {
            for _ in 0..8 {
                // QR clear: not a response, so "not ours"; the checker keeps waiting.
                let _ = dns.send_to(&[0u8; 64], peer).await;
            }
            let _ = dns.send_to(&[0x80u8; 5], peer).await;
        }
    });

    let mut body = check(CheckKind::Http, 2000);
    body.expect_body = Some(regex::Regex::new("never-there").expect("regex"));
    let mut dns_cfg = check(CheckKind::Dns, 1000);
    dns_cfg.port = Some(dns_addr.port());
    vec![
        Case {
            name: "http stall",
            cfg: check(CheckKind::Http, 50),
            addr: stall,
            expect: FailureKind::Timeout,
        },
        Case {
            name: "https stall",
            cfg: check(CheckKind::Https, 50),
            addr: stall,
            expect: FailureKind::Timeout,
        },
        Case {
            name: "endless headers",
            cfg: check(CheckKind::Http, 2000),
            addr: endless_headers,
            expect: FailureKind::HttpProtocol,
        },
        Case {
            name: "endless body",
            cfg: body,
            addr: endless_body,
            expect: FailureKind::BodyMismatch,
        },
        Case {
            name: "garbage tls",
            cfg: check(CheckKind::Https, 2000),
            addr: garbage_tls,
            expect: FailureKind::Tls,
        },
        Case {
            name: "garbage dns",
            cfg: dns_cfg,
            addr: dns_addr,
            expect: FailureKind::DnsMalformed,
        },
    ]
}

/// Runs `n` checks, round-robin over the cases, `PARALLEL` at a time; panics on any check that
/// does not fail as expected or outlives its timeout by more than a loaded machine explains.
async fn run(cases: &Arc<Vec<Case>>, n: usize) {
    let mut set = tokio::task::JoinSet::new();
    for i in 0..n {
        if set.len() >= PARALLEL {
            set.join_next().await.expect("task").expect("check task");
        }
        let cases = cases.clone();
        set.spawn(async move {
            let c = &cases[i % cases.len()];
            let t = Instant::now();
            let r = probe(&c.cfg, c.addr).await;
            let took = t.elapsed();
            let f = match r {
                Ok(()) => panic!("{}: check passed", c.name),
                Err(f) => f,
            };
            assert_eq!(f.kind(), c.expect, "{}: {f}", c.name);
            assert!(
                took < c.cfg.timeout + Duration::from_secs(2),
                "{}: took {took:?} (timeout {:?})",
                c.name,
                c.cfg.timeout
            );
        });
    }
    while let Some(r) = set.join_next().await {
        r.expect("check task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_hostile_checks_keep_memory_flat() {
    let cases = Arc::new(cases().await);
    let t0 = Instant::now();
    run(&cases, WARMUP).await;
    let before = rss();
    let n = checks();
    // In four steps, each printed: a leak shows as steady growth, allocator warm-up does not.
    for _ in 0..4 {
        run(&cases, n / 4).await;
        eprintln!("  after {} more: RSS {} KiB", n / 4, rss() / 1024);
    }
    let after = rss();
    let delta = after as i64 - before as i64;
    eprintln!(
        "{n} hostile checks (+{WARMUP} warm-up) in {:?}: RSS {} KiB -> {} KiB ({:+} KiB)",
        t0.elapsed(),
        before / 1024,
        after / 1024,
        delta / 1024
    );
    // Leaking even 1 KiB per check would be 10 MB; allocator noise stays well below.
    assert!(
        delta < 4 * 1024 * 1024,
        "RSS grew by {} KiB over {n} checks",
        delta / 1024
    );
}
