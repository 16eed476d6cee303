//! End to end, issue 9: two xdpvs directors as a VRRP pair (priorities 150 and 100) in front
//! of real nginx reals, a client opening a new connection every 10 ms. The master fails three
//! ways (its link cut, `kill -9`, SIGTERM), each followed by a preempting failback; the test
//! measures the client's outage each time and holds it to RFC 5798's own detection time:
//! Master_Down_Interval (3 x advert + Skew_Time) + 50 ms, or Skew_Time + 50 ms for a clean
//! stop, which sends priority 0.
//!
//! The client's outage is the longest time between the starts of two consecutive successful
//! connections (each attempt: connect within 300 ms, `GET /`, answer within 300 ms).

mod common;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aya::maps::{Array as BpfArray, HashMap as BpfHashMap, Map, MapData};
use common::{lab_config, spawn_director, Daemon, KeepAlive, Lab};
use xdpvs_common::{state, Conn, ConnKey, Real};

const PRIO_A: u8 = 150;
const PRIO_B: u8 = 100;

/// Held keep-alive connections through the pair, as the acceptance asks.
const HELD: usize = 50;

fn pair_config(lab: &Lab, host: &str, priority: u8, advert_ms: u64) -> String {
    let c = lab_config(lab, &[1, 1], "").replace("admin.sock", &format!("admin-{host}.sock"));
    let key = lab.dir.join("sync.key");
    if !key.exists() {
        std::fs::write(&key, format!("{}\n", "a5".repeat(32))).expect("key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("0600");
    }
    let (me, peer) = if host == "dir" {
        ("198.18.0.2", "198.18.0.3")
    } else {
        ("198.18.0.3", "198.18.0.2")
    };
    format!(
        "{c}\n[[vrrp]]\nname = \"front\"\ninterface = \"d0\"\nvirtual_router_id = 51\n\
         priority = {priority}\nadvert_interval = \"{advert_ms}ms\"\npreempt = true\n\
         addresses = [\"198.18.0.100/32\"]\ntrack_services = [\"web\"]\n\n\
         [sync]\nlisten = \"{me}:8899\"\npeer = \"{peer}:8899\"\nkey_file = \"{}\"\n",
        key.display()
    )
}

/// ActiveConn per real (address -> count) from `xdpvs list --json`.
fn active(d: &Daemon) -> BTreeMap<String, u64> {
    let st: xdpvs::admin::Status =
        serde_json::from_str(&d.admin(&["list", "--json"]).unwrap_or_default()).unwrap_or_default();
    st.services
        .iter()
        .flat_map(|s| s.reals.iter().map(|r| (r.address.clone(), r.active)))
        .collect()
}

/// A director's connection table as its pinned maps hold it: client port -> (real, state),
/// for the client's flows to VIP:80.
fn table(lab: &Lab, host: &str) -> BTreeMap<u16, (String, u32)> {
    let dir = format!("/sys/fs/bpf/xdpvs/{}/d0", lab.ns(host));
    let open = |name: &str| {
        let data = MapData::from_pin(format!("{dir}/{name}")).expect("pinned map");
        Map::from_map_data(data).expect("map")
    };
    let conns: BpfHashMap<_, ConnKey, Conn> = BpfHashMap::try_from(open("CONNS")).expect("CONNS");
    let reals: BpfArray<_, Real> = BpfArray::try_from(open("REALS")).expect("REALS");
    let client = u32::from_ne_bytes(common::CLIENT_IP.octets());
    conns
        .iter()
        .filter_map(|e| e.ok())
        .filter(|(k, _)| k.src.w[0] == client && k.dport == 80u16.to_be())
        .map(|(k, c)| {
            let r = reals.get(&c.real, 0).expect("real");
            let ip = std::net::Ipv4Addr::from(r.addr.w[0].to_ne_bytes());
            let real = format!("{ip}:{}", u16::from_be(r.port));
            (u16::from_be(k.sport), (real, c.state))
        })
        .collect()
}

/// Every held connection is in the director's table, established, on the real it started on,
/// ActiveConn per real is exactly the table's established entries, and every held connection
/// answers again from its real. New connections that failed around the event may stay
/// established in the table (the director saw their handshake, then the client's RST was lost
/// with the link), as in IPVS, until their idle timeout: they count, and must.
fn held_continue(
    what: &str,
    lab: &Lab,
    held: &mut KeepAlive,
    bodies: &[String],
    d: &Daemon,
    host: &str,
) -> usize {
    let who = if host == "dir" { "A" } else { "B" };
    let ports: Vec<u16> = held.local_addrs().iter().map(|a| a.port()).collect();
    let t = table(lab, host);
    for (i, port) in ports.iter().enumerate() {
        let want = common::real_addr(common::real_of(&bodies[i]).expect("a real")).to_string();
        match t.get(port) {
            Some((real, st)) => {
                assert_eq!(real, &want, "{what}: held connection {i} on {who} moved");
                assert_eq!(
                    *st,
                    state::ESTABLISHED,
                    "{what}: held connection {i} on {who}"
                );
            }
            None => panic!("{what}: held connection {i} (port {port}) is not in {who}'s table"),
        }
    }
    let mut established: BTreeMap<String, u64> = BTreeMap::new();
    for (real, st) in t.values() {
        if *st == state::ESTABLISHED {
            *established.entry(real.clone()).or_insert(0) += 1;
        }
    }
    let strays = established.values().sum::<u64>() - ports.len() as u64;
    if strays > 0 {
        println!(
            "  {what}: {who} also holds {strays} established entries of failed new connections"
        );
    }
    let listed: BTreeMap<String, u64> = active(d).into_iter().filter(|(_, n)| *n > 0).collect();
    assert_eq!(
        listed, established,
        "{what}: {who}'s ActiveConn per real is its table's"
    );
    let answers = held.try_request_all("/");
    let mut ok = 0;
    for (i, r) in answers.iter().enumerate() {
        match r {
            Ok(body) if body == &bodies[i] => ok += 1,
            Ok(body) => panic!(
                "{what}: held connection {i} moved from {} to {body}",
                bodies[i]
            ),
            Err(e) => println!("  {what}: held connection {i} failed: {e:#}"),
        }
    }
    assert_eq!(
        ok,
        bodies.len(),
        "{what}: held connections that kept working through {who}"
    );
    ok
}

/// RFC 5798 6.1 timings of the backup (priority `PRIO_B`).
fn skew(advert: Duration) -> Duration {
    advert * (256 - u32::from(PRIO_B)) / 256
}

fn master_down(advert: Duration) -> Duration {
    advert * 3 + skew(advert)
}

/// The VRRP line of `xdpvs list`, e.g. "VRRP front (d0 vrid 51): MASTER priority 150 ...".
fn vrrp_state(d: &Daemon) -> String {
    d.list()
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("VRRP front"))
                .map(str::to_string)
        })
        .unwrap_or_default()
}

