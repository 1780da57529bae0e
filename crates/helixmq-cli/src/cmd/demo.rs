//! `helixmq demo`: the spec's flows end to end, the first thing a new user runs.
//!
//! On RabbitMQ when it is reachable (else the embedded broker), under a private
//! prefix (`<prefix>.demo-<random>`, deleted at the end):
//! - LLM requests at mixed priorities, published in random order, served by a
//!   single consumer: the higher priorities come out first;
//! - background, debate, verification and notification jobs on the task exchange;
//! - debate rounds and verification events on the topic exchange (and the audit
//!   queue that sees every event);
//! - notifications broadcast to the websocket, SSE and webhook queues;
//! - some handlers fail once and succeed on retry, some messages are poison
//!   (straight to the DLQ), some fail every attempt (DLQ after max attempts).
//!
//! It exits 0 only if every message is accounted for: processed, or in the DLQ
//! exactly when it was meant to end there.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use futures::future::join_all;
use futures::StreamExt;
use helixmq::message::header;
use helixmq::{
    Broker, Config, Message, Names, Outcome, Priority, PublishOptions, RetryPolicy,
    SubscribeOptions, Topology,
};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::common::{endpoint, load_config, MetricsServer};
use crate::Global;

/// Retry delay of the demo: short, so retries come back within the run.
const RETRY_DELAY: Duration = Duration::from_millis(500);
/// Attempts before the DLQ.
const MAX_ATTEMPTS: u32 = 3;

/// Which broker to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BrokerChoice {
    /// RabbitMQ if reachable at the configured address, else the embedded broker.
    Auto,
    /// The embedded in-process broker.
    Memory,
    /// RabbitMQ (fail if it is not reachable).
    Rabbitmq,
}

/// `helixmq demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Which broker to use (default: auto). Without --broker, a RabbitMQ that
    /// refuses the login is an error (exit 1) with the fix; `--broker auto` given
    /// explicitly falls back to the embedded broker instead, and says why.
    #[arg(long, value_enum)]
    pub broker: Option<BrokerChoice>,
    /// Background jobs to publish (the other flows scale with it).
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(20..=100_000))]
    pub jobs: u32,
    /// Give up waiting for the flows after this long.
    #[arg(long, default_value = "50s", value_parser = crate::common::parse_duration)]
    pub deadline: Duration,
    /// Keep the demo's queues and exchanges on RabbitMQ (default: delete them).
    #[arg(long)]
    pub keep: bool,
    /// Serve Prometheus `GET /metrics` and `GET /health` on this address while the demo runs.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// What a demo message is meant to do; decided at publish time so the end
/// state can be checked exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Fate {
    /// Succeeds at once.
    Ok,
    /// Fails on its first attempt (a simulated timeout), succeeds on retry.
    Flaky,
    /// Rejected as malformed: straight to the DLQ.
    Poison,
    /// Fails every attempt: DLQ after MAX_ATTEMPTS.
    Doomed,
}

