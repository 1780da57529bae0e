//! The transport seam: what a broker backend must do for helixmq.
//!
//! A backend speaks AMQP semantics — exchanges, queues, confirmed publishes,
//! consumers with prefetch and manual acks. Everything above that (retries, dead
//! letters, concurrency, shutdown, metrics) is written once in
//! [`crate::consumer`] and [`crate::broker`], so the embedded broker and
//! RabbitMQ behave the same by construction.
//!
//! [`Backend`] is a public extension point: the two backends here
//! ([`memory`], [`rabbitmq`]) implement it, and so can an application (a test
//! double, another transport), passing it to
//! [`BrokerBuilder::custom_backend`](crate::broker::BrokerBuilder::custom_backend).
//! The trait's documentation is the contract such a backend must keep.

pub mod memory;
pub mod rabbitmq;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::error::Result;
use crate::message::Message;
use crate::topology::Topology;

/// Which backend a broker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackendKind {
    /// The in-process embedded broker.
    Memory,
    /// A RabbitMQ server or cluster.
    RabbitMq,
    /// A backend supplied by the application
    /// ([`BrokerBuilder::custom_backend`](crate::broker::BrokerBuilder::custom_backend)).
    Custom,
}

/// Connection state, observable by callers and exported as a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// No connection (value 0 of `rabbitmq_connection_state`).
    Disconnected,
    /// Connected (1).
    Connected,
    /// Connected, but the broker blocked publishing (memory/disk alarm) (2).
    Blocked,
    /// Closed for good by `close` or after reconnects were exhausted.
    Closed,
}

impl ConnectionState {
    /// The gauge value: 0 disconnected, 1 connected, 2 blocked.
    pub fn gauge(self) -> i64 {
        match self {
            ConnectionState::Disconnected | ConnectionState::Closed => 0,
            ConnectionState::Connected => 1,
            ConnectionState::Blocked => 2,
        }
    }
}

/// What a publish needs beyond the message.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Exchange (`""` is the default exchange: routing key = queue name).
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Return the message as unroutable if no queue matches.
    pub mandatory: bool,
    /// The message: owned when the caller is done with it, so a backend that
    /// keeps messages (the embedded broker) takes it without a copy.
    pub message: std::borrow::Cow<'a, Message>,
}

/// Queue depth as the broker reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Ready messages.
    pub messages: u64,
    /// Consumers attached.
    pub consumers: u32,
}

