//! `helixmq worker`: consume queues with the library's retry and DLQ policy,
//! handing each message to a command per message ([`exec`]), long-lived handler
//! processes ([`pipe`]) or an HTTP endpoint ([`http`]).
//!
//! The worker declares the spec topology under the configured prefix on start
//! (idempotent), and the retry tier its `--retry-delay` needs. SIGTERM or
//! SIGINT starts a graceful shutdown: every subscription stops taking messages,
//! in-flight handlers finish within `--shutdown-timeout`, and the worker exits 0
//! (1 when handlers were still running at that deadline and were abandoned).

pub mod exec;
pub mod http;
pub mod pipe;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Args};
use futures::future::{select_all, FutureExt};
use helixmq::{Message, RetryPolicy, SubscribeOptions, Subscription, SubscriptionStatus};
use tokio::signal::unix::{signal, SignalKind};

use crate::common::{
    connect_with_metrics, full_queue_name, load_config, parse_duration, spec_topology,
    MetricsServer,
};
use crate::Global;

/// How much longer the library waits than our own handler timeout: ours kills the
/// process group and answers Retry; the library's is only a backstop.
const BACKSTOP: Duration = Duration::from_secs(5);

/// `helixmq worker`
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("handler").required(true).args(["exec", "http", "pipe"])))]
pub struct WorkerArgs {
    /// Queue to consume (e.g. `helixagent.tasks.llm`, or `tasks.llm` for
    /// `<prefix>.tasks.llm`); repeatable.
    #[arg(long = "queue", short = 'q', required = true, value_name = "NAME")]
    pub queues: Vec<String>,
    /// Run `sh -c CMD` per message: payload on stdin, metadata in HELIXMQ_* variables.
    /// Exit 0 → ack; 65 (EX_DATAERR) → DLQ with stderr's tail; other → retry.
    #[arg(long, value_name = "CMD")]
    pub exec: Option<String>,
    /// Keep N processes of `sh -c CMD` (N = --concurrency × queues) and hand each
    /// one message at a time as a JSON line on stdin; it answers one JSON line on
    /// stdout: {"outcome":"ack"}, {"outcome":"retry","delay_ms":…,"reason":…},
    /// {"outcome":"dead_letter","reason":…} or {"outcome":"reply","payload":…}.
    /// A process that exits or overstays --handler-timeout is replaced and its
    /// message retried; its stderr goes to the log. See examples/pipe/.
    #[arg(long, value_name = "CMD")]
    pub pipe: Option<String>,
    /// POST each message to URL (metadata as X-HelixMQ-* headers). 2xx → ack;
    /// 408, 429, 5xx, timeouts, connection errors → retry (honouring Retry-After);
    /// other 4xx → DLQ.
    #[arg(long, value_name = "URL")]
    pub http: Option<String>,
    /// Handlers running at once per queue (default: the prefetch).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: Option<u32>,
    /// Unacked deliveries per queue (default: the configuration's prefetch_count).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: Option<u16>,
    /// How long in-flight messages may take to finish after SIGTERM/SIGINT.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// A handler running longer is killed (its process group, for --exec) and retried.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub handler_timeout: Duration,
    /// Delay before a failed message comes back (overrides the configuration's
    /// retry_delay). Repeatable for backoff tiers: attempt n waits the n-th delay
    /// (the last one repeats), and an HTTP Retry-After picks the shortest tier at
    /// least as long. Each delay is its own retry queue, declared on start.
    #[arg(long, value_parser = parse_duration)]
    pub retry_delay: Vec<Duration>,
    /// Attempts before the DLQ (overrides the configuration's max_attempts).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: Option<u32>,
    /// Do not declare the spec topology on start (queues declared by someone else).
    #[arg(long)]
    pub no_declare: bool,
    /// Share a rate limit with every worker naming the same key, on any host:
    /// KEY=N/min[,Ntokens/min][,burst=N] (also /s, /h), e.g.
    /// openai-key-1=500/min,90000tokens/min. Each handler start takes a permit;
    /// a 429 with Retry-After (--http), or exit 75 with `retry-after: N` on
    /// stderr (--exec), pauses the key for all of them. A message's token
    /// estimate is its x-helixmq-token-estimate header.
    #[arg(long, value_name = "KEY=RATE", value_parser = parse_rate_limit)]
    pub rate_limit: Option<helixmq::ratelimit::RateLimit>,
    /// Serve Prometheus `GET /metrics` and `GET /health` on this address (e.g. 127.0.0.1:9090).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// A worker's message handler: what to do with one message.
enum Target {
    Exec(exec::ExecHandler),
    Http(http::HttpHandler),
    Pipe(pipe::PipeHandler),
}

impl Target {
    async fn handle(&self, m: Message, ctx: helixmq::Context) -> helixmq::Outcome {
        match self {
            Target::Exec(h) => h.handle(m, ctx).await,
            Target::Http(h) => h.handle(m, ctx).await,
            Target::Pipe(h) => h.handle(m, ctx).await,
        }
    }
}

/// Run `worker`.
pub async fn run(global: &Global, mut args: WorkerArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    let topology = spec_topology(&cfg);
    args.queues = args
        .queues
        .iter()
        .map(|q| full_queue_name(&topology, q))
        .collect();
    // Install the signal handlers first: a SIGTERM during start-up must not kill us mid-declare.
    let mut sigterm =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut sigint =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;

    // A handler that cannot run would fail every message: refuse before taking one.
    if let Some(cmd) = args.exec.as_ref().or(args.pipe.as_ref()) {
        exec::check_runnable(cmd)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let http = match &args.http {
        Some(url) => Some(http::HttpHandler::new(url, args.handler_timeout)?),
        None => None,
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = helixmq::Metrics::new(&mut registry);
    let broker = connect_with_metrics(&cfg, metrics).await?;
    let target = Arc::new(match (&args.exec, http, &args.pipe) {
        (Some(cmd), _, _) => {
            Target::Exec(exec::ExecHandler::new(cmd.clone(), args.handler_timeout))
        }
        (None, Some(h), _) => Target::Http(h),
        (None, None, Some(cmd)) => {
            // One process per handler that may run at once, over every queue.
            let per_queue = args
                .concurrency
                .map(|c| c as usize)
                .unwrap_or(cfg.rabbitmq.prefetch_count as usize);
            Target::Pipe(pipe::PipeHandler::new(
                cmd.clone(),
                args.handler_timeout,
                per_queue * args.queues.len(),
            ))
        }
        (None, None, None) => anyhow::bail!("give --exec CMD, --pipe CMD or --http URL"),
    });
    if !args.no_declare {
        broker
            .declare(&topology)
            .await
            .context("cannot declare the topology")?;
    }
    let retry = RetryPolicy {
        max_attempts: args.max_attempts.unwrap_or(cfg.helixmq.max_attempts),
        delays: if args.retry_delay.is_empty() {
            vec![cfg.helixmq.retry_delay]
        } else {
            args.retry_delay.clone()
        },
    };

    let mut subs: Vec<Subscription> = Vec::new();
    for q in &args.queues {
        let started = start_one(&broker, q, target.clone(), &args, &retry).await;
        match started {
            Ok(s) => subs.push(s),
            Err(e) => {
                stop_all(subs, &broker, args.shutdown_timeout).await;
                return Err(e);
            }
        }
    }
    let server = match args.metrics_addr {
        Some(addr) => {
            let health = subs
                .iter()
                .fold(helixmq::http::HealthSource::new(&broker), |h, s| h.watch(s));
            match MetricsServer::start(addr, health, registry).await {
                Ok(s) => Some(s),
                Err(e) => {
                    stop_all(subs, &broker, args.shutdown_timeout).await;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    tracing::info!(
        queues = %args.queues.join(","),
        max_attempts = retry.max_attempts,
        retry_delays = %retry
            .delays
            .iter()
            .map(|d| humantime::format_duration(*d).to_string())
            .collect::<Vec<_>>()
            .join(","),
        "worker consuming; SIGTERM or SIGINT to stop"
    );

    let failed = {
        let watches = subs.iter().map(|s| {
            let mut w = s.watch_status();
            async move {
                let st = w
                    .wait_for(|st| *st != SubscriptionStatus::Active)
                    .await
                    .map(|s| s.clone())
                    .ok();
                st
            }
            .boxed()
        });
        let all_failed = select_all(watches);
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); None }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); None }
            (st, i, _) = all_failed => Some((args.queues[i].clone(), st)),
        }
    };

    let reports = futures::future::join_all(subs.into_iter().map(|s| {
        let q = s.queue().to_string();
        async move { (q, s.shutdown(args.shutdown_timeout).await) }
    }))
    .await;
    let mut abandoned = 0;
    for (q, r) in reports {
        tracing::info!(queue = %q, drained = r.drained, abandoned = r.abandoned, "subscription stopped");
        if r.abandoned > 0 {
            tracing::warn!(queue = %q, abandoned = r.abandoned, "handlers still running at the shutdown timeout were stopped; their messages go back to the queue");
        }
        abandoned += r.abandoned;
    }
    if let Some(s) = server {
        s.stop().await;
    }
    let _ = broker.close().await;
    match failed {
        // A supervisor must know the stop was not clean: work was cut off.
        None if abandoned > 0 => anyhow::bail!(
            "{abandoned} message(s) were still being handled at the shutdown deadline \
             (--shutdown-timeout {}) and were abandoned; they go back to their queue",
            humantime::format_duration(args.shutdown_timeout)
        ),
        None => Ok(ExitCode::SUCCESS),
        Some((q, st)) => {
            let why = match st {
                Some(SubscriptionStatus::Failed(f)) => f,
                other => format!("{other:?}"),
            };
            anyhow::bail!("the subscription to '{q}' stopped: {why}")
        }
    }
}

fn parse_rate_limit(s: &str) -> Result<helixmq::ratelimit::RateLimit, String> {
    s.parse().map_err(|e: helixmq::Error| e.to_string())
}

/// Start-up failed half-way: release what was started.
async fn stop_all(subs: Vec<Subscription>, broker: &helixmq::Broker, timeout: Duration) {
    for s in subs {
        s.shutdown(timeout).await;
    }
    let _ = broker.close().await;
}

async fn start_one(
    broker: &helixmq::Broker,
    queue: &str,
    target: Arc<Target>,
    args: &WorkerArgs,
    retry: &RetryPolicy,
) -> anyhow::Result<Subscription> {
    // Ask first, so an unknown queue gets the library's clear "not found" message.
    broker
        .backend()
        .queue_stats(queue)
        .await
        .with_context(|| format!("cannot consume queue '{queue}'"))?;
    // More handlers than unacked deliveries would leave some idle: widen the prefetch to match.
    let prefetch = match (args.prefetch, args.concurrency) {
        (None, Some(c)) => Some(
            broker
                .config()
                .rabbitmq
                .prefetch_count
                .max(c.min(u16::MAX as u32) as u16),
        ),
        (p, _) => p,
    };
    let opts = SubscribeOptions {
        prefetch,
        concurrency: args.concurrency.map(|c| c as usize),
        handler_timeout: Some(args.handler_timeout + BACKSTOP),
        retry: Some(retry.clone()),
        rate_limit: args.rate_limit.clone(),
        ..SubscribeOptions::default()
    };
    let handler = move |m: Message, ctx: helixmq::Context| {
        let t = target.clone();
        async move { Ok::<_, helixmq::BoxError>(t.handle(m, ctx).await) }
    };
    broker
        .subscribe(queue, handler, opts)
        .await
        .with_context(|| format!("cannot consume queue '{queue}'"))
}

/// The metadata of a message as (name, value) pairs: `MESSAGE_ID`, `TYPE`, ... and
/// `HEADER_<NAME>` per header. `--exec` prefixes them with `HELIXMQ_` (environment),
/// `--http` sends them as `X-HelixMQ-*` headers.
pub fn metadata(m: &Message, ctx: &helixmq::Context) -> Vec<(String, String)> {
    let mut out = vec![
        ("MESSAGE_ID".to_string(), m.id.clone()),
        ("TYPE".to_string(), m.kind.clone().unwrap_or_default()),
        ("ATTEMPT".to_string(), m.attempt.to_string()),
        (
            "CORRELATION_ID".to_string(),
            m.correlation_id.clone().unwrap_or_default(),
        ),
        ("QUEUE".to_string(), ctx.queue.clone()),
        (
            "PRIORITY".to_string(),
            m.priority
                .map(|p| p.value().to_string())
                .unwrap_or_default(),
        ),
        ("EXCHANGE".to_string(), ctx.exchange.clone()),
        ("ROUTING_KEY".to_string(), ctx.routing_key.clone()),
        ("REDELIVERED".to_string(), ctx.redelivered.to_string()),
        ("TIMESTAMP".to_string(), m.timestamp.to_string()),
    ];
    for (k, v) in &m.headers {
        out.push((format!("HEADER_{}", env_name(k)), v.to_string()));
    }
    // A field of the message, but a header on the wire: shown as one.
    if let Some(tp) = &m.traceparent {
        out.push(("HEADER_TRACEPARENT".to_string(), tp.clone()));
    }
    out
}

/// A header name as an environment-variable suffix: upper case, `[A-Z0-9_]` only.
pub fn env_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names() {
        assert_eq!(env_name("x-helixmq-origin-queue"), "X_HELIXMQ_ORIGIN_QUEUE");
        assert_eq!(env_name("tenant"), "TENANT");
    }

    #[test]
    fn metadata_has_the_documented_names() {
        let m = Message::new("x")
            .with_kind("t")
            .with_header("tenant", "acme");
        let ctx = helixmq::Context {
            queue: "q".into(),
            exchange: "e".into(),
            routing_key: "k".into(),
            redelivered: false,
        };
        let md = metadata(&m, &ctx);
        let get = |k: &str| md.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("TYPE").as_deref(), Some("t"));
        assert_eq!(get("ATTEMPT").as_deref(), Some("1"));
        assert_eq!(get("QUEUE").as_deref(), Some("q"));
        assert_eq!(get("HEADER_TENANT").as_deref(), Some("acme"));
    }
}
