//! Confirmed publishing: helixmq beside raw lapin at the same confirm window,
//! and the spec's one-confirm-at-a-time pattern.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use helixmq::{Message, PublishOptions};
use indicatif::ProgressBar;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use tokio::task::JoinSet;

use super::latency::{micros, Hist};
use super::report::{Run, Start};
use super::setup::Bench;
use super::Plan;

/// helixmq: `window` tasks, each awaiting `Broker::publish` in a loop, so
/// `window` confirms are in flight at any time (how services publish).
pub(crate) async fn helix_concurrent(
    bench: &Bench,
    plan: &Plan,
    payload: &Bytes,
    queue: &str,
    bar: &ProgressBar,
) -> anyhow::Result<Run> {
    let started = Start::now();
    let payload = payload.clone();
    publish_with_tasks(
        &bench.broker,
        &bench.exchange,
        queue,
        (plan.messages, plan.window),
        bar,
        None,
        move |_| payload.clone(),
    )
    .await?;
    Ok(Run::finished(plan.messages, started, bar))
}

/// `window` publisher tasks sharing a counter publish `messages` messages;
/// `make(i)` gives message i's payload, right before it is published; the
/// time from then to the confirm goes into `confirms` if given.
pub(crate) async fn publish_with_tasks(
    broker: &helixmq::Broker,
    exchange: &str,
    queue: &str,
    (messages, window): (u64, usize),
    bar: &ProgressBar,
    confirms: Option<Arc<Mutex<Hist>>>,
    make: impl Fn(u64) -> Bytes + Send + Sync + Clone + 'static,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..window.min(messages as usize) {
        let (broker, next, bar, make) = (broker.clone(), next.clone(), bar.clone(), make.clone());
        let (exchange, queue, n) = (exchange.to_string(), queue.to_string(), messages);
        let confirms = confirms.clone();
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, helixmq::Error>(());
                }
                let started = Instant::now();
                broker
                    .publish(&exchange, &queue, Message::new(make(i)))
                    .await?;
                if let Some(h) = &confirms {
                    h.lock()
                        .unwrap()
                        .saturating_record(micros(started.elapsed()));
                }
                bar.inc(1);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("publisher task")?.context("helixmq publish")?;
    }
    Ok(())
}

/// helixmq: `Broker::publish_batch` from two tasks, each with batches of
/// `window / 2`, so up to `window` confirms are in flight.
pub(crate) async fn helix_batch(
    bench: &Bench,
    plan: &Plan,
    payload: &Bytes,
    queue: &str,
    bar: &ProgressBar,
) -> anyhow::Result<Run> {
    let batch = (plan.window / 2).max(1) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let started = Start::now();
    let mut tasks = JoinSet::new();
    for _ in 0..2 {
        let (broker, next, bar, payload) = (
            bench.broker.clone(),
            next.clone(),
            bar.clone(),
            payload.clone(),
        );
        let (exchange, queue, n) = (bench.exchange.clone(), queue.to_string(), plan.messages);
        tasks.spawn(async move {
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= n {
                    return Ok::<_, helixmq::Error>(());
                }
                let count = batch.min(n - from);
                let msgs: Vec<Message> =
                    (0..count).map(|_| Message::new(payload.clone())).collect();
                for r in broker
                    .publish_batch(&exchange, &queue, &msgs, &PublishOptions::default())
                    .await
                {
                    r?;
                }
                bar.inc(count);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("batch publisher task")?
            .context("helixmq publish_batch")?;
    }
    Ok(Run::finished(plan.messages, started, bar))
}

/// The spec's pattern through helixmq: each publish awaits its confirm
/// before the next one is sent.
pub(crate) async fn helix_one_at_a_time(
    bench: &Bench,
    plan: &Plan,
    payload: &Bytes,
    queue: &str,
    bar: &ProgressBar,
) -> anyhow::Result<Run> {
    let started = Start::now();
    for _ in 0..plan.one_at_a_time_messages {
        bench
            .broker
            .publish(&bench.exchange, queue, Message::new(payload.clone()))
            .await
            .context("helixmq publish")?;
        bar.inc(1);
    }
    Ok(Run::finished(plan.one_at_a_time_messages, started, bar))
}

/// Raw lapin, the ceiling: one confirm-mode channel, `window` confirms in
/// flight, persistent and mandatory like helixmq's publishes.
pub(crate) async fn raw_lapin(
    bench: &Bench,
    plan: &Plan,
    payload: &Bytes,
    queue: &str,
    bar: &ProgressBar,
) -> anyhow::Result<Run> {
    raw_lapin_with(bench, plan, payload, queue, bar, RawShape::default()).await
}

/// How a raw lapin publish run differs from the plain ceiling (diagnostics
/// that reproduce one helixmq trait at a time).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawShape {
    /// Confirm channels used round robin per message (helixmq's pool has 4).
    pub channels: usize,
    /// Send helixmq's properties: message id (UUID v7), timestamp and the
    /// `x-helixmq-attempt` header.
    pub helix_properties: bool,
}

pub(crate) async fn raw_lapin_with(
    bench: &Bench,
    plan: &Plan,
    payload: &Bytes,
    queue: &str,
    bar: &ProgressBar,
    shape: RawShape,
) -> anyhow::Result<Run> {
    let started = Start::now();
    let mut chans = Vec::new();
    for _ in 0..shape.channels.max(1) {
        let ch = bench.raw.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        chans.push(ch);
    }
    let base = BasicProperties::default().with_delivery_mode(2);
    let props = || {
        if !shape.helix_properties {
            return base.clone();
        }
        let mut h = FieldTable::default();
        h.insert("x-helixmq-attempt".into(), AMQPValue::LongLongInt(1));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        base.clone()
            .with_message_id(uuid::Uuid::now_v7().to_string().into())
            .with_timestamp(now)
            .with_headers(h)
    };
    let opts = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let exchange: lapin::types::ShortString = bench.exchange.as_str().into();
    let key: lapin::types::ShortString = queue.into();
    let mut inflight = FuturesUnordered::new();
    let check = |c: lapin::Result<Confirmation>| -> anyhow::Result<()> {
        match c.context("raw lapin confirm")? {
            Confirmation::Ack(None) => Ok(()),
            other => anyhow::bail!("raw lapin publish not confirmed: {other:?}"),
        }
    };
    for i in 0..plan.messages {
        if inflight.len() >= plan.window {
            if let Some(c) = inflight.next().await {
                check(c)?;
                bar.inc(1);
            }
        }
        let ch = &chans[i as usize % chans.len()];
        let confirm = ch
            .basic_publish(exchange.clone(), key.clone(), opts, payload, props())
            .await
            .context("raw lapin publish")?;
        inflight.push(confirm);
    }
    while let Some(c) = inflight.next().await {
        check(c)?;
        bar.inc(1);
    }
    let run = Run::finished(plan.messages, started, bar);
    for ch in chans {
        let _ = ch.close(200, "done".into()).await;
    }
    Ok(run)
}
