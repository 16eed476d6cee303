//! End to end, issue 3 "health checks": the real `xdpvs` binary with live health checks against
//! nginx reals in a netns lab. Dead reals leave rotation in bounded time and come back by
//! themselves; `on_failure = "quiesce"` keeps open connections, `"remove"` cuts them; a fallback
//! takes new connections while no real is up. Needs root.
//!
//! Timings are measured from the daemon's own log (the timestamp of the `xdpvs::daemon` line
//! "real is down"/"real is up", written right before the dataplane is reprogrammed) against the
//! wall-clock time the test killed/started nginx, and cross-checked by polling `list --json` and
//! by a steady stream of requests on new connections. Every figure is printed.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{http_get_new_conn, lab_config, real_of, spawn_xdpvs, vip_addr, KeepAlive, Lab};
use xdpvs::admin::{RealStatus, Status};

fn status(d: &common::Daemon) -> Status {
    let out = d.admin(&["list", "--json"]).expect("xdpvs list --json");
    serde_json::from_str(&out).expect("list --json parses")
}

/// Real `i` (1-based, configuration order) of the first service.
fn real_status(d: &common::Daemon, i: usize) -> RealStatus {
    status(d).services[0].reals[i - 1].clone()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    let end = start + timeout;
    while Instant::now() < end {
        if f() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Seconds since midnight UTC (what the daemon's log timestamps show), of `t`.
fn secs_of_day(t: SystemTime) -> f64 {
    let d = t.duration_since(UNIX_EPOCH).expect("clock after 1970");
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_nanos()) / 1e9
}

/// `b - a` in seconds for two seconds-of-day values, across midnight.
fn sod_diff(a: f64, b: f64) -> f64 {
    let mut d = b - a;
    if d < -43_200.0 {
        d += 86_400.0;
    }
    d
}

/// The log timestamps (seconds of day, UTC) of the daemon's `real is <up|down>` lines for `real`
/// (the ones from `xdpvs::daemon`, logged just before the dataplane is reprogrammed).
fn transitions(log: &str, real: &str, up: bool) -> Vec<f64> {
    let what = if up { "real is up" } else { "real is down" };
    let real_kv = format!("real={real}");
    log.lines()
        .filter(|l| l.contains("xdpvs::daemon") && l.contains(what) && l.contains(&real_kv))
        .filter_map(|l| {
            // "2025-01-01T12:34:56.789012Z  WARN xdpvs::daemon: ..."
            let ts = l.split_whitespace().next()?;
            let time = ts.split_once('T')?.1.trim_end_matches('Z');
            let mut it = time.split(':');
            let h: f64 = it.next()?.parse().ok()?;
            let m: f64 = it.next()?.parse().ok()?;
            let s: f64 = it.next()?.parse().ok()?;
            Some(h * 3600.0 + m * 60.0 + s)
        })
        .collect()
}

/// The first log transition of `real` to `up` at or after `since` (seconds of day): its delay
/// after `since` in ms, if there is one.
fn transition_after(log: &str, real: &str, up: bool, since: f64) -> Option<f64> {
    transitions(log, real, up)
        .into_iter()
        .map(|t| sod_diff(since, t))
        .filter(|d| *d >= -0.001)
        .map(|d| d * 1000.0)
        .reduce(f64::min)
}

/// One request of the steady stream: when it started and ended, and which real answered.
#[derive(Debug, Clone)]
struct Sample {
    start: Instant,
    end: Instant,
    result: Result<usize, String>,
}

/// One `list --json` poll: the window it was taken in and real 2's state.
#[derive(Debug, Clone)]
struct Poll {
    before: Instant,
    after: Instant,
    weight: u32,
    health: String,
    in_table: bool,
}

/// A lab with one exec check per real: `test ! -e <lab dir>/fail-$XDPVS_REAL_IP`, so a test makes
/// a real's check fail by creating its marker file while nginx keeps serving.
fn exec_check(lab: &Lab) -> String {
    format!(
        "[service.check]\ntype = \"exec\"\ncommand = \"test ! -e {}/fail-$XDPVS_REAL_IP\"\n\
         interval = \"200ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2\n",
        lab.dir.display()
    )
}

fn marker(lab: &Lab, i: usize) -> PathBuf {
    lab.dir.join(format!("fail-{}", common::real_ip(i)))
}

/// `n` requests on new connections from the client; the real of each (panics on a failure).
fn new_conn_reals(lab: &Lab, n: usize) -> Vec<usize> {
    common::in_netns(&lab.ns("client"), || {
        (0..n)
            .map(|i| {
                let body = http_get_new_conn(vip_addr(), "/")
                    .unwrap_or_else(|e| panic!("new-connection request {i} failed: {e:#}"));
                real_of(&body).unwrap_or_else(|| panic!("body {body:?} names no real"))
            })
            .collect()
    })
}

fn count(reals: &[usize]) -> HashMap<usize, usize> {
    let mut m = HashMap::new();
    for r in reals {
        *m.entry(*r).or_default() += 1;
    }
    m
}

#[test]
#[ignore = "needs root"]
fn dead_real_leaves_rotation_in_bounded_time_and_comes_back() {
    if !common::require_root("dead_real_leaves_rotation_in_bounded_time_and_comes_back") {
        return;
    }
    const INTERVAL: u64 = 200;
    const TIMEOUT: u64 = 200;
    const RISE: u64 = 2;
    const FALL: u64 = 2;
    // The acceptance bounds.
    let down_bound = (FALL * INTERVAL + TIMEOUT + 200) as f64;
    let up_bound = (RISE * INTERVAL + 200) as f64;
    // What polling `list --json` (a process per poll) may add on top.
    let poll_slack = 300.0;

    let lab = Lab::up("xh1", 3).expect("lab up");
    let check = format!(
        "[service.check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"{INTERVAL}ms\"\n\
         timeout = \"{TIMEOUT}ms\"\nrise = {RISE}\nfall = {FALL}\nexpect_body = \"OK\"\n"
    );
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1, 1, 1], &check)).expect("xdpvs starts");
    let r2 = common::real_addr(2).to_string();
    let client = lab.ns("client");

    let stop = AtomicBool::new(false);
    let samples: Mutex<Vec<Sample>> = Mutex::new(Vec::new());
    let polls: Mutex<Vec<Poll>> = Mutex::new(Vec::new());

    let (t_kill, w_kill, t_killed, t_start, w_start, t_started) = std::thread::scope(|s| {
        // Requests on new connections every 20 ms.
        s.spawn(|| {
            common::in_netns(&client, || {
                let mut next = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    let start = Instant::now();
                    let result = http_get_new_conn(vip_addr(), "/")
                        .map_err(|e| format!("{e:#}"))
                        .and_then(|b| real_of(&b).ok_or_else(|| format!("bad body {b:?}")));
                    let end = Instant::now();
                    samples.lock().unwrap().push(Sample { start, end, result });
                    next += Duration::from_millis(20);
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else {
                        next = now;
                    }
                }
            })
        });
        // Real 2's state as `list --json` shows it, polled back to back.
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let before = Instant::now();
                let r = real_status(&d, 2);
                let after = Instant::now();
                polls.lock().unwrap().push(Poll {
                    before,
                    after,
                    weight: r.weight,
                    health: r.health.clone(),
                    in_table: r.in_table,
                });
                std::thread::sleep(Duration::from_millis(10));
            }
        });

        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Baseline: traffic flows to every real.
            std::thread::sleep(Duration::from_millis(1500));

            let t_kill = Instant::now();
            let w_kill = SystemTime::now();
            lab.stop_nginx(2).expect("stop nginx on real 2");
            let t_killed = Instant::now();
            wait_for("real 2 down in list", Duration::from_secs(10), || {
                let p = polls.lock().unwrap();
                p.last()
                    .is_some_and(|p| p.before > t_kill && p.health == "down")
            });
            // Traffic keeps flowing without real 2 for a while.
            std::thread::sleep(Duration::from_millis(1500));

            let t_start = Instant::now();
            let w_start = SystemTime::now();
            lab.start_nginx(2).expect("start nginx on real 2");
            let t_started = Instant::now();
            wait_for("real 2 up in list", Duration::from_secs(10), || {
                let p = polls.lock().unwrap();
                p.last()
                    .is_some_and(|p| p.before > t_start && p.health == "up")
            });
            std::thread::sleep(Duration::from_millis(1500));
            (t_kill, w_kill, t_killed, t_start, w_start, t_started)
        }));
        stop.store(true, Ordering::SeqCst);
        match result {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    });

    let samples = samples.into_inner().unwrap();
    let polls = polls.into_inner().unwrap();
    let log = d.log();
    let since = |t: Instant, base: Instant| ms(t.saturating_duration_since(base));

    // ---- Down.
    let down_log = transition_after(&log, &r2, false, secs_of_day(w_kill))
        .unwrap_or_else(|| panic!("no `real is down` for {r2} in the log:\n{log}"));
    let first_down_poll = polls
        .iter()
        .find(|p| p.before > t_kill && p.health == "down")
        .expect("a poll saw real 2 down");
    let last_up_poll = polls
        .iter()
        .rfind(|p| p.after > t_kill && p.after < first_down_poll.before && p.health == "up");
    let before_kill: Vec<&Sample> = samples.iter().filter(|s| s.end < t_kill).collect();
    let kill_to_restart: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.start >= t_kill && s.start < t_start)
        .collect();
    let early_failures: Vec<&Sample> = kill_to_restart
        .iter()
        .copied()
        .filter(|s| s.result.is_err())
        .collect();
    let last_failure = early_failures
        .iter()
        .map(|s| since(s.start, t_kill))
        .reduce(f64::max);
    println!(
        "kill: stop_nginx took {:.0} ms; `real is down` logged {down_log:.0} ms after the kill \
         (bound {down_bound:.0} ms); list showed it down {:.0}..{:.0} ms after the kill \
         (weight {}, in_table {}); {} requests failed between the kill and the restart, the last \
         one started {:?} ms after the kill",
        ms(t_killed - t_kill),
        last_up_poll.map_or(0.0, |p| since(p.after, t_kill)),
        since(first_down_poll.after, t_kill),
        first_down_poll.weight,
        first_down_poll.in_table,
        early_failures.len(),
        last_failure.map(|f| f.round()),
    );
    for f in &early_failures {
        println!(
            "  failed request at +{:.0} ms: {:?}",
            since(f.start, t_kill),
            f.result
        );
    }

    let c = count(
        &before_kill
            .iter()
            .filter_map(|s| s.result.as_ref().ok().copied())
            .collect::<Vec<_>>(),
    );
    assert!(
        before_kill.len() >= 30 && before_kill.iter().all(|s| s.result.is_ok()),
        "baseline requests: {before_kill:?}"
    );
    assert!(
        (1..=3).all(|r| c.contains_key(&r)),
        "baseline reached every real: {c:?}"
    );
    assert!(
        down_log <= down_bound,
        "real 2 left rotation {down_log:.0} ms after the kill (bound {down_bound:.0} ms)"
    );
    assert!(
        since(first_down_poll.after, t_kill) <= down_bound + poll_slack,
        "list showed real 2 down only {:.0} ms after the kill",
        since(first_down_poll.after, t_kill)
    );
    assert_eq!(first_down_poll.weight, 0, "quiesced: weight 0");
    assert!(
        polls
            .iter()
            .filter(|p| p.before > first_down_poll.before && p.after < t_start)
            .all(|p| p.health == "down" && p.weight == 0),
        "real 2 stayed down (no flapping) until the restart"
    );
    // After the bound, no new request fails and none reaches real 2.
    let after_bound = Duration::from_millis(down_bound as u64);
    let late: Vec<&Sample> = kill_to_restart
        .iter()
        .copied()
        .filter(|s| s.start >= t_kill + after_bound)
        .collect();
    assert!(
        late.len() >= 30,
        "{} requests while real 2 was down",
        late.len()
    );
    let bad: Vec<&&Sample> = late
        .iter()
        .filter(|s| s.result.as_ref().map_or(true, |r| *r == 2))
        .collect();
    assert!(
        bad.is_empty(),
        "requests started more than {down_bound:.0} ms after the kill failed or reached the \
         dead real: {bad:?}"
    );
    // (nginx finishes the requests it already accepted while it shuts down: count from the
    // moment its port was closed.)
    let served_by_dead: Vec<&&Sample> = kill_to_restart
        .iter()
        .filter(|s| s.start >= t_killed && s.result.as_ref().is_ok_and(|r| *r == 2))
        .collect();
    assert!(
        served_by_dead.is_empty(),
        "requests reached real 2 while its nginx was down: {served_by_dead:?}"
    );

    // ---- Up.
    let up_log = transition_after(&log, &r2, true, secs_of_day(w_start))
        .unwrap_or_else(|| panic!("no `real is up` for {r2} in the log:\n{log}"));
    let nginx_start = ms(t_started - t_start);
    let first_up_poll = polls
        .iter()
        .find(|p| p.before > t_start && p.health == "up")
        .expect("a poll saw real 2 up");
    let after_restart: Vec<&Sample> = samples.iter().filter(|s| s.start >= t_start).collect();
    let first_r2 = after_restart
        .iter()
        .find(|s| s.result.as_ref().is_ok_and(|r| *r == 2));
    println!(
        "restart: start_nginx took {nginx_start:.0} ms (it waits until nginx answers); \
         `real is up` logged {up_log:.0} ms after the start began = {:.0} ms after nginx \
         answered (bound {up_bound:.0} ms); list showed it up {:.0} ms after the start \
         (weight {}); first request served by real 2 {:?} ms after the start; {} requests \
         after the restart, {} to real 2",
        up_log - nginx_start,
        since(first_up_poll.after, t_start),
        first_up_poll.weight,
        first_r2.map(|s| since(s.start, t_start).round()),
        after_restart.len(),
        after_restart
            .iter()
            .filter(|s| s.result.as_ref().is_ok_and(|r| *r == 2))
            .count()
    );
    assert!(
        up_log <= up_bound,
        "real 2 was back {up_log:.0} ms after nginx was started (bound {up_bound:.0} ms; \
         nginx itself took {nginx_start:.0} ms to answer)"
    );
    assert!(
        since(first_up_poll.after, t_start) <= up_bound + poll_slack,
        "list showed real 2 up only {:.0} ms after the start",
        since(first_up_poll.after, t_start)
    );
    let fails: Vec<&&Sample> = after_restart.iter().filter(|s| s.result.is_err()).collect();
    assert!(
        fails.is_empty(),
        "requests failed after the restart: {fails:?}"
    );
    assert!(first_r2.is_some(), "real 2 receives traffic again");
    let last = real_status(&d, 2);
    assert_eq!(
        (last.health.as_str(), last.weight, last.in_table),
        ("up", 1, true),
        "configured weight restored"
    );
    assert_eq!(last.last_failure.as_deref(), Some("connection refused"));
}

