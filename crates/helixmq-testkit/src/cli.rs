//! Running the CLI in tests: the built `helixmq` binary with a clean
//! environment, against the local RabbitMQ under a unique prefix that is
//! cleaned up when its [`Broker`] drops; the management API for setting up
//! and checking; background processes stopped with SIGTERM.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// Environment variables the CLI reads; cleared so the caller's shell cannot leak in.
const CLEARED: &[&str] = &[
    "RABBITMQ_HOST",
    "RABBITMQ_PORT",
    "RABBITMQ_USER",
    "RABBITMQ_PASSWORD",
    "RABBITMQ_VHOST",
    "RABBITMQ_URL",
    "RABBITMQ_HOSTS",
    "RABBITMQ_PREFETCH_COUNT",
    "RABBITMQ_PUBLISHER_CONFIRM",
    "HELIXMQ_PREFIX",
    "HELIXMQ_CONFIG",
    "HELIXMQ_MANAGEMENT_URL",
    "RUST_LOG",
];

/// The built `helixmq` binary. Cargo tells only the CLI crate's own tests
/// where it is, at their compile time; this kit is built before them, so it
/// asks at run time: `NEXTEST_BIN_EXE_helixmq` (nextest sets it), else
/// `CARGO_BIN_EXE_helixmq`, else `helixmq` in the folder above the test
/// binary's (`target/<profile>/deps/..`), where cargo builds it before the
/// CLI's integration tests.
pub fn binary() -> PathBuf {
    for var in ["NEXTEST_BIN_EXE_helixmq", "CARGO_BIN_EXE_helixmq"] {
        if let Some(p) = std::env::var_os(var) {
            return PathBuf::from(p);
        }
    }
    let exe = std::env::current_exe().expect("test binary path");
    let bin = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary in target/<profile>/deps")
        .join("helixmq");
    assert!(
        bin.exists(),
        "{} not built (cargo builds it with the CLI's tests)",
        bin.display()
    );
    bin
}

/// The binary with a clean environment (defaults only).
pub fn bare() -> Command {
    let mut c = Command::new(binary());
    for v in CLEARED {
        c.env_remove(v);
    }
    c
}

