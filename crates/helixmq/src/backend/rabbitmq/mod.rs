//! The RabbitMQ backend, on lapin.
//!
//! # Layout
//! - `connection`: the manager task that owns the connection, reconnects with
//!   backoff, redeclares the topology and publishes each new generation.
//! - `publisher`: a pool of confirm-mode channels; every publish awaits its
//!   own confirm and is re-sent across connection losses until its timeout.
//! - `confirms`: one driver per publisher channel that sends its publishes
//!   and matches each confirm and `basic.return` to its own publish.
//! - `consumer`: one channel per consumer, recovered inside `next()`.
//! - `acks`: settling deliveries; a consumer's acks coalesced into
//!   multiple-acks where that is safe.
//! - `errors`: lapin errors → [`Error`] variants; transient vs final.
//! - `tls`: the rustls client configuration.
//!
//! Connection states: `Connected`, `Blocked` (connection.blocked from a memory
//! or disk alarm: publishes wait for their confirms up to their timeout,
//! consumers go on), `Disconnected` (reconnecting), `Closed`.

mod acks;
mod confirms;
mod connection;
mod consumer;
mod errors;
mod publisher;
mod tls;
mod version;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{FieldTable, ShortString};
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use crate::backend::{
    Backend, BackendKind, ConnectionState, Delivery, DeliveryStream, Outgoing, QueueStats,
};
use crate::config::RabbitMqConfig;
use crate::error::{Error, Result};
use crate::message::amqp::from_properties;
use crate::metrics::Metrics;
use crate::topology::{ServerVersion, Topology};
use connection::{Declared, Link, LinkState, Shared};
use errors::Target;
use publisher::{pause, Publisher};

/// A channel kept for one purpose (topology and admin calls, or `basic.get`),
/// replaced when it dies or belongs to an older connection.
type Slot = tokio::sync::Mutex<Option<(lapin::Channel, u64)>>;

/// helixmq over a RabbitMQ server or cluster.
pub struct RabbitBackend {
    shared: Arc<Shared>,
    publisher: Publisher,
    /// Declarations, stats, purge, delete: a 404/406 here closes only this channel.
    admin: Slot,
    /// `basic.get`: its own channel so that an admin error never requeues a
    /// message someone is holding unacked.
    getter: Slot,
    /// The connection manager task; awaited by `close`.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for RabbitBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitBackend")
            .field("connection_name", &self.shared.connection_name)
            .finish()
    }
}

impl RabbitBackend {
    /// Connect as configured (hosts tried in turn) and start the connection
    /// manager. Wrong credentials, an unknown vhost or nothing listening fail
    /// here at once, without a retry loop.
    pub async fn connect(cfg: &RabbitMqConfig, metrics: Metrics) -> Result<Self> {
        let name = format!("helixmq pid {}", std::process::id());
        Self::connect_named(cfg, metrics, &name).await
    }

