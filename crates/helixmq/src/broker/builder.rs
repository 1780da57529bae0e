//! [`BrokerBuilder`]: everything optional about making a [`Broker`], and the
//! three ways to finish one — RabbitMQ, embedded, or a backend of your own.

use std::sync::Arc;

use crate::backend::memory::MemoryBroker;
use crate::backend::rabbitmq::RabbitBackend;
use crate::backend::Backend;
use crate::config::Config;
use crate::error::Result;
use crate::metrics::Metrics;

use super::Broker;

/// Builds a [`Broker`]; made by [`Broker::builder`].
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use helixmq::{Broker, Config, Metrics};
/// use prometheus_client::registry::Registry;
///
/// let mut registry = Registry::default();
/// let broker = Broker::builder(Config::default())
///     .metrics(Metrics::new(&mut registry))
///     .connection_name("billing-worker") // shown by RabbitMQ; unused when embedded
///     .embedded(); // or `.connect().await?` for RabbitMQ
/// assert_eq!(broker.backend_kind(), helixmq::BackendKind::Memory);
/// # Ok::<(), helixmq::Error>(()) }).unwrap();
/// ```
#[derive(Debug)]
#[must_use = "a builder does nothing until `connect`, `embedded` or `custom_backend`"]
pub struct BrokerBuilder {
    /// Policies (publish timeout, retries, prefix) and, for RabbitMQ, where to connect.
    config: Config,
    /// Where to count; `None`: a private set nobody exports.
    metrics: Option<Metrics>,
    /// The client-provided connection name RabbitMQ lists (to find or close
    /// this client's connection); `None`: `helixmq pid <pid>`.
    connection_name: Option<String>,
}

impl BrokerBuilder {
    pub(super) fn new(config: Config) -> Self {
        BrokerBuilder {
            config,
            metrics: None,
            connection_name: None,
        }
    }

    /// Count into `metrics` (see [`Metrics::new`]). Default: private counters.
    pub fn metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The connection name RabbitMQ shows (`rabbitmqctl list_connections
    /// client_properties`, the management UI). Default: `helixmq pid <pid>`.
    /// Only [`connect`](BrokerBuilder::connect) uses it.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// Connect to RabbitMQ as configured; declares nothing yet. Wrong
    /// credentials, an unknown vhost or nothing listening fail here at once.
    pub async fn connect(self) -> Result<Broker> {
        let metrics = self.metrics.unwrap_or_default();
        if !self.config.rabbitmq.publisher_confirm {
            // Publish returns Ok only after a confirm: that is the product, not an option.
            tracing::warn!(
                "rabbitmq.publisher_confirm is false, but helixmq always uses publisher \
                 confirms (publish returns Ok only once the broker confirmed); the setting is ignored"
            );
        }
        let name = self
            .connection_name
            .unwrap_or_else(|| format!("helixmq pid {}", std::process::id()));
        let backend =
            RabbitBackend::connect_named(&self.config.rabbitmq, metrics.clone(), &name).await?;
        Ok(Broker::assemble(Arc::new(backend), self.config, metrics))
    }

    /// An embedded (in-process) broker; nothing is declared yet. Works outside
    /// a Tokio runtime too: its background tasks (the expiry timer, the
    /// connection-state gauge) start with its first use inside one.
    pub fn embedded(self) -> Broker {
        let metrics = self.metrics.unwrap_or_default();
        Broker::assemble(Arc::new(MemoryBroker::new()), self.config, metrics)
    }

    /// A broker over a backend of your own. It must keep the contract written
    /// on [`Backend`]; everything above it (retries, DLQ, holds, shutdown,
    /// metrics) is the broker's.
    pub fn custom_backend(self, backend: Arc<dyn Backend>) -> Broker {
        let metrics = self.metrics.unwrap_or_default();
        Broker::assemble(backend, self.config, metrics)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::{Broker, Config, Message, Outcome, RetryPolicy, SubscribeOptions, Topology};

    /// Built where there is no runtime (a plain `#[test]`, a `main` before the
    /// runtime exists), then used inside one: no panic, and the timer the
    /// retry tiers need (TTL → dead-letter back) runs, so a retry comes back.
    #[test]
    fn embedded_outside_a_runtime_works_inside_one_later() {
        let broker = Broker::builder(Config::default()).embedded();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let names = broker.names().clone();
            broker.declare(&Topology::spec(&names)).await.unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel::<u32>(4);
            let handler = move |m: Message, _ctx: crate::Context| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(m.attempt).await;
                    Ok(if m.attempt == 1 {
                        Outcome::retry("first attempt fails")
                    } else {
                        Outcome::Ack
                    })
                }
            };
            let opts = SubscribeOptions {
                retry: Some(RetryPolicy {
                    max_attempts: 3,
                    delays: vec![Duration::from_millis(50)],
                }),
                ..SubscribeOptions::default()
            };
            let queue = names.task_queue("background");
            let sub = broker.subscribe(&queue, handler, opts).await.unwrap();
            broker
                .publish(&names.tasks_exchange(), "background", Message::new("x"))
                .await
                .unwrap();
            let wait = Duration::from_secs(5);
            assert_eq!(
                tokio::time::timeout(wait, rx.recv()).await.unwrap(),
                Some(1)
            );
            assert_eq!(
                tokio::time::timeout(wait, rx.recv()).await.unwrap(),
                Some(2),
                "the retry came back from its TTL tier"
            );
            assert_eq!(broker.metrics().connection_state.get(), 1);
            sub.shutdown(Duration::from_secs(1)).await;
            broker.close().await.unwrap();
        });
    }
}
