//! HTTP and HTTPS checks: `GET path`, expect a status (and optionally a body matching a regex).
//!
//! A listener can accept while the application behind it returns errors, so this is the check
//! that proves a web real serves. One connection per probe, no pool (a pooled connection would
//! test the pool, not the real), `Connection: close`. The body is read only when a regex needs it
//! and never beyond `max_body` bytes: the timeout bounds time, `max_body` bounds memory, so a
//! real streaming an endless body can neither hang nor bloat the director.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::{check_addr, CheckConfig, Failure, FailureKind};
use crate::config::CaFile;

/// The User-Agent of every check request.
pub const USER_AGENT_VALUE: &str = "xdpvs-check";

/// Response head limits, set explicitly rather than trusting hyper's defaults to stay small: a
/// real sending endless headers fails the check ("message head is too large") after this much,
/// long before its timeout, and holds no more than this of the director's memory.
pub const MAX_HEADERS: usize = 64;
/// Bytes of status line and headers.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// hyper's read buffer (its minimum is 8 KiB); bounds what one read of the body holds.
pub const MAX_READ_BUF: usize = 64 * 1024;

/// Probes `real` over HTTP, or HTTPS when `tls`. Unbounded in time: [`super::probe`] applies the
/// timeout.
pub async fn probe(cfg: &CheckConfig, real: SocketAddr, tls: bool) -> Result<(), Failure> {
    let addr = check_addr(cfg, real);
    let host = host_header(cfg, addr, tls);
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| Failure::io(&e))?;
    let _ = tcp.set_nodelay(true);
    if !tls {
        return exchange(TokioIo::new(tcp), cfg, &host).await;
    }
    let config = tls_config(cfg.tls_verify, cfg.ca_file.as_ref())?;
    let name = server_name(cfg, addr)?;
    let stream = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| tls_failure(&e))?;
    exchange(TokioIo::new(stream), cfg, &host).await
}

/// The Host header: `cfg.host`, else the IP with the port unless it is the scheme's default.
fn host_header(cfg: &CheckConfig, addr: SocketAddr, tls: bool) -> String {
    if let Some(h) = &cfg.host {
        return h.clone();
    }
    let default_port = if tls { 443 } else { 80 };
    match (addr, addr.port() == default_port) {
        (SocketAddr::V4(a), true) => a.ip().to_string(),
        (SocketAddr::V6(a), true) => format!("[{}]", a.ip()),
        (a, false) => a.to_string(),
    }
}

/// Sends the request on a fresh connection and judges the response. The connection is driven in
/// this future (not a spawned task), so dropping the probe on timeout closes it.
async fn exchange<T>(io: T, cfg: &CheckConfig, host: &str) -> Result<(), Failure>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin,
{
    let req = Request::builder()
        .method(Method::GET)
        .uri(cfg.path.as_str())
        .header(HOST, host)
        .header(CONNECTION, "close")
        .header(USER_AGENT, USER_AGENT_VALUE)
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failure::new(FailureKind::Config, format!("http: bad request: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_headers(MAX_HEADERS)
        .max_header_size(MAX_HEAD_BYTES)
        .max_buf_size(MAX_READ_BUF)
        .handshake(io)
        .await
        .map_err(|e| http_failure(&e))?;
    let mut conn = std::pin::pin!(conn);
    let work = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| http_failure(&e))?;
        judge(resp, cfg).await
    };
    let mut work = std::pin::pin!(work);
    tokio::select! {
        biased;
        r = &mut work => return r,
        // The connection ended (cleanly after `Connection: close`, or with an error); whatever
        // it delivered is already in the response channels, so `work` finishes without waiting.
        _ = &mut conn => {}
    }
    work.await
}

