//! End to end, issue 14: the status page at `/` of the metrics listener, loaded in headless
//! Chromium (Debian's `chromium`) inside the director's namespace. The page renders the live
//! table from `/status.json`; the test compares what is on the page with the daemon's own
//! `xdpvs list --json`, stops a real and sees the page follow, and takes a screenshot. Needs
//! root; run under the lab lock.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{lab_config, spawn_xdpvs, Lab};

const PORT: u16 = 9479;

/// The page's DOM after its scripts ran (and a screenshot to `png`, if given).
fn chromium(lab: &Lab, png: Option<&std::path::Path>) -> String {
    let profile = lab.dir.join("chromium-profile");
    let mut args = vec![
        "netns".to_string(),
        "exec".into(),
        lab.ns("dir"),
        "chromium".into(),
        "--headless".into(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--no-first-run".into(),
        format!("--user-data-dir={}", profile.display()),
        "--virtual-time-budget=4000".into(),
        "--window-size=1280,900".into(),
    ];
    match png {
        Some(p) => args.push(format!("--screenshot={}", p.display())),
        None => args.push("--dump-dom".into()),
    }
    args.push(format!("http://127.0.0.1:{PORT}/"));
    let out = Command::new("ip")
        .args(&args)
        .env("HOME", &lab.dir)
        .output()
        .expect("run chromium (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The health cell of the row of real `addr`, as the page rendered it.
fn health_on_page(dom: &str, addr: &str) -> Option<String> {
    let row = dom.split(&format!("data-real=\"{addr}\"")).nth(1)?;
    let row = &row[..row.find("</tr>")?];
    let cell = row.split("data-field=\"health\"").nth(1)?;
    let text = &cell[cell.find('>')? + 1..];
    Some(text[..text.find('<')?].to_string())
}

fn field_on_page(dom: &str, addr: &str, field: &str) -> Option<String> {
    let row = dom.split(&format!("data-real=\"{addr}\"")).nth(1)?;
    let row = &row[..row.find("</tr>")?];
    let cell = row.split(&format!("data-field=\"{field}\"")).nth(1)?;
    let text = &cell[cell.find('>')? + 1..];
    Some(text[..text.find('<')?].to_string())
}

#[test]
#[ignore = "needs root"]
fn the_status_page_shows_the_live_table_in_a_browser() {
    if !common::require_root("the_status_page_shows_the_live_table_in_a_browser") {
        return;
    }
    assert!(
        Command::new("chromium").arg("--version").output().is_ok(),
        "chromium is needed: scripts/setup.sh installs it"
    );
    let lab = Lab::up("xsp", 3).expect("lab");
    let config = lab_config(&lab, &[1, 2, 3], "\n[service.check]\ntype = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 2")
        .replacen("metrics = \"off\"", &format!("metrics = \"127.0.0.1:{PORT}\""), 1);
    let d = spawn_xdpvs(&lab, &config).expect("xdpvs");
    // Some traffic, so the counters are not all zero.
    let ka = common::KeepAlive::open(&lab.ns("client"), common::vip_addr(), 6, "/")
        .expect("held connections");

    let st: xdpvs::admin::Status =
        serde_json::from_str(&d.admin(&["list", "--json"]).expect("list")).expect("json");
    let dom = chromium(&lab, None);
    assert!(dom.contains("xdpvs status"), "the page loaded: {dom}");
    for s in &st.services {
        assert!(
            dom.contains(&s.address),
            "service {} on the page",
            s.address
        );
        for r in &s.reals {
            assert_eq!(
                health_on_page(&dom, &r.address).as_deref(),
                Some(r.health.as_str()),
                "{}",
                r.address
            );
            assert_eq!(
                field_on_page(&dom, &r.address, "weight"),
                Some(r.weight.to_string())
            );
            assert_eq!(
                field_on_page(&dom, &r.address, "active"),
                Some(r.active.to_string()),
                "ActiveConn of {}",
                r.address
            );
        }
    }
    let active: u64 = st
        .services
        .iter()
        .flat_map(|s| s.reals.iter())
        .map(|r| r.active)
        .sum();
    assert_eq!(active, 6, "the held connections are counted");

    // A real goes down: the page follows.
    lab.stop_nginx(2).expect("stop real 2");
    let t0 = Instant::now();
    while !d.list().unwrap_or_default().contains(" down ") {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "real 2 not marked down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let dom = chromium(&lab, None);
    let r2 = common::real_addr(2).to_string();
    assert_eq!(health_on_page(&dom, &r2).as_deref(), Some("down"), "{dom}");
    assert_eq!(field_on_page(&dom, &r2, "weight").as_deref(), Some("0"));
    assert!(
        dom.contains("connection refused"),
        "the last failure reason is shown"
    );

    let png = lab.dir.join("status-page.png");
    chromium(&lab, Some(&png));
    let img = std::fs::read(&png).expect("the screenshot");
    assert!(img.starts_with(b"\x89PNG"), "a PNG");
    assert!(
        img.len() > 10_000,
        "a page was rendered ({} bytes)",
        img.len()
    );
    println!("screenshot: {} bytes", img.len());

    // Read-only: anything but GET is refused.
    let post = lab
        .exec(
            "dir",
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                &format!("http://127.0.0.1:{PORT}/"),
            ],
        )
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&post.stdout), "405");
    drop(ka);
    lab.start_nginx(2).expect("start real 2");
}
