//! The helixmq command line: how operators and non-Rust services use helixmq.
//!
//! # Layout
//! - `main.rs`: global options (`--config`, `--log-format`, `--management-url`),
//!   logging, dispatch, exit codes.
//! - [`common`]: configuration loading, connecting, the topology a command works on.
//! - [`mgmt`]: a small client of RabbitMQ's management HTTP API (`stats`, `topology diff`).
//! - `cmd/`: one file per command — `config`, `topology`, `publish`, `request`, `worker/`
//!   (`exec`, `pipe`, `http` handlers), `dlq`, `stats`, `demo`.
//!
//! # Exit codes
//! - 0: success.
//! - 1: an error (its message is printed on stderr, prefixed with `error:`).
//! - 2: a check found something: `stats` crossed an alert threshold,
//!   `topology diff` found differences.
//! - 64: the command line itself is wrong (unknown option, missing argument).

// A binary has no public API: nothing to document for users, nothing `pub` to reach.
#![allow(missing_docs, unreachable_pub)]

/// `println!` that ends the process quietly when stdout is a closed pipe
/// (`helixmq dlq list | head`) instead of panicking.
macro_rules! outln {
    () => { $crate::common::out_line(format_args!("")) };
    ($($t:tt)*) => { $crate::common::out_line(format_args!($($t)*)) };
}

mod cmd;
mod common;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// mimalloc instead of glibc malloc: a worker, the demo and the bench allocate
/// per message on two or more threads, where glibc's contended arenas took a
/// third of the embedded broker's CPU (docs/BENCHMARKS.md). The library leaves
/// the choice of allocator to the application.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// helixmq: a RabbitMQ task-queue layer that does not lose work.
#[derive(Debug, Parser)]
#[command(
    name = "helixmq",
    version,
    propagate_version = true,
    after_help = "Exit status: 0 success; 1 error (message on stderr); 2 a check found something \
                  (stats threshold crossed, topology diff found differences); 64 usage error."
)]
struct Cli {
    /// Configuration file (the spec's messaging.yaml). Without it: defaults + environment
    /// (RABBITMQ_HOST, RABBITMQ_PORT, RABBITMQ_USER, RABBITMQ_PASSWORD, RABBITMQ_VHOST,
    /// RABBITMQ_URL, HELIXMQ_PREFIX, ...).
    #[arg(
        long,
        short = 'c',
        global = true,
        env = "HELIXMQ_CONFIG",
        value_name = "FILE"
    )]
    config: Option<PathBuf>,

    /// Log format on stderr. The level comes from RUST_LOG (e.g. `RUST_LOG=helixmq=debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// Base URL of RabbitMQ's management HTTP API, for `stats` and `topology diff`.
    /// Default: http://<rabbitmq host>:15672 with the configured credentials.
    #[arg(
        long,
        global = true,
        env = "HELIXMQ_MANAGEMENT_URL",
        value_name = "URL"
    )]
    management_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check the configuration, print it (password redacted).
    #[command(subcommand)]
    Config(cmd::config::ConfigCmd),
    /// Declare, export, compare or delete the topology.
    #[command(subcommand)]
    Topology(cmd::topology::TopologyCmd),
    /// Publish messages with publisher confirms; prints each confirmed id.
    Publish(cmd::publish::PublishArgs),
    /// Send a request and print its reply (request-reply; see `worker --exec`).
    Request(cmd::request::RequestArgs),
    /// Consume queues, running a command or calling an HTTP endpoint per message.
    Worker(cmd::worker::WorkerArgs),
    /// Inspect, replay and purge the dead-letter queue without losing messages.
    #[command(subcommand)]
    Dlq(cmd::dlq::DlqCmd),
    /// A web console: live queues, and a dead-letter workbench (filter, group, replay, delete).
    Console(cmd::console::ConsoleArgs),
    /// Queue depths, rates, connections; alert thresholds (exit 2 when crossed).
    Stats(cmd::stats::StatsArgs),
    /// Run the spec's flows end to end and show what happened.
    Demo(cmd::demo::DemoArgs),
    /// The transactional outbox on PostgreSQL: migrate, relay, status, cleanup.
    #[command(subcommand)]
    Outbox(cmd::outbox::OutboxCmd),
    /// Measure helixmq against raw lapin on the local RabbitMQ (see docs/BENCHMARKS.md).
    Bench(cmd::bench::BenchArgs),
}

/// What every command gets besides its own arguments.
#[derive(Debug, Clone)]
pub struct Global {
    /// `--config`.
    pub config: Option<PathBuf>,
    /// `--management-url`.
    pub management_url: Option<String>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // clap's own exit code for usage errors is 2, which means "check failed" here.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The worker's job is to log what it does; other commands stay quiet unless
    // asked; the demo's failures are on purpose and its table tells the story.
    let default_level = match cli.command {
        Command::Worker(_)
        | Command::Console(_)
        | Command::Outbox(cmd::outbox::OutboxCmd::Relay(_)) => "info",
        Command::Demo(_) | Command::Bench(_) => "error",
        _ => "warn",
    };
    init_logging(cli.log_format, default_level);

    let global = Global {
        config: cli.config,
        management_url: cli.management_url,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        match cli.command {
            Command::Config(c) => cmd::config::run(&global, c).await,
            Command::Topology(c) => cmd::topology::run(&global, c).await,
            Command::Publish(a) => cmd::publish::run(&global, a).await,
            Command::Request(a) => cmd::request::run(&global, a).await,
            Command::Worker(a) => cmd::worker::run(&global, a).await,
            Command::Dlq(c) => cmd::dlq::run(&global, c).await,
            Command::Stats(a) => cmd::stats::run(&global, a).await,
            Command::Console(a) => cmd::console::run(&global, a).await,
            Command::Demo(a) => cmd::demo::run(&global, a).await,
            Command::Outbox(c) => cmd::outbox::run(&global, c).await,
            Command::Bench(a) => cmd::bench::run(a).await.map(|()| ExitCode::SUCCESS),
        }
    });
    // Do not wait for stray blocking tasks (e.g. a stdin reader) at exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", render_error(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the message
/// before it already includes (library errors often quote their source).
fn render_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn init_logging(format: LogFormat, default_level: &str) {
    // lapin logs every returned message, and an ERROR for each channel still
    // closing when its connection closes — on every clean stop. helixmq reports
    // what matters itself (lost connections, failed acks), so lapin stays quiet
    // unless RUST_LOG names it (`RUST_LOG=info,lapin=debug`).
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() && v.contains("lapin") => EnvFilter::new(v),
        Ok(v) if !v.trim().is_empty() => EnvFilter::new(format!("{v},lapin=off")),
        _ => EnvFilter::new(format!("{default_level},lapin=off")),
    };
    // Escape codes only for a human at a terminal: never in a pipe, a file, a
    // journal, or with NO_COLOR set.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(common::stderr_colour())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
