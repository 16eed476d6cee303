//! `xdpvs check --config FILE` on configs with a bad health check: rejected with a non-zero
//! exit status and an error naming the file, the line and the key. No root needed.

use std::path::PathBuf;
use std::process::{Command, Output};

const HEAD: &str = "[director]\ninterface = \"d0\"\nmetrics = \"off\"\n\n\
                    [[service]]\nname = \"web\"\naddress = \"198.18.0.100:80\"\n";
const REAL: &str = "\n[[service.real]]\naddress = \"198.18.0.11:80\"\nweight = 1\n";

/// A config file in the temp dir, removed on drop.
struct TempConfig(PathBuf);

impl TempConfig {
    fn new(name: &str, text: &str) -> TempConfig {
        let path = std::env::temp_dir().join(format!(
            "xdpvs-cli-check-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).expect("write temp config");
        TempConfig(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn check(path: &PathBuf) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xdpvs"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run xdpvs check")
}

/// A service with `[service.check]` holding `check_lines`.
fn with_check(check_lines: &str) -> String {
    format!("{HEAD}\n[service.check]\n{check_lines}\n{REAL}")
}

/// 1-based line of the first line of `text` starting with `key_line`.
fn line_of(text: &str, key_line: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key_line))
        .unwrap_or_else(|| panic!("{key_line:?} not in {text}"))
        + 1
}

/// `xdpvs check` rejects `text`: non-zero exit, and stderr names the file, the line of
/// `bad_line` and `key` (and contains every one of `words`).
fn rejected(name: &str, text: &str, bad_line: &str, key: &str, words: &[&str]) {
    let cfg = TempConfig::new(name, text);
    let out = check(&cfg.0);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{name}: {} {}", out.status, stderr.trim());
    assert!(!out.status.success(), "{name}: accepted:\n{text}");
    let line = line_of(text, bad_line);
    let at = format!("{}:{line}:", cfg.0.display());
    assert!(
        stderr.contains(&at),
        "{name}: error does not point at {at}: {stderr}"
    );
    assert!(
        stderr.contains(key),
        "{name}: error does not name {key}: {stderr}"
    );
    for w in words {
        assert!(stderr.contains(w), "{name}: error lacks {w:?}: {stderr}");
    }
}

#[test]
fn good_config_passes() {
    let text = with_check(
        "type = \"http\"\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"500ms\"\n\
         rise = 2\nfall = 2\nexpect_status = [200, 204]\nexpect_body = \"^OK\"",
    );
    let cfg = TempConfig::new("good", &text);
    let out = check(&cfg.0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    // The shipped reference config passes too.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/example.toml");
    let out = check(&example);
    assert!(
        out.status.success(),
        "config/example.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn negative_interval() {
    let text = with_check("type = \"tcp\"\ninterval = \"-200ms\"");
    rejected(
        "neg-interval",
        &text,
        "interval",
        "check.interval",
        &["negative"],
    );
    let text = with_check("type = \"tcp\"\ninterval = -5");
    rejected(
        "neg-interval-bare",
        &text,
        "interval",
        "check.interval",
        &[],
    );
    let text = with_check("type = \"tcp\"\ntimeout = \"0ms\"");
    rejected("zero-timeout", &text, "timeout", "check.timeout", &[]);
}

#[test]
fn rise_and_fall_zero() {
    let text = with_check("type = \"tcp\"\nrise = 0");
    rejected("rise0", &text, "rise", "check.rise", &["0"]);
    let text = with_check("type = \"tcp\"\nfall = 0");
    rejected("fall0", &text, "fall", "check.fall", &["0"]);
    // In a per-real override too.
    let text = format!("{HEAD}{REAL}[service.real.check]\nrise = 0\n");
    rejected("real-rise0", &text, "rise", "real[0].check.rise", &[]);
}

#[test]
fn unknown_check_type() {
    let text = with_check("type = \"smtp\"");
    rejected("type", &text, "type", "check.type", &["smtp"]);
}

#[test]
fn regex_that_does_not_compile() {
    let text = with_check("type = \"http\"\nexpect_body = \"(unclosed\"");
    rejected(
        "regex",
        &text,
        "expect_body",
        "check.expect_body",
        &["(unclosed"],
    );
}

#[test]
fn unknown_key_in_check() {
    let text = with_check("type = \"http\"\nintervall = \"1s\"");
    rejected("unknown-key", &text, "intervall", "intervall", &[]);
}

/// `xdpvs run --log-format json`: every log line is one JSON object with the timestamp, level,
/// target, message and the event's fields at top level. (The interface does not exist, so the
/// daemon logs its start and stops at the host check: no root needed.)
#[test]
fn run_logs_json_lines_for_log_shippers() {
    let cfg = TempConfig::new(
        "json-log",
        "[director]\ninterface = \"xdpvsnone0\"\nmetrics = \"off\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_xdpvs"))
        .args(["run", "--log-format", "json", "--config"])
        .arg(&cfg.0)
        .env("RUST_LOG", "info")
        .output()
        .expect("run xdpvs run");
    assert!(
        !out.status.success(),
        "a missing interface stops the daemon"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        !lines.is_empty(),
        "no log line; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v.get(key).is_some(), "no {key} in {l}");
        }
    }
    let start: serde_json::Value = serde_json::from_str(lines[0]).expect("json");
    assert_eq!(start["level"], "INFO");
    assert!(start["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("starting xdpvs")));
    assert_eq!(start["services"], 0, "event fields at top level: {start}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("xdpvsnone0"),
        "the reason names the interface: {err}"
    );
}

#[test]
fn ca_file_is_read_with_the_config() {
    rejected(
        "ca-missing",
        &with_check("type = \"https\"\nca_file = \"no-such-ca.pem\""),
        "ca_file",
        "service[0].check.ca_file",
        &["cannot read", "no-such-ca.pem"],
    );
    // Relative to the config file's directory; a file without a certificate is refused.
    let name = format!("xdpvs-cli-check-{}-ca.pem", std::process::id());
    let pem = std::env::temp_dir().join(&name);
    std::fs::write(&pem, "no certificate here\n").expect("write");
    rejected(
        "ca-empty",
        &with_check(&format!("type = \"https\"\nca_file = \"{name}\"")),
        "ca_file",
        "service[0].check.ca_file",
        &["no PEM certificate"],
    );
    let _ = std::fs::remove_file(&pem);
}
