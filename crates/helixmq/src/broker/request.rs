//! Request-reply: [`Broker::request`] publishes a request and waits for the
//! one reply a handler answers with [`Outcome::Reply`](crate::Outcome::Reply).
//!
//! Why not RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`): its replies
//! are published to the default exchange, which the spec's least-privilege
//! user (`^helixagent\..*`) may not write to, and a reply-to pseudo-queue
//! dies with its channel, so a requester that reconnects loses every answer.
//! Instead, everything is under the prefix:
//!
//! ```text
//! request ─► exchange/key (any work queue) ─► worker: Outcome::Reply(m)
//!         reply_to = {p}.replies.{id}, correlation_id, expiration = timeout,
//!         x-helixmq-deadline-ms
//! reply ─► {p}.replies (direct, key = reply_to; mandatory, confirmed)
//!       ─► {p}.replies.{id} (this handle's reply queue) ─► the waiting caller
//! ```
//!
//! Each broker handle (and its clones) that makes requests owns one reply
//! queue, declared with the replies exchange on the first request. It is a
//! durable classic queue, **not exclusive**: an exclusive queue dies with its
//! connection, and a requester that reconnects must still get the replies to
//! its requests within their deadline — the connection manager redeclares it
//! with the rest of the topology, and the reply consumer reattaches. It has
//! `x-expires` ([`REPLY_QUEUE_EXPIRES`]), so the queue of a requester gone for
//! good disappears (one closed with [`Broker::close`] deletes it at once), and
//! a max length, so it stays bounded. Replies are
//! transient (no disk write: a requester does not outlive a broker restart
//! waiting for one) and carry the request's remaining time as `expiration`.
//!
//! The caller's deadline travels with the request twice: as `expiration`, so a
//! request nobody waits for expires in its queue (RabbitMQ dead-letters it,
//! reason `expired`, like any expired message of a work queue); and as the
//! [`header::DEADLINE`] header, because RabbitMQ expires only at a queue's
//! head: a consumer skips (acks, counts `expired`) a request whose deadline
//! passed before its handler started.
//!
//! Replies are matched by correlation id in a map of waiting callers, bounded
//! by [`MAX_PENDING`] (more requests wait for a slot within their deadline).
//! The first reply wins; a later or duplicate one (a redelivered request that
//! ran twice) finds no waiter and is counted `late_reply` and dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::{oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Broker, PublishOptions};
use crate::backend::{Delivery, DeliveryStream};
use crate::error::{Error, Result};
use crate::message::{header, Message};
use crate::metrics::{Metrics, RequestOutcome};
use crate::topology::{Binding, Exchange, ExchangeKind, Names, Overflow, Queue, Topology};

/// Requests one broker handle may wait on at once; more wait for a slot
/// (within their own deadline). Also the reply queue's max length.
pub const MAX_PENDING: usize = 10_000;

/// A reply queue's `x-expires`: how long it survives without its consumer.
/// Longer than a reconnect takes, so a requester that reconnects finds its
/// queue (and the replies in it); short enough that the queue of a process
/// gone for good does not linger. A request's timeout longer than this,
/// across a disconnection longer than this, may lose its reply (it then
/// times out).
pub const REPLY_QUEUE_EXPIRES: Duration = Duration::from_secs(600);

/// The longest timeout of a request: RabbitMQ takes per-message TTLs up to
/// 2^32 - 1 ms (~49 days).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 24 * 3600);

/// Unacked replies the reply consumer may hold: it only hands them over.
const REPLY_PREFETCH: u16 = 512;

/// Callers waiting for a reply, by correlation id.
type Waiters = Mutex<HashMap<String, oneshot::Sender<Message>>>;

/// The requesting side of one broker handle: its reply queue, the callers
/// waiting on it, and the task consuming it.
pub(crate) struct Requester {
    /// `{prefix}.replies.{uuid}`: this handle's reply queue, also its routing
    /// key on the replies exchange (what requests carry as `reply_to`).
    queue: String,
    /// Callers waiting, by correlation id; entries leave on reply, timeout or
    /// a dropped request future (see [`Waiting`]).
    waiters: Arc<Waiters>,
    /// Bounds `waiters` at [`MAX_PENDING`].
    slots: Semaphore,
    /// The reply consumer, started by the first request and again by the next
    /// one if it stopped (e.g. its queue was deleted).
    consumer: tokio::sync::Mutex<Option<JoinHandle<()>>>,
    /// Stops the reply consumer when the broker handle goes.
    stop: CancellationToken,
}

