//! The one id ledger: what each publish answered and how often each id was
//! consumed. From it: lost (confirmed but never consumed) and duplicates
//! (deliveries to a handler beyond the first), the two numbers every fault
//! scenario reports — the way RabbitMQ's Jepsen checker counts them — and,
//! when a wait times out, which ids are missing. Where the expected ids come
//! from elsewhere than publish answers (the outbox: the rows a database
//! committed), [`Ledger::counts_of`] and [`Ledger::wait_consumed`] count
//! against those.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use helixmq::Error;
use tokio::sync::watch;

/// What one publish answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// Ok: the broker confirmed it.
    Confirmed,
    /// `Error::PublishNacked`.
    Nacked,
    /// `Error::PublishTimeout`: unknown fate (it may still arrive).
    TimedOut,
    /// Any other error (its text).
    Failed(String),
}

#[derive(Debug, Default)]
struct State {
    published: HashMap<String, Published>,
    consumed: HashMap<String, u32>,
    /// Confirmed ids not consumed yet (kept incrementally: checked on every delivery).
    outstanding: usize,
    deliveries: u64,
}

/// The ledger of one scenario.
#[derive(Debug)]
pub struct Ledger {
    state: Mutex<State>,
    /// Bumped on every publish answer and delivery, for waiters.
    tick: watch::Sender<u64>,
}

/// The ledger's verdict.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Publishes answered.
    pub messages: usize,
    /// Distinct ids consumed (confirmed or not).
    pub consumed: usize,
    /// Answered Ok.
    pub confirmed: usize,
    /// Answered `PublishNacked`.
    pub nacked: usize,
    /// Answered `PublishTimeout`.
    pub timed_out: usize,
    /// Answered with another error.
    pub failed: usize,
    /// Confirmed and never consumed.
    pub lost: usize,
    /// Deliveries to a handler beyond the first, per id, summed.
    pub duplicates: u64,
    /// Ids consumed that were not confirmed (nacked, timed out or never answered).
    pub consumed_unconfirmed: usize,
    /// Ids consumed whose publish was nacked: a nack must mean "not enqueued".
    pub consumed_nacked: usize,
    /// The first few other errors, for the failure message.
    pub errors: Vec<String>,
}

/// Lost and duplicates of a set of expected ids ([`Ledger::counts_of`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Expected ids.
    pub expected: usize,
    /// Of them, consumed at least once.
    pub consumed: usize,
    /// Expected and never consumed.
    pub lost: usize,
    /// Deliveries beyond the first, summed over the expected ids.
    pub duplicates: u64,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            state: Mutex::default(),
            tick: watch::channel(0).0,
        }
    }
}

impl Ledger {
    /// Record the answer to the publish of `id`.
    pub fn published(&self, id: &str, result: &helixmq::Result<()>) {
        let p = match result {
            Ok(()) => Published::Confirmed,
            Err(Error::PublishNacked { .. }) => Published::Nacked,
            Err(Error::PublishTimeout { .. }) => Published::TimedOut,
            Err(e) => Published::Failed(e.to_string()),
        };
        {
            let mut s = self.state.lock().unwrap();
            if p == Published::Confirmed && !s.consumed.contains_key(id) {
                s.outstanding += 1;
            }
            s.published.insert(id.to_string(), p);
        }
        self.tick.send_modify(|t| *t += 1);
    }

    /// Record one delivery of `id` to a handler.
    pub fn consumed(&self, id: &str) {
        {
            let mut s = self.state.lock().unwrap();
            s.deliveries += 1;
            let n = s.consumed.entry(id.to_string()).or_insert(0);
            *n += 1;
            let first = *n == 1;
            if first && s.published.get(id) == Some(&Published::Confirmed) {
                s.outstanding -= 1;
            }
        }
        self.tick.send_modify(|t| *t += 1);
    }

    /// Distinct ids consumed so far.
    pub fn distinct_consumed(&self) -> usize {
        self.state.lock().unwrap().consumed.len()
    }

