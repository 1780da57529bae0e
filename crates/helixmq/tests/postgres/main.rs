//! The outbox and the inbox against the PostgreSQL and the RabbitMQ of this
//! machine. Each test has a schema of its own (migrated, dropped at the end)
//! and a RabbitMQ prefix of its own (deleted at the end).
//!
//! - `outbox`: relay, rollbacks, late commits, ordering keys, several relays, retention.
//! - `inbox`: effects applied once across workers, restarts and rollbacks.
//!
//! The relay killed with SIGKILL needs a process of its own: that test is the
//! CLI crate's `tests/cli/outbox.rs`, where the `helixmq` binary is at hand.

mod inbox;
mod outbox;
