//! `helixmq request` and `worker --exec` answering it, both as the spec's
//! least-privilege user `helixagent` (no default exchange, no direct
//! reply-to): the reply's payload on stdout and exit 0; no reply within the
//! timeout is a clear error with a non-zero exit; a request whose worker
//! process is killed (SIGKILL) is answered once, by the next worker.

use std::process::Command;
use std::time::{Duration, Instant};

use helixmq_testkit::cli::{file_lines, run, temp_path, Background, Broker};

#[test]
fn request_prints_the_reply_of_an_exec_worker_and_a_timeout_fails() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let mut c = b.cmd_as_helixagent();
    c.args([
        "worker",
        "--queue",
        "tasks.llm",
        "--exec",
        "printf 'answer to '; cat",
    ]);
    let mut w = Background::spawn(c);

    let mut c = b.cmd_as_helixagent();
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
    let mut c = b.cmd_as_helixagent();
    c.args(["request", "-e", &b.name("tasks"), "-k", "llm"]);
    let reply = run(c, b"from stdin").ok();
    assert_eq!(reply.stdout, "answer to from stdin");

    // Nobody consumes the background queue: a clear timeout, exit 1.
    let mut c = b.cmd_as_helixagent();
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

#[test]
fn a_request_whose_worker_process_is_killed_is_answered_once_by_the_next() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let marker = temp_path("handling");
    // Worker 1 takes the request and hangs in its command; it is then SIGKILLed.
    let mut c = b.cmd_as_helixagent();
    c.args([
        "worker",
        "--queue",
        "tasks.llm",
        "--exec",
        &format!("echo $$ > {}; exec sleep 60", marker.display()),
    ]);
    let mut first = Background::spawn(c);
    let mut c = b.cmd_as_helixagent();
    c.args([
        "request",
        "-e",
        &b.name("tasks"),
        "-k",
        "llm",
        "--payload",
        "q",
        "--timeout",
        "60s",
    ]);
    let mut caller = Background::spawn(c);
    b.eventually(Duration::from_secs(20), "worker 1 runs the request", || {
        !file_lines(&marker).is_empty()
    });
    let mut w = first.child.take().expect("running");
    w.kill().expect("SIGKILL worker 1");
    w.wait().unwrap();
    // Its command is in a process group of its own: not ours to leave behind.
    let pid = file_lines(&marker)[0].clone();
    let _ = Command::new("kill").args(["-KILL", &pid]).status();

    // Worker 2 gets the request again and answers; the caller prints one reply.
    let mut c = b.cmd_as_helixagent();
    c.args([
        "worker",
        "--queue",
        "tasks.llm",
        "--exec",
        "printf 'second: '; cat",
    ]);
    let mut second = Background::spawn(c);
    let out = caller
        .child
        .take()
        .expect("running")
        .wait_with_output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the caller got no reply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "second: q", "one reply, from worker 2");
    let stopped = second.terminate(Duration::from_secs(10));
    assert_eq!(stopped.code, 0, "{}", stopped.stderr);
    let _ = std::fs::remove_file(&marker);
}
