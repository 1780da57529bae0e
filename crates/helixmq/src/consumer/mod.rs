//! The reliable consumer, written once for every backend.
//!
//! One task per subscription pulls deliveries (the backend enforces prefetch),
//! runs up to `concurrency` handlers, and settles each delivery only after its
//! outcome is safe: Ack after success; Retry and DeadLetter only after the
//! re-routed copy is confirmed by the broker. If that publish fails the
//! original is *held*: kept unacked while its copy is published again with a
//! capped, jittered backoff, its handler not run again (`hold.rs`). Only a
//! shutdown gives a held delivery back to its queue (nack with requeue).

mod dedup;
mod handler;
mod hold;

pub use handler::{Context, Handler, Outcome};
pub use hold::HeldQueue;
pub(crate) use hold::Holds;

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::FutureExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backend::{Delivery, Outgoing};
use crate::broker::{RetryPolicy, RouteHandle};
use crate::error::{Error, Result};
use crate::message::{header, now_unix_millis, HeaderValue, Message};
use crate::metrics::{QueueLabel, RequestOutcome};
use crate::ratelimit::Limiter;
use dedup::Dedup;
use prometheus_client::metrics::counter::Counter;

/// The life of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscriptionStatus {
    /// Consuming.
    Active,
    /// [`Subscription::shutdown`] was called: no new deliveries are taken,
    /// in-flight handlers finish (`/health` answers 503 `draining`).
    Draining,
    /// Shut down by its owner.
    Stopped,
    /// Stopped by a fault it cannot recover from (e.g. the broker cancelled the
    /// consumer because the queue was deleted). The text says which.
    Failed(String),
}

/// What a graceful shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Handlers that finished and were settled during the drain.
    pub drained: usize,
    /// Handlers still running at the deadline, aborted: their messages were
    /// not acked and go back to the queue.
    pub abandoned: usize,
}

/// A running subscription. Dropping it stops consuming abruptly (unacked
/// messages return to the queue); prefer [`Subscription::shutdown`].
pub struct Subscription {
    id: String,
    queue: String,
    stop: CancellationToken,
    drain: Arc<Mutex<Duration>>,
    /// Shared with the engine task, which sets the final status.
    status: Arc<watch::Sender<SubscriptionStatus>>,
    task: Option<tokio::task::JoinHandle<ShutdownReport>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .field("queue", &self.queue)
            .finish()
    }
}

impl Subscription {
    /// Consumer tag.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// Queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// Current status.
    pub fn status(&self) -> SubscriptionStatus {
        self.status.borrow().clone()
    }
    /// Whether it is still consuming.
    pub fn is_active(&self) -> bool {
        *self.status.borrow() == SubscriptionStatus::Active
    }
    /// A watch on the status (e.g. to alert when it fails).
    pub fn watch_status(&self) -> watch::Receiver<SubscriptionStatus> {
        self.status.subscribe()
    }