/// Quiesce or remove on a failed check while the real itself keeps serving: what happens to a
/// long-lived connection to it, and to new connections.
fn failing_check_with_open_connection(prefix: &str, on_failure: &str) {
    common::raise_nofile_limit();
    let lab = Lab::up(prefix, 3).expect("lab up");
    let extra = format!("on_failure = \"{on_failure}\"\n{}", exec_check(&lab));
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1, 1, 1], &extra)).expect("xdpvs starts");
    let client = lab.ns("client");
    // Let every real pass a few checks first.
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        status(&d).services[0]
            .reals
            .iter()
            .all(|r| r.health == "up"),
        "{}",
        d.list().unwrap_or_default()
    );

    let (mut ka, bodies) = KeepAlive::open(&client, vip_addr(), 9, "/").expect("keep-alive");
    let to_r2: Vec<usize> = (0..bodies.len())
        .filter(|i| real_of(&bodies[*i]) == Some(2))
        .collect();
    let others: Vec<usize> = (0..bodies.len()).filter(|i| !to_r2.contains(i)).collect();
    assert!(!to_r2.is_empty(), "a connection to real 2: {bodies:?}");

    // Real 2's check starts failing; nginx on it keeps serving.
    let t0 = Instant::now();
    std::fs::write(marker(&lab, 2), b"").expect("marker file");
    let took = wait_for("real 2 down", Duration::from_secs(5), || {
        real_status(&d, 2).health == "down"
    });
    let r = real_status(&d, 2);
    println!(
        "{on_failure}: real 2 down {:.0} ms after its check started failing; list: weight {}, \
         in_table {}, last failure {:?}",
        ms(took),
        r.weight,
        r.in_table,
        r.last_failure
    );
    assert_eq!(r.weight, 0);
    assert_eq!(r.in_table, on_failure == "quiesce");
    assert_eq!(r.last_failure.as_deref(), Some("exit status 1"));
    assert!(t0.elapsed() < Duration::from_secs(5));
    // The real still serves when asked directly.
    assert_eq!(
        lab.curl_url(&format!("http://{}/", common::real_ip(2)))
            .expect("real 2 itself still serves")
            .trim(),
        "r2"
    );

    // The long-lived connections.
    for &i in &others {
        assert_eq!(
            ka.request(i, "/").expect("connection to a healthy real"),
            bodies[i]
        );
    }
    for &i in &to_r2 {
        let t = Instant::now();
        let r = ka.request(i, "/");
        println!(
            "{on_failure}: request on the open connection {i} to real 2 -> {:?} after {:.0} ms",
            r.as_ref().map_err(|e| format!("{e:#}")),
            ms(t.elapsed())
        );
        if on_failure == "quiesce" {
            assert_eq!(
                r.expect("quiesce: the open connection keeps working"),
                "r2\n"
            );
        } else {
            assert!(r.is_err(), "remove: the open connection to real 2 is cut");
        }
    }

    // New connections avoid real 2.
    let seen = new_conn_reals(&lab, 40);
    let c = count(&seen);
    println!("{on_failure}: 40 new connections while real 2 is down: {c:?}");
    assert!(
        !c.contains_key(&2),
        "a new connection reached real 2: {c:?}"
    );
    assert!(c.contains_key(&1) && c.contains_key(&3), "{c:?}");

    // The check passes again: real 2 comes back with its configured weight.
    std::fs::remove_file(marker(&lab, 2)).expect("remove marker");
    let took = wait_for("real 2 up", Duration::from_secs(5), || {
        let r = real_status(&d, 2);
        r.health == "up" && r.weight == 1 && r.in_table
    });
    println!(
        "{on_failure}: real 2 up again {:.0} ms after its check passed",
        ms(took)
    );
    // wlc: the returning real has the fewest connections and gets new ones.
    let seen = new_conn_reals(&lab, 20);
    assert!(
        seen.contains(&2),
        "real 2 takes new connections again: {seen:?}"
    );
    for &i in &others {
        assert_eq!(ka.request(i, "/").expect("healthy connection"), bodies[i]);
    }
    ka.close();
}

