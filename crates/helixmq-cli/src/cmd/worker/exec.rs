//! `worker --exec CMD`: one `sh -c CMD` per message.
//!
//! The command runs in its own process group, so a timeout (or the end of the
//! message) kills everything it started, not just the shell. Payload on stdin;
//! metadata in `HELIXMQ_*` environment variables. Exit status → outcome:
//! 0 ack, 65 (EX_DATAERR) dead letter with stderr's tail, 75 (EX_TEMPFAIL)
//! with a `retry-after: N` line on stderr "rate limited, retry after N s"
//! (pausing a `--rate-limit` key for every worker), anything else retry.
//! A request (a message with `reply_to`, from `helixmq request` or
//! `Broker::request`) is answered with the command's stdout on exit 0; other
//! messages leave stdout to the worker's.

use std::process::Stdio;
use std::time::Duration;

use helixmq::{Context, Message, Outcome};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

use crate::common::tail;

/// EX_DATAERR from sysexits.h: the input is bad, retrying will not help.
pub const EX_DATAERR: i32 = 65;
/// EX_TEMPFAIL from sysexits.h: with `retry-after: N` on stderr, rate limited.
pub const EX_TEMPFAIL: i32 = 75;
/// How much of stderr is kept for the reason.
const STDERR_TAIL: usize = 2048;
/// The largest reply a command may write to stdout: a reply travels as one
/// message; more is a mistake retrying will not fix (dead letter).
pub const MAX_REPLY: usize = 16 * 1024 * 1024;

/// Runs a shell command per message.
pub struct ExecHandler {
    cmd: String,
    timeout: Duration,
}

/// Kills a process group when dropped, so nothing outlives its message even
/// when the handler future is cancelled (shutdown deadline, library timeout).
struct GroupGuard(Option<Pid>);

impl GroupGuard {
    fn kill(&mut self) {
        if let Some(pgid) = self.0.take() {
            // ESRCH: the group is already gone, which is what we want.
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Check, before any message is taken, that `sh -c cmd` can start what it names.
///
/// `sh` itself always exists, so a missing script would only show as a failed
/// message each time (and, after the retries, a DLQ full of them). The first
/// word of the command is what must exist: a path (it contains `/`) must be an
/// executable file; a bare name must be something the shell can run (a builtin,
/// a keyword or a program on `PATH`, asked with `command -v`). A command that
/// starts with shell syntax (`(`, `{`, `$VAR`, …) cannot be checked statically and
/// is accepted as it is.
pub async fn check_runnable(cmd: &str) -> Result<(), String> {
    let first = match first_word(cmd) {
        FirstWord::Empty => {
            return Err(
                "--exec is empty: give the command to run per message, e.g. --exec ./handle.sh"
                    .into(),
            )
        }
        FirstWord::Dynamic => return Ok(()),
        FirstWord::Word(w) => w,
    };
    if first.contains('/') {
        return check_path(&first);
    }
    let found = Command::new("sh")
        .arg("-c")
        .arg(r#"command -v -- "$1" >/dev/null 2>&1"#)
        .arg("sh")
        .arg(&first)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("cannot run `sh` to check the --exec command: {e}"))?;
    if found.success() {
        Ok(())
    } else {
        Err(format!(
            "--exec: '{first}' is not a command: no shell builtin and no program of that name on PATH ({});              give its path (e.g. ./{first}) or install it",
            std::env::var("PATH").unwrap_or_default()
        ))
    }
}

/// What a shell command line starts with.
#[derive(Debug, PartialEq, Eq)]
enum FirstWord {
    /// Nothing at all.
    Empty,
    /// Shell syntax: what it runs is only known when it runs.
    Dynamic,
    /// The program (or builtin) it runs first.
    Word(String),
}

/// The program a shell command line starts with, past `VAR=value` assignments
/// and `exec`.
fn first_word(cmd: &str) -> FirstWord {
    let mut words = shlex::Shlex::new(cmd.trim_start());
    loop {
        // Nothing left after assignments, or quoting shlex cannot follow.
        let Some(w) = words.next() else {
            return if cmd.trim().is_empty() {
                FirstWord::Empty
            } else {
                FirstWord::Dynamic
            };
        };
        let assignment = w.split_once('=').is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if assignment || w == "exec" {
            continue;
        }
        if w.starts_with(['(', '{', '!', '~'])
            || w.contains(['$', '`', '*', '?', '[', ';', '&', '|', '<', '>'])
        {
            return FirstWord::Dynamic;
        }
        return FirstWord::Word(w);
    }
}

/// A path must be an existing, executable, regular file.
fn check_path(path: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "?".into());
    let where_ = if path.starts_with('/') {
        String::new()
    } else {
        format!(" (relative to the working directory {cwd})")
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "--exec: '{path}' does not exist{where_}; no message was taken"
        )),
        Err(e) => Err(format!("--exec: cannot read '{path}'{where_}: {e}")),
        Ok(m) if m.is_dir() => Err(format!("--exec: '{path}' is a directory, not a program{where_}")),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err(format!(
            "--exec: '{path}' is not executable{where_}: `chmod +x {path}`, or run it through its interpreter (--exec 'sh {path}')"
        )),
        Ok(_) => Ok(()),
    }
}

