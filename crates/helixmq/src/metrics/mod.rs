//! Prometheus metrics, registered into a registry the user owns.
//!
//! Nothing global: [`Metrics::new`] registers into the `Registry` it is given,
//! and a broker built without one keeps private counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set for per-exchange series (bounded: exchanges come from the topology).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExchangeLabel {
    /// Exchange name.
    pub exchange: String,
}

/// Label set for per-queue series (bounded: queues come from the topology).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    /// Queue name.
    pub queue: String,
}

/// Label set for per-rate-limit series (bounded: keys come from the subscriptions).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RateLimitLabel {
    /// The rate limit's key.
    pub key: String,
}

/// A histogram family whose histograms share one set of buckets.
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn rate_limit_wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

/// How one request of request-reply ended, as counted in
/// `rabbitmq_requests_total{outcome}` (a closed set: every value is created at 0).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The requester got its reply (counted by the requester).
    Replied,
    /// The requester's deadline passed without a reply.
    Timeout,
    /// A worker skipped a request whose deadline had passed before its handler started.
    Expired,
    /// A worker's reply was dropped: its caller was gone (no reply queue), its
    /// deadline had passed, or the request asked for no reply.
    ReplyDropped,
    /// A reply reached a requester that no longer waited for it (late or duplicate).
    LateReply,
}

impl RequestOutcome {
    /// Every outcome, for initialising the series.
    pub const ALL: [RequestOutcome; 5] = [
        RequestOutcome::Replied,
        RequestOutcome::Timeout,
        RequestOutcome::Expired,
        RequestOutcome::ReplyDropped,
        RequestOutcome::LateReply,
    ];
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Replied => "replied",
            RequestOutcome::Timeout => "timeout",
            RequestOutcome::Expired => "expired",
            RequestOutcome::ReplyDropped => "reply_dropped",
            RequestOutcome::LateReply => "late_reply",
        }
    }
}

impl prometheus_client::encoding::EncodeLabelValue for RequestOutcome {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

/// Label set of `rabbitmq_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    /// How the request ended.
    pub outcome: RequestOutcome,
}

/// Every metric helixmq exports. Names follow the spec (`rabbitmq_*`).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Confirmed publishes.
    pub published: Family<ExchangeLabel, Counter>,
    /// Publishes that failed (nack, timeout, unroutable).
    pub publish_failures: Family<ExchangeLabel, Counter>,
    /// Deliveries handed to handlers.
    pub consumed: Family<QueueLabel, Counter>,
    /// Deliveries acked after success.
    pub acked: Family<QueueLabel, Counter>,
    /// Deliveries nacked back to their queue (re-route failed, shutdown).
    pub nacked: Family<QueueLabel, Counter>,
    /// Deliveries sent to the retry route.
    pub retried: Family<QueueLabel, Counter>,
    /// Deliveries sent to the DLQ.
    pub dead_lettered: Family<QueueLabel, Counter>,
    /// Redeliveries skipped by the duplicate guard.
    pub duplicates_skipped: Family<QueueLabel, Counter>,
    /// Publish-to-confirm latency.
    pub publish_latency: Histogram,
    /// Handler run time.
    pub handler_duration: Histogram,
    /// Handlers running now.
    pub handlers_in_flight: Gauge,
    /// Publishes waiting for their confirm.
    pub confirms_pending: Gauge,
    /// 0 disconnected, 1 connected, 2 blocked.
    pub connection_state: Gauge,
    /// Successful connections (first and reconnects).
    pub connection_successes: Counter,
    /// Failed connection attempts.
    pub connection_failures: Counter,
    /// Recoveries after a lost connection.
    pub connection_recoveries: Counter,
    /// Scheduled publishes confirmed (waiting in a delay level), per destination exchange.
    pub scheduled: Family<ExchangeLabel, Counter>,
    /// Deliveries held unacked because their retry/DLQ copy cannot be placed, per queue.
    pub reroutes_blocked: Family<QueueLabel, Gauge>,
    /// How long a delivery waited for its rate limit's permit (and tokens), per key.
    pub rate_limit_wait: HistogramFamily<RateLimitLabel>,
    /// Permits minted by this process while it held a key's refiller lease.
    pub rate_limit_permits_minted: Family<RateLimitLabel, Counter>,
    /// Pauses ("retry after") this process heard, per key.
    pub rate_limit_pauses: Family<RateLimitLabel, Counter>,
    /// Request-reply outcomes, requester and worker side (`rabbitmq_requests_total{outcome}`).
    pub requests: Family<RequestLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            published: Family::default(),
            publish_failures: Family::default(),
            consumed: Family::default(),
            acked: Family::default(),
            nacked: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            duplicates_skipped: Family::default(),
            publish_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            handler_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            handlers_in_flight: Gauge::default(),
            confirms_pending: Gauge::default(),
            connection_state: Gauge::default(),
            connection_successes: Counter::default(),
            connection_failures: Counter::default(),
            connection_recoveries: Counter::default(),
            reroutes_blocked: Family::default(),
            scheduled: Family::default(),
            rate_limit_wait: Family::new_with_constructor(rate_limit_wait_histogram),
            rate_limit_permits_minted: Family::default(),
            rate_limit_pauses: Family::default(),
            requests: Family::default(),
        }
    }
}

