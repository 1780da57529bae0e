//! The overview: every queue of the topology with ready, unacked, consumers,
//! publish and deliver rates and a chart of the last minutes; connections and
//! channels; the spec's thresholds as warnings; the retry tiers. A sampler
//! reads the broker every `sample_every`; the page's live part re-renders the
//! latest sample (htmx polls it), so any number of open pages costs the broker
//! nothing more.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use std::time::Duration;
use tokio::sync::watch;

use askama::Template;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde::Serialize;

use super::pages::{fmt_rate, render, Base, Root};
use super::Console;
use crate::dlq::{retry_tiers, rfc3339_ms, short_age};
use crate::management::{Management, Thresholds};
use crate::message::now_unix_millis;
use crate::{Broker, Topology};

/// How many samples each chart keeps (5 min at the default 2 s).
const HISTORY: usize = 150;

/// One queue in a sample.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct QueueSample {
    name: String,
    ready: u64,
    /// Unknown without the management API.
    unacked: Option<u64>,
    consumers: u64,
    publish_rate: Option<f64>,
    deliver_rate: Option<f64>,
    /// (publish, deliver) per sample, oldest first.
    history: Vec<(f64, f64)>,
}

/// One retry tier in a sample.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct TierSample {
    queue: String,
    delay_secs: u64,
    waiting: u64,
    next_due_ms: Option<i64>,
}

/// What the sampler read last.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Sample {
    at_ms: i64,
    /// "management API" or "AMQP (no management API: no rates or unacked counts)".
    source: String,
    queues: Vec<QueueSample>,
    connections: Option<u64>,
    channels: Option<u64>,
    alerts: Vec<String>,
    tiers: Vec<TierSample>,
    /// Why the last sample failed (the previous numbers stay on the page).
    error: Option<String>,
    /// Samples taken so far (the page shows it changing).
    seq: u64,
}

/// Reads the broker in the background; stops when dropped.
pub(crate) struct Sampler {
    latest: watch::Receiver<Sample>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sampler {
    pub(crate) fn start(
        broker: Broker,
        topology: Topology,
        mgmt: Option<Arc<Management>>,
        every: Duration,
    ) -> Sampler {
        let (tx, latest) = watch::channel(Sample::default());
        let task = tokio::spawn(run(broker, topology, mgmt, every, tx));
        Sampler { latest, task }
    }

    /// The latest sample; right after start, waits (up to 5 s) for the first.
    pub(crate) async fn latest(&self) -> Sample {
        let mut rx = self.latest.clone();
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.seq > 0)).await;
        let s = rx.borrow().clone();
        s
    }
}

async fn run(
    broker: Broker,
    topology: Topology,
    mgmt: Option<Arc<Management>>,
    every: Duration,
    latest: watch::Sender<Sample>,
) {
    let mut history: HashMap<String, VecDeque<(f64, f64)>> = HashMap::new();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    loop {
        tick.tick().await;
        seq += 1;
        let got = sample(&broker, &topology, mgmt.as_deref()).await;
        match got {
            Ok(mut s) => {
                for q in &mut s.queues {
                    let h = history.entry(q.name.clone()).or_default();
                    h.push_back((q.publish_rate.unwrap_or(0.0), q.deliver_rate.unwrap_or(0.0)));
                    while h.len() > HISTORY {
                        h.pop_front();
                    }
                    q.history = h.iter().copied().collect();
                }
                s.seq = seq;
                latest.send_replace(s);
            }
            Err(e) => latest.send_modify(|cur| {
                cur.error = Some(e);
                cur.seq = seq;
            }),
        }
    }
}

async fn sample(
    broker: &Broker,
    topology: &Topology,
    mgmt: Option<&Management>,
) -> Result<Sample, String> {
    let names = broker.names();
    let mut s = Sample {
        at_ms: now_unix_millis(),
        ..Sample::default()
    };
    if let Some(m) = mgmt {
        let o = m
            .overview(
                &broker.config().rabbitmq.vhost,
                names.prefix(),
                false,
                Thresholds::SPEC,
            )
            .await
            .map_err(|e| e.to_string())?;
        s.source = "management API".into();
        s.connections = Some(o.connections);
        s.channels = Some(o.channels);
        s.alerts = o.alerts;
        s.queues = o
            .queues
            .into_iter()
            .map(|q| QueueSample {
                name: q.name,
                ready: q.ready,
                unacked: Some(q.unacked),
                consumers: q.consumers,
                publish_rate: Some(q.publish_rate),
                deliver_rate: Some(q.deliver_rate),
                history: Vec::new(),
            })
            .collect();
    } else {
        s.source = "AMQP (no management API: no rates, unacked counts or totals)".into();
        for q in &topology.queues {
            let st = broker
                .backend()
                .queue_stats(&q.name)
                .await
                .map_err(|e| e.to_string())?;
            if st.messages > Thresholds::SPEC.ready {
                s.alerts.push(format!(
                    "queue {}: {} ready > {}",
                    q.name,
                    st.messages,
                    Thresholds::SPEC.ready
                ));
            }
            s.queues.push(QueueSample {
                name: q.name.clone(),
                ready: st.messages,
                unacked: None,
                consumers: st.consumers as u64,
                publish_rate: None,
                deliver_rate: None,
                history: Vec::new(),
            });
        }
    }
    s.tiers = retry_tiers(broker, topology)
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|t| TierSample {
            queue: t.queue,
            delay_secs: t.delay.as_secs(),
            waiting: t.waiting,
            next_due_ms: t.next_due_ms,
        })
        .collect();
    Ok(s)
}

