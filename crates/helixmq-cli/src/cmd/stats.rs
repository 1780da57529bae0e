//! `helixmq stats`: queue depths and rates, connections and channels, and the
//! spec's alert thresholds — a monitoring check (exit 2 when one is crossed).
//!
//! Rates: the broker's last sample (5 s: reads 0.0 just after a burst) and the
//! average over the last minute, from the management API's own samples; plus
//! the counters they come from.
//!
//! Source: RabbitMQ's management HTTP API (`/api/overview`, `/api/queues/{vhost}`);
//! AMQP cannot report rates, unacked counts or connection totals. The broker
//! counts only what the configured user may see: a user with the `monitoring`
//! or `administrator` tag sees every connection and channel, a `management`
//! user only its own.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::common::{load_config, parse_duration};
use crate::Global;
use helixmq::management::{Management, Overview, Thresholds};

/// The spec's alert thresholds.
const LIMITS: Thresholds = Thresholds::SPEC;

/// `helixmq stats`
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// JSON output.
    #[arg(long)]
    pub json: bool,
    /// Repeat every --interval until interrupted; the exit status is the last sample's.
    #[arg(long)]
    pub watch: bool,
    /// Time between samples with --watch.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Every queue of the vhost, not only those under the configured prefix.
    #[arg(long)]
    pub all_queues: bool,
}

/// Run `stats`.
pub async fn run(global: &Global, args: StatsArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    let mgmt = Management::from_config(&cfg, global.management_url.as_deref())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let s = mgmt
            .overview(
                &cfg.rabbitmq.vhost,
                &cfg.helixmq.prefix,
                args.all_queues,
                LIMITS,
            )
            .await?;
        if args.json {
            outln!("{}", serde_json::to_string(&s)?);
        } else {
            print_text(&s, args.watch);
        }
        let code = if s.alerts.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        };
        if !args.watch {
            return Ok(code);
        }
        tokio::select! {
            _ = sigint.recv() => return Ok(code),
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
}

fn print_text(s: &Overview, watch: bool) {
    if watch {
        outln!(
            "--- {} ---",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        );
    }
    let w = s
        .queues
        .iter()
        .map(|q| q.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    outln!(
        "{:<w$}  {:>8}  {:>8}  {:>9}  {:>15}  {:>15}  {:>10}",
        "QUEUE",
        "READY",
        "UNACKED",
        "CONSUMERS",
        "PUBLISH/s 5s|1m",
        "DELIVER/s 5s|1m",
        "PUBLISHED"
    );
    for q in &s.queues {
        let flag = if q.ready > LIMITS.ready || q.unacked > LIMITS.unacked {
            "  !"
        } else {
            ""
        };
        outln!(
            "{:<w$}  {:>8}  {:>8}  {:>9}  {:>15}  {:>15}  {:>10}{flag}",
            q.name,
            q.ready,
            q.unacked,
            q.consumers,
            format!("{:.1}|{:.1}", q.publish_rate, q.publish_rate_1m),
            format!("{:.1}|{:.1}", q.deliver_rate, q.deliver_rate_1m),
            q.published_total
        );
    }
    if s.queues.is_empty() {
        outln!(
            "(no queue under '{}.' in vhost '{}'; `helixmq topology apply` declares them)",
            s.prefix,
            s.vhost
        );
    }
    outln!("connections: {}   channels: {}", s.connections, s.channels);
    if s.alerts.is_empty() {
        outln!(
            "OK: no threshold crossed (ready > {}, unacked > {}, channels > {}, connections > {})",
            LIMITS.ready,
            LIMITS.unacked,
            LIMITS.channels,
            LIMITS.connections
        );
    }
    for a in &s.alerts {
        outln!("ALERT {a}");
    }
}
