//! The total-queue checker's history (in the spirit of RabbitMQ's Jepsen
//! tests): every id published, what its publish answered, during which fault
//! window it was published, and every handler run and DLQ arrival of it. From
//! it, per fault kind: lost (confirmed and never settled where it should be),
//! duplicated, unexpected.
//!
//! Ids are `m<i>` (the run's messages) and `p<k>` (recovery probes). What a
//! handler does with an id is a pure function of the id and the attempt
//! ([`decide`]), so a worker in another process behaves exactly the same:
//! `m<i>` whose hash is 0 mod 50 is poison (dead-lettered), 0 mod 10 fails
//! its first attempt (retried), every other id is acked.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use helixmq::{BoxError, Outcome};
use tokio::sync::watch;

use crate::ledger::Published;

/// What the handler does with an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Acked at its first attempt.
    Good,
    /// Fails its first attempt (a retry), acked at the second.
    FailOnce,
    /// `Outcome::DeadLetter` at once: must end in the DLQ, never acked.
    Poison,
}

/// The id of the run's `i`-th message.
pub fn message_id(i: usize) -> String {
    format!("m{i}")
}

/// The id of the `k`-th recovery probe (always [`Class::Good`]).
pub fn probe_id(k: usize) -> String {
    format!("p{k}")
}

/// splitmix64: spreads consecutive indices over the classes.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The class of an id of this run, None for an id this run never makes.
pub fn class_of(id: &str) -> Option<Class> {
    if let Some(i) = id.strip_prefix('m').and_then(|s| s.parse::<u64>().ok()) {
        let h = mix(i);
        return Some(if h.is_multiple_of(50) {
            Class::Poison
        } else if h.is_multiple_of(10) {
            Class::FailOnce
        } else {
            Class::Good
        });
    }
    id.strip_prefix('p')
        .and_then(|s| s.parse::<u64>().ok())
        .map(|_| Class::Good)
}

/// What one handler run answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// `Outcome::Ack`.
    Ack,
    /// An error: the library retries it.
    Fail,
    /// `Outcome::DeadLetter`.
    DeadLetter,
}

impl Verdict {
    /// Its wire form in a worker's output.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ack => "ack",
            Verdict::Fail => "fail",
            Verdict::DeadLetter => "dead",
        }
    }
    /// Parse [`Verdict::as_str`].
    pub fn parse(s: &str) -> Option<Verdict> {
        match s {
            "ack" => Some(Verdict::Ack),
            "fail" => Some(Verdict::Fail),
            "dead" => Some(Verdict::DeadLetter),
            _ => None,
        }
    }
    /// What the handler returns for it.
    pub fn outcome(self) -> Result<Outcome, BoxError> {
        match self {
            Verdict::Ack => Ok(Outcome::Ack),
            Verdict::Fail => Err("checker: this id fails its first attempt on purpose".into()),
            Verdict::DeadLetter => Ok(Outcome::dead_letter("checker: poison id")),
        }
    }
}

/// The handler's decision for `id` at `attempt` (an unknown id is acked, and
/// reported unexpected by the history).
pub fn decide(id: &str, attempt: u32) -> Verdict {
    match class_of(id) {
        Some(Class::Poison) => Verdict::DeadLetter,
        Some(Class::FailOnce) if attempt <= 1 => Verdict::Fail,
        _ => Verdict::Ack,
    }
}

/// The kinds of fault the schedule injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    /// `rabbitmqctl close_connection` of this test's connections.
    ForcedClose,
    /// The proxy closes every socket.
    TcpCut,
    /// The proxy stops forwarding, sockets stay open.
    BlackHole,
    /// The proxy holds every chunk for a while.
    Latency,
    /// The proxy caps the bandwidth.
    SlowLink,
    /// `rabbitmqctl stop_app` / `start_app`.
    BrokerRestart,
    /// A consumer killed: the worker process SIGKILLed, or a subscription dropped.
    ConsumerKill,
    /// `set_vm_memory_high_watermark` near 0, then back.
    MemoryAlarm,
}

impl FaultKind {
    /// Every kind, in table order.
    pub const ALL: [FaultKind; 8] = [
        FaultKind::ForcedClose,
        FaultKind::TcpCut,
        FaultKind::BlackHole,
        FaultKind::Latency,
        FaultKind::SlowLink,
        FaultKind::BrokerRestart,
        FaultKind::ConsumerKill,
        FaultKind::MemoryAlarm,
    ];
    /// Its name in the table.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::ForcedClose => "forced_close",
            FaultKind::TcpCut => "tcp_cut",
            FaultKind::BlackHole => "black_hole",
            FaultKind::Latency => "latency",
            FaultKind::SlowLink => "slow_link",
            FaultKind::BrokerRestart => "broker_restart",
            FaultKind::ConsumerKill => "consumer_kill",
            FaultKind::MemoryAlarm => "memory_alarm",
        }
    }
}

