//! What a worker's `/health` says while it cannot make progress.
//!
//! The redelivery storm that a downstream outage produced, as a new user would
//! meet it: the spec's retry queue full (10,000, `reject-publish`), five
//! failing messages, `helixmq worker --exec '…; exit 1'` for 15 s. Each
//! handler runs once (before the fix: 368 runs, 73 for one message); the
//! worker reports the held deliveries on `/health` and `/metrics`; SIGTERM
//! gives them back to their queue; nothing is lost. And a draining worker
//! (SIGTERM, handlers still finishing) answers 503 `draining` until it exits.

use helixmq_testkit::cli::{self, file_lines, temp_path, Background, Broker};
use std::collections::HashMap;
use std::time::Duration;

#[test]
fn full_retry_queue_runs_each_failing_handler_once() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let retry = b.name("retry");
    let q = b.name("tasks.background");
    let filler = [
        "publish",
        "-e",
        &retry,
        "-k",
        "filler",
        "--payload",
        "filler",
    ];
    b.run(&[&filler[..], &["--count", "10000"]].concat()).ok();
    // The tier is a quorum queue: it takes a few publishes past its 10,000
    // before it refuses (its publishers learn of the limit asynchronously);
    // once it refused one it refuses every publish.
    let mut past = 0;
    loop {
        let r = b.run(&filler);
        if r.code != 0 {
            assert!(r.stderr.contains("nacked"), "{}", r.stderr);
            break;
        }
        past += 1;
        assert!(past < 200, "200 publishes past the limit and none refused");
    }
    eprintln!("the retry queue refused after {past} publishes past its limit");
    let mut ids = Vec::new();
    for i in 0..5 {
        let out = b
            .run(&[
                "publish",
                "-e",
                &b.name("tasks"),
                "-k",
                "background",
                "--payload",
                &format!("job {i}"),
            ])
            .ok();
        ids.push(out.lines()[0].clone());
    }
    let runs = temp_path("runs");
    let port = cli::free_port();
    let mut c = b.cmd();
    c.args([
        "worker",
        "--queue",
        &q,
        "--exec",
        &format!("echo $HELIXMQ_MESSAGE_ID >> {}; exit 1", runs.display()),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let mut w = Background::spawn(c);
    let get = |path: &str| {
        reqwest::blocking::get(format!("http://127.0.0.1:{port}{path}"))
            .ok()
            .map(|r| (r.status().as_u16(), r.text().unwrap_or_default()))
    };
    b.eventually(Duration::from_secs(30), "5 deliveries held", || {
        get("/metrics").is_some_and(|(_, m)| {
            m.lines().any(|l| {
                l.starts_with("rabbitmq_reroutes_blocked{") && l.contains(&q) && l.ends_with(" 5")
            })
        })
    });
    std::thread::sleep(Duration::from_secs(15));
    let mut per_id: HashMap<String, usize> = HashMap::new();
    for id in file_lines(&runs) {
        *per_id.entry(id).or_default() += 1;
    }
    eprintln!("handler runs over 15 s of a full retry queue: {per_id:?}");
    assert_eq!(per_id.len(), 5, "{per_id:?}");
    assert!(
        per_id.values().all(|&n| n == 1),
        "a handler ran twice: {per_id:?}"
    );
    let (code, body) = get("/health").expect("health answers");
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!("retry queue {retry} full")),
        "health names the full queue: {body}"
    );

    // SIGTERM: the held deliveries go back to their queue, nothing lost.
    let run = w.terminate(Duration::from_secs(20));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        run.stderr.matches("holding failed deliveries").count(),
        1,
        "one warning per episode, not per attempt:\n{}",
        run.stderr
    );
    b.eventually(Duration::from_secs(20), "5 back in their queue", || {
        b.ready(&q) == 5
    });
    let _ = std::fs::remove_file(&runs);
}

#[test]
fn health_says_draining_from_sigterm_until_exit() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.background");
    let started = temp_path("started");
    let port = cli::free_port();
    let mut c = b.cmd();
    c.args([
        "worker",
        "--queue",
        &q,
        "--exec",
        &format!("touch {}; sleep 4", started.display()),
        "--metrics-addr",
        &format!("127.0.0.1:{port}"),
    ]);
    let mut w = Background::spawn(c);
    b.run(&[
        "publish",
        "-e",
        &b.name("tasks"),
        "-k",
        "background",
        "--payload",
        "slow",
    ])
    .ok();
    b.eventually(Duration::from_secs(20), "the handler started", || {
        started.exists()
    });
    let health = || {
        reqwest::blocking::get(format!("http://127.0.0.1:{port}/health"))
            .ok()
            .map(|r| (r.status().as_u16(), r.text().unwrap_or_default()))
    };
    assert_eq!(health().map(|h| h.0), Some(200));
    let pid = w.child.as_ref().unwrap().id().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    b.eventually(Duration::from_secs(5), "503 draining", || {
        health().is_some_and(|(code, body)| code == 503 && body.contains("draining"))
    });
    // And every answer after it, until the worker stops listening at its exit
    // (the handler has about 3 s to go).
    let mut answers = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while let Some((code, body)) = health() {
        assert!(
            code == 503 && body.contains("draining"),
            "answer {answers} after the first 503: {code} {body}"
        );
        answers += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "still serving 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(answers >= 10, "only {answers} answers while draining");
    let run = w.terminate(Duration::from_secs(20));
    assert_eq!(
        run.code, 0,
        "the handler finished within the drain: {}",
        run.stderr
    );
    assert_eq!(b.ready(&q), 0, "acked, not requeued");
    let _ = std::fs::remove_file(&started);
}
