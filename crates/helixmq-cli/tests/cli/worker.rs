//! `helixmq worker` against the local RabbitMQ: `--exec` exit codes, metadata
//! variables, retries with `--retry-delay`/`--max-attempts` on a fresh prefix,
//! handler timeouts, graceful shutdown on SIGTERM, `--http` status mapping,
//! `--pipe` processes (the examples, replacement, `reply` answers).

use helixmq_testkit::cli;
use helixmq_testkit::cli::{file_lines, on_a_terminal, temp_path, Background, Broker};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn dlq_entries(b: &Broker) -> Vec<serde_json::Value> {
    let out = b.run(&["dlq", "list", "--json"]).ok();
    serde_json::from_str(&out.stdout).unwrap()
}

#[test]
fn exec_worker_acks_retries_and_dead_letters() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.debate");
    let out = temp_path("exec.out");
    let script = temp_path("handler.sh");
    std::fs::write(
        &script,
        format!(
            r#"p=$(cat)
case "$p" in
  poison) echo "cannot parse $p" >&2; exit 65;;
  flaky) [ "$HELIXMQ_ATTEMPT" = 1 ] && exit 75;;
esac
echo "$p|$HELIXMQ_ATTEMPT|$HELIXMQ_MESSAGE_ID|$HELIXMQ_TYPE|$HELIXMQ_CORRELATION_ID|$HELIXMQ_QUEUE|$HELIXMQ_HEADER_TENANT" >> {}
"#,
            out.display()
        ),
    )
    .unwrap();
    let good = b
        .run(&[
            "publish",
            "-e",
            &b.name("tasks"),
            "-k",
            "debate",
            "--payload",
            "good",
            "--type",
            "debate.round",
            "--correlation-id",
            "c-1",
            "-H",
            "tenant=acme",
        ])
        .ok();
    let good_id = good.lines()[0].clone();
    b.run(&[
        "publish",
        "-e",
        &b.name("tasks"),
        "-k",
        "debate",
        "--payload",
        "flaky",
    ])
    .ok();
    let poison_id = b
        .run(&[
            "publish",
            "-e",
            &b.name("tasks"),
            "-k",
            "debate",
            "--payload",
            "poison",
        ])
        .ok()
        .lines()[0]
        .clone();

    let mut c = b.cmd();
    c.args([
        "worker",
        "--queue",
        &q,
        "--exec",
        &format!("sh {}", script.display()),
        "--retry-delay",
        "1s",
        "--max-attempts",
        "3",
    ]);
    let mut w = Background::spawn(c);
    b.eventually(Duration::from_secs(20), "good and flaky processed", || {
        file_lines(&out).len() >= 2
    });
    let lines = file_lines(&out);
    let good_line = lines
        .iter()
        .find(|l| l.starts_with("good|"))
        .expect("good processed");
    assert_eq!(
        good_line,
        &format!("good|1|{good_id}|debate.round|c-1|{q}|acme")
    );
    assert!(
        lines.iter().any(|l| l.starts_with("flaky|2|")),
        "flaky succeeded on its second attempt: {lines:?}"
    );
    b.eventually(Duration::from_secs(10), "poison in the DLQ", || {
        dlq_entries(&b).len() == 1
    });
    let run = w.terminate(Duration::from_secs(10));
    assert_eq!(run.code, 0, "SIGTERM → exit 0; stderr:\n{}", run.stderr);

    let dlq = dlq_entries(&b);
    assert_eq!(dlq[0]["id"], poison_id.as_str());
    assert_eq!(dlq[0]["origin_queue"], q.as_str());
    assert_eq!(dlq[0]["attempts"], 1);
    let reason = dlq[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("65") && reason.contains("cannot parse poison"),
        "{reason}"
    );
    assert_eq!(file_lines(&out).len(), 2, "nothing processed twice");
}

#[test]
fn handler_timeout_kills_and_retries_until_the_dlq() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.background");
    let id = b
        .run(&["publish", "--queue", &q, "--payload", "slow"])
        .ok()
        .lines()[0]
        .clone();
    let mut c = b.cmd();
    c.args([
        "worker",
        "--queue",
        &q,
        "--exec",
        "sleep 30",
        "--handler-timeout",
        "300ms",
        "--retry-delay",
        "300ms",
        "--max-attempts",
        "2",
    ]);
    let started = Instant::now();
    let mut w = Background::spawn(c);
    b.eventually(
        Duration::from_secs(15),
        "the slow message dead-lettered",
        || dlq_entries(&b).len() == 1,
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    let run = w.terminate(Duration::from_secs(10));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let e = &dlq_entries(&b)[0];
    assert_eq!(e["id"], id.as_str());
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.contains("gave up after 2 attempts") && reason.contains("timed out"),
        "{reason}"
    );
}