fn is_master(d: &Daemon) -> bool {
    vrrp_state(d).contains("): MASTER")
}

fn is_backup(d: &Daemon) -> bool {
    vrrp_state(d).contains("): BACKUP")
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn has_vip(lab: &Lab, host: &str) -> bool {
    lab.exec_ok(host, &["ip", "-4", "addr", "show", "dev", "d0"])
        .is_ok_and(|o| o.contains("198.18.0.100/32"))
}

/// One connection attempt from the client: connect, `GET /`, an answer from a real; `Err`
/// says what failed.
fn attempt() -> Result<(), String> {
    use std::io::{Read, Write};
    let t = Duration::from_millis(300);
    let mut s =
        TcpStream::connect_timeout(&common::vip_addr(), t).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(t));
    let _ = s.set_write_timeout(Some(t));
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let r = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    if text.starts_with("HTTP/1.1 200") && text.contains("\r\n\r\nr") {
        Ok(())
    } else {
        Err(format!("read: {r:?}, {} bytes", buf.len()))
    }
}

/// When an attempt started (since the prober did) and how it ended.
type Attempt = (Duration, Result<(), String>);

/// A client opening a new connection every 10 ms from the client namespace.
struct Prober {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<std::thread::JoinHandle<()>>,
    t0: Instant,
}

