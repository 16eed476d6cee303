//! Flapping reals: bounds what a real that keeps changing state costs.
//!
//! Rise/fall already absorb single bad probes; a real that passes and fails in turn for longer
//! than that (a server that crashes and restarts every few hundred milliseconds) would still
//! make a map write and a log line per transition. So, per real:
//! - **map writes**: after [`FLAP_CHANGES`] transitions within [`FLAP_WINDOW`] the real is
//!   flapping, and its return to up is held until it has stayed up for [`HOLD`]; going down
//!   always takes effect at once (never send new connections to a real that just failed);
//! - **log lines**: while it is flapping, at most one "real is up/down" line per [`LOG_EVERY`];
//!   the transitions in between are counted, and the next line (or a summary line once the
//!   period is over) says how many were not logged and where the real stands. A real that is
//!   not flapping has every transition logged.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::state::RealId;

/// Transitions within [`FLAP_WINDOW`] that make a real flapping.
pub const FLAP_CHANGES: usize = 4;
pub const FLAP_WINDOW: Duration = Duration::from_secs(30);
/// How long a flapping real must stay up before it takes new connections again.
pub const HOLD: Duration = Duration::from_secs(10);
/// At most one transition log line per real this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Track {
    changes: VecDeque<Instant>,
    last_log: Option<Instant>,
    /// Transitions not logged since the last line.
    suppressed: u32,
    /// Up (as checked) since then, but held down.
    held_since: Option<Instant>,
}

/// What to do with one transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Write the new state to the runtime (and the maps); `false` while a flapping real's
    /// return to up is held.
    pub apply: bool,
    /// Log the transition line; `Some(n)`: and `n` earlier ones were not logged.
    pub log: Option<u32>,
    /// The real is flapping now.
    pub flapping: bool,
}

/// A summary of suppressed lines or the end of a hold, found by [`Flaps::tick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// The held real has stayed up for [`HOLD`]: it goes up now.
    Release(RealId),
    /// `n` transitions of the real were not logged; it is now up (`true`) or down.
    Summary(RealId, u32, bool),
}

#[derive(Debug, Default)]
pub struct Flaps {
    reals: HashMap<RealId, Track>,
}

impl Flaps {
    /// A checked transition of `id` to `up` at `now`.
    pub fn transition(&mut self, id: &RealId, up: bool, now: Instant) -> Verdict {
        let t = self.reals.entry(id.clone()).or_default();
        t.changes.push_back(now);
        while t
            .changes
            .front()
            .is_some_and(|c| now.duration_since(*c) > FLAP_WINDOW)
        {
            t.changes.pop_front();
        }
        let flapping = t.changes.len() >= FLAP_CHANGES;
        let quiet = t
            .last_log
            .is_none_or(|l| now.duration_since(l) >= LOG_EVERY);
        let log = if !flapping || quiet {
            t.last_log = Some(now);
            Some(std::mem::take(&mut t.suppressed))
        } else {
            t.suppressed += 1;
            None
        };
        let apply = if up && flapping {
            t.held_since = Some(now);
            false
        } else {
            t.held_since = None;
            true
        };
        Verdict {
            apply,
            log,
            flapping,
        }
    }

    /// Is `id`'s return to up being held?
    pub fn held(&self, id: &RealId) -> bool {
        self.reals.get(id).is_some_and(|t| t.held_since.is_some())
    }

    /// Holds that ended and summaries that are due; `up` says how a real stands now.
    pub fn tick(&mut self, now: Instant, up: impl Fn(&RealId) -> bool) -> Vec<Due> {
        let mut due = Vec::new();
        for (id, t) in &mut self.reals {
            if t.held_since.is_some_and(|h| now.duration_since(h) >= HOLD) {
                t.held_since = None;
                due.push(Due::Release(id.clone()));
            }
            if t.suppressed > 0
                && t.last_log
                    .is_none_or(|l| now.duration_since(l) >= LOG_EVERY)
            {
                t.last_log = Some(now);
                due.push(Due::Summary(
                    id.clone(),
                    std::mem::take(&mut t.suppressed),
                    up(id),
                ));
            }
        }
        // Quiet reals are forgotten.
        self.reals.retain(|_, t| {
            t.held_since.is_some()
                || t.suppressed > 0
                || t.changes
                    .back()
                    .is_some_and(|c| now.duration_since(*c) <= FLAP_WINDOW.max(LOG_EVERY))
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> RealId {
        ("web".into(), "10.0.0.1:80".parse().unwrap())
    }

    #[test]
    fn a_real_flapping_every_300ms_is_held_down_and_logged_once_per_period() {
        let mut f = Flaps::default();
        let t0 = Instant::now();
        let (mut applied, mut logged, mut summarized) = (0, 0, 0);
        // 20 s of a transition every 300 ms, ticks every second.
        let mut up = false;
        for i in 0..67u32 {
            let now = t0 + Duration::from_millis(300 * u64::from(i));
            up = !up;
            let v = f.transition(&id(), up, now);
            applied += usize::from(v.apply);
            if let Some(n) = v.log {
                logged += 1;
                summarized += n;
            }
            if i % 3 == 0 {
                for d in f.tick(now, |_| up) {
                    match d {
                        Due::Summary(_, n, _) => summarized += n,
                        Due::Release(_) => panic!("released while flapping"),
                    }
                }
            }
        }
        // Downs apply, ups only before it was found flapping (the first two).
        assert!(applied <= 67 / 2 + 3, "applied {applied}");
        let ups_applied = applied - 67usize.div_ceil(2);
        assert!(ups_applied <= 2, "{ups_applied} ups applied");
        // The first FLAP_CHANGES - 1 transitions, then one line per LOG_EVERY.
        assert!(logged <= 5, "{logged} lines in 20 s");
        // Every transition is either logged or counted in a later line.
        let pending: u32 = f
            .tick(t0 + Duration::from_secs(40), |_| false)
            .iter()
            .map(|d| match d {
                Due::Summary(_, n, _) => *n,
                Due::Release(_) => 0,
            })
            .sum();
        assert_eq!(logged as u32 + summarized + pending, 67);
        let mut f2 = Flaps::default();
        for i in 0..67u32 {
            f2.transition(
                &id(),
                i % 2 == 0,
                t0 + Duration::from_millis(300 * u64::from(i)),
            );
        }
        let f = &mut f2;
        // Stable up for HOLD: released once.
        let v = f.transition(&id(), true, t0 + Duration::from_secs(21));
        assert!(!v.apply);
        let due = f.tick(t0 + Duration::from_secs(32), |_| true);
        assert!(due.contains(&Due::Release(id())), "{due:?}");
        assert!(!f.held(&id()));
    }

    #[test]
    fn a_real_that_changes_rarely_is_never_held() {
        let mut f = Flaps::default();
        let t0 = Instant::now();
        for i in 0..10u64 {
            let v = f.transition(&id(), i % 2 == 0, t0 + Duration::from_secs(20 * i));
            assert!(v.apply && v.log == Some(0) && !v.flapping, "{i}: {v:?}");
        }
    }
}