/// What a run produced.
#[derive(Debug)]
pub struct Run {
    /// The exit status (-1: ended by a signal).
    pub code: i32,
    /// Standard output, as text.
    pub stdout: String,
    /// Standard error, as text.
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    /// Panics with the whole output unless the exit status is `code`.
    pub fn expect_code(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "exit status; stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
    /// Panics with the whole output unless the exit status is 0.
    pub fn ok(self) -> Run {
        self.expect_code(0)
    }
    /// Lines of stdout.
    pub fn lines(&self) -> Vec<String> {
        self.stdout
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

/// Run a command to completion, feeding `stdin`.
pub fn run(mut c: Command, stdin: &[u8]) -> Run {
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().expect("spawn helixmq");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    // Read the pipes on threads so a chatty command cannot block on a full pipe
    // while we wait for it with a deadline: a hung command must fail its test
    // with its stderr, not stall the whole suite.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut v);
        v
    });
    let deadline = std::time::Instant::now() + COMMAND_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for helixmq") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            panic!(
                "helixmq {:?} did not finish within {COMMAND_DEADLINE:?}; stderr:\n{}",
                c.get_args().collect::<Vec<_>>(),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Run::from(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// How long one CLI command may run in a test before it counts as hung.
const COMMAND_DEADLINE: Duration = Duration::from_secs(120);

/// A unique prefix on the local broker (guest/guest), cleaned up on drop.
#[derive(Debug)]
pub struct Broker {
    /// `helixagent.t<random>`.
    pub prefix: String,
}

impl Default for Broker {
    fn default() -> Self {
        Broker::new()
    }
}

impl Broker {
    /// `helixagent.t<random>`: inside the spec's permission pattern, unique per test.
    pub fn new() -> Broker {
        let r = uuid::Uuid::new_v4().simple().to_string();
        Broker {
            prefix: format!("helixagent.t{}", &r[..10]),
        }
    }

    /// The binary, configured for this broker and prefix.
    pub fn cmd(&self) -> Command {
        let mut c = bare();
        c.env("RABBITMQ_HOST", "127.0.0.1")
            .env("RABBITMQ_PORT", "5672")
            .env("RABBITMQ_USER", "guest")
            .env("RABBITMQ_PASSWORD", "guest")
            .env("HELIXMQ_PREFIX", &self.prefix);
        c
    }

    /// The binary as the spec's least-privilege user `helixagent`
    /// (`scripts/provision`: configure/write/read `^helixagent\..*` only).
    pub fn cmd_as_helixagent(&self) -> Command {
        let (user, password) = crate::broker::HELIXAGENT;
        let mut c = self.cmd();
        c.env("RABBITMQ_USER", user)
            .env("RABBITMQ_PASSWORD", password);
        c
    }

    /// Run `helixmq ARGS` (no stdin).
    pub fn run(&self, args: &[&str]) -> Run {
        let mut c = self.cmd();
        c.args(args);
        run(c, b"")
    }

    /// A name under the prefix (`tasks.llm` → `<prefix>.tasks.llm`).
    pub fn name(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }

    /// Ready messages in a queue, from the management API.
    pub fn ready(&self, queue: &str) -> u64 {
        let v = mgmt_get(&format!(
            "queues/%2F/{}",
            crate::broker::encode_segment(queue)
        ));
        v["messages_ready"].as_u64().unwrap_or(0)
    }

    /// Poll until `f()` holds or `timeout` passes (the management API refreshes
    /// its counters every few seconds: there is nothing to await).
    pub fn eventually(&self, timeout: Duration, what: &str, f: impl FnMut() -> bool) {
        if !self.try_eventually(timeout, f) {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
    }

    /// [`Broker::eventually`] that answers whether `f()` came to hold, for a
    /// caller that reports what it saw on the way.
    pub fn try_eventually(&self, timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        false
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        crate::broker::sweep(&self.prefix);
    }
}

/// GET from the local management API as guest.
pub fn mgmt_get(path: &str) -> serde_json::Value {
    let r = reqwest::blocking::Client::new()
        .get(format!("http://127.0.0.1:15672/api/{path}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .expect("management API (run scripts/provision)");
    r.json().unwrap_or(serde_json::Value::Null)
}

/// Declare a queue through the management API (to set up conflicts and strays).
pub fn mgmt_put_queue(name: &str, arguments: serde_json::Value) {
    let r = reqwest::blocking::Client::new()
        .put(format!(
            "http://127.0.0.1:15672/api/queues/%2F/{}",
            crate::broker::encode_segment(name)
        ))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"durable": true, "auto_delete": false, "arguments": arguments}))
        .send()
        .unwrap();
    assert!(r.status().is_success(), "PUT queue {name}: {}", r.status());
}

/// Delete a queue through the management API.
pub fn mgmt_delete_queue(name: &str) {
    let _ = reqwest::blocking::Client::new()
        .delete(format!(
            "http://127.0.0.1:15672/api/queues/%2F/{}",
            crate::broker::encode_segment(name)
        ))
        .basic_auth("guest", Some("guest"))
        .send();
}

/// Peek at up to `n` messages of a queue (requeued afterwards).
pub fn mgmt_peek(queue: &str, n: u32) -> Vec<serde_json::Value> {
    let r = reqwest::blocking::Client::new()
        .post(format!(
            "http://127.0.0.1:15672/api/queues/%2F/{}/get",
            crate::broker::encode_segment(queue)
        ))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({"count": n, "ackmode": "ack_requeue_true", "encoding": "auto"}))
        .send()
        .unwrap();
    r.json::<Vec<serde_json::Value>>().unwrap_or_default()
}

/// A child process that is sent SIGTERM (then reaped) if the test ends early.
#[derive(Debug)]
pub struct Background {
    /// The process; None once [`Background::terminate`] reaped it.
    pub child: Option<std::process::Child>,
}

impl Background {
    /// Start `c` with stdout and stderr piped (read them from `child`).
    pub fn spawn(mut c: Command) -> Background {
        c.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Background {
            child: Some(c.spawn().expect("spawn helixmq")),
        }
    }

    /// Send SIGTERM and wait for the exit (at most `within`).
    pub fn terminate(&mut self, within: Duration) -> Run {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let end = std::time::Instant::now() + within;
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if std::time::Instant::now() > end {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "did not exit within {within:?} after SIGTERM; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Run::from(child.wait_with_output().unwrap())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lines of a file (empty if it does not exist yet).
pub fn file_lines(p: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// A fresh temporary path.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("hx-cli-{}-{name}", uuid::Uuid::new_v4().simple()))
}

/// A port free on 127.0.0.1 right now, for a child's `--metrics-addr` (a tiny
/// race with other processes: the child fails to bind and the test says so).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// A `helixmq console` child on a port of its own (`--listen 127.0.0.1:0`:
/// the console prints the address it bound), its stderr kept for checks.
#[derive(Debug)]
pub struct Console {
    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub url: String,
    /// The process (stopped with SIGTERM on drop).
    pub process: Background,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Console {
    /// Start `helixmq console --listen 127.0.0.1:0 ARGS` for `broker` and wait
    /// until it serves.
    pub fn start(broker: &Broker, args: &[&str]) -> Console {
        let mut c = broker.cmd();
        c.args(["console", "--listen", "127.0.0.1:0"]).args(args);
        Console::spawn(c)
    }

    /// Start a console from a prepared command (its `--listen` must end in `:0`).
    pub fn spawn(c: Command) -> Console {
        use std::io::BufRead as _;
        let mut process = Background::spawn(c);
        let stderr = process
            .child
            .as_mut()
            .and_then(|c| c.stderr.take())
            .expect("piped stderr");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.split("helixmq console on ").nth(1) {
                    let url = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .trim_end_matches('/');
                    let _ = tx.send(url.to_string());
                }
                let mut l = keep.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the console did not start within 60 s; its stderr:\n{}",
                    log.lock().unwrap()
                )
            });
        Console { url, process, log }
    }

    /// Everything the console wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }
}

/// Dead letters as helixmq's consumer writes them, published straight to the
/// DLQ's exchange: `n` messages failed in `origin` for `reason`, each with
/// `payload`. Returns their ids.
pub fn seed_dead_letters(
    b: &Broker,
    origin: &str,
    reason: &str,
    n: usize,
    payload: &str,
) -> Vec<String> {
    let out = b
        .run(&[
            "publish",
            "-e",
            &b.name("dlx"),
            "-k",
            "x",
            "-H",
            &format!("x-helixmq-dead-letter-reason={reason}"),
            "-H",
            &format!("x-helixmq-origin-queue={origin}"),
            "-H",
            &format!(
                "x-helixmq-first-failure-ms={}",
                helixmq::message::now_unix_millis() - 300_000
            ),
            "-H",
            &format!(
                "x-helixmq-last-failure-ms={}",
                helixmq::message::now_unix_millis() - 90_000
            ),
            "--type",
            "llm.request",
            "-n",
            &n.to_string(),
            "--json",
            "--payload",
            payload,
        ])
        .ok();
    let ids: Vec<String> = out
        .lines()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect();
    assert_eq!(ids.len(), n, "seeded ids: {}", out.stdout);
    ids
}

/// Run `c` on a pseudo-terminal (`script`), so its stderr is a terminal.
pub fn on_a_terminal(c: &std::process::Command) -> String {
    // `env -u NAME …` first, then `NAME=value …`: env(1) takes them in that order.
    let mut unset = String::new();
    let mut set = String::new();
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => set.push_str(&format!(
                "{}='{}' ",
                k.to_string_lossy(),
                v.to_string_lossy()
            )),
            None => unset.push_str(&format!("-u {} ", k.to_string_lossy())),
        }
    }
    let line = format!("{unset}{set}");
    let args: Vec<String> = c
        .get_args()
        .map(|a| format!("'{}'", a.to_string_lossy()))
        .collect();
    let cmdline = format!(
        "env {line}'{}' {} 2>&1",
        c.get_program().to_string_lossy(),
        args.join(" ")
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &cmdline, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script(1) from util-linux");
    String::from_utf8_lossy(&out.stdout).into_owned()
}
