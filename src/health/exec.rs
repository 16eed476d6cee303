//! External command check (keepalived's `MISC_CHECK`, ldirectord's `external`): exit 0 = up.
//!
//! For everything the built-in checkers cannot express. The command runs as `/bin/sh -c command`
//! with a clean environment: only `PATH` ([`EXEC_PATH`]) and the real (`XDPVS_REAL_IP`,
//! `XDPVS_REAL_PORT` = the check port, `XDPVS_CHECK_TIMEOUT_MS`); no stdin and no output. It runs in its own process group, and on
//! timeout (or if the probe is abandoned) the whole group is killed, so a hanging script and the
//! children it started do not pile up every interval.

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::process::Command;

use super::{check_port, fmt_duration, CheckConfig, Failure, FailureKind};

/// The only inherited-looking variable a check command gets besides its own `XDPVS_*`.
pub const EXEC_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs the check command, bounded by `cfg.timeout` (this checker applies its own timeout).
pub async fn probe(cfg: &CheckConfig, real: SocketAddr) -> Result<(), Failure> {
    let Some(command) = cfg.command.as_deref().filter(|c| !c.trim().is_empty()) else {
        return Err(Failure::new(
            FailureKind::Config,
            "exec: no command configured",
        ));
    };
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        // Nothing of the daemon's environment (credentials, proxies, LD_*) leaks into checks.
        .env_clear()
        .env("PATH", EXEC_PATH)
        .env("XDPVS_REAL_IP", real.ip().to_string())
        .env("XDPVS_REAL_PORT", check_port(cfg, real).to_string())
        .env(
            "XDPVS_CHECK_TIMEOUT_MS",
            cfg.timeout.as_millis().to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::new(FailureKind::Other, format!("exec: cannot run /bin/sh: {e}")))?;
    // Declared after `child`, so dropped before it: the group dies before tokio reaps the leader.
    let mut group = GroupKiller(child.id().and_then(|p| i32::try_from(p).ok()));

    match tokio::time::timeout(cfg.timeout, child.wait()).await {
        Ok(Ok(status)) => {
            group.disarm();
            judge(status)
        }
        Ok(Err(e)) => Err(Failure::new(FailureKind::Other, format!("exec: wait: {e}"))),
        Err(_) => {
            group.kill();
            // SIGKILL cannot be ignored: reaping is prompt. Bounded anyway.
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), child.wait()).await {
                group.disarm();
            }
            Err(Failure::new(
                FailureKind::Timeout,
                format!("killed after timeout {}", fmt_duration(cfg.timeout)),
            ))
        }
    }
}

fn judge(status: ExitStatus) -> Result<(), Failure> {
    if status.success() {
        return Ok(());
    }
    match (status.code(), status.signal()) {
        (Some(code), _) => Err(Failure::new(
            FailureKind::ExecStatus,
            format!("exit status {code}"),
        )),
        (None, Some(sig)) => Err(Failure::new(
            FailureKind::ExecKilled,
            format!("killed by signal {sig}"),
        )),
        (None, None) => Err(Failure::new(FailureKind::Other, format!("exec: {status}"))),
    }
}

/// SIGKILLs the process group led by the command's shell, unless disarmed (after the shell was
/// reaped normally, its id may be reused, so the group is left alone then).
struct GroupKiller(Option<i32>);

