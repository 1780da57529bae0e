//! What every demo message is meant to do, and what the handlers saw: the
//! counters the end-of-run check compares.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::MAX_ATTEMPTS;

/// What a demo message is meant to do; decided at publish time so the end
/// state can be checked exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Fate {
    /// Succeeds at once.
    Ok,
    /// Fails on its first attempt (a simulated timeout), succeeds on retry.
    Flaky,
    /// Rejected as malformed: straight to the DLQ.
    Poison,
    /// Fails every attempt: DLQ after MAX_ATTEMPTS.
    Doomed,
}

impl Fate {
    /// The fate of the `i`-th message: a fixed mix, so every run shows each.
    pub(super) fn of(i: u32) -> Fate {
        match i {
            _ if i % 97 == 13 => Fate::Poison,
            _ if i % 89 == 41 => Fate::Doomed,
            _ if i % 16 == 7 => Fate::Flaky,
            _ => Fate::Ok,
        }
    }
    pub(super) fn ends_in_dlq(self) -> bool {
        matches!(self, Fate::Poison | Fate::Doomed)
    }
}

/// The body of every demo message (JSON).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Payload {
    pub n: u32,
    pub fate: Fate,
    /// Unix microseconds at publish, for end-to-end latency.
    pub sent_us: u64,
    #[serde(default)]
    pub text: String,
}

pub(super) fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Counters of one queue.
#[derive(Default)]
pub(super) struct QueueTally {
    pub published: AtomicU64,
    pub expect_processed: AtomicU64,
    pub expect_dead: AtomicU64,
    pub processed: AtomicU64,
    pub retried: AtomicU64,
    pub dead: AtomicU64,
    pub duplicates: AtomicU64,
    /// End-to-end latency of processed messages, microseconds.
    pub latencies: Mutex<Vec<u64>>,
    /// Ids processed, to count duplicates (at-least-once delivery).
    pub seen: Mutex<HashSet<String>>,
}

impl QueueTally {
    /// One more delivery to this queue, meant to end as `fate` says.
    pub(super) fn expect(&self, fate: Fate) {
        self.published.fetch_add(1, Ordering::Relaxed);
        if fate.ends_in_dlq() {
            self.expect_dead.fetch_add(1, Ordering::Relaxed);
        } else {
            self.expect_processed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A failed attempt that will come back (not the last one).
    pub(super) fn retried(&self) {
        self.retried.fetch_add(1, Ordering::Relaxed);
    }
}

/// Everything the handlers report into.
pub(super) struct Tally {
    /// One entry per work queue; fixed before the first message is published.
    pub queues: BTreeMap<String, QueueTally>,
    /// Processed + dead-lettered deliveries, for the progress bar and the end condition.
    pub settled: AtomicU64,
    /// Woken on every settlement, so the waiting loop needs no polling.
    pub changed: Notify,
    /// Priorities of LLM requests in the order their first attempt was served.
    pub llm_order: Mutex<Vec<u8>>,
    /// Dead letters by their (shortened) reason.
    pub dlq_reasons: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    /// A tally over these work queues.
    pub(super) fn new(queues: impl IntoIterator<Item = String>) -> Tally {
        Tally {
            queues: queues
                .into_iter()
                .map(|q| (q, QueueTally::default()))
                .collect(),
            settled: AtomicU64::new(0),
            changed: Notify::new(),
            llm_order: Mutex::new(Vec::new()),
            dlq_reasons: Mutex::new(BTreeMap::new()),
        }
    }

    pub(super) fn q(&self, name: &str) -> Option<&QueueTally> {
        self.queues.get(name)
    }

    fn settle(&self) {
        self.settled.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// Deliveries settled so far (processed or dead-lettered, once each).
    pub(super) fn settled(&self) -> u64 {
        self.settled.load(Ordering::Relaxed)
    }

    /// A message of `q` processed (a second delivery of the same id counts as
    /// a duplicate, not again).
    pub(super) fn processed(&self, q: &QueueTally, id: &str, sent_us: u64) {
        if q.seen.lock().unwrap().insert(id.to_string()) {
            q.processed.fetch_add(1, Ordering::Relaxed);
            q.latencies
                .lock()
                .unwrap()
                .push(now_us().saturating_sub(sent_us));
            self.settle();
        } else {
            q.duplicates.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A message of `origin` seen in the DLQ with `reason`.
    pub(super) fn dead_lettered(&self, origin: &str, id: &str, reason: &str) {
        let short = if reason.starts_with("gave up") {
            format!("gave up after {MAX_ATTEMPTS} attempts")
        } else {
            "rejected as poison".to_string()
        };
        *self.dlq_reasons.lock().unwrap().entry(short).or_default() += 1;
        if let Some(q) = self.q(origin) {
            if q.seen.lock().unwrap().insert(format!("dlq:{id}")) {
                q.dead.fetch_add(1, Ordering::Relaxed);
                self.settle();
            } else {
                q.duplicates.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The priority of an LLM request served for the first time.
    pub(super) fn llm_served(&self, priority: u8) {
        self.llm_order.lock().unwrap().push(priority);
    }
}
