//! The transactional outbox on PostgreSQL (feature `postgres`).
//!
//! A service that writes a row and then publishes a task loses the task when
//! it crashes between the two, or publishes one for a row that rolled back.
//! With the outbox the message is written into `helixmq_outbox` **inside the
//! service's own transaction** ([`Outbox::enqueue`]): it exists exactly when
//! the business row does. A [`Relay`] publishes committed rows with publisher
//! confirms and deletes (or marks) each row only after its confirm, so a
//! message is published at least once, and never for a rolled-back row.
//!
//! # Commit order: row locks, not a cursor
//! Ids come from a sequence, allocated *before* commit: a transaction that
//! commits late holds a lower id than rows already visible, so a relay that
//! reads `id > last_seen` would skip it for good. The relay keeps no cursor.
//! Every batch is `SELECT … WHERE published_at IS NULL ORDER BY id LIMIT n
//! FOR UPDATE SKIP LOCKED` from the head of the table, and a published row
//! leaves the pending set in the same transaction that held its lock. An
//! uncommitted row is invisible to that query and is taken by a later batch,
//! whenever it commits. `SKIP LOCKED` also partitions the work: several relays
//! (processes or [`RelayOptions::workers`]) lock disjoint rows, and a relay
//! that dies releases its locks with its connection, so its rows are published
//! again by another one (at-least-once). Snapshot-xmin bounds were the other
//! option; they need a cursor, make every relay wait for the oldest open
//! transaction of the whole database, and do not split work between relays.
//!
//! # Ordering
//! Rows without an ordering key are published in any order. Rows with the
//! same key ([`Outbox::enqueue_ordered`]) are published in commit order:
//! enqueueing takes a transaction-scoped advisory lock on the key, so two
//! transactions writing the same key commit one after the other and their ids
//! follow commit order; the relay publishes only the oldest pending row of a
//! key (one per key per batch), the next one after that row is gone.
//!
//! # Layout
//! - [`schema`]: the tables, their migrations and the runner ([`Outbox::migrate`]).
//! - `stored`: a [`Message`] as an outbox row and back.
//! - [`relay`]: the relay loop, its options and its handle.
//! - [`metrics`]: rows pending, oldest pending age, relayed, failures.

mod metrics;
pub mod relay;
pub mod schema;
mod stored;

pub use metrics::OutboxMetrics;
pub use relay::{Relay, RelayOptions, RelayReport, Retention};

use std::time::Duration;

use sqlx::{PgConnection, PgPool, Row};

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::message::Message;

/// The outbox: enqueue inside a transaction, migrate, relay, inspect.
///
/// Tables live in the first schema of the connection's `search_path`
/// (`public` unless the URL sets `options=-csearch_path%3D…`).
#[derive(Debug, Clone, Copy)]
pub struct Outbox;

/// What is waiting in the outbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pending {
    /// Rows not yet published.
    pub rows: i64,
    /// Age of the oldest of them; zero when there is none.
    pub oldest: Duration,
    /// Rows whose last publish failed (waiting for their next attempt).
    pub failing: i64,
}

impl Outbox {
    /// Write `message` for `exchange`/`routing_key` into the outbox on `conn`,
    /// which should be the caller's open transaction (`&mut tx`): the message
    /// is published only if that transaction commits. Returns the row id.
    ///
    /// ```no_run
    /// # async fn f(pool: sqlx::PgPool) -> helixmq::Result<()> {
    /// use helixmq::{outbox::Outbox, Message};
    /// let mut tx = pool.begin().await.unwrap();
    /// sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await.unwrap();
    /// Outbox::enqueue(&mut tx, "helixagent.tasks", "background", &Message::new("order 42")).await?;
    /// tx.commit().await.unwrap();
    /// # Ok(()) }
    /// ```
    pub async fn enqueue(
        conn: &mut PgConnection,
        exchange: &str,
        routing_key: &str,
        message: &Message,
    ) -> Result<i64> {
        insert(conn, exchange, routing_key, None, message).await
    }

    /// Like [`Outbox::enqueue`], and the relay publishes the rows of one
    /// `ordering_key` in the order their transactions committed. Transactions
    /// writing the same key are serialized from this call to their commit (a
    /// transaction-scoped advisory lock on the key), so keep them short.
    pub async fn enqueue_ordered(
        conn: &mut PgConnection,
        ordering_key: &str,
        exchange: &str,
        routing_key: &str,
        message: &Message,
    ) -> Result<i64> {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("helixmq_outbox:{ordering_key}"))
            .execute(&mut *conn)
            .await
            .map_err(db("outbox: lock the ordering key"))?;
        insert(conn, exchange, routing_key, Some(ordering_key), message).await
    }

    /// Create or upgrade the outbox and inbox tables (idempotent; concurrent
    /// callers wait for each other). See [`schema`].
    pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>> {
        schema::migrate(pool).await
    }

    /// Start relaying committed rows to `broker` (see [`Relay`]).
    pub fn relay(pool: PgPool, broker: Broker, options: RelayOptions) -> Relay {
        Relay::start(pool, broker, options)
    }

    /// Rows pending, the oldest one's age, rows failing.
    pub async fn pending(pool: &PgPool) -> Result<Pending> {
        let row = sqlx::query(
            "SELECT count(*), \
                    coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8, \
                    count(*) FILTER (WHERE attempts > 0) \
             FROM helixmq_outbox WHERE published_at IS NULL",
        )
        .fetch_one(pool)
        .await
        .map_err(db("outbox: count pending rows"))?;
        let secs: f64 = row.get(1);
        Ok(Pending {
            rows: row.get(0),
            oldest: Duration::from_secs_f64(secs.max(0.0)),
            failing: row.get(2),
        })
    }

    /// Delete rows published more than `older_than` ago (kept by
    /// [`Retention::Keep`]); returns how many.
    pub async fn cleanup(pool: &PgPool, older_than: Duration) -> Result<u64> {
        let r = sqlx::query(
            "DELETE FROM helixmq_outbox \
             WHERE published_at < now() - make_interval(secs => $1)",
        )
        .bind(older_than.as_secs_f64())
        .execute(pool)
        .await
        .map_err(db("outbox: delete published rows past their retention"))?;
        Ok(r.rows_affected())
    }
}

async fn insert(
    conn: &mut PgConnection,
    exchange: &str,
    routing_key: &str,
    ordering_key: Option<&str>,
    message: &Message,
) -> Result<i64> {
    let mut message = message.clone();
    // The trace starts with the business transaction, not with the relay.
    message.ensure_traceparent();
    let props = stored::properties(&message)?;
    let row = sqlx::query(
        "INSERT INTO helixmq_outbox \
           (message_id, exchange, routing_key, ordering_key, payload, properties) \
         VALUES ($1, $2, $3, $4, $5, $6::jsonb) RETURNING id",
    )
    .bind(&message.id)
    .bind(exchange)
    .bind(routing_key)
    .bind(ordering_key)
    .bind(&message.payload[..])
    .bind(props)
    .fetch_one(conn)
    .await
    .map_err(db("outbox: insert the message row"))?;
    Ok(row.get(0))
}

/// A `map_err` for driver errors: [`Error::Database`] with `context`.
pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |e| Error::Database {
        context: context.to_string(),
        source: Box::new(e),
    }
}
