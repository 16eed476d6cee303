//! End-to-end harness: a network-namespace lab (scripts/lab.sh), helpers to talk HTTP from
//! inside a namespace, and the xdpvs daemon run inside the director's namespace.
//!
//! Topology (see scripts/lab.sh): client 198.18.0.1, director 198.18.0.2 with the VIP
//! 198.18.0.100 on `d0`, real `i` at 198.18.0.(10+i) with the VIP on `lo` (LVS-DR), nginx on
//! each real answering `"r<i>\n"` on `/` and `"OK\n"` on `/health`.
//!
//! Use from a test file with `mod common;`. Every test uses its own short prefix (at most 10 of
//! `[A-Za-z0-9_]`), so labs of tests running in parallel never collide. The lab and the daemon
//! are torn down on drop, also when the test panics; declare the `Daemon` after the `Lab` so it
//! stops first.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// The service address every lab uses.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
pub const VIP_PORT: u16 = 80;
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const DIRECTOR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Connect, read and write timeout of the HTTP helpers.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The IPv6 VIP of a dual-stack lab ([`Lab::up_dual`]): 2001:2::100.
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0x100);
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);

/// `[VIP6]:80`.
pub fn vip6_addr() -> SocketAddr {
    SocketAddr::new(VIP6.into(), VIP_PORT)
}

/// IPv6 address of real `i` in a dual-stack lab: 2001:2::(10+i), written like its IPv4 last
/// octet (2001:2::11 for real 1).
pub fn real_ip6(i: usize) -> Ipv6Addr {
    assert!((1..=80).contains(&i), "real index {i} out of range");
    let last = u16::from_str_radix(&(10 + i).to_string(), 16).expect("decimal digits");
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, last)
}

/// `VIP:80`.
pub fn vip_addr() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(VIP, VIP_PORT))
}

/// Address of real `i` (1-based): 198.18.0.(10+i).
pub fn real_ip(i: usize) -> Ipv4Addr {
    assert!((1..=80).contains(&i), "real index {i} out of range");
    Ipv4Addr::new(198, 18, 0, 10 + i as u8)
}

/// `real_ip(i):80`.
pub fn real_addr(i: usize) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(real_ip(i), 80))
}

/// Which real served a response: nginx on real `i` answers `"r<i>\n"` on `/`.
pub fn real_of(body: &str) -> Option<usize> {
    body.trim_end().strip_prefix('r')?.parse().ok()
}

/// Guard at the top of every root-only test (those carry `#[ignore = "needs root"]`, so a plain
/// `cargo test` lists them as ignored). Asking for them with `--include-ignored` without root is
/// a failure, not a silent pass: this panics. Always true when it returns.
/// `if !common::require_root("my_test") { return; }`
pub fn require_root(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    panic!("{test} needs root (it is #[ignore]d; run it as root or leave out --include-ignored)");
}

fn lab_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/lab.sh")
}

fn run_checked(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(out)
}

/// A lab built by `scripts/lab.sh up`, torn down (`lab.sh down`) on drop.
pub struct Lab {
    pub prefix: String,
    pub reals: usize,
    /// `/tmp/<prefix>lab`: nginx files, the daemon's config, log and admin socket.
    pub dir: PathBuf,
}

impl Lab {
    /// Builds the lab (any earlier lab with this prefix is torn down first).
    pub fn up(prefix: &str, reals: usize) -> Result<Lab> {
        Lab::up_with(prefix, reals, 1500, "driver")
    }

    /// Builds the lab with `mtu` on every link, prepared for a director in XDP mode `dir_xdp`
    /// ("driver" or "skb"; see scripts/lab.sh).
    pub fn up_with(prefix: &str, reals: usize, mtu: u32, dir_xdp: &str) -> Result<Lab> {
        Lab::up_full(prefix, reals, mtu, dir_xdp, 1, "dr", "v4")
    }

    /// A lab with two directors, `dir` (198.18.0.2) and `dir2` (198.18.0.3), neither holding
    /// the VIP until VRRP elects one (`lab.sh up ... DIRS=2`).
    pub fn up_pair(prefix: &str, reals: usize) -> Result<Lab> {
        Lab::up_full(prefix, reals, 1500, "driver", 2, "dr", "v4")
    }