    /// Stop taking messages, let in-flight handlers finish for up to `deadline`,
    /// settle them, then close the consumer. Handlers still running at the
    /// deadline are aborted and their messages return to the queue unacked.
    pub async fn shutdown(mut self, deadline: Duration) -> ShutdownReport {
        *self.drain.lock().unwrap() = deadline;
        self.status.send_if_modified(|s| {
            let active = *s == SubscriptionStatus::Active;
            if active {
                *s = SubscriptionStatus::Draining;
            }
            active
        });
        self.stop.cancel();
        match self.task.take() {
            Some(t) => t.await.unwrap_or(ShutdownReport {
                drained: 0,
                abandoned: 0,
            }),
            None => ShutdownReport {
                drained: 0,
                abandoned: 0,
            },
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if self.task.is_some() {
            *self.drain.lock().unwrap() = Duration::ZERO;
            self.stop.cancel();
        }
    }
}

/// Shared by every worker of one subscription.
struct Runner {
    /// The broker's backend, names, metrics and holds, as far as a subscription needs them.
    route: RouteHandle,
    queue: String,
    /// This queue's counters, resolved once: a label lookup per message is measurable.
    counters: QueueCounters,
    handler: Arc<dyn Handler>,
    retry: RetryPolicy,
    handler_timeout: Duration,
    dedup: Option<Mutex<Dedup>>,
    /// Exactly-once effects through a database transaction (`crate::inbox`).
    #[cfg(feature = "postgres")]
    inbox: Option<crate::inbox::Inbox>,
    /// The shared rate limit every handler start waits for.
    limiter: Option<Arc<Limiter>>,
}

pub(crate) async fn start(
    route: RouteHandle,
    queue: String,
    handler: Arc<dyn Handler>,
    opts: crate::broker::options_resolved::Resolved,
    limiter: Option<Arc<Limiter>>,
) -> Result<Subscription> {
    let tag = opts
        .consumer_tag
        .clone()
        .unwrap_or_else(|| format!("helixmq-{queue}-{}", uuid::Uuid::now_v7().simple()));
    let stream = match route.consume(&queue, opts.prefetch, &tag).await {
        Ok(s) => s,
        Err(e) => {
            if let Some(l) = &limiter {
                l.close().await;
            }
            return Err(e);
        }
    };
    let status = Arc::new(watch::channel(SubscriptionStatus::Active).0);
    let stop = CancellationToken::new();
    let drain = Arc::new(Mutex::new(Duration::from_secs(30)));
    let counters = QueueCounters::new(&route.metrics, &queue);
    let runner = Arc::new(Runner {
        route,
        queue: queue.clone(),
        counters,
        handler,
        retry: opts.retry.clone(),
        handler_timeout: opts.handler_timeout,
        dedup: opts
            .dedup
            .as_ref()
            .map(|d| Mutex::new(Dedup::new(d.capacity, d.ttl))),
        #[cfg(feature = "postgres")]
        inbox: opts.inbox.clone(),
        limiter,
    });
    let task = tokio::spawn(run(
        runner,
        stream,
        opts.concurrency,
        stop.clone(),
        drain.clone(),
        status.clone(),
    ));
    Ok(Subscription {
        id: tag,
        queue,
        stop,
        drain,
        status,
        task: Some(task),
    })
}

/// One subscription's engine: `concurrency` worker tasks share the delivery
/// stream; each takes one delivery, runs its handler and settles it, then
/// takes the next. A fixed pool (instead of a task per message) keeps the hot
/// path free of spawns while handlers still run in parallel on every core.
async fn run(
    runner: Arc<Runner>,
    stream: Box<dyn crate::backend::DeliveryStream>,
    concurrency: usize,
    stop: CancellationToken,
    drain: Arc<Mutex<Duration>>,
    status: Arc<watch::Sender<SubscriptionStatus>>,
) -> ShutdownReport {
    let stream = Arc::new(tokio::sync::Mutex::new(stream));
    // Cancelled by the owner's `stop`, or by a worker when the stream ends or fails.
    let halt = stop.child_token();
    let failed: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let busy = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        workers.spawn(worker(
            runner.clone(),
            stream.clone(),
            halt.clone(),
            failed.clone(),
            busy.clone(),
        ));
    }
    halt.cancelled().await;
    // Stop the flow first so no new delivery arrives while we drain. Workers
    // waiting on the stream have let go of it once `halt` fired.
    if let Err(e) = stream.lock().await.cancel().await {
        tracing::debug!(error = %e, "cancel consumer");
    }
    let deadline = *drain.lock().unwrap();
    let pending = busy.load(Ordering::SeqCst);
    let drained = tokio::time::timeout(deadline, async {
        while workers.join_next().await.is_some() {}
    })
    .await;
    let report = match drained {
        Ok(()) => ShutdownReport {
            drained: pending,
            abandoned: 0,
        },
        Err(_) => {
            let left = busy.load(Ordering::SeqCst);
            workers.abort_all();
            while workers.join_next().await.is_some() {}
            ShutdownReport {
                drained: pending.saturating_sub(left),
                abandoned: left,
            }
        }
    };
    // Dropping the stream closes the consumer channel: anything unacked is requeued.
    drop(stream);
    if let Some(l) = &runner.limiter {
        l.close().await;
    }
    let failed = failed
        .lock()
        .unwrap()
        .take()
        .or_else(|| runner.limiter.as_ref().and_then(|l| l.failure()));
    status.send_replace(match failed {
        Some(f) => SubscriptionStatus::Failed(f),
        None => SubscriptionStatus::Stopped,
    });
    report
}

