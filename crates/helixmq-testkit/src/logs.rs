//! Test logging: `RUST_LOG` to the test's output ([`init_logging`]), and a
//! per-thread capture of `tracing` events for tests that assert on log lines
//! ([`LogCapture`]).

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Log to the test's output as `RUST_LOG` says (e.g. `RUST_LOG=helixmq=debug`);
/// silent without it.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A log sink for a test: install with [`LogCapture::install`] (current thread
/// only, so parallel tests do not see each other's lines), read with
/// [`LogCapture::text`].
#[derive(Debug, Clone, Default)]
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
