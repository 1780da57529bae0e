//! Helpers of the security tests (`tls_*`, `badinput_*`, `privilege_*`): the
//! repository root, scripts, log capture, and reading a DLQ to the end.

#![allow(dead_code, unreachable_pub)] // helpers of test binaries: `pub` for their test files, never exported

pub mod flow;

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use helixmq::{Broker, Message};

/// The repository root (two levels above this crate's manifest).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root exists")
}

/// Run `scripts/<name> args…` from the repository root; panics with its output on failure.
pub fn script(name: &str, args: &[&str]) -> String {
    let out = Command::new(repo_root().join("scripts").join(name))
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/{name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed:\n{text}"
    );
    text
}

/// [`script`] under an exclusive `flock` on `target/<lock>.lock`: nextest runs
/// each test in its own process, and scripts that make certificates or start a
/// node must not run twice at once.
pub fn script_locked(lock: &str, name: &str, args: &[&str]) -> String {
    let lockfile = repo_root().join("target").join(format!("{lock}.lock"));
    // `-o`: the lock stays with flock itself, not inherited by the script's
    // children. Without it a node started under the lock (rabbitmq-server
    // -detached) kept the lock for its whole life and every later caller
    // waited forever. `-w`: fail instead of hanging if it is held anyway.
    let out = Command::new("flock")
        .args(["-o", "-w", "300"])
        .arg(&lockfile)
        .arg(repo_root().join("scripts").join(name))
        .args(args)
        .current_dir(repo_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run flock scripts/{name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "scripts/{name} {args:?} failed:\n{text}"
    );
    text
}

/// `rabbitmqctl -q [-n node] args…`; returns stdout, panics with stderr on failure.
pub fn rabbitmqctl(node: Option<&str>, args: &[&str]) -> String {
    let mut cmd = Command::new("rabbitmqctl");
    cmd.arg("-q");
    if let Some(n) = node {
        cmd.args(["-n", n]);
    }
    let out = cmd.args(args).output().expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Eight random hex digits.
pub fn random_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A log sink for a test: install with [`LogCapture::install`] (current thread
/// only, so parallel tests do not see each other's lines), read with
/// [`LogCapture::text`].
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Route this thread's `tracing` events (WARN and above) into the capture
    /// until the guard drops.
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let me = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || me.clone())
            .finish();
        tracing::subscriber::set_default(sub)
    }
    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// Take exactly `n` messages from `queue` with `basic.get` (acking each),
/// waiting up to `within` for them to arrive. Panics naming what is missing.
pub async fn take(broker: &Broker, queue: &str, n: usize, within: Duration) -> Vec<Message> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n {
        match broker.backend().get(queue).await.expect("basic.get") {
            Some(d) => {
                d.acker.ack().await.expect("ack");
                got.push(std::sync::Arc::unwrap_or_clone(d.message));
            }
            None => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "only {} of {n} messages reached '{queue}' within {within:?}",
                    got.len()
                );
                // Messages arrive through the broker's own routing: nothing to await.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    got
}