/// One injected fault: from injection until its recovery probe was handled.
#[derive(Debug, Clone)]
pub struct Window {
    /// Which fault.
    pub kind: FaultKind,
    /// How it was undone (or the detail of the injection).
    pub detail: String,
    /// From the undo to the probe published after it being handled; None
    /// while not (yet) recovered.
    pub recovery: Option<Duration>,
}

#[derive(Debug, Default, Clone)]
struct IdRec {
    /// 0: calm; k: during window k-1.
    window: usize,
    published: Option<Published>,
    acked: u32,
    failed: u32,
    dead: u32,
    dlq: u32,
    max_attempt: u32,
}

impl IdRec {
    fn settled(&self, class: Class) -> bool {
        match class {
            Class::Poison => self.dlq > 0,
            _ => self.acked > 0,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    ids: HashMap<String, IdRec>,
    windows: Vec<Window>,
    /// The window publishes start in now (0: none).
    current: usize,
    /// Confirmed ids not settled yet.
    outstanding: usize,
    runs: u64,
    /// Handler runs by verdict (ack, fail, dead-letter) and DLQ arrivals.
    verdicts: [u64; 3],
    dlq_arrivals: u64,
    /// Duplicate settles (a second ack, or a second DLQ copy of a poison id),
    /// by the window (0: calm; k: window k-1) they happened in.
    dup_in: HashMap<usize, u64>,
    unexpected: Vec<String>,
    unexpected_count: usize,
}

/// The history of one run.
#[derive(Debug)]
pub struct History {
    state: Mutex<State>,
    tick: watch::Sender<u64>,
}

impl Default for History {
    fn default() -> Self {
        History {
            state: Mutex::default(),
            tick: watch::channel(0).0,
        }
    }
}

/// One row of the final table.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Faults injected.
    pub attempts: usize,
    /// Ids whose publish started during them.
    pub published: usize,
    /// Of these, confirmed.
    pub confirmed: usize,
    /// Of these, settled: acked by a handler, or in the DLQ for a poison id.
    pub acknowledged: usize,
    /// Confirmed and not settled.
    pub lost: usize,
    /// Duplicate settles that happened during them (a handler ack of an id
    /// already acked, a DLQ arrival of a poison id already there), whenever
    /// the id was published: a fault's redeliveries and resends are charged to it.
    pub duplicated: u64,
    /// Faults after which a fresh probe was published and handled.
    pub recovered: usize,
    /// Events that must never happen (see [`History::handled`]).
    pub unexpected: usize,
    /// Recovery times of its faults.
    pub recovery: Vec<Duration>,
}

impl History {
    fn note(&self) {
        self.tick.send_modify(|t| *t += 1);
    }

    fn unexpected(s: &mut State, what: String) {
        s.unexpected_count += 1;
        if s.unexpected.len() < 20 {
            s.unexpected.push(what);
        }
    }

    /// A publish of `id` starts now (in the current fault window).
    pub fn publish_started(&self, id: &str) {
        let mut s = self.state.lock().unwrap();
        let window = s.current;
        s.ids.entry(id.to_string()).or_default().window = window;
    }

    /// Its answer.
    pub fn published(&self, id: &str, result: &helixmq::Result<()>) {
        let p = match result {
            Ok(()) => Published::Confirmed,
            Err(helixmq::Error::PublishNacked { .. }) => Published::Nacked,
            Err(helixmq::Error::PublishTimeout { .. }) => Published::TimedOut,
            Err(e) => Published::Failed(e.to_string()),
        };
        {
            let mut s = self.state.lock().unwrap();
            let class = class_of(id).expect("an id of this run");
            let r = s.ids.entry(id.to_string()).or_default();
            let newly = p == Published::Confirmed && !r.settled(class);
            r.published = Some(p);
            if newly {
                s.outstanding += 1;
            }
        }
        self.note();
    }

