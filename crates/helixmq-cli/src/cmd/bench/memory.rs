//! Resident memory: peak (`VmHWM`) and current (`VmRSS`) from
//! `/proc/self/status`, noted after each phase, and the soak run that shows
//! whether memory grows with the number of messages.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use helixmq::{Message, Outcome, SubscribeOptions};
use indicatif::ProgressBar;
use serde::Serialize;

use super::consume::{Counter, STALL};
use super::publish::publish_with_tasks;
use super::setup::Bench;
use super::Plan;

/// Memory figures.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct MemoryReport {
    /// Peak resident set size of the whole run (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// VmRSS after each phase, KiB.
    pub rss_after_phase: Vec<PhaseRss>,
    /// The soak run.
    pub soak: Option<SoakReport>,
}

/// VmRSS after one phase.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct PhaseRss {
    pub phase: String,
    pub rss_kib: u64,
}

/// Publishing and consuming `messages` at once through helixmq, VmRSS sampled
/// every tenth of the run.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SoakReport {
    pub messages: u64,
    pub per_sec: f64,
    pub samples: Vec<SoakSample>,
    /// Last sample minus the baseline (the sample at 20 % of the run, after
    /// allocator and channel buffers warmed up), KiB.
    pub growth_kib: i64,
    /// Growth ≤ max(8 MiB, 10 % of the baseline).
    pub flat: bool,
}

/// VmRSS after `consumed` messages.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SoakSample {
    pub consumed: u64,
    pub rss_kib: u64,
}

/// A `kB` field of `/proc/self/status` (Linux); 0 where it does not exist.
pub(crate) fn status_kib(field: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else {
        return 0;
    };
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Record VmRSS after `phase`.
pub(crate) fn note(m: &mut MemoryReport, phase: &str) {
    m.rss_after_phase.push(PhaseRss {
        phase: phase.to_string(),
        rss_kib: status_kib("VmRSS"),
    });
}

/// The soak run on the soak queue.
pub(crate) async fn soak(
    bench: &Bench,
    plan: &Plan,
    payload: &Bytes,
    bar: &ProgressBar,
) -> anyhow::Result<SoakReport> {
    let n = plan.soak_messages;
    let every = (n / 10).max(1);
    let samples = Arc::new(Mutex::new(vec![SoakSample {
        consumed: 0,
        rss_kib: status_kib("VmRSS"),
    }]));
    let counter = Counter::new(n, bar);
    let (c, s) = (counter.clone(), samples.clone());
    let handler = move |_m: Message, _ctx: helixmq::Context| {
        let seen = c.hit();
        if seen % every == 0 {
            s.lock().unwrap().push(SoakSample {
                consumed: seen,
                rss_kib: status_kib("VmRSS"),
            });
        }
        async { Ok::<_, helixmq::BoxError>(Outcome::Ack) }
    };
    let started = Instant::now();
    let sub = bench
        .broker
        .subscribe(
            &bench.q_soak,
            handler,
            SubscribeOptions {
                prefetch: Some(plan.prefetch),
                ..Default::default()
            },
        )
        .await
        .context("helixmq subscribe (soak)")?;
    let p = payload.clone();
    let published = publish_with_tasks(
        &bench.broker,
        &bench.exchange,
        &bench.q_soak,
        (n, plan.window),
        &ProgressBar::hidden(),
        None,
        move |_| p.clone(),
    )
    .await;
    let waited = match published {
        Ok(()) => counter.wait(STALL).await,
        Err(e) => Err(e),
    };
    let per_sec = n as f64 / started.elapsed().as_secs_f64();
    sub.shutdown(Duration::from_secs(10)).await;
    waited.context("soak")?;
    bar.finish_and_clear();
    let samples = samples.lock().unwrap().clone();
    let baseline = samples
        .get(samples.len() / 5)
        .or(samples.first())
        .map_or(0, |s| s.rss_kib) as i64;
    let last = samples.last().map_or(0, |s| s.rss_kib) as i64;
    let growth = last - baseline;
    Ok(SoakReport {
        messages: n,
        per_sec,
        growth_kib: growth,
        flat: growth <= (8 * 1024).max(baseline / 10),
        samples,
    })
}
