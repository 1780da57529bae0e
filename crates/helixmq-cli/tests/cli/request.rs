//! `helixmq request` and `worker --exec` answering it, both as the spec's
//! least-privilege user `helixagent` (no default exchange, no direct
//! reply-to): the reply's payload on stdout and exit 0; no reply within the
//! timeout is a clear error with a non-zero exit.

use std::process::Command;
use std::time::{Duration, Instant};

use helixmq_testkit::cli::{run, Background, Broker};

/// The binary for `b`'s prefix, as helixagent.
fn as_helixagent(b: &Broker) -> Command {
    let mut c = b.cmd();
    c.env("RABBITMQ_USER", "helixagent")
        .env("RABBITMQ_PASSWORD", "helixagent123");
    c
}

#[test]
fn request_prints_the_reply_of_an_exec_worker_and_a_timeout_fails() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let mut c = as_helixagent(&b);
    c.args([
        "worker",
        "--queue",
        "tasks.llm",
        "--exec",
        "printf 'answer to '; cat",
    ]);
    let mut w = Background::spawn(c);

    let mut c = as_helixagent(&b);
    c.args([
        "request",
        "-e",
        &b.name("tasks"),
        "-k",
        "llm",
        "--payload",
        "6 x 7",
        "--timeout",
        "30s",
    ]);
    let reply = run(c, b"").ok();
    assert_eq!(reply.stdout, "answer to 6 x 7", "stderr: {}", reply.stderr);

    // The payload from stdin, too.
    let mut c = as_helixagent(&b);
    c.args(["request", "-e", &b.name("tasks"), "-k", "llm"]);
    let reply = run(c, b"from stdin").ok();
    assert_eq!(reply.stdout, "answer to from stdin");

    // Nobody consumes the background queue: a clear timeout, exit 1.
    let mut c = as_helixagent(&b);
    c.args([
        "request",
        "-e",
        &b.name("tasks"),
        "-k",
        "background",
        "--payload",
        "anyone?",
        "--timeout",
        "1s",
    ]);
    let started = Instant::now();
    let timed_out = run(c, b"").expect_code(1);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(timed_out.stdout, "");
    assert!(
        timed_out.stderr.contains("no reply to request")
            && timed_out.stderr.contains("within 1s")
            && timed_out.stderr.contains("routing key 'background'"),
        "{}",
        timed_out.stderr
    );

    let stopped = w.terminate(Duration::from_secs(10));
    assert_eq!(
        stopped.code, 0,
        "SIGTERM → exit 0; stderr:\n{}",
        stopped.stderr
    );
}