async fn worker(
    runner: Arc<Runner>,
    stream: Arc<tokio::sync::Mutex<Box<dyn crate::backend::DeliveryStream>>>,
    halt: CancellationToken,
    failed: Arc<Mutex<Option<String>>>,
    busy: Arc<AtomicUsize>,
) {
    loop {
        let next = {
            let mut s = tokio::select! {
                biased;
                _ = halt.cancelled() => return,
                s = stream.lock() => s,
            };
            tokio::select! {
                biased;
                _ = halt.cancelled() => return,
                d = s.next() => d,
            }
        };
        match next {
            None => {
                halt.cancel();
                return;
            }
            Some(Err(e)) => {
                tracing::error!(queue = %runner.queue, error = %e, "subscription failed");
                *failed.lock().unwrap() = Some(e.to_string());
                halt.cancel();
                return;
            }
            Some(Ok(d)) => {
                busy.fetch_add(1, Ordering::SeqCst);
                runner.process(d, &halt).await;
                busy.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }
}

impl Runner {
    async fn process(&self, d: Delivery, halt: &CancellationToken) {
        let c = &self.counters;
        // RabbitMQ expires a request only at its queue's head; one prefetched
        // (or behind a longer-lived one) may reach us after its caller gave up.
        if d.message.deadline().is_some_and(|t| t <= SystemTime::now()) {
            return self.skip_expired(d).await;
        }
        // The duplicate guard keys on (id, attempt): a retried copy keeps its id.
        let key = self
            .dedup
            .as_ref()
            .map(|_| format!("{}#{}", d.message.id, d.message.attempt));
        if let (Some(dd), Some(key)) = (&self.dedup, &key) {
            if dd.lock().unwrap().contains(key) {
                return self.skip_duplicate(d).await;
            }
        }
        // The permit is taken before the inbox opens its transaction: waiting
        // for it must not hold a database connection.
        let taken = match &self.limiter {
            Some(l) => match l.acquire(token_estimate(&d.message), halt).await {
                Some(t) => Some(t),
                None => return self.give_back(d, l, halt).await,
            },
            None => None,
        };
        #[cfg(feature = "postgres")]
        let claim = crate::inbox::Claim::of(self.inbox.as_ref(), &self.queue, &d.message).await;
        #[cfg(feature = "postgres")]
        if matches!(claim, crate::inbox::Claim::Duplicate) {
            return self.skip_duplicate(d).await;
        }
        c.consumed.inc();
        let span = tracing::info_span!(
            "handle",
            message_id = %d.message.id,
            correlation_id = d.message.correlation_id.as_deref().unwrap_or(""),
            traceparent = d.message.traceparent().unwrap_or(""),
            exchange = %d.exchange,
            routing_key = %d.routing_key,
            queue = %self.queue,
            attempt = d.message.attempt,
        );
        // The tokens the handler reported, for the rate limit's reconcile.
        let mut used = None;
        let handled = async {
            let (outcome, reported) = self.run_handler(&d).await;
            used = reported;
            outcome
        };
        // The handler runs in the inbox transaction, committed on Ack.
        #[cfg(feature = "postgres")]
        let handled = claim.run(handled);
        let outcome = handled.instrument(span.clone()).await;
        let outcome = match (&self.limiter, taken) {
            (Some(l), Some(t)) => {
                l.reconcile(t, used).await;
                if let Outcome::RetryAfter(delay) = &outcome {
                    tracing::info!(key = %l.key(), delay = ?delay, "rate limited: pausing the key for every worker");
                    l.pause_all(*delay).await;
                }
                outcome
            }
            _ => outcome,
        };
        self.settle(d, key, outcome, halt).instrument(span).await;
    }

    /// No permit came (shutdown, or the permits were lost): the delivery goes
    /// back to its queue untouched, its handler not run.
    async fn give_back(&self, d: Delivery, l: &Limiter, halt: &CancellationToken) {
        if l.failure().is_some() {
            halt.cancel();
        }
        self.counters.nacked.inc();
        if let Err(e) = d.acker.nack(true).await {
            tracing::debug!(error = %e, "nack failed; message will be redelivered");
        }
    }

    /// Ack a request whose caller stopped waiting, without running its handler.
    async fn skip_expired(&self, d: Delivery) {
        self.route.metrics.request(RequestOutcome::Expired);
        tracing::debug!(message_id = %d.message.id, queue = %self.queue, "request past its deadline: skipped");
        if let Err(e) = d.acker.ack().await {
            tracing::warn!(error = %e, "ack of expired request failed; it will be redelivered");
        }
    }

    /// Ack a delivery already handled without running its handler again.
    async fn skip_duplicate(&self, d: Delivery) {
        self.counters.duplicates_skipped.inc();
        if let Err(e) = d.acker.ack().await {
            tracing::warn!(error = %e, "ack of duplicate failed; it will be redelivered");
        }
    }

    /// Run the handler; its outcome and the tokens it reported
    /// ([`crate::ratelimit::report_tokens`]).
    async fn run_handler(&self, d: &Delivery) -> (Outcome, Option<u64>) {
        let m = &self.route.metrics;
        let ctx = Context {
            queue: self.queue.clone(),
            exchange: d.exchange.clone(),
            routing_key: d.routing_key.clone(),
            redelivered: d.redelivered,
        };
        m.handlers_in_flight.inc();
        let started = Instant::now();
        let fut = AssertUnwindSafe(crate::ratelimit::hearing_tokens(
            self.handler.handle(Message::clone(&d.message), ctx),
        ))
        .catch_unwind();
        let res = tokio::time::timeout(self.handler_timeout, fut).await;
        m.handlers_in_flight.dec();
        m.handler_duration.observe(started.elapsed().as_secs_f64());
        let used = match &res {
            Ok(Ok((_, used))) => *used,
            _ => None,
        };
        let outcome = match res.map(|r| r.map(|(o, _)| o)) {
            Ok(Ok(Ok(o))) => o,
            Ok(Ok(Err(e))) => Outcome::retry(format!("handler error: {e}")),
            Ok(Err(p)) => {
                let what = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::retry(format!("handler panicked: {what}"))
            }
            Err(_) => Outcome::retry(format!(
                "handler timed out after {:?}",
                self.handler_timeout
            )),
        };
        (outcome, used)
    }

    /// Settle a delivery. Once its outcome is safe (the handler's Ack, or the
    /// re-routed copy confirmed) the duplicate guard remembers `key` — before
    /// the ack, which may be lost with the connection: the redelivery that
    /// follows must not run the handler again.
    async fn settle(
        &self,
        d: Delivery,
        key: Option<String>,
        outcome: Outcome,
        halt: &CancellationToken,
    ) {
        let c = &self.counters;
        let attempt = d.message.attempt;
        let outcome = match outcome {
            // Retried like any transient failure; the pause was sent in `process`.
            Outcome::RetryAfter(delay) => Outcome::Retry {
                delay: Some(delay),
                reason: format!(
                    "rate limited: retry after {}",
                    humantime::format_duration(delay)
                ),
            },
            o => o,
        };
        let outcome = match outcome {
            Outcome::Retry { reason, .. } if attempt >= self.retry.max_attempts => {
                Outcome::DeadLetter(format!(
                    "gave up after {attempt} attempts (max_attempts {}): {reason}",
                    self.retry.max_attempts
                ))
            }
            o => o,
        };
        let placed = match &outcome {
            Outcome::Ack => true,
            Outcome::RetryAfter(_) => unreachable!("RetryAfter was turned into Retry above"),
            Outcome::Reply(reply) => self.send_reply(&d, reply, halt).await,
            Outcome::Retry { delay, reason } => {
                let wait = self.retry.delay_after(attempt, *delay);
                let tier = self.route.names.retry_tier(wait);
                let mut copy = failed_copy(&d, reason);
                copy.attempt = attempt + 1;
                tracing::info!(reason = %reason, delay = ?wait, "retrying");
                let placed = self
                    .place(&d, Route::Retry { tier: &tier }, &copy, halt)
                    .await;
                if placed {
                    c.retried.inc();
                }
                placed
            }
            Outcome::DeadLetter(reason) => {
                let mut copy = failed_copy(&d, reason);
                copy.headers
                    .insert(header::DEAD_LETTER_REASON.into(), reason.clone().into());
                tracing::warn!(reason = %reason, "dead-lettering");
                let names = &self.route.names;
                let (dlx, dlq) = (names.dead_letter_exchange(), names.dlq());
                let route = Route::DeadLetter {
                    dlx: &dlx,
                    dlq: &dlq,
                };
                let placed = self.place(&d, route, &copy, halt).await;
                if placed {
                    c.dead_lettered.inc();
                }
                placed
            }
        };
        if !placed {
            // Shutting down with the copy still unplaced: the one case where the
            // delivery goes back to its queue (and its handler may run once more).
            c.nacked.inc();
            if let Err(e) = d.acker.nack(true).await {
                tracing::warn!(error = %e, "nack failed; message will be redelivered");
            }
            return;
        }
        if let (Some(dd), Some(key)) = (&self.dedup, key) {
            dd.lock().unwrap().insert(key);
        }
        match d.acker.ack().await {
            Ok(()) => {
                c.acked.inc();
            }
            Err(e) => {
                // The channel died: the broker will redeliver; the duplicate guard absorbs it.
                tracing::warn!(error = %e, "ack failed; message will be redelivered");
            }
        }
    }

    /// Publish the retry or DLQ copy of `d` until the broker confirms it; true
    /// once placed. Meanwhile `d` is held (unacked, counted in [`Holds`]) and
    /// the copy is sent again after a capped, jittered backoff. False only if
    /// the subscription stops (or the broker is closed for good) first.
    async fn place(
        &self,
        d: &Delivery,
        route: Route<'_>,
        copy: &Message,
        halt: &CancellationToken,
    ) -> bool {
        let mut held: Option<hold::HoldGuard> = None;
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            // A shutdown does not wait for a publish the broker may hold back
            // for `publish_timeout`; if that copy lands after all, the message
            // exists twice (at-least-once), never zero times.
            let sent = tokio::select! {
                _ = halt.cancelled(), if held.is_some() => return false,
                r = self.republish(route.exchange(), &d.queue, copy) => r,
            };
            let err = match sent {
                Ok(()) => return true,
                Err(e) => e,
            };
            let reason = route.why(&err);
            match &held {
                None => held = Some(self.route.holds.hold(&self.queue, reason)),
                Some(h) => {
                    tracing::debug!(reason = %reason, attempt, "copy still not placed");
                    h.update(reason)
                }
            }
            if matches!(err, Error::Closed) {
                return false;
            }
            let wait = crate::backoff::jittered(HOLD_BACKOFF_BASE, HOLD_BACKOFF_MAX, attempt);
            tokio::select! {
                _ = halt.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Publish `reply` to the requester of `d` (confirmed, mandatory, through
    /// the replies exchange); true once it is placed or dropped for good. A
    /// reply whose caller is gone (no reply queue: unroutable), or that would
    /// arrive past the request's deadline, is dropped and counted, never
    /// dead-lettered. Any other failure holds `d` (as an unplaced copy does)
    /// and sends again until the deadline; false only on shutdown first.
    async fn send_reply(&self, d: &Delivery, reply: &Message, halt: &CancellationToken) -> bool {
        let m = &self.route.metrics;
        let Some(to) = d.message.reply_to.as_deref() else {
            tracing::warn!("the handler replied to a message that asked for no reply (no reply_to): reply dropped");
            m.request(RequestOutcome::ReplyDropped);
            return true;
        };
        let mut reply = reply.clone();
        reply.correlation_id = d
            .message
            .correlation_id
            .clone()
            .or_else(|| Some(d.message.id.clone()));
        reply.reply_to = None;
        // Nobody needs a reply after a broker restart: its caller has gone too.
        reply.delivery_mode = crate::message::DeliveryMode::Transient;
        if reply.traceparent.is_none() {
            reply.traceparent = d.message.traceparent().map(str::to_string);
        }
        let deadline = d.message.deadline();
        let exchange = self.route.names.replies_exchange();
        let mut held: Option<hold::HoldGuard> = None;
        let mut attempt = 0u32;
        loop {
            attempt = attempt.saturating_add(1);
            if let Some(t) = deadline {
                match t.duration_since(SystemTime::now()) {
                    // It expires in the reply queue when its caller stops waiting.
                    Ok(left) if left >= Duration::from_millis(1) => {
                        reply.expiration = Some(Duration::from_millis(left.as_millis() as u64))
                    }
                    _ => {
                        tracing::debug!(reply_to = to, "request past its deadline: reply dropped");
                        m.request(RequestOutcome::ReplyDropped);
                        return true;
                    }
                }
            }
            let sent = tokio::select! {
                _ = halt.cancelled(), if held.is_some() => return false,
                r = self.republish(&exchange, to, &reply) => r,
            };
            let reason = match sent {
                Ok(()) => return true,
                // No reply queue (or not even the replies exchange: no requester ever
                // declared it): whoever asked is gone.
                Err(Error::Unroutable { .. } | Error::NotFound { .. }) => {
                    tracing::debug!(
                        reply_to = to,
                        "the requester's reply queue is gone: reply dropped"
                    );
                    m.request(RequestOutcome::ReplyDropped);
                    return true;
                }
                Err(Error::Closed) => return false,
                Err(e) => format!("reply to {to}: {e}"),
            };
            match &held {
                None => held = Some(self.route.holds.hold(&self.queue, reason)),
                Some(h) => h.update(reason),
            }
            let wait = crate::backoff::jittered(HOLD_BACKOFF_BASE, HOLD_BACKOFF_MAX, attempt);
            tokio::select! {
                _ = halt.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One confirmed publish of a copy, counted like any publish.
    async fn republish(&self, exchange: &str, routing_key: &str, copy: &Message) -> Result<()> {
        self.route
            .publish(Outgoing {
                exchange,
                routing_key,
                mandatory: true,
                message: std::borrow::Cow::Borrowed(copy),
            })
            .await
    }
}

/// First wait before a refused copy is sent again; doubles up to [`HOLD_BACKOFF_MAX`].
const HOLD_BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Longest wait between two attempts to place a held delivery's copy: how long
/// a freed slot may stay unused.
const HOLD_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where a failed delivery's copy goes.
#[derive(Clone, Copy)]
enum Route<'a> {
    /// A retry tier: exchange and queue share the name.
    Retry { tier: &'a str },
    /// The dead-letter exchange, feeding the DLQ.
    DeadLetter { dlx: &'a str, dlq: &'a str },
}

impl Route<'_> {
    fn exchange(&self) -> &str {
        match self {
            Route::Retry { tier } => tier,
            Route::DeadLetter { dlx, .. } => dlx,
        }
    }

    /// Why the copy was not placed, as an operator reads it on `/health`.
    fn why(&self, e: &Error) -> String {
        let what = match self {
            Route::Retry { tier } => format!("retry queue {tier}"),
            Route::DeadLetter { dlq, .. } => format!("dead-letter queue {dlq}"),
        };
        match e {
            // A reject-publish queue at its max-length nacks: that is "full".
            Error::PublishNacked { .. } => format!("{what} full (the broker refused the copy)"),
            Error::Unroutable { exchange, .. } => {
                format!(
                    "{what}: exchange {exchange} routes to no queue (is the topology declared?)"
                )
            }
            Error::PublishTimeout { timeout, .. } => format!(
                "{what}: no confirm within {timeout:?} (broker blocked by an alarm, or unreachable)"
            ),
            other => format!("{what}: {other}"),
        }
    }
}

/// One queue's counters, taken from the metric families once per subscription.
struct QueueCounters {
    consumed: Counter,
    acked: Counter,
    nacked: Counter,
    retried: Counter,
    dead_lettered: Counter,
    duplicates_skipped: Counter,
}

impl QueueCounters {
    fn new(m: &crate::metrics::Metrics, queue: &str) -> Self {
        let label = QueueLabel {
            queue: queue.to_string(),
        };
        let get = |f: &prometheus_client::metrics::family::Family<QueueLabel, Counter>| {
            f.get_or_create(&label).clone()
        };
        QueueCounters {
            consumed: get(&m.consumed),
            acked: get(&m.acked),
            nacked: get(&m.nacked),
            retried: get(&m.retried),
            dead_lettered: get(&m.dead_lettered),
            duplicates_skipped: get(&m.duplicates_skipped),
        }
    }
}

/// The tokens a message says it will cost ([`header::TOKEN_ESTIMATE`]); 0 if
/// it does not say (the handler's report is then owed after it ran).
fn token_estimate(m: &Message) -> u64 {
    match m.headers.get(header::TOKEN_ESTIMATE) {
        Some(HeaderValue::Int(i)) => (*i).max(0) as u64,
        Some(HeaderValue::String(s)) => s.trim().parse().unwrap_or(0),
        _ => 0,
    }
}

/// A copy of the delivered message with the failure headers updated.
fn failed_copy(d: &Delivery, reason: &str) -> Message {
    let mut copy = Message::clone(&d.message);
    let now = now_unix_millis();
    let h = &mut copy.headers;
    h.entry(header::ORIGIN_QUEUE.into())
        .or_insert_with(|| d.queue.clone().into());
    h.entry(header::ORIGIN_EXCHANGE.into())
        .or_insert_with(|| d.exchange.clone().into());
    h.entry(header::ORIGIN_ROUTING_KEY.into())
        .or_insert_with(|| d.routing_key.clone().into());
    h.entry(header::FIRST_FAILURE.into())
        .or_insert(HeaderValue::Int(now));
    h.insert(header::LAST_FAILURE.into(), HeaderValue::Int(now));
    h.insert(header::LAST_ERROR.into(), truncate(reason, 1024).into());
    copy
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