impl Metrics {
    /// Create the metrics and register them under the `rabbitmq_` prefix.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        let r = registry.sub_registry_with_prefix("rabbitmq");
        r.register(
            "messages_published",
            "Messages published and confirmed",
            m.published.clone(),
        );
        r.register(
            "publish_failures",
            "Publishes nacked, timed out or unroutable",
            m.publish_failures.clone(),
        );
        r.register(
            "scheduled_messages",
            "Scheduled publishes confirmed (publish_delayed / publish_at), per destination exchange",
            m.scheduled.clone(),
        );
        r.register(
            "messages_consumed",
            "Deliveries handed to a handler",
            m.consumed.clone(),
        );
        r.register("messages_acked", "Deliveries acknowledged", m.acked.clone());
        r.register(
            "messages_nacked",
            "Deliveries negatively acknowledged and requeued",
            m.nacked.clone(),
        );
        r.register(
            "messages_retried",
            "Deliveries re-routed to the retry queue",
            m.retried.clone(),
        );
        r.register(
            "messages_dead_lettered",
            "Deliveries re-routed to the DLQ",
            m.dead_lettered.clone(),
        );
        r.register(
            "messages_duplicate_skipped",
            "Redeliveries skipped by the duplicate guard",
            m.duplicates_skipped.clone(),
        );
        r.register_with_unit(
            "publish_latency",
            "Publish to confirm latency",
            prometheus_client::registry::Unit::Seconds,
            m.publish_latency.clone(),
        );
        r.register_with_unit(
            "handler_duration",
            "Handler run time",
            prometheus_client::registry::Unit::Seconds,
            m.handler_duration.clone(),
        );
        r.register(
            "handlers_in_flight",
            "Handlers running now",
            m.handlers_in_flight.clone(),
        );
        r.register(
            "confirms_pending",
            "Publishes awaiting their confirm",
            m.confirms_pending.clone(),
        );
        r.register(
            "connection_state",
            "0 disconnected, 1 connected, 2 blocked",
            m.connection_state.clone(),
        );
        r.register(
            "connection_successes",
            "Successful connections",
            m.connection_successes.clone(),
        );
        r.register(
            "connection_failures",
            "Failed connection attempts",
            m.connection_failures.clone(),
        );
        r.register(
            "connection_recoveries",
            "Recoveries after a lost connection",
            m.connection_recoveries.clone(),
        );
        r.register(
            "reroutes_blocked",
            "Deliveries held unacked because their retry/DLQ copy cannot be placed (full queue, missing route, broker blocked)",
            m.reroutes_blocked.clone(),
        );
        r.register_with_unit(
            "rate_limit_wait",
            "Time a delivery waited for its shared rate limit's permit (and tokens), per key",
            prometheus_client::registry::Unit::Seconds,
            m.rate_limit_wait.clone(),
        );
        r.register(
            "rate_limit_permits_minted",
            "Permits minted by this process while it held the key's refiller lease",
            m.rate_limit_permits_minted.clone(),
        );
        r.register(
            "rate_limit_pauses",
            "Pauses (a handler's retry-after) heard, per rate limit key",
            m.rate_limit_pauses.clone(),
        );
        r.register(
            "requests",
            "Request-reply outcomes: replied, timeout, expired (skipped by a worker), reply_dropped, late_reply",
            m.requests.clone(),
        );
        for outcome in RequestOutcome::ALL {
            let _ = m.requests.get_or_create(&RequestLabel { outcome });
        }
        m
    }

    /// Count one request-reply outcome.
    pub(crate) fn request(&self, outcome: RequestOutcome) {
        self.requests.get_or_create(&RequestLabel { outcome }).inc();
    }

    /// Create the labelled series of every queue and exchange of `t`, so a
    /// dashboard reads 0 for them rather than "no data" before the first event.
    pub(crate) fn touch(&self, t: &crate::topology::Topology) {
        for q in &t.queues {
            let l = QueueLabel {
                queue: q.name.clone(),
            };
            for f in [
                &self.consumed,
                &self.acked,
                &self.nacked,
                &self.retried,
                &self.dead_lettered,
                &self.duplicates_skipped,
            ] {
                let _ = f.get_or_create(&l);
            }
            let _ = self.reroutes_blocked.get_or_create(&l);
        }
        for e in &t.exchanges {
            let l = ExchangeLabel {
                exchange: e.name.clone(),
            };
            let _ = self.published.get_or_create(&l);
            let _ = self.publish_failures.get_or_create(&l);
        }
    }

    /// Count one publish to `exchange`: confirmed (with its latency since
    /// `started`) or failed.
    pub(crate) fn count_publish(
        &self,
        exchange: &str,
        res: &crate::error::Result<()>,
        started: std::time::Instant,
    ) {
        match res {
            Ok(()) => {
                self.exchange(&self.published, exchange);
                self.publish_latency
                    .observe(started.elapsed().as_secs_f64());
            }
            Err(_) => self.exchange(&self.publish_failures, exchange),
        }
    }

    pub(crate) fn exchange(&self, f: &Family<ExchangeLabel, Counter>, exchange: &str) {
        f.get_or_create(&ExchangeLabel {
            exchange: exchange.to_string(),
        })
        .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Names, Topology};

    #[test]
    fn declared_queues_and_exchanges_read_zero_before_any_event() {
        let mut registry = Registry::default();
        let m = Metrics::new(&mut registry);
        m.touch(&Topology::spec(&Names::new("hx")));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"rabbitmq_messages_acked_total{queue="hx.tasks.llm"} 0"#,
            r#"rabbitmq_messages_dead_lettered_total{queue="hx.events.audit"} 0"#,
            r#"rabbitmq_reroutes_blocked{queue="hx.notifications.sse"} 0"#,
            r#"rabbitmq_messages_published_total{exchange="hx.tasks"} 0"#,
            r#"rabbitmq_requests_total{outcome="late_reply"} 0"#,
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
