//! The connection manager: one task owns the AMQP connection, notices when it
//! is lost, reconnects with a capped, jittered exponential backoff, redeclares
//! the topology, and announces each new connection (a new *generation*) on a
//! `watch` channel that publishers and consumers await.
//!
//! Why our own manager rather than lapin's auto-recovery: we must redeclare
//! with the exact arguments we were given (never empty ones), count
//! attempts against `max_reconnect_attempts`, try several hosts in turn, and
//! re-send unconfirmed publishes ourselves — and each of those is simpler to
//! prove when one task owns the whole life cycle.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{
    AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo, SASLMechanism,
};
use lapin::{ConnectionProperties, Event};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

use super::errors::{self, Target};
use super::tls;
use super::version;
use crate::backend::ConnectionState;
use crate::config::RabbitMqConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::topology::{ArgValue, Binding, Exchange, ExchangeKind, Queue, ServerVersion};

/// One live connection and the generation it belongs to.
pub(crate) struct Link {
    /// The lapin connection.
    pub conn: lapin::Connection,
    /// Bumped on every (re)connection, so holders of channels from an older
    /// connection know to open new ones.
    pub generation: u64,
    /// The node it is connected to, `host:port` (which one of a cluster).
    pub endpoint: String,
    /// That node's RabbitMQ version, when it could be read (decides what the
    /// topology may use, e.g. priorities on quorum queues from 4.0).
    pub server_version: Option<ServerVersion>,
}

/// A connection just opened, with where it goes.
pub(crate) struct Opened {
    /// The lapin connection.
    pub conn: lapin::Connection,
    /// `host:port` of the node that accepted it.
    pub endpoint: String,
    /// Its version (`version` server property), if readable.
    pub server_version: Option<ServerVersion>,
}

/// What publishers and consumers see of the connection.
#[derive(Clone)]
pub(crate) enum LinkState {
    /// Connected: use this link.
    Up(Arc<Link>),
    /// Lost; the manager is reconnecting.
    Down,
    /// Reconnection gave up after this many attempts, with this last error.
    Exhausted(u32, Arc<str>),
    /// Closed by `close()`.
    Closed,
}

/// The topology declared so far, redeclared in order after every reconnect.
#[derive(Default)]
pub(crate) struct Declared {
    exchanges: Vec<Exchange>,
    queues: Vec<Queue>,
    bindings: Vec<Binding>,
}

impl Declared {
    pub(crate) fn remember_exchange(&mut self, e: &Exchange) {
        self.exchanges.retain(|x| x.name != e.name);
        self.exchanges.push(e.clone());
    }
    pub(crate) fn remember_queue(&mut self, q: &Queue) {
        self.queues.retain(|x| x.name != q.name);
        self.queues.push(q.clone());
    }
    pub(crate) fn remember_binding(&mut self, b: &Binding) {
        if !self.bindings.contains(b) {
            self.bindings.push(b.clone());
        }
    }
    pub(crate) fn forget_queue(&mut self, name: &str) {
        self.queues.retain(|q| q.name != name);
        self.bindings.retain(|b| b.queue != name);
    }
    pub(crate) fn forget_exchange(&mut self, name: &str) {
        self.exchanges.retain(|e| e.name != name);
        self.bindings.retain(|b| b.exchange != name);
    }
}

/// State shared by the manager task, the publisher pool and every consumer.
pub(crate) struct Shared {
    /// Connection settings (hosts, credentials, timeouts).
    pub cfg: RabbitMqConfig,
    /// Connection counters.
    pub metrics: Metrics,
    /// Client-provided connection name (shown by `rabbitmqctl list_connections`).
    pub connection_name: String,
    /// The current link; receivers wait on it for a (new) connection.
    pub link: watch::Sender<LinkState>,
    /// Connected / Blocked / Disconnected / Closed, for callers and the gauge.
    pub state: watch::Sender<ConnectionState>,
    /// What to redeclare after a reconnect.
    pub declared: Mutex<Declared>,
    /// Users that saw a connection-level failure wake the manager with this.
    pub suspect: Notify,
    /// Cancelled by `close()` (or dropping the backend): the manager closes and ends.
    pub shutdown: CancellationToken,
    /// Consumer channels closing (a stream dropped): the connection's close
    /// waits for them, since lapin fails a `channel.close` still unanswered
    /// when the connection closes, and logs that as an ERROR.
    pub closing: Mutex<tokio::task::JoinSet<()>>,
}

