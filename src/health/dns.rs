//! DNS check (keepalived's `DNS_CHECK`): one query over UDP, any well-formed answer = up.
//!
//! For DNS reals a TCP connect proves nothing (they serve UDP). We send a minimal hand-built
//! query (type A, class IN, recursion desired) for `cfg.dns_query` and accept a reply that carries
//! our id and the QR bit with RCODE NOERROR or NXDOMAIN (the server answered authoritatively about
//! the name); SERVFAIL, REFUSED and the other codes mean down. Replies come from the network, so
//! parsing only reads the fixed 12-byte header through checked slices and never panics.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::UdpSocket;

use super::{fmt_duration, CheckConfig, Failure, FailureKind};

/// The port DNS checks use unless the check sets `port` (not the real's port: a DNS real is
/// usually configured with port 53 anyway, and a check port is explicit).
pub const DNS_PORT: u16 = 53;

/// Queries the real (its IP, port `cfg.port` or 53), bounded by `cfg.timeout` (this checker
/// applies its own timeout, reported as "no answer").
pub async fn probe(cfg: &CheckConfig, real: SocketAddr) -> Result<(), Failure> {
    let addr = SocketAddr::new(real.ip(), cfg.port.unwrap_or(DNS_PORT));
    match tokio::time::timeout(cfg.timeout, exchange(cfg, addr)).await {
        Ok(r) => r,
        Err(_) => Err(Failure::new(
            FailureKind::Timeout,
            format!("no answer (timeout after {})", fmt_duration(cfg.timeout)),
        )),
    }
}

async fn exchange(cfg: &CheckConfig, addr: SocketAddr) -> Result<(), Failure> {
    let id = query_id();
    let query = build_query(id, &cfg.dns_query)?;
    let local: SocketAddr = if addr.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.map_err(|e| Failure::io(&e))?;
    // Connected: the kernel drops datagrams from anyone else and reports ICMP unreachable.
    sock.connect(addr).await.map_err(|e| Failure::io(&e))?;
    sock.send(&query).await.map_err(|e| Failure::io(&e))?;
    let mut buf = [0u8; 1500];
    loop {
        let n = sock.recv(&mut buf).await.map_err(|e| Failure::io(&e))?;
        match parse_reply(id, buf.get(..n).unwrap_or(&[])) {
            Reply::Rcode(0) | Reply::Rcode(3) => return Ok(()),
            Reply::Rcode(r) => {
                return Err(Failure::new(
                    FailureKind::DnsRcode,
                    format!("rcode {r} ({})", rcode_name(r)),
                ))
            }
            Reply::Malformed => {
                return Err(Failure::new(
                    FailureKind::DnsMalformed,
                    format!("malformed reply ({n} bytes)"),
                ));
            }
            // A late reply to someone else's query, or our own query reflected: keep waiting.
            Reply::NotOurs => continue,
        }
    }
}

/// What a received datagram is to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// A response (QR set) to our id, with this RCODE.
    Rcode(u8),
    /// Another id, or not a response.
    NotOurs,
    /// Too short to be DNS.
    Malformed,
}

/// Classifies a datagram; reads only the header, never panics.
pub fn parse_reply(id: u16, buf: &[u8]) -> Reply {
    let [id_hi, id_lo, flags_hi, flags_lo, ..] = buf else {
        return Reply::Malformed;
    };
    if buf.len() < 12 {
        return Reply::Malformed;
    }
    if u16::from_be_bytes([*id_hi, *id_lo]) != id || flags_hi & 0x80 == 0 {
        return Reply::NotOurs;
    }
    Reply::Rcode(flags_lo & 0x0f)
}

/// A standard query for `name` (A, IN, RD). `"."` or `""` asks about the root.
pub fn build_query(id: u16, name: &str) -> Result<Vec<u8>, Failure> {
    let bad = |why: &str| {
        Failure::new(
            FailureKind::Config,
            format!("dns: bad query name {name:?}: {why}"),
        )
    };
    let mut q = Vec::with_capacity(18 + name.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00]); // QR=0, opcode QUERY, RD=1
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT=1
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    let mut name_len = 1usize;
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() {
                return Err(bad("empty label"));
            }
            let len = u8::try_from(label.len())
                .ok()
                .filter(|l| *l <= 63)
                .ok_or_else(|| bad("label longer than 63 bytes"))?;
            name_len += 1 + label.len();
            q.push(len);
            q.extend_from_slice(label.as_bytes());
        }
    }
    if name_len > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]); // QTYPE=A, QCLASS=IN
    Ok(q)
}

fn rcode_name(r: u8) -> &'static str {
    match r {
        0 => "NOERROR",
        1 => "FORMERR",
        2 => "SERVFAIL",
        3 => "NXDOMAIN",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "other",
    }
}

/// Unpredictable enough that a stale or stray reply does not pass for ours.
fn query_id() -> u16 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u32(d.subsec_nanos());
    }
    (h.finish() & 0xffff) as u16
}

#[cfg(test)]
mod tests {
    use super::super::testutil::cfg;
    use super::super::{probe, CheckKind};
    use super::*;
    use std::time::{Duration, Instant};

