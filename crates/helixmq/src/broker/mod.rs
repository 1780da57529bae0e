//! The [`Broker`]: the API services use — connect, publish, subscribe, close.
//!
//! A `Broker` is a cheap handle (`Clone`) over one [`Backend`]. It owns the
//! topology it declared, so it can refuse a priority a queue would ignore and
//! route retries back to the queue a message came from. [`request`]:
//! request-reply ([`Broker::request`]) on a reply queue of its own.

mod builder;
pub(crate) mod options;
pub(crate) use options as options_resolved;
pub mod request;
mod route;

pub use builder::BrokerBuilder;
pub use options::{DedupOptions, PublishOptions, RetryPolicy, SubscribeOptions};
pub(crate) use route::RouteHandle;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tracing::Instrument;

use crate::backend::{Backend, BackendKind, ConnectionState, Outgoing};
use crate::config::Config;
use crate::consumer::{self, Handler, Subscription};
use crate::error::{Error, Result};
use crate::message::Message;
use crate::metrics::Metrics;
use crate::topology::{Names, QueueType, Topology};

/// A handle to a broker (embedded or RabbitMQ).
///
/// Made by [`Broker::connect`] (RabbitMQ), [`Broker::embedded`] (in process),
/// or [`Broker::builder`] for anything optional: metrics, connection name, a
/// backend of your own.
#[derive(Clone)]
pub struct Broker {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// The transport; everything else here is shared policy.
    backend: Arc<dyn Backend>,
    /// Loaded configuration (defaults for publish/subscribe options).
    config: Config,
    /// Names under the configured prefix.
    names: Names,
    /// What has been declared, for priority checks and retry tiers.
    topology: Mutex<Topology>,
    /// Counters; registered by the caller or private.
    metrics: Metrics,
    /// Deliveries held by this broker's subscriptions (see `consumer::hold`).
    pub(crate) holds: Arc<crate::consumer::Holds>,
    /// Request-reply: this handle's reply queue and the callers waiting on it.
    requester: request::Requester,
    /// Whether the task mirroring the connection state into the gauge runs:
    /// a broker made outside a Tokio runtime starts it on first use inside one.
    mirroring: AtomicBool,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("backend", &self.inner.backend.kind())
            .field("prefix", &self.inner.names.prefix())
            .finish()
    }
}

impl Broker {
    /// Everything optional about making a broker: metrics, connection name,
    /// a backend of your own. [`Broker::connect`] and [`Broker::embedded`]
    /// are its one-line shortcuts.
    pub fn builder(config: Config) -> BrokerBuilder {
        BrokerBuilder::new(config)
    }

    /// An embedded (in-process) broker with `config`'s policies. Nothing is
    /// declared yet. Short for `Broker::builder(config).embedded()`; it may be
    /// made outside a Tokio runtime and used inside one later.
    ///
    /// ```
    /// # tokio_test_block(async {
    /// use helixmq::{Broker, Config, Message, Outcome, SubscribeOptions, Topology};
    /// let broker = Broker::embedded(Config::default());
    /// broker.declare(&Topology::default()).await?;
    /// broker.publish("helixagent.tasks", "background", Message::new("hello")).await?;
    /// let sub = broker.subscribe("helixagent.tasks.background", |m: helixmq::Message, _ctx| async move {
    ///     assert_eq!(&m.payload[..], b"hello");
    ///     Ok(Outcome::Ack)
    /// }, SubscribeOptions::default()).await?;
    /// sub.shutdown(std::time::Duration::from_secs(1)).await;
    /// # Ok::<(), helixmq::Error>(()) });
    /// # fn tokio_test_block<F: std::future::Future<Output = Result<(), helixmq::Error>>>(f: F) {
    /// #     tokio::runtime::Runtime::new().unwrap().block_on(f).unwrap() }
    /// ```
    pub fn embedded(config: Config) -> Broker {
        Broker::builder(config).embedded()
    }

