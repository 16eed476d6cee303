//! The Debian package (issue 14 item 2), as an operator gets it: built by `scripts/deb.sh`
//! (release profile, cargo-deb), then installed with dpkg into a scratch root with its own
//! database (`dpkg --root`, maintainer scripts run chrootless with DPKG_ROOT, as
//! deb-systemd-helper supports), upgraded in place and purged.
//!
//! Checked: the control fields; every file with its mode and content (binary, conffile, unit,
//! one man page per subcommand as generated from the clap definitions, docs); the unit enabled
//! by the postinst but neither started nor restarted at install (systemctl and
//! deb-systemd-invoke are recorded by stand-ins, under a /run/systemd/system private to dpkg's
//! mount namespace, so the scripts take their systemd branch without touching this machine's
//! services); the packaged binary runs and accepts its config; `man -l` renders every page
//! without a warning; `systemd-analyze verify` passes the installed unit with nothing to say
//! (its "..., ignoring" warnings exit 0, so any output fails the test); an upgrade keeps an
//! edited conffile and try-restarts the unit; a purge removes it all. Needs root (dpkg as root,
//! mount namespaces); the release build takes minutes on a cold tree.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Instant;

fn root_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `cmd`; its output, or a panic with everything it printed.
fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stand-ins for `systemctl` and `deb-systemd-invoke` that append their arguments to `log`.
fn shims(dir: &Path, log: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for name in ["systemctl", "deb-systemd-invoke"] {
        let p = dir.join(name);
        std::fs::write(
            &p,
            format!("#!/bin/sh\necho \"{name} $*\" >> '{}'\n", log.display()),
        )
        .unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

/// `dpkg --root=ROOT ARGS...` in a private mount namespace whose /run holds only an empty
/// /run/systemd/system ("systemd is running", for the maintainer scripts), with the stand-ins
/// first on PATH.
fn dpkg(root: &Path, shim_dir: &Path, args: &[&str]) -> Output {
    let path = format!(
        "{}:{}",
        shim_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    run(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t tmpfs none /run && mkdir -p /run/systemd/system && \
                 exec dpkg --root=\"$0\" --force-script-chrootless --force-depends \"$@\"",
            )
            .arg(root)
            .args(args)
            .env("PATH", path),
        &format!("dpkg {args:?}"),
    )
}

/// The shim log's lines since the last call, and empties it.
fn take_log(log: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let _ = std::fs::remove_file(log);
    text.lines().map(str::to_string).collect()
}

/// The control file's fields (continuation lines joined).
fn control_fields(deb: &Path) -> Vec<(String, String)> {
    let text = stdout(&run(
        Command::new("dpkg-deb").arg("--field").arg(deb),
        "dpkg-deb --field",
    ));
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with(' ') {
            if let Some(last) = fields.last_mut() {
                last.1.push('\n');
                last.1.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            fields.push((k.to_string(), v.trim().to_string()));
        }
    }
    fields
}

fn field<'a>(fields: &'a [(String, String)], k: &str) -> &'a str {
    fields
        .iter()
        .find(|(key, _)| key == k)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {k} in the control file: {fields:?}"))
}

/// A file of the installed tree: its mode (permission bits), after checking it is a regular
/// file owned by root.
fn mode_of(root: &Path, rel: &str) -> u32 {
    let p = root.join(rel);
    let m = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{rel} not installed: {e}"));
    assert!(m.file_type().is_file(), "{rel} is not a regular file");
    assert_eq!((m.uid(), m.gid()), (0, 0), "{rel} is not root's");
    m.permissions().mode() & 0o7777
}

fn gunzip(path: &Path) -> Vec<u8> {
    run(Command::new("gzip").arg("-dc").arg(path), "gzip -dc").stdout
}

