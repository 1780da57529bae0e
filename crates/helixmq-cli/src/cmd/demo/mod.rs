//! `helixmq demo`: the spec's flows end to end, the first thing a new user runs.
//!
//! On RabbitMQ when it is reachable (else the embedded broker), under a private
//! prefix (`<prefix>.demo-<random>`, deleted at the end):
//! - LLM requests at mixed priorities, published in random order, served by a
//!   single consumer: the higher priorities come out first;
//! - background, debate, verification and notification jobs on the task exchange;
//! - debate rounds and verification events on the topic exchange (and the audit
//!   queue that sees every event);
//! - notifications broadcast to the websocket, SSE and webhook queues;
//! - some handlers fail once and succeed on retry, some messages are poison
//!   (straight to the DLQ), some fail every attempt (DLQ after max attempts).
//!
//! It exits 0 only if every message is accounted for: processed, or in the DLQ
//! exactly when it was meant to end there.
//!
//! # Layout
//! - this file: the options, choosing the broker (and saying which), the
//!   private prefix and its clean-up;
//! - [`flows`]: the flows themselves — plan, publish, consume with retries and
//!   the DLQ, shut down — using the library as its examples do;
//! - [`tally`]: each message's intended fate and what the handlers saw;
//! - [`report`]: the summary table and the verdict.

mod flows;
mod report;
mod tally;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use helixmq::{Broker, Config, Names, Topology};

use crate::common::{endpoint, load_config, MetricsServer};
use crate::Global;

/// Retry delay of the demo: short, so retries come back within the run.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// Attempts before the DLQ.
const MAX_ATTEMPTS: u32 = 3;

/// Which broker to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerChoice {
    /// RabbitMQ if reachable at the configured address, else the embedded broker.
    Auto,
    /// The embedded in-process broker.
    Memory,
    /// RabbitMQ (fail if it is not reachable).
    Rabbitmq,
}

/// `helixmq demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Which broker to use (default: auto). Without --broker, a RabbitMQ that
    /// refuses the login is an error (exit 1) with the fix; `--broker auto` given
    /// explicitly falls back to the embedded broker instead, and says why.
    #[arg(long, value_enum)]
    pub broker: Option<BrokerChoice>,
    /// Background jobs to publish (the other flows scale with it).
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(20..=100_000))]
    pub jobs: u32,
    /// Give up waiting for the flows after this long.
    #[arg(long, default_value = "50s", value_parser = crate::common::parse_duration)]
    pub deadline: Duration,
    /// Keep the demo's queues and exchanges on RabbitMQ (default: delete them).
    #[arg(long)]
    pub keep: bool,
    /// Serve Prometheus `GET /metrics` and `GET /health` on this address while the demo runs.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// Run `demo`.
pub async fn run(global: &Global, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = load_config(global)?;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..6].to_string();
    let prefix = format!("{}.demo-{suffix}", cfg.helixmq.prefix);
    cfg.helixmq.prefix = prefix.clone();
    cfg.helixmq.retry_delay = RETRY_DELAY;
    cfg.helixmq.max_attempts = MAX_ATTEMPTS;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = helixmq::Metrics::new(&mut registry);
    let (broker, how) = choose_broker(&cfg, args.broker, metrics).await?;
    let server = match args.metrics_addr {
        Some(addr) => Some(
            MetricsServer::start(addr, helixmq::http::HealthSource::new(&broker), registry).await?,
        ),
        None => None,
    };
    outln!("helixmq demo");
    outln!("  broker:  {how}");
    outln!(
        "  prefix:  {prefix} (private to this run{})",
        if args.keep {
            ", kept"
        } else {
            ", deleted at the end"
        }
    );
    outln!(
        "  retries: {MAX_ATTEMPTS} attempts, {} apart; then the DLQ",
        humantime::format_duration(RETRY_DELAY)
    );
    outln!();

    let names = Names::new(prefix.clone());
    let mut topology = Topology::spec(&names);
    topology.add_retry_tier(RETRY_DELAY);
    // Ctrl-C at any point still deletes what the demo declared on RabbitMQ.
    let res = tokio::select! {
        r = flows::run_flows(&broker, &names, &topology, &args) => r,
        _ = tokio::signal::ctrl_c() => {
            outln!("interrupted: cleaning up");
            Ok(ExitCode::from(130))
        }
    };
    if broker.backend_kind() == helixmq::BackendKind::RabbitMq && !args.keep {
        cleanup(&broker).await;
    }
    if let Some(s) = server {
        s.stop().await;
    }
    let _ = broker.close().await;
    res
}

