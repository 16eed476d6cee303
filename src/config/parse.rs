//! Parsing and validation of the TOML configuration.
//!
//! Two stages: serde turns the text into raw structs that mirror the file (every key optional and
//! wrapped in [`Spanned`] where we validate it, unknown keys rejected), then [`Validator`] checks
//! each value and builds the typed [`Config`]. Keeping the values raw until validation lets every
//! error point at the line of the offending value and name its full key path, which matters more
//! than anything else here: on reload the error message is all an operator gets.

use super::{
    CheckConfig, CheckKind, Config, Director, Encap, Forwarding, Initially, OnExit, OnFailure,
    OnRemove, Persistence, Protocol, RealConfig, Scheduler, ServiceConfig, SyncConfig, Timeouts,
    XdpMode, DEFAULT_ADMIN_SOCKET, DEFAULT_METRICS, DEFAULT_SYNC_REFRESH,
};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Most reals one service may have (the dataplane's per-service slot table is this big).
const MAX_REALS: usize = 256;
/// Upper bound of check intervals and timeouts: anything longer is almost surely a typo.
const MAX_CHECK_DURATION: Duration = Duration::from_secs(3600);
/// Upper bound of connection idle timeouts.
const MAX_CONN_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// Linux `IFNAMSIZ` minus the NUL.
pub(crate) const MAX_IFNAME: usize = 15;
/// `sun_path` minus the NUL: longer admin socket paths cannot be bound.
const MAX_SOCKET_PATH: usize = 107;
const CHECK_TYPES: &str = "tcp, http, https, exec, dns, none, off";

/// A configuration error, located as precisely as the error allows.
///
/// Displays as `FILE:LINE:COL: KEY: MESSAGE`, leaving out the parts that are unknown, so editors
/// and operators can jump straight to the offending value.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The configuration file.
    pub file: PathBuf,
    /// 1-based line of the offending key or value, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters), when known.
    pub column: Option<usize>,
    /// Dotted key path such as `service[1].real[0].weight`, when the error concerns one key.
    pub key: Option<String>,
    /// What is wrong, in one line.
    pub message: String,
}

