//! End to end, issue 14 item 2: the daemon as systemd runs it from `packaging/xdpvs.service`.
//! The real binary in a netns lab, with `NOTIFY_SOCKET` pointing at a datagram socket this test
//! binds (as systemd does for `Type=notify`), and with exactly the unit's capability bounding
//! set and `NoNewPrivileges` (setpriv), so the unit's privileges are shown to be enough to load
//! the XDP program, pin it, adopt it after a restart and serve.
//!
//! Checked: READY=1 only once the XDP program is attached and the VIP serves; RELOADING=1 with
//! MONOTONIC_USEC, then READY=1, on SIGHUP and on `xdpvs reload`; a rejected reload ends in
//! READY=1 with a STATUS naming the error; STOPPING=1 on SIGTERM; every message from the main
//! pid (systemd's default NotifyAccess=main drops others). A notify socket that does not exist
//! is logged once and changes nothing else. Needs root.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{lab_config, vip_addr, Daemon, Lab, Launch};

/// The unit the package installs.
fn unit_text() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/xdpvs.service");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The value of `key=` in the unit (the last assignment wins, as in systemd).
fn unit_setting(unit: &str, key: &str) -> Option<String> {
    unit.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim().to_string())
}

/// `setpriv` with the unit's capability bounding set (and nothing inheritable), and
/// no_new_privs if the unit sets NoNewPrivileges: what systemd gives a root service.
fn unit_privileges() -> Vec<String> {
    let unit = unit_text();
    let caps = unit_setting(&unit, "CapabilityBoundingSet").expect("the unit bounds capabilities");
    let names: Vec<String> = caps
        .split_whitespace()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            format!("+{}", c.strip_prefix("cap_").unwrap_or(&c))
        })
        .collect();
    assert!(!names.is_empty(), "CapabilityBoundingSet is empty");
    let mut w = vec![
        "setpriv".to_string(),
        format!("--bounding-set=-all,{}", names.join(",")),
        "--inh-caps=-all".to_string(),
    ];
    if unit_setting(&unit, "NoNewPrivileges").as_deref() == Some("yes") {
        w.push("--no-new-privs".to_string());
    }
    w.push("--".to_string());
    w
}

/// The daemon runs with the unit's bounding set, nothing more effective, and no_new_privs.
fn assert_unit_privileges(pid: i32) {
    // nsenter and setpriv exec the daemon in turn: wait until the pid is the daemon.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_xdpvs"));
    common::wait_for("the daemon's exec", Duration::from_secs(5), || {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == bin)
    });
    let unit = unit_text();
    let want = unit_setting(&unit, "CapabilityBoundingSet")
        .expect("the unit bounds capabilities")
        .split_whitespace()
        .count() as u32;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{k} not in /proc/{pid}/status"))
    };
    let mask = |k: &str| u64::from_str_radix(&field(k), 16).expect("a capability mask");
    assert_eq!(mask("CapBnd:").count_ones(), want, "{status}");
    assert_eq!(mask("CapEff:"), mask("CapBnd:"), "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
}

/// One sd_notify datagram: its assignments and the sender's pid (SCM_CREDENTIALS).
#[derive(Debug)]
struct Message {
    pid: i32,
    fields: Vec<(String, String)>,
}

impl Message {
    fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The service manager's end: a datagram socket that receives the senders' credentials.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every message received so far, for failure messages.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> NotifySocket {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        let on: libc::c_int = 1;
        use std::os::fd::AsRawFd;
        // SAFETY: setsockopt reads an int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PASSCRED,
                &on as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_PASSCRED: {}", std::io::Error::last_os_error());
        NotifySocket {
            sock,
            path,
            seen: Vec::new(),
        }
    }

