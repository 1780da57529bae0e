//! `helixmq bench --request`: request-reply through `Broker::request` and a
//! handler answering `Outcome::Reply`.
//!
//! The requester is the bench's broker; the worker is a subscription on a
//! broker of its own (its own connection, as a worker process would have),
//! answering each request with its payload. Requests are persistent messages
//! to a durable classic queue (like every RabbitMQ figure of the bench);
//! replies are transient (as the library sends them).
//! - **throughput**: `--request-messages` requests with `--request-in-flight`
//!   waiting at once (each of that many tasks sends its next request when its
//!   reply came), per round, median reported; also on the embedded broker.
//! - **latency**: `--request-latency-messages` requests offered at
//!   `--request-rate` per second; each latency runs from the moment the
//!   request was *due* (a tokio interval) to its reply, so a requester that
//!   falls behind shows as latency (no coordinated omission).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use helixmq::topology::Names;
use helixmq::{Broker, Config, Message, Outcome, SubscribeOptions, Subscription, Topology};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::latency::{micros, new_hist, Hist};
use super::setup::Bench;

/// How long one request may wait for its reply in the bench.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The targets on this machine.
const TARGET_PER_SEC: f64 = 2_000.0;
const TARGET_P99_MS: f64 = 20.0;

/// Options of the request-reply benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct RequestBenchArgs {
    /// Run the request-reply benchmark instead of the others: throughput with
    /// requests in flight, latency at a fixed rate (RabbitMQ and embedded).
    #[arg(long)]
    pub request: bool,
    /// Requests of each throughput run.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_messages: u64,
    /// Requests waiting for their reply at once in the throughput runs.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub request_in_flight: u64,
    /// Offered rate (requests/s) of the latency run.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub request_rate: u64,
    /// Requests of the latency run.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub request_latency_messages: u64,
}