    /// [`RabbitBackend::connect`] with a client-provided connection name, as
    /// `rabbitmqctl list_connections client_properties` shows it (to find or
    /// close this client's connections).
    pub async fn connect_named(
        cfg: &RabbitMqConfig,
        metrics: Metrics,
        connection_name: &str,
    ) -> Result<Self> {
        let opened = match connection::open(cfg, connection_name).await {
            Ok(o) => {
                metrics.connection_successes.inc();
                o
            }
            Err(e) => {
                metrics.connection_failures.inc();
                return Err(e);
            }
        };
        let link = Arc::new(Link {
            conn: opened.conn,
            generation: 1,
            endpoint: opened.endpoint,
            server_version: opened.server_version,
        });
        let (link_tx, _) = watch::channel(LinkState::Up(link.clone()));
        let (state_tx, _) = watch::channel(ConnectionState::Connected);
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            metrics,
            connection_name: connection_name.to_string(),
            link: link_tx,
            state: state_tx,
            declared: Mutex::new(Declared::default()),
            suspect: tokio::sync::Notify::new(),
            shutdown: CancellationToken::new(),
            closing: Default::default(),
        });
        let task = tokio::spawn(connection::run(shared.clone(), link));
        Ok(RabbitBackend {
            publisher: Publisher::new(shared.clone()),
            shared,
            admin: Slot::default(),
            getter: Slot::default(),
            task: Mutex::new(Some(task)),
        })
    }

    /// The connection name given to RabbitMQ.
    pub fn connection_name(&self) -> &str {
        &self.shared.connection_name
    }

    /// The node the current connection goes to (`host:port`), or `None` while
    /// disconnected: on a cluster, which node this client is on.
    pub fn current_endpoint(&self) -> Option<String> {
        match &*self.shared.link.borrow() {
            LinkState::Up(l) => Some(l.endpoint.clone()),
            _ => None,
        }
    }

    /// The RabbitMQ version of the node currently connected to (the `version`
    /// server property), if known.
    pub fn server_version(&self) -> Option<ServerVersion> {
        match &*self.shared.link.borrow() {
            LinkState::Up(l) => l.server_version.clone(),
            _ => None,
        }
    }

    async fn slot_channel(&self, slot: &Slot) -> Result<lapin::Channel> {
        loop {
            let link = self.shared.live().await?;
            let mut s = slot.lock().await;
            if let Some((c, g)) = s.as_ref() {
                if *g == link.generation && c.status().connected() {
                    return Ok(c.clone());
                }
            }
            match link.conn.create_channel().await {
                Ok(c) => {
                    *s = Some((c.clone(), link.generation));
                    return Ok(c);
                }
                Err(e) if errors::is_transient(&e) => {
                    drop(s);
                    self.shared.report_failure();
                    pause().await;
                }
                Err(e) => {
                    return Err(Error::Amqp {
                        context: "open a channel".into(),
                        source: errors::boxed(e),
                    })
                }
            }
        }
    }

    /// Run `op` on a channel of `slot`, again on a fresh channel/connection when
    /// it fails for a transient reason, until the publish timeout; final broker
    /// refusals are mapped by `map`.
    async fn retrying<T, F, Fut>(
        &self,
        slot: &Slot,
        op: F,
        map: impl Fn(lapin::Error) -> Error,
    ) -> Result<T>
    where
        F: Fn(lapin::Channel) -> Fut,
        Fut: std::future::Future<Output = lapin::Result<T>>,
    {
        let deadline = Instant::now() + self.shared.cfg.publish_timeout;
        loop {
            let ch = match timeout_at(deadline, self.slot_channel(slot)).await {
                Err(_) => return Err(Error::NotConnected),
                Ok(r) => r?,
            };
            match timeout_at(deadline, op(ch)).await {
                Err(_) => return Err(Error::NotConnected),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if errors::is_transient(&e) => {
                    tracing::debug!(error = %e, "admin operation interrupted; retrying");
                    self.shared.report_failure();
                    pause().await;
                }
                Ok(Err(e)) => return Err(map(e)),
            }
        }
    }

    fn user(&self) -> &str {
        &self.shared.cfg.username
    }
}

impl Drop for RabbitBackend {
    fn drop(&mut self) {
        // The manager task closes the connection and ends.
        self.shared.shutdown.cancel();
    }
}

fn check_name(kind: &str, n: &str) -> Result<ShortString> {
    ShortString::try_new(n)
        .map_err(|_| Error::invalid_config(format!("{kind} name '{n}' is longer than 255 bytes")))
}

