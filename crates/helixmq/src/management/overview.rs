//! One sample of the broker: every queue under the prefix with depths and
//! rates, connections and channels, and the spec's alert thresholds.

use serde::Serialize;
use serde_json::Value;

use super::{Management, Result};

/// The spec's alert thresholds (its monitoring table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Thresholds {
    /// Ready messages per queue.
    pub ready: u64,
    /// Unacked messages per queue.
    pub unacked: u64,
    /// Channels on the broker.
    pub channels: u64,
    /// Connections on the broker.
    pub connections: u64,
}

impl Thresholds {
    /// The spec's: ready > 10,000, unacked > 1,000, channels > 100, connections > 50.
    pub const SPEC: Thresholds = Thresholds {
        ready: 10_000,
        unacked: 1_000,
        channels: 100,
        connections: 50,
    };
}

/// The window of the averaged rates, and the management API's sample step.
const RATE_WINDOW_SECS: u64 = 60;
const RATE_SAMPLE_SECS: u64 = 5;

/// One queue in a sample.
#[derive(Debug, Clone, Serialize)]
pub struct QueueRow {
    /// Queue name.
    pub name: String,
    /// Ready messages.
    pub ready: u64,
    /// Delivered, not yet acked.
    pub unacked: u64,
    /// Consumers attached.
    pub consumers: u64,
    /// Messages/s over the broker's last sample (5 s by default): 0 between bursts.
    pub publish_rate: f64,
    /// Deliveries/s over the last sample.
    pub deliver_rate: f64,
    /// Messages/s averaged over the last minute (the management API's samples).
    pub publish_rate_1m: f64,
    /// Deliveries/s averaged over the last minute.
    pub deliver_rate_1m: f64,
    /// Messages ever published to the queue (since it was declared or the broker restarted).
    pub published_total: u64,
    /// Messages ever delivered from it.
    pub delivered_total: u64,
}

/// One sample of the broker.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// The vhost.
    pub vhost: String,
    /// The name prefix the queues were selected by.
    pub prefix: String,
    /// Connections the user can see.
    pub connections: u64,
    /// Channels the user can see.
    pub channels: u64,
    /// Queues, by name.
    pub queues: Vec<QueueRow>,
    /// Every threshold crossed, as a sentence.
    pub alerts: Vec<String>,
}

impl Management {
    /// Sample the broker: the queues under `prefix.` (every queue of the vhost
    /// with `all`), connections, channels, and the thresholds crossed.
    pub async fn overview(
        &self,
        vhost: &str,
        prefix: &str,
        all: bool,
        limits: Thresholds,
    ) -> Result<Overview> {
        let overview = self.get("overview").await?;
        let vh = Management::vhost_segment(vhost);
        // The `rate` of a queue is over the broker's last sample only, so a burst
        // that ended a few seconds ago reads 0.0; ask for a minute of samples too.
        let queues = self
            .get(&format!(
                "queues/{vh}?msg_rates_age={RATE_WINDOW_SECS}&msg_rates_incr={RATE_SAMPLE_SECS}"
            ))
            .await?;
        let dotted = format!("{prefix}.");
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
                (all || name.starts_with(&dotted)).then(|| QueueRow {
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
            if q.ready > limits.ready {
                alerts.push(format!(
                    "queue {}: {} ready > {}",
                    q.name, q.ready, limits.ready
                ));
            }
            if q.unacked > limits.unacked {
                alerts.push(format!(
                    "queue {}: {} unacked > {}",
                    q.name, q.unacked, limits.unacked
                ));
            }
        }
        if channels > limits.channels {
            alerts.push(format!("broker: {channels} channels > {}", limits.channels));
        }
        if connections > limits.connections {
            alerts.push(format!(
                "broker: {connections} connections > {}",
                limits.connections
            ));
        }
        Ok(Overview {
            vhost: vhost.to_string(),
            prefix: prefix.to_string(),
            connections,
            channels,
            queues: rows,
            alerts,
        })
    }
}
