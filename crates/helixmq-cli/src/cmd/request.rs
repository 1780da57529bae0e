//! `helixmq request`: publish a request and print its reply.
//!
//! The request goes to `--exchange`/`--routing-key` with the library's
//! [`Broker::request`](helixmq::Broker::request): a reply queue of this
//! process under the prefix (so the spec's least-privilege user may use it),
//! a correlation id, and the timeout as the request's deadline — a worker
//! skips it once nobody waits. The reply's payload is written to stdout as
//! it is (bytes, no newline added); no reply within `--timeout` is an error
//! (exit 1) naming the request.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{ArgGroup, Args};
use helixmq::{Message, Priority};

use super::publish::{json_content_type, parse_header, parse_priority};
use crate::common::{connect, load_config};
use crate::Global;

/// `helixmq request`
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("body").args(["payload", "file"])))]
pub struct RequestArgs {
    /// Exchange to send the request to.
    #[arg(long, short = 'e')]
    pub exchange: String,
    /// Routing key.
    #[arg(long, short = 'k')]
    pub routing_key: String,
    /// The payload text. Without --payload or --file, stdin is read.
    #[arg(long)]
    pub payload: Option<String>,
    /// Read the payload from this file.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// How long to wait for the reply; also the request's deadline (a worker
    /// that gets it later skips it, and it expires in its queue).
    #[arg(long, default_value = "30s", value_parser = crate::common::parse_duration)]
    pub timeout: Duration,
    /// Priority: 0-10 or low (1), normal (5), high (8), critical (10).
    #[arg(long, short = 'p', value_parser = parse_priority)]
    pub priority: Option<Priority>,
    /// Message type (e.g. `llm.request`).
    #[arg(long = "type", short = 't')]
    pub kind: Option<String>,
    /// Correlation id (default: the request's message id).
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Content type (default: `application/json` when the payload is valid JSON, else none).
    #[arg(long)]
    pub content_type: Option<String>,
    /// A header `KEY=VALUE`; repeatable.
    #[arg(long = "header", short = 'H', value_parser = parse_header, value_name = "KEY=VALUE")]
    pub headers: Vec<(String, String)>,
}

/// Run `request`.
pub async fn run(global: &Global, args: RequestArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    let payload = read_payload(&args)?;
    let mut m = Message::new(payload);
    m.kind = args.kind.clone();
    m.priority = args.priority;
    m.correlation_id = args.correlation_id.clone();
    m.content_type = args
        .content_type
        .clone()
        .or_else(|| json_content_type(&m.payload));
    for (k, v) in &args.headers {
        m.headers.insert(k.clone(), v.as_str().into());
    }
    let broker = connect(&cfg).await?;
    let res = broker
        .request(&args.exchange, &args.routing_key, m, args.timeout)
        .await;
    let _ = broker.close().await;
    // The library's errors name the request, its exchange and routing key.
    let reply = res?;
    let mut out = std::io::stdout().lock();
    out.write_all(&reply.payload)
        .and_then(|()| out.flush())
        .context("cannot write the reply to stdout")?;
    Ok(ExitCode::SUCCESS)
}

fn read_payload(args: &RequestArgs) -> anyhow::Result<Bytes> {
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