#[test]
#[ignore = "needs root"]
fn quiesce_keeps_open_connections_to_a_failed_real() {
    if !common::require_root("quiesce_keeps_open_connections_to_a_failed_real") {
        return;
    }
    failing_check_with_open_connection("xh2", "quiesce");
}

#[test]
#[ignore = "needs root"]
fn remove_cuts_open_connections_to_a_failed_real() {
    if !common::require_root("remove_cuts_open_connections_to_a_failed_real") {
        return;
    }
    failing_check_with_open_connection("xh3", "remove");
}

/// Reals 1 and 2, real 3 as the fallback (sorry server). `via_nginx`: the reals fail because
/// nginx stops (http check), else because their exec check fails (marker files).
fn fallback_while_no_real_is_up(prefix: &str, on_failure: &str, via_nginx: bool) {
    let lab = Lab::up(prefix, 3).expect("lab up");
    let check = if via_nginx {
        "[service.check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\n\
         timeout = \"300ms\"\nrise = 2\nfall = 2\n"
            .to_string()
    } else {
        exec_check(&lab)
    };
    let extra = format!(
        "on_failure = \"{on_failure}\"\nfallback = \"{}:80\"\n{check}",
        common::real_ip(3)
    );
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1, 1], &extra)).expect("xdpvs starts");
    let st = status(&d);
    assert_eq!(st.services[0].reals.len(), 3, "two reals and the fallback");
    assert!(st.services[0].reals[2].fallback);

    // While the reals are up the fallback takes nothing.
    std::thread::sleep(Duration::from_millis(500));
    let c = count(&new_conn_reals(&lab, 20));
    assert!(
        !c.contains_key(&3) && c.contains_key(&1) && c.contains_key(&2),
        "{c:?}"
    );

    for i in [1, 2] {
        if via_nginx {
            lab.stop_nginx(i).expect("stop nginx");
        } else {
            std::fs::write(marker(&lab, i), b"").expect("marker");
        }
    }
    let took = wait_for("reals 1 and 2 down", Duration::from_secs(5), || {
        let st = status(&d);
        st.services[0].reals[..2].iter().all(|r| r.health == "down")
    });
    println!("{prefix}: both reals down after {:.0} ms", ms(took));
    let c = count(&new_conn_reals(&lab, 20));
    println!("{prefix}: 20 new connections with no real up: {c:?}");
    assert_eq!(
        c,
        HashMap::from([(3, 20)]),
        "the fallback takes every new connection"
    );

    // Real 1 recovers: new connections go to it, no longer to the fallback.
    if via_nginx {
        lab.start_nginx(1).expect("start nginx");
    } else {
        std::fs::remove_file(marker(&lab, 1)).expect("remove marker");
    }
    let took = wait_for("real 1 up", Duration::from_secs(5), || {
        let r = real_status(&d, 1);
        r.health == "up" && r.weight == 1
    });
    println!("{prefix}: real 1 up {:.0} ms after it recovered", ms(took));
    let c = count(&new_conn_reals(&lab, 20));
    println!("{prefix}: 20 new connections with real 1 up: {c:?}");
    assert_eq!(
        c,
        HashMap::from([(1, 20)]),
        "new connections go to the recovered real, not the fallback"
    );
    assert_eq!(real_status(&d, 2).health, "down");
}

