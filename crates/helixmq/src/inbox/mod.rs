//! The consumer inbox on PostgreSQL (feature `postgres`): a message's effect
//! applied exactly once, across workers and restarts.
//!
//! With [`SubscribeOptions::inbox`](crate::SubscribeOptions::inbox), every
//! delivery opens a transaction that first records `(queue, message id)` in
//! `helixmq_inbox`; the handler does its work in that same transaction
//! ([`transaction`]). `Outcome::Ack` commits it, then the delivery is acked.
//! Anything else (retry, dead letter, error, panic, timeout) rolls it back and
//! the delivery takes its usual retry/DLQ route. So:
//! - committed: a redelivery of that id, to any worker, after any restart, finds
//!   the row and is acked without running the handler (counted in
//!   `rabbitmq_messages_duplicate_skipped`);
//! - rolled back: no row, no effect; the delivery is retried as usual;
//! - a copy delivered while the first is still being handled waits on the
//!   row's lock, then sees which of the two happened.
//!
//! A commit whose answer is lost (connection dropped during `COMMIT`) is
//! retried like a rollback: if it had committed, the retry is skipped.
//! Only the effects written through the transaction are exactly-once; a call
//! to another service from the handler is still at-least-once.
//!
//! Rows are kept for [`Inbox::retention`] (default 7 days, the DLQ's TTL:
//! no copy of a message outlives it) and deleted in the background of
//! deliveries, at most once per [`Inbox::cleanup_interval`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{PgPool, Postgres};
use tokio::sync::{MappedMutexGuard, MutexGuard};

use crate::consumer::Outcome;
use crate::error::{Error, Result};
use crate::message::Message;
use crate::outbox::db;

/// The inbox of a subscription: the pool its transactions come from, and how
/// long processed ids are remembered.
#[derive(Clone)]
pub struct Inbox {
    pool: PgPool,
    retention: Duration,
    cleanup_interval: Duration,
    consumer: Option<String>,
    /// When the last clean-up ran; shared by the clones in one subscription.
    last_cleanup: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("retention", &self.retention)
            .field("consumer", &self.consumer)
            .finish()
    }
}

