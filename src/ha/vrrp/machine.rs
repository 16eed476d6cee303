//! The VRRP election (RFC 5798 section 6.4) as a pure state machine.
//!
//! `step(event, now)` changes the state and returns the [`Action`]s the socket side must carry
//! out; nothing here reads a clock, touches a socket or sleeps, so every transition of the RFC's
//! text is a table row in the tests below (Seesaw's `ha/core.go` keeps its election apart from
//! I/O the same way). Timing comes from the RFC's own formulas in [`Timing`].
//!
//! Beyond the RFC: `preempt_delay` (keepalived has it too) holds back preemption of a lower
//! priority master until it has been seen for that long; a master whose priority is lowered at
//! run time (a tracked service failed) advertises at once so a preempting backup need not wait.

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// RFC 5798 6.4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Initialize,
    Backup,
    Master,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initialize => "initialize",
            State::Backup => "backup",
            State::Master => "master",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The two timers of 6.4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Adver,
    MasterDown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Startup,
    Shutdown,
    /// A validated advertisement (see `packet::validate`) from `from`, the sender's primary address.
    Advert {
        from: IpAddr,
        priority: u8,
        max_adver_int_cs: u16,
    },
    /// `now` reached [`Machine::next_deadline`]: whichever timer is due fires.
    Timer,
    /// The running priority changed (tracked services); ignored for the address owner.
    SetPriority(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    SendAdvert {
        priority: u8,
    },
    /// Take the virtual addresses (and, for the daemon, start forwarding for them).
    AddAddresses,
    RemoveAddresses,
    /// Gratuitous ARP (IPv4) or unsolicited NA (IPv6) for every virtual address.
    SendGratuitous,
    Arm {
        timer: Timer,
        at: Instant,
    },
    Cancel(Timer),
}

/// What the machine is configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// 1..=255; 255 is the address owner.
    pub priority: u8,
    /// Advertisement_Interval in centiseconds (1..=4095).
    pub advert_interval_cs: u16,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// This router's primary address on the interface: breaks priority ties (6.4.3).
    pub primary: IpAddr,
}

/// The RFC's timing formulas (6.1), in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub priority: u8,
    pub master_adver_interval_cs: u16,
}

impl Timing {
    /// Skew_Time = ((256 - Priority) * Master_Adver_Interval) / 256.
    pub fn skew(&self) -> Duration {
        let us =
            (256 - u64::from(self.priority)) * u64::from(self.master_adver_interval_cs) * 10_000;
        Duration::from_micros(us / 256)
    }

    /// Master_Down_Interval = 3 * Master_Adver_Interval + Skew_Time.
    pub fn master_down(&self) -> Duration {
        cs(self.master_adver_interval_cs) * 3 + self.skew()
    }
}

fn cs(n: u16) -> Duration {
    Duration::from_millis(u64::from(n) * 10)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    params: Params,
    state: State,
    /// Learned from the master's adverts in Backup (6.4.2); our own interval otherwise.
    master_adver_interval_cs: u16,
    adver_at: Option<Instant>,
    master_down_at: Option<Instant>,
    /// Since when a lower priority master has been tolerated under `preempt_delay`.
    lower_master_since: Option<Instant>,
    /// The current master's address as last seen (ourselves when Master).
    master: Option<IpAddr>,
}

