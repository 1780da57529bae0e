//! Scheduled publishes as a test sees them: a subscription that records, per
//! message id, when it was due (the `x-helixmq-due-at-ms` header the broker
//! set) and when it arrived, on the wall clock, into the id ledger.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use helixmq::message::header;
use helixmq::{Broker, Context, HeaderValue, Message, Outcome, SubscribeOptions, Subscription};
use tokio::sync::watch;

use crate::ledger::Ledger;

/// One scheduled message's arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Unix ms it was due.
    pub due_ms: i64,
    /// Unix ms the handler got it (the first time).
    pub arrived_ms: i64,
}

impl Arrival {
    /// Milliseconds after its time (negative: early).
    pub fn late_ms(&self) -> i64 {
        self.arrived_ms - self.due_ms
    }
}

/// Arrivals by id, and the ledger every delivery is counted in.
#[derive(Debug, Clone)]
pub struct Arrivals {
    /// First arrival per id.
    seen: Arc<Mutex<HashMap<String, Arrival>>>,
    /// Bumped on every delivery, for waiters.
    tick: Arc<watch::Sender<usize>>,
    /// Every delivery, by id: lost and duplicates.
    pub ledger: Arc<Ledger>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Arrivals {
    /// Subscribe to `queue` on `broker`, acking and recording every delivery.
    pub async fn subscribe(broker: &Broker, queue: &str) -> (Subscription, Arrivals) {
        let a = Arrivals {
            seen: Arc::default(),
            tick: Arc::new(watch::channel(0).0),
            ledger: Arc::new(Ledger::default()),
        };
        let rec = a.clone();
        let sub = broker
            .subscribe(
                queue,
                move |m: Message, _ctx: Context| {
                    let rec = rec.clone();
                    async move {
                        rec.record(&m);
                        Ok(Outcome::Ack)
                    }
                },
                SubscribeOptions::default(),
            )
            .await
            .expect("subscribe");
        (sub, a)
    }

    fn record(&self, m: &Message) {
        let due_ms = m
            .headers
            .get(header::DUE_AT)
            .and_then(HeaderValue::as_i64)
            .unwrap_or_else(|| panic!("message {} has no {} header", m.id, header::DUE_AT));
        let arrival = Arrival {
            due_ms,
            arrived_ms: now_ms(),
        };
        self.seen
            .lock()
            .unwrap()
            .entry(m.id.clone())
            .or_insert(arrival);
        self.ledger.consumed(&m.id);
        self.tick.send_modify(|n| *n += 1);
    }

    /// The arrival of `id`, if it came.
    pub fn get(&self, id: &str) -> Option<Arrival> {
        self.seen.lock().unwrap().get(id).copied()
    }

    /// Distinct ids arrived so far.
    pub fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Whether none arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Wait until `n` distinct ids arrived; panics after `limit`.
    pub async fn wait_for(&self, n: usize, limit: Duration) {
        let mut rx = self.tick.subscribe();
        let done = tokio::time::timeout(limit, rx.wait_for(|_| self.len() >= n)).await;
        assert!(
            done.is_ok(),
            "waited {limit:?} for {n} scheduled messages, {} arrived",
            self.len()
        );
    }
}
