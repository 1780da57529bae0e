//! `helixmq bench --outbox`: the transactional outbox on PostgreSQL.
//!
//! Three runs, each through the library's relay (default options, one relay
//! of two workers) into the bench's latency queue, consumed by a helixmq
//! subscription:
//! - **drain**: a backlog of `--outbox-rows` committed rows, relayed as fast
//!   as it goes: rows/s from the relay's start to the last confirm;
//! - **sustained**: writers commit `--outbox-rate` rows/s (20 rows per
//!   transaction, 8 writers) for `--outbox-seconds` while the relay runs: does it keep
//!   up (backlog at the end, relayed rate), and commit→handler latency;
//! - **latency**: one row per transaction at `--rate` rows/s: commit→handler
//!   latency p50/p99 (the clock starts when `COMMIT` returned).
//!
//! Tables go into a schema `hxbench_<hex>` of `--database-url`, dropped at the end.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use helixmq::outbox::{Outbox, RelayOptions};
use helixmq::{Message, Outcome, SubscribeOptions};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use super::latency::{micros, new_hist, Hist};
use super::setup::Bench;

/// Writer connections: enough that writing is never what limits the relay.
const WRITERS: u64 = 8;

/// Options of the outbox benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct OutboxBenchArgs {
    /// Run the outbox benchmark instead of the others: relay throughput and
    /// commit→handler latency (needs PostgreSQL).
    #[arg(long)]
    pub outbox: bool,
    /// PostgreSQL of the outbox benchmark; a schema `hxbench_<hex>` is created there and dropped.
    #[arg(
        long,
        env = "HELIXMQ_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/helixmq_test",
        hide_env_values = true
    )]
    pub database_url: String,
    /// Rows of the backlog drained by the relay.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub outbox_rows: u64,
    /// Rows per second committed during the sustained run.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub outbox_rate: u64,
    /// Length of the sustained and the latency run, seconds.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub outbox_seconds: u64,
    /// Relay workers (batches in flight at once).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub outbox_workers: u64,
    /// Rows per relay batch.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub outbox_batch: u64,
}

/// The outbox benchmark's figures.
#[derive(Debug, Serialize)]
pub(crate) struct OutboxReport {
    load_average_before: String,
    load_average_after: String,
    drain: Drain,
    sustained: Rated,
    latency: Rated,
}

#[derive(Debug, Serialize)]
struct Drain {
    rows: u64,
    seconds: f64,
    rows_per_sec: f64,
}

#[derive(Debug, Serialize)]
struct Rated {
    offered_rows_per_sec: u64,
    rows_per_transaction: u64,
    committed: u64,
    committed_rows_per_sec: f64,
    relayed_rows_per_sec: f64,
    backlog_at_end: i64,
    drained_after_ms: u128,
    commit_to_handler_p50_ms: f64,
    commit_to_handler_p99_ms: f64,
    commit_to_handler_max_ms: f64,
}

/// Commit instants by message id, and the histogram the handler records into.
#[derive(Clone, Default)]
struct Clock {
    committed: Arc<Mutex<HashMap<String, Instant>>>,
    hist: Arc<Mutex<Option<Hist>>>,
    handled: Arc<AtomicU64>,
}