#[test]
#[ignore = "needs root"]
fn fallback_takes_new_connections_while_no_real_is_up() {
    if !common::require_root("fallback_takes_new_connections_while_no_real_is_up") {
        return;
    }
    fallback_while_no_real_is_up("xh4", "quiesce", true);
}

#[test]
#[ignore = "needs root"]
fn fallback_with_removed_reals() {
    if !common::require_root("fallback_with_removed_reals") {
        return;
    }
    fallback_while_no_real_is_up("xh5", "remove", false);
}

/// A reload the dataplane rejects (more services than it holds) changes nothing: every real of
/// the running configuration keeps its health check, and runtime overrides stay.
#[test]
#[ignore = "needs root"]
fn reload_rejected_by_the_dataplane_keeps_health_checks() {
    if !common::require_root("reload_rejected_by_the_dataplane_keeps_health_checks") {
        return;
    }
    let lab = Lab::up("xh6", 3).expect("lab up");
    let base = lab_config(&lab, &[1, 1, 1], &exec_check(&lab));
    let d = spawn_xdpvs(&lab, &base).expect("xdpvs starts");
    std::thread::sleep(Duration::from_millis(600));
    d.admin(&["weight", "web", &common::real_ip(3).to_string(), "5"])
        .expect("weight override");
    assert_eq!(real_status(&d, 3).weight, 5);

    // Without real 1, and with 4096 more services than the running one (the dataplane holds
    // xdpvs_common::MAX_SERVICES = 4096 in all): valid as a file, rejected when applied.
    let mut big = lab_config(&lab, &[], &exec_check(&lab));
    for i in [2, 3] {
        big.push_str(&format!(
            "\n[[service.real]]\naddress = \"{}:80\"\nweight = 1\n",
            common::real_ip(i)
        ));
    }
    for port in 1..=xdpvs_common::MAX_SERVICES {
        big.push_str(&format!(
            "\n[[service]]\nname = \"s{port}\"\naddress = \"198.18.1.1:{port}\"\n"
        ));
    }
    d.write_config(&big).expect("write config");
    let r = d.admin(&["reload"]);
    println!(
        "reload of the too-big config: {:?}",
        r.as_ref().map_err(|e| format!("{e:#}"))
    );
    assert!(r.is_err(), "the dataplane rejects the reload");
    let st = status(&d);
    assert_eq!(st.services.len(), 1, "the running configuration stays");
    assert_eq!(st.services[0].reals.len(), 3);
    assert_eq!(
        real_status(&d, 3).weight,
        5,
        "a rejected reload keeps overrides"
    );

    // Real 1 (absent from the rejected file) is still checked: its check failing takes it out.
    std::fs::write(marker(&lab, 1), b"").expect("marker");
    let took = wait_for(
        "real 1 down after a rejected reload",
        Duration::from_secs(5),
        || real_status(&d, 1).health == "down",
    );
    println!(
        "real 1 down {:.0} ms after its check started failing",
        ms(took)
    );
    assert_eq!(real_status(&d, 1).weight, 0);
    let c = count(&new_conn_reals(&lab, 20));
    assert!(!c.contains_key(&1), "{c:?}");
    d.write_config(&base).expect("restore config");
}