#[test]
fn sigterm_lets_the_message_in_flight_finish() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.verification");
    let started = temp_path("started");
    let done = temp_path("done");
    b.run(&["publish", "--queue", &q, "--payload", "x"]).ok();
    let mut c = b.cmd();
    c.args([
        "worker",
        "--queue",
        &q,
        "--exec",
        &format!(
            "touch {}; sleep 2; touch {}",
            started.display(),
            done.display()
        ),
        "--shutdown-timeout",
        "10s",
    ]);
    let mut w = Background::spawn(c);
    b.eventually(Duration::from_secs(15), "handler started", || {
        started.exists()
    });
    let run = w.terminate(Duration::from_secs(15));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(done.exists(), "the in-flight handler finished before exit");
    // Acked, not requeued: a second worker finds nothing.
    assert!(b.run(&["dlq", "list", "--json"]).ok().stdout.trim() == "[]");
    b.eventually(Duration::from_secs(10), "queue empty", || {
        b.ready(&q) == 0 && cli::mgmt_peek(&q, 1).is_empty()
    });
}

#[test]
fn worker_on_an_unknown_queue_fails_clearly() {
    let b = Broker::new();
    let out = b
        .run(&["worker", "--queue", &b.name("tasks.nope"), "--exec", "true"])
        .expect_code(1);
    assert!(
        out.stderr.contains("tasks.nope") && out.stderr.contains("not found"),
        "{}",
        out.stderr
    );
}

/// Requests the endpoint saw: (body, X-HelixMQ-Attempt, when).
type Seen = Arc<Mutex<Vec<(String, String, Instant)>>>;

/// A tiny HTTP endpoint: `ok` → 200; `busy` → 503 with Retry-After the first
/// time, then 200; `bad` → 400 with a body.
fn http_endpoint() -> (String, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jobs", l.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let s = seen.clone();
    // Lives as long as the test process; it only ever serves this test's worker.
    std::thread::spawn(move || {
        let mut busy_once = false;
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let (head, body) = loop {
                let n = conn.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break (String::new(), String::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(i) = text.find("\r\n\r\n") {
                    let head = text[..i].to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= i + 4 + len {
                        break (head, text[i + 4..i + 4 + len].to_string());
                    }
                }
            };
            let attempt = head
                .lines()
                .find_map(|l| l.strip_prefix("x-helixmq-attempt:"))
                .unwrap_or("")
                .trim()
                .to_string();
            s.lock()
                .unwrap()
                .push((body.clone(), attempt, Instant::now()));
            let resp = match body.as_str() {
                "busy" if !busy_once => {
                    busy_once = true;
                    "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy".to_string()
                }
                "bad" => "HTTP/1.1 400 Bad Request\r\nContent-Length: 16\r\nConnection: close\r\n\r\nfield x required".to_string(),
                _ => "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".to_string(),
            };
            let _ = conn.write_all(resp.as_bytes());
        }
    });
    (url, seen)
}

#[test]
fn http_worker_maps_statuses_to_outcomes() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.notifications");
    let (url, seen) = http_endpoint();
    for p in ["ok", "busy", "bad"] {
        b.run(&["publish", "--queue", &q, "--payload", p]).ok();
    }
    let mut c = b.cmd();
    // Two tiers: 200 ms is the normal first delay; Retry-After: 1 picks the 3 s tier.
    c.args([
        "worker",
        "--queue",
        &q,
        "--http",
        &url,
        "--retry-delay",
        "200ms",
        "--retry-delay",
        "3s",
    ]);
    let mut w = Background::spawn(c);
    b.eventually(Duration::from_secs(20), "busy retried and accepted", || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|(body, attempt, _)| body == "busy" && attempt == "2")
    });
    b.eventually(Duration::from_secs(10), "bad in the DLQ", || {
        dlq_entries(&b).len() == 1
    });
    let run = w.terminate(Duration::from_secs(10));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let e = &dlq_entries(&b)[0];
    let reason = e["reason"].as_str().unwrap();
    assert!(
        reason.contains("400") && reason.contains("field x required"),
        "{reason}"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.iter().filter(|(b, _, _)| b == "ok").count(),
        1,
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|(b, _, _)| b == "bad").count(),
        1,
        "a 4xx is not retried: {seen:?}"
    );
    let busy: Vec<Instant> = seen
        .iter()
        .filter(|(b, _, _)| b == "busy")
        .map(|(_, _, t)| *t)
        .collect();
    let gap = busy[1] - busy[0];
    assert!(
        gap >= Duration::from_millis(2900),
        "Retry-After honoured (3 s tier, not 200 ms): {gap:?}"
    );
}

