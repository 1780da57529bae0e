//! What most commands share: the configuration, a connected broker, the topology.

use anyhow::Context as _;
use helixmq::config::{self, EnvSource};
use helixmq::{Broker, Config, Names, Topology};

use crate::Global;

/// Load the configuration: `--config FILE` (if given) + the environment, validated.
pub fn load_config(global: &Global) -> anyhow::Result<Config> {
    // The library's error already lists every problem with its field path.
    Ok(config::load(global.config.as_deref(), &EnvSource::Process)?)
}

/// `host:port` of the first configured endpoint, for messages (never credentials).
pub fn endpoint(cfg: &Config) -> String {
    format!("{}:{}", cfg.rabbitmq.host, cfg.rabbitmq.port)
}

/// Connect to RabbitMQ as configured.
pub async fn connect(cfg: &Config) -> anyhow::Result<Broker> {
    connect_with_metrics(cfg, helixmq::Metrics::default()).await
}

/// Connect to RabbitMQ as configured, counting into `metrics`.
pub async fn connect_with_metrics(
    cfg: &Config,
    metrics: helixmq::Metrics,
) -> anyhow::Result<Broker> {
    let what = format!(
        "cannot connect to RabbitMQ at {} (vhost '{}')",
        endpoint(cfg),
        cfg.rabbitmq.vhost
    );
    Broker::connect_with_metrics(cfg.clone(), metrics)
        .await
        .context(what)
}

/// `GET /metrics` and `GET /health` on `addr` while a command runs (`--metrics-addr`).
pub struct MetricsServer {
    server: helixmq::http::Server,
    stop: tokio_util::sync::CancellationToken,
}

impl MetricsServer {
    /// Serve `registry` and `health` on `addr`.
    pub async fn start(
        addr: std::net::SocketAddr,
        health: helixmq::http::HealthSource,
        registry: prometheus_client::registry::Registry,
    ) -> anyhow::Result<MetricsServer> {
        let stop = tokio_util::sync::CancellationToken::new();
        let router = helixmq::http::router(health, std::sync::Arc::new(registry));
        let server = helixmq::http::serve(addr, router, stop.clone())
            .await
            .with_context(|| format!("cannot serve metrics on {addr} (--metrics-addr)"))?;
        tracing::info!(addr = %server.local_addr(), "serving /metrics and /health");
        Ok(MetricsServer { server, stop })
    }

    /// Stop serving and wait for the server task.
    pub async fn stop(self) {
        self.stop.cancel();
        if let Err(e) = self.server.join().await {
            tracing::warn!(error = %e, "metrics server");
        }
    }
}

/// The topology the configuration describes: the spec's queues under the prefix,
/// plus the retry tier of the configured `retry_delay`, quorum where
/// `helixmq.queue_type: quorum` asks for it.
pub fn spec_topology(cfg: &Config) -> Topology {
    let names = Names::new(cfg.helixmq.prefix.clone());
    let mut t = Topology::spec(&names);
    t.add_retry_tier(cfg.helixmq.retry_delay);
    t.with_queue_type(cfg.helixmq.queue_type)
}

/// Parse a human duration (`500ms`, `30s`, `5m`) for clap.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration ({e}); use e.g. 500ms, 30s, 5m"))
}

/// The last `max` bytes of `s`, cut on a character boundary, trimmed.
pub fn tail(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

/// Write one line to stdout; a closed pipe ends the process with status 0, as
/// Unix tools do, and any other write error with status 1.
pub fn out_line(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|_| out.write_all(b"\n")) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}
