//! Consume-and-ack: a helixmq subscription (handler answers Ack) beside raw
//! lapin `basic_consume` + one `basic.ack` per message, at the same prefetch.
//! Each run drains exactly `messages` messages that are already queued.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use helixmq::{Context, Message, Outcome, SubscribeOptions};
use indicatif::ProgressBar;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::Notify;

use super::report::{Run, Start};
use super::setup::Bench;
use super::Plan;

/// Counts handled messages and wakes the waiter at the target.
#[derive(Clone)]
pub(crate) struct Counter {
    seen: Arc<AtomicU64>,
    target: u64,
    done: Arc<Notify>,
    bar: ProgressBar,
}

impl Counter {
    pub(crate) fn new(target: u64, bar: &ProgressBar) -> Counter {
        Counter {
            seen: Arc::new(AtomicU64::new(0)),
            target,
            done: Arc::new(Notify::new()),
            bar: bar.clone(),
        }
    }

    /// One more handled; returns how many so far.
    pub(crate) fn hit(&self) -> u64 {
        self.bar.inc(1);
        let seen = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if seen == self.target {
            // notify_one keeps a permit if the waiter is not waiting yet.
            self.done.notify_one();
        }
        seen
    }

    /// Wait for the target, failing if nothing arrives for `idle` (a stuck run
    /// must not hang the benchmark).
    pub(crate) async fn wait(&self, idle: Duration) -> anyhow::Result<()> {
        let mut last = self.seen.load(Ordering::Relaxed);
        loop {
            if tokio::time::timeout(idle, self.done.notified())
                .await
                .is_ok()
            {
                return Ok(());
            }
            let now = self.seen.load(Ordering::Relaxed);
            if now == last {
                anyhow::bail!(
                    "stalled: {now} of {} messages consumed, none in the last {idle:?}",
                    self.target
                );
            }
            last = now;
        }
    }
}

/// Quiet time after which a consuming run counts as stuck.
pub(crate) const STALL: Duration = Duration::from_secs(30);

/// helixmq: one subscription, prefetch and concurrency = `prefetch`.
pub(crate) async fn helix(
    bench: &Bench,
    plan: &Plan,
    queue: &str,
    bar: &ProgressBar,
) -> anyhow::Result<Run> {
    let counter = Counter::new(plan.messages, bar);
    let c = counter.clone();
    let handler = move |_m: Message, _ctx: Context| {
        c.hit();
        async { Ok::<_, helixmq::BoxError>(Outcome::Ack) }
    };
    let started = Start::now();
    let sub = bench
        .broker
        .subscribe(
            queue,
            handler,
            SubscribeOptions {
                prefetch: Some(plan.prefetch),
                ..Default::default()
            },
        )
        .await
        .context("helixmq subscribe")?;
    let waited = counter.wait(STALL).await;
    let run = Run::finished(plan.messages, started, bar);
    sub.shutdown(Duration::from_secs(10)).await;
    waited.context("helixmq consume")?;
    Ok(run)
}

/// Raw lapin: `basic.qos(prefetch)`, `basic_consume`, ack each delivery.
pub(crate) async fn raw_lapin(
    bench: &Bench,
    plan: &Plan,
    queue: &str,
    bar: &ProgressBar,
) -> anyhow::Result<Run> {
    let started = Start::now();
    let ch = bench.raw.create_channel().await?;
    ch.basic_qos(plan.prefetch, BasicQosOptions::default())
        .await?;
    let tag = "helixmq-bench-raw";
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("raw lapin basic_consume")?;
    // Acks are pipelined (up to `prefetch` in flight) rather than awaited one
    // by one: awaiting each ack before taking the next delivery serialises on
    // lapin's I/O loop and would make the ceiling artificially low.
    let mut acks = FuturesUnordered::new();
    let mut got = 0;
    while got < plan.messages {
        tokio::select! {
            Some(r) = acks.next(), if !acks.is_empty() => {
                let r: lapin::Result<()> = r;
                r.context("raw lapin ack")?;
                bar.inc(1);
            }
            d = tokio::time::timeout(STALL, consumer.next()) => {
                let d = match d {
                    Err(_) => anyhow::bail!("raw lapin consume stalled at {got} of {}", plan.messages),
                    Ok(None) => anyhow::bail!("raw lapin consumer ended at {got} of {}", plan.messages),
                    Ok(Some(d)) => d.context("raw lapin delivery")?,
                };
                acks.push(async move { d.ack(BasicAckOptions::default()).await.map(|_| ()) });
                got += 1;
            }
        }
    }
    while let Some(r) = acks.next().await {
        r.context("raw lapin ack")?;
        bar.inc(1);
    }
    let run = Run::finished(plan.messages, started, bar);
    let _ = ch
        .basic_cancel(tag.into(), BasicCancelOptions::default())
        .await;
    let _ = ch.close(200, "done".into()).await;
    Ok(run)
}

/// Diagnostic: helixmq's RabbitMQ backend stream alone (`Backend::consume`,
/// then `Acker::ack` per delivery, pipelined like raw lapin's), without the
/// subscription layer (handler tasks, timeouts, metrics). Comparing it with
/// [`helix`] and [`raw_lapin`] places a consume gap in the backend or above it.
pub(crate) async fn helix_backend_stream(
    bench: &Bench,
    plan: &Plan,
    queue: &str,
    bar: &ProgressBar,
) -> anyhow::Result<Run> {
    let started = Start::now();
    let mut stream = bench
        .broker
        .backend()
        .consume(queue, plan.prefetch, "helixmq-bench-stream")
        .await
        .context("helixmq backend consume")?;
    let mut acks = FuturesUnordered::new();
    let mut got = 0;
    while got < plan.messages {
        tokio::select! {
            Some(r) = acks.next(), if !acks.is_empty() => {
                let r: helixmq::Result<()> = r;
                r.context("backend stream ack")?;
                bar.inc(1);
            }
            d = tokio::time::timeout(STALL, stream.next()) => {
                let d = match d {
                    Err(_) => anyhow::bail!("backend stream stalled at {got} of {}", plan.messages),
                    Ok(None) => anyhow::bail!("backend stream ended at {got} of {}", plan.messages),
                    Ok(Some(d)) => d.context("backend stream delivery")?,
                };
                acks.push(async move { d.acker.ack().await });
                got += 1;
            }
        }
    }
    while let Some(r) = acks.next().await {
        r.context("backend stream ack")?;
        bar.inc(1);
    }
    let run = Run::finished(plan.messages, started, bar);
    let _ = stream.cancel().await;
    Ok(run)
}
