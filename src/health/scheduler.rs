//! Runs the checks: one tokio task per (service, real), each probing every `interval`.
//!
//! Each task owns its real's [`HealthState`]; results go through the state machine and out as a
//! [`HealthEvent`] on a channel, so the caller (which owns the dataplane and the metrics) decides
//! what a transition does. Probes of one real never overlap (the next starts only after the
//! previous finished), and the first probes are spread over the interval so a thousand reals do
//! not get checked in the same millisecond. On reload, [`HealthChecker::update`] keeps the tasks
//! and states of unchanged targets, so a reload does not reset or flap anything.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing::debug;

use super::{probe, CheckConfig, CheckKind, FailureKind, HealthState, Initially, Transition};

/// Shortest interval a task runs at (a zero interval would spin).
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// One real of one service, with its fully-specified check.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub service: String,
    pub real: SocketAddr,
    pub check: CheckConfig,
}

/// The outcome of one probe, sent after every probe (not only on transitions).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthEvent {
    pub service: String,
    pub real: SocketAddr,
    /// The real's state after this result (authoritative: applying it is idempotent).
    pub up: bool,
    /// Set when this result flipped the state.
    pub transition: Option<Transition>,
    /// The failure reason if this probe failed (free text: logs and `list`).
    pub reason: Option<String>,
    /// Its kind, if this probe failed (a closed set: the metrics label).
    pub cause: Option<FailureKind>,
    /// How long the probe took.
    pub duration: Duration,
    pub kind: CheckKind,
}

struct Running {
    check: CheckConfig,
    state: Arc<Mutex<HealthState>>,
    task: JoinHandle<()>,
}

/// The set of running checks. Dropping it (or [`shutdown`](Self::shutdown)) stops every task.
///
/// Must be used from within a tokio runtime (it spawns tasks).
pub struct HealthChecker {
    events: UnboundedSender<HealthEvent>,
    tasks: HashMap<(String, SocketAddr), Running>,
}

impl HealthChecker {
    /// No checks yet; events of later ones go to `events`.
    pub fn new(events: UnboundedSender<HealthEvent>) -> Self {
        HealthChecker {
            events,
            tasks: HashMap::new(),
        }
    }

    /// Starts checks for the daemon's initial configuration: each real starts as its check's
    /// `initially` says.
    pub fn start(targets: Vec<Target>, events: UnboundedSender<HealthEvent>) -> Self {
        let mut checker = HealthChecker::new(events);
        checker.apply(targets, false);
        checker
    }

    /// Starts checks for a daemon that adopted a running dataplane: a real whose state the
    /// dataplane shows (`known`: up = taking new connections) starts in that state, so the
    /// handover neither adds nor removes a real before its checks say so; the others start as
    /// `initially` says. `none` and `off` checks start in their fixed state.
    pub fn start_adopted(
        targets: Vec<Target>,
        events: UnboundedSender<HealthEvent>,
        known: &HashMap<(String, SocketAddr), bool>,
    ) -> Self {
        let mut checker = HealthChecker::new(events);
        checker.apply_with(targets, |t| {
            match (t.check.kind, known.get(&(t.service.clone(), t.real))) {
                (CheckKind::None | CheckKind::Off, _) | (_, None) => initial_state(&t.check, false),
                (_, Some(true)) => HealthState::new(Initially::Up),
                (_, Some(false)) => HealthState::new(Initially::Down),
            }
        });
        checker
    }

    /// Replaces the set of targets on reload; reals new to the set start down (they must pass
    /// `rise` checks before taking traffic) regardless of `initially`. Same as
    /// `apply(targets, true)`.
    pub fn update(&mut self, targets: Vec<Target>) {
        self.apply(targets, true);
    }

    /// Replaces the set of targets, keyed by (service, real):
    ///
    /// * same key and same check: the task and its state are kept untouched;
    /// * same key, changed check: the task restarts with the new check, keeping the real's up/down
    ///   state (counters reset), so changing e.g. the interval does not flap the real;
    /// * new key: a task starts; the real starts down if `added_start_down`, else as the check's
    ///   `initially` says. Except `none` (always up) and `off` (always down) start in their state;
    /// * keys no longer present: the task stops.
    ///
    /// Duplicate keys: the first occurrence wins. The caller reads the starting states with
    /// [`is_up`](Self::is_up)/[`states`](Self::states) after this returns.
    pub fn apply(&mut self, targets: Vec<Target>, added_start_down: bool) {
        self.apply_with(targets, |t| initial_state(&t.check, added_start_down));
    }

