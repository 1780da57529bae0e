//! Configuration: the spec's `configs/messaging.yaml`, environment overrides,
//! validation that reports every problem at once.
//!
//! Loading order: YAML file (with `${VAR}` / `${VAR:-default}` interpolation),
//! then the spec's `RABBITMQ_*` variables, then `RABBITMQ_HOSTS`, then
//! `RABBITMQ_URL`, then `HELIXMQ_PREFIX`. The password is a [`Secret`]: it
//! never shows in `Debug`, `Display`, errors or logs.
//!
//! # Layout
//! - `load`: the pipeline, file → interpolation → environment → validation.
//! - `loose`: the untyped tree the file is first read into, so that one bad
//!   value does not hide the others.
//! - `interpolate`: `${VAR}` / `${VAR:-default}`.
//! - `env`: [`EnvSource`] and the variables that override fields.
//! - `url`: `RABBITMQ_URL` (AMQP URIs).
//! - `validate`: typed conversion and every check, one problem line each.
//!
//! ```
//! use helixmq::config::{load_from_str, EnvSource};
//! let env = EnvSource::map([("RABBITMQ_URL", "amqps://app:s%40cret@rabbit.example:5671/prod")]);
//! let config = load_from_str("helixmq:\n  prefix: acme\n", &env).unwrap();
//! assert_eq!(config.rabbitmq.host, "rabbit.example");
//! assert_eq!(config.rabbitmq.password.expose(), "s@cret");
//! assert!(config.rabbitmq.tls.enabled);
//! assert!(!config.to_redacted_yaml().contains("s@cret"));
//! ```

mod env;
mod interpolate;
mod load;
mod loose;
mod secret;
mod url;
mod validate;

pub use env::EnvSource;
pub use load::{load, load_from_str};
pub use secret::Secret;

use serde::{Deserialize, Serialize};
use std::time::Duration;

impl Config {
    /// The effective configuration as YAML, the password shown as `***`
    /// (`helixmq config check`).
    pub fn to_redacted_yaml(&self) -> String {
        // Serializing plain data (strings, numbers, booleans, durations as
        // text) cannot fail; the fallback only keeps this function total.
        serde_saphyr::to_string(self)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

impl std::fmt::Display for Config {
    /// The redacted YAML rendering.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_redacted_yaml())
    }
}

/// Root of `messaging.yaml`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The RabbitMQ section.
    #[serde(default)]
    pub rabbitmq: RabbitMqConfig,
    /// helixmq's own settings (name prefix, retry policy defaults).
    #[serde(default)]
    pub helixmq: HelixConfig,
}

/// helixmq settings that are not RabbitMQ connection settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HelixConfig {
    /// Prefix of every exchange and queue name (`HELIXMQ_PREFIX`). Default `helixagent`.
    pub prefix: String,
    /// Handler attempts before a message goes to the DLQ. Default 3.
    pub max_attempts: u32,
    /// Delay before a failed message comes back to its queue. Default 60 s, the spec's retry queue.
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
    /// `classic` (default) or `quorum`: with `quorum`, every queue of the spec
    /// topology except priority queues is a replicated quorum queue
    /// ([`Topology::with_quorum_queues`](crate::Topology::with_quorum_queues)).
    pub queue_type: crate::topology::QueueType,
}

impl Default for HelixConfig {
    fn default() -> Self {
        Self {
            prefix: crate::topology::DEFAULT_PREFIX.to_string(),
            max_attempts: 3,
            retry_delay: Duration::from_secs(60),
            queue_type: crate::topology::QueueType::Classic,
        }
    }
}