impl Fate {
    fn of(i: u32) -> Fate {
        match i {
            _ if i % 97 == 13 => Fate::Poison,
            _ if i % 89 == 41 => Fate::Doomed,
            _ if i % 16 == 7 => Fate::Flaky,
            _ => Fate::Ok,
        }
    }
    fn ends_in_dlq(self) -> bool {
        matches!(self, Fate::Poison | Fate::Doomed)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Payload {
    n: u32,
    fate: Fate,
    /// Unix microseconds at publish, for end-to-end latency.
    sent_us: u64,
    #[serde(default)]
    text: String,
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Counters of one queue.
#[derive(Default)]
struct QueueTally {
    published: AtomicU64,
    expect_processed: AtomicU64,
    expect_dead: AtomicU64,
    processed: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    duplicates: AtomicU64,
    /// End-to-end latency of processed messages, microseconds.
    latencies: Mutex<Vec<u64>>,
    /// Ids processed, to count duplicates (at-least-once delivery).
    seen: Mutex<HashSet<String>>,
}

/// Everything the handlers report into.
struct Tally {
    queues: BTreeMap<String, QueueTally>,
    /// Processed + dead-lettered deliveries, for the progress bar and the end condition.
    settled: AtomicU64,
    changed: Notify,
    /// Priorities of LLM requests in the order their first attempt was served.
    llm_order: Mutex<Vec<u8>>,
    dlq_reasons: Mutex<BTreeMap<String, u64>>,
}

impl Tally {
    fn q(&self, name: &str) -> Option<&QueueTally> {
        self.queues.get(name)
    }
    fn settle(&self) {
        self.settled.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }
}

/// Run `demo`.
pub async fn run(global: &Global, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = load_config(global)?;
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..6].to_string();
    let prefix = format!("{}.demo-{suffix}", cfg.helixmq.prefix);
    cfg.helixmq.prefix = prefix.clone();
    cfg.helixmq.retry_delay = RETRY_DELAY;
    cfg.helixmq.max_attempts = MAX_ATTEMPTS;

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = helixmq::Metrics::new(&mut registry);
    let (broker, how) = choose_broker(&cfg, args.broker, metrics).await?;
    let server = match args.metrics_addr {
        Some(addr) => Some(
            MetricsServer::start(addr, helixmq::http::HealthSource::new(&broker), registry).await?,
        ),
        None => None,
    };
    outln!("helixmq demo");
    outln!("  broker:  {how}");
    outln!(
        "  prefix:  {prefix} (private to this run{})",
        if args.keep {
            ", kept"
        } else {
            ", deleted at the end"
        }
    );
    outln!(
        "  retries: {MAX_ATTEMPTS} attempts, {} apart; then the DLQ",
        humantime::format_duration(RETRY_DELAY)
    );
    outln!();

    let names = Names::new(prefix.clone());
    let mut topology = Topology::spec(&names);
    topology.add_retry_tier(RETRY_DELAY);
    // Ctrl-C at any point still deletes what the demo declared on RabbitMQ.
    let res = tokio::select! {
        r = run_flows(&broker, &names, &topology, &args) => r,
        _ = tokio::signal::ctrl_c() => {
            outln!("interrupted: cleaning up");
            Ok(ExitCode::from(130))
        }
    };
    if broker.backend_kind() == helixmq::BackendKind::RabbitMq && !args.keep {
        cleanup(&broker).await;
    }
    if let Some(s) = server {
        s.stop().await;
    }
    let _ = broker.close().await;
    res
}

/// What a user whose login RabbitMQ refused must do, shown prominently (stderr).
fn login_refused_help(cfg: &Config, at: &str, e: &helixmq::Error) -> String {
    let user = &cfg.rabbitmq.username;
    // The demo runs under `<prefix>.demo-<random>`; the permission is the user's prefix.
    let prefix = cfg
        .helixmq
        .prefix
        .rsplit_once(".demo-")
        .map_or(cfg.helixmq.prefix.as_str(), |(p, _)| p);
    let perm = format!("'^{}\\..*'", prefix.replace('.', "\\."));
    let bar = "=".repeat(78);
    format!(
        "{bar}\n\
         RabbitMQ at {at} is running but REFUSED THE LOGIN of user '{user}':\n  {e}\n\
         \n\
         The spec's user must exist on the broker with its permissions. Fix, one of:\n\
         \x20 sudo rabbitmqctl add_user {user} '<password>'   # then RABBITMQ_PASSWORD=<password>\n\
         \x20 sudo rabbitmqctl set_permissions -p {vhost} {user} {perm} {perm} {perm}\n\
         \x20 sudo rabbitmqctl set_user_tags {user} management   # for `stats` and `topology diff`\n\
         or  scripts/provision        (creates the spec's user helixagent with the configuration's default password)\n\
         or  RABBITMQ_USER=guest RABBITMQ_PASSWORD=guest helixmq demo   (a local broker's guest)\n\
         {bar}",
        vhost = cfg.rabbitmq.vhost,
    )
}

async fn choose_broker(
    cfg: &Config,
    choice: Option<BrokerChoice>,
    metrics: helixmq::Metrics,
) -> anyhow::Result<(Broker, String)> {
    let explicit = choice.is_some();
    let choice = choice.unwrap_or(BrokerChoice::Auto);
    let embedded = |m: helixmq::Metrics| {
        Broker::with_backend(
            Arc::new(helixmq::backend::memory::MemoryBroker::new()),
            cfg.clone(),
            m,
        )
    };
    let at = format!("{} (vhost '{}')", endpoint(cfg), cfg.rabbitmq.vhost);
    match choice {
        BrokerChoice::Memory => Ok((
            embedded(metrics.clone()),
            "embedded (in-process), as asked".into(),
        )),
        BrokerChoice::Rabbitmq => {
            let b = Broker::connect_with_metrics(cfg.clone(), metrics.clone())
                .await
                .with_context(|| format!("cannot connect to RabbitMQ at {at}"))?;
            Ok((b, format!("RabbitMQ at {at}")))
        }
        BrokerChoice::Auto => {
            // A short probe first: a new user without RabbitMQ should not wait for connect_timeout.
            let addr = endpoint(cfg);
            let probe = tokio::time::timeout(
                Duration::from_millis(800),
                tokio::net::TcpStream::connect(&addr),
            )
            .await;
            if !matches!(probe, Ok(Ok(_))) {
                return Ok((
                    embedded(metrics.clone()),
                    format!("embedded (in-process): nothing listens at {addr}; start RabbitMQ to run the demo on it"),
                ));
            }
            let mut quick = cfg.clone();
            quick.rabbitmq.connect_timeout =
                quick.rabbitmq.connect_timeout.min(Duration::from_secs(5));
            match tokio::time::timeout(
                Duration::from_secs(8),
                Broker::connect_with_metrics(quick, metrics.clone()),
            )
            .await
            {
                Ok(Ok(b)) => Ok((b, format!("RabbitMQ at {at}"))),
                // Reachable but the login is refused: a set-up problem the user must
                // see, not a reason to quietly run somewhere else.
                Ok(Err(e @ helixmq::Error::AccessRefused { .. })) => {
                    eprintln!("{}", login_refused_help(cfg, &at, &e));
                    if !explicit {
                        anyhow::bail!(
                            "RabbitMQ at {at} refused the login of user '{}' (see above); \
                             fix the user, or run `helixmq demo --broker auto` to fall back to \
                             the embedded broker (or `--broker memory`)",
                            cfg.rabbitmq.username
                        );
                    }
                    Ok((
                        embedded(metrics.clone()),
                        format!(
                            "embedded (in-process): RabbitMQ at {at} REFUSED THE LOGIN of user '{}' (fix on stderr); --broker auto falls back",
                            cfg.rabbitmq.username
                        ),
                    ))
                }
                Ok(Err(e)) => Ok((
                    embedded(metrics.clone()),
                    format!("embedded (in-process): RabbitMQ at {at} refused the connection: {e}"),
                )),
                Err(_) => Ok((
                    embedded(metrics.clone()),
                    format!("embedded (in-process): RabbitMQ at {at} did not answer in time"),
                )),
            }
        }
    }
}

/// One message to publish.
struct Out {
    exchange: String,
    key: String,
    kind: String,
    priority: Option<Priority>,
    payload: Payload,
}

async fn run_flows(
    broker: &Broker,
    names: &Names,
    topology: &Topology,
    args: &DemoArgs,
) -> anyhow::Result<ExitCode> {
    broker
        .declare(topology)
        .await
        .context("cannot declare the demo topology")?;

    // --- Plan every message and what should become of it, per queue it reaches.
    let jobs = args.jobs;
    let mut plan: Vec<Out> = Vec::new();
    let mut counter = 0u32;
    let mut add = |plan: &mut Vec<Out>,
                   exchange: String,
                   key: String,
                   kind: &str,
                   text: String,
                   prio: Option<Priority>| {
        counter += 1;
        let fate = Fate::of(counter);
        plan.push(Out {
            exchange,
            key,
            kind: kind.to_string(),
            priority: prio,
            payload: Payload {
                n: counter,
                fate,
                sent_us: 0,
                text,
            },
        });
    };
    let tasks = names.tasks_exchange();
    let events = names.events_exchange();
    let notes = names.notifications_exchange();
    // LLM requests: equal numbers per level, published in random order.
    let levels = [
        Priority::LOW,
        Priority::NORMAL,
        Priority::HIGH,
        Priority::CRITICAL,
    ];
    let mut llm: Vec<Priority> = (0..jobs / 2).map(|i| levels[i as usize % 4]).collect();
    llm.shuffle(&mut rand::rng());
    for p in llm {
        add(
            &mut plan,
            tasks.clone(),
            "llm".into(),
            "llm.request",
            format!("prompt at priority {}", p.value()),
            Some(p),
        );
    }
    for i in 0..jobs {
        add(
            &mut plan,
            tasks.clone(),
            "background".into(),
            "job.background",
            format!("job {i}"),
            None,
        );
    }
    for kind in ["debate", "verification", "notifications"] {
        for i in 0..jobs / 4 {
            add(
                &mut plan,
                tasks.clone(),
                kind.into(),
                &format!("task.{kind}"),
                format!("{kind} task {i}"),
                None,
            );
        }
    }
    for i in 0..jobs * 3 / 8 {
        add(
            &mut plan,
            events.clone(),
            format!("debate.round.{}", i % 5 + 1),
            "event.debate",
            format!("round {i}"),
            None,
        );
    }
    for (i, provider) in
        (0..jobs / 4).zip(["openai", "anthropic", "mistral", "local"].iter().cycle())
    {
        add(
            &mut plan,
            events.clone(),
            format!("verification.{provider}"),
            "event.verify",
            format!("check {i}"),
            None,
        );
    }
    for i in 0..jobs / 8 {
        add(
            &mut plan,
            events.clone(),
            "system.audit".into(),
            "event.audit",
            format!("audit {i}"),
            None,
        );
    }
    for i in 0..jobs / 4 {
        add(
            &mut plan,
            notes.clone(),
            String::new(),
            "notification",
            format!("notification {i}"),
            None,
        );
    }

    let mut queues = BTreeMap::new();
    for q in topology
        .queues
        .iter()
        .filter(|q| is_work_queue(names, &q.name))
    {
        queues.insert(q.name.clone(), QueueTally::default());
    }
    let tally = Arc::new(Tally {
        queues,
        settled: AtomicU64::new(0),
        changed: Notify::new(),
        llm_order: Mutex::new(Vec::new()),
        dlq_reasons: Mutex::new(BTreeMap::new()),
    });
    let mut total_deliveries = 0u64;
    for o in &plan {
        for q in topology.route(&o.exchange, &o.key) {
            let t = tally.q(&q.name).expect("routes reach work queues");
            t.published.fetch_add(1, Ordering::Relaxed);
            if o.payload.fate.ends_in_dlq() {
                t.expect_dead.fetch_add(1, Ordering::Relaxed);
            } else {
                t.expect_processed.fetch_add(1, Ordering::Relaxed);
            }
            total_deliveries += 1;
        }
    }

    // --- Publish everything (pipelined, confirmed) before any consumer starts, so
    // the LLM queue holds every priority when its single consumer begins.
    let bar_style = ProgressStyle::with_template(
        "{spinner:.green} {msg:<11} [{bar:40.cyan/blue}] {pos}/{len} {rate}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key(
        "rate",
        |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}/s", s.per_sec());
        },
    )
    .progress_chars("=> ");
    let bar = ProgressBar::new(plan.len() as u64)
        .with_style(bar_style.clone())
        .with_message("publishing");
    bar.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let mut groups: BTreeMap<(String, String), Vec<Message>> = BTreeMap::new();
    for mut o in plan {
        o.payload.sent_us = now_us();
        let mut m = Message::json(&o.payload)?.with_kind(o.kind);
        m.priority = o.priority;
        groups.entry((o.exchange, o.key)).or_default().push(m);
    }
    let opts = PublishOptions::default();
    let (bar_ref, opts_ref) = (&bar, &opts);
    let publishes = groups.iter().flat_map(|((x, k), msgs)| {
        msgs.chunks(250).map(move |chunk| {
            let (bar, opts) = (bar_ref.clone(), opts_ref.clone());
            async move {
                let r = broker.publish_batch(x, k, chunk, &opts).await;
                bar.inc(chunk.len() as u64);
                r
            }
        })
    });
    let mut publish_errors = Vec::new();
    // A few batches in flight at once: many confirms pending, and a bar that moves.
    let results: Vec<Vec<helixmq::Result<()>>> = futures::stream::iter(publishes)
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results.into_iter().flatten() {
        if let Err(e) = r {
            publish_errors.push(e.to_string());
        }
    }
    let publish_time = started.elapsed();
    bar.finish_and_clear();
    let published: u64 = tally
        .queues
        .values()
        .map(|q| q.published.load(Ordering::Relaxed))
        .sum();
    let messages = groups.values().map(Vec::len).sum::<usize>();
    if !publish_errors.is_empty() {
        anyhow::bail!(
            "{} publish(es) failed, e.g.: {}",
            publish_errors.len(),
            publish_errors[0]
        );
    }
    outln!(
        "published {messages} messages ({published} queue deliveries) with confirms in {:.2}s ({:.0} msg/s)",
        publish_time.as_secs_f64(),
        messages as f64 / publish_time.as_secs_f64().max(1e-6)
    );