impl ConfigError {
    /// The file could not be read.
    pub fn io(path: &Path, e: &std::io::Error) -> Self {
        ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            key: None,
            message: e.to_string(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Parses and validates configuration text; `path` is only used in errors and `Config::source`.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| toml_error(text, path, &e))?;
    let line_starts = std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect();
    Validator {
        text,
        file: path,
        line_starts,
    }
    .config(raw)
}

/// Blocks of the lookup-table pool that `entries` take.
fn table_blocks(entries: u32) -> u64 {
    u64::from(entries).div_ceil(xdpvs_common::TABLE_BLOCK as u64)
}

// ---------------------------------------------------------------------------------------------
// Raw structs: the file as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    director: Option<Spanned<RawDirector>>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    #[serde(default)]
    vrrp: Vec<Spanned<crate::ha::config::RawVrrp>>,
    sync: Option<Spanned<RawSync>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSync {
    listen: Option<Spanned<String>>,
    peer: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    refresh: Option<Spanned<DurationText>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirector {
    interface: Option<Spanned<String>>,
    xdp_mode: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    admin_socket: Option<Spanned<String>>,
    watch_config: Option<bool>,
    conn_table_size: Option<Spanned<i64>>,
    embryonic_table_size: Option<Spanned<i64>>,
    table_pool_size: Option<Spanned<i64>>,
    timeouts: Option<RawTimeouts>,
    pin_path: Option<Spanned<String>>,
    on_exit: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    tcp: Option<Spanned<DurationText>>,
    tcp_fin: Option<Spanned<DurationText>>,
    tcp_syn: Option<Spanned<DurationText>>,
    tcp_close: Option<Spanned<DurationText>>,
    udp: Option<Spanned<DurationText>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<Spanned<String>>,
    address: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    scheduler: Option<Spanned<String>>,
    mh_table_size: Option<Spanned<i64>>,
    sh_port: Option<Spanned<bool>>,
    sh_fallback: Option<Spanned<bool>>,
    forwarding: Option<Spanned<String>>,
    tunnel: Option<Spanned<String>>,
    tunnel_port: Option<Spanned<i64>>,
    on_failure: Option<Spanned<String>>,
    on_remove: Option<Spanned<String>>,
    fallback: Option<Spanned<String>>,
    persistence: Option<Spanned<DurationText>>,
    persistence_mask: Option<Spanned<i64>>,
    check: Option<Spanned<RawCheck>>,
    #[serde(default)]
    real: Vec<Spanned<RawReal>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReal {
    address: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
    check: Option<Spanned<RawCheck>>,
}

/// Used both for `[service.check]` (where `type` is required) and for `[service.real.check]`
/// (where every key is an override).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCheck {
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    interval: Option<Spanned<DurationText>>,
    timeout: Option<Spanned<DurationText>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    port: Option<Spanned<i64>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    expect_status: Option<Spanned<Vec<Spanned<i64>>>>,
    expect_body: Option<Spanned<String>>,
    tls_verify: Option<bool>,
    ca_file: Option<Spanned<String>>,
    sni: Option<Spanned<String>>,
    command: Option<Spanned<String>>,
    dns_query: Option<Spanned<String>>,
    initially: Option<Spanned<String>>,
    max_body: Option<Spanned<i64>>,
}

/// A duration as written (`"1.5s"`); a bare number is refused while deserializing so that the
/// message can say the unit is missing instead of "expected a string".
struct DurationText(String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"500ms\", \"1s\" or \"2m\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<DurationText, E> {
                Ok(DurationText(s.to_string()))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<DurationText, E> {
                if n <= 0 {
                    return Err(E::custom(format!(
                        "duration {n} must be positive, with a unit, such as \"1s\" or \"500ms\""
                    )));
                }
                Err(E::custom(format!(
                    "duration {n} has no unit; write a string such as \"{n}s\" or \"{n}ms\""
                )))
            }
            fn visit_f64<E: de::Error>(self, n: f64) -> Result<DurationText, E> {
                if n <= 0.0 {
                    return Err(E::custom(format!(
                        "duration {n} must be positive, with a unit, such as \"1s\" or \"500ms\""
                    )));
                }
                Err(E::custom(format!(
                    "duration {n} has no unit; write a string such as \"{n}s\""
                )))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// TOML errors (syntax, types, unknown keys).

/// Converts a toml/serde error, recovering the key path from the document where it parses.
fn toml_error(text: &str, file: &Path, e: &toml::de::Error) -> ConfigError {
    let mut message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    let (line, column, key) = match e.span() {
        Some(span) => {
            // toml hands date-times to serde as a private map; say what the operator wrote.
            let at_digit = text
                .get(span.clone())
                .is_some_and(|s| s.starts_with(|c: char| c.is_ascii_digit()));
            if at_digit && message.starts_with("invalid type: map") {
                message = message.replacen("map", "date-time", 1);
            }
            let (line, col) = line_col(text, span.start);
            let key = toml::from_str::<Node>(text)
                .ok()
                .and_then(|root| root.path_at(span.start));
            (Some(line), Some(col), key)
        }
        None => (None, None, None),
    };
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        key,
        message,
    }
}

/// 1-based line and character column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// The document as a tree of spanned keys and values, parsed only to name the key of a serde
/// error (toml reports where, not which key).
#[derive(Default)]
struct Node {
    /// (path component, key span, value span, value); array elements use `[i]` and their value span as key span.
    children: Vec<(String, Range<usize>, Range<usize>, Node)>,
}

impl Node {
    /// Dotted path of the innermost key or value containing `offset`.
    fn path_at(&self, offset: usize) -> Option<String> {
        let mut best: Option<(usize, String)> = None;
        self.search(offset, "", &mut best);
        best.map(|(_, p)| p)
    }

    fn search(&self, offset: usize, prefix: &str, best: &mut Option<(usize, String)>) {
        for (name, key_span, value_span, child) in &self.children {
            let path = if name.starts_with('[') || prefix.is_empty() {
                format!("{prefix}{name}")
            } else {
                format!("{prefix}.{name}")
            };
            for span in [key_span, value_span] {
                // `<=` for ends so that an error at the end of an empty table still matches it.
                let contains = span.start <= offset
                    && (offset < span.end || (span.is_empty() && offset == span.end));
                let len = span.end - span.start;
                if contains && best.as_ref().is_none_or(|(l, _)| len <= *l) {
                    *best = Some((len, path.clone()));
                }
            }
            // Children of header tables lie outside their parent's span, so always descend.
            child.search(offset, &path, best);
        }
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Node;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any TOML value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<Node, E> {
                Ok(Node::default())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                let mut node = Node::default();
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    let value = map.next_value::<Spanned<Node>>()?;
                    let (key_span, value_span) = (key.span(), value.span());
                    node.children.push((
                        key.into_inner(),
                        key_span,
                        value_span,
                        value.into_inner(),
                    ));
                }
                Ok(node)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                let mut node = Node::default();
                while let Some(value) = seq.next_element::<Spanned<Node>>()? {
                    let span = value.span();
                    let name = format!("[{}]", node.children.len());
                    node.children
                        .push((name, span.clone(), span, value.into_inner()));
                }
                Ok(node)
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------------
// Semantic validation.

struct Validator<'a> {
    text: &'a str,
    file: &'a Path,
    /// Byte offset where each line starts: line numbers of duplicates are looked up for every
    /// service and real, so they must not rescan the text (a 10,000-real file would be quadratic).
    line_starts: Vec<usize>,
}

impl Validator<'_> {
    fn err(&self, span: Option<Range<usize>>, key: &str, message: String) -> ConfigError {
        let (line, column) = match span {
            Some(s) => {
                let (l, c) = line_col(self.text, s.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: Some(key.to_string()),
            message,
        }
    }

    fn at<T>(&self, v: &Spanned<T>, key: &str, message: String) -> ConfigError {
        self.err(Some(v.span()), key, message)
    }

    fn line(&self, span: Range<usize>) -> usize {
        // The number of line starts at or before the offset is its 1-based line.
        self.line_starts
            .partition_point(|&start| start <= span.start)
    }

    fn config(&self, raw: RawFile) -> Result<Config, ConfigError> {
        let Some(director) = raw.director else {
            return Err(self.err(
                None,
                "director",
                "missing [director] table (it needs at least `interface`)".to_string(),
            ));
        };
        let director = self.director(director)?;
        let pool_blocks = table_blocks(director.table_pool_size);
        let mut pool_used = 0u64;

        let mut services: Vec<ServiceConfig> = Vec::with_capacity(raw.service.len());
        // name -> line, (address, protocol) -> (name, line): to point back at the first one.
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut addresses: HashMap<(SocketAddr, Protocol), (String, usize)> = HashMap::new();
        for (i, raw_service) in raw.service.into_iter().enumerate() {
            let prefix = format!("service[{i}]");
            let name_span = raw_service.get_ref().name.as_ref().map(Spanned::span);
            let addr_span = raw_service.get_ref().address.as_ref().map(Spanned::span);
            let sched_span = raw_service.get_ref().scheduler.as_ref().map(Spanned::span);
            let service = self.service(raw_service, &prefix)?;
            let size = match service.scheduler {
                Scheduler::Sh => xdpvs_common::SH_TABLE_SIZE,
                Scheduler::Mh => service.mh_table_size,
                _ => 0,
            };
            // Both buffers of the service's table (see `dataplane::plan`).
            pool_used += 2 * table_blocks(size);
            if pool_used > pool_blocks {
                return Err(self.err(
                    sched_span,
                    &format!("{prefix}.scheduler"),
                    format!(
                        "the lookup tables of the sh/mh services up to \"{}\" need {} entries \
                         (two buffers of each table, in blocks of {}), more than [director] \
                         table_pool_size ({}): raise it, or lower mh_table_size",
                        service.name,
                        pool_used * xdpvs_common::TABLE_BLOCK as u64,
                        xdpvs_common::TABLE_BLOCK,
                        director.table_pool_size
                    ),
                ));
            }
            if let (Some(&first), Some(span)) = (names.get(&service.name), name_span.clone()) {
                return Err(self.err(
                    Some(span),
                    &format!("{prefix}.name"),
                    format!(
                        "duplicate service name \"{}\" (first defined on line {first})",
                        service.name
                    ),
                ));
            }
            if let Some(span) = name_span {
                names.insert(service.name.clone(), self.line(span));
            }
            let proto_key = (service.address, service.protocol);
            if let (Some((other, first)), Some(span)) =
                (addresses.get(&proto_key), addr_span.clone())
            {
                return Err(self.err(
                    Some(span),
                    &format!("{prefix}.address"),
                    format!(
                        "{} {} is already used by service \"{other}\" (line {first})",
                        service.address,
                        protocol_name(service.protocol)
                    ),
                ));
            }
            if let Some(span) = addr_span {
                addresses.insert(proto_key, (service.name.clone(), self.line(span)));
            }
            services.push(service);
        }

        let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
        let vrrp = crate::ha::config::validate(&raw.vrrp, &names)
            .map_err(|e| self.err(e.span, &e.key, e.message))?;
        let sync = match raw.sync {
            None => None,
            Some(raw) => Some(self.sync(raw)?),
        };

        Ok(Config {
            source: self.file.to_path_buf(),
            director,
            services,
            vrrp,
            sync,
        })
    }

    fn sync(&self, raw: Spanned<RawSync>) -> Result<SyncConfig, ConfigError> {
        let span = raw.span();
        let raw = raw.into_inner();
        let required = |v: Option<Spanned<String>>, key: &str, what: &str| {
            v.ok_or_else(|| {
                self.err(
                    Some(span.clone()),
                    &format!("sync.{key}"),
                    format!("missing required key `{key}` ({what})"),
                )
            })
        };
        let endpoint = |v: &Spanned<String>, key: &str| -> Result<SocketAddr, ConfigError> {
            let key = format!("sync.{key}");
            let s = v.get_ref();
            let a: SocketAddr = s.parse().map_err(|_| {
                self.at(
                    v,
                    &key,
                    format!("\"{s}\" is not an IP:PORT address (e.g. 198.18.0.2:8899)"),
                )
            })?;
            if a.port() == 0 {
                return Err(self.at(v, &key, "port 0 is not allowed".into()));
            }
            Ok(a)
        };
        let listen_v = required(
            raw.listen,
            "listen",
            "the local address:port for the peer's datagrams",
        )?;
        let peer_v = required(raw.peer, "peer", "the peer director's address:port")?;
        let key_v = required(
            raw.key_file,
            "key_file",
            "a file holding the shared 32-byte key",
        )?;
        let listen = endpoint(&listen_v, "listen")?;
        let peer = endpoint(&peer_v, "peer")?;
        if peer.ip().is_unspecified() || peer.ip().is_multicast() {
            return Err(self.at(
                &peer_v,
                "sync.peer",
                format!(
                    "{} is not a unicast address (multicast sync is not supported yet)",
                    peer.ip()
                ),
            ));
        }
        if peer == listen {
            return Err(self.at(
                &peer_v,
                "sync.peer",
                format!("{peer} is this director's own `listen` address"),
            ));
        }
        if listen.is_ipv4() != peer.is_ipv4() {
            return Err(self.at(
                &peer_v,
                "sync.peer",
                format!("{peer} is not in the address family of `listen` ({listen})"),
            ));
        }
        // Relative to the config file, as an operator reading it would expect.
        let given = PathBuf::from(key_v.get_ref());
        let key_file = if given.is_absolute() {
            given
        } else {
            self.file.parent().unwrap_or(Path::new(".")).join(given)
        };
        let key = crate::ha::sync::wire::Key::from_file(&key_file)
            .map_err(|e| self.at(&key_v, "sync.key_file", e.to_string()))?;
        let refresh = match &raw.refresh {
            None => DEFAULT_SYNC_REFRESH,
            Some(v) => self.duration(v, "sync.refresh", Duration::from_secs(3600), "1h")?,
        };
        Ok(SyncConfig {
            listen,
            peer,
            key_file,
            key,
            refresh,
        })
    }

    fn director(&self, raw: Spanned<RawDirector>) -> Result<Director, ConfigError> {
        let span = raw.span();
        let raw = raw.into_inner();

        let Some(interface) = raw.interface else {
            return Err(self.err(
                Some(span),
                "director.interface",
                "missing required key `interface` (the interface XDP attaches to)".to_string(),
            ));
        };
        let name = interface.get_ref();
        if !valid_interface_name(name) {
            return Err(self.at(
                &interface,
                "director.interface",
                format!(
                    "\"{name}\" is not a valid interface name (1..={MAX_IFNAME} characters, no '/', ':' or spaces)"
                ),
            ));
        }

        let xdp_mode = match &raw.xdp_mode {
            None => XdpMode::Auto,
            Some(v) => self.choice(
                v,
                "director.xdp_mode",
                "XDP mode",
                &[
                    ("auto", XdpMode::Auto),
                    ("driver", XdpMode::Driver),
                    ("skb", XdpMode::Skb),
                ],
            )?,
        };

        let metrics = match &raw.metrics {
            None => DEFAULT_METRICS.parse().ok(),
            Some(v) if v.get_ref() == "off" => None,
            Some(v) => match v.get_ref().parse::<SocketAddr>() {
                Ok(a) if a.port() != 0 => Some(a),
                Ok(_) => {
                    return Err(self.at(v, "director.metrics", "port 0 is not allowed".into()))
                }
                Err(_) => {
                    return Err(self.at(
                        v,
                        "director.metrics",
                        format!(
                            "\"{}\" is neither an IP:PORT address nor \"off\"",
                            v.get_ref()
                        ),
                    ))
                }
            },
        };

        let admin_socket = match &raw.admin_socket {
            None => PathBuf::from(DEFAULT_ADMIN_SOCKET),
            Some(v) => {
                let p = v.get_ref();
                if p.is_empty() {
                    return Err(self.at(v, "director.admin_socket", "must not be empty".into()));
                }
                if p.len() > MAX_SOCKET_PATH {
                    return Err(self.at(
                        v,
                        "director.admin_socket",
                        format!(
                            "path is {} bytes long; unix socket paths are limited to {MAX_SOCKET_PATH}",
                            p.len()
                        ),
                    ));
                }
                PathBuf::from(p)
            }
        };

        let conn_table_size = match &raw.conn_table_size {
            None => 262_144,
            Some(v) => self.int(v, "director.conn_table_size", 1024, 16_777_216)? as u32,
        };
        let embryonic_table_size = match &raw.embryonic_table_size {
            None => xdpvs_common::DEFAULT_EMBRYONIC_TABLE_SIZE,
            Some(v) => self.int(v, "director.embryonic_table_size", 1024, 16_777_216)? as u32,
        };
        let table_pool_size = match &raw.table_pool_size {
            None => xdpvs_common::DEFAULT_TABLE_POOL_BLOCKS * xdpvs_common::TABLE_BLOCK as u32,
            Some(v) => self.int(
                v,
                "director.table_pool_size",
                xdpvs_common::TABLE_BLOCK as i64,
                1 << 30,
            )? as u32,
        };

        let mut timeouts = Timeouts::default();
        if let Some(t) = &raw.timeouts {
            let fields = [
                (&t.tcp, "tcp", &mut timeouts.tcp_established),
                (&t.tcp_fin, "tcp_fin", &mut timeouts.tcp_fin),
                (&t.tcp_syn, "tcp_syn", &mut timeouts.tcp_syn),
                (&t.tcp_close, "tcp_close", &mut timeouts.tcp_close),
                (&t.udp, "udp", &mut timeouts.udp),
            ];
            for (value, name, slot) in fields {
                if let Some(v) = value {
                    let key = format!("director.timeouts.{name}");
                    *slot = self.duration(v, &key, MAX_CONN_TIMEOUT, "24h")?;
                }
            }
        }

        let pin_path = match &raw.pin_path {
            None => None,
            Some(v) => {
                let p = Path::new(v.get_ref());
                if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
                    return Err(self.at(
                        v,
                        "director.pin_path",
                        format!(
                            "\"{}\" must be an absolute path without \"..\" (a directory on bpffs, e.g. /sys/fs/bpf/xdpvs/eth0)",
                            v.get_ref()
                        ),
                    ));
                }
                Some(p.to_path_buf())
            }
        };
        let on_exit = match &raw.on_exit {
            None => OnExit::Keep,
            Some(v) => self.choice(
                v,
                "director.on_exit",
                "on_exit action",
                &[("keep", OnExit::Keep), ("detach", OnExit::Detach)],
            )?,
        };

        Ok(Director {
            interface: interface.into_inner(),
            xdp_mode,
            metrics,
            admin_socket,
            watch_config: raw.watch_config.unwrap_or(true),
            conn_table_size,
            embryonic_table_size,
            table_pool_size,
            timeouts,
            pin_path,
            on_exit,
        })
    }

    fn service(
        &self,
        raw: Spanned<RawService>,
        prefix: &str,
    ) -> Result<ServiceConfig, ConfigError> {
        let span = raw.span();
        let raw = raw.into_inner();

        let Some(name) = &raw.name else {
            return Err(self.err(
                Some(span),
                &format!("{prefix}.name"),
                "missing required key `name`".to_string(),
            ));
        };
        let n = name.get_ref();
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return Err(self.at(
                name,
                &format!("{prefix}.name"),
                format!(
                    "\"{n}\" is not a valid service name (1..=64 characters of A-Z a-z 0-9 _ . -)"
                ),
            ));
        }
        // From here on, messages name the service: operators think in names, not indexes.
        let key = |k: &str| format!("{prefix}.{k}");

        let Some(address) = &raw.address else {
            return Err(self.err(
                Some(span),
                &key("address"),
                format!("missing required key `address` (the VIP:PORT of service \"{n}\")"),
            ));
        };
        let vip = self.vip(address, &key("address"))?;

        let protocol = match &raw.protocol {
            None => Protocol::Tcp,
            Some(v) => self.choice(
                v,
                &key("protocol"),
                "protocol",
                &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)],
            )?,
        };
        let scheduler = match &raw.scheduler {
            None => Scheduler::Wlc,
            Some(v) => self.choice(
                v,
                &key("scheduler"),
                "scheduler",
                &[
                    ("wlc", Scheduler::Wlc),
                    ("lc", Scheduler::Lc),
                    ("rr", Scheduler::Rr),
                    ("wrr", Scheduler::Wrr),
                    ("sh", Scheduler::Sh),
                    ("mh", Scheduler::Mh),
                ],
            )?,
        };
        let forwarding = match &raw.forwarding {
            None => Forwarding::Dr,
            Some(v) => self.choice(
                v,
                &key("forwarding"),
                "forwarding method",
                &[
                    ("dr", Forwarding::Dr),
                    ("nat", Forwarding::Nat),
                    ("tunnel", Forwarding::Tunnel(Encap::Ipip)),
                ],
            )?,
        };
        let forwarding = self.encap(&raw, forwarding, prefix)?;

        let on_failure = match &raw.on_failure {
            None => OnFailure::Quiesce,
            Some(v) => self.choice(
                v,
                &key("on_failure"),
                "on_failure action",
                &[
                    ("quiesce", OnFailure::Quiesce),
                    ("remove", OnFailure::Remove),
                ],
            )?,
        };
        let on_remove = match &raw.on_remove {
            None => OnRemove::Drain,
            Some(v) => self.choice(
                v,
                &key("on_remove"),
                "on_remove action",
                &[("drain", OnRemove::Drain), ("cut", OnRemove::Cut)],
            )?,
        };
        let (mh_table_size, sh_port, sh_fallback) = self.hashing(&raw, scheduler, prefix)?;

        let check = match &raw.check {
            None => CheckConfig::default_tcp(),
            Some(c) => {
                let ck = key("check");
                if c.get_ref().kind.is_none() {
                    return Err(self.at(
                        c,
                        &format!("{ck}.type"),
                        format!("missing required key `type` (one of {CHECK_TYPES})"),
                    ));
                }
                let mut check = CheckConfig::default_tcp();
                self.apply_check(&mut check, c.get_ref(), &ck)?;
                self.finish_check(&check, c, &ck)?;
                check
            }
        };

        if raw.real.len() > MAX_REALS {
            let extra = &raw.real[MAX_REALS];
            return Err(self.at(
                extra,
                &key("real"),
                format!(
                    "service \"{n}\" has {} reals; at most {MAX_REALS} are supported",
                    raw.real.len()
                ),
            ));
        }

        let mut reals: Vec<RealConfig> = Vec::with_capacity(raw.real.len());
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        for (j, raw_real) in raw.real.iter().enumerate() {
            let rk = format!("{prefix}.real[{j}]");
            let r = raw_real.get_ref();
            let Some(addr) = &r.address else {
                return Err(self.at(
                    raw_real,
                    &format!("{rk}.address"),
                    "missing required key `address`".to_string(),
                ));
            };
            let address = self.backend(addr, &format!("{rk}.address"), vip, forwarding, "real")?;
            if let Some(first) = seen.get(&address) {
                return Err(self.at(
                    addr,
                    &format!("{rk}.address"),
                    format!("duplicate real {address} (first defined on line {first})"),
                ));
            }
            seen.insert(address, self.line(addr.span()));
            let weight = match &r.weight {
                None => 1,
                Some(w) => self.int(w, &format!("{rk}.weight"), 0, 65_535)? as u32,
            };
            let real_check = match &r.check {
                None => check.clone(),
                Some(c) => {
                    let ck = format!("{rk}.check");
                    let mut merged = check.clone();
                    self.apply_check(&mut merged, c.get_ref(), &ck)?;
                    self.finish_check(&merged, c, &ck)?;
                    merged
                }
            };
            reals.push(RealConfig {
                address,
                weight,
                check: real_check,
            });
        }

        let fallback = match &raw.fallback {
            None => None,
            Some(f) => {
                let fk = key("fallback");
                let a = self.backend(f, &fk, vip, forwarding, "fallback")?;
                if let Some(line) = seen.get(&a) {
                    return Err(self.at(
                        f,
                        &fk,
                        format!("fallback {a} is also a real (line {line}); a sorry server must be a separate address"),
                    ));
                }
                Some(a)
            }
        };

        let persistence = self.persistence(&raw, vip, prefix)?;

        Ok(ServiceConfig {
            name: n.clone(),
            address: vip,
            protocol,
            scheduler,
            mh_table_size,
            sh_port,
            sh_fallback,
            forwarding,
            on_failure,
            on_remove,
            fallback,
            persistence,
            check,
            reals,
        })
    }

    /// `persistence` (whole seconds, up to a week) and `persistence_mask` (a prefix length of
    /// the VIP's family; only with `persistence`).
    fn persistence(
        &self,
        raw: &RawService,
        vip: SocketAddr,
        prefix: &str,
    ) -> Result<Option<Persistence>, ConfigError> {
        let max_prefix: i64 = if vip.is_ipv4() { 32 } else { 128 };
        let Some(t) = &raw.persistence else {
            if let Some(m) = &raw.persistence_mask {
                return Err(self.at(
                    m,
                    &format!("{prefix}.persistence_mask"),
                    "persistence_mask needs persistence (the template timeout) to be set"
                        .to_string(),
                ));
            }
            return Ok(None);
        };
        let key = format!("{prefix}.persistence");
        let timeout = self.duration(t, &key, Duration::from_secs(7 * 86_400), "168h")?;
        if timeout.subsec_nanos() != 0 {
            return Err(self.at(
                t,
                &key,
                format!(
                    "\"{}\" is not a whole number of seconds (templates expire in seconds, as IPVS's)",
                    t.get_ref().0
                ),
            ));
        }
        let prefix_len = match &raw.persistence_mask {
            None => max_prefix,
            Some(m) => self.int(m, &format!("{prefix}.persistence_mask"), 1, max_prefix)?,
        };
        Ok(Some(Persistence {
            timeout,
            prefix: prefix_len as u8,
        }))
    }

    /// `tunnel` (`ipip`, the default, or `gue`) and `tunnel_port` (GUE's UDP port, required
    /// with it), for `forwarding = "tunnel"` only.
    fn encap(
        &self,
        raw: &RawService,
        forwarding: Forwarding,
        prefix: &str,
    ) -> Result<Forwarding, ConfigError> {
        if !matches!(forwarding, Forwarding::Tunnel(_)) {
            if let Some(t) = &raw.tunnel {
                return Err(self.at(
                    t,
                    &format!("{prefix}.tunnel"),
                    "tunnel needs forwarding = \"tunnel\"".to_string(),
                ));
            }
            if let Some(p) = &raw.tunnel_port {
                return Err(self.at(
                    p,
                    &format!("{prefix}.tunnel_port"),
                    "tunnel_port needs forwarding = \"tunnel\" and tunnel = \"gue\"".to_string(),
                ));
            }
            return Ok(forwarding);
        }
        let gue = match &raw.tunnel {
            None => None,
            Some(t) => self
                .choice(
                    t,
                    &format!("{prefix}.tunnel"),
                    "tunnel type",
                    &[("ipip", false), ("gue", true)],
                )?
                .then_some(t),
        };
        match (gue, &raw.tunnel_port) {
            (None, None) => Ok(Forwarding::Tunnel(Encap::Ipip)),
            (None, Some(p)) => Err(self.at(
                p,
                &format!("{prefix}.tunnel_port"),
                "tunnel_port is GUE's UDP port; set tunnel = \"gue\" or remove it".to_string(),
            )),
            (Some(_), Some(p)) => {
                let port = self.int(p, &format!("{prefix}.tunnel_port"), 1, 65_535)? as u16;
                Ok(Forwarding::Tunnel(Encap::Gue { port }))
            }
            (Some(t), None) => Err(self.at(
                t,
                &format!("{prefix}.tunnel_port"),
                "tunnel = \"gue\" needs tunnel_port (the UDP port the reals' fou listens on)"
                    .to_string(),
            )),
        }
    }

    /// The hashing schedulers' keys: `mh_table_size` (mh: a prime above the number of reals,
    /// at most 131,071 like IPVS's largest), `sh_port` and `sh_fallback` (sh). Each is refused
    /// with another scheduler, where it would silently mean nothing.
    fn hashing(
        &self,
        raw: &RawService,
        scheduler: Scheduler,
        prefix: &str,
    ) -> Result<(u32, bool, bool), ConfigError> {
        let mut size = crate::maglev::DEFAULT_SIZE;
        if let Some(v) = &raw.mh_table_size {
            let key = format!("{prefix}.mh_table_size");
            if scheduler != Scheduler::Mh {
                return Err(self.at(
                    v,
                    &key,
                    "mh_table_size applies only to scheduler = \"mh\"".into(),
                ));
            }
            let n = self.int(v, &key, 2, 131_071)? as u32;
            if !crate::maglev::is_prime(n) {
                return Err(self.at(
                    v,
                    &key,
                    format!("{n} is not a prime (Maglev needs a prime table size, e.g. 251, 1021, 4093, 65537)"),
                ));
            }
            if n as usize <= raw.real.len() {
                return Err(self.at(
                    v,
                    &key,
                    format!(
                        "{n} entries do not exceed the service's {} reals (Maglev needs more entries than reals)",
                        raw.real.len()
                    ),
                ));
            }
            size = n;
        }
        let flag = |v: &Option<Spanned<bool>>, name: &str| -> Result<bool, ConfigError> {
            match v {
                None => Ok(false),
                Some(b) if scheduler != Scheduler::Sh => Err(self.at(
                    b,
                    &format!("{prefix}.{name}"),
                    format!("{name} applies only to scheduler = \"sh\""),
                )),
                Some(b) => Ok(*b.get_ref()),
            }
        };
        let sh_port = flag(&raw.sh_port, "sh_port")?;
        let sh_fallback = flag(&raw.sh_fallback, "sh_fallback")?;
        Ok((size, sh_port, sh_fallback))
    }

    /// The service's VIP: IP and port, both required.
    fn vip(&self, v: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        let s = v.get_ref();
        let addr = match s.parse::<SocketAddr>() {
            Ok(a) => a,
            Err(_) if s.parse::<IpAddr>().is_ok() => {
                return Err(self.at(
                    v,
                    key,
                    format!("\"{s}\" has no port; a service address is VIP:PORT"),
                ))
            }
            Err(_) => {
                return Err(self.at(
                    v,
                    key,
                    format!(
                        "\"{s}\" is not a valid address (expected VIP:PORT, e.g. 198.18.0.100:80)"
                    ),
                ))
            }
        };
        self.usable_ip(v, key, addr.ip())?;
        if addr.port() == 0 {
            return Err(self.at(v, key, "port 0 is not allowed".to_string()));
        }
        Ok(addr)
    }

    /// A real or the fallback: the port defaults to the VIP's, the family must match the VIP's,
    /// and DR cannot rewrite the port.
    fn backend(
        &self,
        v: &Spanned<String>,
        key: &str,
        vip: SocketAddr,
        forwarding: Forwarding,
        what: &str,
    ) -> Result<SocketAddr, ConfigError> {
        let s = v.get_ref();
        let addr = match (s.parse::<SocketAddr>(), s.parse::<IpAddr>()) {
            (Ok(a), _) => a,
            (_, Ok(ip)) => SocketAddr::new(ip, vip.port()),
            _ => {
                return Err(self.at(
                    v,
                    key,
                    format!(
                    "\"{s}\" is not a valid address (expected IP or IP:PORT, e.g. 198.18.0.11:80)"
                ),
                ))
            }
        };
        if addr.is_ipv4() != vip.is_ipv4() {
            let fam = |a: &SocketAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
            return Err(self.at(
                v,
                key,
                format!(
                    "{what} {s} is {} but the VIP {vip} is {}: a service's VIP and reals must be \
                     one address family (xdpvs does not translate between IPv4 and IPv6)",
                    fam(&addr),
                    fam(&vip)
                ),
            ));
        }
        self.usable_ip(v, key, addr.ip())?;
        if addr.port() == 0 {
            return Err(self.at(v, key, "port 0 is not allowed".to_string()));
        }
        if addr == vip {
            return Err(self.at(v, key, format!("{what} {addr} is the VIP itself")));
        }
        if forwarding != Forwarding::Nat && addr.port() != vip.port() {
            let method = if forwarding == Forwarding::Dr {
                "dr"
            } else {
                "tunnel"
            };
            return Err(self.at(
                v,
                key,
                format!(
                    "{method} forwarding cannot change the port; {what} port {} differs from the VIP port {} (omit the port or use {})",
                    addr.port(),
                    vip.port(),
                    vip.port()
                ),
            ));
        }
        Ok(addr)
    }

    fn usable_ip(&self, v: &Spanned<String>, key: &str, ip: IpAddr) -> Result<(), ConfigError> {
        match ip {
            IpAddr::V6(ip6) if ip6.is_unspecified() || ip6.is_multicast() => {
                Err(self.at(v, key, format!("{ip} is not a unicast address")))
            }
            // ::ffff:a.b.c.d is an IPv4 address in IPv6 clothing; the packets carry the IPv4 one.
            IpAddr::V6(ip6) if ip6.to_ipv4_mapped().is_some() => Err(self.at(
                v,
                key,
                format!(
                    "{ip} is an IPv4-mapped address; write the IPv4 address {} instead",
                    ip6.to_ipv4_mapped()
                        .map_or_else(String::new, |a| a.to_string())
                ),
            )),
            IpAddr::V6(_) => Ok(()),
            IpAddr::V4(ip4) if ip4.is_unspecified() || ip4.is_multicast() || ip4.is_broadcast() => {
                Err(self.at(v, key, format!("{ip} is not a unicast address")))
            }
            IpAddr::V4(_) => Ok(()),
        }
    }

    /// Applies the keys present in `raw` on top of `check`, validating each.
    fn apply_check(
        &self,
        check: &mut CheckConfig,
        raw: &RawCheck,
        prefix: &str,
    ) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        if let Some(v) = &raw.kind {
            check.kind = self.choice(
                v,
                &key("type"),
                "check type",
                &[
                    ("tcp", CheckKind::Tcp),
                    ("http", CheckKind::Http),
                    ("https", CheckKind::Https),
                    ("exec", CheckKind::Exec),
                    ("dns", CheckKind::Dns),
                    ("none", CheckKind::None),
                    ("off", CheckKind::Off),
                ],
            )?;
        }
        if let Some(v) = &raw.interval {
            check.interval = self.duration(v, &key("interval"), MAX_CHECK_DURATION, "1h")?;
        }
        if let Some(v) = &raw.timeout {
            check.timeout = self.duration(v, &key("timeout"), MAX_CHECK_DURATION, "1h")?;
        }
        if let Some(v) = &raw.rise {
            check.rise = self.int(v, &key("rise"), 1, 100)? as u32;
        }
        if let Some(v) = &raw.fall {
            check.fall = self.int(v, &key("fall"), 1, 100)? as u32;
        }
        if let Some(v) = &raw.port {
            check.port = Some(self.int(v, &key("port"), 1, 65_535)? as u16);
        }
        if let Some(v) = &raw.path {
            if !v.get_ref().starts_with('/') {
                return Err(self.at(
                    v,
                    &key("path"),
                    format!("\"{}\" must start with '/'", v.get_ref()),
                ));
            }
            if v.get_ref()
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(self.at(
                    v,
                    &key("path"),
                    "must not contain spaces or control characters (percent-encode them)".into(),
                ));
            }
            check.path = v.get_ref().clone();
        }
        if let Some(v) = &raw.host {
            check.host = Some(self.word(v, &key("host"))?);
        }
        if let Some(v) = &raw.expect_status {
            if v.get_ref().is_empty() {
                return Err(self.at(
                    v,
                    &key("expect_status"),
                    "must list at least one status code".into(),
                ));
            }
            let mut codes = Vec::with_capacity(v.get_ref().len());
            for (i, code) in v.get_ref().iter().enumerate() {
                codes.push(
                    self.int(code, &format!("{}[{i}]", key("expect_status")), 100, 599)? as u16,
                );
            }
            check.expect_status = codes;
        }
        if let Some(v) = &raw.expect_body {
            match regex::Regex::new(v.get_ref()) {
                Ok(re) => check.expect_body = Some(re),
                Err(e) => {
                    return Err(self.at(
                        v,
                        &key("expect_body"),
                        format!("invalid regex \"{}\": {}", v.get_ref(), regex_message(&e)),
                    ))
                }
            }
        }
        if let Some(v) = raw.tls_verify {
            check.tls_verify = v;
        }
        if let Some(v) = &raw.sni {
            check.sni = Some(self.word(v, &key("sni"))?);
        }
        if let Some(v) = &raw.ca_file {
            // Relative to the config file, as an operator reading it would expect.
            let given = PathBuf::from(v.get_ref());
            let path = if given.is_absolute() {
                given
            } else {
                self.file.parent().unwrap_or(Path::new(".")).join(given)
            };
            check.ca_file = Some(
                crate::config::CaFile::read(&path).map_err(|e| self.at(v, &key("ca_file"), e))?,
            );
        }
        if let Some(v) = &raw.command {
            if v.get_ref().trim().is_empty() {
                return Err(self.at(v, &key("command"), "must not be empty".into()));
            }
            check.command = Some(v.get_ref().clone());
        }
        if let Some(v) = &raw.dns_query {
            check.dns_query = self.word(v, &key("dns_query"))?;
        }
        if let Some(v) = &raw.initially {
            check.initially = self.choice(
                v,
                &key("initially"),
                "initial state",
                &[("up", Initially::Up), ("down", Initially::Down)],
            )?;
        }
        if let Some(v) = &raw.max_body {
            check.max_body = self.int(v, &key("max_body"), 1, 16_777_216)? as usize;
        }
        Ok(())
    }

    /// Rules that involve several keys, checked on the merged result.
    fn finish_check(
        &self,
        check: &CheckConfig,
        table: &Spanned<RawCheck>,
        prefix: &str,
    ) -> Result<(), ConfigError> {
        if check.kind == CheckKind::Exec && check.command.is_none() {
            // Point at the `type = "exec"` line when this table has it, else at the table.
            let span = table
                .get_ref()
                .kind
                .as_ref()
                .map_or_else(|| table.span(), Spanned::span);
            return Err(self.err(
                Some(span),
                &format!("{prefix}.command"),
                "a check of type \"exec\" needs `command`".to_string(),
            ));
        }
        Ok(())
    }

    /// A non-empty string without whitespace (host names, SNI, DNS names).
    fn word(&self, v: &Spanned<String>, key: &str) -> Result<String, ConfigError> {
        let s = v.get_ref();
        if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.at(
                v,
                key,
                format!("\"{s}\" must be non-empty and contain no spaces"),
            ));
        }
        Ok(s.clone())
    }

    fn int(&self, v: &Spanned<i64>, key: &str, min: i64, max: i64) -> Result<i64, ConfigError> {
        let n = *v.get_ref();
        if n < min || n > max {
            return Err(self.at(v, key, format!("{n} is out of range ({min}..={max})")));
        }
        Ok(n)
    }

    fn choice<T: Copy>(
        &self,
        v: &Spanned<String>,
        key: &str,
        what: &str,
        options: &[(&str, T)],
    ) -> Result<T, ConfigError> {
        if let Some((_, t)) = options.iter().find(|(name, _)| *name == v.get_ref()) {
            return Ok(*t);
        }
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        Err(self.at(
            v,
            key,
            format!(
                "unknown {what} \"{}\" (expected one of {})",
                v.get_ref(),
                names.join(", ")
            ),
        ))
    }

    fn duration(
        &self,
        v: &Spanned<DurationText>,
        key: &str,
        max: Duration,
        max_text: &str,
    ) -> Result<Duration, ConfigError> {
        let s = &v.get_ref().0;
        let d = parse_duration(s).map_err(|m| self.at(v, key, m))?;
        if d.is_zero() {
            return Err(self.at(v, key, format!("\"{s}\" must be greater than 0")));
        }
        if d > max {
            return Err(self.at(
                v,
                key,
                format!("\"{s}\" is longer than the maximum of {max_text}"),
            ));
        }
        Ok(d)
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

/// regex's syntax errors are a multi-line diagram; keep the one line that says what is wrong.
fn regex_message(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map_or_else(
            || text.lines().map(str::trim).collect::<Vec<_>>().join("; "),
            str::to_string,
        )
}

/// A name the kernel accepts for a network interface.
pub(crate) fn valid_interface_name(name: &str) -> bool {
    !(name.is_empty()
        || name.len() > MAX_IFNAME
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace()))
}

