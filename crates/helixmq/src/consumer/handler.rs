//! What a handler is and what it may answer.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use crate::error::BoxError;
use crate::message::Message;

/// What to do with a message after its handler ran.
///
/// `PartialEq` but not `Eq`: a [`Outcome::Reply`] holds a [`Message`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done: acknowledge it.
    Ack,
    /// Failed transiently: try again after the policy's delay (or the closest tier
    /// to `delay`), up to the maximum attempts; then the DLQ.
    Retry {
        /// Requested delay, if the handler knows better (e.g. `Retry-After`).
        delay: Option<Duration>,
        /// Why; written to the failure headers.
        reason: String,
    },
    /// Poison: straight to the DLQ with this reason.
    DeadLetter(String),
    /// The provider said "rate limited, retry after this long" (HTTP 429 +
    /// `Retry-After`): the message is retried as [`Outcome::Retry`] with this
    /// delay, and a subscription with a
    /// [`rate_limit`](crate::SubscribeOptions::rate_limit) pauses its key for
    /// every worker sharing it until then.
    RetryAfter(Duration),
    /// Done, and this is the answer to the request (see
    /// [`Broker::request`](crate::Broker::request)): it is published to the
    /// requester's reply queue (confirmed), then the request is acked. A reply
    /// whose caller is gone, or past the request's deadline, is dropped and
    /// counted (`rabbitmq_requests_total{outcome="reply_dropped"}`), never
    /// dead-lettered; so is a reply to a message that asked for none. Boxed: a
    /// message is far larger than the other outcomes. [`Outcome::reply`] makes one.
    Reply(Box<Message>),
}

impl Outcome {
    /// `Retry` with the policy's delay.
    pub fn retry(reason: impl Into<String>) -> Self {
        Outcome::Retry {
            delay: None,
            reason: reason.into(),
        }
    }
    /// `Reply` with `message` (its correlation id and reply-to are set from
    /// the request when it is sent).
    pub fn reply(message: Message) -> Self {
        Outcome::Reply(Box::new(message))
    }
    /// `DeadLetter`.
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Outcome::DeadLetter(reason.into())
    }
}

/// Where a delivery came from.
#[derive(Debug, Clone)]
pub struct Context {
    /// Queue consumed.
    pub queue: String,
    /// Exchange it was published to (the requeue exchange for a retried message).
    pub exchange: String,
    /// Routing key it was published with.
    pub routing_key: String,
    /// Whether the broker delivered it before without an ack.
    pub redelivered: bool,
}

/// Handles messages. An `Err` or a panic counts as `Outcome::Retry`.
///
/// Any `Fn(Message, Context) -> impl Future<Output = Result<Outcome, BoxError>>` is a handler.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handle one message.
    async fn handle(&self, message: Message, ctx: Context) -> Result<Outcome, BoxError>;
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Message, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, BoxError>> + Send + 'static,
{
    async fn handle(&self, message: Message, ctx: Context) -> Result<Outcome, BoxError> {
        (self)(message, ctx).await
    }
}