    /// The next message, or None after `timeout`.
    fn recv(&mut self, timeout: Duration) -> Option<Message> {
        use std::os::fd::AsRawFd;
        self.sock
            .set_read_timeout(Some(timeout))
            .expect("set_read_timeout");
        let mut buf = [0u8; 4096];
        let mut cmsg = [0u8; 128];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; every pointer in it points at a live local buffer.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = cmsg.len();
        // SAFETY: as above; recvmsg writes at most the lengths given.
        let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "recvmsg: {e}"
            );
            return None;
        }
        let mut pid = -1;
        // SAFETY: the CMSG_* macros walk the control buffer recvmsg filled in.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_CREDENTIALS {
                    let cred = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::ucred);
                    pid = cred.pid;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let text = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
        self.seen.push(text.clone());
        let fields = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Message { pid, fields })
    }

    /// Waits for a message with `key=value` (others before it are kept in `seen`).
    fn wait_for(&mut self, key: &str, value: &str, timeout: Duration) -> Message {
        let end = Instant::now() + timeout;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.recv(left) {
                Some(m) if m.get(key) == Some(value) => return m,
                Some(_) => continue,
                None => break,
            }
        }
        panic!(
            "no {key}={value} within {timeout:?}; messages so far: {:#?}",
            self.seen
        );
    }

    /// Everything that arrives within `quiet` (nothing at all is expected).
    fn drain(&mut self, quiet: Duration) -> Vec<Message> {
        let mut v = Vec::new();
        while let Some(m) = self.recv(quiet) {
            v.push(m);
        }
        v
    }
}

fn monotonic_usec() -> i128 {
    // SAFETY: clock_gettime writes the timespec.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as i128 * 1_000_000 + ts.tv_nsec as i128 / 1000
}

/// A GET to the VIP from the client, on a new connection: the body.
fn get_vip(lab: &Lab) -> anyhow::Result<String> {
    lab.in_ns("client", || common::http_get_new_conn(vip_addr(), "/"))
}