/// Parses `<number><unit>`: an integer or decimal number and one of `ms`, `s`, `m`, `h`.
/// Compound forms (`1h30m`) are refused: one unit keeps configs easy to read and compare.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    const HINT: &str =
        "expected a number and a unit (ms, s, m or h), e.g. \"500ms\", \"1.5s\", \"2m\"";
    if s.starts_with('-') {
        return Err(format!(
            "\"{s}\" is negative; durations must be greater than 0"
        ));
    }
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(format!("\"{s}\" is not a duration; {HINT}"));
    }
    let unit_nanos: u128 = match unit {
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        "" => return Err(format!("\"{s}\" has no unit; {HINT}")),
        _ => {
            return Err(format!(
                "\"{s}\" has an unknown unit \"{unit}\" (combined units such as \"1h30m\" are not supported); {HINT}"
            ))
        }
    };
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if int_part.is_empty()
        || (number.contains('.') && frac_part.is_empty())
        || frac_part.contains('.')
        || int_part.len() > 12
        || frac_part.len() > 9
    {
        return Err(format!("\"{s}\" is not a duration; {HINT}"));
    }
    let parse = |t: &str| {
        t.parse::<u128>()
            .map_err(|_| format!("\"{s}\" is not a duration; {HINT}"))
    };
    let mut nanos = parse(int_part)? * unit_nanos;
    if !frac_part.is_empty() {
        let scale = 10u128.pow(frac_part.len() as u32);
        nanos += parse(frac_part)? * unit_nanos / scale;
    }
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| format!("\"{s}\" is too long"))?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "[director]\ninterface = \"d0\"\n";

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("test.toml"))
    }

    /// 1-based line of the `nth` (0-based) line containing `needle`.
    fn line_of(text: &str, needle: &str, nth: usize) -> usize {
        text.lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .nth(nth)
            .map(|(i, _)| i + 1)
            .unwrap_or_else(|| panic!("{needle:?} not in test text"))
    }

    /// Asserts an error on the line of the `nth` line containing `at`, whose key contains `key`
    /// and whose message contains `msg`.
    fn expect_err(text: &str, at: (&str, usize), key: &str, msg: &str) -> ConfigError {
        let e = match parse_str(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e,
        };
        let shown = e.to_string();
        assert_eq!(e.line, Some(line_of(text, at.0, at.1)), "line of: {shown}");
        assert!(e.column.is_some(), "column: {shown}");
        let k = e.key.as_deref().unwrap_or("");
        assert!(k.contains(key), "key {key:?} not in: {shown}");
        assert!(e.message.contains(msg), "message {msg:?} not in: {shown}");
        assert!(!e.message.contains('\n'), "multi-line message: {shown}");
        e
    }

    fn svc(body: &str) -> String {
        format!("{HEAD}\n[[service]]\nname = \"web\"\naddress = \"198.18.0.100:80\"\n{body}")
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn full_config() {
        let text = r#"
[director]
interface = "eth1"
xdp_mode = "driver"
metrics = "off"
admin_socket = "/tmp/x.sock"
watch_config = false
conn_table_size = 4096
pin_path = "/sys/fs/bpf/test"
on_exit = "detach"

[director.timeouts]
tcp = "15m"
udp = "1.5s"

[[service]]
name = "web"
address = "198.18.0.100:80"
scheduler = "rr"
on_failure = "remove"
on_remove = "cut"
fallback = "198.18.0.9"

[service.check]
type = "http"
interval = "500ms"
timeout = "0.25s"
rise = 1
fall = 5
path = "/health"
host = "www.example.com"
expect_status = [200, 204]
expect_body = "^OK"
initially = "down"
max_body = 1024

[[service.real]]
address = "198.18.0.11:80"

[[service.real]]
address = "198.18.0.12"
weight = 0
[service.real.check]
type = "https"
port = 8443
tls_verify = false
sni = "internal"

[[service]]
name = "dns.udp"
address = "198.18.0.100:53"
protocol = "udp"
scheduler = "rr"
"#;
        let c = parse_str(text).unwrap();
        assert_eq!(c.source, PathBuf::from("test.toml"));
        assert_eq!(
            c.director,
            Director {
                interface: "eth1".into(),
                xdp_mode: XdpMode::Driver,
                metrics: None,
                admin_socket: "/tmp/x.sock".into(),
                watch_config: false,
                conn_table_size: 4096,
                embryonic_table_size: 131_072,
                table_pool_size: 8 << 20,
                timeouts: Timeouts {
                    tcp_established: Duration::from_secs(900),
                    udp: Duration::from_millis(1500),
                    ..Timeouts::default()
                },
                pin_path: Some("/sys/fs/bpf/test".into()),
                on_exit: OnExit::Detach,
            }
        );
        let check = CheckConfig {
            kind: CheckKind::Http,
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(250),
            rise: 1,
            fall: 5,
            path: "/health".into(),
            host: Some("www.example.com".into()),
            expect_status: vec![200, 204],
            expect_body: Some(regex::Regex::new("^OK").unwrap()),
            initially: Initially::Down,
            max_body: 1024,
            ..CheckConfig::default_tcp()
        };
        let override_check = CheckConfig {
            kind: CheckKind::Https,
            port: Some(8443),
            tls_verify: false,
            sni: Some("internal".into()),
            ..check.clone()
        };
        assert_eq!(c.services.len(), 2);
        assert_eq!(
            c.services[0],
            ServiceConfig {
                name: "web".into(),
                address: sa("198.18.0.100:80"),
                protocol: Protocol::Tcp,
                scheduler: Scheduler::Rr,
                mh_table_size: 65_537,
                sh_port: false,
                sh_fallback: false,
                forwarding: Forwarding::Dr,
                on_failure: OnFailure::Remove,
                on_remove: OnRemove::Cut,
                fallback: Some(sa("198.18.0.9:80")),
                persistence: None,
                check: check.clone(),
                reals: vec![
                    RealConfig {
                        address: sa("198.18.0.11:80"),
                        weight: 1,
                        check: check.clone(),
                    },
                    RealConfig {
                        address: sa("198.18.0.12:80"),
                        weight: 0,
                        check: override_check,
                    },
                ],
            }
        );
        assert_eq!(
            c.services[1],
            ServiceConfig {
                name: "dns.udp".into(),
                address: sa("198.18.0.100:53"),
                protocol: Protocol::Udp,
                scheduler: Scheduler::Rr,
                mh_table_size: 65_537,
                sh_port: false,
                sh_fallback: false,
                forwarding: Forwarding::Dr,
                on_failure: OnFailure::Quiesce,
                on_remove: OnRemove::Drain,
                fallback: None,
                persistence: None,
                check: CheckConfig::default_tcp(),
                reals: vec![],
            }
        );
        assert!(c.service("dns.udp").is_some());
    }

    #[test]
    fn minimal_director_defaults() {
        let c = parse_str(HEAD).unwrap();
        assert_eq!(
            c.director,
            Director {
                interface: "d0".into(),
                xdp_mode: XdpMode::Auto,
                metrics: Some(sa(DEFAULT_METRICS)),
                admin_socket: DEFAULT_ADMIN_SOCKET.into(),
                watch_config: true,
                conn_table_size: 262_144,
                embryonic_table_size: 131_072,
                table_pool_size: 8 << 20,
                timeouts: Timeouts::default(),
                pin_path: None,
                on_exit: OnExit::Keep,
            }
        );
        assert!(c.services.is_empty());
    }

    #[test]
    fn example_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let example = Config::load(&dir.join("example.toml")).unwrap();
        assert_eq!(example.services.len(), 3);
        let web6 = example.service("web6").unwrap();
        assert_eq!(web6.address, sa("[2001:db8::100]:80"));
        assert_eq!(web6.reals[1].address, sa("[2001:db8::12]:80"));
        let lab = Config::load(&dir.join("lab.toml")).unwrap();
        assert_eq!(lab.director.interface, "d0");
        assert_eq!(lab.director.metrics, Some(sa("127.0.0.1:9469")));
        assert_eq!(
            lab.director.admin_socket,
            PathBuf::from("/run/xdpvs/lab.sock")
        );
        let web = lab.service("web").unwrap();
        assert_eq!(web.address, sa("198.18.0.100:80"));
        assert_eq!(
            (web.protocol, web.scheduler, web.forwarding),
            (Protocol::Tcp, Scheduler::Wlc, Forwarding::Dr)
        );
        let reals: Vec<(SocketAddr, u32)> =
            web.reals.iter().map(|r| (r.address, r.weight)).collect();
        assert_eq!(
            reals,
            vec![
                (sa("198.18.0.11:80"), 1),
                (sa("198.18.0.12:80"), 2),
                (sa("198.18.0.13:80"), 3)
            ]
        );
    }

    #[test]
    fn display_format() {
        let text = svc("[[service.real]]\naddress = \"198.18.0.11\"\nweight = 70000\n");
        let e = parse(&text, Path::new("web.toml")).unwrap_err();
        let line = line_of(&text, "weight = 70000", 0);
        assert_eq!(
            e.to_string(),
            format!(
                "web.toml:{line}:10: service[0].real[0].weight: 70000 is out of range (0..=65535)"
            )
        );
        let io = ConfigError::io(
            Path::new("/nope.toml"),
            &std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(io.to_string(), "/nope.toml: entity not found");
    }

    #[test]
    fn syntax_error() {
        let text = format!("{HEAD}xdp_mode = = \"auto\"\n");
        let e = parse_str(&text).unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(e.key.is_none());
        assert!(!e.message.contains('\n'));
    }

    #[test]
    fn pin_path_and_on_exit_are_checked() {
        expect_err(
            &format!("{HEAD}pin_path = \"xdpvs/eth0\"\n"),
            ("pin_path", 0),
            "director.pin_path",
            "must be an absolute path",
        );
        expect_err(
            &format!("{HEAD}pin_path = \"/sys/fs/bpf/../etc\"\n"),
            ("pin_path", 0),
            "director.pin_path",
            "without \"..\"",
        );
        expect_err(
            &format!("{HEAD}on_exit = \"remove\"\n"),
            ("on_exit", 0),
            "director.on_exit",
            "unknown on_exit action \"remove\"",
        );
    }

    #[test]
    fn unknown_keys() {
        expect_err(
            &format!("{HEAD}wach_config = true\n"),
            ("wach", 0),
            "director.wach_config",
            "unknown field `wach_config`",
        );
        expect_err(
            &format!("{HEAD}[extra]\n"),
            ("[extra]", 0),
            "extra",
            "unknown field `extra`",
        );
        let text = svc("[[service.real]]\naddress = \"198.18.0.11\"\nwieght = 2\n");
        expect_err(
            &text,
            ("wieght", 0),
            "service[0].real[0].wieght",
            "unknown field `wieght`",
        );
        let text = svc("[service.check]\ntype = \"tcp\"\nretries = 2\n");
        expect_err(
            &text,
            ("retries", 0),
            "service[0].check.retries",
            "unknown field",
        );
        let text = svc("[[service.real]]\naddress = \"198.18.0.11\"\n[service.real.check]\nintervall = \"1s\"\n");
        expect_err(
            &text,
            ("intervall", 0),
            "service[0].real[0].check.intervall",
            "unknown field",
        );
    }

    #[test]
    fn wrong_types() {
        expect_err(
            &format!("{HEAD}watch_config = \"yes\"\n"),
            ("watch_config", 0),
            "director.watch_config",
            "invalid type",
        );
        let text = svc("[[service.real]]\naddress = \"198.18.0.11\"\nweight = \"2\"\n");
        expect_err(
            &text,
            ("weight", 0),
            "service[0].real[0].weight",
            "invalid type",
        );
        let text = svc("real = [{ address = \"198.18.0.11\" }, { address = 7 }]\n");
        expect_err(
            &text,
            ("real = ", 0),
            "service[0].real[1].address",
            "invalid type",
        );
        let text = svc("[service.check]\ntype = \"tcp\"\ninterval = 2\n");
        expect_err(
            &text,
            ("interval", 0),
            "service[0].check.interval",
            "has no unit",
        );
    }

    #[test]
    fn missing_required() {
        let e = parse_str("").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("director"));
        assert_eq!(e.line, None);
        expect_err(
            "[director]\nxdp_mode = \"skb\"\n",
            ("[director]", 0),
            "director.interface",
            "missing required key",
        );
        let text = format!("{HEAD}[[service]]\nname = \"web\"\n");
        expect_err(
            &text,
            ("[[service]]", 0),
            "service[0].address",
            "missing required key",
        );
        let text = format!("{HEAD}[[service]]\naddress = \"198.18.0.100:80\"\n");
        expect_err(
            &text,
            ("[[service]]", 0),
            "service[0].name",
            "missing required key",
        );
        let text = svc("[[service.real]]\nweight = 2\n");
        expect_err(
            &text,
            ("[[service.real]]", 0),
            "service[0].real[0].address",
            "missing required key",
        );
        let text = svc("[service.check]\ninterval = \"1s\"\n");
        expect_err(
            &text,
            ("[service.check]", 0),
            "service[0].check.type",
            "missing required key `type`",
        );
    }

    #[test]
    fn bad_addresses() {
        let text = format!("{HEAD}[[service]]\nname = \"web\"\naddress = \"198.18.0.300:80\"\n");
        expect_err(
            &text,
            ("address", 0),
            "service[0].address",
            "not a valid address",
        );
        let text = format!("{HEAD}[[service]]\nname = \"web\"\naddress = \"198.18.0.100\"\n");
        expect_err(&text, ("address", 0), "service[0].address", "no port");
        let text = svc("[[service.real]]\naddress = \"real1\"\n");
        expect_err(
            &text,
            ("real1", 0),
            "service[0].real[0].address",
            "not a valid address",
        );
        let text = svc("[[service.real]]\naddress = \"198.18.0.100\"\n");
        expect_err(
            &text,
            ("198.18.0.100\"", 0),
            "service[0].real[0].address",
            "is the VIP itself",
        );
        expect_err(
            &format!("{HEAD}metrics = \"localhost\"\n"),
            ("metrics", 0),
            "director.metrics",
            "nor \"off\"",
        );
    }

    #[test]
    fn tunnels() {
        let v6 = format!(
            "{HEAD}[[service]]\nname = \"web\"\naddress = \"[2001:2::100]:80\"\nforwarding = \"tunnel\"\n\
             [[service.real]]\naddress = \"[2001:2::11]:80\"\n"
        );
        assert_eq!(
            parse_str(&v6).unwrap().services[0].forwarding,
            Forwarding::Tunnel(Encap::Ipip),
            "IPv6 in IPv6"
        );
        let real = "[[service.real]]\naddress = \"198.18.0.11:80\"\n";
        let cfg = parse_str(&svc(&format!("forwarding = \"tunnel\"\n{real}"))).unwrap();
        assert_eq!(cfg.services[0].forwarding, Forwarding::Tunnel(Encap::Ipip));
        let cfg = parse_str(&svc(&format!(
            "forwarding = \"tunnel\"\ntunnel = \"gue\"\ntunnel_port = 6080\n{real}"
        )))
        .unwrap();
        assert_eq!(
            cfg.services[0].forwarding,
            Forwarding::Tunnel(Encap::Gue { port: 6080 })
        );
        expect_err(
            &svc("forwarding = \"tunnel\"\ntunnel = \"gue\"\n"),
            ("tunnel = ", 0),
            "service[0].tunnel_port",
            "needs tunnel_port",
        );
        expect_err(
            &svc("forwarding = \"tunnel\"\ntunnel = \"gre\"\n"),
            ("tunnel = ", 0),
            "service[0].tunnel",
            "expected one of ipip, gue",
        );
        expect_err(
            &svc("tunnel = \"gue\"\n"),
            ("tunnel = ", 0),
            "service[0].tunnel",
            "needs forwarding = \"tunnel\"",
        );
        expect_err(
            &svc("forwarding = \"tunnel\"\ntunnel_port = 6080\n"),
            ("tunnel_port", 0),
            "service[0].tunnel_port",
            "set tunnel = \"gue\"",
        );
        expect_err(
            &svc("forwarding = \"tunnel\"\n[[service.real]]\naddress = \"198.18.0.11:8080\"\n"),
            ("8080", 0),
            "service[0].real[0].address",
            "tunnel forwarding cannot change the port",
        );
    }

    #[test]
    fn persistence() {
        let real = "[[service.real]]\naddress = \"198.18.0.11:80\"\n";
        let cfg = parse_str(&svc(&format!("persistence = \"5m\"\n{real}"))).unwrap();
        assert_eq!(
            cfg.services[0].persistence,
            Some(Persistence {
                timeout: Duration::from_secs(300),
                prefix: 32
            })
        );
        let cfg = parse_str(&svc(&format!(
            "persistence = \"300s\"\npersistence_mask = 24\n{real}"
        )))
        .unwrap();
        assert_eq!(cfg.services[0].persistence.map(|p| p.prefix), Some(24));
        assert_eq!(parse_str(&svc(real)).unwrap().services[0].persistence, None);
        expect_err(
            &svc("persistence_mask = 24\n"),
            ("persistence_mask", 0),
            "service[0].persistence_mask",
            "needs persistence",
        );
        expect_err(
            &svc("persistence = \"300s\"\npersistence_mask = 33\n"),
            ("persistence_mask", 0),
            "service[0].persistence_mask",
            "out of range (1..=32)",
        );
        expect_err(
            &svc("persistence = \"1.5s\"\n"),
            ("persistence", 0),
            "service[0].persistence",
            "not a whole number of seconds",
        );
        expect_err(
            &svc("persistence = \"200h\"\n"),
            ("persistence", 0),
            "service[0].persistence",
            "longer than the maximum of 168h",
        );
    }

    #[test]
    fn ipv6_services_accepted() {
        for (fwd, real) in [("dr", "[2001:2::11]:80"), ("nat", "[2001:2::11]:8080")] {
            for proto in ["tcp", "udp"] {
                let text = format!(
                    "{HEAD}[[service]]\nname = \"v6\"\naddress = \"[2001:2::100]:80\"\n\
                     protocol = \"{proto}\"\nforwarding = \"{fwd}\"\nfallback = \"2001:2::9\"\n\
                     [[service.real]]\naddress = \"{real}\"\n[[service.real]]\naddress = \"2001:2::12\"\n"
                );
                let c = parse_str(&text).unwrap_or_else(|e| panic!("{fwd}/{proto}: {e}"));
                let s = &c.services[0];
                assert_eq!(s.address, sa("[2001:2::100]:80"));
                assert_eq!(s.reals[0].address, sa(real));
                // A real without a port takes the VIP's, as for IPv4.
                assert_eq!(s.reals[1].address, sa("[2001:2::12]:80"));
                assert_eq!(s.fallback, Some(sa("[2001:2::9]:80")));
                // Printed as ipvsadm does.
                assert_eq!(s.address.to_string(), "[2001:2::100]:80");
            }
        }
    }

    #[test]
    fn mixed_family_services_refused() {
        // A v4 VIP with a v6 real, fallback; a v6 VIP with a v4 real.
        let text = svc("[[service.real]]\naddress = \"[2001:db8::2]:80\"\n");
        expect_err(
            &text,
            ("2001:db8", 0),
            "service[0].real[0].address",
            "is IPv6 but the VIP 198.18.0.100:80 is IPv4: a service's VIP and reals must be one address family",
        );
        let text = svc("fallback = \"2001:db8::9\"\n");
        expect_err(
            &text,
            ("2001:db8", 0),
            "service[0].fallback",
            "is IPv6 but the VIP 198.18.0.100:80 is IPv4",
        );
        let text = format!(
            "{HEAD}[[service]]\nname = \"v6\"\naddress = \"[2001:2::100]:80\"\n\
             [[service.real]]\naddress = \"2001:2::11\"\n[[service.real]]\naddress = \"198.18.0.12:80\"\n"
        );
        expect_err(
            &text,
            ("198.18.0.12", 0),
            "service[0].real[1].address",
            "198.18.0.12:80 is IPv4 but the VIP [2001:2::100]:80 is IPv6",
        );
        // Not unicast, or an IPv4 address written as IPv6.
        for (vip, why) in [
            ("[::]:80", "not a unicast address"),
            ("[ff02::1]:80", "not a unicast address"),
            (
                "[::ffff:198.18.0.100]:80",
                "write the IPv4 address 198.18.0.100 instead",
            ),
        ] {
            let text = format!("{HEAD}[[service]]\nname = \"v6\"\naddress = \"{vip}\"\n");
            expect_err(&text, (vip, 0), "service[0].address", why);
        }
    }

    #[test]
    fn weight_out_of_range() {
        let text = svc("[[service.real]]\naddress = \"198.18.0.11\"\n\n[[service.real]]\naddress = \"198.18.0.12\"\nweight = 70000\n");
        expect_err(
            &text,
            ("weight = 70000", 0),
            "service[0].real[1].weight",
            "70000 is out of range (0..=65535)",
        );
        let text = svc("[[service.real]]\naddress = \"198.18.0.11\"\nweight = -1\n");
        expect_err(&text, ("weight", 0), "weight", "out of range");
    }

    #[test]
    fn duplicate_services() {
        let text = format!(
            "{HEAD}[[service]]\nname = \"web\"\naddress = \"198.18.0.100:80\"\n[[service]]\nname = \"web\"\naddress = \"198.18.0.101:80\"\n"
        );
        expect_err(
            &text,
            ("name = \"web\"", 1),
            "service[1].name",
            "duplicate service name \"web\" (first defined on line 4)",
        );
        let text = format!(
            "{HEAD}[[service]]\nname = \"a\"\naddress = \"198.18.0.100:80\"\n[[service]]\nname = \"b\"\naddress = \"198.18.0.100:80\"\n"
        );
        expect_err(
            &text,
            ("address", 1),
            "service[1].address",
            "already used by service \"a\"",
        );
        // Same address, other protocol: fine.
        let text = format!(
            "{HEAD}[[service]]\nname = \"a\"\naddress = \"198.18.0.100:53\"\n[[service]]\nname = \"b\"\naddress = \"198.18.0.100:53\"\nprotocol = \"udp\"\n"
        );
        assert_eq!(parse_str(&text).unwrap().services.len(), 2);
    }

    #[test]
    fn bad_service_name() {
        let text = format!("{HEAD}[[service]]\nname = \"my web\"\naddress = \"198.18.0.100:80\"\n");
        expect_err(
            &text,
            ("my web", 0),
            "service[0].name",
            "not a valid service name",
        );
        let long = "x".repeat(65);
        let text = format!("{HEAD}[[service]]\nname = \"{long}\"\naddress = \"198.18.0.100:80\"\n");
        expect_err(
            &text,
            (&long, 0),
            "service[0].name",
            "not a valid service name",
        );
    }

    #[test]
    fn duplicate_reals() {
        let text = svc("[[service.real]]\naddress = \"198.18.0.11:80\"\n[[service.real]]\naddress = \"198.18.0.12\"\n[[service.real]]\naddress = \"198.18.0.11\"\n");
        expect_err(
            &text,
            ("198.18.0.11", 1),
            "service[0].real[2].address",
            "duplicate real 198.18.0.11:80",
        );
        let text =
            svc("fallback = \"198.18.0.11\"\n[[service.real]]\naddress = \"198.18.0.11:80\"\n");
        expect_err(&text, ("fallback", 0), "service[0].fallback", "also a real");
    }

    #[test]
    fn dr_port_mismatch() {
        let text = svc("[[service.real]]\naddress = \"198.18.0.11:8080\"\n");
        expect_err(
            &text,
            ("8080", 0),
            "service[0].real[0].address",
            "dr forwarding cannot change the port; ",
        );
        let text = svc("fallback = \"198.18.0.9:81\"\n");
        expect_err(
            &text,
            ("fallback", 0),
            "service[0].fallback",
            "dr forwarding cannot change the port",
        );
    }

    #[test]
    fn nat_may_change_the_port() {
        let text = svc(
            "forwarding = \"nat\"\n[[service.real]]\naddress = \"198.18.0.11:8080\"\n\
             [[service.real]]\naddress = \"198.18.0.12\"\n",
        );
        let cfg = parse(&text, Path::new("t.toml")).expect("nat config");
        let web = &cfg.services[0];
        assert_eq!(web.forwarding, Forwarding::Nat);
        assert_eq!(web.reals[0].address, sa("198.18.0.11:8080"));
        assert_eq!(
            web.reals[1].address,
            sa("198.18.0.12:80"),
            "port defaults to the VIP's"
        );
    }

    #[test]
    fn too_many_reals() {
        let mut body = String::new();
        for i in 0..=MAX_REALS {
            body.push_str(&format!(
                "[[service.real]]\naddress = \"10.0.{}.{}\"\n",
                i / 200,
                i % 200 + 1
            ));
        }
        let text = svc(&body);
        expect_err(
            &text,
            ("[[service.real]]", MAX_REALS),
            "service[0].real",
            "257 reals; at most 256",
        );
    }

    #[test]
    fn hashing_schedulers_and_their_keys() {
        let c = parse_str(&svc("scheduler = \"mh\"\nmh_table_size = 251\n")).unwrap();
        assert_eq!(
            (c.services[0].scheduler, c.services[0].mh_table_size),
            (Scheduler::Mh, 251)
        );
        let c = parse_str(&svc("scheduler = \"mh\"\n")).unwrap();
        assert_eq!(c.services[0].mh_table_size, 65_537);
        let c = parse_str(&svc(
            "scheduler = \"sh\"\nsh_port = true\nsh_fallback = true\n",
        ))
        .unwrap();
        assert!(c.services[0].sh_port && c.services[0].sh_fallback);
        expect_err(
            &svc("scheduler = \"mh\"\nmh_table_size = 65536\n"),
            ("mh_table_size", 0),
            "service[0].mh_table_size",
            "65536 is not a prime",
        );
        expect_err(
            &svc("scheduler = \"mh\"\nmh_table_size = 262147\n"),
            ("mh_table_size", 0),
            "service[0].mh_table_size",
            "out of range (2..=131071)",
        );
        expect_err(
            &svc("mh_table_size = 251\n"),
            ("mh_table_size", 0),
            "service[0].mh_table_size",
            "applies only to scheduler = \"mh\"",
        );
        expect_err(
            &svc("scheduler = \"mh\"\nmh_table_size = 3\n[[service.real]]\naddress = \"198.18.1.1\"\n[[service.real]]\naddress = \"198.18.1.2\"\n[[service.real]]\naddress = \"198.18.1.3\"\n"),
            ("mh_table_size", 0),
            "service[0].mh_table_size",
            "3 entries do not exceed the service's 3 reals",
        );
        expect_err(
            &svc("scheduler = \"mh\"\nsh_port = true\n"),
            ("sh_port", 0),
            "service[0].sh_port",
            "sh_port applies only to scheduler = \"sh\"",
        );
        expect_err(
            &svc("scheduler = \"lblc\"\n"),
            ("scheduler", 0),
            "service[0].scheduler",
            "unknown scheduler \"lblc\"",
        );
    }

    #[test]
    fn the_table_pool_must_hold_every_hashing_service() {
        // 1 KiB of pool: two buffers of a 251-entry table (one block each) fit twice.
        let head = HEAD.replace("[director]\n", "[director]\ntable_pool_size = 1024\n");
        let one = |i: usize| {
            format!(
                "[[service]]\nname = \"s{i}\"\naddress = \"198.18.0.100:{}\"\nscheduler = \"mh\"\nmh_table_size = 251\n",
                80 + i
            )
        };
        let ok = format!("{head}\n{}{}", one(0), one(1));
        assert!(parse_str(&ok).is_ok());
        let over = format!("{ok}{}", one(2));
        expect_err(
            &over,
            ("scheduler", 2),
            "service[2].scheduler",
            "need 1536 entries (two buffers of each table, in blocks of 256), more than [director] table_pool_size (1024)",
        );
    }

    #[test]
    fn bad_durations() {
        for (value, msg) in [
            ("-1s", "negative"),
            ("0s", "greater than 0"),
            ("0.0ms", "greater than 0"),
            ("abc", "not a duration"),
            ("1h30", "unknown unit"),
            ("1", "no unit"),
            ("1.s", "not a duration"),
            ("2h", "maximum of 1h"),
        ] {
            let text = svc(&format!(
                "[service.check]\ntype = \"tcp\"\ninterval = \"{value}\"\n"
            ));
            expect_err(&text, ("interval", 0), "service[0].check.interval", msg);
        }
        let text = format!("{HEAD}[director.timeouts]\ntcp_fin = \"-1s\"\n");
        expect_err(
            &text,
            ("tcp_fin", 0),
            "director.timeouts.tcp_fin",
            "negative",
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0.001s"), Ok(Duration::from_millis(1)));
        assert!(parse_duration("1 s").is_err());
        assert!(parse_duration(".5s").is_err());
        assert!(parse_duration("1.2.3s").is_err());
    }

    #[test]
    fn rise_fall_ranges() {
        let text = svc("[service.check]\ntype = \"tcp\"\nrise = 0\n");
        expect_err(
            &text,
            ("rise", 0),
            "service[0].check.rise",
            "0 is out of range (1..=100)",
        );
        let text =
            svc("[[service.real]]\naddress = \"198.18.0.11\"\n[service.real.check]\nfall = 101\n");
        expect_err(
            &text,
            ("fall", 0),
            "service[0].real[0].check.fall",
            "out of range",
        );
    }

    #[test]
    fn unknown_check_type() {
        let text = svc("[service.check]\ntype = \"htp\"\n");
        expect_err(
            &text,
            ("htp", 0),
            "service[0].check.type",
            "unknown check type \"htp\"",
        );
    }

    #[test]
    fn bad_regex() {
        let text = svc("[service.check]\ntype = \"http\"\nexpect_body = \"(OK\"\n");
        expect_err(
            &text,
            ("expect_body", 0),
            "service[0].check.expect_body",
            "invalid regex \"(OK\": unclosed group",
        );
    }

    #[test]
    fn exec_needs_command() {
        let text = svc("[service.check]\ntype = \"exec\"\n");
        expect_err(
            &text,
            ("exec", 0),
            "service[0].check.command",
            "needs `command`",
        );
        let text = svc("[service.check]\ntype = \"exec\"\ncommand = \"  \"\n");
        expect_err(
            &text,
            ("command", 0),
            "service[0].check.command",
            "must not be empty",
        );
        // A per-real switch to exec needs a command too; one inherited from the service is fine.
        let text = svc(
            "[[service.real]]\naddress = \"198.18.0.11\"\n[service.real.check]\ntype = \"exec\"\n",
        );
        expect_err(
            &text,
            ("exec", 0),
            "service[0].real[0].check.command",
            "needs `command`",
        );
        let text = svc("[service.check]\ntype = \"http\"\ncommand = \"true\"\n[[service.real]]\naddress = \"198.18.0.11\"\n[service.real.check]\ntype = \"exec\"\n");
        let c = parse_str(&text).unwrap();
        assert_eq!(c.services[0].reals[0].check.kind, CheckKind::Exec);
        assert_eq!(
            c.services[0].reals[0].check.command.as_deref(),
            Some("true")
        );
    }

    #[test]
    fn other_check_values() {
        let check = |body: &str| svc(&format!("[service.check]\ntype = \"http\"\n{body}\n"));
        expect_err(
            &check("path = \"health\""),
            ("path", 0),
            "service[0].check.path",
            "must start with '/'",
        );
        expect_err(
            &check("expect_status = []"),
            ("expect_status", 0),
            "service[0].check.expect_status",
            "at least one",
        );
        expect_err(
            &check("expect_status = [200, 99]"),
            ("expect_status", 0),
            "expect_status[1]",
            "99 is out of range (100..=599)",
        );
        expect_err(
            &check("port = 0"),
            ("port", 0),
            "service[0].check.port",
            "out of range (1..=65535)",
        );
        expect_err(
            &check("max_body = 0"),
            ("max_body", 0),
            "service[0].check.max_body",
            "out of range",
        );
        expect_err(
            &check("initially = \"maybe\""),
            ("maybe", 0),
            "service[0].check.initially",
            "unknown initial state",
        );
    }

    #[test]
    fn director_values() {
        expect_err(
            &format!("{HEAD}conn_table_size = 100\n"),
            ("conn_table_size", 0),
            "director.conn_table_size",
            "100 is out of range (1024..=16777216)",
        );
        expect_err(
            &format!("{HEAD}xdp_mode = \"native\"\n"),
            ("native", 0),
            "director.xdp_mode",
            "unknown XDP mode",
        );
        expect_err(
            "[director]\ninterface = \"a-very-long-interface\"\n",
            ("interface", 0),
            "director.interface",
            "not a valid interface name",
        );
    }

    /// A key file in a fresh private directory, with `mode`.
    fn key_file(name: &str, content: &[u8], mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("xdpvs-cfg-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("sync.key");
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn sync_table(body: &str) -> String {
        format!("{HEAD}\n[sync]\n{body}")
    }

    #[test]
    fn sync_table_is_parsed_and_its_key_read() {
        let k = key_file("ok", "0f".repeat(32).as_bytes(), 0o600);
        let text = sync_table(&format!(
            "listen = \"198.18.0.2:8899\"\npeer = \"198.18.0.3:8899\"\nkey_file = \"{}\"\nrefresh = \"5s\"\n",
            k.display()
        ));
        let c = parse_str(&text).unwrap();
        let s = c.sync.expect("[sync] parsed");
        assert_eq!(s.listen, sa("198.18.0.2:8899"));
        assert_eq!(s.peer, sa("198.18.0.3:8899"));
        assert_eq!(s.key, crate::ha::sync::wire::Key::from_bytes([0x0f; 32]));
        assert_eq!(s.refresh, Duration::from_secs(5));
        // Without the table: no sync; refresh has a default.
        assert!(parse_str(HEAD).unwrap().sync.is_none());
        let text = sync_table(&format!(
            "listen = \"0.0.0.0:8899\"\npeer = \"198.18.0.3:8899\"\nkey_file = \"{}\"\n",
            k.display()
        ));
        assert_eq!(
            parse_str(&text).unwrap().sync.unwrap().refresh,
            DEFAULT_SYNC_REFRESH
        );
        // A relative key_file is found next to the config file.
        let cfg = k.parent().unwrap().join("x.toml");
        let text = sync_table(
            "listen = \"198.18.0.2:8899\"\npeer = \"198.18.0.3:8899\"\nkey_file = \"sync.key\"\n",
        );
        assert_eq!(parse(&text, &cfg).unwrap().sync.unwrap().key_file, k);
        std::fs::remove_dir_all(k.parent().unwrap()).unwrap();
    }

    #[test]
    fn sync_errors_name_line_and_key() {
        let k = key_file("err", "0f".repeat(32).as_bytes(), 0o600);
        let lax = key_file("lax", "0f".repeat(32).as_bytes(), 0o640);
        let short = key_file("short", b"0f0f", 0o600);
        let ok = |listen: &str, peer: &str, key: &Path| {
            sync_table(&format!(
                "listen = \"{listen}\"\npeer = \"{peer}\"\nkey_file = \"{}\"\n",
                key.display()
            ))
        };
        let good = ("198.18.0.2:8899", "198.18.0.3:8899");
        expect_err(
            &ok("198.18.0.2", good.1, &k),
            ("listen", 0),
            "sync.listen",
            "not an IP:PORT address",
        );
        expect_err(
            &ok("198.18.0.2:0", good.1, &k),
            ("listen", 0),
            "sync.listen",
            "port 0",
        );
        expect_err(
            &ok(good.0, "239.1.1.1:8899", &k),
            ("peer", 0),
            "sync.peer",
            "not a unicast address",
        );
        expect_err(
            &ok(good.0, good.0, &k),
            ("peer", 0),
            "sync.peer",
            "own `listen` address",
        );
        expect_err(
            &ok(good.0, "[2001:db8::1]:8899", &k),
            ("peer", 0),
            "sync.peer",
            "address family",
        );
        let e = expect_err(
            &ok(good.0, good.1, &lax),
            ("key_file", 0),
            "sync.key_file",
            "accessible by group or others (mode 0640)",
        );
        assert!(e.message.contains("chmod 600"), "{e}");
        expect_err(
            &ok(good.0, good.1, &short),
            ("key_file", 0),
            "sync.key_file",
            "expected 32 raw bytes or 64 hex digits",
        );
        expect_err(
            &ok(good.0, good.1, Path::new("/nonexistent/xdpvs.key")),
            ("key_file", 0),
            "sync.key_file",
            "cannot read key file",
        );
        expect_err(
            &sync_table("listen = \"198.18.0.2:8899\"\npeer = \"198.18.0.3:8899\"\n"),
            ("[sync]", 0),
            "sync.key_file",
            "missing required key `key_file`",
        );
        expect_err(
            &sync_table("listen = \"198.18.0.2:8899\"\npeers = \"x\"\n"),
            ("peers", 0),
            "sync.peers",
            "unknown field `peers`",
        );
        expect_err(
            &format!("{}refresh = \"0s\"\n", ok(good.0, good.1, &k)),
            ("refresh", 0),
            "sync.refresh",
            "greater than 0",
        );
        for p in [k, lax, short] {
            std::fs::remove_dir_all(p.parent().unwrap()).unwrap();
        }
    }
}
