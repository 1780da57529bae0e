//! The retry tiers: how many letters wait in each, and when the next is due.

use std::time::Duration;

use crate::error::Result;
use crate::{Broker, Topology};

/// One retry tier (a TTL queue that dead-letters back to the requeue exchange).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierStatus {
    /// The tier's queue.
    pub queue: String,
    /// Its delay (the queue's TTL).
    pub delay: Duration,
    /// Messages waiting in it.
    pub waiting: u64,
    /// When the oldest goes back to its queue, Unix ms (none waiting: `None`).
    pub next_due_ms: Option<i64>,
}

/// The retry tiers of `topology`, each read from the broker. The next due time
/// comes from the head message (taken with `basic.get` and put straight back:
/// it keeps its place and its expiry), whose last failure is when it entered.
pub async fn retry_tiers(broker: &Broker, topology: &Topology) -> Result<Vec<TierStatus>> {
    let requeue = broker.names().requeue_exchange();
    let backend = broker.backend();
    let mut out = Vec::new();
    for q in &topology.queues {
        let (Some(delay), Some(dlx)) = (q.message_ttl, q.dead_letter_exchange.as_deref()) else {
            continue;
        };
        if dlx != requeue {
            continue;
        }
        let waiting = backend.queue_stats(&q.name).await?.messages;
        let mut next_due_ms = None;
        if waiting > 0 {
            if let Some(d) = backend.get(&q.name).await? {
                let m = &d.message;
                let entered = m
                    .headers
                    .get(crate::message::header::LAST_FAILURE)
                    .and_then(|v| v.as_i64())
                    .unwrap_or(m.timestamp as i64 * 1000);
                next_due_ms = Some(entered + delay.as_millis() as i64);
                d.acker.nack(true).await?;
            }
        }
        out.push(TierStatus {
            queue: q.name.clone(),
            delay,
            waiting,
            next_due_ms,
        });
    }
    Ok(out)
}