    /// How often `id` was consumed.
    pub fn times_consumed(&self, id: &str) -> u32 {
        self.state
            .lock()
            .unwrap()
            .consumed
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    /// Publishes answered so far.
    pub fn answered(&self) -> usize {
        self.state.lock().unwrap().published.len()
    }

    /// Publishes answered plus deliveries so far: moves while anything moves.
    pub fn progress(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.published.len() + s.deliveries as usize
    }

    /// Up to `max` confirmed ids not consumed yet (sorted).
    pub fn missing(&self, max: usize) -> Vec<String> {
        let s = self.state.lock().unwrap();
        let mut out: Vec<String> = s
            .published
            .iter()
            .filter(|(id, p)| **p == Published::Confirmed && !s.consumed.contains_key(*id))
            .map(|(id, _)| id.clone())
            .collect();
        out.sort();
        out.truncate(max);
        out
    }

    /// Wait until `cond` holds on (answered publishes, distinct consumed ids),
    /// re-checked on every ledger event; Err after `limit`.
    pub async fn wait_until(
        &self,
        limit: Duration,
        what: &str,
        cond: impl Fn(usize, usize) -> bool,
    ) -> Result<(), String> {
        let mut rx = self.tick.subscribe();
        let check = |_: &u64| {
            let s = self.state.lock().unwrap();
            cond(s.published.len(), s.consumed.len())
        };
        tokio::time::timeout(limit, rx.wait_for(check))
            .await
            .map(|_| ())
            .map_err(|_| {
                let s = self.state.lock().unwrap();
                format!(
                    "timed out after {limit:?} waiting for {what} ({} publishes answered, {} ids consumed, {} deliveries)",
                    s.published.len(),
                    s.consumed.len(),
                    s.deliveries
                )
            })
    }

    /// Wait until every confirmed id was consumed at least once; Err after
    /// `limit`, naming how many and which ids are missing (a frame capture
    /// or the broker's queues then tell where each one went).
    pub async fn wait_drained(&self, limit: Duration) -> Result<(), String> {
        let mut rx = self.tick.subscribe();
        let check = |_: &u64| self.state.lock().unwrap().outstanding == 0;
        tokio::time::timeout(limit, rx.wait_for(check))
            .await
            .map(|_| ())
            .map_err(|_| {
                let (outstanding, confirmed) = {
                    let s = self.state.lock().unwrap();
                    let confirmed = s
                        .published
                        .values()
                        .filter(|p| **p == Published::Confirmed)
                        .count();
                    (s.outstanding, confirmed)
                };
                format!(
                    "{outstanding} of {confirmed} confirmed messages still not consumed after {limit:?} (e.g. {:?})",
                    self.missing(5)
                )
            })
    }

    /// [`Ledger::wait_drained`], panicking on timeout with where the queues
    /// under `prefix` stand on `node` (`None`: the shared node): ready,
    /// unacked, consumers.
    pub async fn expect_drained(&self, limit: Duration, node: Option<&str>, prefix: &str) {
        if let Err(e) = self.wait_drained(limit).await {
            let (node, prefix) = (node.map(str::to_string), prefix.to_string());
            let depths = tokio::task::spawn_blocking(move || {
                crate::node::queue_depths(node.as_deref(), &prefix)
            })
            .await
            .unwrap_or_default();
            panic!("{e}; queues (name ready unacked consumers):\n{depths}");
        }
    }

    /// Consumption of the ids in `expected` (whatever their publishes answered).
    pub fn counts_of<'a>(&self, expected: impl IntoIterator<Item = &'a String>) -> Counts {
        let s = self.state.lock().unwrap();
        let mut c = Counts::default();
        for id in expected {
            c.expected += 1;
            match s.consumed.get(id) {
                Some(n) => {
                    c.consumed += 1;
                    c.duplicates += u64::from(n - 1);
                }
                None => c.lost += 1,
            }
        }
        c
    }

    /// Wait until every id of `expected` was consumed, or `limit` passed;
    /// the counts then.
    pub async fn wait_consumed(&self, expected: &[String], limit: Duration) -> Counts {
        let mut rx = self.tick.subscribe();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let c = self.counts_of(expected);
            if c.lost == 0 {
                return c;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return c;
            }
        }
    }

    /// The verdict now.
    pub fn report(&self) -> Report {
        let s = self.state.lock().unwrap();
        let mut r = Report {
            messages: s.published.len(),
            consumed: s.consumed.len(),
            ..Default::default()
        };
        for (id, p) in &s.published {
            let consumed = s.consumed.contains_key(id);
            match p {
                Published::Confirmed => {
                    r.confirmed += 1;
                    if !consumed {
                        r.lost += 1;
                    }
                }
                Published::Nacked => {
                    r.nacked += 1;
                    if consumed {
                        r.consumed_nacked += 1;
                    }
                }
                Published::TimedOut => r.timed_out += 1,
                Published::Failed(e) => {
                    r.failed += 1;
                    if r.errors.len() < 5 {
                        r.errors.push(e.clone());
                    }
                }
            }
        }
        r.duplicates = s.consumed.values().map(|n| u64::from(n - 1)).sum();
        r.consumed_unconfirmed = s
            .consumed
            .keys()
            .filter(|id| s.published.get(*id) != Some(&Published::Confirmed))
            .count();
        r
    }
}
