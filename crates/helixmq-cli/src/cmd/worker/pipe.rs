//! `worker --pipe CMD`: long-lived handler processes, one JSON line per message.
//!
//! `--exec` forks a shell per message, which caps a worker at a few hundred
//! messages a second. `--pipe` starts up to N processes of `sh -c CMD` (N = the
//! handlers running at once) and keeps them: each reads one request line on
//! stdin and answers one line on stdout, then takes the next.
//!
//! Request (one line): `{"id", "type", "attempt", "queue", "exchange",
//! "routing_key", "correlation_id", "priority", "headers": {name: text},
//! "deadline_ms", "payload"}` — `payload` is the body as text (UTF-8), or
//! `payload_base64` instead when it is not UTF-8; `deadline_ms` is the Unix time
//! in milliseconds after which the answer no longer counts.
//!
//! Answer (one line): `{"outcome":"ack"}`, `{"outcome":"retry","reason":…,
//! "delay_ms":…}` (both optional), `{"outcome":"dead_letter","reason":…}`, or
//! `{"outcome":"reply","payload":…}` (sent as every handler's reply is: through
//! the replies exchange to the message's `reply_to`, with its correlation id,
//! confirmed, then acked; a string is sent as is, any other JSON value as
//! JSON). Anything else on stdout is a protocol error: the process is replaced
//! and the message retried. A process that exits, or does not answer
//! within `--handler-timeout`, is killed with its process group and replaced,
//! and its message retried. Its stderr goes to the log, line by line.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use helixmq::{Context, Message, Outcome};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Mutex, Semaphore};

/// Longest answer line accepted (a reply payload can be large, not unbounded).
const MAX_LINE: usize = 16 * 1024 * 1024;

/// A pool of long-lived handler processes.
pub struct PipeHandler {
    cmd: String,
    timeout: Duration,
    /// Idle processes, ready for a message.
    idle: Mutex<Vec<Proc>>,
    /// At most this many processes exist (busy or idle).
    slots: Semaphore,
}

/// One running handler process.
struct Proc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pgid: Option<Pid>,
}

impl Drop for Proc {
    /// Nothing outlives its handler: a process dropped (replaced, or the worker
    /// stopping) goes with its whole group.
    fn drop(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

/// What a handler process may answer.
#[derive(Debug, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
enum Answer {
    Ack,
    Retry {
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        delay_ms: Option<u64>,
    },
    DeadLetter {
        #[serde(default)]
        reason: Option<String>,
    },
    Reply {
        #[serde(default)]
        payload: serde_json::Value,
    },
}

impl PipeHandler {
    /// A pool of at most `processes` processes of `sh -c cmd`; an answer is
    /// awaited at most `timeout`.
    pub fn new(cmd: String, timeout: Duration, processes: usize) -> Self {
        PipeHandler {
            cmd,
            timeout,
            idle: Mutex::new(Vec::new()),
            slots: Semaphore::new(processes.max(1)),
        }
    }

    fn spawn(&self) -> std::io::Result<Proc> {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(&self.cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("HELIXMQ_PIPE", "1")
            .process_group(0)
            .kill_on_drop(true);
        let mut child = c.spawn()?;
        let pid = child.id();
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        if let Some(stderr) = child.stderr.take() {
            // Ends when the process (and so its stderr) ends.
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(pid, "{line}");
                }
            });
        }
        tracing::info!(pid, "handler process started");
        Ok(Proc {
            child,
            stdin,
            stdout,
            pgid: pid.map(|p| Pid::from_raw(p as i32)),
        })
    }

    /// Hand one message to a process and map its answer to an outcome.
    pub async fn handle(&self, m: Message, ctx: Context) -> Outcome {
        let Ok(_slot) = self.slots.acquire().await else {
            return Outcome::retry("the worker is stopping");
        };
        let proc = self.idle.lock().await.pop();
        let mut proc = match proc {
            Some(p) => p,
            None => match self.spawn() {
                Ok(p) => p,
                Err(e) => return Outcome::retry(format!("cannot start `sh -c {}`: {e}", self.cmd)),
            },
        };
        let line = request_line(&m, &ctx, self.timeout);
        match self.exchange(&mut proc, &line).await {
            Ok(answer) => {
                self.idle.lock().await.push(proc);
                Self::outcome(answer)
            }
            // The process is dropped here (killed with its group); the next
            // message starts a fresh one.
            Err(why) => {
                let pid = proc.child.id();
                tracing::warn!(pid, reason = %why, "handler process replaced");
                Outcome::retry(why)
            }
        }
    }