    /// [`apply`](Self::apply) with the starting state of new targets given by `initial`.
    fn apply_with(&mut self, targets: Vec<Target>, initial: impl Fn(&Target) -> HealthState) {
        let mut seen = HashSet::new();
        let targets: Vec<Target> = targets
            .into_iter()
            .filter(|t| seen.insert((t.service.clone(), t.real)))
            .collect();
        let n = targets.len();
        let mut next = HashMap::with_capacity(n);
        for (i, t) in targets.into_iter().enumerate() {
            let key = (t.service.clone(), t.real);
            let state = match self.tasks.remove(&key) {
                Some(run) if run.check == t.check && !run.task.is_finished() => {
                    next.insert(key, run);
                    continue;
                }
                Some(run) => {
                    run.task.abort();
                    restarted(&lock(&run.state))
                }
                None => initial(&t),
            };
            let offset = spread(i, n, t.check.interval);
            let state = Arc::new(Mutex::new(state));
            let task = tokio::spawn(run(t.clone(), state.clone(), offset, self.events.clone()));
            next.insert(
                key,
                Running {
                    check: t.check,
                    state,
                    task,
                },
            );
        }
        for (_, run) in self.tasks.drain() {
            run.task.abort();
        }
        self.tasks = next;
    }

    /// A snapshot of one real's state.
    pub fn state(&self, service: &str, real: SocketAddr) -> Option<HealthState> {
        self.tasks
            .get(&(service.to_string(), real))
            .map(|r| lock(&r.state).clone())
    }

    /// Whether a real is up, `None` if it is not checked.
    pub fn is_up(&self, service: &str, real: SocketAddr) -> Option<bool> {
        self.tasks
            .get(&(service.to_string(), real))
            .map(|r| lock(&r.state).up)
    }

    /// The states [`update`](Self::update) with `targets` would start from, without changing
    /// anything: a reload computes its effective state from this and commits the checks only
    /// once the dataplane has accepted it (a rejected reload must leave every check running).
    /// A target already checked keeps its up/down state and last failure (whether or not its
    /// check changed); a new one starts down (`none`: up). Duplicate keys: the first wins.
    pub fn preview(&self, targets: &[Target]) -> Vec<(String, SocketAddr, HealthState)> {
        let mut seen = HashSet::new();
        targets
            .iter()
            .filter(|t| seen.insert((t.service.clone(), t.real)))
            .map(|t| {
                let state = match self.tasks.get(&(t.service.clone(), t.real)) {
                    Some(run) => {
                        let cur = lock(&run.state);
                        if run.check == t.check && !run.task.is_finished() {
                            cur.clone()
                        } else {
                            restarted(&cur)
                        }
                    }
                    None => initial_state(&t.check, true),
                };
                (t.service.clone(), t.real, state)
            })
            .collect()
    }

