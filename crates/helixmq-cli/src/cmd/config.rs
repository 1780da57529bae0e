//! `helixmq config check`: load and validate the configuration, print it redacted.

use std::process::ExitCode;

use clap::Subcommand;

use crate::common::load_config;
use crate::Global;

/// `helixmq config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Load `--config FILE` + environment, validate it, and print the effective
    /// configuration (password shown as `***`). Every problem is listed at once
    /// and the exit status is non-zero.
    Check,
}

/// Run a `config` subcommand.
pub async fn run(global: &Global, cmd: ConfigCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ConfigCmd::Check => check(global),
    }
}

fn check(global: &Global) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    // `Secret` serializes as `***`: the rendering can never show the password.
    let yaml = serde_saphyr::to_string(&cfg)?;
    let source = match &global.config {
        Some(p) => format!("{} + environment", p.display()),
        None => "defaults + environment (no --config file)".to_string(),
    };
    println!("# effective helixmq configuration ({source})");
    print!("{yaml}");
    if !yaml.ends_with('\n') {
        println!();
    }
    eprintln!("configuration OK");
    Ok(ExitCode::SUCCESS)
}
