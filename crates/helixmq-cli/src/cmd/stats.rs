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
use serde::Serialize;
use serde_json::Value;

use crate::common::{load_config, parse_duration};
use crate::mgmt::Management;
use crate::Global;

/// The spec's alert thresholds (monitoring table).
pub const MAX_READY: u64 = 10_000;
/// Unacked messages per queue.
pub const MAX_UNACKED: u64 = 1_000;
/// Channels on the broker.
pub const MAX_CHANNELS: u64 = 100;
/// Connections on the broker.
pub const MAX_CONNECTIONS: u64 = 50;

/// The window of the averaged rates, and the management API's sample step.
const RATE_WINDOW_SECS: u64 = 60;
const RATE_SAMPLE_SECS: u64 = 5;

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

#[derive(Debug, Serialize)]
struct QueueRow {
    name: String,
    ready: u64,
    unacked: u64,
    consumers: u64,
    /// Messages/s over the broker's last sample (5 s by default): 0 between bursts.
    publish_rate: f64,
    deliver_rate: f64,
    /// Messages/s averaged over the last minute (the management API's samples).
    publish_rate_1m: f64,
    deliver_rate_1m: f64,
    /// Messages ever published to / delivered from the queue (since it was declared
    /// or the broker restarted).
    published_total: u64,
    delivered_total: u64,
}

#[derive(Debug, Serialize)]
struct Sample {
    vhost: String,
    prefix: String,
    connections: u64,
    channels: u64,
    queues: Vec<QueueRow>,
    alerts: Vec<String>,
}

/// Run `stats`.
pub async fn run(global: &Global, args: StatsArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    let mgmt = Management::from_config(&cfg, global.management_url.as_deref())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        let s = sample(&mgmt, &cfg, args.all_queues).await?;
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

async fn sample(mgmt: &Management, cfg: &helixmq::Config, all: bool) -> anyhow::Result<Sample> {
    let overview = mgmt.get("overview").await?;
    let vh = Management::vhost_segment(&cfg.rabbitmq.vhost);
    // The `rate` of a queue is over the broker's last sample only, so a burst
    // that ended a few seconds ago reads 0.0; ask for a minute of samples too.
    let queues = mgmt
        .get(&format!(
            "queues/{vh}?msg_rates_age={RATE_WINDOW_SECS}&msg_rates_incr={RATE_SAMPLE_SECS}"
        ))
        .await?;
    let prefix = format!("{}.", cfg.helixmq.prefix);
    let n = |v: &Value, path: &[&str]| -> f64 {
        let mut cur = v;
        for p in path {
            match cur.get(p) {
                Some(x) => cur = x,
                None => return 0.0,
            }
        }
        cur.as_f64().unwrap_or(0.0)
    };
    let mut rows: Vec<QueueRow> = queues
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| {
            let name = q.get("name")?.as_str()?.to_string();
            (all || name.starts_with(&prefix)).then(|| QueueRow {
                ready: n(q, &["messages_ready"]) as u64,
                unacked: n(q, &["messages_unacknowledged"]) as u64,
                consumers: n(q, &["consumers"]) as u64,
                publish_rate: n(q, &["message_stats", "publish_details", "rate"]),
                deliver_rate: n(q, &["message_stats", "deliver_get_details", "rate"]),
                publish_rate_1m: n(q, &["message_stats", "publish_details", "avg_rate"]),
                deliver_rate_1m: n(q, &["message_stats", "deliver_get_details", "avg_rate"]),
                published_total: n(q, &["message_stats", "publish"]) as u64,
                delivered_total: n(q, &["message_stats", "deliver_get"]) as u64,
                name,
            })
        })
        .collect();
    rows.sort_by(|a, b| a.name.cmp(&b.name));
    let connections = n(&overview, &["object_totals", "connections"]) as u64;
    let channels = n(&overview, &["object_totals", "channels"]) as u64;
    let mut alerts = Vec::new();
    for q in &rows {
        if q.ready > MAX_READY {
            alerts.push(format!("queue {}: {} ready > {MAX_READY}", q.name, q.ready));
        }
        if q.unacked > MAX_UNACKED {
            alerts.push(format!(
                "queue {}: {} unacked > {MAX_UNACKED}",
                q.name, q.unacked
            ));
        }
    }
    if channels > MAX_CHANNELS {
        alerts.push(format!("broker: {channels} channels > {MAX_CHANNELS}"));
    }
    if connections > MAX_CONNECTIONS {
        alerts.push(format!(
            "broker: {connections} connections > {MAX_CONNECTIONS}"
        ));
    }
    Ok(Sample {
        vhost: cfg.rabbitmq.vhost.clone(),
        prefix: cfg.helixmq.prefix.clone(),
        connections,
        channels,
        queues: rows,
        alerts,
    })
}

fn print_text(s: &Sample, watch: bool) {
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
        let flag = if q.ready > MAX_READY || q.unacked > MAX_UNACKED {
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
            "OK: no threshold crossed (ready > {MAX_READY}, unacked > {MAX_UNACKED}, channels > {MAX_CHANNELS}, connections > {MAX_CONNECTIONS})"
        );
    }
    for a in &s.alerts {
        outln!("ALERT {a}");
    }
}