impl Prober {
    fn start(lab: &Lab) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let ns = lab.ns("client");
        let (s, r) = (stop.clone(), results.clone());
        let thread = std::thread::spawn(move || {
            // Threads spawned from here inherit the client's network namespace.
            common::in_netns(&ns, || {
                let mut workers = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    let r = r.clone();
                    workers.push(std::thread::spawn(move || {
                        let start = t0.elapsed();
                        let outcome = attempt();
                        r.lock().unwrap().push((start, outcome));
                    }));
                    std::thread::sleep(Duration::from_millis(10));
                    workers.retain(|w| !w.is_finished());
                }
                for w in workers {
                    let _ = w.join();
                }
            })
        });
        Prober {
            stop,
            results,
            thread: Some(thread),
            t0,
        }
    }

    /// Time since the prober started.
    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    /// Stops; (attempts, failures, outage). The outage runs from the last success before the
    /// first failure at or after `from` to the first success after the last failure: every
    /// failure counts, also failures between successes. Without failures it is the longest
    /// gap between successes after `from` (a failure shows as a missing attempt then).
    fn finish(mut self, from: Duration) -> (usize, usize, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("prober");
        }
        let mut r = self.results.lock().unwrap().clone();
        r.sort_by_key(|(t, _)| *t);
        let failed: Vec<(Duration, String)> = r
            .iter()
            .filter_map(|(t, o)| o.as_ref().err().map(|e| (*t, e.clone())))
            .collect();
        for (t, e) in failed
            .iter()
            .take(if std::env::var_os("XDPVS_HA_DEBUG").is_some() {
                100
            } else {
                5
            })
        {
            println!("  failed at {t:?}: {e}");
        }
        let ok: Vec<Duration> = r
            .iter()
            .filter(|(_, o)| o.is_ok())
            .map(|(t, _)| *t)
            .collect();
        let after: Vec<&Duration> = failed
            .iter()
            .map(|(t, _)| t)
            .filter(|t| **t >= from)
            .collect();
        let outage = match (after.first(), after.last()) {
            (Some(&&first), Some(&&last)) => {
                let before = ok
                    .iter()
                    .rev()
                    .find(|t| **t < first)
                    .copied()
                    .unwrap_or(from);
                match ok.iter().find(|t| **t > last) {
                    Some(&after) => after - before,
                    None => Duration::MAX,
                }
            }
            _ => ok
                .windows(2)
                .filter(|w| w[1] >= from)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or(Duration::MAX),
        };
        (r.len(), failed.len(), outage)
    }
}