    /// Snapshots of every real's state, sorted by service then real (for `list`).
    pub fn states(&self) -> Vec<(String, SocketAddr, HealthState)> {
        let mut v: Vec<_> = self
            .tasks
            .iter()
            .map(|((s, r), run)| (s.clone(), *r, lock(&run.state).clone()))
            .collect();
        v.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        v
    }

    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Stops every task (a running probe is dropped; an `exec` probe's processes are killed).
    pub fn shutdown(&mut self) {
        for (_, run) in self.tasks.drain() {
            run.task.abort();
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock(m: &Mutex<HealthState>) -> MutexGuard<'_, HealthState> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn initial_state(check: &CheckConfig, start_down: bool) -> HealthState {
    let up = match check.kind {
        CheckKind::None => true,
        CheckKind::Off => false,
        _ => !start_down && check.initially == Initially::Up,
    };
    HealthState::new(if up { Initially::Up } else { Initially::Down })
}

/// The state a check restarted with a changed configuration starts from: the real's up/down
/// state and last failure carry over, the counters start again.
fn restarted(cur: &HealthState) -> HealthState {
    let mut s = HealthState::new(if cur.up {
        Initially::Up
    } else {
        Initially::Down
    });
    s.last_failure = cur.last_failure.clone();
    s
}

/// The first probe of target `i` of `n` waits `interval * i / n`: evenly spread, deterministic.
fn spread(i: usize, n: usize, interval: Duration) -> Duration {
    if n == 0 {
        return Duration::ZERO;
    }
    let nanos = interval.as_nanos().saturating_mul(i as u128) / n as u128;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// One target's loop: probe, observe, report, wait for the next tick.
async fn run(
    t: Target,
    state: Arc<Mutex<HealthState>>,
    offset: Duration,
    events: UnboundedSender<HealthEvent>,
) {
    tokio::time::sleep(offset).await;
    let mut ticker = tokio::time::interval(t.check.interval.max(MIN_INTERVAL));
    // A probe longer than the interval delays the next one instead of bunching them up.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let started = Instant::now();
        let result = probe(&t.check, t.real).await;
        let duration = started.elapsed();
        let reason = result.as_ref().err().map(|f| f.to_string());
        let cause = result.as_ref().err().map(|f| f.kind());
        let (up, transition) = {
            let mut s = lock(&state);
            let tr = s.observe(result, t.check.rise, t.check.fall);
            (s.up, tr)
        };
        match &transition {
            // The daemon logs transitions (as it applies them); here only at debug level.
            Some(tr @ Transition::Up { .. }) => debug!(
                service = %t.service,
                real = %t.real,
                check = ?t.check.kind,
                "real is up: {tr}"
            ),
            Some(tr @ Transition::Down { reason, .. }) => debug!(
                service = %t.service,
                real = %t.real,
                check = ?t.check.kind,
                reason = %reason,
                "real is down: {tr}"
            ),
            None => {}
        }
        let event = HealthEvent {
            service: t.service.clone(),
            real: t.real,
            up,
            transition,
            reason,
            cause,
            duration,
            kind: t.check.kind,
        };
        if events.send(event).is_err() {
            // Nobody listens any more: the daemon is going away.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::cfg;
    use super::*;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    async fn refused_addr() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        a
    }

    fn target(service: &str, real: SocketAddr, check: CheckConfig) -> Target {
        Target {
            service: service.into(),
            real,
            check,
        }
    }

    /// Events received until `dur` elapses.
    async fn collect(rx: &mut UnboundedReceiver<HealthEvent>, dur: Duration) -> Vec<HealthEvent> {
        let mut v = Vec::new();
        let deadline = tokio::time::Instant::now() + dur;
        while let Ok(Some(e)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            v.push(e);
        }
        v
    }

    #[tokio::test]
    async fn one_up_one_down() {
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let bad_addr = refused_addr().await;
        let mut check = cfg(CheckKind::Tcp);
        check.rise = 2;
        check.fall = 2;
        let (tx, mut rx) = unbounded_channel();
        let checker = HealthChecker::start(
            vec![
                target("web", good_addr, check.clone()),
                target("web", bad_addr, check.clone()),
            ],
            tx,
        );
        assert_eq!(checker.len(), 2);
        assert_eq!(checker.is_up("web", good_addr), Some(true));
        assert_eq!(checker.is_up("web", bad_addr), Some(true));
        let events = collect(&mut rx, Duration::from_millis(400)).await;
        let good_ev: Vec<_> = events.iter().filter(|e| e.real == good_addr).collect();
        let bad_ev: Vec<_> = events.iter().filter(|e| e.real == bad_addr).collect();
        assert!(good_ev.len() >= 3, "{events:?}");
        assert!(good_ev
            .iter()
            .all(|e| e.up && e.reason.is_none() && e.transition.is_none()));
        assert!(bad_ev.len() >= 3, "{events:?}");
        assert!(bad_ev[0].up, "fall=2: still up after one failure");
        assert_eq!(bad_ev[0].reason.as_deref(), Some("connection refused"));
        assert_eq!(
            bad_ev[1].transition,
            Some(Transition::Down {
                failures: 2,
                reason: "connection refused".into()
            })
        );
        assert!(bad_ev[1..].iter().all(|e| !e.up));
        assert!(bad_ev
            .iter()
            .all(|e| e.kind == CheckKind::Tcp && e.service == "web"));
        assert_eq!(checker.is_up("web", bad_addr), Some(false));
        let st = checker.state("web", bad_addr).unwrap();
        assert_eq!(st.last_failure.as_deref(), Some("connection refused"));
        assert_eq!(checker.states().len(), 2);
    }

    #[tokio::test]
    async fn initially_down_rises() {
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = good.local_addr().unwrap();
        let mut check = cfg(CheckKind::Tcp);
        check.rise = 3;
        check.initially = Initially::Down;
        let (tx, mut rx) = unbounded_channel();
        let checker = HealthChecker::start(vec![target("s", addr, check)], tx);
        assert_eq!(checker.is_up("s", addr), Some(false));
        let ev = collect(&mut rx, Duration::from_millis(300)).await;
        assert!(!ev[0].up && !ev[1].up);
        assert_eq!(ev[2].transition, Some(Transition::Up { successes: 3 }));
        assert!(ev[2].up);
    }

    #[tokio::test]
    async fn update_keeps_unchanged_and_starts_new_ones_down() {
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = good.local_addr().unwrap();
        let b = refused_addr().await;
        let c: SocketAddr = SocketAddr::new(a.ip(), a.port()); // same real, other service
        let check = cfg(CheckKind::Tcp);
        let (tx, mut rx) = unbounded_channel();
        let mut checker = HealthChecker::start(
            vec![target("s", a, check.clone()), target("s", b, check.clone())],
            tx,
        );
        let _ = collect(&mut rx, Duration::from_millis(200)).await;
        let before = checker.state("s", a).unwrap();
        assert!(before.up && before.checks >= 2);
        let state_ptr = Arc::as_ptr(&checker.tasks[&("s".to_string(), a)].state);

        // Keep a, drop b, add c (initially Up, but added by a reload: starts down).
        checker.update(vec![
            target("s", a, check.clone()),
            target("t", c, check.clone()),
        ]);
        assert_eq!(checker.len(), 2);
        assert_eq!(checker.is_up("t", c), Some(false));
        assert_eq!(checker.is_up("s", b), None);
        let kept = checker.state("s", a).unwrap();
        assert!(kept.up);
        assert!(kept.checks >= before.checks);
        assert_eq!(
            Arc::as_ptr(&checker.tasks[&("s".to_string(), a)].state),
            state_ptr
        );

        let ev = collect(&mut rx, Duration::from_millis(300)).await;
        // Events from b may still be in flight right at the update; none after a grace period.
        let late = collect(&mut rx, Duration::from_millis(200)).await;
        assert!(
            late.iter().all(|e| e.real != b || e.service != "s"),
            "{late:?}"
        );
        assert!(checker.state("s", a).unwrap().checks > kept.checks);
        // rise=1 in the test config: c came up through a transition.
        assert!(ev
            .iter()
            .any(|e| e.service == "t" && e.transition == Some(Transition::Up { successes: 1 })));
    }

    #[tokio::test]
    async fn changed_check_restarts_but_keeps_up_down() {
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = good.local_addr().unwrap();
        let (tx, mut rx) = unbounded_channel();
        let mut checker = HealthChecker::start(vec![target("s", a, cfg(CheckKind::Tcp))], tx);
        let _ = collect(&mut rx, Duration::from_millis(120)).await;
        let ptr = Arc::as_ptr(&checker.tasks[&("s".to_string(), a)].state);
        let mut changed = cfg(CheckKind::Tcp);
        changed.interval = Duration::from_millis(60);
        checker.update(vec![target("s", a, changed)]);
        assert_ne!(
            Arc::as_ptr(&checker.tasks[&("s".to_string(), a)].state),
            ptr
        );
        let st = checker.state("s", a).unwrap();
        assert!(st.up);
        assert_eq!(st.checks, 0);
    }

    #[tokio::test]
    async fn preview_matches_update_and_changes_nothing() {
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = good.local_addr().unwrap();
        let b = refused_addr().await;
        let check = cfg(CheckKind::Tcp);
        let (tx, mut rx) = unbounded_channel();
        let mut checker = HealthChecker::start(
            vec![target("s", a, check.clone()), target("s", b, check.clone())],
            tx,
        );
        let _ = collect(&mut rx, Duration::from_millis(200)).await;
        assert_eq!(checker.is_up("s", b), Some(false));
        let mut changed = check.clone();
        changed.interval = Duration::from_millis(70);
        let next = vec![
            target("s", a, check.clone()),
            target("s", b, changed),
            target("t", a, check.clone()),
            target("u", a, cfg(CheckKind::None)),
        ];
        let preview = checker.preview(&next);
        // Nothing changed: same tasks, b still checked, no t/u.
        assert_eq!(checker.len(), 2);
        assert_eq!(checker.is_up("t", a), None);
        let ups: Vec<(&str, bool)> = preview
            .iter()
            .map(|(s, _, st)| (s.as_str(), st.up))
            .collect();
        assert_eq!(
            ups,
            vec![("s", true), ("s", false), ("t", false), ("u", true)]
        );
        assert_eq!(
            preview[1].2.last_failure.as_deref(),
            Some("connection refused")
        );
        checker.update(next);
        let after: Vec<(String, SocketAddr, bool)> = checker
            .states()
            .into_iter()
            .map(|(s, r, st)| (s, r, st.up))
            .collect();
        let mut want: Vec<(String, SocketAddr, bool)> = preview
            .into_iter()
            .map(|(s, r, st)| (s, r, st.up))
            .collect();
        want.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
        assert_eq!(after, want);
        assert_eq!(
            checker.state("s", b).unwrap().last_failure.as_deref(),
            Some("connection refused"),
            "a restarted check keeps the last failure"
        );
    }

    #[tokio::test]
    async fn none_and_off_start_in_their_state() {
        let a: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut off = cfg(CheckKind::Off);
        off.fall = 5;
        let (tx, _rx) = unbounded_channel();
        let mut checker = HealthChecker::start(
            vec![target("on", a, cfg(CheckKind::None)), target("off", a, off)],
            tx,
        );
        assert_eq!(checker.is_up("on", a), Some(true));
        assert_eq!(checker.is_up("off", a), Some(false));
        checker.update(vec![target("on2", a, cfg(CheckKind::None))]);
        assert_eq!(checker.is_up("on2", a), Some(true));
    }

    #[tokio::test]
    async fn probes_of_one_real_never_overlap() {
        let lock = std::env::temp_dir().join(format!(
            "xdpvs-overlap-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        let mut check = cfg(CheckKind::Exec);
        check.interval = Duration::from_millis(20);
        check.timeout = Duration::from_secs(2);
        check.command = Some(format!(
            "mkdir '{0}' || exit 9; sleep 0.1; rmdir '{0}'",
            lock.display()
        ));
        let (tx, mut rx) = unbounded_channel();
        let checker =
            HealthChecker::start(vec![target("s", "127.0.0.1:1".parse().unwrap(), check)], tx);
        let ev = collect(&mut rx, Duration::from_millis(600)).await;
        drop(checker);
        let _ = std::fs::remove_dir(&lock);
        assert!(ev.len() >= 2 && ev.len() <= 6, "{}", ev.len());
        assert!(ev.iter().all(|e| e.reason.is_none()), "{ev:?}");
        assert!(ev.iter().all(|e| e.duration >= Duration::from_millis(100)));
    }

    #[tokio::test]
    async fn drop_stops_everything() {
        let (tx, mut rx) = unbounded_channel();
        let checker = HealthChecker::start(
            vec![target(
                "s",
                "127.0.0.1:9".parse().unwrap(),
                cfg(CheckKind::None),
            )],
            tx,
        );
        let _ = collect(&mut rx, Duration::from_millis(100)).await;
        drop(checker);
        // Every sender is gone once the aborted tasks are dropped: the channel closes.
        let end = tokio::time::timeout(Duration::from_secs(1), async {
            while rx.recv().await.is_some() {}
        })
        .await;
        assert!(end.is_ok());
    }

    #[test]
    fn spread_is_even() {
        let i = Duration::from_millis(100);
        assert_eq!(spread(0, 4, i), Duration::ZERO);
        assert_eq!(spread(1, 4, i), Duration::from_millis(25));
        assert_eq!(spread(3, 4, i), Duration::from_millis(75));
        assert_eq!(spread(0, 0, i), Duration::ZERO);
    }
}
