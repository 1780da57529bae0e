//! `helixmq publish`: confirmed publishing from the command line.
//!
//! Prints each confirmed message id on its own line (stdout), so scripts can
//! track what was accepted. `--count N` publishes N copies (each with its own
//! id) pipelined: batches of many messages with their confirms in flight at
//! once, several batches concurrently.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::{ArgGroup, Args};
use futures::StreamExt;
use helixmq::{Message, Priority, PublishOptions};

use crate::common::{
    applied_topology, connect, full_queue_name, load_config, parse_rfc3339, progress_bar,
    spec_topology,
};
use crate::Global;

/// Messages per pipelined batch.
const BATCH: usize = 500;
/// Batches in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;

/// `helixmq publish`
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["exchange", "queue"])))]
pub struct PublishArgs {
    /// Exchange to publish to (with --routing-key).
    #[arg(long, short = 'e', requires = "routing_key")]
    pub exchange: Option<String>,
    /// Routing key (with --exchange).
    #[arg(long, short = 'k', requires = "exchange")]
    pub routing_key: Option<String>,
    /// Publish straight to this queue through the default exchange (`tasks.llm` is
    /// short for `<prefix>.tasks.llm`). The spec's least-privilege user may not
    /// use the default exchange: prefer --exchange/--routing-key.
    #[arg(long, short = 'q', conflicts_with_all = ["exchange", "routing_key"])]
    pub queue: Option<String>,
    /// The message: payload and properties.
    #[command(flatten)]
    pub message: MessageArgs,
    /// Publish this many copies (each with its own id), pipelined.
    #[arg(long, short = 'n', default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Per-message TTL: a message still queued after this long is dead-lettered by
    /// the broker (to the DLQ, reason `expired`).
    #[arg(long, value_parser = crate::common::parse_duration)]
    pub expiration: Option<std::time::Duration>,
    /// Deliver after this delay, 1s to 30days (e.g. 90s, 2h, 3days): a
    /// scheduled publish, confirmed once it waits in the delay levels
    /// (declared with the configured topology first). Needs --exchange.
    #[arg(long, value_parser = crate::common::parse_duration, conflicts_with_all = ["at", "queue", "expiration"])]
    pub delay: Option<std::time::Duration>,
    /// Deliver at this RFC 3339 time (e.g. 2026-12-24T18:00:00Z), 1 s to 30
    /// days from now; like --delay otherwise.
    #[arg(long, value_parser = parse_rfc3339, conflicts_with_all = ["queue", "expiration"])]
    pub at: Option<std::time::SystemTime>,
    /// Print each confirmed message as a JSON object (id, exchange, routing_key) per line.
    #[arg(long)]
    pub json: bool,
    /// Publish timeout per message (default: the configuration's publish_timeout).
    #[arg(long, value_parser = crate::common::parse_duration)]
    pub timeout: Option<std::time::Duration>,
}

/// The message `publish` and `request` send: its payload (`--payload`,
/// `--file` or stdin) and properties.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("body").args(["payload", "file"])))]
pub struct MessageArgs {
    /// Priority: 0-10 or low (1), normal (5), high (8), critical (10).
    #[arg(long, short = 'p', value_parser = parse_priority)]
    pub priority: Option<Priority>,
    /// Message type (e.g. `llm.request`).
    #[arg(long = "type", short = 't')]
    pub kind: Option<String>,
    /// Correlation id (a request's default: its message id).
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Content type (default: `application/json` when the payload is valid JSON, else none).
    #[arg(long)]
    pub content_type: Option<String>,
    /// A header `KEY=VALUE`; repeatable.
    #[arg(long = "header", short = 'H', value_parser = parse_header, value_name = "KEY=VALUE")]
    pub headers: Vec<(String, String)>,
    /// The payload text. Without --payload or --file, stdin is read.
    #[arg(long)]
    pub payload: Option<String>,
    /// Read the payload from this file.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
}

impl MessageArgs {
    /// The message, its payload read from `--payload`, `--file` or stdin.
    pub fn message(&self) -> anyhow::Result<Message> {
        let mut m = Message::new(self.payload()?);
        m.kind = self.kind.clone();
        m.priority = self.priority;
        m.correlation_id = self.correlation_id.clone();
        // Foreign consumers look at content_type before parsing: say what it is.
        m.content_type = self
            .content_type
            .clone()
            .or_else(|| json_content_type(&m.payload));
        for (k, v) in &self.headers {
            m.headers.insert(k.clone(), v.as_str().into());
        }
        Ok(m)
    }

    fn payload(&self) -> anyhow::Result<Bytes> {
        if let Some(p) = &self.payload {
            return Ok(Bytes::from(p.clone()));
        }
        if let Some(f) = &self.file {
            return Ok(Bytes::from(std::fs::read(f).with_context(|| {
                format!("cannot read payload file {}", f.display())
            })?));
        }
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read the payload from stdin")?;
        Ok(Bytes::from(buf))
    }
}

