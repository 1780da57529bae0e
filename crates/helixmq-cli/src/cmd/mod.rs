//! One module per command.

pub mod config;
pub mod demo;
pub mod dlq;
pub mod publish;
pub mod stats;
pub mod topology;
pub mod worker;
