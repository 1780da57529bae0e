//! The `helixmq` binary, run as a user runs it (the helpers are in
//! `helixmq_testkit::cli`): one module per command or subject.

mod bench_smoke;
mod browser;
mod browser_console;
mod config_topology;
mod console;
mod demo;
mod dlq;
mod outbox;
mod publish;
mod rate_limit;
mod request;
mod topology_stats;
mod worker;
mod worker_health;