/// A reload keeps the health of unchanged reals (a down real stays down, no flap) and a real it
/// adds starts down, taking traffic only after `rise` passed checks.
#[test]
#[ignore = "needs root"]
fn reload_keeps_health_and_added_reals_start_down() {
    if !common::require_root("reload_keeps_health_and_added_reals_start_down") {
        return;
    }
    let lab = Lab::up("xh7", 3).expect("lab up");
    // A slow check, so "starts down" is visible for a while after the reload.
    let check = exec_check(&lab).replace("interval = \"200ms\"", "interval = \"1s\"");
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1, 1], &check)).expect("xdpvs starts");
    std::fs::write(marker(&lab, 2), b"").expect("marker");
    wait_for("real 2 down", Duration::from_secs(5), || {
        real_status(&d, 2).health == "down"
    });

    d.write_config(&lab_config(&lab, &[1, 1, 1], &check))
        .expect("write config");
    d.admin(&["reload"]).expect("reload");
    let st = status(&d);
    let h: Vec<(&str, u32)> = st.services[0]
        .reals
        .iter()
        .map(|r| (r.health.as_str(), r.weight))
        .collect();
    println!("right after the reload: {h:?}");
    assert_eq!(
        h,
        vec![("up", 1), ("down", 0), ("down", 0)],
        "real 2 stays down, the added real 3 starts down"
    );
    let c = count(&new_conn_reals(&lab, 10));
    assert_eq!(c, HashMap::from([(1, 10)]), "only real 1 takes traffic");
    let took = wait_for("real 3 up", Duration::from_secs(5), || {
        real_status(&d, 3).health == "up"
    });
    println!(
        "added real 3 up {:.0} ms after the reload (rise 2, interval 1s)",
        ms(took)
    );
    assert_eq!(real_status(&d, 3).weight, 1);
    assert_eq!(real_status(&d, 2).health, "down");
    let c = count(&new_conn_reals(&lab, 20));
    assert!(c.contains_key(&3) && !c.contains_key(&2), "{c:?}");
}