impl GroupKiller {
    fn kill(&mut self) {
        if let Some(pgid) = self.0 {
            if pgid > 1 {
                // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names the
                // process group we created with process_group(0), whose leader is not yet reaped.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
        }
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKiller {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::cfg;
    use super::super::{probe, CheckKind};
    use super::*;
    use std::path::PathBuf;
    use std::time::Instant;

    fn exec(command: &str) -> CheckConfig {
        let mut c = cfg(CheckKind::Exec);
        c.command = Some(command.to_string());
        c
    }

    fn real() -> SocketAddr {
        "127.0.0.2:80".parse().unwrap()
    }

    fn tmp(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        std::env::temp_dir().join(format!("xdpvs-exec-{tag}-{}-{nanos}", std::process::id()))
    }

    /// Gone, or a zombie waiting for a reaper that is not us.
    fn gone(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
                .unwrap_or(false),
        }
    }

    #[tokio::test]
    async fn exit_codes() {
        assert_eq!(probe(&exec("exit 0"), real()).await, Ok(()));
        assert_eq!(
            probe(&exec("exit 3"), real()).await.unwrap_err().as_str(),
            "exit status 3"
        );
        assert_eq!(
            probe(&exec("kill -9 $$"), real())
                .await
                .unwrap_err()
                .as_str(),
            "killed by signal 9"
        );
    }

    #[tokio::test]
    async fn no_command() {
        let mut c = exec("");
        assert!(probe(&c, real()).await.is_err());
        c.command = None;
        assert!(probe(&c, real()).await.is_err());
    }

    #[tokio::test]
    async fn environment() {
        let mut c = exec(
            r#"test "$XDPVS_REAL_IP" = 127.0.0.2 && test "$XDPVS_REAL_PORT" = 8080 && test "$XDPVS_CHECK_TIMEOUT_MS" = 500"#,
        );
        c.port = Some(8080);
        assert_eq!(probe(&c, real()).await, Ok(()));
        c.port = None;
        assert_eq!(
            probe(&c, real()).await.unwrap_err().as_str(),
            "exit status 1"
        );
    }

    /// Nothing of the daemon's environment reaches the command, and stdin is at EOF at once.
    #[tokio::test]
    async fn clean_environment_and_no_stdin() {
        let f = tmp("env");
        let c = exec(&format!(
            "if read -r line; then exit 9; fi; env > {}",
            f.display()
        ));
        assert_eq!(probe(&c, real()).await, Ok(()));
        let env = std::fs::read_to_string(&f).unwrap();
        let _ = std::fs::remove_file(&f);
        let names: Vec<&str> = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|p| p.0)
            .collect();
        // Set by the shell itself.
        let shell = ["PWD", "SHLVL", "_", "OLDPWD"];
        for n in &names {
            assert!(
                n.starts_with("XDPVS_") || *n == "PATH" || shell.contains(n),
                "leaked variable {n}: {env}"
            );
        }
        assert!(
            env.lines().any(|l| l == format!("PATH={EXEC_PATH}")),
            "{env}"
        );
        // The test process has variables of its own (cargo sets many): none came through.
        assert!(std::env::vars().count() > names.len(), "{env}");
    }

    #[tokio::test]
    async fn hanging_command_and_children_are_killed() {
        let f1 = tmp("sh");
        let f2 = tmp("child");
        let mut c = exec(&format!(
            "echo $$ > {}; sleep 30 & echo $! > {}; wait",
            f1.display(),
            f2.display()
        ));
        c.timeout = Duration::from_millis(500);
        let t = Instant::now();
        let r = probe(&c, real()).await;
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(r.unwrap_err().as_str(), "killed after timeout 500ms");
        let sh: i32 = std::fs::read_to_string(&f1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let child: i32 = std::fs::read_to_string(&f2)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let _ = std::fs::remove_file(&f1);
        let _ = std::fs::remove_file(&f2);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !(gone(sh) && gone(child)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(sh), "shell {sh} still running");
        assert!(gone(child), "child {child} still running");
    }

    #[tokio::test]
    async fn plain_sleep_is_killed_in_time() {
        let mut c = exec("sleep 30");
        c.timeout = Duration::from_millis(300);
        let t = Instant::now();
        let r = probe(&c, real()).await;
        assert!(t.elapsed() < Duration::from_millis(1300));
        assert_eq!(r.unwrap_err().as_str(), "killed after timeout 300ms");
    }

    #[tokio::test]
    async fn abandoned_probe_kills_the_group() {
        let f = tmp("abandon");
        let c = exec(&format!("sleep 30 & echo $! > {}; wait", f.display()));
        let fut = probe(&c, real());
        // Abandon it well before its own timeout.
        let _ = tokio::time::timeout(Duration::from_millis(200), fut).await;
        let child: i32 = std::fs::read_to_string(&f).unwrap().trim().parse().unwrap();
        let _ = std::fs::remove_file(&f);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !gone(child) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone(child), "child {child} still running");
    }
}
