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
    Broker::builder(cfg.clone())
        .metrics(metrics)
        .connect()
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
        // helixmq::http::serve logs the address it listens on: not again here.
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
/// `helixmq.queue_type: quorum` asks for it. Without scheduled delivery: a
/// worker declares this at every start.
pub fn spec_topology(cfg: &Config) -> Topology {
    configured_topology(cfg, false)
}

/// [`spec_topology`] with scheduled delivery (the delay levels and the due
/// exchange mirroring every binding): what `topology apply | diff | export |
/// delete` manage, and what `publish --delay | --at` declares first.
pub fn applied_topology(cfg: &Config) -> Topology {
    configured_topology(cfg, true)
}

fn configured_topology(cfg: &Config, scheduling: bool) -> Topology {
    let names = Names::new(cfg.helixmq.prefix.clone());
    let mut t = Topology::spec(&names);
    t.add_retry_tier(cfg.helixmq.retry_delay);
    if scheduling {
        t.add_scheduling();
    }
    t.with_queue_type(cfg.helixmq.queue_type)
}

/// A queue name as the user typed it, made full: `tasks.llm` is short for
/// `<prefix>.tasks.llm` when that is a queue of the topology. A name that is
/// already full, or names no queue of the topology, is returned unchanged (a
/// queue declared by someone else may have any name).
pub fn full_queue_name(topology: &Topology, name: &str) -> String {
    if topology.queues.iter().any(|q| q.name == name) {
        return name.to_string();
    }
    let full = format!("{}.{name}", topology.names.prefix());
    if topology.queues.iter().any(|q| q.name == full) {
        full
    } else {
        name.to_string()
    }
}

/// Colour on stderr only when it is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>).
pub fn stderr_colour() -> bool {
    use std::io::IsTerminal as _;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
}

/// A progress bar on stderr, drawn only when stderr is a terminal (hidden when
/// piped or captured, so logs and scripts never see its escape codes).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let template = if stderr_colour() {
        "{msg} [{bar:40.cyan/blue}] {pos}/{len} {per_sec} {eta}"
    } else {
        "{msg} [{bar:40}] {pos}/{len} {per_sec} {eta}"
    };
    let b = indicatif::ProgressBar::new(len).with_style(
        indicatif::ProgressStyle::with_template(template)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b.enable_steady_tick(std::time::Duration::from_millis(200));
    b
}

/// Parse a human duration (`500ms`, `30s`, `5m`) for clap.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("'{s}' is not a duration ({e}); use e.g. 500ms, 30s, 5m"))
}

/// An RFC 3339 time (`2026-12-24T18:00:00Z`, `2026-12-24T19:00:00+01:00`).
pub fn parse_rfc3339(s: &str) -> Result<std::time::SystemTime, String> {
    time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map(std::time::SystemTime::from)
        .map_err(|e| {
            format!(
                "'{s}' is not an RFC 3339 time ({e}); use e.g. 2026-12-24T18:00:00Z or 2026-12-24T19:00:00+01:00"
            )
        })
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

/// The first `max` bytes of `s`, cut on a character boundary, trimmed; `…` marks a cut.
pub fn head(s: &str, max: usize) -> String {
    let s = s.trim();
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s[..end].trim_end())
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