/// Status in `expect_status` (any 2xx/3xx if that list is empty), then the body regex if any.
async fn judge(resp: Response<Incoming>, cfg: &CheckConfig) -> Result<(), Failure> {
    let status = resp.status().as_u16();
    let status_ok = if cfg.expect_status.is_empty() {
        (200..400).contains(&status)
    } else {
        cfg.expect_status.contains(&status)
    };
    if !status_ok {
        return Err(Failure::new(
            FailureKind::HttpStatus,
            format!("status {status}"),
        ));
    }
    let Some(re) = &cfg.expect_body else {
        return Ok(());
    };
    let mut body = resp.into_body();
    let mut buf: Vec<u8> = Vec::with_capacity(cfg.max_body.min(16 * 1024));
    while buf.len() < cfg.max_body {
        match body.frame().await {
            None => break,
            Some(Err(e)) => {
                let f = http_failure(&e);
                return Err(Failure::new(f.kind(), format!("reading body: {f}")));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    let take = data.len().min(cfg.max_body - buf.len());
                    buf.extend_from_slice(&data[..take]);
                }
            }
        }
    }
    drop(body);
    if re.is_match(&String::from_utf8_lossy(&buf)) {
        Ok(())
    } else {
        Err(Failure::new(
            FailureKind::BodyMismatch,
            "body did not match",
        ))
    }
}

/// Socket errors as [`Failure::io`]; protocol errors as "http: ...".
fn http_failure(e: &hyper::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return tls_failure(io);
            }
            return Failure::io(io);
        }
        source = s.source();
    }
    if e.is_incomplete_message() {
        return Failure::new(
            FailureKind::Closed,
            "http: connection closed before a complete response",
        );
    }
    Failure::new(FailureKind::HttpProtocol, format!("http: {e}"))
}

/// "tls: invalid peer certificate: UnknownIssuer" and the like.
fn tls_failure(e: &std::io::Error) -> Failure {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => Failure::new(FailureKind::Tls, format!("tls: {t}")),
        None => match e.kind() {
            std::io::ErrorKind::UnexpectedEof => {
                Failure::new(FailureKind::Tls, "tls: connection closed during handshake")
            }
            _ => {
                let f = Failure::io(e);
                Failure::new(FailureKind::Tls, format!("tls: {f}"))
            }
        },
    }
}

/// SNI: `cfg.sni`, else `cfg.host` (without a port), else the IP (as an IP server name, which
/// sends no SNI but is what the certificate is verified against).
fn server_name(cfg: &CheckConfig, addr: SocketAddr) -> Result<ServerName<'static>, Failure> {
    let Some(name) = cfg.sni.as_deref().or(cfg.host.as_deref()) else {
        return Ok(ServerName::IpAddress(addr.ip().into()));
    };
    let bare = strip_port(name);
    ServerName::try_from(bare.to_string()).map_err(|_| {
        Failure::new(
            FailureKind::Config,
            format!("tls: invalid server name {name:?}"),
        )
    })
}

/// "example.com:8443" -> "example.com", "[::1]:443" -> "::1"; anything else unchanged.
fn strip_port(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        if let Some((ip, _)) = rest.split_once(']') {
            return ip;
        }
    }
    match h.rsplit_once(':') {
        Some((name, port))
            if !name.contains(':')
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            name
        }
        _ => h,
    }
}

static TLS_VERIFYING: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
static TLS_INSECURE: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();

/// Which certificates a verifying check trusts.
enum Roots<'a> {
    /// The system's (`/etc/ssl/certs`, or `SSL_CERT_FILE` / `SSL_CERT_DIR`), as curl and
    /// openssl use them: updated by the distribution, not by an xdpvs release.
    System,
    /// Only these (`ca_file`), as `curl --cacert` does.
    File(&'a [CertificateDer<'static>]),
}

/// The client configuration, built once per process for the system roots and once per
/// `ca_file` (root store parsing and provider setup are not per-probe work). Installs nothing
/// process-global.
fn tls_config(verify: bool, ca: Option<&CaFile>) -> Result<Arc<ClientConfig>, Failure> {
    let config_failure = |e: String| Failure::new(FailureKind::Config, format!("tls: config: {e}"));
    if let (true, Some(ca)) = (verify, ca) {
        if let Some(c) = ca.client.get() {
            return Ok(c.clone());
        }
        let c = build_tls_config(Some(Roots::File(&ca.certs)))
            .map(Arc::new)
            .map_err(|e| config_failure(format!("{}: {e}", ca.path.display())))?;
        return Ok(ca.client.get_or_init(|| c).clone());
    }
    let cell = if verify {
        &TLS_VERIFYING
    } else {
        &TLS_INSECURE
    };
    cell.get_or_init(|| build_tls_config(verify.then_some(Roots::System)).map(Arc::new))
        .clone()
        .map_err(config_failure)
}