/// The literal case: the check port closes while the service itself stays up.
/// Listeners on :8080 in each real's namespace stand for a separate health endpoint.
#[test]
#[ignore = "needs root"]
fn quiesce_with_check_port_closed_keeps_the_service_connection() {
    if !common::require_root("quiesce_with_check_port_closed_keeps_the_service_connection") {
        return;
    }
    common::raise_nofile_limit();
    let lab = Lab::up("xh8", 2).expect("lab up");
    let mut ports: Vec<Option<std::net::TcpListener>> = (1..=2)
        .map(|i| {
            let addr = std::net::SocketAddr::new(common::real_ip(i).into(), 8080);
            Some(
                common::in_netns(&lab.ns(&format!("r{i}")), || {
                    std::net::TcpListener::bind(addr)
                })
                .expect("check port listener"),
            )
        })
        .collect();
    let extra = "on_failure = \"quiesce\"\n\n[service.check]\ntype = \"tcp\"\nport = 8080\n\
                 interval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2\n";
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1, 1], extra)).expect("xdpvs starts");
    let client = lab.ns("client");
    let (mut ka, bodies) = KeepAlive::open(&client, vip_addr(), 6, "/").expect("keep-alive");
    assert!(bodies.iter().any(|b| real_of(b) == Some(2)), "{bodies:?}");
    // Close real 2's check port; nginx on :80 keeps serving.
    ports[1] = None;
    wait_for("real 2 down", Duration::from_secs(5), || {
        real_status(&d, 2).health == "down"
    });
    let r = real_status(&d, 2);
    assert_eq!((r.weight, r.in_table), (0, true));
    assert_eq!(r.last_failure.as_deref(), Some("connection refused"));
    assert_eq!(
        ka.request_all("/").expect("open connections keep working"),
        bodies
    );
    let seen = new_conn_reals(&lab, 20);
    assert!(!seen.contains(&2), "{seen:?}");
    ka.close();
    drop(ports);
}
