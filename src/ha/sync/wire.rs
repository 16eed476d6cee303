//! The connection-sync wire format: what one director tells its peer about connections.
//!
//! A datagram is a versioned header, then the body sealed with XChaCha20-Poly1305 (RustCrypto's
//! `chacha20poly1305`) under a shared key from a key file, the header as associated data. The
//! 24-byte nonce is the sender's random boot id (16 bytes) and its sequence number (8 bytes), so
//! a nonce never repeats under one key, not even across restarts. The receiver keeps a 64-entry
//! sliding replay window over sequence numbers of the peer's current boot, and moves to a new
//! boot only if its boot time (also authenticated) is later: replaying an old boot's datagrams
//! gains nothing.
//!
//! Connections are named as the peer can look them up in its own tables: the client-side
//! 5-tuple (client address:port -> VIP:port, protocol; the destination is the service), and the
//! real by address:port, never by a dataplane id. Every datagram the receiver refuses names a
//! [`Reject`] reason, counted in [`RejectCounts`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

const MAGIC: [u8; 2] = *b"XS";
pub const VERSION: u8 = 1;
/// magic, version, kind, boot id, boot time (unix ms), sequence.
pub const HEADER_LEN: usize = 2 + 1 + 1 + 16 + 8 + 8;
const TAG_LEN: usize = 16;
/// Largest datagram a sender builds (fits a 1500-byte MTU with IPv6 and UDP headers).
pub const MAX_DATAGRAM: usize = 1400;
const REPLAY_WINDOW: u64 = 64;

const KIND_EVENTS: u8 = 1;
const KIND_DUMP_REQUEST: u8 = 2;

/// A 256-bit shared key.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl PartialEq for Key {
    fn eq(&self, o: &Key) -> bool {
        // Compared only when a reload checks whether `[sync]` changed; not a secret comparison
        // an attacker can time.
        self.0 == o.0
    }
}

impl Eq for Key {}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {0}: {1}")]
    Io(String, std::io::Error),
    #[error(
        "key file {0}: expected 32 raw bytes or 64 hex digits (e.g. from `openssl rand -hex 32`)"
    )]
    Format(String),
    #[error("key file {0} is accessible by group or others (mode {1:04o}); run `chmod 600 {0}`")]
    Permissions(String, u32),
}

impl Key {
    pub fn from_bytes(b: [u8; 32]) -> Key {
        Key(b)
    }

    /// 64 hex digits (surrounding whitespace ignored) or exactly 32 raw bytes. Refused if group
    /// or others have any access: a shared secret readable by another user is no secret.
    pub fn from_file(path: &Path) -> Result<Key, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| KeyError::Io(name.clone(), e))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions(name, mode));
        }
        let bytes = std::fs::read(path).map_err(|e| KeyError::Io(name.clone(), e))?;
        if let Some(k) = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| Key::from_hex(t.trim()))
        {
            return Ok(k);
        }
        match <[u8; 32]>::try_from(bytes.as_slice()) {
            Ok(raw) => Ok(Key(raw)),
            Err(_) => Err(KeyError::Format(name)),
        }
    }

    pub fn from_hex(s: &str) -> Option<Key> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Key(k))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnProto {
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    New,
    StateChange,
    End,
}

/// One connection event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnEvent {
    pub kind: EventKind,
    pub proto: ConnProto,
    /// The connection's state after the event, in the dataplane's numbering (opaque here).
    pub state: u8,
    pub client: SocketAddr,
    /// The 5-tuple's destination, which is the service (VIP:port) of `proto`.
    pub service: SocketAddr,
    pub real: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Events(Vec<ConnEvent>),
    /// "Send me your whole table" (a director that (re)joins).
    DumpRequest,
}