    // --- Consume every work queue, and the DLQ to see what ended there.
    let mut subs = Vec::new();
    let llm_queue = names.task_queue("llm");
    for name in tally.queues.keys() {
        let is_llm = *name == llm_queue;
        let opts = SubscribeOptions {
            // One at a time on the LLM queue, so the order served is the queue's order.
            prefetch: Some(if is_llm { 1 } else { 20 }),
            concurrency: Some(if is_llm { 1 } else { 8 }),
            retry: Some(RetryPolicy {
                max_attempts: MAX_ATTEMPTS,
                delays: vec![RETRY_DELAY],
            }),
            ..SubscribeOptions::default()
        };
        let (t, q) = (tally.clone(), name.clone());
        let handler = move |m: Message, _ctx: helixmq::Context| {
            let (t, q) = (t.clone(), q.clone());
            async move { Ok::<_, helixmq::BoxError>(work(&t, &q, is_llm, m).await) }
        };
        subs.push(
            broker
                .subscribe(name, handler, opts)
                .await
                .with_context(|| format!("cannot consume {name}"))?,
        );
    }
    let t = tally.clone();
    let dlq_handler = move |m: Message, _ctx: helixmq::Context| {
        let t = t.clone();
        async move {
            let origin = m
                .header_str(header::ORIGIN_QUEUE)
                .unwrap_or_default()
                .to_string();
            let reason = m.header_str(header::DEAD_LETTER_REASON).unwrap_or("?");
            let short = if reason.starts_with("gave up") {
                "gave up after 3 attempts"
            } else {
                "rejected as poison"
            };
            *t.dlq_reasons
                .lock()
                .unwrap()
                .entry(short.to_string())
                .or_default() += 1;
            if let Some(q) = t.q(&origin) {
                if q.seen.lock().unwrap().insert(format!("dlq:{}", m.id)) {
                    q.dead.fetch_add(1, Ordering::Relaxed);
                    t.settle();
                } else {
                    q.duplicates.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok::<_, helixmq::BoxError>(Outcome::Ack)
        }
    };
    subs.push(
        broker
            .subscribe(&names.dlq(), dlq_handler, SubscribeOptions::default())
            .await?,
    );

    let bar = ProgressBar::new(total_deliveries)
        .with_style(bar_style)
        .with_message("processing");
    bar.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + args.deadline;
    loop {
        let done = tally.settled.load(Ordering::Relaxed);
        bar.set_position(done);
        if done >= total_deliveries {
            break;
        }
        tokio::select! {
            _ = tally.changed.notified() => {}
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    let process_time = started.elapsed();
    bar.finish_and_clear();
    join_all(subs.into_iter().map(|s| s.shutdown(Duration::from_secs(2)))).await;
    report(&tally, names, total_deliveries, process_time)
}

/// Work queues: every queue the demo consumes (not the DLQ nor retry tiers).
fn is_work_queue(names: &Names, q: &str) -> bool {
    let retry = names.retry_tier(RETRY_DELAY);
    q != names.dlq() && q != retry && q != names.retry_tier(helixmq::topology::DEFAULT_RETRY_DELAY)
}

/// The demo handler: simulated work, then the outcome the message's fate asks for.
async fn work(t: &Tally, queue: &str, is_llm: bool, m: Message) -> Outcome {
    let p: Payload = match m.parse_json() {
        Ok(p) => p,
        Err(e) => return Outcome::dead_letter(e.to_string()),
    };
    if is_llm && m.attempt == 1 {
        t.llm_order
            .lock()
            .unwrap()
            .push(m.priority.map(|p| p.value()).unwrap_or(0));
    }
    // Simulated work: a few hundred microseconds, like a fast handler.
    tokio::time::sleep(Duration::from_micros(200 + (p.n as u64 * 37) % 600)).await;
    let Some(q) = t.q(queue) else {
        return Outcome::Ack;
    };
    let processed = |q: &QueueTally| {
        if q.seen.lock().unwrap().insert(m.id.clone()) {
            q.processed.fetch_add(1, Ordering::Relaxed);
            q.latencies
                .lock()
                .unwrap()
                .push(now_us().saturating_sub(p.sent_us));
            t.settle();
        } else {
            q.duplicates.fetch_add(1, Ordering::Relaxed);
        }
        Outcome::Ack
    };
    match p.fate {
        Fate::Ok => processed(q),
        Fate::Flaky if m.attempt == 1 => {
            q.retried.fetch_add(1, Ordering::Relaxed);
            Outcome::retry("upstream timed out (simulated); the next attempt succeeds")
        }
        Fate::Flaky => processed(q),
        Fate::Poison => Outcome::dead_letter("malformed request (simulated poison message)"),
        Fate::Doomed => {
            if m.attempt < MAX_ATTEMPTS {
                q.retried.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::retry("provider unavailable (simulated, every attempt)")
        }
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn report(t: &Tally, names: &Names, total: u64, took: Duration) -> anyhow::Result<ExitCode> {
    let strip = format!("{}.", names.prefix());
    outln!();
    outln!(
        "{:<24} {:>9} {:>9} {:>7} {:>6} {:>5} {:>8} {:>8}",
        "QUEUE",
        "PUBLISHED",
        "PROCESSED",
        "RETRIED",
        "DLQ",
        "DUPS",
        "p50 ms",
        "p99 ms"
    );
    let mut ok = true;
    let mut all_lat = Vec::new();
    let (mut sp, mut sproc, mut sr, mut sd, mut sdup) = (0, 0, 0, 0, 0);
    for (name, q) in &t.queues {
        let mut lat = q.latencies.lock().unwrap().clone();
        lat.sort_unstable();
        let (p, pr, r, d, dup) = (
            q.published.load(Ordering::Relaxed),
            q.processed.load(Ordering::Relaxed),
            q.retried.load(Ordering::Relaxed),
            q.dead.load(Ordering::Relaxed),
            q.duplicates.load(Ordering::Relaxed),
        );
        let good = pr == q.expect_processed.load(Ordering::Relaxed)
            && d == q.expect_dead.load(Ordering::Relaxed);
        ok &= good;
        outln!(
            "{:<24} {:>9} {:>9} {:>7} {:>6} {:>5} {:>8.1} {:>8.1}{}",
            name.trim_start_matches(&strip),
            p,
            pr,
            r,
            d,
            dup,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            if good { "" } else { "  ✗ missing messages" }
        );
        all_lat.extend(lat);
        (sp, sproc, sr, sd, sdup) = (sp + p, sproc + pr, sr + r, sd + d, sdup + dup);
    }
    all_lat.sort_unstable();
    outln!(
        "{:<24} {:>9} {:>9} {:>7} {:>6} {:>5} {:>8.1} {:>8.1}",
        "total",
        sp,
        sproc,
        sr,
        sd,
        sdup,
        percentile(&all_lat, 0.5),
        percentile(&all_lat, 0.99)
    );
    outln!();
    outln!(
        "throughput: {} deliveries settled in {:.2}s ({:.0}/s); latency: publish → processed, queueing and retries included",
        sproc + sd,
        took.as_secs_f64(),
        (sproc + sd) as f64 / took.as_secs_f64().max(1e-6)
    );

    // Priority: the first attempts were served in non-increasing priority order.
    let order = t.llm_order.lock().unwrap().clone();
    let sorted = order.windows(2).all(|w| w[0] >= w[1]);
    let mut runs: Vec<(u8, usize)> = Vec::new();
    for p in &order {
        match runs.last_mut() {
            Some((q, n)) if q == p => *n += 1,
            _ => runs.push((*p, 1)),
        }
    }
    let shown: Vec<String> = runs
        .iter()
        .take(8)
        .map(|(p, n)| format!("{}×{n}", level(*p)))
        .collect();
    outln!(
        "llm priority order: served {}{} {}",
        shown.join(" → "),
        if runs.len() > 8 { " → …" } else { "" },
        if sorted {
            "✓ higher priority first"
        } else {
            "✗ out of order"
        }
    );
    ok &= sorted && !order.is_empty();
    let reasons = t.dlq_reasons.lock().unwrap();
    let r: Vec<String> = reasons.iter().map(|(k, v)| format!("{v} {k}")).collect();
    outln!(
        "dead-letter queue: {sd} message(s) ({})",
        if r.is_empty() {
            "none".into()
        } else {
            r.join(", ")
        }
    );
    let settled = sproc + sd;
    if ok && settled == total {
        outln!("✓ every message accounted for: {sp} delivered = {sproc} processed + {sd} dead-lettered as expected");
        Ok(ExitCode::SUCCESS)
    } else {
        outln!(
            "✗ {} of {total} deliveries not accounted for (or not as expected)",
            total.saturating_sub(settled)
        );
        Ok(ExitCode::FAILURE)
    }
}

fn level(p: u8) -> String {
    match p {
        10 => "critical".into(),
        8 => "high".into(),
        5 => "normal".into(),
        1 => "low".into(),
        p => format!("p{p}"),
    }
}

/// Delete everything the demo declared (its private prefix) from RabbitMQ.
async fn cleanup(broker: &Broker) {
    let t = broker.topology();
    let backend = broker.backend();
    for q in &t.queues {
        if let Err(e) = backend.delete_queue(&q.name).await {
            tracing::warn!(queue = %q.name, error = %e, "demo cleanup");
        }
    }
    for x in &t.exchanges {
        if let Err(e) = backend.delete_exchange(&x.name).await {
            tracing::warn!(exchange = %x.name, error = %e, "demo cleanup");
        }
    }
}