    /// Connect to RabbitMQ as configured and declare nothing yet. Short for
    /// `Broker::builder(config).connect().await`.
    pub async fn connect(config: Config) -> Result<Broker> {
        Broker::builder(config).connect().await
    }

    // Kept, hidden, only while `helixmq demo` (being reorganised on another
    // branch) still calls them; they go once it uses the builder.
    /// A broker over `backend`, whatever made it (see [`BrokerBuilder`]).
    fn assemble(backend: Arc<dyn Backend>, config: Config, metrics: Metrics) -> Broker {
        let names = Names::new(config.helixmq.prefix.clone());
        let topology = Topology::system(&names);
        let requester = request::Requester::new(&names);
        metrics
            .connection_state
            .set(backend.state().borrow().gauge());
        let broker = Broker {
            inner: Arc::new(Inner {
                backend,
                config,
                names,
                topology: Mutex::new(topology),
                holds: Arc::new(crate::consumer::Holds::new(
                    metrics.reroutes_blocked.clone(),
                )),
                metrics,
                requester,
                mirroring: AtomicBool::new(false),
            }),
        };
        broker.start_mirroring();
        broker
    }

    /// Mirror the connection state into the gauge, once, if a Tokio runtime is
    /// at hand (else on a later call: every async method calls this). The task
    /// ends when the backend drops its sender.
    fn start_mirroring(&self) {
        if self.inner.mirroring.load(Ordering::Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.inner.mirroring.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut state = self.inner.backend.state();
        let gauge = self.inner.metrics.connection_state.clone();
        gauge.set(state.borrow_and_update().gauge());
        rt.spawn(async move {
            while state.changed().await.is_ok() {
                let s = *state.borrow();
                gauge.set(s.gauge());
            }
        });
    }

    /// The topology declared so far. A panic while it was held (none is
    /// expected: merging is plain pushes) leaves it usable, not poisoned.
    fn declared(&self) -> std::sync::MutexGuard<'_, Topology> {
        self.inner
            .topology
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What a subscription may use of this broker.
    pub(crate) fn route_handle(&self) -> RouteHandle {
        RouteHandle::new(
            self.inner.backend.clone(),
            self.inner.names.clone(),
            self.inner.metrics.clone(),
            self.publish_timeout(),
            self.inner.holds.clone(),
        )
    }

    /// Which backend this broker runs on.
    pub fn backend_kind(&self) -> BackendKind {
        self.inner.backend.kind()
    }

    /// The backend, for tools that need its lower-level operations (DLQ, stats).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The names under the configured prefix.
    pub fn names(&self) -> &Names {
        &self.inner.names
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The metrics this broker counts into.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Watch the connection state.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.backend.state()
    }

    /// Whether the broker is connected now.
    pub fn is_connected(&self) -> bool {
        matches!(
            *self.inner.backend.state().borrow(),
            ConnectionState::Connected | ConnectionState::Blocked
        )
    }

    /// Declare `topology` (idempotent) and remember it. Once this broker has
    /// scheduled delivery (declared, or set up by a scheduled publish), the
    /// due exchange mirrors `topology`'s bindings too, so scheduled messages
    /// reach its queues.
    pub async fn declare(&self, topology: &Topology) -> Result<()> {
        self.start_mirroring();
        let mirrors = (!topology.has_scheduling() && self.declared().has_scheduling()).then(|| {
            // Exchange kinds from both: a binding may name an exchange declared before.
            let mut view = self.topology();
            merge(&mut view, topology);
            view.due_mirrors(&topology.bindings)
        });
        self.inner.backend.declare(topology).await?;
        if let Some(m) = &mirrors {
            self.inner.backend.declare(m).await?;
        }
        self.inner.metrics.touch(topology);
        let mut t = self.declared();
        merge(&mut t, topology);
        if let Some(m) = &mirrors {
            merge(&mut t, m);
        }
        Ok(())
    }

    /// A snapshot of the topology declared through this handle.
    pub fn topology(&self) -> Topology {
        self.declared().clone()
    }

    /// Publish with default options (mandatory, the configured timeout).
    pub async fn publish(&self, exchange: &str, routing_key: &str, message: Message) -> Result<()> {
        self.publish_with(exchange, routing_key, message, &PublishOptions::default())
            .await
    }

    /// Publish; returns Ok only once the broker confirmed the message.
    pub async fn publish_with(
        &self,
        exchange: &str,
        routing_key: &str,
        mut message: Message,
        opts: &PublishOptions,
    ) -> Result<()> {
        self.start_mirroring();
        if let Some(p) = opts.priority {
            message.priority = Some(p);
        }
        self.check_priority(exchange, routing_key, &message)?;
        let timeout = opts
            .timeout
            .unwrap_or(self.inner.config.rabbitmq.publish_timeout);
        message.ensure_traceparent();
        let span = tracing::debug_span!(
            "publish",
            message_id = %message.id,
            correlation_id = message.correlation_id.as_deref().unwrap_or(""),
            traceparent = message.traceparent().unwrap_or(""),
            exchange,
            routing_key
        );
        let started = Instant::now();
        self.inner.metrics.confirms_pending.inc();
        let res = self
            .inner
            .backend
            .publish(
                Outgoing {
                    exchange,
                    routing_key,
                    mandatory: opts.mandatory,
                    message: std::borrow::Cow::Owned(message),
                },
                timeout,
            )
            .instrument(span)
            .await;
        self.inner.metrics.confirms_pending.dec();
        self.inner.metrics.count_publish(exchange, &res, started);
        res
    }

    /// Publish `message` so that it reaches the queues `exchange` routes
    /// `routing_key` to after `delay` (1 s to 30 days, rounded up to 250 ms).
    /// Returns `Ok` once the broker confirmed the scheduled message (it is then
    /// durable in a delay level); see [`Broker::publish_delayed_with`].
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use std::time::Duration;
    /// use helixmq::{Broker, Config, Message, Topology};
    /// let broker = Broker::embedded(Config::default());
    /// broker.declare(&Topology::default()).await?;
    /// let q = broker.names().task_queue("background");
    /// broker
    ///     .publish_delayed("helixagent.tasks", "background", Message::new("later"), Duration::from_secs(1))
    ///     .await?;
    /// assert!(broker.backend().get(&q).await?.is_none(), "not before its time");
    /// tokio::time::sleep(Duration::from_millis(1100)).await;
    /// assert!(broker.backend().get(&q).await?.is_some());
    /// assert!(broker.publish_delayed("helixagent.tasks", "background", Message::new("x"),
    ///     Duration::from_millis(500)).await.is_err(), "under 1 s is refused");
    /// # Ok::<(), helixmq::Error>(()) }).unwrap();
    /// ```
    pub async fn publish_delayed(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        delay: Duration,
    ) -> Result<()> {
        self.publish_delayed_with(
            exchange,
            routing_key,
            message,
            delay,
            &PublishOptions::default(),
        )
        .await
    }

    /// [`Broker::publish_delayed`] for a point in time: the delay is `at`
    /// minus now, refused (like any delay) outside 1 s to 30 days, so a time
    /// in the past is an error, never an immediate publish. The delay is taken
    /// again after a first use declared the delay topology (a time by then
    /// less than 1 s away is kept 1 s).
    pub async fn publish_at(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        at: SystemTime,
    ) -> Result<()> {
        self.publish_at_with(
            exchange,
            routing_key,
            message,
            at,
            &PublishOptions::default(),
        )
        .await
    }

    /// [`Broker::publish_at`] with options (timeout, priority; a scheduled
    /// publish is always mandatory).
    pub async fn publish_at_with(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        at: SystemTime,
        opts: &PublishOptions,
    ) -> Result<()> {
        self.schedule(exchange, routing_key, message, Due::At(at), opts)
            .await
    }

    /// Schedule a publish (see [`crate::topology::schedule`] for the route).
    /// The message waits in durable TTL queues (classic or quorum, as the
    /// topology) and is dead-lettered, at its time, to the queues `exchange`
    /// routes `routing_key` to then, through the due exchange's mirror of the
    /// bindings. The destination must have been declared through this broker
    /// ([`Broker::declare`]), so that its bindings are mirrored. Refused: a
    /// delay outside 1 s to 30 days ([`Error::InvalidDelay`]), a message with
    /// an `expiration` (it would expire in a delay level and shorten the
    /// delay), an exchange this broker did not declare ([`Error::NotFound`]),
    /// and a routing key it routes nowhere ([`Error::Unroutable`]). The message's
    /// `x-death` history is dropped: RabbitMQ would take a second pass through
    /// a queue it names for a dead-letter cycle and drop the message. The delay
    /// topology is declared on first use if this broker has not declared it.
    pub async fn publish_delayed_with(
        &self,
        exchange: &str,
        routing_key: &str,
        message: Message,
        delay: Duration,
        opts: &PublishOptions,
    ) -> Result<()> {
        self.schedule(exchange, routing_key, message, Due::In(delay), opts)
            .await
    }

    /// Schedule `message` back into work queue `queue` after `delay`,
    /// through the requeue exchange (as a retry returns): what a delayed DLQ
    /// replay uses. [`Broker::publish_delayed_with`] to the requeue exchange
    /// with the queue's name as key: the queue must have been declared through
    /// this broker as a work queue ([`Topology::add_work_queue`]; else
    /// [`Error::Unroutable`], and nothing is scheduled). Declaring its binding
    /// here instead would make every reconnect redeclare a binding to a queue
    /// this broker does not own (and fail once someone deletes that queue).
    pub async fn requeue_delayed(
        &self,
        queue: &str,
        message: Message,
        delay: Duration,
        opts: &PublishOptions,
    ) -> Result<()> {
        let requeue = self.inner.names.requeue_exchange();
        self.publish_delayed_with(&requeue, queue, message, delay, opts)
            .await
    }

    /// A scheduled publish: checked, declared on first use, then published
    /// to the top delay level.
    async fn schedule(
        &self,
        exchange: &str,
        routing_key: &str,
        mut message: Message,
        due: Due,
        opts: &PublishOptions,
    ) -> Result<()> {
        use crate::topology::schedule::{Walk, MIN_DELAY};
        self.start_mirroring();
        // A point in time less than the shortest delay ahead goes at the
        // shortest delay (at most that late); a delay is taken as given.
        let walk = match due {
            Due::In(d) => Walk::new(d)?,
            Due::At(_) => Walk::new(due.delay()?.max(MIN_DELAY))?,
        };
        if let Some(e) = message.expiration {
            return Err(Error::InvalidMessage(format!(
                "message {} has an expiration ({}): a scheduled message cannot carry one \
                 (it would expire early in a delay level); drop the expiration",
                message.id,
                humantime::format_duration(e)
            )));
        }
        walk.routing_key(exchange, routing_key)?;
        if let Some(p) = opts.priority {
            message.priority = Some(p);
        }
        self.check_priority(exchange, routing_key, &message)?;
        {
            // The due exchange can only mirror bindings this broker knows: a
            // destination it never declared could be dropped at its time.
            let t = self.declared();
            if t.exchange(exchange).is_none() {
                return Err(Error::NotFound {
                    kind: "exchange",
                    name: exchange.to_string(),
                });
            }
            if t.route(exchange, routing_key).is_empty() {
                return Err(Error::Unroutable {
                    message_id: message.id.clone(),
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                });
            }
        }
        for h in [
            crate::backend::memory::dead_letter::X_DEATH,
            crate::backend::memory::dead_letter::X_FIRST_DEATH_QUEUE,
            crate::backend::memory::dead_letter::X_FIRST_DEATH_REASON,
            crate::backend::memory::dead_letter::X_FIRST_DEATH_EXCHANGE,
        ] {
            message.headers.remove(h);
        }
        self.ensure_scheduling().await?;
        // The broker starts the clock when it takes the message: after a
        // first use's declare, a point in time is that much nearer.
        let walk = match due {
            Due::In(_) => walk,
            Due::At(_) => Walk::new(due.delay().unwrap_or(MIN_DELAY).max(MIN_DELAY))?,
        };
        let key = walk.routing_key(exchange, routing_key)?;
        let due_ms = (SystemTime::now() + walk.total())
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        message
            .headers
            .insert(crate::message::header::DUE_AT.into(), due_ms.into());
        let entry = self.declared().schedule_entry();
        let opts = PublishOptions {
            mandatory: true,
            timeout: opts.timeout,
            priority: None,
        };
        self.publish_with(&entry, &key, message, &opts).await?;
        self.inner
            .metrics
            .scheduled
            .get_or_create(&crate::metrics::ExchangeLabel {
                exchange: exchange.to_string(),
            })
            .inc();
        Ok(())
    }

    /// Declare scheduled delivery unless this broker has it: the delay levels
    /// (queue type as the declared DLQ or the configuration) and the due
    /// exchange mirroring every binding declared so far.
    async fn ensure_scheduling(&self) -> Result<()> {
        let declared = self.topology();
        if declared.has_scheduling() {
            return Ok(());
        }
        let mut t = Topology {
            exchanges: Vec::new(),
            queues: Vec::new(),
            bindings: Vec::new(),
            ..declared.clone()
        };
        t.add_scheduling();
        t.bindings.extend(
            declared
                .bindings
                .iter()
                .filter_map(|b| declared.due_mirror(b)),
        );
        let quorum = self.inner.config.helixmq.queue_type == QueueType::Quorum
            || declared
                .queue(&self.inner.names.dlq())
                .is_some_and(|q| q.queue_type == QueueType::Quorum);
        if quorum {
            t = t.with_quorum_queues();
        }
        self.declare(&t).await
    }

    /// Publish many messages pipelined; one result per message, in order.
    pub async fn publish_batch(
        &self,
        exchange: &str,
        routing_key: &str,
        messages: &[Message],
        opts: &PublishOptions,
    ) -> Vec<Result<()>> {
        self.start_mirroring();
        let timeout = opts
            .timeout
            .unwrap_or(self.inner.config.rabbitmq.publish_timeout);
        let mut prepared: Vec<Message> = messages.to_vec();
        let mut checks = Vec::with_capacity(prepared.len());
        for m in &mut prepared {
            m.ensure_traceparent();
            if let Some(p) = opts.priority {
                m.priority = Some(p);
            }
            checks.push(self.check_priority(exchange, routing_key, m));
        }
        let outs: Vec<Outgoing<'_>> = prepared
            .iter()
            .zip(&checks)
            .filter(|(_, c)| c.is_ok())
            .map(|(m, _)| Outgoing {
                exchange,
                routing_key,
                mandatory: opts.mandatory,
                message: std::borrow::Cow::Borrowed(m),
            })
            .collect();
        let started = Instant::now();
        self.inner
            .metrics
            .confirms_pending
            .inc_by(outs.len() as i64);
        let mut sent = self
            .inner
            .backend
            .publish_batch(&outs, timeout)
            .await
            .into_iter();
        self.inner
            .metrics
            .confirms_pending
            .dec_by(outs.len() as i64);
        checks
            .into_iter()
            .map(|c| match c {
                Err(e) => Err(e),
                Ok(()) => {
                    let r = sent.next().unwrap_or(Err(Error::Closed));
                    self.inner.metrics.count_publish(exchange, &r, started);
                    r
                }
            })
            .collect()
    }

    /// Refuse a priority above the maximum of a queue the message would reach.
    fn check_priority(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<()> {
        let Some(p) = message.priority else {
            return Ok(());
        };
        let t = self.declared();
        for q in t.route(exchange, routing_key) {
            if let Some(max) = q.max_priority {
                if p.value() > max {
                    return Err(Error::InvalidPriority {
                        priority: p.value(),
                        reason: format!("queue '{}' accepts priorities 0 to {max}", q.name),
                    });
                }
            }
        }
        Ok(())
    }

    /// Consume `queue` with `handler` under `opts`'s retry and concurrency policy.
    /// The retry tiers the policy needs are declared first.
    pub async fn subscribe<H: Handler>(
        &self,
        queue: &str,
        handler: H,
        opts: SubscribeOptions,
    ) -> Result<Subscription> {
        let opts = opts.resolved(&self.inner.config);
        let mut tiers = Topology::system(&self.inner.names);
        for d in &opts.retry.delays {
            tiers.add_retry_tier(*d);
        }
        // Same queue type as the rest: quorum when configured, or when the DLQ
        // was declared quorum (Topology::with_quorum_queues); and a queue already
        // declared keeps its exact definition (redeclaring it otherwise is a 406).
        let declared = self.topology();
        let quorum = self.inner.config.helixmq.queue_type == QueueType::Quorum
            || declared
                .queue(&self.inner.names.dlq())
                .is_some_and(|q| q.queue_type == QueueType::Quorum);
        if quorum {
            tiers = tiers.with_quorum_queues();
        }
        for q in &mut tiers.queues {
            if let Some(d) = declared.queue(&q.name) {
                *q = d.clone();
            }
        }
        self.declare(&tiers).await?;
        let limiter = match &opts.rate_limit {
            Some(spec) => Some(
                crate::ratelimit::Limiter::start(
                    spec.clone(),
                    self.inner.backend.clone(),
                    self.inner.names.clone(),
                    &self.inner.metrics,
                    self.publish_timeout(),
                )
                .await?,
            ),
            None => None,
        };
        consumer::start(
            self.route_handle(),
            queue.to_string(),
            Arc::new(handler),
            opts,
            limiter,
        )
        .await
    }

    /// Close: wait for outstanding confirms, then close channels and connection.
    /// Subscriptions should be shut down first to drain their handlers. A
    /// request still waiting fails with [`Error::Closed`], and this handle's
    /// reply queue (if it made requests) is deleted.
    pub async fn close(&self) -> Result<()> {
        self.start_mirroring();
        self.inner.requester.close(self).await;
        self.inner.backend.close().await
    }

    /// Time to wait for a publish by default.
    pub fn publish_timeout(&self) -> Duration {
        self.inner.config.rabbitmq.publish_timeout
    }
}

/// When a scheduled publish is due.
#[derive(Debug, Clone, Copy)]
enum Due {
    /// After this long.
    In(Duration),
    /// At this time.
    At(SystemTime),
}

impl Due {
    /// The delay from now; a time in the past is refused (one less than
    /// [`MIN_DELAY`] ahead is sent at `MIN_DELAY` by the caller).
    fn delay(self) -> Result<Duration> {
        match self {
            Due::In(d) => Ok(d),
            Due::At(at) => at.duration_since(SystemTime::now()).map_err(|e| {
                let by = Duration::from_secs(e.duration().as_secs().max(1));
                Error::InvalidDelay {
                    delay: format!("in the past by {}", humantime::format_duration(by)),
                    reason: "a scheduled time must be from 1s to 30days from now".into(),
                }
            }),
        }
    }
}

fn merge(into: &mut Topology, from: &Topology) {
    for e in &from.exchanges {
        if into.exchange(&e.name).is_none() {
            into.exchanges.push(e.clone());
        }
    }
    // A queue declared again successfully is what the broker now has (e.g. the
    // seeded classic DLQ replaced by a quorum one): remember that definition.
    for q in &from.queues {
        match into.queues.iter_mut().find(|x| x.name == q.name) {
            Some(x) => *x = q.clone(),
            None => into.queues.push(q.clone()),
        }
    }
    for b in &from.bindings {
        if !into.bindings.contains(b) {
            into.bindings.push(b.clone());
        }
    }
}
