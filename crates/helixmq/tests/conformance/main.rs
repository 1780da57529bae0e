//! The conformance suite (`helixmq_testkit::conformance`, written once) run
//! on every backend: one module per backend, each giving the suite its way
//! to make a broker.

mod memory;
mod rabbitmq;
