//! `helixmq outbox`: the transactional outbox on PostgreSQL — create its
//! tables, run the relay, see what is pending, clean up.
//!
//! The relay publishes committed rows of `helixmq_outbox` with confirms and
//! removes each row only after its confirm (see the library's `outbox`
//! module). Several relays may run at once; SIGTERM/SIGINT let each finish
//! the batch it is in. Tables live in the first schema of the search path:
//! `--schema` (or `options=-csearch_path%3D…` in the URL) picks another.

use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use helixmq::outbox::{Outbox, OutboxMetrics, RelayOptions, Retention};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::common::{load_config, parse_duration};
use crate::Global;

/// `helixmq outbox …`
#[derive(Debug, Subcommand)]
pub enum OutboxCmd {
    /// Create or upgrade the outbox and inbox tables (idempotent).
    Migrate(DbArgs),
    /// Publish committed outbox rows to RabbitMQ until SIGTERM/SIGINT.
    Relay(RelayArgs),
    /// Rows pending, the oldest one's age, rows failing (JSON with --json).
    Status {
        /// The database.
        #[command(flatten)]
        db: DbArgs,
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Delete published rows kept past DURATION (with `relay --keep`) and
    /// inbox rows older than --inbox-retention.
    Cleanup {
        /// The database.
        #[command(flatten)]
        db: DbArgs,
        /// Age past which kept outbox rows are deleted.
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        older_than: Duration,
        /// Age past which inbox rows are deleted (the inbox's retention).
        #[arg(long, default_value = "7d", value_parser = parse_duration)]
        inbox_retention: Duration,
    },
}

/// Where the outbox tables are.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// PostgreSQL URL, e.g. postgres://app@127.0.0.1:5432/app.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Schema of the tables (sets the connections' search_path).
    #[arg(long)]
    pub schema: Option<String>,
}

/// `helixmq outbox relay`
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The database.
    #[command(flatten)]
    pub db: DbArgs,
    /// Rows locked and published per batch.
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Batches in flight at once (each on its own connection).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub workers: u16,
    /// Wait after finding nothing to publish.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    pub idle_interval: Duration,
    /// Keep published rows this long (marked `published_at`) instead of deleting them.
    #[arg(long, value_parser = parse_duration)]
    pub keep: Option<Duration>,
    /// Run `migrate` first.
    #[arg(long)]
    pub migrate: bool,
    /// Name of the RabbitMQ connection (`rabbitmqctl list_connections client_properties`).
    #[arg(long)]
    pub connection_name: Option<String>,
    /// Serve GET /metrics and /health on HOST:PORT.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Run an `outbox` subcommand.
pub async fn run(global: &Global, cmd: OutboxCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        OutboxCmd::Migrate(db) => {
            let pool = pool(&db, 1).await?;
            let applied = Outbox::migrate(&pool).await?;
            if applied.is_empty() {
                outln!("outbox: schema up to date");
            } else {
                outln!("outbox: applied migration(s) {applied:?}");
            }
        }
        OutboxCmd::Status { db, json } => {
            let pool = pool(&db, 1).await?;
            let p = Outbox::pending(&pool).await?;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({
                        "pending": p.rows,
                        "oldest_pending_seconds": p.oldest.as_secs_f64(),
                        "failing": p.failing,
                    })
                );
            } else {
                outln!(
                    "pending {}  oldest {:.1}s  failing {}",
                    p.rows,
                    p.oldest.as_secs_f64(),
                    p.failing
                );
            }
        }
        OutboxCmd::Cleanup {
            db,
            older_than,
            inbox_retention,
        } => {
            let pool = pool(&db, 1).await?;
            let outbox = Outbox::cleanup(&pool, older_than).await?;
            let inbox = helixmq::inbox::Inbox::new(pool)
                .retention(inbox_retention)
                .cleanup()
                .await?;
            outln!("deleted {outbox} published outbox row(s), {inbox} inbox row(s)");
        }
        OutboxCmd::Relay(args) => relay(global, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

async fn relay(global: &Global, args: RelayArgs) -> anyhow::Result<()> {
    let cfg = load_config(global)?;
    let workers = usize::from(args.workers);
    // One connection per worker, one for the gauges and clean-up.
    let pool = pool(&args.db, workers as u32 + 1).await?;
    if args.migrate {
        Outbox::migrate(&pool).await?;
    }
    let mut registry = prometheus_client::registry::Registry::default();
    let broker_metrics = helixmq::Metrics::new(&mut registry);
    let metrics = OutboxMetrics::new(&mut registry);
    let name = args
        .connection_name
        .clone()
        .unwrap_or_else(|| format!("helixmq outbox relay pid {}", std::process::id()));
    let backend = helixmq::backend::rabbitmq::RabbitBackend::connect_named(
        &cfg.rabbitmq,
        broker_metrics.clone(),
        &name,
    )
    .await
    .with_context(|| {
        format!(
            "cannot connect to RabbitMQ at {}",
            crate::common::endpoint(&cfg)
        )
    })?;
    let broker = helixmq::Broker::builder(cfg)
        .metrics(broker_metrics)
        .custom_backend(Arc::new(backend));
    let server = match args.metrics_addr {
        Some(addr) => Some(
            crate::common::MetricsServer::start(
                addr,
                helixmq::http::HealthSource::new(&broker),
                registry,
            )
            .await?,
        ),
        None => None,
    };
    let options = RelayOptions {
        batch_size: args.batch_size.max(1),
        workers,
        idle_interval: args.idle_interval,
        retention: args.keep.map_or(Retention::Delete, Retention::Keep),
        metrics,
        ..RelayOptions::default()
    };
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    tracing::info!(
        workers,
        batch_size = options.batch_size,
        "outbox relay started"
    );
    let relay = Outbox::relay(pool, broker.clone(), options);
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("outbox relay stopping: finishing the batches in flight");
    let report = relay.shutdown().await;
    tracing::info!(
        relayed = report.relayed,
        publish_failures = report.publish_failures,
        batch_failures = report.batch_failures,
        "outbox relay stopped"
    );
    if let Some(s) = server {
        s.stop().await;
    }
    broker.close().await?;
    Ok(())
}

/// A pool of up to `max` connections on the configured database and schema.
async fn pool(db: &DbArgs, max: u32) -> anyhow::Result<PgPool> {
    let mut opts = PgConnectOptions::from_str(&db.database_url)
        .context("--database-url is not a PostgreSQL URL")?;
    if let Some(schema) = &db.schema {
        opts = opts.options([("search_path", schema.as_str())]);
    }
    let host = opts.get_host().to_string();
    PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .with_context(|| format!("cannot connect to PostgreSQL on {host}"))
}
