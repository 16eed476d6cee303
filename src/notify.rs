//! The service manager's view of the daemon: sd_notify(3) messages for the systemd unit
//! (`Type=notify`, `packaging/xdpvs.service`), through the `sd-notify` crate.
//!
//! `READY=1` once the dataplane is attached and holds the configuration (so `systemctl start`
//! returns when the VIPs serve); `RELOADING=1` with `MONOTONIC_USEC` when a reload starts and
//! `READY=1` when it ends, accepted or rejected (systemd.service(5)); `STOPPING=1` at shutdown;
//! `STATUS=` lines for `systemctl status`. Without `NOTIFY_SOCKET` (not under systemd) nothing
//! is sent. A message that cannot be sent is logged and otherwise ignored: the service manager's
//! view is never a reason to stop forwarding.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use sd_notify::NotifyState;
use tracing::{info, warn};

/// Sends the daemon's state to the service manager, if there is one.
pub struct Notifier {
    /// `NOTIFY_SOCKET` was set at start.
    enabled: bool,
    /// The last `STATUS=` sent, so an unchanged status is not sent again.
    last_status: Mutex<String>,
    /// The last send failed (logged once until one succeeds again).
    failing: AtomicBool,
}

impl Notifier {
    /// Enabled when the environment names a notification socket (systemd sets `NOTIFY_SOCKET`
    /// for `Type=notify` units). Health-check commands get a clean environment, so they never
    /// inherit it.
    pub fn from_env() -> Notifier {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty()),
            last_status: Mutex::new(String::new()),
            failing: AtomicBool::new(false),
        }
    }

    /// Whether anything is sent at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `READY=1`: started, or a reload is over (whatever its outcome).
    pub fn ready(&self, status: &str) {
        self.send_with_status(NotifyState::Ready, status);
    }

    /// `RELOADING=1` and `MONOTONIC_USEC=` (which systemd.service(5) asks for with it).
    pub fn reloading(&self, status: &str) {
        if !self.enabled {
            return;
        }
        let status = one_line(status);
        let mut states = vec![NotifyState::Reloading];
        match NotifyState::monotonic_usec_now() {
            Ok(now) => states.push(now),
            Err(e) => warn!(error = %e, "reading CLOCK_MONOTONIC for MONOTONIC_USEC failed"),
        }
        states.push(NotifyState::Status(&status));
        self.send(&states, &status);
    }

    /// `STOPPING=1`: shutting down.
    pub fn stopping(&self, status: &str) {
        self.send_with_status(NotifyState::Stopping, status);
    }

    /// `STATUS=`: what `systemctl status` shows; sent only when it changed.
    pub fn status(&self, status: &str) {
        if !self.enabled {
            return;
        }
        let status = one_line(status);
        if *lock(&self.last_status) == status {
            return;
        }
        self.send(&[NotifyState::Status(&status)], &status);
    }

    fn send_with_status(&self, state: NotifyState, status: &str) {
        if !self.enabled {
            return;
        }
        let status = one_line(status);
        self.send(&[state, NotifyState::Status(&status)], &status);
    }

    fn send(&self, states: &[NotifyState], status: &str) {
        match sd_notify::notify(states) {
            Ok(()) => {
                *lock(&self.last_status) = status.to_string();
                if self.failing.swap(false, Ordering::SeqCst) {
                    info!("sd_notify works again");
                }
            }
            Err(e) => {
                if !self.failing.swap(true, Ordering::SeqCst) {
                    warn!(
                        error = %e,
                        "sd_notify failed: the service manager may not see the daemon's state \
                         (forwarding is not affected; logged once until it works again)"
                    );
                }
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A `STATUS=` value is one line of the message: newlines would start other assignments.
fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_one_line() {
        assert_eq!(
            one_line("a.toml:3:1: bad\n  interface = 1\n\n"),
            "a.toml:3:1: bad; interface = 1"
        );
    }
}
