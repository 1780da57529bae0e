//! `helixmq stats`: queue depths and rates, connections and channels, and the
//! spec's alert thresholds — a monitoring check (exit 2 when one is crossed).
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
    publish_rate: f64,
    deliver_rate: f64,
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
    let queues = mgmt.get(&format!("queues/{vh}")).await?;
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
        "{:<w$}  {:>8}  {:>8}  {:>9}  {:>10}  {:>10}",
        "QUEUE",
        "READY",
        "UNACKED",
        "CONSUMERS",
        "PUBLISH/s",
        "DELIVER/s"
    );
    for q in &s.queues {
        let flag = if q.ready > MAX_READY || q.unacked > MAX_UNACKED {
            "  !"
        } else {
            ""
        };
        outln!(
            "{:<w$}  {:>8}  {:>8}  {:>9}  {:>10.1}  {:>10.1}{flag}",
            q.name,
            q.ready,
            q.unacked,
            q.consumers,
            q.publish_rate,
            q.deliver_rate
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
