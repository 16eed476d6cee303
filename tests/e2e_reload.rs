//! End to end, issue "operability": hot reload under load without dropped connections,
//! rejected reloads that change nothing, runtime drain/enable, and the admin socket's
//! permissions. The real binary, a netns lab, wrk and nginx. Needs root.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{lab_config, spawn_xdpvs, vip_addr, KeepAlive, Lab};
use xdpvs::admin::Status;

fn status(d: &common::Daemon) -> Status {
    serde_json::from_str(&d.admin(&["list", "--json"]).expect("list --json")).expect("json")
}

/// The table without its traffic counters.
fn table(st: &Status) -> Vec<(String, String, u32, String, bool)> {
    st.services
        .iter()
        .flat_map(|s| {
            s.reals.iter().map(move |r| {
                (
                    s.address.clone(),
                    r.address.clone(),
                    r.weight,
                    r.health.clone(),
                    r.in_table,
                )
            })
        })
        .collect()
}

/// A service config over reals `reals` (numbers) with `weights`, and a check of `check_type`.
fn config(lab: &Lab, reals: &[(usize, u32)], check_interval_ms: u64) -> String {
    let base = lab_config(lab, &[], "");
    let mut c = base.trim_end().to_string();
    c.push_str(&format!(
        "\n\n[service.check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"{check_interval_ms}ms\"\ntimeout = \"300ms\"\nrise = 1\nfall = 2\n"
    ));
    for (n, w) in reals {
        c.push_str(&format!(
            "\n[[service.real]]\naddress = \"{}:80\"\nweight = {w}\n",
            common::real_ip(*n)
        ));
    }
    c
}

/// wrk in the client namespace; its report is parsed when it ends.
struct Wrk(Child);

impl Wrk {
    fn start(lab: &Lab, secs: u64, new_conn_each: bool) -> Wrk {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &lab.ns("client"), "wrk", "-t1", "-c8"])
            .arg(format!("-d{secs}s"))
            .args(["--timeout", "2s"]);
        if new_conn_each {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(format!("http://{}/", common::VIP))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Wrk(cmd.spawn().expect("start wrk"))
    }

    /// (requests, socket errors, non-2xx responses) and the raw report.
    fn finish(self) -> (u64, u64, u64, String) {
        let out = self.0.wait_with_output().expect("wrk output");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "wrk failed: {text}");
        let mut requests = 0;
        let mut errors = 0;
        let mut non2xx = 0;
        for line in text.lines() {
            let l = line.trim();
            if l.contains("requests in") {
                requests = l
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
            } else if let Some(rest) = l.strip_prefix("Socket errors:") {
                errors = rest
                    .split(',')
                    .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                    .sum();
            } else if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
                non2xx = rest.trim().parse().unwrap_or(u64::MAX);
            }
        }
        (requests, errors, non2xx, text)
    }
}