    /// A handler ran for `id` at `attempt` and answered `verdict`. Unexpected:
    /// an id never published; a good id at an attempt other than 1, a
    /// fail-once id past attempt 2, a poison id past attempt 1 (it must have
    /// gone to the DLQ); a poison id acked.
    pub fn handled(&self, id: &str, attempt: u32, verdict: Verdict) {
        {
            let mut s = self.state.lock().unwrap();
            s.runs += 1;
            let class = class_of(id);
            let Some(r) = s.ids.get_mut(id) else {
                Self::unexpected(&mut s, format!("handler ran for {id}, never published"));
                drop(s);
                self.note();
                return;
            };
            let class = class.expect("published ids have a class");
            let before = r.settled(class);
            r.max_attempt = r.max_attempt.max(attempt);
            let dup = match verdict {
                Verdict::Ack => {
                    r.acked += 1;
                    r.acked > 1
                }
                Verdict::Fail => {
                    r.failed += 1;
                    false
                }
                Verdict::DeadLetter => {
                    r.dead += 1;
                    false
                }
            };
            let now = r.settled(class);
            let confirmed = r.published == Some(Published::Confirmed);
            let bad = match class {
                Class::Good if attempt != 1 => Some("good id retried"),
                Class::FailOnce if attempt > 2 => Some("fail-once id failed twice"),
                Class::Poison if attempt != 1 => Some("poison id back from the DLQ"),
                Class::Poison if verdict == Verdict::Ack => Some("poison id acked"),
                _ => None,
            };
            if now && !before && confirmed {
                s.outstanding -= 1;
            }
            s.verdicts[verdict as usize] += 1;
            if dup {
                let w = s.current;
                *s.dup_in.entry(w).or_default() += 1;
            }
            if let Some(b) = bad {
                Self::unexpected(&mut s, format!("{b}: {id} at attempt {attempt}"));
            }
        }
        self.note();
    }

    /// `id` (at `attempt`) arrived in the DLQ. Unexpected unless it is poison.
    pub fn dead_lettered(&self, id: &str, attempt: u32) {
        {
            let mut s = self.state.lock().unwrap();
            let class = class_of(id);
            let Some(r) = s.ids.get_mut(id) else {
                Self::unexpected(&mut s, format!("{id} in the DLQ, never published"));
                drop(s);
                self.note();
                return;
            };
            let class = class.expect("published ids have a class");
            let before = r.settled(class);
            r.dlq += 1;
            let dup = r.dlq > 1;
            let now = r.settled(class);
            let confirmed = r.published == Some(Published::Confirmed);
            if now && !before && confirmed {
                s.outstanding -= 1;
            }
            s.dlq_arrivals += 1;
            if dup {
                let w = s.current;
                *s.dup_in.entry(w).or_default() += 1;
            }
            if class != Class::Poison {
                Self::unexpected(
                    &mut s,
                    format!("{class:?} id {id} in the DLQ (attempt {attempt})"),
                );
            }
        }
        self.note();
    }

    /// Open a fault window: publishes from now on are attributed to it.
    /// Returns its index for [`History::recovered`].
    pub fn begin(&self, kind: FaultKind, detail: String) -> usize {
        let mut s = self.state.lock().unwrap();
        s.windows.push(Window {
            kind,
            detail,
            recovery: None,
        });
        s.current = s.windows.len();
        s.windows.len() - 1
    }

    /// Window `w` recovered after `took` (from its undo); publishes are calm again.
    pub fn recovered(&self, w: usize, took: Duration) {
        let mut s = self.state.lock().unwrap();
        s.windows[w].recovery = Some(took);
        s.current = 0;
    }

    /// Close the current window without recovery (the run is failing).
    pub fn end_unrecovered(&self) {
        self.state.lock().unwrap().current = 0;
    }

    /// Add to a window's detail.
    pub fn detail(&self, w: usize, more: &str) {
        let mut s = self.state.lock().unwrap();
        let d = &mut s.windows[w].detail;
        if !d.is_empty() {
            d.push_str(", ");
        }
        d.push_str(more);
    }

    /// Whether `id` is settled (acked, or in the DLQ for poison).
    pub fn is_settled(&self, id: &str) -> bool {
        let s = self.state.lock().unwrap();
        match (s.ids.get(id), class_of(id)) {
            (Some(r), Some(c)) => r.settled(c),
            _ => false,
        }
    }

