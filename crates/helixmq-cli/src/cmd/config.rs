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
    // The library's rendering writes the password as `***`.
    let yaml = cfg.to_redacted_yaml();
    let source = match &global.config {
        Some(p) => format!("{} + environment", p.display()),
        None => "defaults + environment (no --config file)".to_string(),
    };
    outln!("# effective helixmq configuration ({source})");
    outln!("{}", yaml.trim_end_matches('\n'));
    eprintln!("configuration OK");
    Ok(ExitCode::SUCCESS)
}
