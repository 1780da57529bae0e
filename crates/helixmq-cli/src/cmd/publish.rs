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

use crate::common::{connect, load_config};
use crate::Global;

/// Messages per pipelined batch.
const BATCH: usize = 500;
/// Batches in flight at once.
const BATCHES_IN_FLIGHT: usize = 4;

/// `helixmq publish`
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["exchange", "queue"])))]
#[command(group(ArgGroup::new("body").args(["payload", "file"])))]
pub struct PublishArgs {
    /// Exchange to publish to (with --routing-key).
    #[arg(long, short = 'e', requires = "routing_key")]
    pub exchange: Option<String>,
    /// Routing key (with --exchange).
    #[arg(long, short = 'k', requires = "exchange")]
    pub routing_key: Option<String>,
    /// Publish straight to this queue through the default exchange.
    #[arg(long, short = 'q', conflicts_with_all = ["exchange", "routing_key"])]
    pub queue: Option<String>,
    /// Priority: 0-10 or low (1), normal (5), high (8), critical (10).
    #[arg(long, short = 'p', value_parser = parse_priority)]
    pub priority: Option<Priority>,
    /// Message type (e.g. `llm.request`).
    #[arg(long = "type", short = 't')]
    pub kind: Option<String>,
    /// Correlation id.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Content type (e.g. `application/json`).
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
    /// Publish this many copies (each with its own id), pipelined.
    #[arg(long, short = 'n', default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub count: u64,
    /// Per-message TTL: a message still queued after this long is dead-lettered by
    /// the broker (to the DLQ, reason `expired`).
    #[arg(long, value_parser = crate::common::parse_duration)]
    pub expiration: Option<std::time::Duration>,
    /// Publish timeout per message (default: the configuration's publish_timeout).
    #[arg(long, value_parser = crate::common::parse_duration)]
    pub timeout: Option<std::time::Duration>,
}

fn parse_priority(s: &str) -> Result<Priority, String> {
    s.parse::<Priority>().map_err(|e| e.to_string())
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
    let payload = read_payload(&args)?;
    let (exchange, routing_key) = match (&args.queue, &args.exchange, &args.routing_key) {
        (Some(q), _, _) => (String::new(), q.clone()),
        (None, Some(e), Some(k)) => (e.clone(), k.clone()),
        _ => bail!("give --exchange with --routing-key, or --queue"),
    };
    let template = {
        let mut m = Message::new(payload);
        m.kind = args.kind.clone();
        m.priority = args.priority;
        m.correlation_id = args.correlation_id.clone();
        m.content_type = args.content_type.clone();
        m.expiration = args.expiration;
        for (k, v) in &args.headers {
            m.headers.insert(k.clone(), v.as_str().into());
        }
        m
    };
    let broker = connect(&cfg).await?;
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
                outln!("{id}");
                confirmed = 1;
            }
            Err(e) => first_error = Some(e),
        }
    } else {
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
            let mut out = stdout.lock();
            for (id, r) in batch {
                match r {
                    Ok(()) => {
                        let _ = writeln!(out, "{id}");
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
        }
    }
    let _ = broker.close().await;
    match first_error {
        None => {
            if args.count > 1 {
                eprintln!("{confirmed} message(s) confirmed to {target}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(e) if args.count == 1 => Err(e.into()),
        Some(e) => {
            let failed = args.count - confirmed;
            Err(anyhow::Error::new(e).context(format!(
                "{failed} of {} message(s) to {target} not confirmed ({confirmed} confirmed, their ids printed)",
                args.count
            )))
        }
    }
}

fn read_payload(args: &PublishArgs) -> anyhow::Result<Bytes> {
    if let Some(p) = &args.payload {
        return Ok(Bytes::from(p.clone()));
    }
    if let Some(f) = &args.file {
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
}
