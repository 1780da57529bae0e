//! `helixmq demo`: the spec's flows end to end (in progress).

use std::process::ExitCode;

use clap::Args;

use crate::Global;

/// `helixmq demo`
#[derive(Debug, Args)]
pub struct DemoArgs {}

/// Run `demo`.
pub async fn run(_global: &Global, _args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("demo: not yet")
}