impl Drop for Requester {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Requester {
    pub(crate) fn new(names: &Names) -> Self {
        Requester {
            queue: names.reply_queue(&uuid::Uuid::now_v7().simple().to_string()),
            waiters: Arc::default(),
            slots: Semaphore::new(MAX_PENDING),
            consumer: tokio::sync::Mutex::new(None),
            stop: CancellationToken::new(),
        }
    }

    /// The replies exchange, this handle's reply queue and its binding.
    fn topology(&self, names: &Names) -> Topology {
        let exchange = names.replies_exchange();
        Topology {
            names: names.clone(),
            exchanges: vec![Exchange {
                name: exchange.clone(),
                kind: ExchangeKind::Direct,
                durable: true,
                alternate_exchange: None,
            }],
            queues: vec![Queue::durable(self.queue.clone())
                .expires(REPLY_QUEUE_EXPIRES)
                .max_length(MAX_PENDING as u64, Overflow::RejectPublish)],
            bindings: vec![Binding {
                exchange,
                queue: self.queue.clone(),
                routing_key: self.queue.clone(),
            }],
        }
    }

    /// Declare the reply topology and start the reply consumer, unless it runs.
    async fn ensure(&self, broker: &Broker) -> Result<()> {
        let mut consumer = self.consumer.lock().await;
        if consumer.as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        broker.declare(&self.topology(broker.names())).await?;
        let tag = format!("helixmq-{}", self.queue);
        let stream = broker
            .backend()
            .consume(&self.queue, REPLY_PREFETCH, &tag)
            .await?;
        *consumer = Some(tokio::spawn(consume_replies(
            stream,
            self.queue.clone(),
            self.waiters.clone(),
            broker.metrics().clone(),
            self.stop.clone(),
        )));
        Ok(())
    }
}

impl Requester {
    /// On [`Broker::close`]: stop the reply consumer, tell every waiting
    /// caller (`Closed`), and delete the reply queue if this handle made one
    /// (nothing can read it any more; `x-expires` is for a requester that
    /// could not say goodbye).
    pub(crate) async fn close(&self, broker: &Broker) {
        let task = self.consumer.lock().await.take();
        let Some(task) = task else { return };
        self.stop.cancel();
        let _ = task.await;
        lock(&self.waiters).clear();
        if let Err(e) = broker.backend().delete_queue(&self.queue).await {
            tracing::debug!(queue = %self.queue, error = %e, "delete the reply queue on close");
        }
    }
}

/// A caller's entry in the waiters, removed when the request ends however it
/// ends (reply, timeout, error, or the caller dropping the future).
struct Waiting<'a> {
    waiters: &'a Waiters,
    correlation_id: String,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(self.waiters).remove(&self.correlation_id);
    }
}

fn lock(w: &Waiters) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Message>>> {
    // Only inserts and removes happen under it: a panic leaves it consistent.
    w.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The reply consumer: hands each reply to its waiting caller, counts the
/// ones nobody waits for, acks every one. Ends when the broker handle goes
/// (`stop`), is closed (the stream ends: every waiter is told), or the broker
/// cancels it (its queue was deleted: the next request starts it again).
async fn consume_replies(
    mut stream: Box<dyn DeliveryStream>,
    queue: String,
    waiters: Arc<Waiters>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => break,
            d = stream.next() => d,
        };
        let Delivery { message, acker, .. } = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) if !matches!(e, Error::Closed) => {
                tracing::warn!(queue, error = %e, "reply consumer stopped; the next request starts it again");
                break;
            }
            Some(Err(_)) | None => {
                // Closed: nobody will answer; callers get `Closed` now, not at their deadline.
                lock(&waiters).clear();
                break;
            }
        };
        let waiter = message
            .correlation_id
            .as_deref()
            .and_then(|c| lock(&waiters).remove(c));
        let delivered = match waiter {
            Some(tx) => tx.send(Arc::unwrap_or_clone(message)).is_ok(),
            None => false,
        };
        if !delivered {
            metrics.request(RequestOutcome::LateReply);
            tracing::debug!(queue, "reply nobody waits for (late or duplicate): dropped");
        }
        if let Err(e) = acker.ack().await {
            // Redelivered then, and counted as a late reply.
            tracing::debug!(queue, error = %e, "ack of a reply failed");
        }
    }
    if let Err(e) = stream.cancel().await {
        tracing::debug!(queue, error = %e, "cancel reply consumer");
    }
}

