//! The one error type of the library.
//!
//! Variants are the cases a caller must tell apart (the spec's troubleshooting
//! table): each keeps its cause through `#[source]` where there is one, and its
//! message says what went wrong and how to fix it. No variant ever carries a
//! password: URLs are redacted before they reach an error.

use std::time::Duration;

/// A boxed error cause, kept so callers can walk the chain.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in helixmq.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration is invalid; every problem found is listed.
    #[error("invalid configuration:\n{}", .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    InvalidConfig {
        /// One line per problem: field path, bad value, how to fix it.
        problems: Vec<String>,
    },

    /// Nothing accepted a TCP connection at the address.
    #[error("connection refused by {host}:{port}: is RabbitMQ running and listening there? (check RABBITMQ_HOST / RABBITMQ_PORT)")]
    ConnectionRefused {
        /// Host tried.
        host: String,
        /// Port tried.
        port: u16,
        /// The I/O or protocol error.
        #[source]
        source: BoxError,
    },

    /// The connection could not be made for another reason (DNS, TLS, timeout, protocol).
    #[error("could not connect to {endpoint}: {reason}")]
    Connect {
        /// `host:port` (never credentials).
        endpoint: String,
        /// Short human explanation.
        reason: String,
        /// The underlying cause.
        #[source]
        source: Option<BoxError>,
    },

    /// The broker refused the credentials or a permission (AMQP 403).
    #[error("access refused{}: {detail} (check RABBITMQ_USER / RABBITMQ_PASSWORD and the user's permissions on the vhost)", .user.as_ref().map(|u| format!(" for user '{u}'")).unwrap_or_default())]
    AccessRefused {
        /// The user name, when known.
        user: Option<String>,
        /// What the broker said.
        detail: String,
    },

    /// The virtual host does not exist or the user may not use it (AMQP 530).
    #[error("vhost '{vhost}' not allowed: it does not exist or the user has no permissions on it (create it with `rabbitmqctl add_vhost` and `set_permissions`, or set RABBITMQ_VHOST)")]
    VhostNotAllowed {
        /// The vhost asked for.
        vhost: String,
    },

    /// A declaration conflicts with what the broker already has (AMQP 406).
    #[error("precondition failed on {kind} '{name}': {detail}. Fix: {}, or change the configuration to match it", delete_hint(.kind, .name))]
    PreconditionFailed {
        /// "queue" or "exchange".
        kind: &'static str,
        /// Name of the queue or exchange.
        name: String,
        /// The broker's text, e.g. "inequivalent arg 'x-max-priority'".
        detail: String,
    },

    /// The broker negatively acknowledged a publish (queue full with reject-publish, internal error).
    #[error("publish of message {message_id} to exchange '{exchange}' with routing key '{routing_key}' was nacked by the broker (a queue may be full with overflow=reject-publish)")]
    PublishNacked {
        /// The message id.
        message_id: String,
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
    },

    /// No confirm arrived within the publish timeout.
    #[error("publish of message {message_id} was not confirmed within {timeout:?} (broker unreachable, blocked by an alarm, or overloaded)")]
    PublishTimeout {
        /// The message id.
        message_id: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },

    /// A mandatory publish matched no queue.
    #[error("message {message_id} is unroutable: exchange '{exchange}' has no queue bound for routing key '{routing_key}'")]
    Unroutable {
        /// The message id.
        message_id: String,
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
    },

    /// No reply to a request ([`Broker::request`](crate::Broker::request))
    /// arrived within its timeout. Not retryable as such: the request may
    /// still be running (or have run) on a worker, so sending it again may
    /// run it twice.
    #[error("no reply to request {message_id} (exchange '{exchange}', routing key '{routing_key}') within {timeout:?}: is a worker consuming that queue, and can it answer in time? (raise the timeout, or check the worker)")]
    RequestTimeout {
        /// The request's message id.
        message_id: String,
        /// Exchange it was published to.
        exchange: String,
        /// Routing key it was published with.
        routing_key: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },

    /// A referenced queue or exchange does not exist (AMQP 404).
    #[error("{kind} '{name}' not found: declare the topology first (`helixmq topology apply`) or check the name")]
    NotFound {
        /// "queue" or "exchange".
        kind: &'static str,
        /// The name.
        name: String,
    },

    /// The message priority is above what the target queue accepts.
    #[error("priority {priority} is out of range: {reason}")]
    InvalidPriority {
        /// The priority asked for.
        priority: u8,
        /// Why it is refused.
        reason: String,
    },

    /// A scheduled publish ([`Broker::publish_delayed`](crate::Broker::publish_delayed),
    /// [`Broker::publish_at`](crate::Broker::publish_at)) asked for a delay or
    /// time helixmq cannot keep.
    #[error("invalid delay {delay}: {reason}")]
    InvalidDelay {
        /// The delay asked for, as written (e.g. `500ms`, or `in the past by 3s`).
        delay: String,
        /// Why it is refused and what is allowed.
        reason: String,
    },

    /// A rate limit ([`RateLimit`](crate::ratelimit::RateLimit)) is malformed.
    #[error(
        "invalid rate limit '{spec}': {reason}; the form is {}",
        crate::ratelimit::RATE_LIMIT_FORM
    )]
    InvalidRateLimit {
        /// The limit as written.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A message could not be encoded or decoded (headers, payload, size).
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// The operation needs a connection and there is none.
    #[error("not connected to the broker")]
    NotConnected,

    /// Reconnection gave up after the configured number of attempts.
    #[error("gave up reconnecting after {attempts} attempts (max_reconnect_attempts)")]
    ReconnectExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last connection error.
        #[source]
        source: Option<BoxError>,
    },

    /// A subscription's consumer was cancelled by the broker (queue deleted, node down).
    #[error("consumer on queue '{queue}' was cancelled by the broker (was the queue deleted?)")]
    ConsumerCancelled {
        /// The queue consumed.
        queue: String,
    },

    /// A resource only one user may hold at a time is held by another (the DLQ
    /// by another reader).
    #[error("{what} is in use: {detail}")]
    InUse {
        /// What is held, e.g. "the DLQ 'helixagent.dlq'".
        what: String,
        /// Who holds it and what to do.
        detail: String,
    },

    /// The broker or client was shut down.
    #[error("the broker handle is closed")]
    Closed,

    /// An AMQP channel or protocol error not covered above.
    #[error("AMQP error: {context}")]
    Amqp {
        /// What helixmq was doing.
        context: String,
        /// The lapin error.
        #[source]
        source: BoxError,
    },

    /// A PostgreSQL operation of the outbox or the inbox failed (feature `postgres`).
    #[error("database: {context}")]
    Database {
        /// What helixmq was doing, e.g. "relay: lock a batch of outbox rows".
        context: String,
        /// The driver's error.
        #[source]
        source: BoxError,
    },

    /// An I/O error (files, sockets).
    #[error("{context}")]
    Io {
        /// What was being done, and on which path.
        context: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the same operation later may succeed (transient faults).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::ConnectionRefused { .. }
                | Error::Connect { .. }
                | Error::PublishTimeout { .. }
                | Error::NotConnected
                | Error::PublishNacked { .. }
                | Error::InUse { .. }
        )
    }

    /// This error again, for each of several operations that one cause failed
    /// at once (a batch whose channel could not be had): the same variant and
    /// fields, so [`Error::is_retryable`] gives the same answer; a cause that
    /// cannot be cloned is kept as its text (its own chain flattened).
    pub(crate) fn replicate(&self) -> Error {
        fn text(e: &BoxError) -> BoxError {
            e.to_string().into()
        }
        match self {
            Error::InvalidConfig { problems } => Error::InvalidConfig {
                problems: problems.clone(),
            },
            Error::ConnectionRefused { host, port, source } => Error::ConnectionRefused {
                host: host.clone(),
                port: *port,
                source: text(source),
            },
            Error::Connect {
                endpoint,
                reason,
                source,
            } => Error::Connect {
                endpoint: endpoint.clone(),
                reason: reason.clone(),
                source: source.as_ref().map(text),
            },
            Error::AccessRefused { user, detail } => Error::AccessRefused {
                user: user.clone(),
                detail: detail.clone(),
            },
            Error::VhostNotAllowed { vhost } => Error::VhostNotAllowed {
                vhost: vhost.clone(),
            },
            Error::InUse { what, detail } => Error::InUse {
                what: what.clone(),
                detail: detail.clone(),
            },
            Error::PreconditionFailed { kind, name, detail } => Error::PreconditionFailed {
                kind,
                name: name.clone(),
                detail: detail.clone(),
            },
            Error::PublishNacked {
                message_id,
                exchange,
                routing_key,
            } => Error::PublishNacked {
                message_id: message_id.clone(),
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
            },
            Error::PublishTimeout {
                message_id,
                timeout,
            } => Error::PublishTimeout {
                message_id: message_id.clone(),
                timeout: *timeout,
            },
            Error::Unroutable {
                message_id,
                exchange,
                routing_key,
            } => Error::Unroutable {
                message_id: message_id.clone(),
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
            },
            Error::RequestTimeout {
                message_id,
                exchange,
                routing_key,
                timeout,
            } => Error::RequestTimeout {
                message_id: message_id.clone(),
                exchange: exchange.clone(),
                routing_key: routing_key.clone(),
                timeout: *timeout,
            },
            Error::NotFound { kind, name } => Error::NotFound {
                kind,
                name: name.clone(),
            },
            Error::InvalidPriority { priority, reason } => Error::InvalidPriority {
                priority: *priority,
                reason: reason.clone(),
            },
            Error::InvalidDelay { delay, reason } => Error::InvalidDelay {
                delay: delay.clone(),
                reason: reason.clone(),
            },
            Error::InvalidRateLimit { spec, reason } => Error::InvalidRateLimit {
                spec: spec.clone(),
                reason: reason.clone(),
            },
            Error::InvalidMessage(m) => Error::InvalidMessage(m.clone()),
            Error::NotConnected => Error::NotConnected,
            Error::ReconnectExhausted { attempts, source } => Error::ReconnectExhausted {
                attempts: *attempts,
                source: source.as_ref().map(text),
            },
            Error::ConsumerCancelled { queue } => Error::ConsumerCancelled {
                queue: queue.clone(),
            },
            Error::Closed => Error::Closed,
            Error::Amqp { context, source } => Error::Amqp {
                context: context.clone(),
                source: text(source),
            },
            Error::Database { context, source } => Error::Database {
                context: context.clone(),
                source: text(source),
            },
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
        }
    }

    pub(crate) fn invalid_config(problem: impl Into<String>) -> Self {
        Error::InvalidConfig {
            problems: vec![problem.into()],
        }
    }
}