impl Shared {
    /// The current live link, waiting while disconnected. Fails once reconnection
    /// gave up or the backend was closed. Callers bound it with their own timeout.
    pub(crate) async fn live(&self) -> Result<Arc<Link>> {
        let mut rx = self.link.subscribe();
        loop {
            let now = rx.borrow_and_update().clone();
            match now {
                LinkState::Up(l) if l.conn.status().connected() => return Ok(l),
                // The manager may not have noticed yet; tell it, then wait for the change.
                LinkState::Up(_) => self.suspect.notify_one(),
                LinkState::Down => {}
                LinkState::Exhausted(attempts, last) => {
                    return Err(Error::ReconnectExhausted {
                        attempts,
                        source: Some(last.to_string().into()),
                    })
                }
                LinkState::Closed => return Err(Error::Closed),
            }
            if rx.changed().await.is_err() {
                return Err(Error::Closed);
            }
        }
    }

    /// A failure that may mean the connection is gone: let the manager check now.
    pub(crate) fn report_failure(&self) {
        self.suspect.notify_one();
    }
}

/// Build the typed AMQP URI for one endpoint: no string escaping involved, so
/// any character in a user name, password or vhost is safe.
fn uri_for(cfg: &RabbitMqConfig, host: &str, port: u16) -> AMQPUri {
    let external = cfg.tls.enabled && !cfg.tls.cert_file.is_empty() && cfg.password.is_empty();
    AMQPUri {
        scheme: if cfg.tls.enabled {
            AMQPScheme::AMQPS
        } else {
            AMQPScheme::AMQP
        },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: cfg.username.clone(),
                password: cfg.password.expose().to_string(),
            },
            host: host.to_string(),
            port,
        },
        vhost: cfg.vhost.clone(),
        query: AMQPQueryString {
            heartbeat: Some(cfg.heartbeat.as_secs().min(u16::MAX as u64) as u16),
            connection_timeout: Some(cfg.connect_timeout.as_millis() as u64),
            auth_mechanism: external.then_some(SASLMechanism::External),
            ..Default::default()
        },
    }
}

