//! [`RouteHandle`]: the part of a [`Broker`](super::Broker) a subscription
//! may use — consume its queue, publish retry and DLQ copies, count them, and
//! report the deliveries it holds — and nothing else of the broker's insides.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Backend, DeliveryStream, Outgoing};
use crate::consumer::Holds;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::topology::Names;

/// What a subscription's consumer needs of its broker. Cloned once per
/// subscription; it keeps the backend alive as long as the subscription runs.
#[derive(Clone)]
pub(crate) struct RouteHandle {
    /// The transport the copies go through.
    backend: Arc<dyn Backend>,
    /// Where retry tiers, the DLX and the DLQ are.
    pub(crate) names: Names,
    /// Where consuming and re-routing are counted.
    pub(crate) metrics: Metrics,
    /// How long one publish of a copy may wait for its confirm.
    pub(crate) publish_timeout: Duration,
    /// The broker's held deliveries, read by `/health`.
    pub(crate) holds: Arc<Holds>,
}

impl RouteHandle {
    pub(super) fn new(
        backend: Arc<dyn Backend>,
        names: Names,
        metrics: Metrics,
        publish_timeout: Duration,
        holds: Arc<Holds>,
    ) -> Self {
        RouteHandle {
            backend,
            names,
            metrics,
            publish_timeout,
            holds,
        }
    }

    /// Start consuming `queue`.
    pub(crate) async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<Box<dyn DeliveryStream>> {
        self.backend.consume(queue, prefetch, consumer_tag).await
    }

    /// One confirmed, mandatory publish of a copy within the publish
    /// timeout, counted like any publish.
    pub(crate) async fn publish(&self, out: Outgoing<'_>) -> Result<()> {
        let exchange = out.exchange;
        let m = &self.metrics;
        let started = Instant::now();
        m.confirms_pending.inc();
        let res = self.backend.publish(out, self.publish_timeout).await;
        m.confirms_pending.dec();
        m.count_publish(exchange, &res, started);
        res
    }
}