impl ExecHandler {
    /// A handler running `sh -c cmd`, killed after `timeout`.
    pub fn new(cmd: String, timeout: Duration) -> Self {
        ExecHandler { cmd, timeout }
    }

    /// Run the command for one message and map its exit status to an outcome.
    pub async fn handle(&self, m: Message, ctx: Context) -> Outcome {
        let request = m.reply_to.is_some();
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(&self.cmd)
            .stdin(Stdio::piped())
            .stdout(if request {
                Stdio::piped()
            } else {
                Stdio::inherit()
            })
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for (k, v) in super::metadata(&m, &ctx) {
            c.env(format!("HELIXMQ_{k}"), v);
        }
        let mut child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => return Outcome::retry(format!("cannot start `sh -c {}`: {e}", self.cmd)),
        };
        let mut group = GroupGuard(child.id().map(|id| Pid::from_raw(id as i32)));

        // stdin and stderr are served by their own tasks so a command that ignores
        // stdin, or writes a lot to stderr, never deadlocks against us.
        let stdin = child.stdin.take();
        let payload = m.payload.clone();
        let writer = tokio::spawn(async move {
            if let Some(mut s) = stdin {
                // A command that does not read its input closes the pipe: not an error.
                let _ = s.write_all(&payload).await;
                let _ = s.shutdown().await;
            }
        });
        let stderr = child.stderr.take();
        let reader = tokio::spawn(async move {
            let mut kept: Vec<u8> = Vec::new();
            if let Some(mut s) = stderr {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > 2 * STDERR_TAIL {
                        kept.drain(..kept.len() - STDERR_TAIL);
                    }
                }
            }
            String::from_utf8_lossy(&kept).into_owned()
        });

        // A request's answer: stdout, read as it comes (a full pipe would block
        // the command), up to MAX_REPLY bytes (None beyond).
        let stdout = child.stdout.take();
        let answer = tokio::spawn(async move {
            let mut out: Vec<u8> = Vec::new();
            let Some(s) = stdout else {
                return Some(out);
            };
            let mut limited = s.take(MAX_REPLY as u64 + 1);
            match limited.read_to_end(&mut out).await {
                Ok(_) if out.len() <= MAX_REPLY => Some(out),
                _ => None,
            }
        });

        let waited = tokio::time::timeout(self.timeout, child.wait()).await;
        // The message is done (or out of time): whatever the command left running in
        // its group goes too; that also closes stderr so the reader finishes.
        group.kill();
        let status = match waited {
            Ok(s) => s,
            Err(_) => {
                let _ = child.wait().await;
                writer.abort();
                reader.abort();
                answer.abort();
                return Outcome::retry(format!(
                    "command timed out after {}; its process group was killed",
                    humantime::format_duration(self.timeout)
                ));
            }
        };
        writer.abort();
        let err_tail = reader.await.unwrap_or_default();
        let err_tail = tail(&err_tail, 512);
        match status {
            Err(e) => Outcome::retry(format!("cannot wait for the command: {e}")),
            Ok(s) if s.success() && request => match answer.await.ok().flatten() {
                Some(out) => Outcome::reply(Message::new(out)),
                None => Outcome::dead_letter(format!(
                    "the command's reply (stdout) is larger than {MAX_REPLY} bytes"
                )),
            },
            Ok(s) if s.success() => Outcome::Ack,
            Ok(s) => match s.code() {
                Some(EX_DATAERR) => {
                    Outcome::dead_letter(format!("command exited 65 (EX_DATAERR): {err_tail}"))
                }
                Some(EX_TEMPFAIL) => match retry_after(&err_tail) {
                    Some(d) => Outcome::RetryAfter(d),
                    None => Outcome::retry(format!("command exited 75: {err_tail}")),
                },
                Some(code) => Outcome::retry(format!("command exited {code}: {err_tail}")),
                None => {
                    use std::os::unix::process::ExitStatusExt;
                    Outcome::retry(format!(
                        "command killed by signal {}: {err_tail}",
                        s.signal().unwrap_or(0)
                    ))
                }
            },
        }
    }
}

