//! The relay's Prometheus metrics, registered into a registry the caller owns.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// What a relay counts. `Default` keeps them private; [`OutboxMetrics::new`]
/// registers them under `helixmq_outbox_`.
#[derive(Clone, Debug)]
pub struct OutboxMetrics {
    /// Rows not yet published (sampled every `RelayOptions::stats_interval`).
    pub pending: Gauge,
    /// Age of the oldest pending row, seconds (sampled likewise).
    pub oldest_pending_seconds: Gauge<f64, AtomicU64>,
    /// Rows published, confirmed and removed from the pending set.
    pub relayed: Counter,
    /// Rows whose publish failed (nack, unroutable, timeout); retried later.
    pub publish_failures: Counter,
    /// Batches that failed on the database side (connection lost, commit
    /// failed); their rows are published again by a later batch.
    pub batch_failures: Counter,
    /// Enqueue (row created) to confirm, seconds.
    pub relay_latency: Histogram,
}

impl Default for OutboxMetrics {
    fn default() -> Self {
        OutboxMetrics {
            pending: Gauge::default(),
            oldest_pending_seconds: Gauge::default(),
            relayed: Counter::default(),
            publish_failures: Counter::default(),
            batch_failures: Counter::default(),
            relay_latency: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
        }
    }
}

impl OutboxMetrics {
    /// Create the metrics and register them under the `helixmq_outbox` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = OutboxMetrics::default();
        let r = registry.sub_registry_with_prefix("helixmq_outbox");
        r.register(
            "pending_rows",
            "Outbox rows not yet published",
            m.pending.clone(),
        );
        r.register_with_unit(
            "oldest_pending_age",
            "Age of the oldest outbox row not yet published",
            Unit::Seconds,
            m.oldest_pending_seconds.clone(),
        );
        r.register(
            "relayed",
            "Outbox rows published and confirmed",
            m.relayed.clone(),
        );
        r.register(
            "publish_failures",
            "Outbox rows whose publish failed (retried later)",
            m.publish_failures.clone(),
        );
        r.register(
            "batch_failures",
            "Relay batches that failed on the database side",
            m.batch_failures.clone(),
        );
        r.register_with_unit(
            "relay_latency",
            "Outbox row creation to publisher confirm",
            Unit::Seconds,
            m.relay_latency.clone(),
        );
        m
    }
}