#[test]
fn worker_exits_non_zero_when_its_queue_is_deleted() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.background");
    let mut c = b.cmd();
    c.args(["worker", "--queue", &q, "--exec", "true"]);
    let mut w = Background::spawn(c);
    b.eventually(Duration::from_secs(15), "the worker consuming", || {
        cli::mgmt_get(&format!("queues/%2F/{q}"))["consumers"].as_u64() == Some(1)
    });
    cli::mgmt_delete_queue(&q);
    let child = w.child.as_mut().unwrap();
    let end = Instant::now() + Duration::from_secs(15);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < end,
            "the worker kept running on a deleted queue"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = w.child.take().unwrap().wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&q) && err.contains("cancelled"), "{err}");
}

#[test]
fn worker_serves_metrics_and_health() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.background");
    for payload in ["x", "x", "x", "poison"] {
        b.run(&["publish", "--queue", &q, "--payload", payload])
            .ok();
    }
    let port = cli::free_port();
    let mut c = b.cmd();
    c.args([
        "worker",
        "--queue",
        &q,
        "--exec",
        r#"test "$(cat)" != poison || exit 65"#,
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let mut w = Background::spawn(c);
    let get = |path: &str| reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}")).ok();
    let mut metrics = String::new();
    let dlx = format!(
        r#"rabbitmq_messages_published_total{{exchange="{}"}}"#,
        b.name("dlx")
    );
    b.eventually(
        Duration::from_secs(20),
        "4 messages acked (the poison one once its DLQ copy was confirmed) and 1 dead-lettered in /metrics",
        || {
            metrics = get("/metrics")
                .and_then(|r| r.text().ok())
                .unwrap_or_default();
            metrics.lines().any(|l| {
                l.starts_with("rabbitmq_messages_acked_total{")
                    && l.contains(&q)
                    && l.ends_with(" 4")
            }) && metrics.lines().any(|l| l == format!("{dlx} 1"))
        },
    );
    assert!(metrics.contains("rabbitmq_connection_state 1"), "{metrics}");
    // The DLQ copy is a publish: its confirm latency is measured too.
    let latencies = metrics
        .lines()
        .find_map(|l| l.strip_prefix("rabbitmq_publish_latency_seconds_count "))
        .and_then(|n| n.parse::<u64>().ok());
    assert_eq!(latencies, Some(1), "{metrics}");
    // A family a dashboard queries reads 0 for the topology, not "no data".
    let events = format!(
        r#"rabbitmq_messages_published_total{{exchange="{}"}} 0"#,
        b.name("events")
    );
    assert!(metrics.lines().any(|l| l == events), "{metrics}");
    let health = get("/health").expect("health answers");
    assert_eq!(health.status().as_u16(), 200);
    assert!(health.text().unwrap().contains(&q));
    let run = w.terminate(Duration::from_secs(10));
    assert_eq!(run.code, 0, "{}", run.stderr);
    // Each start-up line once (the library's server already says where it listens).
    assert_eq!(
        run.stderr.matches("serving /metrics and /health").count(),
        1,
        "{}",
        run.stderr
    );
}

