//! One module per command.

pub mod bench;
pub mod config;
pub mod console;
pub mod demo;
pub mod dlq;
pub mod outbox;
pub mod publish;
pub mod request;
pub mod stats;
pub mod topology;
pub mod worker;
