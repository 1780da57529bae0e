//! End-to-end latency through helixmq: from the moment a message is due to be
//! published to the moment its handler runs, recorded in an HDR histogram.
//!
//! The fixed-rate run stamps each message with its *scheduled* send time (a
//! tokio interval at `--rate`), so a publisher that falls behind shows up as
//! latency instead of being hidden (no coordinated omission). The saturation
//! run publishes as fast as `--window` confirms in flight allow, with a
//! consumer draining the same queue.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use helixmq::{Message, Outcome, SubscribeOptions};
use indicatif::ProgressBar;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::consume::{Counter, STALL};
use super::publish::publish_with_tasks;
use super::setup::Bench;
use super::Plan;

/// Microsecond histogram, 1 µs to 1 h, 3 significant digits.
pub(crate) type Hist = Histogram<u64>;

pub(crate) fn new_hist() -> Hist {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

/// One latency run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LatencyRun {
    /// Messages measured.
    pub messages: u64,
    /// Offered rate (messages/s); `null` at saturation.
    pub offered_per_sec: Option<f64>,
    /// Rate at which messages were actually published.
    pub achieved_per_sec: f64,
    /// End to end (publish due → handler), milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
    /// Publish due → confirm received, milliseconds.
    pub confirm_p50_ms: f64,
    pub confirm_p99_ms: f64,
    /// The end-to-end histogram, for the plot.
    #[serde(skip)]
    pub hist: Hist,
}

impl LatencyRun {
    fn new(messages: u64, offered: Option<f64>, achieved: f64, e2e: Hist, confirm: &Hist) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        LatencyRun {
            messages,
            offered_per_sec: offered,
            achieved_per_sec: achieved,
            p50_ms: ms(e2e.value_at_quantile(0.50)),
            p99_ms: ms(e2e.value_at_quantile(0.99)),
            p999_ms: ms(e2e.value_at_quantile(0.999)),
            max_ms: ms(e2e.max()),
            mean_ms: e2e.mean() / 1000.0,
            confirm_p50_ms: ms(confirm.value_at_quantile(0.50)),
            confirm_p99_ms: ms(confirm.value_at_quantile(0.99)),
            hist: e2e,
        }
    }
}

/// The clock every stamp is relative to (one process: no clock skew).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// A payload of `size` bytes starting with `at` (nanoseconds since [`epoch`]).
fn stamped(size: usize, at: Instant) -> Bytes {
    let nanos = at.saturating_duration_since(epoch()).as_nanos() as u64;
    let mut b = BytesMut::zeroed(size.max(8));
    b[..8].copy_from_slice(&nanos.to_le_bytes());
    b.freeze()
}

fn stamp_of(payload: &[u8]) -> Option<Instant> {
    let nanos = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    Some(epoch() + Duration::from_nanos(nanos))
}

pub(crate) fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// A subscription on the latency queue recording into `hist`.
async fn recorder(
    bench: &Bench,
    plan: &Plan,
    counter: Counter,
    hist: Arc<Mutex<Hist>>,
) -> anyhow::Result<helixmq::Subscription> {
    let handler = move |m: Message, _ctx: helixmq::Context| {
        if let Some(sent) = stamp_of(&m.payload) {
            hist.lock()
                .unwrap()
                .saturating_record(micros(sent.elapsed()));
        }
        counter.hit();
        async { Ok::<_, helixmq::BoxError>(Outcome::Ack) }
    };
    bench
        .broker
        .subscribe(
            &bench.q_latency,
            handler,
            SubscribeOptions {
                prefetch: Some(plan.prefetch),
                ..Default::default()
            },
        )
        .await
        .context("helixmq subscribe (latency)")
}

/// `latency_messages` messages offered at `rate` per second.
pub(crate) async fn fixed_rate(
    bench: &Bench,
    plan: &Plan,
    bar: &ProgressBar,
) -> anyhow::Result<LatencyRun> {
    let n = plan.latency_messages;
    let e2e = Arc::new(Mutex::new(new_hist()));
    let confirm = Arc::new(Mutex::new(new_hist()));
    let counter = Counter::new(n, bar);
    let sub = recorder(bench, plan, counter.clone(), e2e.clone()).await?;

    let period = Duration::from_secs_f64(1.0 / plan.rate as f64);
    let mut ticks = tokio::time::interval(period);
    // Burst (the default) catches up on missed ticks: the offered rate holds.
    let permits = Arc::new(Semaphore::new(plan.window));
    let mut sends = JoinSet::new();
    let mut first = None;
    for _ in 0..n {
        let due = ticks.tick().await.into_std();
        first.get_or_insert(due);
        let permit = permits.clone().acquire_owned().await?;
        let (broker, ex, q, confirm) = (
            bench.broker.clone(),
            bench.exchange.clone(),
            bench.q_latency.clone(),
            confirm.clone(),
        );
        let payload = stamped(plan.size, due);
        sends.spawn(async move {
            let r = broker.publish(&ex, &q, Message::new(payload)).await;
            confirm
                .lock()
                .unwrap()
                .saturating_record(micros(due.elapsed()));
            drop(permit);
            r
        });
        while let Some(r) = sends.try_join_next() {
            r.context("publish task")?.context("helixmq publish")?;
        }
    }
    let achieved = n as f64 / first.map_or(1e-9, |f| f.elapsed().as_secs_f64().max(1e-9));
    while let Some(r) = sends.join_next().await {
        r.context("publish task")?.context("helixmq publish")?;
    }
    let waited = counter.wait(STALL).await;
    sub.shutdown(Duration::from_secs(10)).await;
    waited.context("latency consumer")?;
    bar.finish_and_clear();
    let e2e = e2e.lock().unwrap().clone();
    let confirm = confirm.lock().unwrap().clone();
    Ok(LatencyRun::new(
        n,
        Some(plan.rate as f64),
        achieved,
        e2e,
        &confirm,
    ))
}

/// `latency_messages` messages as fast as the confirm window allows.
pub(crate) async fn saturation(
    bench: &Bench,
    plan: &Plan,
    bar: &ProgressBar,
) -> anyhow::Result<LatencyRun> {
    let n = plan.latency_messages;
    let e2e = Arc::new(Mutex::new(new_hist()));
    let counter = Counter::new(n, bar);
    let sub = recorder(bench, plan, counter.clone(), e2e.clone()).await?;
    let started = Instant::now();
    let size = plan.size;
    let hidden = ProgressBar::hidden();
    let confirm = Arc::new(Mutex::new(new_hist()));
    let published = publish_with_tasks(
        &bench.broker,
        &bench.exchange,
        &bench.q_latency,
        (n, plan.window),
        &hidden,
        Some(confirm.clone()),
        move |_| stamped(size, Instant::now()),
    )
    .await;
    let achieved = n as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let waited = match published {
        Ok(()) => counter.wait(STALL).await,
        Err(e) => Err(e),
    };
    sub.shutdown(Duration::from_secs(10)).await;
    waited.context("latency at saturation")?;
    bar.finish_and_clear();
    let e2e = e2e.lock().unwrap().clone();
    let confirm = confirm.lock().unwrap().clone();
    Ok(LatencyRun::new(n, None, achieved, e2e, &confirm))
}