impl Broker {
    /// Publish `message` as a request to `exchange` with `routing_key` and wait
    /// up to `timeout` for its reply: the message a handler answered with
    /// [`Outcome::Reply`](crate::Outcome::Reply). The request carries `reply_to`
    /// (this handle's reply queue), a correlation id (the message's own if set,
    /// else its id), `expiration` = the time left (shorter if the message had a
    /// shorter one) and the deadline header, so a request whose caller gave up is
    /// not handled. Fails with [`Error::RequestTimeout`] when no reply came in
    /// time (the request may still run), with the publish's error if it was not
    /// confirmed, and with [`Error::InvalidMessage`] if a request with the same
    /// correlation id is already waiting here or the timeout is over
    /// [`MAX_TIMEOUT`]. Works under the spec's least-privilege permissions: see
    /// [`crate::broker::request`] for the design.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use helixmq::{Broker, Config, Message, Outcome, SubscribeOptions, Topology};
    /// let broker = Broker::embedded(Config::default());
    /// broker.declare(&Topology::default()).await?;
    /// let q = broker.names().task_queue("llm");
    /// let sub = broker.subscribe(&q, |m: Message, _ctx| async move {
    ///     let answer = format!("echo: {}", String::from_utf8_lossy(&m.payload));
    ///     Ok(Outcome::reply(Message::new(answer)))
    /// }, SubscribeOptions::default()).await?;
    /// let reply = broker
    ///     .request("helixagent.tasks", "llm", Message::new("hi"), Duration::from_secs(5))
    ///     .await?;
    /// assert_eq!(&reply.payload[..], b"echo: hi");
    /// sub.shutdown(Duration::from_secs(1)).await;
    /// # Ok::<(), helixmq::Error>(()) }).unwrap();
    /// ```
    pub async fn request(
        &self,
        exchange: &str,
        routing_key: &str,
        mut message: Message,
        timeout: Duration,
    ) -> Result<Message> {
        self.start_mirroring();
        if timeout > MAX_TIMEOUT {
            return Err(Error::InvalidMessage(format!(
                "request timeout {} is longer than the longest allowed, {} (it travels \
                 as the request's expiration)",
                humantime::format_duration(timeout),
                humantime::format_duration(MAX_TIMEOUT)
            )));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let wall_deadline = SystemTime::now() + timeout;
        let metrics = &self.inner.metrics;
        let timed_out = |id: &str| {
            metrics.request(RequestOutcome::Timeout);
            Error::RequestTimeout {
                message_id: id.to_string(),
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
                timeout,
            }
        };
        let req = &self.inner.requester;
        tokio::time::timeout_at(deadline, req.ensure(self))
            .await
            .map_err(|_| timed_out(&message.id))??;
        let _slot = tokio::time::timeout_at(deadline, req.slots.acquire())
            .await
            .map_err(|_| timed_out(&message.id))?
            .map_err(|_| Error::Closed)?;
        let correlation_id = message
            .correlation_id
            .get_or_insert_with(|| message.id.clone())
            .clone();
        let (tx, rx) = oneshot::channel();
        {
            let mut w = lock(&req.waiters);
            if w.contains_key(&correlation_id) {
                return Err(Error::InvalidMessage(format!(
                    "a request with correlation id '{correlation_id}' is already waiting for \
                     its reply on this broker handle: give each request its own correlation \
                     id (or none: the message id is used)"
                )));
            }
            w.insert(correlation_id.clone(), tx);
        }
        // Inserted before the publish: a fast reply may come before the confirm.
        let _waiting = Waiting {
            waiters: &req.waiters,
            correlation_id,
        };
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(timed_out(&message.id));
        }
        // Whole milliseconds, rounded up: an `expiration` of 0 would expire at once.
        let ttl = Duration::from_millis(left.as_millis() as u64 + 1);
        message.expiration = Some(message.expiration.map_or(ttl, |e| e.min(ttl)));
        message.reply_to = Some(req.queue.clone());
        let wall_ms = wall_deadline
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        message
            .headers
            .insert(header::DEADLINE.into(), wall_ms.into());
        let id = message.id.clone();
        let opts = PublishOptions {
            timeout: Some(left.min(self.publish_timeout())),
            ..PublishOptions::default()
        };
        self.publish_with(exchange, routing_key, message, &opts)
            .await?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => {
                metrics.request(RequestOutcome::Replied);
                Ok(reply)
            }
            // The reply consumer ended with the broker closed.
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(timed_out(&id)),
        }
    }
}