    /// Write the request, read the answer line.
    async fn exchange(&self, proc: &mut Proc, line: &str) -> Result<Answer, String> {
        let io = async {
            proc.stdin
                .write_all(line.as_bytes())
                .await
                .map_err(|e| format!("cannot write to the handler process: {e}"))?;
            proc.stdin
                .flush()
                .await
                .map_err(|e| format!("cannot write to the handler process: {e}"))?;
            let mut answer = String::new();
            let n = (&mut proc.stdout)
                .take(MAX_LINE as u64)
                .read_line(&mut answer)
                .await
                .map_err(|e| format!("cannot read the handler process's answer: {e}"))?;
            Ok::<_, String>((n, answer))
        };
        let (n, answer) = match tokio::time::timeout(self.timeout, io).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(format!(
                    "handler process did not answer within {}; killed",
                    humantime::format_duration(self.timeout)
                ))
            }
        };
        if n == 0 {
            let status = match tokio::time::timeout(Duration::from_secs(1), proc.child.wait()).await
            {
                Ok(Ok(s)) => s.to_string(),
                _ => "still running, stdout closed".into(),
            };
            return Err(format!(
                "handler process ended without answering ({status})"
            ));
        }
        serde_json::from_str::<Answer>(answer.trim()).map_err(|e| {
            format!(
                "handler process answered {:?}, not an answer line ({e}); expected e.g. {{\"outcome\":\"ack\"}}",
                crate::common::head(&answer, 200)
            )
        })
    }

    fn outcome(a: Answer) -> Outcome {
        match a {
            Answer::Ack => Outcome::Ack,
            Answer::Retry { reason, delay_ms } => Outcome::Retry {
                delay: delay_ms.map(Duration::from_millis),
                reason: reason.unwrap_or_else(|| "handler asked for a retry".into()),
            },
            Answer::DeadLetter { reason } => Outcome::dead_letter(
                reason.unwrap_or_else(|| "handler rejected the message".into()),
            ),
            Answer::Reply { payload } => Self::reply(payload),
        }
    }

    /// RPC: the answer's payload becomes the reply, which the consumer sends
    /// as it does every [`Outcome::Reply`] (through the replies exchange, to
    /// the request's `reply_to`, with its correlation id, confirmed before the
    /// request is acked; dropped and counted when the caller is gone).
    fn reply(payload: serde_json::Value) -> Outcome {
        match payload {
            serde_json::Value::String(s) => Outcome::reply(Message::new(s)),
            v => match Message::json(&v) {
                Ok(r) => Outcome::reply(r),
                Err(e) => Outcome::retry(format!("cannot encode the reply: {e}")),
            },
        }
    }
}

/// The request line of one message (ends with `\n`).
fn request_line(m: &Message, ctx: &Context, timeout: Duration) -> String {
    /// One request, serialised straight from borrowed fields (no JSON tree
    /// built per message).
    #[derive(Serialize)]
    struct Request<'a> {
        id: &'a str,
        #[serde(rename = "type")]
        kind: Option<&'a str>,
        attempt: u32,
        queue: &'a str,
        exchange: &'a str,
        routing_key: &'a str,
        correlation_id: Option<&'a str>,
        priority: Option<u8>,
        redelivered: bool,
        headers: Headers<'a>,
        deadline_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        payload_base64: Option<String>,
    }
    /// The headers as text, the `traceparent` field among them.
    struct Headers<'a>(&'a Message);
    impl Serialize for Headers<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap as _;
            let m = self.0;
            let mut map = s.serialize_map(None)?;
            for (k, v) in &m.headers {
                map.serialize_entry(k, &v.to_string())?;
            }
            if let Some(tp) = &m.traceparent {
                map.serialize_entry("traceparent", tp)?;
            }
            map.end()
        }
    }
    let deadline_ms = SystemTime::now()
        .checked_add(timeout)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let text = std::str::from_utf8(&m.payload).ok();
    let req = Request {
        id: &m.id,
        kind: m.kind.as_deref(),
        attempt: m.attempt,
        queue: &ctx.queue,
        exchange: &ctx.exchange,
        routing_key: &ctx.routing_key,
        correlation_id: m.correlation_id.as_deref(),
        priority: m.priority.map(|p| p.value()),
        redelivered: ctx.redelivered,
        headers: Headers(m),
        deadline_ms,
        payload: text,
        payload_base64: text.is_none().then(|| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&m.payload)
        }),
    };
    let mut line = serde_json::to_string(&req).expect("a request always serialises");
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            queue: "q".into(),
            exchange: "x".into(),
            routing_key: "k".into(),
            redelivered: false,
        }
    }

    #[test]
    fn a_request_line_has_the_documented_fields() {
        let m = Message::new("hi")
            .with_kind("llm.request")
            .with_header("tenant", "acme")
            .with_correlation_id("req-42");
        let line = request_line(&m, &ctx(), Duration::from_secs(60));
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["id"], m.id.as_str());
        assert_eq!(v["type"], "llm.request");
        assert_eq!(v["attempt"], 1);
        assert_eq!(v["queue"], "q");
        assert_eq!(v["exchange"], "x");
        assert_eq!(v["routing_key"], "k");
        assert_eq!(v["correlation_id"], "req-42");
        assert_eq!(v["redelivered"], false);
        assert_eq!(v["headers"]["tenant"], "acme");
        assert!(v["deadline_ms"].as_u64().unwrap() > 0);
        assert_eq!(v["payload"], "hi");
        assert!(v.get("payload_base64").is_none());
    }

    #[test]
    fn a_body_that_is_not_utf8_comes_as_base64() {
        let m = Message::new(vec![0xff, 0x00]);
        let v: serde_json::Value =
            serde_json::from_str(&request_line(&m, &ctx(), Duration::from_secs(1))).unwrap();
        assert_eq!(v["payload_base64"], "/wA=");
        assert!(v.get("payload").is_none());
        assert_eq!(v["type"], serde_json::Value::Null);
    }
}