/// Default [`Inbox::retention`]: 7 days, the DLQ's message TTL.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Inbox {
    /// An inbox on `pool` (tables created by [`Outbox::migrate`](crate::outbox::Outbox::migrate)).
    pub fn new(pool: PgPool) -> Inbox {
        Inbox {
            pool,
            retention: DEFAULT_RETENTION,
            cleanup_interval: Duration::from_secs(60),
            consumer: None,
            last_cleanup: Arc::new(Mutex::new(None)),
        }
    }

    /// How long a processed id is remembered. A redelivery later than that
    /// runs the handler again. Default [`DEFAULT_RETENTION`].
    pub fn retention(mut self, retention: Duration) -> Inbox {
        self.retention = retention;
        self
    }

    /// How often expired rows are deleted (by whichever delivery comes
    /// first after the interval). Default 60 s.
    pub fn cleanup_interval(mut self, interval: Duration) -> Inbox {
        self.cleanup_interval = interval;
        self
    }

    /// The name ids are recorded under. Default: the queue's name, so that
    /// every queue of a fan-out applies its own copy once.
    pub fn consumer(mut self, name: impl Into<String>) -> Inbox {
        self.consumer = Some(name.into());
        self
    }

    /// Delete rows older than the retention now; returns how many.
    pub async fn cleanup(&self) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM helixmq_inbox WHERE processed_at < now() - make_interval(secs => $1)",
        )
        .bind(self.retention.as_secs_f64())
        .execute(&self.pool)
        .await
        .map_err(db("inbox: delete rows past their retention"))?;
        Ok(r.rows_affected())
    }

    /// Whether `message_id` was processed (committed) for `consumer`.
    pub async fn contains(&self, consumer: &str, message_id: &str) -> Result<bool> {
        let found = sqlx::query("SELECT 1 FROM helixmq_inbox WHERE queue = $1 AND message_id = $2")
            .bind(consumer)
            .bind(message_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("inbox: look up a message id"))?;
        Ok(found.is_some())
    }

    async fn maybe_cleanup(&self) {
        {
            let mut last = self.last_cleanup.lock().unwrap();
            if last.is_some_and(|t| t.elapsed() < self.cleanup_interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Err(e) = self.cleanup().await {
            tracing::warn!(error = %e, "inbox: clean-up failed");
        }
    }

    /// Open the delivery's transaction and record its id (the consumer's hook).
    pub(crate) async fn claim(&self, queue: &str, message: &Message) -> Claim {
        self.maybe_cleanup().await;
        let consumer = self.consumer.as_deref().unwrap_or(queue);
        let mut tx = match self.pool.begin().await {
            Ok(tx) => tx,
            Err(e) => return Claim::Unavailable(format!("inbox: cannot begin a transaction: {e}")),
        };
        // A copy being handled elsewhere holds this key: we wait for its end.
        let r = sqlx::query(
            "INSERT INTO helixmq_inbox (queue, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(&message.id)
        .execute(&mut *tx)
        .await;
        match r {
            Ok(r) if r.rows_affected() == 0 => Claim::Duplicate,
            Ok(_) => Claim::Fresh(InboxTx {
                tx: Arc::new(tokio::sync::Mutex::new(Some(tx))),
            }),
            Err(e) => Claim::Unavailable(format!("inbox: cannot record the message id: {e}")),
        }
    }
}

/// What the inbox says about a delivery before its handler runs.
pub(crate) enum Claim {
    /// No inbox on this subscription.
    Off,
    /// First time (or every earlier attempt rolled back): run the handler in this transaction.
    Fresh(InboxTx),
    /// Already processed and committed: ack without running the handler.
    Duplicate,
    /// The database cannot be reached: retry the delivery later.
    Unavailable(String),
}

impl Claim {
    /// The consumer's hook: `claim` for this delivery, or `Off`.
    pub(crate) async fn of(inbox: Option<&Inbox>, queue: &str, message: &Message) -> Claim {
        match inbox {
            Some(i) => i.claim(queue, message).await,
            None => Claim::Off,
        }
    }

    /// Run `handler` (the handler's future) under this claim: in its
    /// transaction, committed on `Ack`, rolled back otherwise.
    pub(crate) async fn run(self, handler: impl std::future::Future<Output = Outcome>) -> Outcome {
        match self {
            Claim::Off => handler.await,
            Claim::Duplicate => Outcome::Ack,
            Claim::Unavailable(reason) => Outcome::retry(reason),
            Claim::Fresh(tx) => {
                let outcome = CURRENT.scope(tx.clone(), handler).await;
                tx.finish(outcome).await
            }
        }
    }
}

tokio::task_local! {
    static CURRENT: InboxTx;
}

/// The transaction of the delivery being handled, inside a handler of a
/// subscription with an inbox (`None` elsewhere, also in tasks the handler
/// spawns). helixmq commits it after `Outcome::Ack`; do not commit it yourself.
///
/// ```no_run
/// # async fn h(m: helixmq::Message) -> Result<helixmq::Outcome, helixmq::BoxError> {
/// let tx = helixmq::inbox::transaction().ok_or("no inbox on this subscription")?;
/// sqlx::query("UPDATE accounts SET credited = true WHERE payment = $1")
///     .bind(&m.id)
///     .execute(&mut *tx.conn().await?)
///     .await?;
/// Ok(helixmq::Outcome::Ack) // commits: the update and the inbox row, together
/// # }
/// ```
pub fn transaction() -> Option<InboxTx> {
    CURRENT.try_with(InboxTx::clone).ok()
}

/// A delivery's inbox transaction, shared between helixmq and the handler.
#[derive(Clone)]
pub struct InboxTx {
    tx: Arc<tokio::sync::Mutex<Option<sqlx::Transaction<'static, Postgres>>>>,
}

impl std::fmt::Debug for InboxTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboxTx").finish_non_exhaustive()
    }
}

impl InboxTx {
    /// The transaction's connection, to run the handler's statements on
    /// (`&mut *tx.conn().await?`). Fails once the delivery was settled.
    pub async fn conn(&self) -> Result<MappedMutexGuard<'_, PgConnection>> {
        MutexGuard::try_map(self.tx.lock().await, |t| t.as_deref_mut()).map_err(|_| {
            Error::Database {
                context: "inbox: the delivery's transaction is already finished".into(),
                source: "transaction used after its handler returned".into(),
            }
        })
    }

    async fn finish(&self, outcome: Outcome) -> Outcome {
        let Some(tx) = self.tx.lock().await.take() else {
            return outcome;
        };
        match outcome {
            // A reply is a success too: its effects commit before it is sent.
            done @ (Outcome::Ack | Outcome::Reply(_)) => match tx.commit().await {
                Ok(()) => done,
                Err(e) => Outcome::retry(format!("inbox: commit failed: {e}")),
            },
            other => {
                if let Err(e) = tx.rollback().await {
                    tracing::debug!(error = %e, "inbox: rollback");
                }
                other
            }
        }
    }
}