/// Run the outbox benchmark and print its summary (or JSON).
pub(crate) async fn run(
    bench: &Bench,
    args: &OutboxBenchArgs,
    rate: u64,
    json: bool,
) -> anyhow::Result<()> {
    let schema = format!("hxbench_{:08x}", rand::random::<u32>());
    let base = PgConnectOptions::from_str(&args.database_url).context("--database-url")?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(base.clone())
        .await
        .context("cannot connect to PostgreSQL (--database-url)")?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await?;
    let res = measure(
        bench,
        args,
        rate,
        base.options([("search_path", schema.as_str())]),
    )
    .await;
    let dropped = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&admin)
        .await;
    let report = res?;
    dropped.context("cannot drop the bench schema")?;
    let text = report.summary();
    if json {
        eprint!("{text}");
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn measure(
    bench: &Bench,
    args: &OutboxBenchArgs,
    rate: u64,
    opts: PgConnectOptions,
) -> anyhow::Result<OutboxReport> {
    let load_average_before = loadavg();
    // Writers and relay on pools of their own: a writer never waits for the
    // relay's connections, nor the relay for theirs.
    let pool = PgPoolOptions::new()
        .max_connections(WRITERS as u32)
        .connect_with(opts.clone())
        .await?;
    let relay_pool = PgPoolOptions::new()
        .max_connections(args.outbox_workers as u32 + 1)
        .connect_with(opts)
        .await?;
    Outbox::migrate(&pool).await?;
    let clock = Clock::default();
    let c = clock.clone();
    let sub = bench
        .broker
        .subscribe(
            &bench.q_latency,
            move |m: Message, _ctx| {
                if let Some(at) = c.committed.lock().unwrap().remove(&m.id) {
                    if let Some(h) = c.hist.lock().unwrap().as_mut() {
                        h.saturating_record(micros(at.elapsed()));
                    }
                }
                c.handled.fetch_add(1, Ordering::Relaxed);
                async { Ok::<_, helixmq::BoxError>(Outcome::Ack) }
            },
            SubscribeOptions {
                prefetch: Some(200),
                ..Default::default()
            },
        )
        .await?;

    // Drain: the backlog first, the relay after.
    eprintln!("outbox: writing a backlog of {} rows", args.outbox_rows);
    let mut left = args.outbox_rows;
    while left > 0 {
        let n = left.min(100);
        write(&pool, bench, n).await?;
        left -= n;
    }
    let started = Instant::now();
    let options = RelayOptions {
        workers: args.outbox_workers as usize,
        batch_size: args.outbox_batch as usize,
        ..RelayOptions::default()
    };
    let relay = Outbox::relay(relay_pool, bench.broker.clone(), options);
    while relay.report().relayed < args.outbox_rows {
        tokio::time::sleep(Duration::from_millis(2)).await;
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the relay did not drain the backlog in 10 minutes"
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    let drain = Drain {
        rows: args.outbox_rows,
        seconds,
        rows_per_sec: args.outbox_rows as f64 / seconds,
    };
    wait_handled(&clock, args.outbox_rows).await?;
    eprintln!("outbox: drain {:.0} rows/s", drain.rows_per_sec);

    let per_tx = (args.outbox_rate / 250).clamp(1, 20);
    let sustained = rated(
        bench,
        &pool,
        &relay,
        &clock,
        args.outbox_rate,
        per_tx,
        args.outbox_seconds,
    )
    .await?;
    eprintln!(
        "outbox: sustained {:.0} rows/s relayed of {} offered",
        sustained.relayed_rows_per_sec, args.outbox_rate
    );
    let latency = rated(bench, &pool, &relay, &clock, rate, 1, args.outbox_seconds).await?;
    relay.shutdown().await;
    sub.shutdown(Duration::from_secs(10)).await;
    pool.close().await;
    Ok(OutboxReport {
        load_average_before,
        load_average_after: loadavg(),
        drain,
        sustained,
        latency,
    })
}

/// Commit `n` rows (each with its message) in one transaction.
async fn write(pool: &PgPool, bench: &Bench, n: u64) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    for _ in 0..n {
        let m = Message::new(vec![b'x'; 230]);
        Outbox::enqueue(&mut tx, &bench.exchange, &bench.q_latency, &m).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn wait_handled(clock: &Clock, target: u64) -> anyhow::Result<()> {
    let started = Instant::now();
    while clock.handled.load(Ordering::Relaxed) < target {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "only {} of {target} messages reached the handler",
            clock.handled.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Writers at `rate` rows/s, `per_tx` rows per transaction, for `seconds`,
/// with the relay running; then the time until the backlog is gone.
async fn rated(
    bench: &Bench,
    pool: &PgPool,
    relay: &helixmq::outbox::Relay,
    clock: &Clock,
    rate: u64,
    per_tx: u64,
    seconds: u64,
) -> anyhow::Result<Rated> {
    *clock.hist.lock().unwrap() = Some(new_hist());
    let handled_before = clock.handled.load(Ordering::Relaxed);
    let relayed_before = relay.report().relayed;
    let total = rate * seconds / per_tx * per_tx;
    // WRITERS writers, each committing every WRITERS·per_tx/rate seconds.
    let writers = WRITERS;
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|_| {
            let pool = pool.clone();
            let clock = clock.clone();
            let bench_exchange = bench.exchange.clone();
            let queue = bench.q_latency.clone();
            let period = Duration::from_secs_f64((writers * per_tx) as f64 / rate as f64);
            let count = total / writers / per_tx;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for _ in 0..count {
                    tick.tick().await;
                    let mut tx = pool.begin().await?;
                    let mut ids = Vec::new();
                    for _ in 0..per_tx {
                        let m = Message::new(vec![b'x'; 230]);
                        Outbox::enqueue(&mut tx, &bench_exchange, &queue, &m).await?;
                        ids.push(m.id);
                    }
                    tx.commit().await?;
                    let now = Instant::now();
                    let mut map = clock.committed.lock().unwrap();
                    for id in ids {
                        map.insert(id, now);
                    }
                }
                anyhow::Ok(count * per_tx)
            })
        })
        .collect();
    let mut committed = 0;
    for t in tasks {
        committed += t.await??;
    }
    let wrote = started.elapsed();
    let relayed = relay.report().relayed - relayed_before;
    let backlog = Outbox::pending(pool).await?.rows;
    wait_handled(clock, handled_before + committed).await?;
    let drained = started.elapsed().saturating_sub(wrote);
    let hist = clock.hist.lock().unwrap().take().unwrap_or_else(new_hist);
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(Rated {
        offered_rows_per_sec: rate,
        rows_per_transaction: per_tx,
        committed,
        committed_rows_per_sec: committed as f64 / wrote.as_secs_f64(),
        relayed_rows_per_sec: relayed as f64 / wrote.as_secs_f64(),
        backlog_at_end: backlog,
        drained_after_ms: drained.as_millis(),
        commit_to_handler_p50_ms: ms(hist.value_at_quantile(0.50)),
        commit_to_handler_p99_ms: ms(hist.value_at_quantile(0.99)),
        commit_to_handler_max_ms: ms(hist.max()),
    })
}

impl OutboxReport {
    fn summary(&self) -> String {
        let r = |name: &str, x: &Rated| {
            format!(
                "  {name:<10} offered {} rows/s ({} per tx): committed {:.0}/s, relayed {:.0}/s, \
                 backlog at end {}, drained {} ms later; commit→handler p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
                x.offered_rows_per_sec,
                x.rows_per_transaction,
                x.committed_rows_per_sec,
                x.relayed_rows_per_sec,
                x.backlog_at_end,
                x.drained_after_ms,
                x.commit_to_handler_p50_ms,
                x.commit_to_handler_p99_ms,
                x.commit_to_handler_max_ms
            )
        };
        format!(
            "outbox relay (PostgreSQL → RabbitMQ, confirms; load average {} before, {} after)\n  \
             drain      {} rows in {:.2} s: {:.0} rows/s commit→confirm\n{}{}",
            self.load_average_before,
            self.load_average_after,
            self.drain.rows,
            self.drain.seconds,
            self.drain.rows_per_sec,
            r("sustained", &self.sustained),
            r("latency", &self.latency),
        )
    }
}
