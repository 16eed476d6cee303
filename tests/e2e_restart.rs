//! End to end, issue "restart without loss": the dataplane is pinned and outlives the daemon;
//! a new daemon adopts it (crash, restart, upgrade) without dropping or moving a connection;
//! `detach` and `--fresh`; one daemon per dataplane; a layout mismatch is refused whole; a
//! host with forwarding off is refused at start. The real binary, a netns lab, nginx. Needs root.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{
    http_get_new_conn, lab_config, real_of, spawn_binary, spawn_xdpvs, spawn_xdpvs_with, vip_addr,
    wait_for, xdpvs_in, Daemon, KeepAlive, Lab,
};
use xdpvs::admin::Status;

fn status(d: &Daemon) -> Status {
    serde_json::from_str(&d.admin(&["list", "--json"]).expect("list --json")).expect("json")
}

/// The table read from the pinned maps by `xdpvs list --config`, with no daemon running.
fn offline_status(lab: &Lab, cfg: &std::path::Path) -> Status {
    let out = xdpvs_in(lab, &["list", "--json", "--config", cfg.to_str().unwrap()]).unwrap();
    assert!(
        out.status.success(),
        "offline list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// ActiveConn per real address.
fn active(st: &Status) -> BTreeMap<String, u64> {
    st.services
        .iter()
        .flat_map(|s| s.reals.iter().map(|r| (r.address.clone(), r.active)))
        .collect()
}

/// A new connection from the client every `every`, counting answers and failures; pausable so
/// that connection counts can be compared at rest.
struct Steady {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Steady {
    fn start(lab: &Lab, every: Duration) -> Steady {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let ns = lab.ns("client");
        let (s, p, o, f, e) = (
            stop.clone(),
            pause.clone(),
            ok.clone(),
            failed.clone(),
            errors.clone(),
        );
        let thread = std::thread::spawn(move || {
            common::in_netns(&ns, || {
                // Bounded: stops by itself after 90 s even if the test forgets it.
                let end = Instant::now() + Duration::from_secs(90);
                while !s.load(Ordering::SeqCst) && Instant::now() < end {
                    if p.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                    match http_get_new_conn(vip_addr(), "/") {
                        Ok(b) if real_of(&b).is_some() => {
                            o.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(b) => {
                            f.fetch_add(1, Ordering::SeqCst);
                            e.lock().unwrap().push(format!("unexpected body {b:?}"));
                        }
                        Err(err) => {
                            f.fetch_add(1, Ordering::SeqCst);
                            e.lock().unwrap().push(format!("{err:#}"));
                        }
                    }
                    std::thread::sleep(every);
                }
            })
        });
        Steady {
            stop,
            pause,
            ok,
            failed,
            errors,
            thread: Some(thread),
        }
    }

    /// Pauses new connections and lets the last one finish.
    fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }

    fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let (ok, failed) = self.counts();
        let errors = self.errors.lock().unwrap().clone();
        (ok, failed, errors)
    }
}

impl Drop for Steady {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Whether an XDP program is attached to the director's `d0`.
fn xdp_attached(lab: &Lab) -> bool {
    let out = lab
        .exec("dir", &["ip", "-o", "link", "show", "d0"])
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

fn pin_dir(lab: &Lab) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/sys/fs/bpf/xdpvs/{}/d0", lab.ns("dir")))
}

/// Checks the held connections answer, each from the real it had before.
fn held_still_answer(held: &mut KeepAlive, before: &[String], when: &str) {
    let now: Vec<String> = held
        .try_request_all("/")
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.unwrap_or_else(|e| panic!("{when}: held connection {i} failed: {e:#}")))
        .collect();
    assert_eq!(
        now, before,
        "{when}: a held connection moved to another real"
    );
}

#[test]
#[ignore = "needs root"]
fn crash_and_upgrade_keep_every_connection() {
    if !common::require_root("crash_and_upgrade_keep_every_connection") {
        return;
    }
    let lab = Lab::up("rsk9", 4).expect("lab");
    let cfg = lab_config(&lab, &[1, 1, 1], "");
    let mut d = spawn_xdpvs(&lab, &cfg).expect("daemon");
    let (mut held, bodies) = KeepAlive::open(&lab.ns("client"), vip_addr(), 12, "/").unwrap();
    let steady = Steady::start(&lab, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(1));

    // --- kill -9, restart after a second
    steady.pause();
    let before = active(&status(&d));
    assert_eq!(
        before.values().sum::<u64>(),
        12,
        "ActiveConn before: {before:?}"
    );
    steady.resume();
    d.signal(libc::SIGKILL).unwrap();
    let _ = d.stop(Duration::from_secs(2));
    assert!(xdp_attached(&lab), "the program went away with the daemon");
    std::thread::sleep(Duration::from_millis(500));
    // While no daemon runs, `list` reads the pinned maps and says so.
    let off = offline_status(&lab, &d.config_path);
    assert!(off.offline.is_some(), "offline list not marked as such");
    steady.pause();
    let off = offline_status(&lab, &d.config_path);
    assert_eq!(active(&off), before, "offline ActiveConn");
    steady.resume();
    std::thread::sleep(Duration::from_millis(500));
    let (ok_gap, failed_gap) = steady.counts();
    let mut d = spawn_xdpvs(&lab, &cfg).expect("restart");
    assert!(
        d.log().contains("adopted the pinned dataplane"),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains("map_writes=0"),
        "an unchanged config must write nothing after adopt:\n{}",
        d.log()
    );
    steady.pause();
    let after = active(&status(&d));
    steady.resume();
    assert_eq!(after, before, "ActiveConn after adopt");
    held_still_answer(&mut held, &bodies, "after kill -9 and restart");
    println!("kill -9: up to the restart {ok_gap} requests answered, {failed_gap} failed");

    // --- SIGTERM and a rebuilt binary (the upgrade path)
    let upgraded = lab.dir.join("xdpvs-upgraded");
    std::fs::copy(&d.bin, &upgraded).unwrap();
    let st = d
        .stop(Duration::from_secs(5))
        .expect("SIGTERM stops the daemon");
    assert!(st.success(), "exit status {st}");
    assert!(
        d.log().contains("stays pinned and keeps forwarding"),
        "{}",
        d.log()
    );
    assert!(xdp_attached(&lab), "SIGTERM detached the program");
    std::thread::sleep(Duration::from_secs(1));
    let mut d = spawn_binary(&lab, &upgraded, &cfg, &[]).expect("upgraded daemon");
    steady.pause();
    let after = active(&status(&d));
    steady.resume();
    assert_eq!(after, before, "ActiveConn after the upgrade");
    held_still_answer(&mut held, &bodies, "after SIGTERM and the upgrade");

    // --- a reload after adopt changes only what the file changed
    steady.pause();
    let before_reload = status(&d);
    steady.resume();
    let cfg2 = lab_config(&lab, &[1, 1, 1, 1], "");
    d.write_config(&cfg2).unwrap();
    d.reload().unwrap();
    wait_for("the reload", Duration::from_secs(5), || {
        d.log().matches("configuration reloaded").count() >= 1
    });
    steady.pause();
    let after_reload = status(&d);
    steady.resume();
    let rows = |s: &Status| -> Vec<(String, u32, u64)> {
        s.services[0]
            .reals
            .iter()
            .map(|r| (r.address.clone(), r.weight, r.active))
            .collect()
    };
    let (old, new) = (rows(&before_reload), rows(&after_reload));
    assert_eq!(new.len(), 4, "{new:?}");
    assert_eq!(&new[..3], &old[..], "the three unchanged reals changed");
    assert_eq!(new[3].0, common::real_addr(4).to_string());
    held_still_answer(&mut held, &bodies, "after the reload");
    // The added real takes new connections (it is the least loaded).
    steady.pause();
    wait_for(
        "real 4 to take connections",
        Duration::from_secs(10),
        || http_get_new_conn_from(&lab).as_deref() == Some("r4"),
    );
    steady.resume();
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed, errors) = steady.finish();
    println!("steady traffic: {ok} requests answered, {failed} failed, over a kill -9 + restart, a SIGTERM + upgrade, and a reload");
    assert!(ok > 100, "too little traffic to mean anything: {ok}");
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    let _ = d.stop(Duration::from_secs(5));
}

/// One new-connection request from the client; the real's name (`"r4"`).
fn http_get_new_conn_from(lab: &Lab) -> Option<String> {
    lab.in_ns("client", || http_get_new_conn(vip_addr(), "/"))
        .ok()
        .map(|b| b.trim().to_string())
}

#[test]
#[ignore = "needs root"]
fn detach_removes_everything_and_fresh_starts_empty() {
    if !common::require_root("detach_removes_everything_and_fresh_starts_empty") {
        return;
    }
    let lab = Lab::up("rsdt", 2).expect("lab");
    let cfg = lab_config(&lab, &[1, 1], "");
    let mut d = spawn_xdpvs(&lab, &cfg).expect("daemon");
    let (mut held, _) = KeepAlive::open(&lab.ns("client"), vip_addr(), 2, "/").unwrap();

    // A second daemon on the same dataplane is refused, naming the first. Run to its exit
    // (bounded): a readiness poll would be answered by the first daemon's admin socket.
    let second = std::process::Command::new("timeout")
        .arg("10")
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", lab.ns("dir")))
        .arg(&d.bin)
        .args(["run", "--config", d.config_path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr).into_owned()
        + &String::from_utf8_lossy(&second.stdout);
    assert_eq!(
        second.status.code(),
        Some(2),
        "a second daemon must be refused: {err}"
    );
    assert!(err.contains("another xdpvs is running"), "{err}");
    assert!(err.contains(&format!("pid {}", d.pid())), "{err}");
    // ... and `detach` is refused while the daemon runs.
    let cfg_path = d.config_path.to_str().unwrap().to_string();
    let out = xdpvs_in(&lab, &["detach", "--config", &cfg_path]).unwrap();
    assert!(
        !out.status.success(),
        "detach with a daemon running succeeded"
    );

    // --fresh after a crash: the pinned table is discarded.
    d.signal(libc::SIGKILL).unwrap();
    let _ = d.stop(Duration::from_secs(2));
    assert_eq!(offline_status(&lab, &d.config_path).conntrack_entries, 2);
    let mut d = spawn_xdpvs_with(&lab, &cfg, &["--fresh"]).expect("fresh daemon");
    let st = status(&d);
    assert_eq!(st.conntrack_entries, 0, "--fresh kept connections");
    assert_eq!(active(&st).values().sum::<u64>(), 0);
    // The held connections were lost with the table: their next packet misses it.
    assert!(
        held.try_request_all("/").iter().all(|r| r.is_err()),
        "a held connection survived --fresh"
    );
    let _ = lab
        .in_ns("client", || http_get_new_conn(vip_addr(), "/"))
        .unwrap();

    // Stop (pins stay), then detach: no program, no pin.
    d.stop(Duration::from_secs(5)).unwrap();
    assert!(xdp_attached(&lab) && pin_dir(&lab).exists());
    let out = xdpvs_in(&lab, &["detach", "--config", &cfg_path]).unwrap();
    assert!(
        out.status.success(),
        "detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !xdp_attached(&lab),
        "a program is still attached after detach"
    );
    assert!(!pin_dir(&lab).exists(), "pins left behind after detach");
    // Without the program the director's own kernel answers for the VIP: nothing listens.
    let r = lab.in_ns("client", || http_get_new_conn(vip_addr(), "/"));
    assert!(r.is_err(), "a request was balanced after detach: {r:?}");
}

#[test]
#[ignore = "needs root"]
fn on_exit_detach_leaves_nothing() {
    if !common::require_root("on_exit_detach_leaves_nothing") {
        return;
    }
    let lab = Lab::up("rsox", 1).expect("lab");
    let cfg = lab_config(&lab, &[1], "").replacen(
        "[director]\n",
        "[director]\non_exit = \"detach\"\n",
        1,
    );
    let mut d = spawn_xdpvs(&lab, &cfg).expect("daemon");
    assert!(xdp_attached(&lab) && pin_dir(&lab).exists());
    d.stop(Duration::from_secs(5)).unwrap();
    assert!(
        !xdp_attached(&lab),
        "on_exit = detach left the program attached"
    );
    assert!(!pin_dir(&lab).exists(), "on_exit = detach left pins");
}

#[test]
#[ignore = "needs root"]
fn layout_mismatch_is_refused_and_changes_nothing() {
    if !common::require_root("layout_mismatch_is_refused_and_changes_nothing") {
        return;
    }
    let lab = Lab::up("rslm", 1).expect("lab");
    let cfg = lab_config(&lab, &[1], "");
    let mut d = spawn_xdpvs(&lab, &cfg).expect("daemon");
    let (mut held, bodies) = KeepAlive::open(&lab.ns("client"), vip_addr(), 2, "/").unwrap();
    d.stop(Duration::from_secs(5)).unwrap();

    // Simulate maps pinned by a build with another layout: version 99 in the LAYOUT record.
    let layout = pin_dir(&lab).join("LAYOUT");
    let mut value: Vec<String> = vec!["99", "0", "0", "0"]
        .into_iter()
        .map(String::from)
        .collect();
    value.extend(std::iter::repeat_n("0".to_string(), 12));
    let out = std::process::Command::new("bpftool")
        .args(["map", "update", "pinned", layout.to_str().unwrap()])
        .args(["key", "0", "0", "0", "0", "value"])
        .args(&value)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let refused = spawn_xdpvs(&lab, &cfg);
    let err = format!(
        "{:#}",
        refused
            .err()
            .expect("a layout mismatch must refuse to start")
    );
    assert!(err.contains("another map layout"), "{err}");
    assert!(err.contains("layout version 99"), "{err}");
    assert!(err.contains("--fresh"), "{err}");
    // Nothing was half-adopted: the old program still forwards the held connections.
    assert!(xdp_attached(&lab));
    held_still_answer(&mut held, &bodies, "after the refused start");
    // And --fresh starts clean.
    let d = spawn_xdpvs_with(&lab, &cfg, &["--fresh"]).expect("fresh start");
    assert_eq!(status(&d).conntrack_entries, 0);
}

#[test]
#[ignore = "needs root"]
fn forwarding_off_is_refused_naming_the_sysctl() {
    if !common::require_root("forwarding_off_is_refused_naming_the_sysctl") {
        return;
    }
    let lab = Lab::up("rsfw", 1).expect("lab");
    lab.exec_ok("dir", &["sysctl", "-qw", "net.ipv4.conf.all.forwarding=0"])
        .unwrap();
    let cfg = lab_config(&lab, &[1], "");
    let err = format!(
        "{:#}",
        spawn_xdpvs(&lab, &cfg).err().expect("must refuse to start")
    );
    assert!(err.contains("net.ipv4.conf.all.forwarding=1"), "{err}");
    assert!(err.contains("forwarding is off on d0"), "{err}");
    assert!(!xdp_attached(&lab), "refused start attached a program");
}
