//! `GET /metrics` and `GET /health` as an axum [`Router`] services can mount.
//!
//! The router owns nothing global: the caller passes the Prometheus
//! [`Registry`] it registered [`Metrics`](crate::Metrics) (and anything else)
//! into, and a [`HealthSource`] built from its [`Broker`] and the
//! [`Subscription`]s it wants watched. [`serve`] runs the router on an address
//! with a graceful shutdown path driven by a [`CancellationToken`].
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use std::sync::Arc;
//! use helixmq::{http, Broker, Config, Metrics};
//! use prometheus_client::registry::Registry;
//!
//! let mut registry = Registry::default();
//! let metrics = Metrics::new(&mut registry);
//! let broker = Broker::builder(Config::default()).metrics(metrics).embedded();
//! let router = http::router(http::HealthSource::new(&broker), Arc::new(registry));
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let server = http::serve("127.0.0.1:0".parse().unwrap(), router, shutdown.clone()).await?;
//! println!("metrics on http://{}/metrics", server.local_addr());
//! shutdown.cancel();
//! server.join().await?;
//! # Ok::<(), helixmq::Error>(()) }).unwrap();
//! ```

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendKind, ConnectionState};
use crate::broker::Broker;
use crate::consumer::{Holds, Subscription, SubscriptionStatus};
use crate::error::{Error, Result};

/// The content type of prometheus-client's text encoder (OpenMetrics 1.0,
/// which Prometheus scrapes natively and which ends with `# EOF`).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What `/health` looks at: the broker's connection state, the deliveries its
/// subscriptions hold because a retry/DLQ copy cannot be placed, and the
/// status of each watched subscription.
///
/// Cheap to clone; it holds only watch receivers, so it never keeps a
/// subscription or the broker alive by itself.
#[derive(Clone, Debug)]
pub struct HealthSource {
    /// Which backend, reported as `backend` in the body.
    backend: BackendKind,
    /// Connection state as the backend publishes it.
    connection: watch::Receiver<ConnectionState>,
    /// Watched subscriptions: (consumer tag, queue, status).
    subscriptions: Vec<WatchedSubscription>,
    /// The broker's held deliveries (none without a broker).
    holds: Option<Arc<Holds>>,
}

#[derive(Clone, Debug)]
struct WatchedSubscription {
    id: String,
    queue: String,
    status: watch::Receiver<SubscriptionStatus>,
}

impl HealthSource {
    /// Health of `broker`'s connection, with no subscription watched yet
    /// (a publish-only service is healthy when connected).
    pub fn new(broker: &Broker) -> Self {
        let mut h = HealthSource::from_parts(broker.backend_kind(), broker.state());
        h.holds = Some(broker.inner.holds.clone());
        h
    }

    /// Health from a raw connection-state watch (for backends used without a [`Broker`]).
    pub fn from_parts(backend: BackendKind, connection: watch::Receiver<ConnectionState>) -> Self {
        HealthSource {
            backend,
            connection,
            subscriptions: Vec::new(),
            holds: None,
        }
    }

    /// Also require `subscription` to be active.
    pub fn watch(self, subscription: &Subscription) -> Self {
        let (id, queue) = (
            subscription.id().to_string(),
            subscription.queue().to_string(),
        );
        self.watch_status(id, queue, subscription.watch_status())
    }

    /// Also require the subscription behind `status` (from
    /// [`Subscription::watch_status`]) to be active; `id` and `queue` name it in the body.
    pub fn watch_status(
        mut self,
        id: impl Into<String>,
        queue: impl Into<String>,
        status: watch::Receiver<SubscriptionStatus>,
    ) -> Self {
        self.subscriptions.push(WatchedSubscription {
            id: id.into(),
            queue: queue.into(),
            status,
        });
        self
    }

