//! `xdpvs import ldirectord`: configs written as ldirectord(8) describes them, and the sample
//! Debian's `ldirectord` package ships (downloaded and unpacked by the test, not copied into the
//! repository), translate to TOML that `xdpvs check` accepts, carrying every translatable setting
//! and warning, by line, about the others.

use std::process::Command;

use xdpvs::config::{CheckKind, Forwarding, OnFailure, Persistence, Protocol, Scheduler};
use xdpvs::import::ldirectord::translate;

const MAN_PAGE_STYLE: &str = "\
# Global directives
checktimeout=3
checkinterval=2
failurecount=2
quiescent=yes
autoreload=yes
logfile=\"/var/log/ldirectord.log\"

# A web site, direct routing
virtual=198.18.0.100:80
\tservicename=www
\treal=198.18.0.11:80 gate 1
\treal=198.18.0.12:80 gate 2
\treal=198.18.0.13:80 gate 3
\tfallback=198.18.0.9:80 gate
\tservice=http
\tscheduler=wlc
\tpersistent=600
\tnetmask=255.255.255.0
\tprotocol=tcp
\tchecktype=negotiate
\trequest=\"health\"
\treceive=\"^OK\"
\tvirtualhost=www.example.com

# NAT to another port, a range of reals
virtual=198.18.0.100:443
\treal=198.18.0.21->198.18.0.23:8443 masq 5
\tservice=https
\tchecktype=negotiate
\tchecktimeout=1.5
\tquiescent=no

# DNS over UDP
virtual=198.18.0.100:53
\treal=198.18.0.11:53 gate
\treal=198.18.0.12:53 gate
\tservice=dns
\tprotocol=udp
\tchecktype=negotiate
\trequest=\"example.com\"
\tscheduler=sh
";

fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle} not in the text"))
        + 1
}

#[test]
fn a_man_page_style_config_translates_setting_by_setting() {
    let out = translate(MAN_PAGE_STYLE, "ldirectord.cf");
    let cfg = out
        .validate()
        .unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
    assert!(cfg.director.watch_config, "autoreload=yes");
    assert_eq!(cfg.services.len(), 3);

    let www = cfg.service("www").expect("servicename kept");
    assert_eq!(
        www.persistence,
        Some(Persistence {
            timeout: std::time::Duration::from_secs(600),
            prefix: 24
        }),
        "persistent=600 with netmask=255.255.255.0"
    );
    assert_eq!(www.address.to_string(), "198.18.0.100:80");
    assert_eq!(www.scheduler, Scheduler::Wlc);
    assert_eq!(www.forwarding, Forwarding::Dr);
    assert_eq!(www.on_failure, OnFailure::Quiesce, "quiescent=yes");
    assert_eq!(
        www.fallback.map(|f| f.to_string()).as_deref(),
        Some("198.18.0.9:80")
    );
    let weights: Vec<(String, u32)> = www
        .reals
        .iter()
        .map(|r| (r.address.to_string(), r.weight))
        .collect();
    assert_eq!(
        weights,
        [
            ("198.18.0.11:80", 1),
            ("198.18.0.12:80", 2),
            ("198.18.0.13:80", 3)
        ]
        .map(|(a, w)| (a.to_string(), w))
    );
    let c = &www.reals[0].check;
    assert_eq!(c.kind, CheckKind::Http);
    assert_eq!(c.path, "/health", "request gains its leading slash");
    assert_eq!(c.expect_body.as_ref().map(|r| r.as_str()), Some("^OK"));
    assert_eq!(c.host.as_deref(), Some("www.example.com"));
    assert_eq!((c.timeout.as_secs(), c.interval.as_secs()), (3, 2));
    assert_eq!(
        (c.fall, c.rise),
        (2, 1),
        "failurecount; ldirectord re-adds after one success"
    );

    let tls = &cfg.services[1];
    assert_eq!(tls.forwarding, Forwarding::Nat);
    assert_eq!(
        tls.on_failure,
        OnFailure::Remove,
        "per-virtual quiescent=no"
    );
    let reals: Vec<String> = tls.reals.iter().map(|r| r.address.to_string()).collect();
    assert_eq!(
        reals,
        ["198.18.0.21:8443", "198.18.0.22:8443", "198.18.0.23:8443"]
    );
    assert!(tls.reals.iter().all(|r| r.weight == 5));
    assert_eq!(tls.reals[0].check.kind, CheckKind::Https);
    assert_eq!(tls.reals[0].check.timeout.as_millis(), 1500);

    let dns = &cfg.services[2];
    assert_eq!(dns.protocol, Protocol::Udp);
    assert_eq!(dns.reals[0].check.kind, CheckKind::Dns);
    assert_eq!(dns.reals[0].check.dns_query, "example.com");
    assert_eq!(
        dns.scheduler,
        Scheduler::Wlc,
        "sh is not supported yet: wlc, warned"
    );

    // What did not carry over is warned about at its line.
    let warned = |needle: &str, about: &str| {
        let line = line_of(MAN_PAGE_STYLE, needle);
        assert!(
            out.warnings
                .iter()
                .any(|w| w.line == line && w.message.contains(about)),
            "no warning at line {line} ({needle}) about {about}: {:?}",
            out.warnings
        );
    };
    warned("logfile=", "not translated");
    warned("scheduler=sh", "not supported");
    assert!(
        out.warnings.iter().any(|w| w.message.contains("interface")),
        "the interface to set is pointed out"
    );
}