#[test]
#[ignore = "needs root"]
fn twenty_reloads_under_load_drop_nothing() {
    if !common::require_root("twenty_reloads_under_load_drop_nothing") {
        return;
    }
    common::raise_nofile_limit();
    let lab = Lab::up("xr1", 4).expect("lab up");
    let initial = [(1, 1), (2, 1), (3, 1)];
    let d = spawn_xdpvs(&lab, &config(&lab, &initial, 200)).expect("xdpvs starts");
    let client = lab.ns("client");
    // Long-lived connections opened before the reloads, one or more per real.
    let (mut ka, bodies) = KeepAlive::open(&client, vip_addr(), 12, "/").expect("keep-alive");
    let wrk_new = Wrk::start(&lab, 14, true);
    let wrk_keep = Wrk::start(&lab, 14, false);
    std::thread::sleep(Duration::from_millis(1000));
    // 20 reloads: weights change, real 4 comes and goes, real 1 leaves and returns (its open
    // connections drain), the check's interval changes.
    let steps: Vec<(Vec<(usize, u32)>, u64)> = vec![
        (vec![(1, 2), (2, 1), (3, 1)], 200),
        (vec![(1, 2), (2, 1), (3, 1), (4, 1)], 200),
        (vec![(1, 1), (2, 3), (3, 1), (4, 1)], 300),
        (vec![(2, 3), (3, 1), (4, 1)], 300),
        (vec![(2, 1), (3, 1), (4, 2)], 250),
        (vec![(1, 1), (2, 1), (3, 1), (4, 2)], 250),
        (vec![(1, 1), (2, 1), (3, 1)], 200),
        (vec![(1, 5), (2, 1), (3, 1)], 400),
        (vec![(1, 1), (2, 1), (3, 1), (4, 1)], 200),
        (vec![(1, 1), (3, 1), (4, 1)], 200),
    ];
    for i in 0..20 {
        let (reals, interval) = &steps[i % steps.len()];
        d.write_config(&config(&lab, reals, *interval))
            .expect("write config");
        d.reload().expect("SIGHUP");
        std::thread::sleep(Duration::from_millis(550));
    }
    d.write_config(&config(&lab, &initial, 200))
        .expect("write config");
    d.reload().expect("SIGHUP");
    let (req_new, err_new, non2xx_new, text_new) = wrk_new.finish();
    let (req_keep, err_keep, non2xx_keep, text_keep) = wrk_keep.finish();
    println!("wrk new-connection: {req_new} requests\n{text_new}");
    println!("wrk keep-alive: {req_keep} requests\n{text_keep}");
    assert!(req_new > 100 && req_keep > 100, "wrk made too few requests");
    assert_eq!(
        (err_new, non2xx_new),
        (0, 0),
        "new-connection load saw errors:\n{text_new}"
    );
    assert_eq!(
        (err_keep, non2xx_keep),
        (0, 0),
        "keep-alive load saw errors:\n{text_keep}"
    );
    // Every connection opened before the reloads still reaches its own real.
    let again = ka
        .request_all("/")
        .expect("long-lived connections after 20 reloads");
    assert_eq!(again, bodies);
    ka.close();
    let log = d.log();
    let reloaded = log.matches("configuration reloaded").count();
    assert!(reloaded >= 21, "{reloaded} reloads logged:\n{log}");
}

#[test]
#[ignore = "needs root"]
fn broken_reload_is_rejected_and_traffic_flows_as_before() {
    if !common::require_root("broken_reload_is_rejected_and_traffic_flows_as_before") {
        return;
    }
    let lab = Lab::up("xr2", 3).expect("lab up");
    let good = lab_config(&lab, &[1, 1, 0], "");
    let d = spawn_xdpvs(&lab, &good).expect("xdpvs starts");
    let client = lab.ns("client");
    let sample = |n: usize| common::sample_reals(&client, n);
    let before = status(&d);
    let broken: Vec<(&str, String)> = vec![
        ("syntax error", good.replace("[[service]]", "[[service]")),
        (
            "duplicate real",
            format!(
                "{good}\n[[service.real]]\naddress = \"{}:80\"\nweight = 1\n",
                common::real_ip(1)
            ),
        ),
        (
            "invalid address",
            good.replace("198.18.0.12:80", "198.18.0.300:80"),
        ),
    ];
    for (what, text) in broken {
        d.write_config(&text).expect("write");
        let r = d.admin(&["reload"]);
        let err = r.expect_err(&format!("{what}: reload must be rejected"));
        assert!(format!("{err:#}").contains("rejected"), "{what}: {err:#}");
        assert!(
            d.log().contains("reload rejected"),
            "{what}: the error is logged"
        );
        // Unchanged: same table, and traffic still avoids the weight-0 real.
        assert_eq!(table(&status(&d)), table(&before), "{what}: table changed");
        let seen = sample(20);
        assert!(
            !seen.contains(&3) && seen.contains(&1) && seen.contains(&2),
            "{what}: {seen:?}"
        );
    }
    // The error names the file and line.
    let log = d.log();
    assert!(log.contains("xdpvs.toml:"), "error names the file:\n{log}");
    // Fixed file: applied.
    d.write_config(&lab_config(&lab, &[0, 1, 1], ""))
        .expect("write");
    d.admin(&["reload"]).expect("good reload accepted");
    let seen = sample(20);
    assert!(!seen.contains(&1) && seen.contains(&3), "{seen:?}");
}

