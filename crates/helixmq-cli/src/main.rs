//! The helixmq command line.

mod cmd;

use clap::{Parser, Subcommand};

/// helixmq: a reliable RabbitMQ task-queue layer.
#[derive(Debug, Parser)]
#[command(name = "helixmq", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure helixmq against raw lapin on the local RabbitMQ (see docs/BENCHMARKS.md).
    Bench(cmd::bench::BenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => cmd::bench::run(args).await,
    }
}
