//! The outbox and inbox tables, as numbered migrations, and their runner.
//!
//! helixmq keeps its own version table (`helixmq_migrations`) instead of
//! sqlx's `_sqlx_migrations`: a service that runs its own sqlx migrations in
//! the same schema would otherwise find versions it does not know (and refuse
//! them). Services with another migration tool can copy [`MIGRATIONS`] into it.
//!
//! ```text
//! helixmq_outbox                           one row per message not yet relayed
//!   id            bigserial PK             allocated at insert (before commit)
//!   message_id    text                     Message::id, also the AMQP message-id
//!   exchange      text, routing_key text   where the relay publishes it
//!   ordering_key  text NULL                rows of one key go out in commit order
//!   payload       bytea                    the body
//!   properties    jsonb                    type, headers, priority, traceparent, …
//!   created_at    timestamptz              enqueue time (oldest-pending age)
//!   available_at  timestamptz              next attempt after a failed publish
//!   attempts      int, last_error text     failed publishes so far, and why
//!   published_at  timestamptz NULL         set instead of deleting (Retention::Keep)
//!
//! helixmq_inbox                            one row per message a handler committed
//!   queue, message_id  PK                  per queue: a fan-out copy is its own message
//!   processed_at  timestamptz              for the retention clean-up
//! ```

use sqlx::{PgPool, Row};

use super::db;
use crate::error::Result;

/// One migration: its version and the SQL that brings the schema to it.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Applied in increasing order; recorded in `helixmq_migrations`.
    pub version: i64,
    /// What it does.
    pub description: &'static str,
    /// Statements, run in one transaction.
    pub sql: &'static str,
}

/// Every migration, oldest first.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "outbox and inbox tables",
    sql: r#"
CREATE TABLE IF NOT EXISTS helixmq_outbox (
    id            bigserial   PRIMARY KEY,
    message_id    text        NOT NULL,
    exchange      text        NOT NULL,
    routing_key   text        NOT NULL,
    ordering_key  text,
    payload       bytea       NOT NULL,
    properties    jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    available_at  timestamptz NOT NULL DEFAULT now(),
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    published_at  timestamptz
);
CREATE INDEX IF NOT EXISTS helixmq_outbox_pending
    ON helixmq_outbox (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS helixmq_outbox_ordering
    ON helixmq_outbox (ordering_key, id) WHERE published_at IS NULL AND ordering_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS helixmq_outbox_published
    ON helixmq_outbox (published_at) WHERE published_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS helixmq_inbox (
    queue         text        NOT NULL,
    message_id    text        NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, message_id)
);
CREATE INDEX IF NOT EXISTS helixmq_inbox_processed ON helixmq_inbox (processed_at);
"#,
}];

/// Apply the migrations not yet recorded; returns the versions applied now.
/// One transaction under an advisory lock: concurrent callers (several relays
/// starting at once) wait, then find nothing left to do.
pub(crate) async fn migrate(pool: &PgPool) -> Result<Vec<i64>> {
    let mut tx = pool
        .begin()
        .await
        .map_err(db("migrate: begin a transaction"))?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('helixmq_migrations', 0))")
        .execute(&mut *tx)
        .await
        .map_err(db("migrate: take the migration lock"))?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS helixmq_migrations (\
           version bigint PRIMARY KEY, description text NOT NULL, \
           applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(&mut *tx)
    .await
    .map_err(db("migrate: create helixmq_migrations"))?;
    let done: Vec<i64> = sqlx::query("SELECT version FROM helixmq_migrations")
        .fetch_all(&mut *tx)
        .await
        .map_err(db("migrate: read helixmq_migrations"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut applied = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !done.contains(&m.version)) {
        sqlx::raw_sql(m.sql)
            .execute(&mut *tx)
            .await
            .map_err(db("migrate: apply a migration"))?;
        sqlx::query("INSERT INTO helixmq_migrations (version, description) VALUES ($1, $2)")
            .bind(m.version)
            .bind(m.description)
            .execute(&mut *tx)
            .await
            .map_err(db("migrate: record a migration"))?;
        applied.push(m.version);
    }
    tx.commit()
        .await
        .map_err(db("migrate: commit the migrations"))?;
    Ok(applied)
}