/// The last `retry-after: N` (seconds, case-insensitive) line of stderr.
fn retry_after(stderr: &str) -> Option<Duration> {
    stderr.lines().rev().find_map(|l| {
        let (name, value) = l.trim().split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("retry-after") {
            return None;
        }
        let secs = value.trim().parse::<f64>().ok()?;
        (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_read_from_the_last_stderr_line_that_says_it() {
        let d = |s| retry_after(s);
        assert_eq!(
            d("rate limited\nretry-after: 3\n"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(d("Retry-After: 1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(
            d("retry-after: 1\nretry-after: 2"),
            Some(Duration::from_secs(2))
        );
        assert_eq!(d("retry-after: soon"), None);
        assert_eq!(d("rate limited"), None);
    }

    fn ctx() -> Context {
        Context {
            queue: "q".into(),
            exchange: "e".into(),
            routing_key: "k".into(),
            redelivered: false,
        }
    }

    #[tokio::test]
    async fn exit_codes_map_to_outcomes() {
        let h = |c: &str| ExecHandler::new(c.to_string(), Duration::from_secs(10));
        let m = Message::new("hello").with_header("tenant", "acme");
        assert_eq!(
            h("test \"$(cat)\" = hello && test $HELIXMQ_HEADER_TENANT = acme")
                .handle(m.clone(), ctx())
                .await,
            Outcome::Ack
        );
        match h("echo bad input >&2; exit 65")
            .handle(m.clone(), ctx())
            .await
        {
            Outcome::DeadLetter(r) => assert!(r.contains("bad input") && r.contains("65"), "{r}"),
            o => panic!("{o:?}"),
        }
        assert!(matches!(
            h("exit 75").handle(m.clone(), ctx()).await,
            Outcome::Retry { .. }
        ));
    }

    #[tokio::test]
    async fn a_request_is_answered_with_stdout() {
        let h = |c: &str| ExecHandler::new(c.to_string(), Duration::from_secs(10));
        let mut m = Message::new("6 x 7");
        m.reply_to = Some("helixagent.replies.x".into());
        match h("printf 'answer to '; cat").handle(m.clone(), ctx()).await {
            Outcome::Reply(r) => assert_eq!(&r.payload[..], b"answer to 6 x 7"),
            o => panic!("{o:?}"),
        }
        // A failing command still retries; no reply is made of its output.
        assert!(matches!(
            h("echo partial; exit 75").handle(m.clone(), ctx()).await,
            Outcome::Retry { .. }
        ));
        // Not a request: stdout is the worker's, the outcome a plain ack.
        assert_eq!(
            h("echo hi").handle(Message::new("x"), ctx()).await,
            Outcome::Ack
        );
    }

    #[tokio::test]
    async fn runnable_commands_are_checked_before_start() {
        assert!(check_runnable("cat").await.is_ok());
        assert!(check_runnable("exit 0").await.is_ok());
        assert!(check_runnable("FOO=1 exec cat").await.is_ok());
        assert!(check_runnable("(sleep 1; true) & wait").await.is_ok());
        assert!(check_runnable("$HANDLER").await.is_ok());
        let e = check_runnable("./definitely-missing.sh arg")
            .await
            .unwrap_err();
        assert!(
            e.contains("'./definitely-missing.sh' does not exist"),
            "{e}"
        );
        let e = check_runnable("no-such-program-hx --flag")
            .await
            .unwrap_err();
        assert!(e.contains("'no-such-program-hx' is not a command"), "{e}");
        let e = check_runnable("  ").await.unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let dir = std::env::temp_dir().join(format!("hx-noexec-{}", uuid::Uuid::now_v7()));
        std::fs::write(&dir, "true").unwrap();
        let e = check_runnable(&dir.display().to_string())
            .await
            .unwrap_err();
        assert!(
            e.contains("is not executable") && e.contains("chmod +x"),
            "{e}"
        );
        let _ = std::fs::remove_file(&dir);
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let dir = std::env::temp_dir().join(format!("hx-exec-{}", uuid::Uuid::now_v7()));
        let marker = dir.display().to_string();
        // The background sleep would touch the marker after 2 s unless the group dies.
        let h = ExecHandler::new(
            format!("(sleep 2; touch {marker}) & sleep 30"),
            Duration::from_millis(300),
        );
        let started = std::time::Instant::now();
        match h.handle(Message::new(""), ctx()).await {
            Outcome::Retry { reason, .. } => assert!(reason.contains("timed out"), "{reason}"),
            o => panic!("{o:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!dir.exists(), "a process of the group survived the timeout");
    }
}