/// Connect to the first endpoint that accepts. Access refused and unknown vhost
/// are final at once (every node of a cluster shares users and vhosts). A dead
/// node refuses at once (or times out after connect_timeout) and the next is tried.
pub(crate) async fn open(cfg: &RabbitMqConfig, connection_name: &str) -> Result<Opened> {
    let tls = tls::config(&cfg.tls)?;
    let mut last = None;
    for (host, port) in cfg.endpoints() {
        let props = ConnectionProperties::default()
            .with_connection_name(LongString::from(connection_name.as_bytes()))
            .with_client_property(ShortString::from("product"), LongString::from("helixmq"));
        let uri = uri_for(cfg, &host, port);
        let attempt = tls::connect(uri, props, tls.clone());
        match tokio::time::timeout(cfg.connect_timeout, attempt).await {
            Ok(Ok(conn)) => {
                let limit = cfg.connect_timeout.min(Duration::from_secs(5));
                let server_version = version::server_version(&host, port, &tls, limit).await;
                tracing::info!(
                    host,
                    port,
                    version = server_version.as_ref().map(tracing::field::display),
                    "connected to RabbitMQ"
                );
                return Ok(Opened {
                    conn,
                    endpoint: format!("{host}:{port}"),
                    server_version,
                });
            }
            Ok(Err(e)) => {
                let e = errors::connect_error(e, &host, port, &cfg.username, &cfg.vhost);
                match e {
                    Error::AccessRefused { .. } | Error::VhostNotAllowed { .. } => return Err(e),
                    e => {
                        tracing::debug!(host, port, error = %e, "connect attempt failed");
                        last = Some(e)
                    }
                }
            }
            Err(_) => {
                last = Some(Error::Connect {
                    endpoint: format!("{host}:{port}"),
                    reason: format!(
                        "no AMQP handshake within connect_timeout {:?}",
                        cfg.connect_timeout
                    ),
                    source: None,
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| Error::invalid_config("rabbitmq.host: no endpoint to connect to")))
}

/// The `x-` arguments of a queue as an AMQP table.
pub(crate) fn queue_arguments(q: &Queue) -> FieldTable {
    field_table(q.arguments())
}

fn field_table(args: Vec<(&'static str, ArgValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in args {
        let v = match v {
            ArgValue::Int(i) => AMQPValue::LongLongInt(i),
            ArgValue::Str(s) => AMQPValue::LongString(LongString::from(s.into_bytes())),
            ArgValue::Bool(b) => AMQPValue::Boolean(b),
        };
        t.insert(ShortString::from(k), v);
    }
    t
}

fn lapin_kind(k: ExchangeKind) -> lapin::ExchangeKind {
    match k {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
    }
}

/// Declare an exchange (idempotent). Names were checked (≤ 255 bytes) by `declare`.
pub(crate) async fn declare_exchange_raw(ch: &lapin::Channel, e: &Exchange) -> lapin::Result<()> {
    let opts = ExchangeDeclareOptions {
        durable: e.durable,
        ..Default::default()
    };
    ch.exchange_declare(
        ShortString::from(e.name.as_str()),
        lapin_kind(e.kind),
        opts,
        field_table(e.arguments()),
    )
    .await
}

/// Declare a queue with its arguments (idempotent; 406 when they differ).
pub(crate) async fn declare_queue_raw(ch: &lapin::Channel, q: &Queue) -> lapin::Result<()> {
    let opts = QueueDeclareOptions {
        durable: q.durable,
        ..Default::default()
    };
    ch.queue_declare(ShortString::from(q.name.as_str()), opts, queue_arguments(q))
        .await
        .map(|_| ())
}

/// Bind a queue (idempotent).
pub(crate) async fn bind_raw(ch: &lapin::Channel, b: &Binding) -> lapin::Result<()> {
    ch.queue_bind(
        ShortString::from(b.queue.as_str()),
        ShortString::from(b.exchange.as_str()),
        ShortString::from(b.routing_key.as_str()),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Redeclare everything declared so far on a fresh connection.
async fn redeclare(shared: &Shared, conn: &lapin::Connection) -> Result<()> {
    let (exchanges, queues, bindings) = {
        let d = shared.declared.lock().unwrap();
        (d.exchanges.clone(), d.queues.clone(), d.bindings.clone())
    };
    if exchanges.is_empty() && queues.is_empty() {
        return Ok(());
    }
    let user = &shared.cfg.username;
    let ch = conn.create_channel().await.map_err(|e| Error::Amqp {
        context: "open channel to redeclare".into(),
        source: errors::boxed(e),
    })?;
    for e in &exchanges {
        declare_exchange_raw(&ch, e)
            .await
            .map_err(|err| errors::op_error(err, "redeclare", Target::exchange(&e.name), user))?;
    }
    for q in &queues {
        declare_queue_raw(&ch, q)
            .await
            .map_err(|err| errors::op_error(err, "redeclare", Target::queue(&q.name), user))?;
    }
    for b in &bindings {
        bind_raw(&ch, b)
            .await
            .map_err(|err| errors::op_error(err, "rebind", Target::queue(&b.queue), user))?;
    }
    let _ = ch.close(200, ShortString::from("redeclared")).await;
    Ok(())
}

/// The delay before reconnect attempt `attempt` (1-based): `base × 2^(attempt-1)`,
/// capped at `max(30 s, base)`, then jittered into [½, 1] of that so that many
/// clients cut at once do not reconnect in lock-step.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    crate::backoff::jittered(base, base.max(Duration::from_secs(30)), attempt)
}

/// How long a clean close waits for consumer channels to finish closing.
const CHANNEL_CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Why supervision of a connection ended.
enum End {
    Lost(String),
    Shutdown,
}

/// Watch one connection until it is lost or we are asked to shut down.
async fn supervise(shared: &Shared, conn: &lapin::Connection) -> End {
    let mut events = conn.events_listener();
    // A backstop for losses lapin reports through no event (a server-sent
    // connection.close ends the connection without an error event).
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return End::Shutdown,
            ev = events.next() => match ev {
                Some(Event::ConnectionBlocked(reason)) => {
                    tracing::warn!(%reason, "RabbitMQ blocked publishing on this connection (resource alarm)");
                    shared.state.send_replace(ConnectionState::Blocked);
                }
                Some(Event::ConnectionUnblocked) => {
                    tracing::info!("RabbitMQ unblocked the connection");
                    shared.state.send_replace(ConnectionState::Connected);
                }
                Some(Event::Error(e)) if !conn.status().connected() => return End::Lost(e.to_string()),
                Some(_) => {}
                None => return End::Lost("event stream ended".into()),
            },
            _ = shared.suspect.notified() => {}
            _ = tick.tick() => {}
        }
        if !conn.status().connected() {
            let state = if conn.status().closed() {
                "closed"
            } else if conn.status().errored() {
                "errored"
            } else {
                "not connected"
            };
            return End::Lost(format!("connection {state}"));
        }
    }
}

/// The manager task: owns `conn` and every connection after it.
pub(crate) async fn run(shared: Arc<Shared>, mut link: Arc<Link>) {
    let mut generation = link.generation;
    loop {
        match supervise(&shared, &link.conn).await {
            End::Shutdown => {
                let mut closing = std::mem::take(&mut *shared.closing.lock().unwrap());
                let settled = async { while closing.join_next().await.is_some() {} };
                let _ = tokio::time::timeout(CHANNEL_CLOSE_WAIT, settled).await;
                if link.conn.status().connected() {
                    let _ = link
                        .conn
                        .close(200, ShortString::from("helixmq closing"))
                        .await;
                }
                shared.link.send_replace(LinkState::Closed);
                shared.state.send_replace(ConnectionState::Closed);
                return;
            }
            End::Lost(why) => {
                tracing::warn!(reason = %why, "connection to RabbitMQ lost; reconnecting");
                shared.link.send_replace(LinkState::Down);
                shared.state.send_replace(ConnectionState::Disconnected);
            }
        }
        drop(link);
        let max = shared.cfg.max_reconnect_attempts;
        let mut attempt = 0u32;
        let mut last = String::new();
        let opened = loop {
            attempt += 1;
            if max > 0 && attempt > max {
                tracing::error!(attempts = max, last_error = %last, "giving up reconnecting (max_reconnect_attempts)");
                shared
                    .link
                    .send_replace(LinkState::Exhausted(max, last.into()));
                shared.state.send_replace(ConnectionState::Closed);
                return;
            }
            let wait = backoff(shared.cfg.reconnect_delay, attempt);
            tokio::select! {
                _ = shared.shutdown.cancelled() => {
                    shared.link.send_replace(LinkState::Closed);
                    shared.state.send_replace(ConnectionState::Closed);
                    return;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            match open(&shared.cfg, &shared.connection_name).await {
                Ok(o) => {
                    shared.metrics.connection_successes.inc();
                    match redeclare(&shared, &o.conn).await {
                        Ok(()) => break o,
                        Err(e) if !o.conn.status().connected() => {
                            last = e.to_string();
                            tracing::warn!(attempt, error = %e, "lost the new connection while redeclaring");
                        }
                        Err(e) => {
                            // The broker refuses part of our topology (someone changed it):
                            // report it loudly but keep the connection, so what still works works.
                            tracing::error!(error = %e, "redeclaring the topology after reconnect failed");
                            break o;
                        }
                    }
                }
                Err(e) => {
                    shared.metrics.connection_failures.inc();
                    tracing::warn!(attempt, error = %e, "reconnect attempt failed");
                    last = e.to_string();
                }
            }
        };
        generation += 1;
        shared.metrics.connection_recoveries.inc();
        tracing::info!(generation, attempts = attempt, endpoint = %opened.endpoint, "reconnected to RabbitMQ");
        let conn = opened.conn;
        shared.state.send_replace(if conn.status().blocked() {
            ConnectionState::Blocked
        } else {
            ConnectionState::Connected
        });
        link = Arc::new(Link {
            conn,
            generation,
            endpoint: opened.endpoint,
            server_version: opened.server_version,
        });
        shared.link.send_replace(LinkState::Up(link.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let base = Duration::from_millis(100);
        for _ in 0..50 {
            let d1 = backoff(base, 1);
            assert!(d1 >= Duration::from_millis(50) && d1 <= base, "{d1:?}");
            let d4 = backoff(base, 4);
            assert!(
                d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800),
                "{d4:?}"
            );
            let d40 = backoff(base, 40);
            assert!(
                d40 <= Duration::from_secs(30) && d40 >= Duration::from_secs(15),
                "{d40:?}"
            );
        }
    }

    #[test]
    fn uri_keeps_special_characters_verbatim() {
        let cfg = RabbitMqConfig {
            username: "u@s:er".into(),
            password: crate::Secret::new("p/a%ss#w?rd"),
            vhost: "/".into(),
            ..Default::default()
        };
        let uri = uri_for(&cfg, "h", 5672);
        assert_eq!(uri.authority.userinfo.password, "p/a%ss#w?rd");
        assert_eq!(uri.vhost, "/");
        assert_eq!(uri.query.heartbeat, Some(10));
    }
}
