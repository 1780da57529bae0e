//! helixmq — a RabbitMQ task-queue layer that does not lose work.
//!
//! Publish returns `Ok` only after the broker confirmed the message. A delivery
//! is acked only after its handler succeeded, or after it was re-routed (retry
//! queue or DLQ) and that re-route was confirmed. Connections recover by
//! themselves. The same API runs on an embedded in-process broker for demos
//! and doc examples.
//!
//! # Layout
//! - [`config`]: `messaging.yaml` + environment, validated; the password is a [`Secret`].
//! - [`topology`]: exchanges, queues, bindings as data; every name from [`Names`];
//!   RabbitMQ definitions export.
//! - [`message`]: the [`Message`] model and its AMQP mapping.
//! - [`broker`]: the [`Broker`] handle — connect, publish (confirmed), subscribe, close;
//!   request-reply ([`Broker::request`], answered by [`Outcome::Reply`]).
//! - [`consumer`]: the reliable consumer written once for every backend: handlers,
//!   [`Outcome`]s, retries, dead-lettering, duplicate guard, graceful shutdown.
//! - [`backend`]: the [`Backend`] seam, with [`backend::memory`] (embedded broker)
//!   and [`backend::rabbitmq`] (lapin, recovery, confirms).
//! - `console` (feature `console`): the web console — overview and dead-letter
//!   workbench — as an axum router.
//! - [`dlq`]: the dead-letter queue read and worked on (list, filter, group,
//!   replay, delete, purge) without losing anything; the CLI and the console use it.
//! - [`ratelimit`]: limits shared by every process using the same key (permits
//!   in a queue, one refiller elected by single active consumer, pauses on 429).
//! - [`metrics`]: Prometheus counters; [`http`]: `/metrics` and `/health` router.
//! - [`error`]: the one [`Error`] enum.
//! - `management` (feature `management`): RabbitMQ's management HTTP API — queue
//!   listings, rates, connection totals, the spec's thresholds.
//! - `outbox`, `inbox` (feature `postgres`): the transactional outbox and its
//!   relay; the consumer inbox for exactly-once effects.

pub mod backend;
mod backoff;
pub mod broker;
pub mod config;
#[cfg(feature = "console")]
pub mod console;
pub mod consumer;
pub mod dlq;
pub mod error;
pub mod http;
#[cfg(feature = "postgres")]
pub mod inbox;
#[cfg(feature = "management")]
pub mod management;
pub mod message;
pub mod metrics;
#[cfg(feature = "postgres")]
pub mod outbox;
pub mod ratelimit;
pub mod topology;

pub use backend::{Backend, BackendKind, ConnectionState};
pub use broker::{
    Broker, BrokerBuilder, DedupOptions, PublishOptions, RetryPolicy, SubscribeOptions,
};
pub use config::{Config, Secret};
pub use consumer::{Context, Handler, Outcome, ShutdownReport, Subscription, SubscriptionStatus};
pub use error::{BoxError, Error, Result};
pub use message::{DeliveryMode, HeaderValue, Message, Priority};
pub use metrics::Metrics;
pub use topology::{Names, Topology};

// The READMEs' Rust examples are compiled with the doc tests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct CrateReadmeDoctests;
