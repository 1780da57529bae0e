//! `helixmq console`: a web console for operators — every queue with live
//! depths and rates, and a dead-letter workbench (find why tasks fail, replay
//! the fixable ones, delete the rest) — as an axum [`Router`] a service can
//! mount, or served by the CLI (feature `console`).
//!
//! Pages are rendered on the server (askama templates in `templates/`); the
//! live parts are fragments that the vendored htmx (`static/htmx.min.js`, no
//! CDN) swaps in every 2 s. The DLQ is read through [`crate::dlq`], which holds
//! it while pages are being looked at and says why that is safe.
//!
//! Security: [`router`] checks [`Auth`] on every request when given one; every
//! action is a POST carrying the page's CSRF token; with
//! [`ConsoleOptions::read_only`] no action is shown and every POST is refused.
//! No page, error or log line shows a password.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use helixmq::{console, Broker, Config};
//! let broker = Broker::embedded(Config::default());
//! let app = console::router(&broker, console::ConsoleOptions::default());
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
//! # drop(listener);
//! // axum::serve(listener, app).await
//! # let _ = app;
//! # });
//! ```

mod auth;
mod overview;
mod pages;
mod workbench;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{header, HeaderValue};
use axum::routing::{get, post};
use axum::Router;

pub use auth::Auth;

use crate::dlq::{DeadLetters, ReadOptions};
use crate::management::Management;
use crate::{Broker, Topology};

/// How the console runs.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// Show no action and refuse every POST.
    pub read_only: bool,
    /// Who may use it; `None`: anyone who can reach it (loopback only, the CLI insists).
    pub auth: Option<Auth>,
    /// RabbitMQ's management API, for rates, unacked counts and totals;
    /// without it the overview shows what AMQP tells (ready, consumers).
    pub management: Option<Arc<Management>>,
    /// The queues to show and the retry tiers to watch; default: the broker's
    /// declared topology.
    pub topology: Option<Topology>,
    /// Sample the broker this often (the overview's refresh). Default 2 s.
    pub sample_every: Duration,
    /// How the workbench holds the DLQ (it lets go 30 s after the last DLQ page).
    pub read: ReadOptions,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        ConsoleOptions {
            read_only: false,
            auth: None,
            management: None,
            topology: None,
            sample_every: Duration::from_secs(2),
            read: ReadOptions::default(),
        }
    }
}

/// What every handler shares.
pub(crate) struct Console {
    pub(crate) broker: Broker,
    pub(crate) dlq: DeadLetters,
    pub(crate) topology: Topology,
    pub(crate) read_only: bool,
    pub(crate) auth: Option<Auth>,
    /// Put in every form and checked on every POST.
    pub(crate) csrf: String,
    pub(crate) overview: overview::Sampler,
    pub(crate) jobs: Mutex<HashMap<u64, Arc<workbench::Job>>>,
    pub(crate) next_job: std::sync::atomic::AtomicU64,
}

/// The console as a router: mount it (`Router::nest("/console", ..)` works:
/// links are relative) or serve it.
pub fn router(broker: &Broker, opts: ConsoleOptions) -> Router {
    let topology = opts.topology.clone().unwrap_or_else(|| broker.topology());
    let csrf = {
        use rand::Rng as _;
        let bytes: [u8; 24] = rand::rng().random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let state = Arc::new(Console {
        dlq: DeadLetters::with_options(broker, opts.read.clone()),
        overview: overview::Sampler::start(
            broker.clone(),
            topology.clone(),
            opts.management.clone(),
            opts.sample_every,
        ),
        broker: broker.clone(),
        topology,
        read_only: opts.read_only,
        auth: opts.auth.clone(),
        csrf,
        jobs: Mutex::new(HashMap::new()),
        next_job: 1.into(),
    });
    Router::new()
        .route("/", get(overview::page))
        .route("/overview/live", get(overview::live))
        .route("/api/overview", get(overview::json))
        .route("/dlq", get(workbench::page))
        .route("/dlq/message/{id}", get(workbench::message))
        .route("/dlq/action", post(workbench::action))
        .route("/dlq/purge", post(workbench::purge))
        .route("/jobs/{id}", get(workbench::job))
        .route("/jobs/{id}/progress", get(workbench::job_progress))
        .route("/static/htmx.min.js", get(pages::htmx))
        .route("/static/console.css", get(pages::css))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check,
        ))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

/// No framing, no sniffing, scripts only from the console itself.
async fn security_headers(mut res: axum::response::Response) -> axum::response::Response {
    let h = res.headers_mut();
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    res
}