    #[derive(Clone, Copy)]
    enum Answer {
        /// Echo the id with QR set and this rcode.
        Rcode(u8),
        /// Send these bytes.
        Garbage(&'static [u8]),
        /// Reply with the wrong id (must be ignored).
        WrongId,
        Silent,
    }

    /// A UDP responder on 127.0.0.1; returns its address and the queries it saw.
    async fn responder(a: Answer) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let q = buf[..n].to_vec();
                let _ = tx.send(q.clone());
                let reply = match a {
                    Answer::Rcode(r) => {
                        let mut r2 = q.clone();
                        r2[2] |= 0x80;
                        r2[3] = (r2[3] & 0xf0) | r;
                        r2
                    }
                    Answer::Garbage(g) => g.to_vec(),
                    Answer::WrongId => {
                        let mut r2 = q.clone();
                        r2[0] ^= 0xff;
                        r2[2] |= 0x80;
                        r2
                    }
                    Answer::Silent => continue,
                };
                let _ = s.send_to(&reply, from).await;
            }
        });
        (addr, rx)
    }

    fn dns(port: u16) -> CheckConfig {
        let mut c = cfg(CheckKind::Dns);
        c.port = Some(port);
        c.dns_query = "example.com".into();
        c.timeout = Duration::from_millis(300);
        c
    }

    fn real() -> SocketAddr {
        "127.0.0.1:53".parse().unwrap()
    }

    #[tokio::test]
    async fn good_answer_is_up() {
        let (addr, mut seen) = responder(Answer::Rcode(0)).await;
        assert_eq!(probe(&dns(addr.port()), real()).await, Ok(()));
        let q = seen.recv().await.unwrap();
        assert_eq!(&q[12..], b"\x07example\x03com\x00\x00\x01\x00\x01");
    }

    #[tokio::test]
    async fn nxdomain_is_up_servfail_is_down() {
        let (addr, _s) = responder(Answer::Rcode(3)).await;
        assert_eq!(probe(&dns(addr.port()), real()).await, Ok(()));
        let (addr, _s) = responder(Answer::Rcode(2)).await;
        assert_eq!(
            probe(&dns(addr.port()), real()).await.unwrap_err().as_str(),
            "rcode 2 (SERVFAIL)"
        );
        let (addr, _s) = responder(Answer::Rcode(5)).await;
        assert_eq!(
            probe(&dns(addr.port()), real()).await.unwrap_err().as_str(),
            "rcode 5 (REFUSED)"
        );
    }

    #[tokio::test]
    async fn garbage_is_down_without_panic() {
        let (addr, _s) = responder(Answer::Garbage(b"\x01\x02\x03")).await;
        assert_eq!(
            probe(&dns(addr.port()), real()).await.unwrap_err().as_str(),
            "malformed reply (3 bytes)"
        );
        let (addr, _s) = responder(Answer::Garbage(&[0xff; 64])).await;
        assert!(probe(&dns(addr.port()), real()).await.is_err());
        let (addr, _s) = responder(Answer::Garbage(b"")).await;
        assert!(probe(&dns(addr.port()), real()).await.is_err());
    }

    #[tokio::test]
    async fn wrong_id_and_silence_time_out() {
        for a in [Answer::WrongId, Answer::Silent] {
            let (addr, _s) = responder(a).await;
            let t = Instant::now();
            assert_eq!(
                probe(&dns(addr.port()), real()).await.unwrap_err().as_str(),
                "no answer (timeout after 300ms)"
            );
            assert!(t.elapsed() < Duration::from_secs(1));
        }
    }

    #[tokio::test]
    async fn closed_port_is_down() {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = s.local_addr().unwrap().port();
        drop(s);
        // ICMP port unreachable -> "connection refused" (or a timeout if ICMP is filtered).
        assert!(probe(&dns(port), real()).await.is_err());
    }

    #[test]
    fn queries() {
        let q = build_query(0x1234, ".").unwrap();
        assert_eq!(q, [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1]);
        assert_eq!(build_query(1, "").unwrap(), q_with_id(&q, 1));
        assert!(build_query(1, "a..b").is_err());
        assert!(build_query(1, &"a".repeat(64)).is_err());
        let long = vec!["a".repeat(63); 5].join(".");
        assert!(build_query(1, &long).is_err());
        assert!(build_query(1, "www.example.com.").is_ok());
    }

    fn q_with_id(q: &[u8], id: u16) -> Vec<u8> {
        let mut v = q.to_vec();
        v[..2].copy_from_slice(&id.to_be_bytes());
        v
    }

    #[test]
    fn parse_never_panics() {
        for len in 0..40 {
            for fill in [0x00u8, 0x80, 0xff] {
                let _ = parse_reply(7, &vec![fill; len]);
            }
        }
        let mut ok = vec![0u8; 12];
        ok[..2].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(parse_reply(7, &ok), Reply::NotOurs); // QR not set
        ok[2] = 0x81;
        ok[3] = 0x83;
        assert_eq!(parse_reply(7, &ok), Reply::Rcode(3));
        assert_eq!(parse_reply(8, &ok), Reply::NotOurs);
        assert_eq!(parse_reply(7, &ok[..11]), Reply::Malformed);
    }
}