/// Why a datagram was refused: the closed set counted in [`RejectCounts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Shorter than header and tag.
    Truncated,
    /// Not our magic: not a sync datagram at all.
    Magic,
    UnknownVersion,
    UnknownKind,
    /// Wrong key, or altered in flight (tag mismatch).
    Auth,
    /// A sequence number already seen or behind the window.
    Replay,
    /// A boot older than the peer's current one (an old recording replayed).
    StaleBoot,
    /// Authentic, but the body does not decode (a bug or an incompatible sender).
    Malformed,
}

impl Reject {
    pub const ALL: [Reject; 8] = [
        Reject::Truncated,
        Reject::Magic,
        Reject::UnknownVersion,
        Reject::UnknownKind,
        Reject::Auth,
        Reject::Replay,
        Reject::StaleBoot,
        Reject::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Truncated => "truncated",
            Reject::Magic => "magic",
            Reject::UnknownVersion => "unknown_version",
            Reject::UnknownKind => "unknown_kind",
            Reject::Auth => "auth",
            Reject::Replay => "replay",
            Reject::StaleBoot => "stale_boot",
            Reject::Malformed => "malformed",
        }
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Default)]
pub struct RejectCounts([AtomicU64; Reject::ALL.len()]);

impl RejectCounts {
    pub fn count(&self, r: Reject) {
        self.0[r as usize].fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self, r: Reject) -> u64 {
        self.0[r as usize].load(Ordering::Relaxed)
    }
    pub fn total(&self) -> u64 {
        Reject::ALL.iter().map(|&r| self.get(r)).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("a batch of {0} events does not fit in one datagram")]
    TooLarge(usize),
    #[error("event names addresses of two families")]
    MixedFamily,
    #[error("sequence numbers exhausted: restart the sender with a new boot id")]
    Exhausted,
    #[error("encryption failed")]
    Cipher,
}

/// The sending half: one per director boot.
pub struct Sender {
    cipher: XChaCha20Poly1305,
    boot: [u8; 16],
    boot_time_ms: u64,
    seq: u64,
}

impl Sender {
    /// `boot` must be random per start (see [`Sender::random_boot`]); `boot_time_ms` the start
    /// time, later than any earlier boot's.
    pub fn new(key: &Key, boot: [u8; 16], boot_time_ms: u64) -> Sender {
        Sender {
            cipher: XChaCha20Poly1305::new((&key.0).into()),
            boot,
            boot_time_ms,
            seq: 0,
        }
    }

    /// 16 random bytes from the kernel.
    pub fn random_boot() -> std::io::Result<[u8; 16]> {
        use std::io::Read;
        let mut b = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        Ok(b)
    }

    /// Most events of one family that [`Sender::seal`] fits in a datagram.
    pub fn max_events(v6: bool) -> usize {
        (MAX_DATAGRAM - HEADER_LEN - TAG_LEN - 2) / event_len(v6)
    }

    pub fn seal(&mut self, msg: &Message) -> Result<Vec<u8>, SealError> {
        let (kind, body) = match msg {
            Message::DumpRequest => (KIND_DUMP_REQUEST, Vec::new()),
            Message::Events(events) => (KIND_EVENTS, encode_events(events)?),
        };
        if HEADER_LEN + body.len() + TAG_LEN > MAX_DATAGRAM {
            let n = match msg {
                Message::Events(e) => e.len(),
                Message::DumpRequest => 0,
            };
            return Err(SealError::TooLarge(n));
        }
        self.seq = self.seq.checked_add(1).ok_or(SealError::Exhausted)?;
        let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(kind);
        out.extend_from_slice(&self.boot);
        out.extend_from_slice(&self.boot_time_ms.to_be_bytes());
        out.extend_from_slice(&self.seq.to_be_bytes());
        let nonce = nonce(&self.boot, self.seq);
        let sealed = self
            .cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: &body,
                    aad: &out,
                },
            )
            .map_err(|_| SealError::Cipher)?;
        out.extend_from_slice(&sealed);
        Ok(out)
    }
}

fn nonce(boot: &[u8; 16], seq: u64) -> XNonce {
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(boot);
    n[16..].copy_from_slice(&seq.to_be_bytes());
    n.into()
}