/// What a user whose login RabbitMQ refused must do, shown prominently (stderr).
fn login_refused_help(cfg: &Config, at: &str, e: &helixmq::Error) -> String {
    let user = &cfg.rabbitmq.username;
    // The demo runs under `<prefix>.demo-<random>`; the permission is the user's prefix.
    let prefix = cfg
        .helixmq
        .prefix
        .rsplit_once(".demo-")
        .map_or(cfg.helixmq.prefix.as_str(), |(p, _)| p);
    let perm = format!("'^{}\\..*'", prefix.replace('.', "\\."));
    let bar = "=".repeat(78);
    format!(
        "{bar}\n\
         RabbitMQ at {at} is running but REFUSED THE LOGIN of user '{user}':\n  {e}\n\
         \n\
         The spec's user must exist on the broker with its permissions. Fix, one of:\n\
         \x20 sudo rabbitmqctl add_user {user} '<password>'   # then RABBITMQ_PASSWORD=<password>\n\
         \x20 sudo rabbitmqctl set_permissions -p {vhost} {user} {perm} {perm} {perm}\n\
         \x20 sudo rabbitmqctl set_user_tags {user} management   # for `stats` and `topology diff`\n\
         or  scripts/provision        (creates the spec's user helixagent with the configuration's default password)\n\
         or  RABBITMQ_USER=guest RABBITMQ_PASSWORD=guest helixmq demo   (a local broker's guest)\n\
         {bar}",
        vhost = cfg.rabbitmq.vhost,
    )
}

async fn choose_broker(
    cfg: &Config,
    choice: Option<BrokerChoice>,
    metrics: helixmq::Metrics,
) -> anyhow::Result<(Broker, String)> {
    let explicit = choice.is_some();
    let choice = choice.unwrap_or(BrokerChoice::Auto);
    let embedded = |m: helixmq::Metrics| Broker::builder(cfg.clone()).metrics(m).embedded();
    let at = format!("{} (vhost '{}')", endpoint(cfg), cfg.rabbitmq.vhost);
    match choice {
        BrokerChoice::Memory => Ok((
            embedded(metrics.clone()),
            "embedded (in-process), as asked".into(),
        )),
        BrokerChoice::Rabbitmq => {
            let b = Broker::builder(cfg.clone())
                .metrics(metrics.clone())
                .connect()
                .await
                .with_context(|| format!("cannot connect to RabbitMQ at {at}"))?;
            Ok((b, format!("RabbitMQ at {at}")))
        }
        BrokerChoice::Auto => {
            // A short probe first: a new user without RabbitMQ should not wait for connect_timeout.
            let addr = endpoint(cfg);
            let probe = tokio::time::timeout(
                Duration::from_millis(800),
                tokio::net::TcpStream::connect(&addr),
            )
            .await;
            if !matches!(probe, Ok(Ok(_))) {
                return Ok((
                    embedded(metrics.clone()),
                    format!("embedded (in-process): nothing listens at {addr}; start RabbitMQ to run the demo on it"),
                ));
            }
            let mut quick = cfg.clone();
            quick.rabbitmq.connect_timeout =
                quick.rabbitmq.connect_timeout.min(Duration::from_secs(5));
            match tokio::time::timeout(
                Duration::from_secs(8),
                Broker::builder(quick).metrics(metrics.clone()).connect(),
            )
            .await
            {
                Ok(Ok(b)) => Ok((b, format!("RabbitMQ at {at}"))),
                // Reachable but the login is refused: a set-up problem the user must
                // see, not a reason to quietly run somewhere else.
                Ok(Err(e @ helixmq::Error::AccessRefused { .. })) => {
                    eprintln!("{}", login_refused_help(cfg, &at, &e));
                    if !explicit {
                        anyhow::bail!(
                            "RabbitMQ at {at} refused the login of user '{}' (see above); \
                             fix the user, or run `helixmq demo --broker auto` to fall back to \
                             the embedded broker (or `--broker memory`)",
                            cfg.rabbitmq.username
                        );
                    }
                    Ok((
                        embedded(metrics.clone()),
                        format!(
                            "embedded (in-process): RabbitMQ at {at} REFUSED THE LOGIN of user '{}' (fix on stderr); --broker auto falls back",
                            cfg.rabbitmq.username
                        ),
                    ))
                }
                Ok(Err(e)) => Ok((
                    embedded(metrics.clone()),
                    format!("embedded (in-process): RabbitMQ at {at} refused the connection: {e}"),
                )),
                Err(_) => Ok((
                    embedded(metrics.clone()),
                    format!("embedded (in-process): RabbitMQ at {at} did not answer in time"),
                )),
            }
        }
    }
}

/// Delete everything the demo declared (its private prefix) from RabbitMQ.
async fn cleanup(broker: &Broker) {
    let t = broker.topology();
    let backend = broker.backend();
    for q in &t.queues {
        if let Err(e) = backend.delete_queue(&q.name).await {
            tracing::warn!(queue = %q.name, error = %e, "demo cleanup");
        }
    }
    for x in &t.exchanges {
        if let Err(e) = backend.delete_exchange(&x.name).await {
            tracing::warn!(exchange = %x.name, error = %e, "demo cleanup");
        }
    }
}