/// How to delete what a 406 names: `rabbitmqctl` deletes queues, not exchanges.
fn delete_hint(kind: &str, name: &str) -> String {
    if kind == "exchange" {
        format!("delete the exchange (the management UI, or `rabbitmqadmin delete exchange name={name}`; `helixmq topology apply` re-creates it with its bindings)")
    } else {
        format!("delete the {kind} once it is drained (`rabbitmqctl delete_queue {name}`: its messages go with it)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch failed by one cause reports it for every message with the same
    /// variant, so callers decide retries the same way as for one publish.
    #[test]
    fn replicate_keeps_the_variant_and_the_retry_decision() {
        let cases = [
            Error::Closed,
            Error::NotConnected,
            Error::ReconnectExhausted {
                attempts: 3,
                source: Some("connection refused".into()),
            },
            Error::ConnectionRefused {
                host: "h".into(),
                port: 5672,
                source: "refused".into(),
            },
            Error::Amqp {
                context: "open a publisher channel".into(),
                source: "channel_max reached".into(),
            },
            Error::Io {
                context: "read".into(),
                source: std::io::Error::other("boom"),
            },
        ];
        for e in &cases {
            let r = e.replicate();
            assert_eq!(
                std::mem::discriminant(e),
                std::mem::discriminant(&r),
                "{e:?}"
            );
            assert_eq!(e.to_string(), r.to_string());
            assert_eq!(e.is_retryable(), r.is_retryable(), "{e:?}");
        }
        assert!(Error::NotConnected.replicate().is_retryable());
        assert!(!Error::Closed.replicate().is_retryable());
    }
}
