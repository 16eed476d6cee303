//! The configuration file: TOML text in, a validated [`Config`] (the desired state) out.
//!
//! Everything an operator can get wrong is caught here, before anything touches the dataplane:
//! a [`Config`] that exists is one the rest of the daemon can apply without further checks. Errors
//! name the file, the line, the key and what is wrong, because on reload they are all the operator
//! gets while the old configuration keeps serving.

mod parse;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use parse::ConfigError;
pub(crate) use parse::{parse_duration, valid_interface_name, MAX_IFNAME};

/// Default Prometheus listen address (loopback only: metrics are privileged).
pub const DEFAULT_METRICS: &str = "127.0.0.1:9469";
/// Default admin socket path.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/xdpvs/admin.sock";

/// A whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from (for messages).
    pub source: PathBuf,
    pub director: Director,
    pub services: Vec<ServiceConfig>,
    /// VRRP instances electing which director of a pair owns which VIPs (empty: this director
    /// owns every VIP, no HA).
    pub vrrp: Vec<crate::ha::config::VrrpConfig>,
    /// `[sync]`: connection-state sync with the peer director; `None` = no peer.
    pub sync: Option<SyncConfig>,
}

/// Default `[sync] refresh`: how often connections that saw traffic are re-announced to the
/// peer (see `ha::sync::service`).
pub const DEFAULT_SYNC_REFRESH: Duration = Duration::from_secs(30);

/// `[sync]`: where this director listens for its peer's datagrams, where it sends its own, and
/// the shared key that authenticates both directions.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub key_file: PathBuf,
    /// Read (and checked) when the configuration is.
    pub key: crate::ha::sync::wire::Key,
    pub refresh: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Director {
    /// Interface the XDP program attaches to.
    pub interface: String,
    pub xdp_mode: XdpMode,
    /// `None` when `metrics = "off"`.
    pub metrics: Option<SocketAddr>,
    pub admin_socket: PathBuf,
    /// Reload when the config file changes (besides SIGHUP).
    pub watch_config: bool,
    /// Connection-table capacity (entries).
    pub conn_table_size: u32,
    /// Embryonic-table capacity (half-open TCP connections and UDP flows seen once; an LRU).
    pub embryonic_table_size: u32,
    pub timeouts: Timeouts,
    /// bpffs directory holding the pinned program link and maps; `None` = the default,
    /// which depends on the network namespace (see `dataplane::pin::default_dir`).
    pub pin_path: Option<PathBuf>,
    pub on_exit: OnExit,
}

/// What `xdpvs run` leaves behind when it stops (SIGTERM/SIGINT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// The dataplane stays pinned and forwarding; the next `xdpvs run` adopts it.
    Keep,
    /// The program is detached and the pins removed (the director leaves service).
    Detach,
}

/// Idle timeouts of tracked connections, IPVS's defaults unless configured
/// (`[director.timeouts]`: `tcp`, `tcp_fin`, `tcp_syn`, `tcp_close`, `udp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp_established: Duration,
    pub tcp_fin: Duration,
    pub tcp_syn: Duration,
    pub tcp_close: Duration,
    pub udp: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            tcp_established: Duration::from_secs(900),
            tcp_fin: Duration::from_secs(120),
            tcp_syn: Duration::from_secs(60),
            tcp_close: Duration::from_secs(10),
            udp: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Driver mode, falling back to generic (skb) mode with a warning.
    Auto,
    Driver,
    Skb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// Weighted least-connection (the default).
    Wlc,
    Lc,
    Rr,
    Wrr,
    Sh,
    Mh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// Direct routing: the real holds the VIP and answers the client itself.
    Dr,
    Nat,
}

/// What a failed health check does to a real (ldirectord's `quiescent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Weight 0: no new connections, existing ones continue.
    Quiesce,
    /// The real leaves the table and its connections are dropped.
    Remove,
}

/// What happens to a real's connections when a reload removes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRemove {
    /// Like weight 0 until its connections end.
    Drain,
    /// Connections are cut at once.
    Cut,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// Unique; names the service in `list`, metrics and admin commands.
    pub name: String,
    /// VIP and port.
    pub address: SocketAddr,
    pub protocol: Protocol,
    pub scheduler: Scheduler,
    pub forwarding: Forwarding,
    pub on_failure: OnFailure,
    pub on_remove: OnRemove,
    /// Sorry server used only while no real is up.
    pub fallback: Option<SocketAddr>,
    /// Client affinity (IPVS persistent service); `None` = each connection scheduled alone.
    pub persistence: Option<Persistence>,
    /// The service's check, with its defaults filled in.
    pub check: CheckConfig,
    pub reals: Vec<RealConfig>,
}