#[test]
#[ignore = "needs root"]
fn drain_and_enable_at_runtime() {
    if !common::require_root("drain_and_enable_at_runtime") {
        return;
    }
    common::raise_nofile_limit();
    let lab = Lab::up("xr3", 3).expect("lab up");
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1, 1, 1], "")).expect("xdpvs starts");
    let client = lab.ns("client");
    let (mut ka, bodies) = KeepAlive::open(&client, vip_addr(), 6, "/").expect("keep-alive");
    let out = d.admin(&["drain", "web", "198.18.0.12"]).expect("drain");
    assert!(out.contains("draining"), "{out}");
    let st = status(&d);
    assert_eq!(st.services[0].reals[1].weight, 0);
    assert!(d.list().unwrap().contains("drained by admin"));
    let seen = common::sample_reals(&client, 30);
    assert!(
        !seen.contains(&2),
        "drained real got a new connection: {seen:?}"
    );
    assert_eq!(
        ka.request_all("/").expect("open connections still work"),
        bodies
    );
    d.admin(&["enable", "web", "198.18.0.12:80"])
        .expect("enable");
    let seen = common::sample_reals(&client, 30);
    assert!(
        seen.contains(&2),
        "enabled real gets connections again: {seen:?}"
    );
    // Runtime weight, and bad admin input is refused with a reason.
    d.admin(&["weight", "web", "198.18.0.11:80", "5"])
        .expect("weight");
    assert_eq!(status(&d).services[0].reals[0].weight, 5);
    let e = d
        .admin(&["weight", "web", "198.18.0.99:80", "1"])
        .unwrap_err();
    assert!(format!("{e:#}").contains("no real"), "{e:#}");
    let e = d.admin(&["drain", "nosuch", "198.18.0.11"]).unwrap_err();
    assert!(format!("{e:#}").contains("no service"), "{e:#}");
    // A reload ends runtime changes.
    d.admin(&["reload"]).expect("reload");
    assert_eq!(status(&d).services[0].reals[0].weight, 1);
    ka.close();
}

#[test]
#[ignore = "needs root"]
fn admin_socket_is_root_only() {
    if !common::require_root("admin_socket_is_root_only") {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let lab = Lab::up("xr4", 1).expect("lab up");
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1], "")).expect("xdpvs starts");
    let meta = std::fs::metadata(&d.admin_socket).expect("socket exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    assert_eq!(meta.uid(), 0, "socket owner");
    // An unprivileged user cannot use it.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&d.bin)
        .args(["list", "--socket"])
        .arg(&d.admin_socket)
        .output()
        .expect("setpriv");
    assert!(!out.status.success(), "nobody could list");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ermission denied") || err.contains("connecting"),
        "{err}"
    );
}

#[test]
#[ignore = "needs root"]
fn editing_the_config_file_reloads_it() {
    if !common::require_root("editing_the_config_file_reloads_it") {
        return;
    }
    let lab = Lab::up("xr5", 2).expect("lab up");
    let d = spawn_xdpvs(&lab, &lab_config(&lab, &[1, 1], "")).expect("xdpvs starts");
    // No SIGHUP: the file watcher (watch_config, on by default) notices the change.
    d.write_config(&lab_config(&lab, &[1, 4], ""))
        .expect("write");
    common::wait_for(
        "the new weight from the edited file",
        Duration::from_secs(5),
        || status(&d).services[0].reals[1].weight == 4,
    );
    // A broken edit is rejected the same way; the table stays as it was.
    d.write_config("[director\n").expect("write");
    common::wait_for("the rejection logged", Duration::from_secs(5), || {
        d.log().contains("reload rejected")
    });
    assert_eq!(status(&d).services[0].reals[1].weight, 4);
}
