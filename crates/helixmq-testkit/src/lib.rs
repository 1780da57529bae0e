//! The one test kit of helixmq's integration tests, a dev-dependency of
//! `helixmq` and `helixmq-cli` (in the way nats.rs's `nats-server` harness
//! crate serves its tests). Every helper a test needs is a `pub` item here,
//! never copied between test files; the test binaries are grouped by subject
//! (`conformance`, `rabbitmq`, `faults`, `config`, `deploy`, `cli`).
//!
//! # Layout
//! - [`broker`]: the shared RabbitMQ on 5672: users, unique prefixes, a
//!   configuration, named connections, cleanup, `basic.get` draining.
//! - [`node`]: dedicated broker nodes (`scripts/node`): the fault node and its
//!   `rabbitmqctl` faults with undo guards, and [`node::Node`], a node of a
//!   test's own that is stopped when dropped.
//! - [`cluster`]: the three-node cluster (`scripts/cluster`), stopped when
//!   its handle drops.
//! - [`proxy`]: the one TCP proxy: forward, cut, black hole, refuse, latency,
//!   bandwidth.
//! - [`ledger`]: the one id ledger: what each publish answered and how often
//!   each id was consumed; lost, duplicates, and where missing ids are.
//! - [`scenario`]: the fault-scenario runner: connect, load, consume, and the
//!   ending every fault test shares (progress, stop, drain, report).
//! - [`scheduled`]: scheduled publishes' arrivals (due vs arrived) by id.
//! - [`history`]: the total-queue checker's per-id history and per-fault table.
//! - [`conformance`]: the conformance suite, written once, run on every backend.
//! - [`flow`]: the whole helixmq flow on one broker, asserted step by step.
//! - [`config`]: loading configurations from YAML and a fake environment.
//! - [`prom`]: a strict Prometheus / OpenMetrics scrape parser.
//! - [`fake`]: a fake backend whose connection state the test controls, for
//!   the HTTP endpoints.
//! - [`scripts`]: the repository root, its scripts (optionally under a lock),
//!   `rabbitmqctl`, random suffixes.
//! - [`logs`]: test logging (`RUST_LOG`) and a per-thread log capture.
//! - [`cli`]: running the built `helixmq` binary under a unique prefix.
//! - [`postgres`]: a PostgreSQL schema per test (outbox, inbox), faults aimed
//!   at this test's connections only.
//! - [`browser`]: a headless chromium driven through chromedriver (WebDriver),
//!   killed on drop: open a page, wait for an element or a text, click, fill,
//!   read, screenshot.

#![warn(missing_docs)]

pub mod broker;
pub mod browser;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod conformance;
pub mod fake;
pub mod flow;
pub mod history;
pub mod ledger;
pub mod logs;
pub mod node;
pub mod postgres;
pub mod prom;
pub mod proxy;
pub mod scenario;
pub mod scheduled;
pub mod scripts;
