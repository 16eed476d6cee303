//! The rise/fall state machine: turns a stream of probe results into up/down.
//!
//! One result is weak evidence (a dropped SYN, a GC pause), so a real changes state only after
//! `fall` consecutive failures (up -> down) or `rise` consecutive successes (down -> up), like
//! keepalived's `retry`/`alpha` and HAProxy's `rise`/`fall`. Kept apart from the checkers so the
//! logic exists once and is tested once.

use std::fmt;

use super::Failure;
use crate::config::Initially;

/// A real's health as seen by its checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    /// Whether the real counts as up (receives new connections).
    pub up: bool,
    /// Consecutive successful probes (0 after any failure).
    pub successes: u32,
    /// Consecutive failed probes (0 after any success).
    pub failures: u32,
    /// Reason of the most recent failed probe, kept after later successes (for `list`).
    pub last_failure: Option<String>,
    /// Probes observed in total.
    pub checks: u64,
}

/// A change of state, returned by [`HealthState::observe`] when the real flips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// Down -> up after `successes` consecutive successes.
    Up { successes: u32 },
    /// Up -> down after `failures` consecutive failures; `reason` is the last one's.
    Down { failures: u32, reason: String },
}

impl Transition {
    /// The state after the transition.
    pub fn is_up(&self) -> bool {
        matches!(self, Transition::Up { .. })
    }
}

impl fmt::Display for Transition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transition::Up { successes } => {
                write!(f, "down -> up after {successes} successful checks")
            }
            Transition::Down { failures, reason } => {
                write!(f, "up -> down after {failures} failed checks: {reason}")
            }
        }
    }
}

impl HealthState {
    /// The state before any result: up for [`Initially::Up`]; down, waiting for `rise`
    /// successes, for [`Initially::Down`].
    pub fn new(initially: Initially) -> Self {
        HealthState {
            up: initially == Initially::Up,
            successes: 0,
            failures: 0,
            last_failure: None,
            checks: 0,
        }
    }

    /// Feeds one probe result. Returns the transition if the real flipped. A `rise` or `fall` of
    /// 0 counts as 1.
    pub fn observe(
        &mut self,
        result: Result<(), Failure>,
        rise: u32,
        fall: u32,
    ) -> Option<Transition> {
        self.checks = self.checks.saturating_add(1);
        match result {
            Ok(()) => {
                self.successes = self.successes.saturating_add(1);
                self.failures = 0;
                if !self.up && self.successes >= rise.max(1) {
                    self.up = true;
                    return Some(Transition::Up {
                        successes: self.successes,
                    });
                }
            }
            Err(reason) => {
                self.failures = self.failures.saturating_add(1);
                self.successes = 0;
                let reason = reason.into_string();
                self.last_failure = Some(reason.clone());
                if self.up && self.failures >= fall.max(1) {
                    self.up = false;
                    return Some(Transition::Down {
                        failures: self.failures,
                        reason,
                    });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Result<(), Failure> {
        Ok(())
    }
    fn bad(r: &str) -> Result<(), Failure> {
        Err(Failure::new(crate::health::FailureKind::Other, r))
    }

    #[test]
    fn initial_states() {
        let s = HealthState::new(Initially::Up);
        assert!(s.up);
        assert_eq!((s.successes, s.failures, s.checks), (0, 0, 0));
        assert!(s.last_failure.is_none());
        assert!(!HealthState::new(Initially::Down).up);
    }

    #[test]
    fn exactly_fall_failures_take_it_down() {
        let mut s = HealthState::new(Initially::Up);
        assert_eq!(s.observe(bad("a"), 2, 3), None);
        assert_eq!(s.observe(bad("b"), 2, 3), None);
        assert!(s.up);
        assert_eq!(
            s.observe(bad("status 503"), 2, 3),
            Some(Transition::Down {
                failures: 3,
                reason: "status 503".into()
            })
        );
        assert!(!s.up);
        assert_eq!(s.last_failure.as_deref(), Some("status 503"));
        // Further failures do not transition again.
        assert_eq!(s.observe(bad("c"), 2, 3), None);
        assert_eq!(s.failures, 4);
    }

    #[test]
    fn exactly_rise_successes_bring_it_up() {
        let mut s = HealthState::new(Initially::Down);
        assert_eq!(s.observe(ok(), 3, 2), None);
        assert_eq!(s.observe(ok(), 3, 2), None);
        assert!(!s.up);
        assert_eq!(s.observe(ok(), 3, 2), Some(Transition::Up { successes: 3 }));
        assert!(s.up);
        assert_eq!(s.observe(ok(), 3, 2), None);
        assert_eq!(s.checks, 4);
    }

    #[test]
    fn alternating_results_never_flip() {
        for initially in [Initially::Up, Initially::Down] {
            let mut s = HealthState::new(initially);
            let was = s.up;
            for i in 0..100 {
                let r = if i % 2 == 0 { ok() } else { bad("x") };
                assert_eq!(s.observe(r, 2, 2), None);
                assert_eq!(s.up, was);
            }
        }
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let mut s = HealthState::new(Initially::Up);
        s.observe(bad("x"), 2, 3);
        s.observe(bad("x"), 2, 3);
        s.observe(ok(), 2, 3);
        assert_eq!(s.failures, 0);
        s.observe(bad("x"), 2, 3);
        s.observe(bad("x"), 2, 3);
        assert!(s.up);
        assert!(s.observe(bad("x"), 2, 3).is_some());
        // Last failure survives later successes.
        s.observe(ok(), 2, 3);
        assert_eq!(s.last_failure.as_deref(), Some("x"));
    }

    #[test]
    fn flapping_full_cycles() {
        let mut s = HealthState::new(Initially::Up);
        let mut transitions = Vec::new();
        // fall=2, rise=2: down, up, down.
        let seq = [false, false, true, true, false, false];
        for up in seq {
            let r = if up { ok() } else { bad("f") };
            if let Some(t) = s.observe(r, 2, 2) {
                transitions.push(t.is_up());
            }
        }
        assert_eq!(transitions, vec![false, true, false]);
    }

    #[test]
    fn rise_fall_one_and_zero() {
        for n in [0, 1] {
            let mut s = HealthState::new(Initially::Down);
            assert!(s.observe(ok(), n, n).is_some());
            assert!(s.observe(bad("x"), n, n).is_some());
            assert!(s.observe(ok(), n, n).is_some());
        }
    }

    #[test]
    fn initially_up_ignores_successes_and_down_ignores_failures() {
        let mut s = HealthState::new(Initially::Up);
        for _ in 0..5 {
            assert_eq!(s.observe(ok(), 1, 1), None);
        }
        let mut s = HealthState::new(Initially::Down);
        for _ in 0..5 {
            assert_eq!(s.observe(bad("x"), 1, 1), None);
        }
        assert_eq!(s.failures, 5);
    }

    #[test]
    fn display() {
        assert_eq!(
            Transition::Down {
                failures: 3,
                reason: "connection refused".into()
            }
            .to_string(),
            "up -> down after 3 failed checks: connection refused"
        );
        assert_eq!(
            Transition::Up { successes: 2 }.to_string(),
            "down -> up after 2 successful checks"
        );
    }
}