    /// A LVS-NAT lab (`lab.sh up ... MODE=nat`): no VIP on the reals, nginx on port 8080
    /// ([`NAT_REAL_PORT`]), the reals' route to the client via the director.
    pub fn up_nat(prefix: &str, reals: usize) -> Result<Lab> {
        Lab::up_full(prefix, reals, 1500, "driver", 1, "nat", "v4")
    }

    /// A dual-stack lab (`lab.sh up ... FAMILY=dual`) in `mode` ("dr" or "nat"): IPv6 beside
    /// IPv4 on every host, the IPv6 VIP [`VIP6`] on the director, real `i` at [`real_ip6`].
    pub fn up_dual(prefix: &str, reals: usize, mode: &str) -> Result<Lab> {
        Lab::up_full(prefix, reals, 1500, "driver", 1, mode, "dual")
    }

    #[allow(clippy::too_many_arguments)]
    fn up_full(
        prefix: &str,
        reals: usize,
        mtu: u32,
        dir_xdp: &str,
        dirs: u8,
        mode: &str,
        family: &str,
    ) -> Result<Lab> {
        let ok_prefix = !prefix.is_empty()
            && prefix.len() <= 10
            && prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok_prefix {
            bail!("bad lab prefix {prefix:?} (1-10 of [A-Za-z0-9_])");
        }
        if !(1..=80).contains(&reals) {
            bail!("bad number of reals {reals} (1..=80)");
        }
        // Built before running the script so that Drop tears down whatever `up` left behind.
        let lab = Lab {
            prefix: prefix.to_string(),
            reals,
            dir: PathBuf::from(format!("/tmp/{prefix}lab")),
        };
        run_checked(
            Command::new(lab_sh()).args([
                "up",
                prefix,
                &reals.to_string(),
                &mtu.to_string(),
                dir_xdp,
                &dirs.to_string(),
                mode,
                family,
            ]),
            &format!("lab.sh up {prefix} {reals} {mtu} {dir_xdp} {dirs} {mode} {family}"),
        )?;
        Ok(lab)
    }

    /// Full namespace name of a lab host: `"client"`, `"dir"`, `"sw"`, `"r1"`...
    /// A name that already carries the prefix is returned as is.
    pub fn ns(&self, name: &str) -> String {
        if self.is_full_ns(name) {
            name.to_string()
        } else {
            format!("{}{}", self.prefix, name)
        }
    }

    fn is_full_ns(&self, name: &str) -> bool {
        match name.strip_prefix(&self.prefix) {
            Some(rest) => {
                matches!(rest, "sw" | "client" | "dir" | "dir2" | "rtr" | "far")
                    || (rest.len() > 1
                        && rest.starts_with('r')
                        && rest[1..].chars().all(|c| c.is_ascii_digit()))
            }
            None => false,
        }
    }

