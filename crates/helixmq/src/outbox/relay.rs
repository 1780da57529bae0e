//! The relay: committed outbox rows → confirmed publishes → rows removed.
//!
//! Each worker repeats one batch: in a transaction, lock up to `batch_size`
//! pending rows with `FOR UPDATE SKIP LOCKED` (oldest first; of rows sharing
//! an ordering key only the oldest), publish them all at once and await every
//! confirm, then delete (or mark) the confirmed rows and give the failed ones
//! a later `available_at`, and commit. Nothing is removed before its confirm:
//! a relay that dies mid-batch (process killed, database connection
//! terminated, commit lost) leaves its rows pending and unlocked, and they are
//! published again — at-least-once, the copies carry the same message id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{PgPool, Row};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::metrics::OutboxMetrics;
use super::{db, stored, Outbox};
use crate::broker::{Broker, PublishOptions};
use crate::error::{Error, Result};
use crate::message::Message;

/// What happens to a row once its message is confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retention {
    /// Delete it in the transaction that held its lock. The default: the
    /// table holds only pending rows, so every batch reads a short index head.
    #[default]
    Delete,
    /// Mark it published (`published_at`) and delete it this long after, for
    /// an audit trail of what was sent. The relay runs the clean-up every
    /// [`RelayOptions::cleanup_interval`].
    Keep(Duration),
}

/// How a relay works. Every field has a default.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Rows locked and published per batch. Default 500.
    pub batch_size: usize,
    /// Batches run at once by this relay (each on its own connection; `SKIP
    /// LOCKED` keeps their rows disjoint). Default 2.
    pub workers: usize,
    /// Wait after a batch that found nothing. Default 50 ms: the delay a
    /// row committed into an idle outbox waits at most, at one cheap index
    /// probe per interval and worker.
    pub idle_interval: Duration,
    /// Wait after a batch that failed on the database side. Default 1 s.
    pub error_backoff: Duration,
    /// A row whose publish failed is tried again after 1 s, doubling per
    /// failure up to this. Default 60 s.
    pub max_retry_delay: Duration,
    /// Delete or keep published rows. Default [`Retention::Delete`].
    pub retention: Retention,
    /// How often kept rows past their retention are deleted. Default 60 s.
    pub cleanup_interval: Duration,
    /// How often the pending gauges are sampled. Default 5 s.
    pub stats_interval: Duration,
    /// Options of each publish (mandatory by default: a row whose message
    /// reaches no queue is a failure, retried, never dropped).
    pub publish: PublishOptions,
    /// Where to count. Default: private counters.
    pub metrics: OutboxMetrics,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch_size: 500,
            workers: 2,
            idle_interval: Duration::from_millis(50),
            error_backoff: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(60),
            retention: Retention::Delete,
            cleanup_interval: Duration::from_secs(60),
            stats_interval: Duration::from_secs(5),
            publish: PublishOptions::default(),
            metrics: OutboxMetrics::default(),
        }
    }
}

/// What a relay did, from its start to its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayReport {
    /// Rows published, confirmed and removed from the pending set.
    pub relayed: u64,
    /// Publishes that failed (their rows wait for a later attempt).
    pub publish_failures: u64,
    /// Batches that failed on the database side.
    pub batch_failures: u64,
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Batch {
    /// Rows locked.
    pub taken: usize,
    /// Of them, published and removed.
    pub relayed: usize,
    /// Of them, failed and rescheduled.
    pub failed: usize,
}

/// A running relay. Prefer [`Relay::shutdown`]: dropping it aborts its tasks,
/// and a batch cut short leaves its rows pending (published again later).
#[derive(Debug)]
pub struct Relay {
    stop: CancellationToken,
    tasks: JoinSet<()>,
    report: Arc<Counts>,
}

/// Shared by the relay's tasks: what goes into the [`RelayReport`].
#[derive(Debug, Default)]
struct Counts {
    relayed: AtomicU64,
    publish_failures: AtomicU64,
    batch_failures: AtomicU64,
}

impl Relay {
    pub(super) fn start(pool: PgPool, broker: Broker, options: RelayOptions) -> Relay {
        let stop = CancellationToken::new();
        let report = Arc::new(Counts::default());
        let options = Arc::new(options);
        let mut tasks = JoinSet::new();
        for _ in 0..options.workers.max(1) {
            tasks.spawn(work(
                pool.clone(),
                broker.clone(),
                options.clone(),
                report.clone(),
                stop.clone(),
            ));
        }
        tasks.spawn(housekeeping(pool, options, stop.clone()));
        Relay {
            stop,
            tasks,
            report,
        }
    }