/// The peer's current boot and what of it has been seen.
#[derive(Debug, Clone, Copy)]
struct Window {
    boot: [u8; 16],
    boot_time_ms: u64,
    /// Highest sequence accepted.
    top: u64,
    /// Bit i set: `top - i` was accepted.
    seen: u64,
}

/// The receiving half.
pub struct Receiver {
    cipher: XChaCha20Poly1305,
    window: Option<Window>,
    pub rejected: RejectCounts,
    pub accepted: AtomicU64,
}

impl Receiver {
    pub fn new(key: &Key) -> Receiver {
        Receiver {
            cipher: XChaCha20Poly1305::new((&key.0).into()),
            window: None,
            rejected: RejectCounts::default(),
            accepted: AtomicU64::new(0),
        }
    }

    /// Authenticates, checks for replay and decodes one datagram; refusals are counted.
    pub fn open(&mut self, datagram: &[u8]) -> Result<Message, Reject> {
        let r = self.open_inner(datagram);
        match r {
            Ok(_) => self.accepted.fetch_add(1, Ordering::Relaxed),
            Err(reason) => {
                self.rejected.count(reason);
                0
            }
        };
        r
    }

    fn open_inner(&mut self, d: &[u8]) -> Result<Message, Reject> {
        if d.len() < 4 {
            return Err(Reject::Truncated);
        }
        if d[..2] != MAGIC {
            return Err(Reject::Magic);
        }
        if d[2] != VERSION {
            return Err(Reject::UnknownVersion);
        }
        let kind = d[3];
        if kind != KIND_EVENTS && kind != KIND_DUMP_REQUEST {
            return Err(Reject::UnknownKind);
        }
        if d.len() < HEADER_LEN + TAG_LEN {
            return Err(Reject::Truncated);
        }
        let (header, sealed) = d.split_at(HEADER_LEN);
        let mut boot = [0u8; 16];
        boot.copy_from_slice(&header[4..20]);
        let boot_time_ms =
            u64::from_be_bytes(header[20..28].try_into().map_err(|_| Reject::Truncated)?);
        let seq = u64::from_be_bytes(header[28..36].try_into().map_err(|_| Reject::Truncated)?);
        // Cheap checks before the cipher: a stale boot or an old sequence is refused unopened.
        let same_boot = self.window.is_some_and(|w| w.boot == boot);
        if let Some(w) = self.window {
            if !same_boot && boot_time_ms <= w.boot_time_ms {
                return Err(Reject::StaleBoot);
            }
            if same_boot && seen(&w, seq) {
                return Err(Reject::Replay);
            }
        }
        let body = self
            .cipher
            .decrypt(
                &nonce(&boot, seq),
                Payload {
                    msg: sealed,
                    aad: header,
                },
            )
            .map_err(|_| Reject::Auth)?;
        let msg = match kind {
            KIND_DUMP_REQUEST if body.is_empty() => Message::DumpRequest,
            KIND_DUMP_REQUEST => return Err(Reject::Malformed),
            _ => Message::Events(decode_events(&body).ok_or(Reject::Malformed)?),
        };
        // Only an authentic datagram moves the window.
        let w = match self.window {
            Some(w) if same_boot => w,
            _ => Window {
                boot,
                boot_time_ms,
                top: 0,
                seen: 0,
            },
        };
        self.window = Some(mark(w, seq));
        Ok(msg)
    }
}

fn seen(w: &Window, seq: u64) -> bool {
    if seq > w.top {
        return false;
    }
    let age = w.top - seq;
    age >= REPLAY_WINDOW || w.seen & (1 << age) != 0 || seq == 0
}

fn mark(mut w: Window, seq: u64) -> Window {
    if seq > w.top {
        let shift = seq - w.top;
        w.seen = if shift >= REPLAY_WINDOW {
            0
        } else {
            w.seen << shift
        };
        w.top = seq;
        w.seen |= 1;
    } else {
        w.seen |= 1 << (w.top - seq);
    }
    w
}