/// Runs `trigger`, then expects RELOADING=1 (with MONOTONIC_USEC: CLOCK_MONOTONIC between the
/// trigger and the message) and the READY=1 that ends the reload; READY's STATUS.
fn reload_cycle(
    ns: &mut NotifySocket,
    d: &Daemon,
    what: &str,
    trigger: impl FnOnce(&Daemon),
) -> String {
    let before = monotonic_usec();
    trigger(d);
    let r = ns.wait_for("RELOADING", "1", Duration::from_secs(10));
    let after = monotonic_usec();
    assert_eq!(r.pid, d.pid(), "{what}: RELOADING=1 not from the main pid");
    let mono: i128 = r
        .get("MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("{what}: RELOADING=1 without MONOTONIC_USEC: {r:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(
        (before..=after).contains(&mono),
        "{what}: MONOTONIC_USEC={mono} is not the time of the message ({before}..={after})"
    );
    let ready = ns.wait_for("READY", "1", Duration::from_secs(10));
    assert_eq!(ready.pid, d.pid(), "{what}: READY=1 not from the main pid");
    ready
        .get("STATUS")
        .unwrap_or_else(|| panic!("{what}: READY=1 without STATUS: {ready:?}"))
        .to_string()
}

#[test]
#[ignore = "needs root"]
fn systemd_notifications_follow_start_reload_and_stop() {
    if !common::require_root("systemd_notifications_follow_start_reload_and_stop") {
        return;
    }
    let lab = Lab::up("xnt", 2).expect("lab up");
    std::fs::create_dir_all(&lab.dir).expect("lab dir");
    let mut ns = NotifySocket::bind(lab.dir.join("notify.sock"));
    let good = lab_config(&lab, &[1, 1], "");
    let launch = Launch {
        env: vec![("NOTIFY_SOCKET".to_string(), ns.path.display().to_string())],
        wrapper: unit_privileges(),
        no_wait: true,
        ..Launch::default()
    };
    let mut d = common::spawn_launch(&lab, &good, &launch).expect("xdpvs starts");
    assert_unit_privileges(d.pid());

    // Start: READY=1 arrives once the program is attached and the config is in its maps; the
    // VIP serves at that moment, on the first try.
    let ready = ns.wait_for("READY", "1", Duration::from_secs(15));
    let served = get_vip(&lab);
    let log = d.log();
    assert_eq!(ready.pid, d.pid(), "READY=1 not from the main pid");
    assert!(
        log.contains("XDP program attached; dataplane pinned"),
        "READY=1 before the XDP program was attached; log:\n{log}"
    );
    let body = served.unwrap_or_else(|e| panic!("the VIP does not serve at READY=1: {e:#}"));
    assert!(
        common::real_of(&body).is_some(),
        "not a real's answer: {body:?}"
    );
    let status = ready.get("STATUS").expect("READY=1 carries a STATUS");
    assert_eq!(
        status, "1 service, 2/2 reals up, interface d0",
        "start STATUS"
    );
    d.wait_ready().expect("the admin socket answers");

    // SIGHUP (systemctl reload: ExecReload=kill -HUP) with a changed weight.
    d.write_config(&lab_config(&lab, &[1, 2], ""))
        .expect("write config");
    let status = reload_cycle(&mut ns, &d, "SIGHUP", |d| d.reload().expect("SIGHUP"));
    assert_eq!(status, "reloaded; 1 service, 2/2 reals up, interface d0");

    // A bad config: rejected, the daemon is READY again, and STATUS says why.
    let bad = good.replace("weight = 1", "weight = \"heavy\"");
    assert_ne!(bad, good);
    d.write_config(&bad).expect("write config");
    let status = reload_cycle(&mut ns, &d, "rejected reload", |d| {
        d.reload().expect("SIGHUP")
    });
    assert!(
        status.contains("last reload rejected")
            && status.contains("xdpvs.toml")
            && status.contains("weight"),
        "the STATUS of a rejected reload does not name the error: {status:?}"
    );
    assert!(
        status.starts_with("1 service, 2/2 reals up, interface d0; "),
        "{status:?}"
    );
    get_vip(&lab).expect("the VIP serves after the rejected reload");

    // `xdpvs reload` (admin socket) after fixing the file: accepted, the note is gone.
    d.write_config(&good).expect("write config");
    let status = reload_cycle(&mut ns, &d, "xdpvs reload", |d| {
        let out = d.admin(&["reload"]).expect("xdpvs reload");
        assert!(out.contains("reloaded"), "{out}");
    });
    assert_eq!(status, "reloaded; 1 service, 2/2 reals up, interface d0");

    // A real goes down: STATUS follows (no READY or RELOADING with it).
    lab.stop_nginx(2).expect("stop nginx on r2");
    let m = {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let left = end
                .checked_duration_since(Instant::now())
                .expect("STATUS after a real failed");
            let m = ns.recv(left).expect("STATUS after a real failed");
            if m.get("STATUS").is_some_and(|s| s.contains("1/2 reals up")) {
                break m;
            }
        }
    };
    assert!(
        m.get("READY").is_none() && m.get("RELOADING").is_none(),
        "{m:?}"
    );
    lab.start_nginx(2).expect("start nginx on r2");

    // SIGTERM: STOPPING=1, then a clean exit.
    d.signal(libc::SIGTERM).expect("SIGTERM");
    let stopping = ns.wait_for("STOPPING", "1", Duration::from_secs(10));
    assert_eq!(stopping.pid, d.pid(), "STOPPING=1 not from the main pid");
    assert!(
        stopping
            .get("STATUS")
            .is_some_and(|s| s.starts_with("stopping (SIGTERM)")),
        "{stopping:?}"
    );
    let st = d.stop(Duration::from_secs(10)).expect("xdpvs exits");
    assert!(st.success(), "xdpvs exited with {st}; log:\n{}", d.log());
    drop(d);

    // Restart with the same privileges and a notify socket that is gone: the pinned dataplane
    // is adopted and serves; the failing notify is logged once and nothing else changes.
    let gone = lab.dir.join("no-such-notify.sock");
    let launch = Launch {
        env: vec![("NOTIFY_SOCKET".to_string(), gone.display().to_string())],
        wrapper: unit_privileges(),
        ..Launch::default()
    };
    let mut d = common::spawn_launch(&lab, &good, &launch).expect("xdpvs restarts");
    assert_unit_privileges(d.pid());
    get_vip(&lab).expect("the VIP serves after the restart");
    d.reload().expect("SIGHUP");
    let restart = || {
        let log = d.log();
        log[log.rfind("starting xdpvs").expect("second start")..].to_string()
    };
    common::wait_for("the reload", Duration::from_secs(10), || {
        restart().contains("configuration reloaded")
    });
    let restart = restart();
    assert!(
        restart.contains("adopted the pinned dataplane"),
        "{restart}"
    );
    assert_eq!(
        restart.matches("sd_notify failed").count(),
        1,
        "the failing notify is logged once: {restart}"
    );
    let st = d.stop(Duration::from_secs(10)).expect("xdpvs exits");
    assert!(st.success(), "{st}");
    assert!(
        ns.drain(Duration::from_millis(200)).is_empty(),
        "messages after the first daemon stopped"
    );
}
