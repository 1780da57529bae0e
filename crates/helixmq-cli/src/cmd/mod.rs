//! One module per command.

pub mod bench;
pub mod config;
// Three `unwrap`s in functions returning `Result` (clippy::unwrap_in_result);
// allowed until `demo` is reorganised on its own branch, then removed.
#[allow(clippy::unwrap_in_result)]
pub mod demo;
pub mod dlq;
pub mod outbox;
pub mod publish;
pub mod stats;
pub mod topology;
pub mod worker;