    /// Runs `ip netns exec <ns> args...` (ns short or full name); the output whatever the status.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Output> {
        let ns = self.ns(ns);
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("ip netns exec {ns} {args:?}"))
    }

    /// Like [`Lab::exec`] but fails on a non-zero exit status; returns stdout.
    pub fn exec_ok(&self, ns: &str, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(ns)]).args(args);
        sh(&mut cmd, &format!("ip netns exec {} {args:?}", self.ns(ns)))
    }

    /// `curl` from the client to the VIP (`http://198.18.0.100<path>`, `--max-time 2`); the body.
    pub fn curl(&self, path: &str) -> Result<String> {
        self.curl_url(&format!("http://{VIP}{path}"))
    }

    /// `curl` from the client to any URL (`--max-time 2`); the body. Fails on curl errors
    /// (connection refused, timeout: curl's exit code and message in the error), not on HTTP
    /// status codes.
    pub fn curl_url(&self, url: &str) -> Result<String> {
        let out = self.exec("client", &["curl", "-sS", "--max-time", "2", url])?;
        if !out.status.success() {
            bail!(
                "curl {url} from the client failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Stops nginx on real `i` and waits until its port 80 is closed.
    pub fn stop_nginx(&self, i: usize) -> Result<()> {
        run_checked(
            Command::new(lab_sh()).args(["nginx-stop", &self.prefix, &i.to_string()]),
            &format!("lab.sh nginx-stop {} {i}", self.prefix),
        )
        .map(|_| ())
    }

    /// Starts nginx on real `i` again and waits until it answers.
    pub fn start_nginx(&self, i: usize) -> Result<()> {
        run_checked(
            Command::new(lab_sh()).args(["nginx-start", &self.prefix, &i.to_string()]),
            &format!("lab.sh nginx-start {} {i}", self.prefix),
        )
        .map(|_| ())
    }

    /// Starts the optional DNS server (dnsmasq, `lab.sh dns-start`) on real `i` and waits until
    /// it answers; it answers `example.com A` with the real's own address.
    pub fn start_dns(&self, i: usize) -> Result<()> {
        run_checked(
            Command::new(lab_sh()).args(["dns-start", &self.prefix, &i.to_string()]),
            &format!("lab.sh dns-start {} {i}", self.prefix),
        )
        .map(|_| ())
    }

    /// Adds a client `far` (198.19.0.1) behind a router `rtr` whose link to it has `mtu` bytes
    /// (`lab.sh far-up`), for path-MTU discovery through the director.
    pub fn far_up(&self, mtu: u32) -> Result<()> {
        run_checked(
            Command::new(lab_sh()).args(["far-up", &self.prefix, &mtu.to_string()]),
            &format!("lab.sh far-up {} {mtu}", self.prefix),
        )
        .map(|_| ())
    }

    /// Stops the DNS server on real `i` (`lab.sh dns-stop`) and waits until port 53 is closed.
    pub fn stop_dns(&self, i: usize) -> Result<()> {
        run_checked(
            Command::new(lab_sh()).args(["dns-stop", &self.prefix, &i.to_string()]),
            &format!("lab.sh dns-stop {} {i}", self.prefix),
        )
        .map(|_| ())
    }

    /// Runs `f` on a thread inside the lab namespace `ns` (short or full name).
    pub fn in_ns<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.ns(ns), f)
    }

    /// The lab's namespaces currently present (`ip netns list`).
    pub fn namespaces(&self) -> Vec<String> {
        netns_with_prefix(&self.prefix)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let r = Command::new(lab_sh())
            .args(["down", &self.prefix])
            .stdin(Stdio::null())
            .output();
        if let Err(e) = r {
            eprintln!("lab.sh down {} failed: {e}", self.prefix);
        }
    }
}

/// Names from `ip netns list` that start with `prefix`.
pub fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

/// Runs `f` on a new thread that first enters the network namespace `/run/netns/<ns>` (full
/// name). Sockets created there stay in that namespace after `f` returns, so they can be
/// returned and used from any thread. Panics (in the caller) if the namespace cannot be entered.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        let h = s.spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // Only this thread changes namespace (setns affects the calling thread).
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                panic!("setns({path}): {}", std::io::Error::last_os_error());
            }
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// An HTTP response: status code and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connect to {addr}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn send_request(s: &mut TcpStream, addr: SocketAddr, path: &str, close: bool) -> Result<()> {
    let conn = if close { "close" } else { "keep-alive" };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: xdpvs-e2e\r\nConnection: {conn}\r\n\r\n",
        addr.ip()
    );
    s.write_all(req.as_bytes())
        .with_context(|| format!("send request to {addr}"))?;
    Ok(())
}