/// A priority by number or name, refused with the names that exist.
pub fn parse_priority(s: &str) -> Result<Priority, String> {
    let names = "low (1), normal (5), high (8), critical (10)";
    match s.trim().parse::<u8>() {
        Ok(v) => Priority::new(v)
            .map_err(|_| format!("priority {v} is out of range: use 0 to 10 or a name: {names}")),
        Err(_) => s.parse::<Priority>().map_err(|_| {
            format!("'{s}' is not a priority: use a number 0 to 10 or a name: {names}")
        }),
    }
}

/// `KEY=VALUE` → (KEY, VALUE); the key must not be empty.
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "malformed header '{s}': expected KEY=VALUE, e.g. --header tenant=acme"
        )),
    }
}

/// Run `publish`.
pub async fn run(global: &Global, args: PublishArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    let message = args.message.message()?;
    let topology = spec_topology(&cfg);
    let (exchange, routing_key) = match (&args.queue, &args.exchange, &args.routing_key) {
        (Some(q), _, _) => (String::new(), full_queue_name(&topology, q)),
        (None, Some(e), Some(k)) => (e.clone(), k.clone()),
        _ => bail!("give --exchange with --routing-key, or --queue"),
    };
    let template = {
        let mut m = message;
        m.expiration = args.expiration;
        m
    };
    if let Some(at) = args.at {
        // Before connecting: the connection and the first declare take time,
        // and a time already past is the user's mistake, not ours.
        if at <= std::time::SystemTime::now() {
            anyhow::bail!(
                "--at {} is in the past: give a time from now on (RFC 3339, e.g. 2026-12-24T18:00:00Z), or use --delay",
                humantime::format_rfc3339_seconds(at)
            );
        }
    }
    let broker = connect(&cfg).await?;
    let when = match (args.delay, args.at) {
        (Some(d), _) => Some(When::In(d)),
        (None, Some(t)) => Some(When::At(t)),
        (None, None) => None,
    };
    if let Some(when) = when {
        let res = scheduled(
            &broker,
            &cfg,
            &args,
            when,
            (&exchange, &routing_key),
            template,
        )
        .await;
        let _ = broker.close().await;
        return res;
    }
    let opts = PublishOptions {
        mandatory: true,
        timeout: args.timeout,
        priority: None,
    };
    let target = if exchange.is_empty() {
        format!("queue '{routing_key}' (default exchange)")
    } else {
        format!("exchange '{exchange}' with routing key '{routing_key}'")
    };
    let printed = |id: &str| {
        if args.json {
            serde_json::json!({
                "id": id,
                "exchange": exchange,
                "routing_key": routing_key,
                "confirmed": true,
            })
            .to_string()
        } else {
            id.to_string()
        }
    };

    let mut first_error = None;
    let mut confirmed = 0u64;
    let stdout = std::io::stdout();
    if args.count == 1 {
        let id = template.id.clone();
        match broker
            .publish_with(&exchange, &routing_key, template, &opts)
            .await
        {
            Ok(()) => {
                outln!("{}", printed(&id));
                confirmed = 1;
            }
            Err(e) => first_error = Some(e),
        }
    } else {
        let bar = progress_bar(args.count, "publishing");
        // Each batch is a slice of fresh copies; batches run concurrently but are
        // reported in order, so the ids come out in publish order.
        let batches = (0..args.count).step_by(BATCH).map(|start| {
            let n = (args.count - start).min(BATCH as u64) as usize;
            let msgs: Vec<Message> = (0..n)
                .map(|_| {
                    let mut m = template.clone();
                    m.id = uuid::Uuid::now_v7().to_string();
                    m
                })
                .collect();
            let (b, ex, rk, o) = (
                broker.clone(),
                exchange.clone(),
                routing_key.clone(),
                opts.clone(),
            );
            async move {
                let res = b.publish_batch(&ex, &rk, &msgs, &o).await;
                msgs.into_iter().map(|m| m.id).zip(res).collect::<Vec<_>>()
            }
        });
        let mut results = futures::stream::iter(batches).buffered(BATCHES_IN_FLIGHT);
        while let Some(batch) = results.next().await {
            let n = batch.len() as u64;
            let mut out = stdout.lock();
            for (id, r) in batch {
                match r {
                    Ok(()) => {
                        let _ = writeln!(out, "{}", printed(&id));
                        confirmed += 1;
                    }
                    Err(e) => {
                        if first_error.is_none() {
                            first_error = Some(e);
                        }
                    }
                }
            }
            let _ = out.flush();
            bar.inc(n);
        }
        bar.finish_and_clear();
    }
    let _ = broker.close().await;
    let first_error = first_error.map(|e| explain(e, &exchange, &routing_key, &topology));
    match first_error {
        None => {
            if args.count > 1 {
                eprintln!("{confirmed} message(s) confirmed to {target}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(e) if args.count == 1 => Err(e),
        Some(e) => {
            let failed = args.count - confirmed;
            Err(e.context(format!(
                "{failed} of {} message(s) to {target} not confirmed ({confirmed} confirmed, their ids printed)",
                args.count
            )))
        }
    }
}

/// When a scheduled publish is due.
#[derive(Debug, Clone, Copy)]
enum When {
    /// `--delay`.
    In(std::time::Duration),
    /// `--at`.
    At(std::time::SystemTime),
}

/// `publish --delay | --at`: declare the configured topology with scheduled
/// delivery (so the destination's bindings are mirrored on the due exchange),
/// then schedule each copy; one confirmed id per line, as for a publish.
async fn scheduled(
    broker: &helixmq::Broker,
    cfg: &helixmq::Config,
    args: &PublishArgs,
    when: When,
    (exchange, routing_key): (&str, &str),
    template: Message,
) -> anyhow::Result<ExitCode> {
    broker
        .declare(&applied_topology(cfg))
        .await
        .context("cannot declare the topology with scheduled delivery")?;
    let opts = PublishOptions {
        mandatory: true,
        timeout: args.timeout,
        priority: None,
    };
    for i in 0..args.count {
        let mut m = template.clone();
        if i > 0 {
            m.id = uuid::Uuid::now_v7().to_string();
        }
        let id = m.id.clone();
        let res = match when {
            When::In(d) => {
                broker
                    .publish_delayed_with(exchange, routing_key, m, d, &opts)
                    .await
            }
            // Checked not past at start; if our own connect and declare took
            // it past since, it goes at the shortest delay (at most 1 s late).
            When::At(at) if at <= std::time::SystemTime::now() => {
                broker
                    .publish_delayed_with(
                        exchange,
                        routing_key,
                        m,
                        std::time::Duration::from_secs(1),
                        &opts,
                    )
                    .await
            }
            When::At(at) => {
                broker
                    .publish_at_with(exchange, routing_key, m, at, &opts)
                    .await
            }
        };
        if let Err(e) = res {
            if args.count == 1 {
                return Err(e.into());
            }
            return Err(anyhow::Error::new(e).context(format!(
                "{} of {} scheduled message(s) not confirmed ({i} confirmed, their ids printed)",
                args.count - i,
                args.count
            )));
        }
        if args.json {
            outln!(
                "{}",
                serde_json::json!({
                    "id": id,
                    "exchange": exchange,
                    "routing_key": routing_key,
                    "confirmed": true,
                    "scheduled": true,
                })
            );
        } else {
            outln!("{id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `application/json` when the payload parses as JSON (the spec's service always
/// sent it, and foreign consumers check it); nothing otherwise.
pub fn json_content_type(payload: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    if text.is_empty() {
        return None;
    }
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .ok()
        .map(|_| "application/json".to_string())
}

/// A refused publish to the default exchange is a permission the spec's user
/// never has (configure/write/read only `^<prefix>\..*`), not a bad password:
/// say so, and name the exchange and key that reach the same queue.
fn explain(
    e: helixmq::Error,
    exchange: &str,
    queue: &str,
    topology: &helixmq::Topology,
) -> anyhow::Error {
    let detail = match &e {
        helixmq::Error::AccessRefused { detail, .. } if exchange.is_empty() => detail.clone(),
        _ => return e.into(),
    };
    let requeue = topology.names.requeue_exchange();
    let route = topology
        .bindings
        .iter()
        .find(|b| b.queue == queue && b.exchange != requeue);
    let suggestion = match route {
        Some(b) if b.routing_key.contains(['#', '*']) => {
            format!("-e {} -k <a key matching '{}'>", b.exchange, b.routing_key)
        }
        Some(b) if b.routing_key.is_empty() => format!("-e {} -k ''", b.exchange),
        Some(b) => format!("-e {} -k {}", b.exchange, b.routing_key),
        None => format!("-e {} -k background", topology.names.tasks_exchange()),
    };
    anyhow::anyhow!(
        "publishing straight to a queue uses the default exchange, which the spec's \
         permissions refuse: use `{suggestion}` (the broker said: {detail})"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(parse_header("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert_eq!(parse_header("a=").unwrap(), ("a".into(), "".into()));
        assert!(parse_header("novalue")
            .unwrap_err()
            .contains("malformed header 'novalue'"));
        assert!(parse_header("=x").is_err());
    }

    #[test]
    fn priorities() {
        assert_eq!(parse_priority("high").unwrap(), Priority::HIGH);
        assert_eq!(parse_priority("7").unwrap().value(), 7);
        let e = parse_priority("urgent").unwrap_err();
        assert!(e.contains("'urgent'") && e.contains("critical (10)"), "{e}");
        assert!(parse_priority("11").unwrap_err().contains("out of range"));
    }

    #[test]
    fn json_payloads_get_a_content_type() {
        assert_eq!(
            json_content_type(br#" {"a":1} "#).as_deref(),
            Some("application/json")
        );
        assert_eq!(
            json_content_type(b"42").as_deref(),
            Some("application/json")
        );
        assert_eq!(json_content_type(b"hello"), None);
        assert_eq!(json_content_type(b""), None);
        assert_eq!(json_content_type(&[0xff, 0xfe]), None);
    }
}
