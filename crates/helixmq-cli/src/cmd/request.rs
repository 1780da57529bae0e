//! `helixmq request`: publish a request and print its reply.
//!
//! The request goes to `--exchange`/`--routing-key` with the library's
//! [`Broker::request`](helixmq::Broker::request): a reply queue of this
//! process under the prefix (so the spec's least-privilege user may use it),
//! a correlation id, and the timeout as the request's deadline — a worker
//! skips it once nobody waits. The reply's payload is written to stdout as
//! it is (bytes, no newline added); no reply within `--timeout` is an error
//! (exit 1) naming the request.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::publish::MessageArgs;
use crate::common::{connect, load_config};
use crate::Global;

/// `helixmq request`
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// Exchange to send the request to.
    #[arg(long, short = 'e')]
    pub exchange: String,
    /// Routing key.
    #[arg(long, short = 'k')]
    pub routing_key: String,
    /// How long to wait for the reply; also the request's deadline (a worker
    /// that gets it later skips it, and it expires in its queue).
    #[arg(long, default_value = "30s", value_parser = crate::common::parse_duration)]
    pub timeout: Duration,
    /// The request: payload and properties.
    #[command(flatten)]
    pub message: MessageArgs,
}

/// Run `request`.
pub async fn run(global: &Global, args: RequestArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    let m = args.message.message()?;
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