#[test]
fn exec_worker_refuses_a_command_that_cannot_run_before_taking_a_message() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.background");
    b.run(&["publish", "-q", &q, "--payload", "x"]).ok();
    let missing = temp_path("missing.sh");
    let missing = missing.display().to_string();
    let out = b
        .run(&[
            "worker",
            "-q",
            "tasks.background",
            "--exec",
            &format!("{missing} --flag"),
        ])
        .expect_code(1);
    println!("captured stderr:\n{}", out.stderr);
    assert!(
        out.stderr.contains(&format!("'{missing}' does not exist")),
        "{}",
        out.stderr
    );
    let out = b
        .run(&[
            "worker",
            "-q",
            "tasks.background",
            "--exec",
            "no-such-program-hx arg",
        ])
        .expect_code(1);
    println!("captured stderr:\n{}", out.stderr);
    assert!(
        out.stderr.contains("'no-such-program-hx' is not a command") && out.stderr.contains("PATH"),
        "{}",
        out.stderr
    );
    let script = temp_path("not-executable.sh");
    std::fs::write(&script, "exit 0\n").unwrap();
    let out = b
        .run(&[
            "worker",
            "-q",
            "tasks.background",
            "--exec",
            &script.display().to_string(),
        ])
        .expect_code(1);
    println!("captured stderr:\n{}", out.stderr);
    assert!(out.stderr.contains("is not executable") && out.stderr.contains("chmod +x"));
    // Nothing was taken: the message is still there, the DLQ is empty.
    b.eventually(Duration::from_secs(10), "message still queued", || {
        b.ready(&q) == 1
    });
    assert!(dlq_entries(&b).is_empty());
}

#[test]
fn worker_exits_non_zero_when_it_abandons_work_at_the_shutdown_deadline() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.verification");
    let started = temp_path("started");
    b.run(&["publish", "-q", &q, "--payload", "x"]).ok();
    let mut c = b.cmd();
    c.args([
        "worker",
        "-q",
        "tasks.verification",
        "--exec",
        &format!("touch {}; sleep 60", started.display()),
        "--shutdown-timeout",
        "1s",
    ]);
    let mut w = Background::spawn(c);
    b.eventually(Duration::from_secs(15), "handler started", || {
        started.exists()
    });
    let run = w.terminate(Duration::from_secs(20));
    println!("captured stderr:\n{}", run.stderr);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("1 message(s) were still being handled at the shutdown deadline"),
        "{}",
        run.stderr
    );
    // Abandoned, not lost: back in its queue.
    b.eventually(Duration::from_secs(15), "message back in the queue", || {
        b.ready(&q) == 1
    });
}

#[test]
fn a_clean_shutdown_logs_each_start_up_line_once_and_no_error() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.debate");
    let done = temp_path("done");
    b.run(&["publish", "-q", &q, "--payload", "x"]).ok();
    // lapin is quiet unless RUST_LOG names it; named, its own warnings and
    // errors show, and a clean stop must cause none (it used to log "Connection
    // error: invalid connection state: Closed" for a channel close that the
    // connection's close overtook, on about one stop in four). Three stops
    // with lapin named.
    let lapin = Some("info,lapin=warn");
    for rust_log in [None, Some("info"), lapin, lapin, lapin] {
        let mut c = b.cmd();
        if let Some(l) = rust_log {
            c.env("RUST_LOG", l);
        }
        c.args([
            "worker",
            "-q",
            "tasks.debate",
            "-q",
            "tasks.llm",
            "--exec",
            &format!("touch {}", done.display()),
        ]);
        let mut w = Background::spawn(c);
        b.eventually(Duration::from_secs(15), "message handled", || done.exists());
        // The ack is coalesced: give it its flush before stopping.
        b.eventually(Duration::from_secs(15), "queue drained", || {
            cli::mgmt_get(&format!("queues/%2F/{}", q.replace('/', "%2F")))
                ["messages_unacknowledged"]
                .as_u64()
                == Some(0)
        });
        let run = w.terminate(Duration::from_secs(15));
        println!("captured stderr (RUST_LOG={rust_log:?}):\n{}", run.stderr);
        assert_eq!(run.code, 0, "{}", run.stderr);
        assert!(!run.stderr.contains("ERROR"), "{}", run.stderr);
        assert!(!run.stderr.contains(" lapin::"), "{}", run.stderr);
        assert!(!run.stderr.contains('\u{1b}'), "no colour off a terminal");
        for line in ["connected to RabbitMQ", "worker consuming"] {
            assert_eq!(
                run.stderr.matches(line).count(),
                1,
                "{line} once: {}",
                run.stderr
            );
        }
        let _ = std::fs::remove_file(&done);
        b.run(&["publish", "-q", &q, "--payload", "x"]).ok();
    }
}