fn event_len(v6: bool) -> usize {
    let a = if v6 { 16 } else { 4 };
    4 + 3 * (a + 2)
}

fn encode_events(events: &[ConnEvent]) -> Result<Vec<u8>, SealError> {
    let n = u16::try_from(events.len()).map_err(|_| SealError::TooLarge(events.len()))?;
    let mut b = Vec::with_capacity(2 + events.len() * event_len(true));
    b.extend_from_slice(&n.to_be_bytes());
    for e in events {
        let v6 = e.client.is_ipv6();
        if e.service.is_ipv6() != v6 || e.real.is_ipv6() != v6 {
            return Err(SealError::MixedFamily);
        }
        b.push(match e.kind {
            EventKind::New => 1,
            EventKind::StateChange => 2,
            EventKind::End => 3,
        });
        b.push(match e.proto {
            ConnProto::Tcp => 6,
            ConnProto::Udp => 17,
        });
        b.push(if v6 { 6 } else { 4 });
        b.push(e.state);
        for a in [e.client, e.service, e.real] {
            match a.ip() {
                IpAddr::V4(ip) => b.extend_from_slice(&ip.octets()),
                IpAddr::V6(ip) => b.extend_from_slice(&ip.octets()),
            }
            b.extend_from_slice(&a.port().to_be_bytes());
        }
    }
    Ok(b)
}