/// A queue row as shown.
struct Row {
    name: String,
    ready: u64,
    ready_warn: bool,
    unacked: String,
    unacked_warn: bool,
    consumers: u64,
    publish: String,
    deliver: String,
    /// SVG polyline points of the publish and deliver rates.
    chart_publish: String,
    chart_deliver: String,
    chart_max: String,
}

pub(crate) struct Tier {
    pub(crate) queue: String,
    pub(crate) delay: String,
    pub(crate) waiting: u64,
    pub(crate) next_due: String,
}

#[derive(Template)]
#[template(path = "overview_live.html")]
struct Live {
    rows: Vec<Row>,
    tiers: Vec<Tier>,
    connections: String,
    connections_warn: bool,
    channels: String,
    channels_warn: bool,
    alerts: Vec<String>,
    source: String,
    sampled: String,
    seq: u64,
    error: Option<String>,
    limits: Thresholds,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct Page<'a> {
    base: Base<'a>,
    live: String,
}

const CHART_W: f64 = 220.0;
const CHART_H: f64 = 36.0;

fn points(values: impl Iterator<Item = f64>, n: usize, max: f64) -> String {
    let step = CHART_W / (HISTORY.max(2) - 1) as f64;
    let x0 = CHART_W - step * (n.max(1) - 1) as f64;
    values
        .enumerate()
        .map(|(i, v)| {
            let y = CHART_H - (v / max) * (CHART_H - 2.0) - 1.0;
            format!("{:.1},{:.1}", x0 + step * i as f64, y)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn live_view(s: &Sample) -> Live {
    let l = Thresholds::SPEC;
    let rows = s
        .queues
        .iter()
        .map(|q| {
            let max = q.history.iter().map(|(p, d)| p.max(*d)).fold(1.0, f64::max);
            Row {
                name: q.name.clone(),
                ready: q.ready,
                ready_warn: q.ready > l.ready,
                unacked: q.unacked.map_or("–".into(), |u| u.to_string()),
                unacked_warn: q.unacked.is_some_and(|u| u > l.unacked),
                consumers: q.consumers,
                publish: q.publish_rate.map_or("–".into(), fmt_rate),
                deliver: q.deliver_rate.map_or("–".into(), fmt_rate),
                chart_publish: points(q.history.iter().map(|h| h.0), q.history.len(), max),
                chart_deliver: points(q.history.iter().map(|h| h.1), q.history.len(), max),
                chart_max: fmt_rate(max),
            }
        })
        .collect();
    Live {
        rows,
        tiers: tiers(s),
        connections: s.connections.map_or("–".into(), |c| c.to_string()),
        connections_warn: s.connections.is_some_and(|c| c > l.connections),
        channels: s.channels.map_or("–".into(), |c| c.to_string()),
        channels_warn: s.channels.is_some_and(|c| c > l.channels),
        alerts: s.alerts.clone(),
        source: s.source.clone(),
        sampled: if s.at_ms == 0 {
            "not yet".into()
        } else {
            rfc3339_ms(s.at_ms)
        },
        seq: s.seq,
        error: s.error.clone(),
        limits: l,
    }
}

/// The retry tiers of a sample, as shown.
pub(crate) fn tiers(s: &Sample) -> Vec<Tier> {
    let now = now_unix_millis();
    s.tiers
        .iter()
        .map(|t| Tier {
            queue: t.queue.clone(),
            delay: humantime::format_duration(Duration::from_secs(t.delay_secs)).to_string(),
            waiting: t.waiting,
            next_due: t.next_due_ms.map_or("–".into(), |due| {
                if due <= now {
                    "now".into()
                } else {
                    format!(
                        "in {} ({})",
                        short_age(((due - now) / 1000) as u64),
                        rfc3339_ms(due)
                    )
                }
            }),
        })
        .collect()
}

/// `GET /`
pub(crate) async fn page(
    State(c): State<Arc<Console>>,
    Extension(root): Extension<Root>,
) -> Response {
    let live = match live_view(&c.overview.latest().await).render() {
        Ok(l) => l,
        Err(e) => return super::pages::template_error(e),
    };
    render(&Page {
        base: Base::new(&c, &root, "Overview", "overview"),
        live,
    })
}

/// `GET /overview/live`: the part htmx swaps in.
pub(crate) async fn live(State(c): State<Arc<Console>>) -> Response {
    render(&live_view(&c.overview.latest().await))
}

/// `GET /api/overview`: the latest sample as JSON.
pub(crate) async fn json(State(c): State<Arc<Console>>) -> Response {
    Json(c.overview.latest().await).into_response()
}