    /// What the relay did so far.
    pub fn report(&self) -> RelayReport {
        let r = &self.report;
        RelayReport {
            relayed: r.relayed.load(Ordering::Relaxed),
            publish_failures: r.publish_failures.load(Ordering::Relaxed),
            batch_failures: r.batch_failures.load(Ordering::Relaxed),
        }
    }

    /// Stop: each worker finishes the batch it is in (its confirms awaited,
    /// its rows removed), then the relay ends.
    pub async fn shutdown(mut self) -> RelayReport {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
        self.report()
    }
}

async fn work(
    pool: PgPool,
    broker: Broker,
    options: Arc<RelayOptions>,
    report: Arc<Counts>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let wait = match relay_batch(&pool, &broker, &options).await {
            Ok(b) => {
                report
                    .relayed
                    .fetch_add(b.relayed as u64, Ordering::Relaxed);
                report
                    .publish_failures
                    .fetch_add(b.failed as u64, Ordering::Relaxed);
                // Rows were there: more may be. Only an empty outbox waits.
                if b.taken > 0 {
                    continue;
                }
                options.idle_interval
            }
            Err(e) => {
                report.batch_failures.fetch_add(1, Ordering::Relaxed);
                options.metrics.batch_failures.inc();
                tracing::warn!(error = %e, "outbox relay: batch failed; its rows stay pending");
                options.error_backoff
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Samples the pending gauges; deletes kept rows past their retention.
async fn housekeeping(pool: PgPool, options: Arc<RelayOptions>, stop: CancellationToken) {
    let mut stats = tokio::time::interval(options.stats_interval.max(Duration::from_millis(10)));
    let mut cleanup =
        tokio::time::interval(options.cleanup_interval.max(Duration::from_millis(10)));
    stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    cleanup.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = stats.tick() => match Outbox::pending(&pool).await {
                Ok(p) => {
                    options.metrics.pending.set(p.rows);
                    options.metrics.oldest_pending_seconds.set(p.oldest.as_secs_f64());
                }
                Err(e) => tracing::debug!(error = %e, "outbox relay: sample pending rows"),
            },
            _ = cleanup.tick() => if let Retention::Keep(keep) = options.retention {
                match Outbox::cleanup(&pool, keep).await {
                    Ok(n) if n > 0 => tracing::debug!(deleted = n, "outbox relay: cleaned up"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "outbox relay: clean-up failed"),
                }
            },
        }
    }
}

/// Pending, due rows, oldest first; of the rows of one ordering key only the
/// oldest pending one (the next is taken once it is gone). Rows another relay
/// holds are skipped, rows of open transactions are invisible: both are
/// taken by a later batch.
const LOCK_BATCH: &str = "\
SELECT o.id, o.message_id, o.exchange, o.routing_key, o.payload, o.properties::text, o.attempts, \
       extract(epoch FROM clock_timestamp() - o.created_at)::float8 \
FROM helixmq_outbox o \
WHERE o.published_at IS NULL AND o.available_at <= now() \
  AND (o.ordering_key IS NULL OR NOT EXISTS ( \
        SELECT 1 FROM helixmq_outbox p \
        WHERE p.ordering_key = o.ordering_key AND p.published_at IS NULL AND p.id < o.id)) \
ORDER BY o.id \
LIMIT $1 \
FOR UPDATE OF o SKIP LOCKED";

/// Opens a batch's transaction, in one round trip (a simple query).
const BEGIN_BATCH: &str = "BEGIN; SET LOCAL synchronous_commit = off";

/// One batch: lock, publish with confirms, remove the confirmed rows,
/// reschedule the failed ones, commit. Public for callers that drive the
/// relay themselves (a cron job, a test); [`Outbox::relay`] runs it in a loop.
pub async fn relay_batch(pool: &PgPool, broker: &Broker, options: &RelayOptions) -> Result<Batch> {
    // The relay's own commit need not wait for its WAL flush: a commit lost
    // in a crash only leaves its rows pending, and they are published again
    // with the same message ids (at-least-once, as after any relay crash).
    // The writers' transactions keep the database's setting.
    let mut tx = pool
        .begin_with(BEGIN_BATCH)
        .await
        .map_err(db("relay: begin a transaction"))?;
    let rows = sqlx::query(LOCK_BATCH)
        .bind(options.batch_size.max(1) as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("relay: lock a batch of outbox rows"))?;
    if rows.is_empty() {
        // Nothing was locked: ending the transaction can wait for the drop.
        return Ok(Batch::default());
    }
    let taken = Instant::now();
    let results = publish_rows(broker, options, rows).await;

    let mut done = Vec::new();
    let mut failed = (Vec::new(), Vec::new(), Vec::new());
    let mut ages = Vec::new();
    for (id, attempts, age, res) in results {
        match res {
            Ok(()) => {
                done.push(id);
                ages.push(age);
            }
            Err(e) => {
                tracing::warn!(row = id, attempts = attempts + 1, error = %e, "outbox relay: publish failed; the row is retried later");
                let delay = Duration::from_secs(1)
                    .saturating_mul(1u32 << attempts.clamp(0, 16))
                    .min(options.max_retry_delay);
                failed.0.push(id);
                failed.1.push(e.to_string());
                failed.2.push(delay.as_secs_f64());
            }
        }
    }
    if !done.is_empty() {
        let sql = match options.retention {
            Retention::Delete => "DELETE FROM helixmq_outbox WHERE id = ANY($1)",
            Retention::Keep(_) => {
                "UPDATE helixmq_outbox SET published_at = now() WHERE id = ANY($1)"
            }
        };
        sqlx::query(sql)
            .bind(&done)
            .execute(&mut *tx)
            .await
            .map_err(db("relay: remove the published rows"))?;
    }
    let nfailed = failed.0.len();
    if nfailed > 0 {
        sqlx::query(
            "UPDATE helixmq_outbox o SET attempts = o.attempts + 1, last_error = f.err, \
               available_at = now() + make_interval(secs => f.delay) \
             FROM unnest($1::int8[], $2::text[], $3::float8[]) AS f(id, err, delay) \
             WHERE o.id = f.id",
        )
        .bind(&failed.0)
        .bind(&failed.1)
        .bind(&failed.2)
        .execute(&mut *tx)
        .await
        .map_err(db("relay: reschedule the failed rows"))?;
    }
    tx.commit().await.map_err(db("relay: commit the batch"))?;
    let m = &options.metrics;
    m.relayed.inc_by(done.len() as u64);
    m.publish_failures.inc_by(nfailed as u64);
    let extra = taken.elapsed().as_secs_f64();
    for age in ages {
        m.relay_latency.observe(age + extra);
    }
    Ok(Batch {
        taken: done.len() + nfailed,
        relayed: done.len(),
        failed: nfailed,
    })
}

/// Publish a batch's rows and await every confirm: one pipelined
/// [`Broker::publish_batch`] per destination (exchange and routing key),
/// the destinations at once. Returns each row's id, attempts, age (seconds
/// since its transaction started) and outcome.
async fn publish_rows(
    broker: &Broker,
    options: &RelayOptions,
    rows: Vec<sqlx::postgres::PgRow>,
) -> Vec<(i64, i32, f64, Result<()>)> {
    let mut results = Vec::with_capacity(rows.len());
    // Rows by destination, in id order within each.
    let mut groups: HashMap<(String, String), (Vec<usize>, Vec<Message>)> = HashMap::new();
    for row in rows {
        let id: i64 = row.get(0);
        let attempts: i32 = row.get(6);
        let age: f64 = row.get(7);
        match stored::message(row.get(1), row.get(4), row.get::<&str, _>(5)) {
            Ok(m) => {
                let (at, messages) = groups.entry((row.get(2), row.get(3))).or_default();
                at.push(results.len());
                messages.push(m);
                // Replaced by its confirm's outcome: a row without an
                // answer counts as not published.
                results.push((id, attempts, age, Err(Error::Closed)));
            }
            Err(e) => results.push((id, attempts, age, Err(e))),
        }
    }
    let sent = futures::future::join_all(groups.iter().map(
        |((exchange, routing_key), (at, messages))| async move {
            let outcomes = broker
                .publish_batch(exchange, routing_key, messages, &options.publish)
                .await;
            (at, outcomes)
        },
    ))
    .await;
    for (at, outcomes) in sent {
        for (&i, outcome) in at.iter().zip(outcomes) {
            results[i].3 = outcome;
        }
    }
    results
}