/// Runs `fail` under traffic, waits for the backup to take over, then `recover` and waits for
/// the preempting failback; returns (outage at failover, outage at failback).
fn failover_and_back(
    lab: &Lab,
    a: &mut Option<Daemon>,
    b: &Daemon,
    what: &str,
    advert: Duration,
    fail: &mut dyn FnMut(&mut Option<Daemon>),
    recover: &mut dyn FnMut(&mut Option<Daemon>),
) -> (Duration, Duration) {
    let (mut held, bodies) =
        KeepAlive::open(&lab.ns("client"), common::vip_addr(), HELD, "/").expect("held conns");
    // The backup knows them (sync) before the master fails.
    let ports: Vec<u16> = held.local_addrs().iter().map(|a| a.port()).collect();
    let t0 = Instant::now();
    while !ports.iter().all(|p| table(lab, "dir2").contains_key(p))
        && t0.elapsed() < Duration::from_secs(3)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let p = Prober::start(lab);
    std::thread::sleep(Duration::from_millis(300));
    let cut = p.now();
    fail(a);
    wait_until(
        &format!("{what}: backup takes over"),
        Duration::from_secs(5),
        || is_master(b),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (n, failed, over) = p.finish(cut);
    println!(
        "{what} ({advert:?} adverts): {n} new connections, {failed} failed, client outage {over:?}"
    );
    let kept = held_continue(what, lab, &mut held, &bodies, b, "dir2");
    println!("{what}: {kept}/{HELD} held connections continued through the backup");

    let p = Prober::start(lab);
    std::thread::sleep(Duration::from_millis(300));
    let back = p.now();
    recover(a);
    let d = a.as_ref().expect("the old master runs again");
    wait_until(
        &format!("{what}: old master takes over again"),
        Duration::from_secs(10),
        || is_master(d) && is_backup(b),
    );
    std::thread::sleep(Duration::from_millis(500));
    let (n, failed, again) = p.finish(back);
    if std::env::var_os("XDPVS_HA_DEBUG").is_some() {
        println!(
            "A:\n{}\nB:\n{}",
            d.list().unwrap_or_default(),
            b.list().unwrap_or_default()
        );
        for l in d
            .log()
            .lines()
            .filter(|l| l.contains("vrrp") || l.contains("carrier"))
        {
            println!("A log: {l}");
        }
    }
    println!(
        "{what} failback ({advert:?} adverts): {n} new connections, {failed} failed, client \
         outage {again:?}"
    );
    assert!(
        has_vip(lab, "dir") && !has_vip(lab, "dir2"),
        "{what}: VIP back on the master only"
    );
    let kept = held_continue(
        &format!("{what} failback"),
        lab,
        &mut held,
        &bodies,
        d,
        "dir",
    );
    println!("{what} failback: {kept}/{HELD} held connections continued through the old master");
    held.close();
    (over, again)
}

fn pair(lab: &Lab, advert_ms: u64) -> (Option<Daemon>, Daemon) {
    let a = spawn_director(lab, "dir", &pair_config(lab, "dir", PRIO_A, advert_ms), &[])
        .expect("director A");
    let b = spawn_director(
        lab,
        "dir2",
        &pair_config(lab, "dir2", PRIO_B, advert_ms),
        &[],
    )
    .expect("director B");
    wait_until("A master, B backup", Duration::from_secs(10), || {
        is_master(&a) && is_backup(&b)
    });
    assert!(has_vip(lab, "dir"), "the master holds the VIP");
    assert!(!has_vip(lab, "dir2"), "the backup does not");
    (Some(a), b)
}

fn run_pair(lab: &Lab, advert_ms: u64) -> Vec<(&'static str, Duration, Duration, Duration)> {
    let advert = Duration::from_millis(advert_ms);
    let (mut a, b) = pair(lab, advert_ms);
    let cfg_a = pair_config(lab, "dir", PRIO_A, advert_ms);
    let mut out = Vec::new();
    let slack = Duration::from_millis(50);

    // 1. The master's link is cut (its switch port goes down), then comes back.
    let sw = lab.ns("sw");
    let link = |state: &str| {
        let st = std::process::Command::new("ip")
            .args(["-n", &sw, "link", "set", "p-dir", state])
            .status()
            .expect("ip link");
        assert!(st.success());
    };
    let (over, back) = failover_and_back(
        lab,
        &mut a,
        &b,
        "link cut",
        advert,
        &mut |_| link("down"),
        &mut |_| link("up"),
    );
    out.push(("link cut", over, back, master_down(advert) + slack));

    // 2. kill -9: the pinned dataplane stays, the daemon is restarted and preempts.
    let (over, back) = failover_and_back(
        lab,
        &mut a,
        &b,
        "kill -9",
        advert,
        &mut |a| {
            let mut d = a.take().expect("A runs");
            d.signal(libc::SIGKILL).expect("kill");
            let _ = d.stop(Duration::from_secs(2));
            drop(d);
        },
        &mut |a| *a = Some(spawn_director(lab, "dir", &cfg_a, &[]).expect("restart A")),
    );
    out.push(("kill -9", over, back, master_down(advert) + slack));

    // 3. SIGTERM: a clean stop sends priority 0, so the backup takes over after Skew_Time.
    let (over, back) = failover_and_back(
        lab,
        &mut a,
        &b,
        "SIGTERM",
        advert,
        &mut |a| {
            let mut d = a.take().expect("A runs");
            let st = d.stop(Duration::from_secs(5)).expect("A stops on SIGTERM");
            assert!(st.success(), "clean exit: {st}");
        },
        &mut |a| *a = Some(spawn_director(lab, "dir", &cfg_a, &[]).expect("restart A")),
    );
    out.push(("SIGTERM", over, back, skew(advert) + slack));
    drop(a);
    drop(b);
    out
}

#[test]
#[ignore = "needs root"]
fn a_director_pair_fails_over_and_back_within_the_rfc_detection_time() {
    if !common::require_root("a_director_pair_fails_over_and_back_within_the_rfc_detection_time") {
        return;
    }
    let lab = Lab::up_pair("xha", 2).expect("lab");
    let mut all = Vec::new();
    for advert_ms in [100, 20] {
        for (what, over, back, bound) in run_pair(&lab, advert_ms) {
            all.push((advert_ms, what, over, back, bound));
        }
    }
    println!("advert  failure   failover  failback  bound");
    for (adv, what, over, back, bound) in &all {
        println!("{adv:>4}ms  {what:<8}  {over:>8.0?}  {back:>8.0?}  {bound:>6.0?}");
    }
    for (adv, what, over, back, bound) in &all {
        assert!(
            over <= bound,
            "{what} with {adv} ms adverts: outage {over:?} > {bound:?}"
        );
        assert!(
            back <= bound.max(&(Duration::from_millis(*adv) * 3 + Duration::from_millis(50))),
            "{what} failback with {adv} ms adverts: outage {back:?}"
        );
    }
}

/// Drops VRRP in director `host`'s input path (both directors then hear nobody) or lets it in.
fn isolate(lab: &Lab, host: &str, on: bool) {
    let ns = lab.ns(host);
    let nft = |script: &str| {
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                use std::io::Write;
                c.stdin
                    .take()
                    .expect("stdin")
                    .write_all(script.as_bytes())?;
                c.wait()
            })
            .expect("nft");
        assert!(st.success(), "nft in {ns}: {script}");
    };
    if on {
        nft("table ip xha_split {\n chain input {\n type filter hook input priority 0;\n ip protocol vrrp drop\n }\n}\n");
    } else {
        nft("delete table ip xha_split\n");
    }
}