fn decode_events(b: &[u8]) -> Option<Vec<ConnEvent>> {
    let n = usize::from(u16::from_be_bytes([*b.first()?, *b.get(1)?]));
    let mut at = 2;
    let mut out = Vec::with_capacity(n.min(b.len() / event_len(false)));
    for _ in 0..n {
        let kind = match *b.get(at)? {
            1 => EventKind::New,
            2 => EventKind::StateChange,
            3 => EventKind::End,
            _ => return None,
        };
        let proto = match *b.get(at + 1)? {
            6 => ConnProto::Tcp,
            17 => ConnProto::Udp,
            _ => return None,
        };
        let alen = match *b.get(at + 2)? {
            4 => 4,
            6 => 16,
            _ => return None,
        };
        let state = *b.get(at + 3)?;
        at += 4;
        let mut addr = || -> Option<SocketAddr> {
            let a = b.get(at..at + alen)?;
            let p = b.get(at + alen..at + alen + 2)?;
            at += alen + 2;
            let ip = if alen == 4 {
                IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
            } else {
                let mut o = [0u8; 16];
                o.copy_from_slice(a);
                IpAddr::V6(Ipv6Addr::from(o))
            };
            Some(SocketAddr::new(ip, u16::from_be_bytes([p[0], p[1]])))
        };
        let (client, service, real) = (addr()?, addr()?, addr()?);
        out.push(ConnEvent {
            kind,
            proto,
            state,
            client,
            service,
            real,
        });
    }
    // Trailing bytes mean sender and receiver disagree on the format.
    (at == b.len()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    fn ev(i: u16) -> ConnEvent {
        ConnEvent {
            kind: EventKind::New,
            proto: ConnProto::Tcp,
            state: 1,
            client: SocketAddr::new([198, 18, 0, 1].into(), 40_000 + i),
            service: "198.18.0.100:80".parse().unwrap(),
            real: "198.18.0.11:80".parse().unwrap(),
        }
    }

    fn ev6() -> ConnEvent {
        ConnEvent {
            kind: EventKind::End,
            proto: ConnProto::Udp,
            state: 9,
            client: "[2001:2::1]:5353".parse().unwrap(),
            service: "[2001:2::100]:53".parse().unwrap(),
            real: "[2001:2::11]:53".parse().unwrap(),
        }
    }

    fn pair() -> (Sender, Receiver) {
        (Sender::new(&key(7), [1; 16], 1000), Receiver::new(&key(7)))
    }

    #[test]
    fn round_trip() {
        let (mut s, mut r) = pair();
        let m = Message::Events(vec![ev(1), ev(2)]);
        assert_eq!(r.open(&s.seal(&m).unwrap()), Ok(m));
        let m6 = Message::Events(vec![ev6()]);
        assert_eq!(r.open(&s.seal(&m6).unwrap()), Ok(m6));
        assert_eq!(
            r.open(&s.seal(&Message::DumpRequest).unwrap()),
            Ok(Message::DumpRequest)
        );
        assert_eq!(r.accepted.load(Ordering::Relaxed), 3);
        assert_eq!(r.rejected.total(), 0);
    }

    #[test]
    fn a_full_batch_fits_and_one_more_does_not() {
        let (mut s, mut r) = pair();
        let n = Sender::max_events(true);
        let full = Message::Events(vec![ev6(); n]);
        let d = s.seal(&full).unwrap();
        assert!(d.len() <= MAX_DATAGRAM);
        assert_eq!(r.open(&d), Ok(full));
        assert_eq!(
            s.seal(&Message::Events(vec![ev6(); n + 1])),
            Err(SealError::TooLarge(n + 1))
        );
    }

    #[test]
    fn wrong_key_tampering_truncation_version_are_refused_and_counted() {
        let (mut s, mut r) = pair();
        let d = s.seal(&Message::Events(vec![ev(1)])).unwrap();
        let mut other = Sender::new(&key(8), [1; 16], 1000);
        let wrong_key = other.seal(&Message::Events(vec![ev(1)])).unwrap();
        let mut flipped = d.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let mut header_flipped = d.clone();
        header_flipped[25] ^= 1; // boot time: authenticated as associated data
        let cases: Vec<(&str, Vec<u8>, Reject)> = vec![
            ("wrong key", wrong_key, Reject::Auth),
            ("tag flipped", flipped, Reject::Auth),
            ("header flipped", header_flipped, Reject::Auth),
            (
                "truncated to the header",
                d[..HEADER_LEN].to_vec(),
                Reject::Truncated,
            ),
            ("one byte short", d[..d.len() - 1].to_vec(), Reject::Auth),
            ("three bytes", d[..3].to_vec(), Reject::Truncated),
            (
                "version 2",
                [&d[..2], &[2], &d[3..]].concat(),
                Reject::UnknownVersion,
            ),
            (
                "kind 9",
                [&d[..3], &[9], &d[4..]].concat(),
                Reject::UnknownKind,
            ),
            (
                "not ours",
                [b"GET ".as_slice(), &d[4..]].concat(),
                Reject::Magic,
            ),
        ];
        for (name, dg, want) in &cases {
            assert_eq!(r.open(dg), Err(*want), "case {name}");
        }
        for w in [
            Reject::Auth,
            Reject::Truncated,
            Reject::UnknownVersion,
            Reject::UnknownKind,
            Reject::Magic,
        ] {
            assert_eq!(
                r.rejected.get(w),
                cases.iter().filter(|c| c.2 == w).count() as u64
            );
        }
        // None of that disturbed the real one.
        assert!(r.open(&d).is_ok());
    }

    #[test]
    fn replays_are_refused_within_and_behind_the_window() {
        let (mut s, mut r) = pair();
        let all: Vec<Vec<u8>> = (0..100)
            .map(|i| s.seal(&Message::Events(vec![ev(i)])).unwrap())
            .collect();
        // Out of order within the window is fine.
        assert!(r.open(&all[50]).is_ok());
        assert!(r.open(&all[40]).is_ok());
        assert_eq!(r.open(&all[40]), Err(Reject::Replay));
        assert_eq!(r.open(&all[50]), Err(Reject::Replay));
        assert!(r.open(&all[99]).is_ok());
        // The top is seq 100 now: seq 31 (index 30) is more than 64 behind.
        assert_eq!(r.open(&all[30]), Err(Reject::Replay));
        assert!(r.open(&all[98]).is_ok());
        assert_eq!(r.rejected.get(Reject::Replay), 3);
    }

    #[test]
    fn a_restarted_peer_is_followed_but_an_old_boot_is_not() {
        let (mut s, mut r) = pair();
        let old = s.seal(&Message::DumpRequest).unwrap();
        assert!(r.open(&old).is_ok());
        let mut s2 = Sender::new(&key(7), [2; 16], 2000);
        assert!(r.open(&s2.seal(&Message::DumpRequest).unwrap()).is_ok());
        let old2 = s.seal(&Message::DumpRequest).unwrap();
        assert_eq!(r.open(&old2), Err(Reject::StaleBoot));
        assert_eq!(r.open(&old), Err(Reject::StaleBoot));
    }

    #[test]
    fn an_unauthentic_datagram_does_not_move_the_window() {
        let (mut s, mut r) = pair();
        let d1 = s.seal(&Message::DumpRequest).unwrap();
        // A forged header with a huge sequence and a new boot, wrong tag.
        let mut forged = s.seal(&Message::DumpRequest).unwrap();
        forged[4] ^= 0xff;
        forged[20..28].copy_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(r.open(&forged), Err(Reject::Auth));
        assert!(r.open(&d1).is_ok());
    }

    #[test]
    fn key_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("xdpvs-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        std::fs::write(&p, format!("{}\n", "ab".repeat(32))).unwrap();
        let mode = |m| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        mode(0o600);
        assert_eq!(Key::from_file(&p).unwrap().0, [0xab; 32]);
        std::fs::write(&p, "abcd\n").unwrap();
        assert!(matches!(Key::from_file(&p), Err(KeyError::Format(_))));
        // 32 raw bytes (not text): taken as they are.
        let raw: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0x80).collect();
        std::fs::write(&p, &raw).unwrap();
        assert_eq!(Key::from_file(&p).unwrap().0.to_vec(), raw);
        std::fs::write(&p, &raw[..31]).unwrap();
        assert!(matches!(Key::from_file(&p), Err(KeyError::Format(_))));
        // Any access for group or others is refused, whatever the content.
        std::fs::write(&p, &raw).unwrap();
        for m in [0o640, 0o604, 0o620, 0o644, 0o601] {
            mode(m);
            match Key::from_file(&p) {
                Err(KeyError::Permissions(_, got)) => assert_eq!(got, m),
                other => panic!("mode {m:o}: {other:?}"),
            }
        }
        mode(0o400);
        assert!(Key::from_file(&p).is_ok());
        assert!(matches!(
            Key::from_file(&dir.join("none")),
            Err(KeyError::Io(..))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 10_000, ..ProptestConfig::default() })]

        /// Arbitrary bytes (with our magic and version, to get past the first checks) never panic
        /// and never authenticate.
        #[test]
        fn fuzz_open(tail in proptest::collection::vec(any::<u8>(), 0..200), kind in 0u8..4) {
            let mut r = Receiver::new(&key(7));
            let d = [&MAGIC[..], &[VERSION, kind], &tail].concat();
            prop_assert!(r.open(&d).is_err());
            prop_assert!(r.open(&tail).is_err());
            prop_assert_eq!(r.rejected.total(), 2);
        }

        /// The body decoder (reached only after authentication) never panics on any bytes, and
        /// round-trips what the encoder wrote.
        #[test]
        fn fuzz_decode_events(body in proptest::collection::vec(any::<u8>(), 0..300), n in 0u16..20) {
            let _ = decode_events(&body);
            let events: Vec<ConnEvent> = (0..n).map(ev).collect();
            let b = encode_events(&events).unwrap();
            prop_assert_eq!(decode_events(&b), Some(events));
        }

        /// Any one byte of a sealed datagram flipped: refused, counted, no panic.
        #[test]
        fn fuzz_flipped(at in 0usize..200, xor in 1u8..=255) {
            let (mut s, mut r) = pair();
            let mut d = s.seal(&Message::Events(vec![ev(1), ev6()])).unwrap();
            let at = at % d.len();
            d[at] ^= xor;
            prop_assert!(r.open(&d).is_err());
            prop_assert_eq!(r.rejected.total(), 1);
        }
    }
}
