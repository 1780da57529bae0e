//! Deliveries held because their retry or DLQ copy cannot be placed.
//!
//! When the copy of a failed delivery is refused (a full `reject-publish`
//! queue nacks it, the route is missing, the broker is blocked or gone), the
//! consumer keeps the delivery unacked and publishes the copy again with a
//! capped, jittered backoff; its handler does not run again. Prefetch then
//! fills and the subscription stops taking work: backpressure instead of a
//! redelivery storm. [`Holds`] is what the rest of the process sees of that:
//! per queue, how many deliveries are held and why — for `/health`, the
//! `rabbitmq_reroutes_blocked{queue}` gauge, and one warning per episode (the
//! first hold on a queue after none) rather than one per attempt.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::metrics::QueueLabel;

/// Held deliveries of one broker, by the queue they were consumed from.
#[derive(Debug)]
pub(crate) struct Holds {
    queues: Mutex<BTreeMap<String, Held>>,
    gauge: Family<QueueLabel, Gauge>,
}

#[derive(Debug)]
struct Held {
    count: usize,
    /// The latest reason the copy could not be placed.
    reason: String,
    since: Instant,
}

/// A queue's held deliveries at one moment (see [`crate::http::Health`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldQueue {
    /// The queue the held deliveries came from.
    pub queue: String,
    /// How many of its deliveries are held now.
    pub held: usize,
    /// Why their copies cannot be placed (e.g. `retry queue helixagent.retry full`).
    pub reason: String,
}

impl Holds {
    pub(crate) fn new(gauge: Family<QueueLabel, Gauge>) -> Self {
        Holds {
            queues: Mutex::new(BTreeMap::new()),
            gauge,
        }
    }

    /// Record one more held delivery of `queue`; released when the guard drops.
    pub(crate) fn hold(self: &Arc<Self>, queue: &str, reason: String) -> HoldGuard {
        let mut queues = self.queues.lock().unwrap();
        let h = queues.entry(queue.to_string()).or_insert_with(|| Held {
            count: 0,
            reason: String::new(),
            since: Instant::now(),
        });
        if h.count == 0 {
            tracing::warn!(
                queue,
                reason = %reason,
                "holding failed deliveries unacked until their retry/DLQ copy is confirmed; \
                 the handler does not run again meanwhile"
            );
            h.since = Instant::now();
        }
        h.count += 1;
        h.reason = reason;
        self.gauge_of(queue).inc();
        HoldGuard {
            holds: self.clone(),
            queue: queue.to_string(),
        }
    }

    /// The held deliveries now, per queue.
    pub(crate) fn snapshot(&self) -> Vec<HeldQueue> {
        self.queues
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, h)| h.count > 0)
            .map(|(q, h)| HeldQueue {
                queue: q.clone(),
                held: h.count,
                reason: h.reason.clone(),
            })
            .collect()
    }

    fn gauge_of(&self, queue: &str) -> Gauge {
        self.gauge
            .get_or_create(&QueueLabel {
                queue: queue.to_string(),
            })
            .clone()
    }
}

/// One held delivery. [`HoldGuard::update`] records a newer reason; dropping
/// it (placed, or given back at shutdown) releases the hold.
#[derive(Debug)]
pub(crate) struct HoldGuard {
    holds: Arc<Holds>,
    queue: String,
}

impl HoldGuard {
    pub(crate) fn update(&self, reason: String) {
        if let Some(h) = self.holds.queues.lock().unwrap().get_mut(&self.queue) {
            h.reason = reason;
        }
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        let mut queues = self.holds.queues.lock().unwrap();
        if let Some(h) = queues.get_mut(&self.queue) {
            h.count -= 1;
            if h.count == 0 {
                tracing::info!(
                    queue = %self.queue,
                    held_for = ?h.since.elapsed(),
                    "retry/DLQ copies are placed again; no delivery held"
                );
                queues.remove(&self.queue);
            }
        }
        self.holds.gauge_of(&self.queue).dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_queue_and_releases_on_drop() {
        let holds = Arc::new(Holds::new(Family::default()));
        let a = holds.hold("q1", "retry queue r full".into());
        let b = holds.hold("q1", "retry queue r full".into());
        let c = holds.hold("q2", "dead-letter queue d full".into());
        assert_eq!(
            holds.snapshot(),
            vec![
                HeldQueue {
                    queue: "q1".into(),
                    held: 2,
                    reason: "retry queue r full".into()
                },
                HeldQueue {
                    queue: "q2".into(),
                    held: 1,
                    reason: "dead-letter queue d full".into()
                },
            ]
        );
        b.update("retry exchange r routes to no queue".into());
        drop(a);
        drop(c);
        assert_eq!(
            holds.snapshot(),
            vec![HeldQueue {
                queue: "q1".into(),
                held: 1,
                reason: "retry exchange r routes to no queue".into()
            }]
        );
        assert_eq!(holds.gauge_of("q1").get(), 1);
        drop(b);
        assert!(holds.snapshot().is_empty());
        assert_eq!(holds.gauge_of("q1").get(), 0);
    }
}
