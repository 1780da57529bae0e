//! `helixmq console`: the web console ([`helixmq::console`]) on an address.
//!
//! Loopback by default. Listening elsewhere needs credentials (`--auth
//! basic:USER:PASSWORD`, `--auth-token-file FILE` or `HELIXMQ_CONSOLE_TOKEN`),
//! so a console that can replay and purge is never open to a network by mistake.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use helixmq::console::{self, Auth, ConsoleOptions};
use helixmq::management::Management;
use helixmq::Secret;

use crate::common::{connect, load_config, spec_topology};
use crate::Global;

/// `helixmq console`
#[derive(Debug, Args)]
pub struct ConsoleArgs {
    /// Address to serve on. Anything but loopback requires --auth or a token.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Show no action (replay, delete, purge) and refuse every POST.
    #[arg(long)]
    pub read_only: bool,
    /// HTTP basic authentication: `basic:USER:PASSWORD`.
    #[arg(
        long,
        value_name = "basic:USER:PASSWORD",
        conflicts_with = "auth_token_file"
    )]
    pub auth: Option<String>,
    /// A token (the file's first line) that must be given as the password of
    /// basic authentication, or as `Authorization: Bearer TOKEN`.
    #[arg(long, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
}

/// The credentials asked, from the flags or `HELIXMQ_CONSOLE_TOKEN`.
fn auth(args: &ConsoleArgs) -> anyhow::Result<Option<Auth>> {
    if let Some(spec) = &args.auth {
        return Auth::parse(spec).map(Some).map_err(anyhow::Error::msg);
    }
    if let Some(path) = &args.auth_token_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?;
        let token = text.lines().next().unwrap_or("").trim().to_string();
        anyhow::ensure!(
            !token.is_empty(),
            "the token file {} is empty: put the token on its first line",
            path.display()
        );
        return Ok(Some(Auth::Token(Secret::new(token))));
    }
    match std::env::var("HELIXMQ_CONSOLE_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Ok(Some(Auth::Token(Secret::new(t.trim().to_string())))),
        _ => Ok(None),
    }
}

/// Run `console` until SIGINT or SIGTERM.
pub async fn run(global: &Global, args: ConsoleArgs) -> anyhow::Result<ExitCode> {
    let auth = auth(&args)?;
    if auth.is_none() && !args.listen.ip().is_loopback() {
        eprintln!(
            "error: refusing to serve the console on {} without credentials: anyone who can reach it could replay or purge the DLQ. \
             Add --auth basic:USER:PASSWORD, --auth-token-file FILE or HELIXMQ_CONSOLE_TOKEN, or listen on 127.0.0.1",
            args.listen
        );
        return Ok(ExitCode::from(64));
    }
    let cfg = load_config(global)?;
    let broker = connect(&cfg).await?;
    let management = match broker.backend_kind() {
        helixmq::BackendKind::RabbitMq => Some(Arc::new(Management::from_config(
            &cfg,
            global.management_url.as_deref(),
        )?)),
        _ => None,
    };
    let opts = ConsoleOptions {
        read_only: args.read_only,
        auth,
        management,
        topology: Some(spec_topology(&cfg)),
        ..ConsoleOptions::default()
    };
    let app = console::router(&broker, opts);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is the port in use? choose another with --listen)",
                args.listen
            )
        })?;
    let addr = listener.local_addr()?;
    eprintln!(
        "helixmq console on http://{addr}/{}",
        if args.read_only { " (read-only)" } else { "" }
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
        .context("the console's HTTP server failed")?;
    // Held dead letters go back to the DLQ when the connection closes.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), broker.close()).await;
    Ok(ExitCode::SUCCESS)
}