/// Unpacks Debian's package `pkg` (apt-get download + dpkg-deb, nothing installed) into a
/// fresh directory, which it returns.
fn unpack(pkg: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("xdpvs-import-{pkg}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let download = || {
        Command::new("apt-get")
            .args(["download", pkg])
            .current_dir(&dir)
            .output()
            .expect("apt-get")
    };
    let mut got = download();
    if !got.status.success() {
        // A machine whose package lists were cleaned (a container image): fetch them once.
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        got = download();
    }
    assert!(
        got.status.success(),
        "apt-get download {pkg} (Debian's package registry is needed): {}",
        String::from_utf8_lossy(&got.stderr)
    );
    let deb = std::fs::read_dir(&dir)
        .expect("read dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("the .deb");
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(dir.join("x"))
        .status()
        .expect("dpkg-deb");
    assert!(st.success());
    dir
}

/// The sample config of Debian's `ldirectord` package (unpacked, not installed).
fn debian_sample() -> String {
    let dir = unpack("ldirectord");
    let text =
        std::fs::read_to_string(dir.join("x/usr/share/doc/ldirectord/examples/ldirectord.cf"))
            .expect("the packaged sample");
    let _ = std::fs::remove_dir_all(&dir);
    text
}

#[test]
fn the_debian_sample_and_every_block_it_comments_out_translate() {
    let sample = debian_sample();
    let out = translate(&sample, "ldirectord.cf");
    let cfg = out
        .validate()
        .unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
    let web = cfg.service("Web_Site").expect("servicename=Web Site");
    assert_eq!(web.scheduler, Scheduler::Rr);
    assert_eq!(web.reals.len(), 3);
    assert_eq!(web.reals[0].check.kind, CheckKind::Http);
    assert_eq!(
        web.reals[0].check.expect_body.as_ref().map(|r| r.as_str()),
        Some("Test Page")
    );
    assert_eq!(web.on_failure, OnFailure::Remove, "quiescent=no");
    // The loopback fallback cannot be an XDP real: warned at its line.
    let fb = line_of(&sample, "fallback=127.0.0.1:80 gate");
    assert!(out
        .warnings
        .iter()
        .any(|w| w.line == fb && w.message.contains("loopback")));

    // The sample's commented-out blocks, as an operator would enable them.
    let mut all = String::new();
    let mut on = false;
    for l in sample.lines() {
        if l.starts_with("#virtual") {
            on = true;
        } else if l.trim().is_empty() {
            on = false;
        }
        let l = if on { l.trim_start_matches('#') } else { l };
        all.push_str(l);
        all.push('\n');
    }
    let out = translate(&all, "ldirectord-all.cf");
    let cfg = out
        .validate()
        .unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
    println!(
        "{} services, {} warnings:\n{}",
        cfg.services.len(),
        out.warnings.len(),
        out.warnings
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(cfg.services.len() >= 15, "{} services", cfg.services.len());
    assert!(cfg.services.iter().any(|s| s.forwarding == Forwarding::Nat));
    assert!(cfg.services.iter().any(|s| s.protocol == Protocol::Udp));
    // Every warning names a line of the file, except the one about the interface.
    for w in &out.warnings {
        assert!(
            w.line > 0 || w.message.contains("interface"),
            "a warning without its line: {w}"
        );
    }
    for needle in [
        "virtual=1",
        "virtual6=",
        "real=sql01->sql03:3306",
        "checktype=ping",
    ] {
        // The first line that is this setting (not merely contains it: "virtual=192...").
        let line = all
            .lines()
            .position(|l| {
                l.trim().strip_prefix(needle).is_some_and(|rest| {
                    rest.chars()
                        .next()
                        .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '.')
                })
            })
            .expect("the setting is in the file")
            + 1;
        assert!(
            out.warnings.iter().any(|w| w.line == line),
            "nothing said about line {line} ({needle})"
        );
    }
}

#[test]
fn the_cli_prints_toml_and_warnings() {
    let path = std::env::temp_dir().join(format!("xdpvs-import-cli-{}.cf", std::process::id()));
    std::fs::write(&path, MAN_PAGE_STYLE).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_xdpvs"))
        .args(["import", "ldirectord"])
        .arg(&path)
        .output()
        .expect("run xdpvs import");
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8_lossy(&out.stdout);
    assert!(
        toml.contains("[[service]]") && toml.contains("name = \"www\""),
        "{toml}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let line = line_of(MAN_PAGE_STYLE, "logfile=");
    assert!(
        err.contains(&format!("{}:{line}:", path.display())),
        "warnings name file and line: {err}"
    );
}

#[test]
fn every_sample_of_debians_keepalived_package_translates() {
    let dir = unpack("keepalived");
    let samples = dir.join("x/usr/share/doc/keepalived/samples");
    let mut files: Vec<_> = std::fs::read_dir(&samples)
        .expect("the package's samples")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("keepalived.conf"))
        })
        .collect();
    files.sort();
    assert!(files.len() >= 20, "{} samples", files.len());
    let (mut services, mut vrrps) = (0, 0);
    for f in &files {
        let text = std::fs::read_to_string(f).expect("sample");
        let name = f.display().to_string();
        let out = xdpvs::import::keepalived::translate(&text, &name);
        let cfg = out
            .validate()
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", out.toml));
        for w in &out.warnings {
            assert!(
                w.line > 0 || w.message.contains("interface"),
                "{name}: a warning without its line: {w}"
            );
        }
        services += cfg.services.len();
        vrrps += cfg.vrrp.len();
        if name.ends_with("keepalived.conf.sample") {
            let s = &cfg.services[0];
            assert_eq!(s.address.to_string(), "10.10.10.2:1358");
            assert_eq!(
                (s.scheduler, s.forwarding),
                (Scheduler::Rr, Forwarding::Nat)
            );
            assert_eq!(
                s.fallback.map(|f| f.to_string()).as_deref(),
                Some("192.168.200.200:1358")
            );
            let c = &s.reals[0].check;
            assert_eq!(
                (c.kind, c.path.as_str()),
                (CheckKind::Http, "/testurl3/test.jsp")
            );
            assert_eq!(
                (c.interval.as_secs(), c.timeout.as_secs(), c.fall),
                (6, 3, 4)
            );
            let v = &cfg.vrrp[0];
            assert_eq!(
                (v.name.as_str(), v.virtual_router_id, v.priority),
                ("VI_1", 50, 100)
            );
            assert!(!v.preempt, "nopreempt");
            assert_eq!(v.addresses.len(), 3);
            let persistence = line_of(&text, "persistence_timeout");
            assert!(
                !out.warnings.iter().any(|w| w.line == persistence),
                "persistence_timeout is translated"
            );
            assert!(s.persistence.is_some(), "persistence_timeout carried over");
        }
        if name.ends_with("keepalived.conf.inhibit") {
            assert_eq!(
                cfg.services[0].on_failure,
                OnFailure::Quiesce,
                "inhibit_on_failure"
            );
        }
    }
    println!(
        "{} samples: {services} services, {vrrps} VRRP instances",
        files.len()
    );
    assert!(
        services >= 12 && vrrps >= 20,
        "{services} services, {vrrps} instances"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_keepalived_conf_as_its_man_page_describes_translates_with_its_includes() {
    let dir = std::env::temp_dir().join(format!("xdpvs-import-ka-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("vrrp.conf"),
        "vrrp_instance front {\n  state MASTER\n  interface eth1\n  virtual_router_id 51\n  \
         priority 150\n  advert_int 0.1\n  preempt_delay 5\n  authentication {\n    auth_type PASS\n  }\n  \
         virtual_ipaddress {\n    198.18.0.100/32 dev eth1\n  }\n}\n",
    )
    .expect("write");
    let main = "! keepalived.conf\n\
        include vrrp.conf\n\
        virtual_server 198.18.0.100 80 {\n\
        \x20   delay_loop 2\n    lb_algo wlc\n    lb_kind DR\n    protocol TCP\n\
        \x20   real_server 198.18.0.11 80 {\n        weight 3\n        inhibit_on_failure\n\
        \x20       TCP_CHECK {\n            connect_timeout 1\n            connect_port 8080\n        }\n    }\n\
        \x20   real_server 198.18.0.12 80 {\n        weight 1\n        inhibit_on_failure\n\
        \x20       MISC_CHECK {\n            misc_path \"/usr/local/bin/check.sh 198.18.0.12\"\n            misc_timeout 4\n        }\n    }\n}\n\
        virtual_server 198.18.0.100 53 {\n    protocol UDP\n    lb_algo rr\n\
        \x20   real_server 198.18.0.11 53 {\n        DNS_CHECK {\n            name example.com\n        }\n    }\n}\n";
    let path = dir.join("keepalived.conf");
    std::fs::write(&path, main).expect("write");
    let out = xdpvs::import::keepalived::translate(main, &path.display().to_string());
    let cfg = out
        .validate()
        .unwrap_or_else(|e| panic!("{e}\n{}", out.toml));
    let web = &cfg.services[0];
    assert_eq!(
        (web.scheduler, web.forwarding, web.on_failure),
        (Scheduler::Wlc, Forwarding::Dr, OnFailure::Quiesce)
    );
    assert_eq!(web.reals[0].weight, 3);
    let c0 = &web.reals[0].check;
    assert_eq!(
        (
            c0.kind,
            c0.port,
            c0.timeout.as_secs(),
            c0.interval.as_secs()
        ),
        (CheckKind::Tcp, Some(8080), 1, 2)
    );
    let c1 = &web.reals[1].check;
    assert_eq!(
        c1.kind,
        CheckKind::Exec,
        "a per-real check where the reals differ"
    );
    assert_eq!(
        c1.command.as_deref(),
        Some("/usr/local/bin/check.sh 198.18.0.12")
    );
    let dns = &cfg.services[1];
    assert_eq!(dns.protocol, Protocol::Udp);
    assert_eq!(
        (
            dns.reals[0].check.kind,
            dns.reals[0].check.dns_query.as_str()
        ),
        (CheckKind::Dns, "example.com")
    );
    let v = &cfg.vrrp[0];
    assert_eq!(
        (v.interface.as_str(), v.virtual_router_id, v.priority),
        ("eth1", 51, 150)
    );
    assert_eq!(v.advert_interval.as_millis(), 100, "advert_int 0.1");
    assert_eq!(v.preempt_delay.as_secs(), 5);
    let included = dir.join("vrrp.conf").display().to_string();
    assert!(
        out.warnings
            .iter()
            .any(|w| w.file == included && w.message.contains("authentication")),
        "warnings inside an included file name it: {:?}",
        out.warnings
    );
    let _ = std::fs::remove_dir_all(&dir);
}