#[async_trait]
impl Backend for RabbitBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::RabbitMq
    }

    async fn declare(&self, t: &Topology) -> Result<()> {
        // Refuse what this server version would reject (e.g. priorities on a
        // quorum queue before 4.0) before declaring anything.
        t.validate(self.server_version().as_ref())?;
        for e in &t.exchanges {
            check_name("exchange", &e.name)?;
        }
        for q in &t.queues {
            check_name("queue", &q.name)?;
        }
        for b in &t.bindings {
            check_name("routing key", &b.routing_key)?;
        }
        let user = self.user().to_string();
        for e in &t.exchanges {
            self.retrying(
                &self.admin,
                |ch| async move { connection::declare_exchange_raw(&ch, e).await },
                |err| errors::op_error(err, "declare", Target::exchange(&e.name), &user),
            )
            .await?;
            self.shared.declared.lock().unwrap().remember_exchange(e);
        }
        for q in &t.queues {
            self.retrying(
                &self.admin,
                |ch| async move { connection::declare_queue_raw(&ch, q).await },
                |err| errors::op_error(err, "declare", Target::queue(&q.name), &user),
            )
            .await?;
            self.shared.declared.lock().unwrap().remember_queue(q);
        }
        for b in &t.bindings {
            self.retrying(
                &self.admin,
                |ch| async move { connection::bind_raw(&ch, b).await },
                |err| {
                    errors::op_error(
                        err,
                        &format!("bind to exchange '{}'", b.exchange),
                        Target::queue(&b.queue),
                        &user,
                    )
                },
            )
            .await?;
            self.shared.declared.lock().unwrap().remember_binding(b);
        }
        Ok(())
    }

    async fn publish(&self, out: Outgoing<'_>, timeout: Duration) -> Result<()> {
        self.publisher.publish(&out, timeout).await
    }

    async fn publish_batch(&self, outs: &[Outgoing<'_>], timeout: Duration) -> Vec<Result<()>> {
        self.publisher.publish_batch(outs, timeout).await
    }

    async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<Box<dyn DeliveryStream>> {
        let s = consumer::RabbitStream::start(self.shared.clone(), queue, prefetch, consumer_tag)
            .await?;
        Ok(Box::new(s))
    }

    async fn get(&self, queue: &str) -> Result<Option<Delivery>> {
        let q = check_name("queue", queue)?;
        let user = self.user().to_string();
        let got = self
            .retrying(
                &self.getter,
                |ch| {
                    let q = q.clone();
                    async move { ch.basic_get(q, BasicGetOptions { no_ack: false }).await }
                },
                |e| errors::op_error(e, "get from", Target::queue(queue), &user),
            )
            .await?;
        Ok(got.map(|g| {
            let d = g.delivery;
            let message = from_properties(&d.properties, d.data);
            Delivery {
                acker: Box::new(acks::SingleAcker {
                    acker: d.acker,
                    id: message.id.clone(),
                    queue: queue.to_string(),
                }),
                message: Arc::new(message),
                exchange: d.exchange.to_string(),
                routing_key: d.routing_key.to_string(),
                queue: queue.to_string(),
                redelivered: d.redelivered,
            }
        }))
    }

    async fn queue_stats(&self, queue: &str) -> Result<QueueStats> {
        let q = check_name("queue", queue)?;
        let user = self.user().to_string();
        let info = self
            .retrying(
                &self.admin,
                |ch| {
                    let q = q.clone();
                    async move {
                        ch.queue_declare(
                            q,
                            QueueDeclareOptions {
                                passive: true,
                                ..Default::default()
                            },
                            FieldTable::default(),
                        )
                        .await
                    }
                },
                |e| errors::op_error(e, "inspect", Target::queue(queue), &user),
            )
            .await?;
        Ok(QueueStats {
            messages: info.message_count() as u64,
            consumers: info.consumer_count(),
        })
    }

    async fn purge(&self, queue: &str) -> Result<u64> {
        let q = check_name("queue", queue)?;
        let user = self.user().to_string();
        let n = self
            .retrying(
                &self.admin,
                |ch| {
                    let q = q.clone();
                    async move { ch.queue_purge(q, QueuePurgeOptions::default()).await }
                },
                |e| errors::op_error(e, "purge", Target::queue(queue), &user),
            )
            .await?;
        Ok(n as u64)
    }

    async fn delete_queue(&self, queue: &str) -> Result<()> {
        let q = check_name("queue", queue)?;
        let user = self.user().to_string();
        self.shared.declared.lock().unwrap().forget_queue(queue);
        self.retrying(
            &self.admin,
            |ch| {
                let q = q.clone();
                async move { ch.queue_delete(q, QueueDeleteOptions::default()).await }
            },
            |e| errors::op_error(e, "delete", Target::queue(queue), &user),
        )
        .await?;
        Ok(())
    }

    async fn delete_exchange(&self, exchange: &str) -> Result<()> {
        let x = check_name("exchange", exchange)?;
        let user = self.user().to_string();
        self.shared
            .declared
            .lock()
            .unwrap()
            .forget_exchange(exchange);
        self.retrying(
            &self.admin,
            |ch| {
                let x = x.clone();
                async move {
                    ch.exchange_delete(x, ExchangeDeleteOptions::default())
                        .await
                }
            },
            |e| errors::op_error(e, "delete", Target::exchange(exchange), &user),
        )
        .await
    }

    fn state(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    async fn close(&self) -> Result<()> {
        self.publisher.drain(self.shared.cfg.publish_timeout).await;
        self.shared.shutdown.cancel();
        let task = self.task.lock().unwrap().take();
        if let Some(t) = task {
            let _ = t.await;
        }
        Ok(())
    }
}