/// `persistence` and `persistence_mask` of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Persistence {
    /// How long a client's template outlives the last new connection it placed (whole seconds).
    pub timeout: Duration,
    /// Prefix length of the client address templates are kept by (32/128 = per client).
    pub prefix: u8,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RealConfig {
    /// Address and port (the port defaults to the service's).
    pub address: SocketAddr,
    /// 0..=65535; 0 = quiesced.
    pub weight: u32,
    /// The service's check with this real's `[service.real.check]` overrides applied.
    pub check: CheckConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckKind {
    Tcp,
    Http,
    Https,
    Exec,
    Dns,
    /// Always up.
    None,
    /// Always down.
    Off,
}

/// Whether a real counts as up before its first check result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initially {
    Up,
    /// Waits for `rise` successes (keepalived's `alpha`).
    Down,
}

/// One health check, fully specified (every default filled in).
#[derive(Debug, Clone)]
pub struct CheckConfig {
    pub kind: CheckKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes before a down real is up.
    pub rise: u32,
    /// Consecutive failures before an up real is down.
    pub fall: u32,
    /// Port to check instead of the real's.
    pub port: Option<u16>,
    /// HTTP(S) request path.
    pub path: String,
    /// HTTP Host header (and TLS SNI unless `sni` is set); defaults to the real's IP.
    pub host: Option<String>,
    pub expect_status: Vec<u16>,
    pub expect_body: Option<regex::Regex>,
    pub tls_verify: bool,
    /// CA certificates that verify the reals' certificates instead of the system's roots
    /// (`ca_file`: reals behind an internal CA); read and checked with the config.
    pub ca_file: Option<CaFile>,
    pub sni: Option<String>,
    /// Shell command for `exec` (run with `/bin/sh -c`).
    pub command: Option<String>,
    /// Name asked by `dns` checks.
    pub dns_query: String,
    pub initially: Initially,
    /// Most bytes of a response body read by HTTP checks.
    pub max_body: usize,
}

impl CheckConfig {
    /// The check a service gets when it has no `[service.check]`: TCP connect to the real.
    pub fn default_tcp() -> Self {
        CheckConfig {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            port: None,
            path: "/".to_string(),
            host: None,
            expect_status: vec![200],
            expect_body: None,
            tls_verify: true,
            ca_file: None,
            sni: None,
            command: None,
            dns_query: ".".to_string(),
            initially: Initially::Up,
            max_body: 64 * 1024,
        }
    }
}

/// A `ca_file`: its path and the certificates it held when the config was read. Clones share
/// the TLS client configuration built from it on first use.
#[derive(Debug, Clone)]
pub struct CaFile {
    pub path: PathBuf,
    pub certs: Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
    /// Built by the HTTPS checker on first use.
    pub client: Arc<std::sync::OnceLock<Arc<rustls::ClientConfig>>>,
}

impl PartialEq for CaFile {
    fn eq(&self, o: &Self) -> bool {
        self.path == o.path && self.certs == o.certs
    }
}

impl CaFile {
    /// Reads the PEM certificates of `path`: at least one, or why not.
    pub fn read(path: &Path) -> Result<CaFile, String> {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: not a PEM certificate file: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
                path.display()
            ));
        }
        Ok(CaFile {
            path: path.to_path_buf(),
            certs: Arc::new(certs),
            client: Arc::new(std::sync::OnceLock::new()),
        })
    }
}

impl PartialEq for CheckConfig {
    fn eq(&self, o: &Self) -> bool {
        self.kind == o.kind
            && self.interval == o.interval
            && self.timeout == o.timeout
            && self.rise == o.rise
            && self.fall == o.fall
            && self.port == o.port
            && self.path == o.path
            && self.host == o.host
            && self.expect_status == o.expect_status
            && self.expect_body.as_ref().map(|r| r.as_str())
                == o.expect_body.as_ref().map(|r| r.as_str())
            && self.tls_verify == o.tls_verify
            && self.ca_file == o.ca_file
            && self.sni == o.sni
            && self.command == o.command
            && self.dns_query == o.dns_query
            && self.initially == o.initially
            && self.max_body == o.max_body
    }
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::io(path, &e))?;
        Config::parse(&text, path)
    }

    /// Validates configuration text; `path` is only used in messages and `source`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        parse::parse(text, path)
    }

    pub fn service(&self, name: &str) -> Option<&ServiceConfig> {
        self.services.iter().find(|s| s.name == name)
    }
}