/// `None`: accept any certificate (`tls_verify = false`).
fn build_tls_config(roots: Option<Roots<'_>>) -> Result<ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = if let Some(roots) = roots {
        let mut store = RootCertStore::empty();
        match roots {
            Roots::System => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = store.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(format!(
                        "no system CA certificates found ({}); install ca-certificates, or \
                         set ca_file",
                        found.errors.first().map_or_else(
                            || "none in the system store".to_string(),
                            |e| e.to_string()
                        )
                    ));
                }
            }
            Roots::File(certs) => {
                let (added, ignored) = store.add_parsable_certificates(certs.iter().cloned());
                if added == 0 {
                    return Err(format!(
                        "none of its {ignored} certificates is usable as a CA"
                    ));
                }
            }
        }
        builder.with_root_certificates(store).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth()
    };
    Ok(config)
}

/// `tls_verify = false`: any certificate (self-signed, expired, wrong name) is accepted, but the
/// handshake signatures are still checked, so the peer must hold the certificate's key.
#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::cfg;
    use super::super::{probe, CheckKind};
    use super::*;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    #[derive(Clone, Copy)]
    enum Behavior {
        /// Accept, read the request, never answer.
        Hang,
        /// Answer with this status and body.
        Reply(u16, &'static str),
        /// 200 with a body that never ends.
        Endless,
        /// A valid response, one byte a second.
        Trickle,
        /// A status line, then headers that never end.
        EndlessHeaders,
        /// A status line, then more (tiny) headers than allowed.
        ManyHeaders,
        /// A complete response whose head is just over [`MAX_HEAD_BYTES`] (hyper's default
        /// limits would accept it).
        BigHead,
    }

    /// Reads the request head, reports it, then behaves.
    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        b: Behavior,
        heads: mpsc::UnboundedSender<String>,
    ) {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
            match s.read(&mut byte).await {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
        match b {
            Behavior::Hang => {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            Behavior::Reply(status, body) => {
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            }
            Behavior::Endless => {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .await;
                let chunk = format!("{:x}\r\n{}\r\n", 4096, "a".repeat(4096));
                while s.write_all(chunk.as_bytes()).await.is_ok() {}
            }
            Behavior::Trickle => {
                for b in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" {
                    if s.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Behavior::EndlessHeaders => {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
                let line = format!("X-Filler: {}\r\n", "f".repeat(1000));
                while s.write_all(line.as_bytes()).await.is_ok() {}
            }
            Behavior::BigHead => {
                let mut resp = b"HTTP/1.1 200 OK\r\n".to_vec();
                while resp.len() <= MAX_HEAD_BYTES {
                    resp.extend_from_slice(
                        format!("X-Filler: {}\r\n", "f".repeat(1000)).as_bytes(),
                    );
                }
                resp.extend_from_slice(b"Content-Length: 0\r\n\r\n");
                let _ = s.write_all(&resp).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Behavior::ManyHeaders => {
                let mut resp = b"HTTP/1.1 200 OK\r\n".to_vec();
                for i in 0..(MAX_HEADERS + 1) {
                    resp.extend_from_slice(format!("x{i}: 1\r\n").as_bytes());
                }
                resp.extend_from_slice(b"Content-Length: 0\r\n\r\n");
                let _ = s.write_all(&resp).await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }

    /// A raw TCP server: on each connection `serve` runs with the stream (no request read).
    async fn raw_server<F, Fut>(serve: F) -> SocketAddr
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve(s));
            }
        });
        addr
    }

    /// A probe that must fail, well within its timeout (`limit`), with `kind`.
    async fn fails_within(c: &CheckConfig, addr: SocketAddr, limit: Duration) -> Failure {
        let t = Instant::now();
        let r = probe(c, addr).await.unwrap_err();
        assert!(t.elapsed() < limit, "{r} after {:?}", t.elapsed());
        r
    }

    /// A plain HTTP server; returns its address and the request heads it saw.
    async fn server(b: Behavior) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(handle(s, b, tx.clone()));
            }
        });
        (addr, rx)
    }

    /// An HTTPS server with a fresh self-signed certificate for "localhost".
    async fn tls_server(b: Behavior) -> SocketAddr {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
        serve_tls(ck.cert.der().clone(), key, b).await
    }

    /// A TLS server presenting `cert` that answers like `b`.
    async fn serve_tls(
        cert: CertificateDer<'static>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        b: Behavior,
    ) -> SocketAddr {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let sc = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, _rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _rx = _rx;
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(s) = acceptor.accept(s).await {
                        handle(s, b, tx).await;
                    }
                });
            }
        });
        addr
    }

    fn http() -> CheckConfig {
        cfg(CheckKind::Http)
    }

    #[tokio::test]
    async fn good_200_with_matching_body_and_request_headers() {
        let (addr, mut heads) = server(Behavior::Reply(200, "all systems OK")).await;
        let mut c = http();
        c.path = "/health?x=1".into();
        c.expect_body = Some(regex::Regex::new("systems OK").unwrap());
        assert_eq!(probe(&c, addr).await, Ok(()));
        let head = heads.recv().await.unwrap().to_ascii_lowercase();
        assert!(head.starts_with("get /health?x=1 http/1.1\r\n"), "{head}");
        assert!(head.contains(&format!("host: {addr}\r\n")), "{head}");
        assert!(head.contains("connection: close\r\n"), "{head}");
        assert!(head.contains("user-agent: xdpvs-check\r\n"), "{head}");
    }

    #[tokio::test]
    async fn host_header_from_config() {
        let (addr, mut heads) = server(Behavior::Reply(200, "")).await;
        let mut c = http();
        c.host = Some("www.example.com".into());
        assert_eq!(probe(&c, addr).await, Ok(()));
        let head = heads.recv().await.unwrap().to_ascii_lowercase();
        assert!(head.contains("host: www.example.com\r\n"), "{head}");
    }

    #[tokio::test]
    async fn status_503() {
        let (addr, _h) = server(Behavior::Reply(503, "busy")).await;
        assert_eq!(
            probe(&http(), addr).await.unwrap_err().as_str(),
            "status 503"
        );
    }

    #[tokio::test]
    async fn expect_status_list() {
        let (addr, _h) = server(Behavior::Reply(204, "")).await;
        let mut c = http();
        assert_eq!(probe(&c, addr).await.unwrap_err().as_str(), "status 204");
        c.expect_status = vec![200, 204];
        assert_eq!(probe(&c, addr).await, Ok(()));
        c.expect_status = vec![];
        assert_eq!(probe(&c, addr).await, Ok(()));
    }

    #[tokio::test]
    async fn wrong_body() {
        let (addr, _h) = server(Behavior::Reply(200, "maintenance")).await;
        let mut c = http();
        c.expect_body = Some(regex::Regex::new("^OK$").unwrap());
        assert_eq!(
            probe(&c, addr).await.unwrap_err().as_str(),
            "body did not match"
        );
    }

    #[tokio::test]
    async fn hang_times_out() {
        let (addr, _h) = server(Behavior::Hang).await;
        let mut c = http();
        c.timeout = Duration::from_millis(300);
        let t = Instant::now();
        let r = probe(&c, addr).await;
        assert_eq!(r.unwrap_err().as_str(), "timeout after 300ms");
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        assert_eq!(
            probe(&http(), addr).await.unwrap_err().as_str(),
            "connection refused"
        );
    }

    #[tokio::test]
    async fn endless_body_is_cut_at_max_body() {
        let (addr, _h) = server(Behavior::Endless).await;
        let mut c = http();
        c.timeout = Duration::from_secs(2);
        c.max_body = 10_000;
        // Matches only if more than max_body bytes were kept.
        c.expect_body = Some(regex::Regex::new("a{10001}").unwrap());
        let t = Instant::now();
        assert_eq!(
            probe(&c, addr).await.unwrap_err().as_str(),
            "body did not match"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        // And a regex satisfied by exactly max_body bytes matches: the body was read that far.
        c.expect_body = Some(regex::Regex::new("^a{10000}$").unwrap());
        assert_eq!(probe(&c, addr).await, Ok(()));
    }

    #[tokio::test]
    async fn endless_body_without_regex_is_not_read() {
        let (addr, _h) = server(Behavior::Endless).await;
        assert_eq!(probe(&http(), addr).await, Ok(()));
    }

    #[tokio::test]
    async fn https_self_signed() {
        let addr = tls_server(Behavior::Reply(200, "secure OK")).await;
        let mut c = cfg(CheckKind::Https);
        c.expect_body = Some(regex::Regex::new("OK").unwrap());

        c.tls_verify = true;
        let r = probe(&c, addr).await.unwrap_err();
        assert!(
            r.as_str().starts_with("tls: invalid peer certificate"),
            "{r}"
        );

        c.tls_verify = false;
        assert_eq!(probe(&c, addr).await, Ok(()));

        c.host = Some("localhost:8443".into());
        assert_eq!(probe(&c, addr).await, Ok(()));
        c.sni = Some("localhost".into());
        assert_eq!(probe(&c, addr).await, Ok(()));
    }

    /// A CA, and a TLS server whose certificate (for localhost and 127.0.0.1) it signed.
    async fn ca_signed_server(b: Behavior) -> (SocketAddr, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .unwrap();
        let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let addr = serve_tls(leaf.der().clone(), der, b).await;
        (addr, ca.pem())
    }

    #[tokio::test]
    async fn https_against_an_internal_ca_with_ca_file() {
        let (addr, ca_pem) = ca_signed_server(Behavior::Reply(200, "secure OK")).await;
        let dir = std::env::temp_dir().join(format!("xdpvs-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_path = dir.join("internal-ca.pem");
        std::fs::write(&ca_path, &ca_pem).unwrap();
        let mut c = cfg(CheckKind::Https);
        c.tls_verify = true;

        // The system roots do not know the internal CA.
        let r = probe(&c, addr).await.unwrap_err();
        assert!(
            r.as_str().starts_with("tls: invalid peer certificate"),
            "{r}"
        );

        // With its ca_file the real's certificate verifies (name checked against 127.0.0.1).
        c.ca_file = Some(CaFile::read(&ca_path).unwrap());
        assert_eq!(probe(&c, addr).await, Ok(()));

        // Another CA's file does not.
        let (_, other_pem) = ca_signed_server(Behavior::Reply(200, "x")).await;
        let other_path = dir.join("other-ca.pem");
        std::fs::write(&other_path, &other_pem).unwrap();
        c.ca_file = Some(CaFile::read(&other_path).unwrap());
        let r = probe(&c, addr).await.unwrap_err();
        assert!(
            r.as_str().starts_with("tls: invalid peer certificate"),
            "{r}"
        );

        // A file with no certificate is refused when read (that is, with the config).
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = CaFile::read(&empty).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
        assert!(CaFile::read(&dir.join("missing.pem")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn https_against_plain_http_fails() {
        // A plain HTTP server answers the ClientHello with a 400 and closes.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                    .await;
            }
        });
        let mut c = cfg(CheckKind::Https);
        c.tls_verify = false;
        let r = probe(&c, addr).await.unwrap_err();
        assert!(r.as_str().starts_with("tls: "), "{r}");
    }

    #[tokio::test]
    async fn accept_and_never_read_times_out() {
        let addr = raw_server(|s| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        })
        .await;
        for kind in [CheckKind::Http, CheckKind::Https] {
            let mut c = cfg(kind);
            c.tls_verify = false;
            c.timeout = Duration::from_millis(300);
            let r = fails_within(&c, addr, Duration::from_secs(1)).await;
            assert_eq!(r.kind(), FailureKind::Timeout, "{r}");
        }
    }

    #[tokio::test]
    async fn trickling_server_times_out() {
        let (addr, _h) = server(Behavior::Trickle).await;
        let mut c = http();
        c.timeout = Duration::from_millis(1500);
        let r = fails_within(&c, addr, Duration::from_millis(2500)).await;
        assert_eq!(r.as_str(), "timeout after 1.5s");
    }

    #[tokio::test]
    async fn endless_headers_fail_fast_at_the_head_limit() {
        let (addr, _h) = server(Behavior::EndlessHeaders).await;
        let mut c = http();
        c.timeout = Duration::from_secs(5);
        // Fails on the limit, not at the timeout.
        let r = fails_within(&c, addr, Duration::from_secs(2)).await;
        assert_eq!(r.kind(), FailureKind::HttpProtocol, "{r}");
        assert!(r.as_str().contains("too large"), "{r}");
    }

    #[tokio::test]
    async fn a_head_over_the_explicit_limit_is_refused() {
        let (addr, _h) = server(Behavior::BigHead).await;
        let r = fails_within(&http(), addr, Duration::from_secs(1)).await;
        assert_eq!(r.kind(), FailureKind::HttpProtocol, "{r}");
    }

    #[tokio::test]
    async fn too_many_headers_fail_fast() {
        let (addr, _h) = server(Behavior::ManyHeaders).await;
        let mut c = http();
        c.timeout = Duration::from_secs(5);
        let r = fails_within(&c, addr, Duration::from_secs(2)).await;
        assert_eq!(r.kind(), FailureKind::HttpProtocol, "{r}");
    }

    #[tokio::test]
    async fn garbage_instead_of_tls_fails_fast() {
        // Endless bytes that are no TLS record.
        let endless = raw_server(|mut s| async move {
            let junk = vec![0x5au8; 4096];
            while s.write_all(&junk).await.is_ok() {}
        })
        .await;
        // A plausible record header (handshake, TLS 1.2) announcing a huge, garbage body.
        let bogus = raw_server(|mut s| async move {
            let mut rec = vec![0x16, 0x03, 0x03, 0x40, 0x00];
            rec.extend(std::iter::repeat_n(0xffu8, 0x4000));
            let _ = s.write_all(&rec).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        for addr in [endless, bogus] {
            let mut c = cfg(CheckKind::Https);
            c.tls_verify = false;
            c.timeout = Duration::from_secs(5);
            let r = fails_within(&c, addr, Duration::from_secs(2)).await;
            assert_eq!(r.kind(), FailureKind::Tls, "{r}");
            assert!(r.as_str().starts_with("tls: "), "{r}");
        }
    }

    #[tokio::test]
    async fn tls_then_endless_headers_fail_fast() {
        let addr = tls_server(Behavior::EndlessHeaders).await;
        let mut c = cfg(CheckKind::Https);
        c.tls_verify = false;
        c.timeout = Duration::from_secs(5);
        let r = fails_within(&c, addr, Duration::from_secs(3)).await;
        assert_eq!(r.kind(), FailureKind::HttpProtocol, "{r}");
    }

    #[tokio::test]
    async fn tls_server_that_stalls_after_the_handshake_times_out() {
        let addr = tls_server(Behavior::Hang).await;
        let mut c = cfg(CheckKind::Https);
        c.tls_verify = false;
        c.timeout = Duration::from_millis(400);
        let r = fails_within(&c, addr, Duration::from_secs(1)).await;
        assert_eq!(r.kind(), FailureKind::Timeout, "{r}");
    }

    #[tokio::test]
    async fn failure_kinds_of_plain_answers() {
        let (addr, _h) = server(Behavior::Reply(503, "busy")).await;
        let r = probe(&http(), addr).await.unwrap_err();
        assert_eq!(r.kind(), FailureKind::HttpStatus);
        let (addr, _h) = server(Behavior::Reply(200, "nope")).await;
        let mut c = http();
        c.expect_body = Some(regex::Regex::new("^OK$").unwrap());
        assert_eq!(
            probe(&c, addr).await.unwrap_err().kind(),
            FailureKind::BodyMismatch
        );
        let garbage = raw_server(|mut s| async move {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        })
        .await;
        let r = fails_within(&http(), garbage, Duration::from_secs(1)).await;
        assert_eq!(r.kind(), FailureKind::HttpProtocol, "{r}");
    }

    #[test]
    fn names() {
        assert_eq!(strip_port("example.com:8443"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("::1"), "::1");
        let mut c = cfg(CheckKind::Https);
        let addr: SocketAddr = "10.1.2.3:443".parse().unwrap();
        assert_eq!(
            server_name(&c, addr).unwrap(),
            ServerName::IpAddress(addr.ip().into())
        );
        c.host = Some("a.example:8443".into());
        assert_eq!(
            server_name(&c, addr).unwrap(),
            ServerName::try_from("a.example").unwrap()
        );
        c.sni = Some("b.example".into());
        assert_eq!(
            server_name(&c, addr).unwrap(),
            ServerName::try_from("b.example").unwrap()
        );
        assert_eq!(host_header(&cfg(CheckKind::Https), addr, true), "10.1.2.3");
        assert_eq!(
            host_header(&cfg(CheckKind::Http), addr, false),
            "10.1.2.3:443"
        );
        let v6: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(
            host_header(&cfg(CheckKind::Http), v6, false),
            "[2001:db8::1]"
        );
    }

    #[test]
    fn tls_configs_are_shared() {
        let a = tls_config(true, None).unwrap();
        let b = tls_config(true, None).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = tls_config(false, None).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
    }
}