impl Machine {
    pub fn new(params: Params) -> Machine {
        let params = Params {
            advert_interval_cs: params.advert_interval_cs.max(1),
            priority: params.priority.max(1),
            ..params
        };
        Machine {
            master_adver_interval_cs: params.advert_interval_cs,
            params,
            state: State::Initialize,
            adver_at: None,
            master_down_at: None,
            lower_master_since: None,
            master: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn priority(&self) -> u8 {
        self.params.priority
    }

    /// The master as last seen: ourselves in Master, the advertising router in Backup.
    pub fn master(&self) -> Option<IpAddr> {
        self.master
    }

    pub fn master_adver_interval_cs(&self) -> u16 {
        self.master_adver_interval_cs
    }

    pub fn timing(&self) -> Timing {
        Timing {
            priority: self.params.priority,
            master_adver_interval_cs: self.master_adver_interval_cs,
        }
    }

    /// When the caller must next send [`Event::Timer`]; `None` when no timer runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.adver_at, self.master_down_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn step(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match (self.state, event) {
            (State::Initialize, Event::Startup) => {
                if self.params.priority == 255 {
                    self.become_master(now)
                } else {
                    self.master_adver_interval_cs = self.params.advert_interval_cs;
                    self.state = State::Backup;
                    self.master = None;
                    vec![self.arm_master_down(now + self.timing().master_down())]
                }
            }
            (State::Backup, Event::Shutdown) => {
                self.master_down_at = None;
                self.state = State::Initialize;
                self.lower_master_since = None;
                self.master = None;
                vec![Action::Cancel(Timer::MasterDown)]
            }
            (State::Master, Event::Shutdown) => {
                self.adver_at = None;
                self.state = State::Initialize;
                self.master = None;
                vec![
                    Action::Cancel(Timer::Adver),
                    Action::SendAdvert { priority: 0 },
                    Action::RemoveAddresses,
                ]
            }
            (State::Backup, Event::Timer) => match self.master_down_at {
                Some(at) if at <= now => self.become_master(now),
                _ => vec![],
            },
            (State::Master, Event::Timer) => match self.adver_at {
                Some(at) if at <= now => self.advertise(now).to_vec(),
                _ => vec![],
            },
            (
                State::Backup,
                Event::Advert {
                    from,
                    priority,
                    max_adver_int_cs,
                },
            ) => self.backup_advert(from, priority, max_adver_int_cs, now),
            (
                State::Master,
                Event::Advert {
                    from,
                    priority,
                    max_adver_int_cs,
                },
            ) => self.master_advert(from, priority, max_adver_int_cs, now),
            (state, Event::SetPriority(p)) => {
                if self.params.priority == 255 || p == 0 || p == 255 || p == self.params.priority {
                    return vec![];
                }
                let lowered = p < self.params.priority;
                self.params.priority = p;
                if state == State::Master && lowered {
                    self.advertise(now).to_vec()
                } else {
                    vec![]
                }
            }
            // Startup twice, Shutdown or adverts before Startup: nothing to do.
            (_, Event::Startup | Event::Shutdown | Event::Timer | Event::Advert { .. }) => vec![],
        }
    }

    fn become_master(&mut self, now: Instant) -> Vec<Action> {
        self.state = State::Master;
        self.master_down_at = None;
        self.lower_master_since = None;
        self.master = Some(self.params.primary);
        self.master_adver_interval_cs = self.params.advert_interval_cs;
        let [send, arm] = self.advertise(now);
        vec![
            Action::Cancel(Timer::MasterDown),
            Action::AddAddresses,
            send,
            Action::SendGratuitous,
            arm,
        ]
    }

    /// Sends an advert and re-arms the Adver_Timer.
    fn advertise(&mut self, now: Instant) -> [Action; 2] {
        let at = now + cs(self.params.advert_interval_cs);
        self.adver_at = Some(at);
        [
            Action::SendAdvert {
                priority: self.params.priority,
            },
            Action::Arm {
                timer: Timer::Adver,
                at,
            },
        ]
    }

    fn arm_master_down(&mut self, at: Instant) -> Action {
        self.master_down_at = Some(at);
        Action::Arm {
            timer: Timer::MasterDown,
            at,
        }
    }

    fn learn(&mut self, from: IpAddr, max_adver_int_cs: u16) {
        // An interval of 0 would make the master down timer fire at once: take 1 cs.
        self.master_adver_interval_cs = max_adver_int_cs.max(1);
        self.master = Some(from);
    }

    /// 6.4.2, "If an ADVERTISEMENT is received".
    fn backup_advert(
        &mut self,
        from: IpAddr,
        priority: u8,
        interval: u16,
        now: Instant,
    ) -> Vec<Action> {
        if priority == 0 {
            // The master is leaving: take over after Skew_Time.
            return vec![self.arm_master_down(now + self.timing().skew())];
        }
        let local = self.params.priority;
        if !self.params.preempt || priority >= local {
            self.lower_master_since = None;
            self.learn(from, interval);
            return vec![self.arm_master_down(now + self.timing().master_down())];
        }
        // Preempt a lower priority master, once it has been seen for preempt_delay.
        let since = *self.lower_master_since.get_or_insert(now);
        let preempt_at = since + self.params.preempt_delay;
        if now < preempt_at {
            self.learn(from, interval);
            let at = (now + self.timing().master_down()).min(preempt_at);
            return vec![self.arm_master_down(at)];
        }
        // Discard: the Master_Down_Timer runs out and we take over.
        vec![]
    }