/// The request-reply benchmark's figures.
#[derive(Debug, Serialize)]
pub(crate) struct RequestReport {
    load_average_before: String,
    load_average_after: String,
    payload_bytes: usize,
    in_flight: u64,
    /// Throughput runs on RabbitMQ, one per round.
    throughput_rounds: Vec<Throughput>,
    /// The median round.
    throughput_per_sec: f64,
    embedded: Throughput,
    latency: Latency,
    throughput_target_met: bool,
    latency_target_met: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Throughput {
    requests: u64,
    seconds: f64,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Latency {
    requests: u64,
    offered_per_sec: u64,
    achieved_per_sec: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Run the request-reply benchmark and print its summary (or JSON).
pub(crate) async fn run(
    bench: &Bench,
    args: &RequestBenchArgs,
    size: usize,
    rounds: u64,
    json: bool,
) -> anyhow::Result<()> {
    let load_average_before = loadavg();
    let payload = Bytes::from(vec![b'x'; size]);
    // The worker: its own connection, as a worker process would have.
    let worker = Broker::connect(bench.config.clone())
        .await
        .context("the worker cannot connect")?;
    let sub = answer(&worker, &bench.q_latency, args.request_in_flight).await?;
    let res = async {
        let mut throughput_rounds = Vec::new();
        for round in 0..rounds {
            let t = throughput(
                &bench.broker,
                &bench.exchange,
                &bench.q_latency,
                &payload,
                args.request_messages,
                args.request_in_flight,
            )
            .await?;
            eprintln!(
                "request: round {}/{rounds}: {:.0} req/s ({} in flight), p99 {:.2} ms",
                round + 1,
                t.per_sec,
                args.request_in_flight,
                t.p99_ms
            );
            throughput_rounds.push(t);
        }
        let latency = fixed_rate(bench, args, &payload).await?;
        eprintln!(
            "request: at {}/s: p50 {:.2} ms, p99 {:.2} ms",
            args.request_rate, latency.p50_ms, latency.p99_ms
        );
        anyhow::Ok((throughput_rounds, latency))
    }
    .await;
    sub.shutdown(Duration::from_secs(10)).await;
    let _ = worker.close().await;
    let (throughput_rounds, latency) = res?;
    let embedded = embedded(&payload, args).await?;
    eprintln!("request: embedded {:.0} req/s", embedded.per_sec);

    let mut sorted: Vec<f64> = throughput_rounds.iter().map(|t| t.per_sec).collect();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let report = RequestReport {
        load_average_before,
        load_average_after: loadavg(),
        payload_bytes: size,
        in_flight: args.request_in_flight,
        throughput_target_met: median >= TARGET_PER_SEC,
        latency_target_met: latency.p99_ms < TARGET_P99_MS,
        throughput_rounds,
        throughput_per_sec: median,
        embedded,
        latency,
    };
    let text = report.summary();
    if json {
        eprint!("{text}");
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

impl RequestReport {
    fn summary(&self) -> String {
        let met = |ok: bool| if ok { "met" } else { "MISSED" };
        let l = &self.latency;
        format!(
            "request-reply ({} B payload, load {} → {})\n\
             \x20 throughput, {} in flight (RabbitMQ, median of {}): {:.0} req/s   target ≥ {TARGET_PER_SEC:.0}: {}\n\
             \x20 latency at {}/s offered ({:.0}/s achieved, {} requests): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms   target p99 < {TARGET_P99_MS:.0} ms: {}\n\
             \x20 embedded broker, {} in flight: {:.0} req/s (p99 {:.2} ms)\n",
            self.payload_bytes,
            self.load_average_before,
            self.load_average_after,
            self.in_flight,
            self.throughput_rounds.len(),
            self.throughput_per_sec,
            met(self.throughput_target_met),
            l.offered_per_sec,
            l.achieved_per_sec,
            l.requests,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            met(self.latency_target_met),
            self.in_flight,
            self.embedded.per_sec,
            self.embedded.p99_ms,
        )
    }
}

/// A subscription on `queue` answering every request with its payload.
async fn answer(broker: &Broker, queue: &str, in_flight: u64) -> anyhow::Result<Subscription> {
    let prefetch = (in_flight * 2).min(u16::MAX as u64) as u16;
    broker
        .subscribe(
            queue,
            |m: Message, _ctx| async move {
                Ok::<_, helixmq::BoxError>(Outcome::reply(Message::new(m.payload.clone())))
            },
            SubscribeOptions {
                prefetch: Some(prefetch),
                concurrency: Some(in_flight as usize),
                ..Default::default()
            },
        )
        .await
        .context("helixmq subscribe (request worker)")
}

/// `n` requests, `in_flight` tasks each sending its next one on its reply.
async fn throughput(
    requester: &Broker,
    exchange: &str,
    key: &str,
    payload: &Bytes,
    n: u64,
    in_flight: u64,
) -> anyhow::Result<Throughput> {
    let next = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(new_hist()));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..in_flight {
        let (b, ex, key, payload, next, hist) = (
            requester.clone(),
            exchange.to_string(),
            key.to_string(),
            payload.clone(),
            next.clone(),
            hist.clone(),
        );
        tasks.spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let sent = Instant::now();
                let reply = b
                    .request(&ex, &key, Message::new(payload.clone()), REQUEST_TIMEOUT)
                    .await?;
                hist.lock()
                    .unwrap()
                    .saturating_record(micros(sent.elapsed()));
                anyhow::ensure!(reply.payload == payload, "a reply with another payload");
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.context("request task")?.context("request")?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let h = hist.lock().unwrap().clone();
    Ok(Throughput {
        requests: n,
        seconds,
        per_sec: n as f64 / seconds,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p99_ms: ms(h.value_at_quantile(0.99)),
    })
}

/// Requests offered at a fixed rate, latency from each one's due time.
async fn fixed_rate(
    bench: &Bench,
    args: &RequestBenchArgs,
    payload: &Bytes,
) -> anyhow::Result<Latency> {
    let n = args.request_latency_messages;
    let hist: Arc<Mutex<Hist>> = Arc::new(Mutex::new(new_hist()));
    let period = Duration::from_secs_f64(1.0 / args.request_rate as f64);
    let mut ticks = tokio::time::interval(period);
    // Bounded: a stalled broker stops the offering instead of piling up tasks.
    let permits = Arc::new(Semaphore::new(4_096));
    let mut tasks = JoinSet::new();
    let mut first = None;
    for _ in 0..n {
        let due = ticks.tick().await.into_std();
        first.get_or_insert(due);
        let permit = permits.clone().acquire_owned().await?;
        let (b, ex, key, payload, hist) = (
            bench.broker.clone(),
            bench.exchange.clone(),
            bench.q_latency.clone(),
            payload.clone(),
            hist.clone(),
        );
        tasks.spawn(async move {
            let r = b
                .request(&ex, &key, Message::new(payload), REQUEST_TIMEOUT)
                .await;
            hist.lock()
                .unwrap()
                .saturating_record(micros(due.elapsed()));
            drop(permit);
            r.map(|_| ())
        });
        while let Some(r) = tasks.try_join_next() {
            r.context("request task")?.context("request")?;
        }
    }
    let achieved = n as f64 / first.map_or(1e-9, |f| f.elapsed().as_secs_f64().max(1e-9));
    while let Some(r) = tasks.join_next().await {
        r.context("request task")?.context("request")?;
    }
    let h = hist.lock().unwrap().clone();
    Ok(Latency {
        requests: n,
        offered_per_sec: args.request_rate,
        achieved_per_sec: achieved,
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
    })
}

/// The throughput run on the embedded broker (one process, no network).
async fn embedded(payload: &Bytes, args: &RequestBenchArgs) -> anyhow::Result<Throughput> {
    let broker = Broker::embedded(Config::default());
    let names = Names::default();
    broker.declare(&Topology::spec(&names)).await?;
    let sub = answer(&broker, &names.task_queue("llm"), args.request_in_flight).await?;
    let t = throughput(
        &broker,
        &names.tasks_exchange(),
        "llm",
        payload,
        args.request_messages,
        args.request_in_flight,
    )
    .await;
    sub.shutdown(Duration::from_secs(10)).await;
    let _ = broker.close().await;
    t
}