/// The regular files the package must install (paths relative to /), with their modes.
fn expected_files() -> Vec<(String, u32)> {
    let mut files = vec![
        ("usr/sbin/xdpvs".to_string(), 0o755),
        ("etc/xdpvs/xdpvs.toml".to_string(), 0o644),
        ("usr/lib/systemd/system/xdpvs.service".to_string(), 0o644),
        ("usr/share/doc/xdpvs/README.md".to_string(), 0o644),
        ("usr/share/doc/xdpvs/copyright".to_string(), 0o644),
        (
            "usr/share/doc/xdpvs/examples/example.toml".to_string(),
            0o644,
        ),
    ];
    for e in std::fs::read_dir(root_dir().join("docs")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".md") {
            files.push((format!("usr/share/doc/xdpvs/{name}"), 0o644));
        }
    }
    for (name, _) in xdpvs::cli::man_pages().unwrap() {
        files.push((format!("usr/share/man/man8/{name}.gz"), 0o644));
    }
    files.sort();
    files
}

/// `xdpvs.toml` with its commented `[[service]]` example switched on.
fn with_example_service(config: &str) -> String {
    let mut on = false;
    config
        .lines()
        .map(|l| {
            on |= l.starts_with("#[[service]]");
            match l.strip_prefix('#') {
                Some(rest) if on => rest.to_string(),
                _ => l.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[ignore = "needs root"]
fn the_package_installs_upgrades_and_purges_in_a_scratch_root() {
    if !common::require_root("the_package_installs_upgrades_and_purges_in_a_scratch_root") {
        return;
    }
    let t0 = Instant::now();
    // As a person runs it: without what `cargo test` sets for a test (OUT_DIR, CARGO_PKG_*,
    // LD_LIBRARY_PATH...), which would make the inner cargo rebuild crates that read them, and
    // the next plain build rebuild them back.
    let mut deb_sh = Command::new(root_dir().join("scripts/deb.sh"));
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let cargo_set = (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTUP_TOOLCHAIN")
            || ["OUT_DIR", "LD_LIBRARY_PATH", "RUST_RECURSION_COUNT"].contains(&k.as_ref());
        if cargo_set && k != "CARGO_TARGET_DIR" {
            deb_sh.env_remove(k.as_ref());
        }
    }
    let built = run(&mut deb_sh, "scripts/deb.sh");
    let build_log = String::from_utf8_lossy(&built.stderr);
    eprintln!(
        "scripts/deb.sh took {:.0?}:\n{}",
        t0.elapsed(),
        build_log
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let deb = root_dir().join(
        stdout(&built)
            .lines()
            .last()
            .expect("deb.sh prints the package's path")
            .trim(),
    );
    assert!(deb.is_file(), "no package at {}", deb.display());

    // The control file.
    let fields = control_fields(&deb);
    let arch = stdout(&run(
        Command::new("dpkg").arg("--print-architecture"),
        "dpkg --print-architecture",
    ));
    assert_eq!(field(&fields, "Package"), "xdpvs");
    assert_eq!(
        field(&fields, "Version"),
        format!("{}-1", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(field(&fields, "Architecture"), arch.trim());
    assert_eq!(field(&fields, "Section"), "net");
    assert!(
        field(&fields, "Depends").contains("libc6 (>="),
        "Depends ($auto) lacks libc6: {fields:?}"
    );
    assert_eq!(field(&fields, "Recommends"), "iproute2");
    assert!(field(&fields, "Maintainer").contains('@'));
    assert!(field(&fields, "Description").contains("XDP"));

    // The maintainer scripts and conffiles as packaged.
    let scratch = Scratch(std::env::temp_dir().join(format!("xdpvs-deb-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0).unwrap();
    let control = scratch.0.join("control");
    run(
        Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control),
        "dpkg-deb -e",
    );
    let conffiles = std::fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert_eq!(conffiles.trim(), "/etc/xdpvs/xdpvs.toml");
    let script = |n: &str| std::fs::read_to_string(control.join(n)).unwrap_or_default();
    assert!(
        script("postinst").contains("deb-systemd-helper enable xdpvs.service"),
        "postinst does not enable the unit:\n{}",
        script("postinst")
    );
    assert!(
        !script("postinst").contains("deb-systemd-invoke start"),
        "postinst starts the unit"
    );
    assert!(script("prerm").contains("deb-systemd-invoke stop xdpvs.service"));
    assert!(script("postrm").contains("deb-systemd-helper purge xdpvs.service"));

    // Install into a scratch root with its own dpkg database.
    let root = scratch.0.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let shim_dir = scratch.0.join("shims");
    let log = scratch.0.join("systemctl.log");
    shims(&shim_dir, &log);
    dpkg(&root, &shim_dir, &["-i", deb.to_str().unwrap()]);
    let calls = take_log(&log);
    assert!(
        calls.iter().all(|c| !c.contains("start")),
        "the install started the unit: {calls:?}"
    );
    assert!(
        calls.iter().any(|c| c.contains("daemon-reload")),
        "{calls:?}"
    );
    let status = stdout(&run(
        Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args(["-s", "xdpvs"]),
        "dpkg -s",
    ));
    assert!(status.contains("Status: install ok installed"), "{status}");

    // Every file, with its mode; nothing else.
    let want = expected_files();
    for (rel, mode) in &want {
        assert_eq!(mode_of(&root, rel), *mode, "mode of /{rel}");
    }
    let listed = stdout(&run(
        Command::new("dpkg-deb").arg("--contents").arg(&deb),
        "dpkg-deb --contents",
    ));
    let mut packaged: Vec<String> = listed
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches("./").to_string())
        .collect();
    packaged.sort();
    let want_paths: Vec<String> = want.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(packaged, want_paths, "the package's files");
    let bin = root.join("usr/sbin/xdpvs");
    let elf = std::fs::read(&bin).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF", "usr/sbin/xdpvs is not an ELF binary");
    let same = |rel: &str, src: &str| {
        assert_eq!(
            std::fs::read(root.join(rel)).unwrap(),
            std::fs::read(root_dir().join(src)).unwrap(),
            "/{rel} is not {src}"
        );
    };
    same("etc/xdpvs/xdpvs.toml", "config/xdpvs.toml");
    same(
        "usr/lib/systemd/system/xdpvs.service",
        "packaging/xdpvs.service",
    );
    same(
        "usr/share/doc/xdpvs/examples/example.toml",
        "config/example.toml",
    );
    for (name, text) in xdpvs::cli::man_pages().unwrap() {
        let page = root.join(format!("usr/share/man/man8/{name}.gz"));
        assert_eq!(gunzip(&page), text, "{name} is not the generated page");
    }
    // Enabled: the [Install] symlink, made by deb-systemd-helper in the scratch root.
    let wants = root.join("etc/systemd/system/multi-user.target.wants/xdpvs.service");
    assert_eq!(
        std::fs::read_link(&wants).expect("the unit is not enabled"),
        Path::new("/usr/lib/systemd/system/xdpvs.service")
    );

    // The packaged binary runs, and its config passes `check` (also with the example service).
    let version = stdout(&run(Command::new(&bin).arg("--version"), "xdpvs --version"));
    assert_eq!(
        version.trim(),
        format!("xdpvs {}", env!("CARGO_PKG_VERSION"))
    );
    let conf = root.join("etc/xdpvs/xdpvs.toml");
    let checked = stdout(&run(
        Command::new(&bin).arg("check").arg("-c").arg(&conf),
        "xdpvs check on the packaged config",
    ));
    assert!(
        checked.contains("OK (0 services, 0 real servers)"),
        "{checked}"
    );
    let example = scratch.0.join("with-service.toml");
    std::fs::write(
        &example,
        with_example_service(&std::fs::read_to_string(&conf).unwrap()),
    )
    .unwrap();
    let checked = stdout(&run(
        Command::new(&bin).arg("check").arg("-c").arg(&example),
        "xdpvs check on the packaged config with its example service",
    ));
    assert!(
        checked.contains("OK (1 services, 2 real servers)"),
        "{checked}"
    );

    // Every man page renders, without a warning.
    for (name, _) in xdpvs::cli::man_pages().unwrap() {
        let page = root.join(format!("usr/share/man/man8/{name}.gz"));
        let out = run(
            Command::new("man")
                .arg("--warnings")
                .arg("-l")
                .arg(&page)
                .env("MANWIDTH", "100")
                .env_remove("MAN_KEEP_FORMATTING"),
            &format!("man -l {name}"),
        );
        let text = stdout(&out);
        let stem = name.trim_end_matches(".8");
        assert!(
            text.contains(&format!("{stem}(8)")) && text.contains("NAME"),
            "{name} renders as:\n{text}"
        );
        assert!(
            out.stderr.is_empty(),
            "man warns about {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if name == "xdpvs.8" {
            for want in [
                "SIGHUP",
                "/etc/xdpvs/xdpvs.toml",
                "xdpvs-run(8)",
                "NOTIFY_SOCKET",
            ] {
                assert!(text.contains(want), "xdpvs(8) lacks {want:?}:\n{text}");
            }
        }
    }

    // systemd-analyze verify on the installed unit, with the package's /usr laid over this
    // machine's (a read-only overlay in a private mount namespace): ExecStart's binary and the
    // man page of Documentation= exist there, and so do systemd's own units.
    let verify = |unit: &Path| -> Output {
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t overlay overlay -o lowerdir=\"$0/usr\":/usr /usr && \
                 exec systemd-analyze verify \"$1\"",
            )
            .arg(&root)
            .arg(unit)
            .stdin(Stdio::null())
            .output()
            .expect("run systemd-analyze verify")
    };
    let out = verify(Path::new("/usr/lib/systemd/system/xdpvs.service"));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "systemd-analyze verify has something to say about xdpvs.service ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The same check fails a unit with an error in it (a key systemd 252 does not know).
    let broken_dir = scratch.0.join("broken");
    std::fs::create_dir_all(&broken_dir).unwrap();
    let broken = broken_dir.join("xdpvs.service");
    let unit = std::fs::read_to_string(root.join("usr/lib/systemd/system/xdpvs.service")).unwrap();
    std::fs::write(
        &broken,
        unit.replace("Type=notify\n", "Type=notify-reload\n"),
    )
    .unwrap();
    let out = verify(&broken);
    assert!(
        !out.stderr.is_empty() || !out.status.success(),
        "systemd-analyze verify accepted Type=notify-reload on systemd 252"
    );
    // The bounding set names capabilities this system knows (systemd ignores unknown ones).
    let caps = unit
        .lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet");
    let caps: Vec<String> = caps
        .split_whitespace()
        .map(|c| format!("+{}", c.to_ascii_lowercase().trim_start_matches("cap_")))
        .collect();
    run(
        Command::new("setpriv")
            .arg(format!("--bounding-set=-all,{}", caps.join(",")))
            .args(["--", "true"]),
        "setpriv with the unit's capabilities",
    );

    // Upgrade in place (the same version again): an edited conffile stays, a running unit is
    // try-restarted (the new daemon adopts the pinned dataplane), nothing is stopped.
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(&conf).unwrap()
    );
    std::fs::write(&conf, &edited).unwrap();
    dpkg(&root, &shim_dir, &["-i", deb.to_str().unwrap()]);
    assert_eq!(
        std::fs::read_to_string(&conf).unwrap(),
        edited,
        "the upgrade replaced the edited conffile"
    );
    let calls = take_log(&log);
    assert!(
        calls
            .iter()
            .any(|c| c == "deb-systemd-invoke try-restart xdpvs.service"),
        "the upgrade does not try-restart the unit: {calls:?}"
    );
    assert!(
        !calls.iter().any(|c| c.contains(" stop ")),
        "the upgrade stopped the unit: {calls:?}"
    );

    // Purge: stopped, disabled, every file gone (the conffile too).
    dpkg(&root, &shim_dir, &["--purge", "xdpvs"]);
    let calls = take_log(&log);
    assert!(
        calls
            .iter()
            .any(|c| c == "deb-systemd-invoke stop xdpvs.service"),
        "the removal does not stop the unit: {calls:?}"
    );
    for (rel, _) in &want {
        assert!(!root.join(rel).exists(), "/{rel} left after purge");
    }
    assert!(
        std::fs::symlink_metadata(&wants).is_err(),
        "the unit is still enabled after purge"
    );
    let out = Command::new("dpkg")
        .arg(format!("--root={}", root.display()))
        .args(["-s", "xdpvs"])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "xdpvs still known to dpkg after purge"
    );
    eprintln!("deb test took {:.0?} in all", t0.elapsed());
}