    /// 6.4.3, "If an ADVERTISEMENT is received".
    fn master_advert(
        &mut self,
        from: IpAddr,
        priority: u8,
        interval: u16,
        now: Instant,
    ) -> Vec<Action> {
        if priority == 0 {
            // RFC 5798 6.4.3: advertise at once. Priority 0 reaching a master comes from a
            // router that was master too and is leaving (a healed split, see below): the
            // clients may have its MAC for the addresses, so announce ours.
            let mut out = self.advertise(now).to_vec();
            out.push(Action::SendGratuitous);
            return out;
        }
        let local = self.params.priority;
        let wins = priority > local || (priority == local && ip_greater(from, self.params.primary));
        if !wins {
            // Two masters: a partition between the pair just healed. The RFC discards the
            // advert; like keepalived (garp_lower_prio_repeat) we also answer at once with an
            // advert, so the other side yields now, and with gratuitous ARP, because while
            // partitioned the clients and switches learned the other master's MAC.
            let mut out = self.advertise(now).to_vec();
            out.push(Action::SendGratuitous);
            return out;
        }
        self.adver_at = None;
        self.state = State::Backup;
        self.learn(from, interval);
        let at = now + self.timing().master_down();
        // Yielding to a better master after both were master (a partition healed): a last
        // advert with priority 0 says "I stop being master", so the winner sends gratuitous
        // ARP even if it never heard one of our adverts (it spoke first), and the clients
        // that followed ours come back to it. A backup receiving it just re-arms its timer.
        vec![
            Action::Cancel(Timer::Adver),
            self.arm_master_down(at),
            Action::SendAdvert { priority: 0 },
            Action::RemoveAddresses,
        ]
    }
}