/// Connection, publisher and consumer settings (the spec's `rabbitmq:` block).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitMqConfig {
    /// Broker host. Default `localhost`.
    pub host: String,
    /// Broker port. Default 5672 (5671 is usual for TLS).
    pub port: u16,
    /// Further nodes `host:port` tried in turn after `host:port` (cluster failover).
    pub hosts: Vec<String>,
    /// User name. Default `helixagent`.
    pub username: String,
    /// Password; redacted everywhere.
    pub password: Secret,
    /// Virtual host. Default `/`.
    pub vhost: String,
    /// TCP + AMQP handshake timeout. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// AMQP heartbeat. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Reconnect attempts before giving up; 0 = forever. Default 10.
    pub max_reconnect_attempts: u32,
    /// Base delay of the jittered exponential reconnect backoff. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub reconnect_delay: Duration,
    /// Wait for publisher confirms. Default true.
    pub publisher_confirm: bool,
    /// How long a publish may wait for its confirm (and for a connection). Default 10 s.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Unacked deliveries per consumer (`basic.qos`). Default 10.
    pub prefetch_count: u16,
    /// Apply the prefetch to the whole channel instead of per consumer. Default false.
    pub prefetch_global: bool,
    /// TLS settings.
    pub tls: TlsConfig,
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            host: "localhost".into(),
            port: 5672,
            hosts: Vec::new(),
            username: "helixagent".into(),
            password: Secret::new("helixagent123"),
            vhost: "/".into(),
            connect_timeout: Duration::from_secs(30),
            heartbeat: Duration::from_secs(10),
            max_reconnect_attempts: 10,
            reconnect_delay: Duration::from_secs(5),
            publisher_confirm: true,
            publish_timeout: Duration::from_secs(10),
            prefetch_count: 10,
            prefetch_global: false,
            tls: TlsConfig::default(),
        }
    }
}

impl RabbitMqConfig {
    /// The connection as an AMQP URI with the password shown as `***`, for logs
    /// and messages, e.g. `amqp://helixagent:***@localhost:5672/%2F`.
    pub fn redacted_url(&self) -> String {
        use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
        // RFC 3986 unreserved characters stay as they are.
        const PART: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'.')
            .remove(b'_')
            .remove(b'~');
        let scheme = if self.tls.enabled { "amqps" } else { "amqp" };
        let user = utf8_percent_encode(&self.username, PART);
        let vhost = utf8_percent_encode(&self.vhost, PART);
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let password = if self.password.is_empty() { "" } else { ":***" };
        format!("{scheme}://{user}{password}@{host}:{}/{vhost}", self.port)
    }

    /// Every endpoint to try, in order: `host:port` first, then `hosts`
    /// (duplicates dropped). Hosts are names or addresses without brackets
    /// (`::1`, not `[::1]`), ready for `TcpStream::connect((host, port))`;
    /// a `hosts` entry without a port uses [`port`](Self::port).
    pub fn endpoints(&self) -> Vec<(String, u16)> {
        let bare = |h: &str| h.trim_start_matches('[').trim_end_matches(']').to_string();
        let mut out = vec![(bare(&self.host), self.port)];
        for h in &self.hosts {
            // Entries are validated when loaded; one set by hand that does not parse is skipped.
            if let Ok((host, port)) = validate::parse_host_port(h, self.port) {
                if !out.iter().any(|(oh, op)| *oh == host && *op == port) {
                    out.push((host, port));
                }
            }
        }
        out
    }
}

/// TLS settings (the spec's `tls:` block).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Use `amqps`.
    pub enabled: bool,
    /// Client certificate (PEM), for mutual TLS / SASL EXTERNAL.
    pub cert_file: String,
    /// Client private key (PEM); needs `cert_file`.
    pub key_file: String,
    /// CA bundle (PEM) that signed the server certificate.
    pub ca_file: String,
    /// Accept any server certificate. Dangerous: logged as a warning.
    pub skip_verify: bool,
    /// Verify the server certificate and host name. Default true.
    #[serde(default = "yes")]
    pub verify_peer: bool,
}

impl Default for TlsConfig {
    fn default() -> Self {
        // Not derived: a derived default would turn verify_peer off.
        Self {
            enabled: false,
            cert_file: String::new(),
            key_file: String::new(),
            ca_file: String::new(),
            skip_verify: false,
            verify_peer: true,
        }
    }
}

impl TlsConfig {
    /// Whether the server certificate is checked: `verify_peer` and not `skip_verify`
    /// (`skip_verify` wins, and the backend logs a warning for it).
    pub fn verifies_server(&self) -> bool {
        self.verify_peer && !self.skip_verify
    }
}

fn yes() -> bool {
    true
}