#[test]
fn json_logs_have_typed_fields() {
    let b = Broker::new();
    let mut c = b.cmd();
    c.args([
        "--log-format",
        "json",
        "worker",
        "-q",
        "tasks.nope",
        "--exec",
        "true",
    ]);
    let out = cli::run(c, b"").expect_code(1);
    println!("captured stderr:\n{}", out.stderr);
    let connected: serde_json::Value = out
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "connected to RabbitMQ")
        .expect("a connected line");
    let version = connected["fields"]["version"].as_str().unwrap();
    assert!(
        version.chars().next().unwrap().is_ascii_digit() && !version.contains("Some"),
        "{connected}"
    );
    assert_eq!(connected["fields"]["port"], 5672);
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let b = Broker::new();
    let mut c = b.cmd();
    c.args(["worker", "-q", "tasks.nope", "--exec", "true"]);
    c.env_remove("NO_COLOR");
    let tty = on_a_terminal(&c);
    println!("captured terminal output:\n{tty:?}");
    assert!(tty.contains("connected to RabbitMQ"), "{tty}");
    assert!(tty.contains("\u{1b}["), "colour on a terminal: {tty:?}");
    c.env("NO_COLOR", "1");
    let plain = on_a_terminal(&c);
    println!("captured terminal output with NO_COLOR:\n{plain:?}");
    assert!(plain.contains("connected to RabbitMQ"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "NO_COLOR: {plain:?}");
    // Off a terminal: never.
    let mut c = b.cmd();
    c.args(["worker", "-q", "tasks.nope", "--exec", "true"]);
    let out = cli::run(c, b"").expect_code(1);
    assert!(!out.stderr.contains('\u{1b}'), "{:?}", out.stderr);
}

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn acked(queue: &str) -> u64 {
    cli::mgmt_get(&format!("queues/%2F/{}", queue.replace('/', "%2F")))["message_stats"]["ack"]
        .as_u64()
        .unwrap_or(0)
}

