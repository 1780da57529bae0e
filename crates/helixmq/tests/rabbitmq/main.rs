//! The library against the real RabbitMQ (the shared broker on 5672, and the
//! TLS node of `scripts/tls` for `tls_connect`): one module per behaviour.

mod backpressure;
mod consume;
mod dlq;
mod errors;
mod http_health;
mod privilege_definitions;
mod privilege_least;
mod publish;
mod rate_limit;
mod recovery;
mod request;
mod scheduled_quorum;
mod tls_connect;
mod tracing_traceparent;