    /// Wait until `id` is settled; Err after `limit`.
    pub async fn wait_settled(&self, id: &str, limit: Duration) -> Result<(), ()> {
        let mut rx = self.tick.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|_| self.is_settled(id)))
            .await
            .map(|_| ())
            .map_err(|_| ())
    }

    /// Wait until every confirmed id is settled; Err (how many are not) after `limit`.
    pub async fn wait_all_settled(&self, limit: Duration) -> Result<(), usize> {
        let mut rx = self.tick.subscribe();
        let check = |_: &u64| self.state.lock().unwrap().outstanding == 0;
        tokio::time::timeout(limit, rx.wait_for(check))
            .await
            .map(|_| ())
            .map_err(|_| self.state.lock().unwrap().outstanding)
    }

    /// Handler runs so far.
    pub fn runs(&self) -> u64 {
        self.state.lock().unwrap().runs
    }

    /// Confirmed ids not settled, with what the history knows of each (first `max`).
    pub fn missing(&self, max: usize) -> Vec<String> {
        let s = self.state.lock().unwrap();
        let mut out: Vec<String> = s
            .ids
            .iter()
            .filter(|(id, r)| {
                r.published == Some(Published::Confirmed) && !r.settled(class_of(id).unwrap())
            })
            .map(|(id, r)| {
                format!(
                    "{id} ({:?}, published in window {}: acked {} failed {} dead-lettered {} in DLQ {} max attempt {})",
                    class_of(id).unwrap(),
                    r.window,
                    r.acked,
                    r.failed,
                    r.dead,
                    r.dlq,
                    r.max_attempt
                )
            })
            .collect();
        out.sort();
        out.truncate(max);
        out
    }

    /// The unexpected events (first 20) and how many there were.
    pub fn unexpected_events(&self) -> (usize, Vec<String>) {
        let s = self.state.lock().unwrap();
        (s.unexpected_count, s.unexpected.clone())
    }

    /// Every window, in order.
    pub fn windows(&self) -> Vec<Window> {
        self.state.lock().unwrap().windows.clone()
    }

    /// Publish answers other than a confirm, by kind (nacked, timed out, failed),
    /// with the first few error texts.
    pub fn publish_errors(&self) -> (usize, usize, usize, Vec<String>) {
        let s = self.state.lock().unwrap();
        let (mut n, mut t, mut f, mut texts) = (0, 0, 0, Vec::new());
        for r in s.ids.values() {
            match &r.published {
                Some(Published::Nacked) => n += 1,
                Some(Published::TimedOut) => t += 1,
                Some(Published::Failed(e)) => {
                    f += 1;
                    if texts.len() < 5 {
                        texts.push(e.clone());
                    }
                }
                _ => {}
            }
        }
        (n, t, f, texts)
    }

    /// The table: one row per fault kind, then `None` for the calm periods.
    /// Unexpected events are attributed to the window their id was published in
    /// (those about unknown ids to no row: see [`History::unexpected_events`]).
    pub fn table(&self) -> Vec<(Option<FaultKind>, Row)> {
        let s = self.state.lock().unwrap();
        let kind_of = |w: usize| (w > 0).then(|| s.windows[w - 1].kind);
        let mut rows: HashMap<Option<FaultKind>, Row> = HashMap::new();
        for (i, w) in s.windows.iter().enumerate() {
            let row = rows.entry(Some(w.kind)).or_default();
            row.attempts += 1;
            row.duplicated += s.dup_in.get(&(i + 1)).copied().unwrap_or(0);
            if let Some(t) = w.recovery {
                row.recovered += 1;
                row.recovery.push(t);
            }
        }
        for (id, r) in &s.ids {
            let class = class_of(id).unwrap();
            let row = rows.entry(kind_of(r.window)).or_default();
            row.published += 1;
            let settled = r.settled(class);
            if r.published == Some(Published::Confirmed) {
                row.confirmed += 1;
                if !settled {
                    row.lost += 1;
                }
            }
            if settled {
                row.acknowledged += 1;
            }
            let bad = match class {
                Class::Good => r.max_attempt > 1 || r.dlq > 0,
                Class::FailOnce => r.max_attempt > 2 || r.dlq > 0,
                Class::Poison => r.max_attempt > 1 || r.acked > 0,
            };
            if bad {
                row.unexpected += 1;
            }
        }
        let mut out: Vec<(Option<FaultKind>, Row)> = FaultKind::ALL
            .iter()
            .map(|k| (Some(*k), rows.remove(&Some(*k)).unwrap_or_default()))
            .collect();
        let mut calm = rows.remove(&None).unwrap_or_default();
        calm.duplicated = s.dup_in.get(&0).copied().unwrap_or(0);
        out.push((None, calm));
        out
    }

    /// One line: ids per class, handler runs per verdict, DLQ arrivals.
    pub fn totals(&self) -> String {
        let s = self.state.lock().unwrap();
        let mut classes = [0usize; 3];
        for id in s.ids.keys() {
            classes[class_of(id).unwrap() as usize] += 1;
        }
        format!(
            "ids: good {} fail-once {} poison {}; handler runs: ack {} fail {} dead-letter {}; DLQ arrivals {}",
            classes[0],
            classes[1],
            classes[2],
            s.verdicts[0],
            s.verdicts[1],
            s.verdicts[2],
            s.dlq_arrivals
        )
    }
}