/// Split brain: the directors stop hearing each other's adverts while both still see the
/// clients. Each becomes (or stays) master and holds the VIP; the clients follow whichever
/// gratuitous ARP they heard last, so new connections keep working through one of them. Once
/// the adverts pass again, the lower priority yields at once and the higher answers with
/// gratuitous ARP: one master, clients through it, neither daemon crashed.
#[test]
#[ignore = "needs root"]
fn split_brain_leaves_both_masters_serving_and_recovers_to_one() {
    if !common::require_root("split_brain_leaves_both_masters_serving_and_recovers_to_one") {
        return;
    }
    let lab = Lab::up_pair("xhs", 2).expect("lab");
    let (mut a, b) = pair(&lab, 100);
    let p = Prober::start(&lab);
    std::thread::sleep(Duration::from_millis(300));
    let split = p.now();
    isolate(&lab, "dir", true);
    isolate(&lab, "dir2", true);
    wait_until("both masters", Duration::from_secs(5), || {
        is_master(a.as_ref().expect("A")) && is_master(&b)
    });
    assert!(
        has_vip(&lab, "dir") && has_vip(&lab, "dir2"),
        "both hold the VIP"
    );
    std::thread::sleep(Duration::from_millis(500));
    let (n, failed, outage) = p.finish(split);
    println!("split: {n} new connections, {failed} failed, client outage {outage:?}");
    assert!(
        outage <= master_down(Duration::from_millis(100)) + Duration::from_millis(50),
        "split brain: the client lost service for {outage:?}"
    );

    let p = Prober::start(&lab);
    std::thread::sleep(Duration::from_millis(300));
    let heal = p.now();
    isolate(&lab, "dir", false);
    isolate(&lab, "dir2", false);
    wait_until("one master again", Duration::from_secs(5), || {
        is_master(a.as_ref().expect("A")) && is_backup(&b)
    });
    std::thread::sleep(Duration::from_millis(500));
    let (n, failed, outage) = p.finish(heal);
    println!("healed: {n} new connections, {failed} failed, client outage {outage:?}");
    assert!(has_vip(&lab, "dir") && !has_vip(&lab, "dir2"));
    assert!(
        outage <= Duration::from_millis(350),
        "after the split healed the client lost service for {outage:?}"
    );
    let d = a.as_mut().expect("A");
    assert!(d.try_wait().expect("A").is_none(), "A still runs");
    let st = b.list().expect("B answers");
    assert!(st.contains("BACKUP"), "{st}");
}