    /// The health right now.
    pub fn check(&self) -> Health {
        let state = *self.connection.borrow();
        let mut reasons = Vec::new();
        match state {
            ConnectionState::Connected => {}
            ConnectionState::Disconnected => {
                reasons.push("broker connection lost; reconnecting".to_string())
            }
            ConnectionState::Blocked => reasons.push(
                "broker blocked publishing (memory or disk alarm); publishes wait".to_string(),
            ),
            ConnectionState::Closed => reasons.push("broker connection closed".to_string()),
        }
        let held = self
            .holds
            .as_ref()
            .map(|h| h.snapshot())
            .unwrap_or_default();
        for h in &held {
            reasons.push(format!(
                "{} deliveries from queue '{}' held unacked: {}",
                h.held, h.queue, h.reason
            ));
        }
        let subscriptions = self
            .subscriptions
            .iter()
            .map(|s| {
                let status = s.status.borrow().clone();
                let (text, error) = match status {
                    SubscriptionStatus::Active => ("active", None),
                    SubscriptionStatus::Draining => {
                        reasons.push(format!(
                            "subscription '{}' on queue '{}' draining (shutting down)",
                            s.id, s.queue
                        ));
                        ("draining", None)
                    }
                    SubscriptionStatus::Stopped => {
                        reasons.push(format!(
                            "subscription '{}' on queue '{}' stopped",
                            s.id, s.queue
                        ));
                        ("stopped", None)
                    }
                    SubscriptionStatus::Failed(why) => {
                        reasons.push(format!(
                            "subscription '{}' on queue '{}' failed: {why}",
                            s.id, s.queue
                        ));
                        ("failed", Some(why))
                    }
                };
                SubscriptionHealth {
                    id: s.id.clone(),
                    queue: s.queue.clone(),
                    status: text,
                    error,
                }
            })
            .collect();
        Health {
            status: if reasons.is_empty() {
                "ok"
            } else {
                "unavailable"
            },
            backend: match self.backend {
                BackendKind::Memory => "memory",
                BackendKind::RabbitMq => "rabbitmq",
                BackendKind::Custom => "custom",
            },
            connection: match state {
                ConnectionState::Connected => "connected",
                ConnectionState::Disconnected => "disconnected",
                ConnectionState::Blocked => "blocked",
                ConnectionState::Closed => "closed",
            },
            subscriptions,
            held: held
                .into_iter()
                .map(|h| HeldHealth {
                    queue: h.queue,
                    held: h.held,
                    reason: h.reason,
                })
                .collect(),
            reasons,
        }
    }
}

/// The body of `GET /health`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Health {
    /// `ok` (HTTP 200) or `unavailable` (HTTP 503).
    pub status: &'static str,
    /// `memory` or `rabbitmq`.
    pub backend: &'static str,
    /// `connected`, `disconnected`, `blocked` or `closed`.
    pub connection: &'static str,
    /// Each watched subscription.
    pub subscriptions: Vec<SubscriptionHealth>,
    /// Queues with deliveries held because their retry/DLQ copy cannot be placed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<HeldHealth>,
    /// Why it is unavailable; empty when `ok`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

impl Health {
    /// Whether every check passed.
    pub fn is_ok(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// Held deliveries of one queue in [`Health`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HeldHealth {
    /// The queue they were consumed from.
    pub queue: String,
    /// How many are held.
    pub held: usize,
    /// Why their copies cannot be placed, e.g. `retry queue helixagent.retry full`.
    pub reason: String,
}

/// One subscription in [`Health`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SubscriptionHealth {
    /// Consumer tag.
    pub id: String,
    /// Queue consumed.
    pub queue: String,
    /// `active`, `draining`, `stopped` or `failed`.
    pub status: &'static str,
    /// The failure, when `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Clone)]
struct AppState {
    health: HealthSource,
    registry: Arc<Registry>,
}

/// A router serving `GET /metrics` (every metric in `registry`, Prometheus
/// text) and `GET /health` (200 with [`Health`] as JSON when healthy, 503 with
/// the reasons otherwise). Mount it with `Router::merge` or `nest`.
pub fn router(health: HealthSource, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(health_handler))
        .with_state(AppState { health, registry })
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &s.registry) {
        Ok(()) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            // Only a failing `fmt::Write` can get here; String never fails, but a
            // custom collector could: say so instead of sending half a scrape.
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encoding metrics failed: {e}"),
            )
                .into_response()
        }
    }
}

async fn health_handler(State(s): State<AppState>) -> Response {
    let h = s.health.check();
    let code = if h.is_ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(h)).into_response()
}

/// A running HTTP server started by [`serve`]. The shutdown token stops it;
/// dropping this handle does not (the server keeps serving, detached).
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wait until the server stopped (after the shutdown token was cancelled
    /// and open requests finished).
    pub async fn join(self) -> Result<()> {
        let addr = self.addr;
        match self.task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(Error::Io {
                context: format!("HTTP server on {addr} failed"),
                source,
            }),
            Err(e) => Err(Error::Io {
                context: format!("HTTP server task on {addr} ended abnormally"),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

/// Bind `addr` and serve `router` on it until `shutdown` is cancelled; then
/// stop accepting, let open requests finish, and end. Binding happens before
/// this returns, so a port already in use is an error here, not later.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> Result<Server> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Io {
        context: format!("cannot listen on {addr} for /metrics and /health (is the port in use? choose another with --metrics-addr)"),
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| Error::Io {
        context: "local address of the HTTP listener".into(),
        source,
    })?;
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
    });
    tracing::info!(%addr, "serving /metrics and /health");
    Ok(Server { addr, task })
}