/// A broker backend: the AMQP verbs helixmq's broker and consumer are built on.
///
/// This trait is an extension point rather than sealed: the conformance suite
/// and the `/health` tests drive the consumer through backends of their own,
/// and a service may want one (a test double, another transport). What makes
/// helixmq reliable is written once above this trait, so a backend only has
/// to keep the AMQP promises below; the conformance suite
/// (`crates/helixmq/tests/common/conformance.rs`) is how the two backends here
/// show that they do.
///
/// # Contract
///
/// A backend **must**:
/// - **Confirm.** [`publish`](Backend::publish) resolves `Ok` only once the
///   message is safely in every queue it routes to (a publisher confirm on
///   RabbitMQ). A refusal is [`Error::PublishNacked`](crate::Error::PublishNacked);
///   no answer within `timeout` is [`Error::PublishTimeout`](crate::Error::PublishTimeout)
///   ("unknown", not "lost"). It may send a message again (same id) across a
///   connection loss, never drop one it answered `Ok` for.
/// - **Return.** A `mandatory` publish that reaches no queue fails with
///   [`Error::Unroutable`](crate::Error::Unroutable), not `Ok`.
/// - **Declare what the topology says**, idempotently: queue TTLs and
///   dead-letter exchanges (the retry tiers are TTL queues that dead-letter
///   back to the origin queue), max length and overflow, priorities.
/// - **Settle as told.** A delivery stays unacked until its [`Acker`] is used;
///   at most `prefetch` unacked deliveries per consumer; `nack(requeue)`
///   redelivers with `redelivered = true`; dropping a [`DeliveryStream`]
///   requeues what it had not settled.
/// - **Recover by itself.** Connection loss is handled inside the backend:
///   publishes wait (within their timeout) and are resent, delivery streams
///   resume inside [`DeliveryStream::next`], [`state`](Backend::state) reports
///   `Disconnected` meanwhile. Only [`close`](Backend::close) (or reconnects
///   given up) makes it `Closed`, after which every operation fails with
///   [`Error::Closed`](crate::Error::Closed) — the consumer stops re-routing on it.
/// - **Keep errors typed**: the variants of [`Error`](crate::Error) that fit,
///   so [`Error::is_retryable`](crate::Error::is_retryable) stays right.
///
/// A backend **must not**:
/// - know of retries, attempts, failure headers or the DLQ — it moves messages
///   as it is told, the consumer decides where they go;
/// - ack, nack or requeue a delivery on its own (except requeueing what a
///   dropped stream or a lost connection left unsettled);
/// - block the runtime: every method is called from async code.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Which backend this is.
    fn kind(&self) -> BackendKind;

    /// Declare (idempotently) every exchange, queue and binding.
    async fn declare(&self, topology: &Topology) -> Result<()>;

    /// Publish one message; resolves when the broker confirmed it (ack → Ok).
    /// Retries transparently across reconnects until `timeout`.
    async fn publish(&self, out: Outgoing<'_>, timeout: std::time::Duration) -> Result<()>;

    /// Publish many messages pipelined: all sent, then all confirms awaited.
    /// One result per message, in order.
    async fn publish_batch(
        &self,
        outs: &[Outgoing<'_>],
        timeout: std::time::Duration,
    ) -> Vec<Result<()>> {
        let futs = outs.iter().map(|o| self.publish(o.clone(), timeout));
        futures::future::join_all(futs).await
    }

    /// Start consuming `queue` with at most `prefetch` unacked deliveries.
    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<Box<dyn DeliveryStream>>;

    /// Take one message without a consumer (`basic.get`), unacked.
    async fn get(&self, queue: &str) -> Result<Option<Delivery>>;

    /// Ready count and consumers of a queue (passive declare).
    async fn queue_stats(&self, queue: &str) -> Result<QueueStats>;

    /// Remove every ready message; returns how many.
    async fn purge(&self, queue: &str) -> Result<u64>;

    /// Delete a queue.
    async fn delete_queue(&self, queue: &str) -> Result<()>;

    /// Delete an exchange.
    async fn delete_exchange(&self, exchange: &str) -> Result<()>;

    /// Watch the connection state.
    fn state(&self) -> watch::Receiver<ConnectionState>;

    /// Wait for outstanding confirms, close channels and the connection.
    async fn close(&self) -> Result<()>;
}

/// A stream of deliveries from one consumer.
#[async_trait]
pub trait DeliveryStream: Send {
    /// The next delivery. `None` when the consumer was cancelled by us;
    /// `Some(Err(ConsumerCancelled))` when the broker cancelled it.
    /// Backends recover from connection loss inside `next`.
    async fn next(&mut self) -> Option<Result<Delivery>>;

    /// Stop receiving new deliveries (`basic.cancel`); unacked ones may still be settled.
    async fn cancel(&mut self) -> Result<()>;
}

/// Settles one delivery. `Ok` means the settlement reached the broker's side of
/// the wire (on RabbitMQ: the frame carrying it, possibly a multiple-ack, was
/// written to the socket); an error means it did not, or that the delivery
/// cannot be settled (already settled), and nothing was sent for it.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Positive acknowledgement: the broker forgets the message.
    async fn ack(&self) -> Result<()>;
    /// Negative acknowledgement; `requeue` puts it back (redelivered = true).
    async fn nack(&self, requeue: bool) -> Result<()>;
}

/// A message as delivered from a queue.
pub struct Delivery {
    /// The message (attempt count decoded from headers). Shared: the embedded
    /// broker keeps the same message for redelivery, without a copy.
    pub message: std::sync::Arc<Message>,
    /// Exchange it was published to.
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Queue it came from.
    pub queue: String,
    /// Delivered before and not acked (consumer died, nack with requeue).
    pub redelivered: bool,
    /// Settles it.
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.message.id)
            .field("queue", &self.queue)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("redelivered", &self.redelivered)
            .finish()
    }
}