/// "the primary IPvX address of the sender is greater than the local primary IPvX address":
/// compared as unsigned integers in network byte order.
fn ip_greater(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => u32::from(a) > u32::from(b),
        (IpAddr::V6(a), IpAddr::V6(b)) => u128::from(a) > u128::from(b),
        // Mixed families never meet in one instance.
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use Action::*;

    const ME: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const LOWER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    const HIGHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 3));

    fn params(priority: u8) -> Params {
        Params {
            priority,
            advert_interval_cs: 100,
            preempt: true,
            preempt_delay: Duration::ZERO,
            primary: ME,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn advert(from: IpAddr, priority: u8, cs: u16) -> Event {
        Event::Advert {
            from,
            priority,
            max_adver_int_cs: cs,
        }
    }

    /// A machine of `p` brought into `state` at `t0`.
    fn in_state(p: Params, state: State, t0: Instant) -> Machine {
        let mut m = Machine::new(p);
        if state == State::Initialize {
            return m;
        }
        m.step(Event::Startup, t0);
        if state == State::Master && m.state() != State::Master {
            let at = m.next_deadline().unwrap();
            m.step(Event::Timer, at);
            assert_eq!(m.state(), State::Master);
            // Re-base the Adver_Timer at t0 so rows can name times relative to it.
            m.adver_at = Some(t0 + cs(p.advert_interval_cs));
        }
        assert_eq!(m.state(), state);
        m
    }

    #[test]
    fn timing_formulas() {
        // RFC 5798 6.1 with priority 100 and 1 s: skew = 156/256 s = 609.375 ms.
        let t = Timing {
            priority: 100,
            master_adver_interval_cs: 100,
        };
        assert_eq!(t.skew(), Duration::from_micros(609_375));
        assert_eq!(t.master_down(), Duration::from_micros(3_609_375));
        // 10 ms adverts, priority 254: skew = 2 * 10 / 256 ms.
        let t = Timing {
            priority: 254,
            master_adver_interval_cs: 1,
        };
        assert_eq!(t.skew(), Duration::from_micros(78));
        assert_eq!(t.master_down(), Duration::from_micros(30_078));
        // Higher priority, shorter skew: the best backup takes over first.
        let lo = Timing {
            priority: 100,
            master_adver_interval_cs: 10,
        };
        let hi = Timing {
            priority: 200,
            master_adver_interval_cs: 10,
        };
        assert!(hi.master_down() < lo.master_down());
    }

    /// One row: start state and params, an event at `t0 + after`, expected state and actions
    /// (times in actions relative to t0).
    struct Row {
        name: &'static str,
        params: Params,
        from: State,
        after: Duration,
        event: Event,
        to: State,
        actions: Vec<Want>,
    }

    /// An expected action; timers are named relative to t0.
    enum Want {
        Act(Action),
        Arm(Timer, Duration),
    }

    fn arm(timer: Timer, at: Duration) -> Want {
        Want::Arm(timer, at)
    }

    fn act(a: Action) -> Want {
        Want::Act(a)
    }

    fn run(rows: Vec<Row>) {
        let t0 = Instant::now();
        for row in rows {
            let mut m = in_state(row.params, row.from, t0);
            let got = m.step(row.event, t0 + row.after);
            let want: Vec<Action> = row
                .actions
                .iter()
                .map(|w| match w {
                    Want::Arm(timer, d) => Arm {
                        timer: *timer,
                        at: t0 + *d,
                    },
                    Want::Act(a) => *a,
                })
                .collect();
            assert_eq!(m.state(), row.to, "row {}: state", row.name);
            assert_eq!(got, want, "row {}: actions", row.name);
        }
    }

    #[test]
    fn rfc_5798_6_4_transitions() {
        let p100 = params(100);
        // Master_Down_Interval of priority 100 at 1 s: 3.609375 s; skew 609.375 ms.
        let mdi = Duration::from_micros(3_609_375);
        let skew = Duration::from_micros(609_375);
        let t = ms(500);
        run(vec![
            // 6.4.1 Initialize
            Row {
                name: "init: startup as owner -> master, advert 255, gratuitous",
                params: params(255),
                from: State::Initialize,
                after: Duration::ZERO,
                event: Event::Startup,
                to: State::Master,
                actions: vec![
                    act(Cancel(Timer::MasterDown)),
                    act(AddAddresses),
                    act(SendAdvert { priority: 255 }),
                    act(SendGratuitous),
                    arm(Timer::Adver, ms(1000)),
                ],
            },
            Row {
                name: "init: startup not owner -> backup, master down timer",
                params: p100,
                from: State::Initialize,
                after: Duration::ZERO,
                event: Event::Startup,
                to: State::Backup,
                actions: vec![arm(Timer::MasterDown, mdi)],
            },
            Row {
                name: "init: advert before startup is ignored",
                params: p100,
                from: State::Initialize,
                after: t,
                event: advert(HIGHER_IP, 200, 100),
                to: State::Initialize,
                actions: vec![],
            },
            // 6.4.2 Backup
            Row {
                name: "backup: shutdown -> initialize",
                params: p100,
                from: State::Backup,
                after: t,
                event: Event::Shutdown,
                to: State::Initialize,
                actions: vec![act(Cancel(Timer::MasterDown))],
            },
            Row {
                name: "backup: master down timer fires -> master",
                params: p100,
                from: State::Backup,
                after: mdi,
                event: Event::Timer,
                to: State::Master,
                actions: vec![
                    act(Cancel(Timer::MasterDown)),
                    act(AddAddresses),
                    act(SendAdvert { priority: 100 }),
                    act(SendGratuitous),
                    arm(Timer::Adver, mdi + ms(1000)),
                ],
            },
            Row {
                name: "backup: early timer event changes nothing",
                params: p100,
                from: State::Backup,
                after: mdi - ms(1),
                event: Event::Timer,
                to: State::Backup,
                actions: vec![],
            },
            Row {
                name: "backup: priority 0 advert -> master down timer = skew",
                params: p100,
                from: State::Backup,
                after: t,
                event: advert(HIGHER_IP, 0, 100),
                to: State::Backup,
                actions: vec![arm(Timer::MasterDown, t + skew)],
            },
            Row {
                name: "backup: higher priority advert resets the master down timer",
                params: p100,
                from: State::Backup,
                after: t,
                event: advert(LOWER_IP, 150, 100),
                to: State::Backup,
                actions: vec![arm(Timer::MasterDown, t + mdi)],
            },
            Row {
                name: "backup: equal priority advert resets the master down timer",
                params: p100,
                from: State::Backup,
                after: t,
                event: advert(LOWER_IP, 100, 100),
                to: State::Backup,
                actions: vec![arm(Timer::MasterDown, t + mdi)],
            },
            Row {
                name: "backup: learns Master_Adver_Interval (20 cs -> 3 * 200 ms + skew)",
                params: p100,
                from: State::Backup,
                after: t,
                event: advert(HIGHER_IP, 150, 20),
                to: State::Backup,
                actions: vec![arm(
                    Timer::MasterDown,
                    t + ms(600) + Duration::from_micros(156 * 200_000 / 256),
                )],
            },
            Row {
                name: "backup, preempt: lower priority advert is discarded",
                params: p100,
                from: State::Backup,
                after: t,
                event: advert(HIGHER_IP, 50, 100),
                to: State::Backup,
                actions: vec![],
            },
            Row {
                name: "backup, no preempt: lower priority advert resets the timer",
                params: Params {
                    preempt: false,
                    ..p100
                },
                from: State::Backup,
                after: t,
                event: advert(HIGHER_IP, 50, 100),
                to: State::Backup,
                actions: vec![arm(Timer::MasterDown, t + mdi)],
            },
            Row {
                name: "backup, preempt_delay 2 s: lower master tolerated until then",
                params: Params {
                    preempt_delay: ms(2000),
                    ..p100
                },
                from: State::Backup,
                after: t,
                event: advert(HIGHER_IP, 50, 100),
                to: State::Backup,
                actions: vec![arm(Timer::MasterDown, t + ms(2000))],
            },
            // 6.4.3 Master
            Row {
                name: "master: shutdown -> initialize, advert priority 0",
                params: p100,
                from: State::Master,
                after: t,
                event: Event::Shutdown,
                to: State::Initialize,
                actions: vec![
                    act(Cancel(Timer::Adver)),
                    act(SendAdvert { priority: 0 }),
                    act(RemoveAddresses),
                ],
            },
            Row {
                name: "master: adver timer fires -> advert, re-armed",
                params: p100,
                from: State::Master,
                after: ms(1000),
                event: Event::Timer,
                to: State::Master,
                actions: vec![
                    act(SendAdvert { priority: 100 }),
                    arm(Timer::Adver, ms(2000)),
                ],
            },
            Row {
                name: "master: priority 0 advert -> advert at once, gratuitous ARP",
                params: p100,
                from: State::Master,
                after: t,
                event: advert(HIGHER_IP, 0, 100),
                to: State::Master,
                actions: vec![
                    act(SendAdvert { priority: 100 }),
                    arm(Timer::Adver, t + ms(1000)),
                    act(SendGratuitous),
                ],
            },
            Row {
                name: "master: higher priority advert -> backup",
                params: p100,
                from: State::Master,
                after: t,
                event: advert(LOWER_IP, 150, 100),
                to: State::Backup,
                actions: vec![
                    act(Cancel(Timer::Adver)),
                    arm(Timer::MasterDown, t + mdi),
                    act(SendAdvert { priority: 0 }),
                    act(RemoveAddresses),
                ],
            },
            Row {
                name: "master: equal priority from a higher address -> backup",
                params: p100,
                from: State::Master,
                after: t,
                event: advert(HIGHER_IP, 100, 100),
                to: State::Backup,
                actions: vec![
                    act(Cancel(Timer::Adver)),
                    arm(Timer::MasterDown, t + mdi),
                    act(SendAdvert { priority: 0 }),
                    act(RemoveAddresses),
                ],
            },
            Row {
                name: "master: equal priority from a lower address is answered with an advert and gratuitous ARP (two masters)",
                params: p100,
                from: State::Master,
                after: t,
                event: advert(LOWER_IP, 100, 100),
                to: State::Master,
                actions: vec![
                    act(SendAdvert { priority: 100 }),
                    arm(Timer::Adver, t + ms(1000)),
                    act(SendGratuitous),
                ],
            },
            Row {
                name: "master: lower priority advert is answered with an advert and gratuitous ARP (two masters)",
                params: p100,
                from: State::Master,
                after: t,
                event: advert(HIGHER_IP, 99, 100),
                to: State::Master,
                actions: vec![
                    act(SendAdvert { priority: 100 }),
                    arm(Timer::Adver, t + ms(1000)),
                    act(SendGratuitous),
                ],
            },
            Row {
                name: "master: lowered priority is advertised at once",
                params: p100,
                from: State::Master,
                after: t,
                event: Event::SetPriority(50),
                to: State::Master,
                actions: vec![
                    act(SendAdvert { priority: 50 }),
                    arm(Timer::Adver, t + ms(1000)),
                ],
            },
            Row {
                name: "owner: priority changes are ignored",
                params: params(255),
                from: State::Master,
                after: t,
                event: Event::SetPriority(50),
                to: State::Master,
                actions: vec![],
            },
        ]);
    }

    #[test]
    fn priority_zero_makes_the_backup_take_over_after_skew() {
        let t0 = Instant::now();
        let mut m = in_state(params(100), State::Backup, t0);
        m.step(advert(HIGHER_IP, 150, 100), t0 + ms(100));
        m.step(advert(HIGHER_IP, 0, 100), t0 + ms(200));
        let at = m.next_deadline().unwrap();
        assert_eq!(at, t0 + ms(200) + Duration::from_micros(609_375));
        m.step(Event::Timer, at);
        assert_eq!(m.state(), State::Master);
        assert_eq!(m.master(), Some(ME));
    }

    #[test]
    fn preempt_delay_then_takeover_even_while_the_lower_master_keeps_advertising() {
        let t0 = Instant::now();
        let p = Params {
            preempt_delay: ms(2500),
            ..params(200)
        };
        let mut m = in_state(p, State::Backup, t0);
        let mut now = t0;
        while m.state() == State::Backup {
            now += ms(100);
            assert!(now < t0 + ms(3000), "no takeover by {:?}", now - t0);
            m.step(advert(LOWER_IP, 100, 10), now);
            if m.next_deadline().is_some_and(|d| d <= now) {
                m.step(Event::Timer, now);
            }
        }
        // First lower advert at 100 ms; takeover at 100 ms + 2.5 s.
        assert_eq!(now - t0, ms(2600));
    }

    #[test]
    fn a_higher_advert_resets_the_preempt_delay() {
        let t0 = Instant::now();
        let p = Params {
            preempt_delay: ms(1000),
            ..params(200)
        };
        let mut m = in_state(p, State::Backup, t0);
        m.step(advert(LOWER_IP, 100, 10), t0 + ms(100));
        m.step(advert(LOWER_IP, 250, 10), t0 + ms(500));
        m.step(advert(LOWER_IP, 100, 10), t0 + ms(900));
        // The delay counts again from 900 ms: until then each advert re-arms Master_Down_Interval.
        let mdi = m.timing().master_down();
        assert_eq!(m.next_deadline(), Some(t0 + ms(900) + mdi));
        m.step(advert(LOWER_IP, 100, 10), t0 + ms(1800));
        assert_eq!(m.next_deadline(), Some(t0 + ms(1900)));
    }

    #[test]
    fn a_zero_interval_advert_does_not_make_the_timer_fire_at_once() {
        let t0 = Instant::now();
        let mut m = in_state(params(100), State::Backup, t0);
        m.step(advert(HIGHER_IP, 150, 0), t0);
        assert_eq!(m.master_adver_interval_cs(), 1);
        assert!(m.next_deadline().unwrap() > t0 + ms(29));
    }

    #[test]
    fn ipv6_ties_compare_whole_addresses() {
        let t0 = Instant::now();
        let me: IpAddr = "fe80::2".parse().unwrap();
        let p = Params {
            primary: me,
            ..params(100)
        };
        let mut m = in_state(p, State::Master, t0);
        m.step(advert("fe80::1:0".parse().unwrap(), 100, 100), t0);
        assert_eq!(m.state(), State::Backup);
    }

    #[test]
    fn master_adopts_the_learned_interval_only_as_backup() {
        let t0 = Instant::now();
        let mut m = in_state(params(100), State::Backup, t0);
        m.step(advert(HIGHER_IP, 150, 20), t0);
        assert_eq!(m.master_adver_interval_cs(), 20);
        let at = m.next_deadline().unwrap();
        m.step(Event::Timer, at);
        assert_eq!(m.state(), State::Master);
        // As master it advertises at its own interval.
        assert_eq!(m.master_adver_interval_cs(), 100);
        assert_eq!(m.next_deadline(), Some(at + ms(1000)));
    }
}