/// Reads exactly one HTTP/1.1 response (Content-Length, chunked, or until EOF) from `s`.
fn read_response(s: &TcpStream) -> Result<HttpResponse> {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("connection closed before a response");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed inside the headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                content_length = Some(v.parse().context("bad Content-Length")?);
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size_txt = line.trim().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_txt, 16)
                .with_context(|| format!("bad chunk size {line:?}"))?;
            if size == 0 {
                // trailers until the empty line
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                        break;
                    }
                }
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = content_length {
        body.resize(n, 0);
        r.read_exact(&mut body).context("short body")?;
    } else {
        r.read_to_end(&mut body)?;
    }
    if !r.buffer().is_empty() {
        bail!("{} unexpected bytes after the response", r.buffer().len());
    }
    Ok(HttpResponse {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// One `GET path` over a fresh connection (`Connection: close`, 2 s timeouts): status and body.
pub fn http_request_new_conn(addr: SocketAddr, path: &str) -> Result<HttpResponse> {
    let mut s = connect(addr)?;
    send_request(&mut s, addr, path, true)?;
    read_response(&s).with_context(|| format!("GET {path} from {addr}"))
}

/// One `GET path` over a fresh connection; the body, or an error if the status is not 200.
/// Call it inside [`in_netns`] (or [`Lab::in_ns`]) to reach the lab's addresses. A refused
/// connection's error has a `std::io::Error` of kind `ConnectionRefused` in its chain (see
/// [`io_error_kind`]).
pub fn http_get_new_conn(addr: SocketAddr, path: &str) -> Result<String> {
    let r = http_request_new_conn(addr, path)?;
    if r.status != 200 {
        bail!(
            "GET {path} from {addr}: status {} body {:?}",
            r.status,
            r.body
        );
    }
    Ok(r.body)
}

/// The kind of the first `std::io::Error` in an error's chain.
pub fn io_error_kind(e: &anyhow::Error) -> Option<std::io::ErrorKind> {
    e.chain()
        .find_map(|c| c.downcast_ref::<std::io::Error>())
        .map(|e| e.kind())
}

/// Raises the soft open-file limit to the hard one (tests holding many sockets).
pub fn raise_nofile_limit() {
    unsafe {
        let mut l = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Idle HTTP keep-alive connections held open from a namespace (normally the client's).
pub struct KeepAlive {
    pub addr: SocketAddr,
    conns: Vec<TcpStream>,
}

impl KeepAlive {
    /// Opens `n` connections to `addr` from namespace `ns` (full name), sends `GET path` on each
    /// and reads the response, leaving the connection open. Returns the connections and the
    /// first response bodies (in order). Fails if any connection or response fails.
    pub fn open(
        ns: &str,
        addr: SocketAddr,
        n: usize,
        path: &str,
    ) -> Result<(KeepAlive, Vec<String>)> {
        raise_nofile_limit();
        let conns = in_netns(ns, || -> Result<Vec<TcpStream>> {
            (0..n)
                .map(|i| connect(addr).with_context(|| format!("connection {i}")))
                .collect()
        })?;
        let mut ka = KeepAlive { addr, conns };
        let bodies = ka.request_all(path)?;
        Ok((ka, bodies))
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Local (client) address of each connection.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.conns
            .iter()
            .filter_map(|c| c.local_addr().ok())
            .collect()
    }

    /// Another `GET path` on connection `i`; the body (error unless status 200).
    pub fn request(&mut self, i: usize, path: &str) -> Result<String> {
        let addr = self.addr;
        let s = self
            .conns
            .get_mut(i)
            .ok_or_else(|| anyhow!("no connection {i}"))?;
        send_request(s, addr, path, false).with_context(|| format!("connection {i}"))?;
        let r = read_response(s).with_context(|| format!("connection {i}: GET {path}"))?;
        if r.status != 200 {
            bail!(
                "connection {i}: GET {path}: status {} body {:?}",
                r.status,
                r.body
            );
        }
        Ok(r.body)
    }

    /// `GET path` on every connection, one after the other; every outcome.
    pub fn try_request_all(&mut self, path: &str) -> Vec<Result<String>> {
        (0..self.conns.len())
            .map(|i| self.request(i, path))
            .collect()
    }

    /// `GET path` on every connection; all bodies, or the first failure.
    pub fn request_all(&mut self, path: &str) -> Result<Vec<String>> {
        self.try_request_all(path).into_iter().collect()
    }

    /// Closes every connection (FIN); also happens on drop.
    pub fn close(self) {
        for c in &self.conns {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A config for the lab: director on `d0`, metrics off, the admin socket in the lab dir, one
/// service "web" at `198.18.0.100:80` (tcp, wlc, dr) with reals `198.18.0.1N:80` weighted by
/// `weights` (real 1 first). `extra_service_toml` lines go into the `[[service]]` table before
/// its reals (keys, or sub-tables such as `[service.check]`); a top-level key there
/// (`protocol`, `scheduler`, `forwarding`) replaces the default.
pub fn lab_config(lab: &Lab, weights: &[u32], extra_service_toml: &str) -> String {
    lab_config_port(lab, weights, extra_service_toml, 80)
}

/// The port nginx listens on in a NAT lab ([`Lab::up_nat`]).
pub const NAT_REAL_PORT: u16 = 8080;

/// [`lab_config`] with the reals at `real_port` (a NAT service's reals: `forwarding = "nat"`
/// in `extra_service_toml`).
pub fn lab_config_port(
    lab: &Lab,
    weights: &[u32],
    extra_service_toml: &str,
    real_port: u16,
) -> String {
    assert!(
        weights.len() <= lab.reals,
        "{} weights for {} reals",
        weights.len(),
        lab.reals
    );
    // Keys the extra text sets before any table header override the defaults.
    let mut overridden = Vec::new();
    for l in extra_service_toml.lines() {
        let l = l.trim();
        if l.starts_with('[') {
            break;
        }
        if let Some((k, _)) = l.split_once('=') {
            overridden.push(k.trim().to_string());
        }
    }
    let mut c = format!(
        "[director]\ninterface = \"d0\"\nmetrics = \"off\"\nadmin_socket = \"{}\"\n\n\
         [[service]]\nname = \"web\"\naddress = \"{VIP}:{VIP_PORT}\"\n",
        lab.dir.join("admin.sock").display()
    );
    for (k, v) in [
        ("protocol", "tcp"),
        ("scheduler", "wlc"),
        ("forwarding", "dr"),
    ] {
        if !overridden.iter().any(|o| o == k) {
            c.push_str(&format!("{k} = \"{v}\"\n"));
        }
    }
    if !extra_service_toml.trim().is_empty() {
        c.push_str(extra_service_toml.trim_end());
        c.push('\n');
    }
    for (i, w) in weights.iter().enumerate() {
        c.push_str(&format!(
            "\n[[service.real]]\naddress = \"{}:{real_port}\"\nweight = {w}\n",
            real_ip(i + 1)
        ));
    }
    c
}

fn admin_socket_of(config_toml: &str) -> PathBuf {
    toml::from_str::<toml::Value>(config_toml)
        .ok()
        .and_then(|v| {
            v.get("director")?
                .get("admin_socket")?
                .as_str()
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/run/xdpvs/admin.sock"))
}

/// The xdpvs daemon running in the lab's director namespace; stopped on drop (SIGTERM, up to
/// 5 s, then SIGKILL). Its log is printed when dropped during a panic.
pub struct Daemon {
    child: Child,
    pub bin: PathBuf,
    /// Full name of the director's namespace.
    pub ns: String,
    pub config_path: PathBuf,
    pub admin_socket: PathBuf,
    pub log_path: PathBuf,
}

/// Starts `xdpvs run --config <lab dir>/xdpvs.toml` in the director's namespace (RUST_LOG=info,
/// stdout and stderr to `<lab dir>/xdpvs.log`) and waits (10 s at most) until the admin socket
/// (the config's `[director] admin_socket`) exists and `xdpvs list` answers on it. Fails with the
/// log if the daemon exits or never becomes ready.
///
/// The daemon enters only the namespace's network (`nsenter --net`), not a private mount
/// namespace as `ip netns exec` makes, so its pinned dataplane lands in the host's bpffs and
/// outlives it, as on a real director (`lab.sh down` removes it).
pub fn spawn_xdpvs(lab: &Lab, config_toml: &str) -> Result<Daemon> {
    spawn_xdpvs_with(lab, config_toml, &[])
}

/// [`spawn_xdpvs`] with extra arguments to `xdpvs run` (e.g. `--fresh`).
pub fn spawn_xdpvs_with(lab: &Lab, config_toml: &str, run_args: &[&str]) -> Result<Daemon> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_xdpvs"));
    spawn_binary(lab, &bin, config_toml, run_args)
}

/// [`spawn_xdpvs_with`] running the binary at `bin` (an upgrade test runs a rebuilt copy).
pub fn spawn_binary(lab: &Lab, bin: &Path, config_toml: &str, run_args: &[&str]) -> Result<Daemon> {
    spawn_in(lab, "dir", bin, config_toml, run_args)
}

/// [`spawn_xdpvs_with`] in director host `host` of the lab (`"dir"`, or `"dir2"` of a pair:
/// its files are `xdpvs-dir2.toml` and `xdpvs-dir2.log`).
pub fn spawn_director(
    lab: &Lab,
    host: &str,
    config_toml: &str,
    run_args: &[&str],
) -> Result<Daemon> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_xdpvs"));
    spawn_in(lab, host, &bin, config_toml, run_args)
}

/// How [`spawn_launch`] starts the daemon, beyond [`spawn_xdpvs_with`]'s defaults.
#[derive(Default)]
pub struct Launch<'a> {
    /// Extra arguments to `xdpvs run`.
    pub run_args: &'a [&'a str],
    /// Extra environment variables (e.g. `NOTIFY_SOCKET`).
    pub env: Vec<(String, String)>,
    /// A command run between `nsenter` and the binary, which must exec it (e.g. `setpriv ...`),
    /// so that the child's pid stays the daemon's.
    pub wrapper: Vec<String>,
    /// Return once the process is spawned, without waiting for the admin socket (then
    /// [`Daemon::wait_ready`]).
    pub no_wait: bool,
}

/// [`spawn_xdpvs`] as `launch` says.
pub fn spawn_launch(lab: &Lab, config_toml: &str, launch: &Launch) -> Result<Daemon> {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_xdpvs"));
    spawn_in_launch(lab, "dir", &bin, config_toml, launch)
}

fn spawn_in(
    lab: &Lab,
    host: &str,
    bin: &Path,
    config_toml: &str,
    run_args: &[&str],
) -> Result<Daemon> {
    let launch = Launch {
        run_args,
        ..Launch::default()
    };
    spawn_in_launch(lab, host, bin, config_toml, &launch)
}

fn spawn_in_launch(
    lab: &Lab,
    host: &str,
    bin: &Path,
    config_toml: &str,
    launch: &Launch,
) -> Result<Daemon> {
    let bin = bin.to_path_buf();
    std::fs::create_dir_all(&lab.dir)?;
    let stem = if host == "dir" {
        "xdpvs".to_string()
    } else {
        format!("xdpvs-{host}")
    };
    let config_path = lab.dir.join(format!("{stem}.toml"));
    std::fs::write(&config_path, config_toml)
        .with_context(|| format!("write {}", config_path.display()))?;
    let log_path = lab.dir.join(format!("{stem}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    let ns = lab.ns(host);
    // nsenter execs the binary: the child's pid is the daemon's.
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(&launch.wrapper)
        .arg(&bin)
        .arg("run")
        .arg("--config")
        .arg(&config_path)
        .args(launch.run_args)
        .env("RUST_LOG", "info")
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let mut d = Daemon {
        child,
        bin,
        ns,
        config_path,
        admin_socket: admin_socket_of(config_toml),
        log_path,
    };
    if !launch.no_wait {
        d.wait_ready()?;
    }
    Ok(d)
}

/// Runs `xdpvs ARGS...` in the director's network namespace (`nsenter --net`, so it sees the
/// pinned dataplane); the whole output, whatever the status.
pub fn xdpvs_in(lab: &Lab, args: &[&str]) -> Result<Output> {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns("dir")))
        .arg(env!("CARGO_BIN_EXE_xdpvs"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run xdpvs in the director's namespace")
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits (10 s at most) until the admin socket exists and `xdpvs list` answers on it.
    /// Fails with the log if the daemon exits or never becomes ready.
    pub fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = self.child.try_wait()? {
                bail!("xdpvs exited early ({st}); log:\n{}", self.log());
            }
            // Ready: the admin socket exists, `list` answers, and the daemon still runs.
            let r = if self.admin_socket.exists() {
                self.list()
            } else {
                Err(anyhow!("no admin socket yet"))
            };
            match r {
                Ok(_) if self.child.try_wait()?.is_none() => return Ok(()),
                Ok(_) => continue,
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "xdpvs not ready after 10 s (last `list`: {e:#}); log:\n{}",
                        self.log()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `xdpvs list --socket <admin socket>` run in the director's namespace: its stdout.
    pub fn list(&self) -> Result<String> {
        self.admin(&["list"])
    }

    /// Any admin subcommand: `xdpvs <args...> --socket <admin socket>` in the director's
    /// namespace; stdout, or an error with stderr on a non-zero exit.
    pub fn admin(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(&self.bin)
            .args(args)
            .arg("--socket")
            .arg(&self.admin_socket)
            .stdin(Stdio::null())
            .output()
            .context("run xdpvs admin command")?;
        if !out.status.success() {
            bail!(
                "xdpvs {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sends SIGHUP (reload the config file).
    pub fn reload(&self) -> Result<()> {
        self.signal(libc::SIGHUP)
    }

    /// Replaces the config file (then [`Daemon::reload`], or wait for the file watcher).
    pub fn write_config(&self, config_toml: &str) -> Result<()> {
        std::fs::write(&self.config_path, config_toml)
            .with_context(|| format!("write {}", self.config_path.display()))
    }

    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        // The child is not reaped before Drop/stop, so its pid cannot have been reused.
        if unsafe { libc::kill(self.pid(), sig) } != 0 {
            bail!(
                "kill({}, {sig}): {}",
                self.pid(),
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Exit status if the daemon has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; the exit status (Err if it had to be killed).
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.child.try_wait()? {
            return Ok(st);
        }
        let _ = self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let st = self.child.wait()?;
        bail!("xdpvs did not stop within {grace:?} of SIGTERM; killed ({st})")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(5)) {
            eprintln!("{e:#}");
        }
        if std::thread::panicking() {
            eprintln!(
                "----- xdpvs log ({}) -----\n{}",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Polls `f` every 100 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

/// `n` requests from namespace `ns` to the VIP, each on a new connection: which real served each.
pub fn sample_reals(ns: &str, n: usize) -> Vec<usize> {
    in_netns(ns, || {
        (0..n)
            .map(|i| {
                let body = http_get_new_conn(vip_addr(), "/")
                    .unwrap_or_else(|e| panic!("request {i} failed: {e:#}"));
                real_of(&body).unwrap_or_else(|| panic!("body {body:?} names no real"))
            })
            .collect()
    })
}

/// The entry point of a `harness = false` bench: runs only under `cargo bench` (cargo passes
/// `--bench`; `cargo test --all-targets` must not run it), skips loudly without root, prints
/// the markdown `run` returns, and exits non-zero if it fails.
pub fn bench_main(name: &str, title: &str, run: impl FnOnce() -> Result<String>) {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("{name} bench: not run (run it with `cargo bench --bench {name}`)");
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        println!("## {title}\n\nSKIPPED (needs root)\n");
        eprintln!("SKIPPED (needs root): {name} bench");
        return;
    }
    match run() {
        Ok(md) => print!("{md}"),
        Err(e) => {
            eprintln!("{name} bench failed: {e:#}");
            std::process::exit(1);
        }
    }
}

/// Runs `cmd` (stdin closed); its stdout, or an error naming `what` with its stderr.
pub fn sh(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The director's MAC address (`d0` of `dir`), for crafted frames.
pub fn director_mac(lab: &Lab) -> String {
    lab.exec_ok("dir", &["cat", "/sys/class/net/d0/address"])
        .expect("director MAC")
        .trim()
        .to_string()
}

/// Starts `trafgen` with the frame config `conf` (written to the lab dir as `name`) from the
/// pair lab's second director namespace (`dir2`, running nothing: an attacker's host on the
/// segment, so the flood does not share the client's interface), for `secs` seconds at `pps`,
/// at most `max` frames. Its stderr is piped, for the caller to report.
pub fn flood_from_dir2(lab: &Lab, name: &str, conf: &str, secs: u64, pps: u32, max: u64) -> Child {
    let path = lab.dir.join(name);
    std::fs::write(&path, conf).expect("write trafgen config");
    Command::new("timeout")
        .args([
            &format!("{secs}"),
            "ip",
            "netns",
            "exec",
            &lab.ns("dir2"),
            "trafgen",
        ])
        .args(["--dev", "d0", "--conf"])
        .arg(&path)
        .args([
            "--num",
            &max.to_string(),
            "--cpus",
            "1",
            "--rate",
            &format!("{pps}pps"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trafgen starts (netsniff-ng)")
}