/// Messages published into the retry tiers of `b`'s prefix.
fn retried(b: &Broker) -> u64 {
    let tiers = b.name("retry");
    cli::mgmt_get("queues/%2F")
        .as_array()
        .into_iter()
        .flatten()
        .filter(|q| q["name"].as_str().is_some_and(|n| n.starts_with(&tiers)))
        .map(|q| q["message_stats"]["publish"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn pipe_worker_runs_the_python_and_node_examples_in_long_lived_processes() {
    for handler in ["examples/pipe/handler.py", "examples/pipe/handler.js"] {
        let b = Broker::new();
        b.run(&["topology", "apply"]).ok();
        let q = b.name("tasks.background");
        b.run(&[
            "publish",
            "-q",
            &q,
            "--payload",
            r#"{"n":1}"#,
            "--count",
            "40",
        ])
        .ok();
        b.run(&["publish", "-q", &q, "--payload", r#"{"flaky":true}"#])
            .ok();
        let poison = b
            .run(&["publish", "-q", &q, "--payload", "not json"])
            .ok()
            .lines()[0]
            .clone();
        let mut c = b.cmd();
        c.current_dir(repo_root()).args([
            "worker",
            "-q",
            "tasks.background",
            "--pipe",
            handler,
            "--concurrency",
            "2",
            "--retry-delay",
            "1s",
        ]);
        let mut w = Background::spawn(c);
        // 40 + the flaky one after its retry (through a retry tier: an answer
        // `retry` taken for `ack` would leave the tiers empty); the poison one
        // in the DLQ.
        b.eventually(Duration::from_secs(40), "every message settled", || {
            acked(&q) >= 41 && dlq_entries(&b).len() == 1 && retried(&b) == 1
        });
        let run = w.terminate(Duration::from_secs(15));
        println!("captured stderr ({handler}):\n{}", run.stderr);
        assert_eq!(run.code, 0, "{}", run.stderr);
        let dlq = dlq_entries(&b);
        assert_eq!(dlq[0]["id"], poison.as_str());
        assert!(
            dlq[0]["reason"]
                .as_str()
                .unwrap()
                .contains("payload is not JSON"),
            "{dlq:?}"
        );
        let started = run.stderr.matches("handler process started").count();
        assert!(
            (1..=2).contains(&started),
            "42 messages, at most 2 processes: {started}"
        );
        assert!(!run.stderr.contains("ERROR"), "{}", run.stderr);
    }
}

#[test]
fn pipe_worker_replaces_a_process_that_dies_overstays_or_answers_garbage() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.debate");
    let script = temp_path("pipe.sh");
    std::fs::write(
        &script,
        r#"#!/bin/sh
echo "ready" >&2
while read -r line; do
  case "$line" in
    *'"payload":"die"'*) exit 3;;
    *'"payload":"slow"'*) sleep 30;;
    *'"payload":"garbage"'*) echo 'not an answer';;
    *) echo '{"outcome":"ack"}';;
  esac
done
"#,
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", &script.display().to_string()])
        .status()
        .unwrap();
    let mut ids = std::collections::BTreeMap::new();
    for p in ["ok", "die", "ok", "slow", "garbage", "ok"] {
        let id = b.run(&["publish", "-q", &q, "--payload", p]).ok().lines()[0].clone();
        ids.insert(id, p);
    }
    let mut c = b.cmd();
    c.args([
        "worker",
        "-q",
        "tasks.debate",
        "--pipe",
        &script.display().to_string(),
        "--concurrency",
        "1",
        "--max-attempts",
        "1",
        "--handler-timeout",
        "1s",
    ]);
    let mut w = Background::spawn(c);
    b.eventually(Duration::from_secs(40), "three acked, three dead", || {
        acked(&q) >= 3 && dlq_entries(&b).len() == 3
    });
    let run = w.terminate(Duration::from_secs(15));
    println!("captured stderr:\n{}", run.stderr);
    assert_eq!(run.code, 0);
    let reasons: std::collections::BTreeMap<String, String> = dlq_entries(&b)
        .iter()
        .map(|e| {
            (
                ids[e["id"].as_str().unwrap()].to_string(),
                e["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    println!("reasons: {reasons:#?}");
    assert!(
        reasons["die"].contains("ended without answering"),
        "{reasons:?}"
    );
    assert!(
        reasons["slow"].contains("did not answer within 1s"),
        "{reasons:?}"
    );
    assert!(
        reasons["garbage"].contains("not an answer line"),
        "{reasons:?}"
    );
    // stderr of the handler is in the log; each failure started a fresh process.
    assert!(run.stderr.contains("ready"), "{}", run.stderr);
    assert_eq!(run.stderr.matches("handler process started").count(), 4);
}

/// `--pipe` answers requests as the spec's least-privilege user (no default
/// exchange): a `reply` answer's payload is what `helixmq request` prints — sent
/// as every handler's reply is, through the replies exchange with the request's
/// correlation id (a reply without it would never reach its caller), a JSON
/// value as JSON, a string as is.
#[test]
fn pipe_worker_answers_requests_as_the_least_privilege_user() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let script = temp_path("reply.py");
    std::fs::write(
        &script,
        r#"import json, sys
for line in sys.stdin:
    req = json.loads(line)
    if req["payload"] == "json":
        answer = {"sum": 42, "to": req["id"]}
    else:
        answer = "pong " + req["payload"]
    print(json.dumps({"outcome": "reply", "payload": answer}), flush=True)
"#,
    )
    .unwrap();
    let mut c = b.cmd_as_helixagent();
    c.args([
        "worker",
        "-q",
        "tasks.background",
        "--pipe",
        &format!("python3 {}", script.display()),
        "--concurrency",
        "1",
    ]);
    let mut w = Background::spawn(c);
    let request = |payload: &str| {
        let mut c = b.cmd_as_helixagent();
        c.args([
            "request",
            "-e",
            &b.name("tasks"),
            "-k",
            "background",
            "--payload",
            payload,
            "--timeout",
            "30s",
        ]);
        cli::run(c, b"").ok().stdout
    };
    let json: serde_json::Value = serde_json::from_str(&request("json")).unwrap();
    assert_eq!(json["sum"], 42, "{json}");
    assert!(
        json["to"].as_str().is_some_and(|id| !id.is_empty()),
        "{json}"
    );
    assert_eq!(request("ping"), "pong ping", "a string is sent as is");
    let run = w.terminate(Duration::from_secs(15));
    println!("captured stderr:\n{}", run.stderr);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let _ = std::fs::remove_file(&script);
    assert_eq!(
        b.ready(&b.name("tasks.background")),
        0,
        "both requests acked"
    );
}
