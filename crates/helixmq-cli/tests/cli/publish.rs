//! `helixmq publish` against the local RabbitMQ: confirmed ids, pipelined
//! counts, and the bad inputs with their messages.

use helixmq_testkit::cli;
use helixmq_testkit::cli::{bare, run, Broker};
use std::collections::HashSet;
use std::time::Duration;

#[test]
fn publish_prints_each_confirmed_id_and_the_messages_arrive() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let one = b
        .run(&[
            "publish",
            "-e",
            &b.name("tasks"),
            "-k",
            "background",
            "--payload",
            "hello",
            "--type",
            "job",
            "-H",
            "tenant=acme",
        ])
        .ok();
    assert_eq!(one.lines().len(), 1);
    assert!(
        uuid::Uuid::parse_str(&one.lines()[0]).is_ok(),
        "{}",
        one.stdout
    );

    let many = b
        .run(&[
            "publish",
            "-e",
            &b.name("tasks"),
            "-k",
            "llm",
            "--payload",
            "x",
            "--priority",
            "high",
            "--count",
            "1200",
        ])
        .ok();
    let ids: HashSet<String> = many.lines().into_iter().collect();
    assert_eq!(ids.len(), 1200, "1200 distinct confirmed ids");
    assert!(
        many.stderr.contains("1200 message(s) confirmed"),
        "{}",
        many.stderr
    );

    // stdin and --file payloads, --queue through the default exchange.
    let mut c = b.cmd();
    c.args(["publish", "--queue", &b.name("tasks.debate")]);
    run(c, b"from stdin").ok();
    let f = std::env::temp_dir().join(format!("hx-payload-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&f, b"from a file").unwrap();
    b.run(&[
        "publish",
        "--queue",
        &b.name("tasks.debate"),
        "--file",
        f.to_str().unwrap(),
    ])
    .ok();

    b.eventually(
        Duration::from_secs(20),
        "messages counted by the broker",
        || {
            b.ready(&b.name("tasks.background")) == 1
                && b.ready(&b.name("tasks.llm")) == 1200
                && b.ready(&b.name("tasks.debate")) == 2
        },
    );
}

#[test]
fn bad_publish_inputs_are_refused_with_clear_messages() {
    let b = Broker::new();
    // Unknown queue: mandatory publish, unroutable.
    let out = b
        .run(&[
            "publish",
            "--queue",
            &b.name("no-such-queue"),
            "--payload",
            "x",
        ])
        .expect_code(1);
    assert!(
        out.stderr.contains("unroutable") && out.stderr.contains("no-such-queue"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "nothing confirmed: {}", out.stdout);

    // Unknown exchange.
    let out = b
        .run(&[
            "publish",
            "-e",
            &b.name("nowhere"),
            "-k",
            "x",
            "--payload",
            "x",
        ])
        .expect_code(1);
    assert!(out.stderr.contains("nowhere"), "{}", out.stderr);

    // Bad priorities.
    let out = b
        .run(&[
            "publish",
            "--queue",
            "q",
            "--priority",
            "urgent",
            "--payload",
            "x",
        ])
        .expect_code(64);
    assert!(
        out.stderr.contains("'urgent' is not a priority"),
        "{}",
        out.stderr
    );
    let out = b
        .run(&[
            "publish",
            "--queue",
            "q",
            "--priority",
            "11",
            "--payload",
            "x",
        ])
        .expect_code(64);
    assert!(out.stderr.contains("0 to 10"), "{}", out.stderr);

    // Malformed header.
    let out = b
        .run(&[
            "publish",
            "--queue",
            "q",
            "--header",
            "novalue",
            "--payload",
            "x",
        ])
        .expect_code(64);
    assert!(
        out.stderr.contains("malformed header 'novalue'") && out.stderr.contains("KEY=VALUE"),
        "{}",
        out.stderr
    );

    // Neither a queue nor an exchange.
    let out = b.run(&["publish", "--payload", "x"]).expect_code(64);
    assert!(
        out.stderr.contains("--exchange") || out.stderr.contains("--queue"),
        "{}",
        out.stderr
    );

    // Unreachable broker.
    let mut c = bare();
    c.args(["publish", "--queue", "q", "--payload", "x"])
        .env("RABBITMQ_HOST", "127.0.0.1")
        .env("RABBITMQ_PORT", "1");
    let out = run(c, b"").expect_code(1);
    assert!(
        out.stderr.contains("connection refused") && out.stderr.contains("127.0.0.1:1"),
        "{}",
        out.stderr
    );

    // Wrong password: access refused, at once.
    let mut c = b.cmd();
    c.args(["publish", "--queue", "q", "--payload", "x"])
        .env("RABBITMQ_PASSWORD", "wrong-password");
    let started = std::time::Instant::now();
    let out = run(c, b"").expect_code(1);
    assert!(
        out.stderr.to_lowercase().contains("access refused"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("wrong-password"),
        "the password is never printed"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn publish_to_a_queue_under_least_privilege_names_the_exchange_to_use() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let mut c = b.cmd_as_helixagent();
    c.args(["publish", "--queue", "tasks.background", "--payload", "x"]);
    let out = run(c, b"").expect_code(1);
    println!("captured stderr:\n{}", out.stderr);
    let want = format!(
        "publishing straight to a queue uses the default exchange, which the spec's permissions refuse: use `-e {} -k background`",
        b.name("tasks")
    );
    assert!(out.stderr.contains(&want), "{}", out.stderr);
    assert!(
        !out.stderr.contains("RABBITMQ_PASSWORD"),
        "not blamed on the password: {}",
        out.stderr
    );
    // What it suggests works for the same user.
    let mut c = b.cmd_as_helixagent();
    c.args([
        "publish",
        "-e",
        &b.name("tasks"),
        "-k",
        "background",
        "--payload",
        "x",
    ]);
    run(c, b"").ok();
    b.eventually(Duration::from_secs(20), "the message arrived", || {
        b.ready(&b.name("tasks.background")) == 1
    });
}

#[test]
fn publish_json_content_type_short_queue_names_and_json_output() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.debate");
    // `-q tasks.debate` is short for `<prefix>.tasks.debate`; --json prints objects.
    let out = b
        .run(&[
            "publish",
            "-q",
            "tasks.debate",
            "--payload",
            r#"{"a":1}"#,
            "--json",
        ])
        .ok();
    println!("captured stdout:\n{}", out.stdout);
    let v: serde_json::Value = serde_json::from_str(out.lines()[0].as_str()).unwrap();
    assert_eq!(v["routing_key"], q.as_str());
    assert_eq!(v["confirmed"], true);
    assert!(uuid::Uuid::parse_str(v["id"].as_str().unwrap()).is_ok());
    b.run(&["publish", "-q", &q, "--payload", "plain text"])
        .ok();
    b.run(&[
        "publish",
        "-q",
        &q,
        "--payload",
        "[1,2]",
        "--content-type",
        "text/x-list",
    ])
    .ok();
    b.eventually(Duration::from_secs(20), "three messages", || {
        b.ready(&q) == 3
    });
    let types: Vec<Option<String>> = cli::mgmt_peek(&q, 3)
        .iter()
        .map(|m| m["properties"]["content_type"].as_str().map(str::to_string))
        .collect();
    println!("content types: {types:?}");
    assert_eq!(
        types,
        vec![
            Some("application/json".to_string()),
            None,
            Some("text/x-list".to_string())
        ]
    );

    // --count with --json: one object per confirmed message; no progress bar
    // escape codes when stderr is not a terminal.
    let many = b
        .run(&[
            "publish",
            "-q",
            "tasks.debate",
            "--payload",
            "x",
            "--count",
            "700",
            "--json",
        ])
        .ok();
    assert_eq!(many.lines().len(), 700);
    assert!(
        many.lines().iter().all(|l| l.starts_with("{\"")),
        "{}",
        many.stdout
    );
    assert!(
        !many.stderr.contains('\u{1b}') && !many.stderr.contains("=>"),
        "no bar off a terminal: {:?}",
        many.stderr
    );
}

#[test]
fn an_unknown_priority_lists_the_names_that_exist() {
    let b = Broker::new();
    let out = b
        .run(&[
            "publish",
            "-q",
            "tasks.llm",
            "--priority",
            "urgent",
            "--payload",
            "x",
        ])
        .expect_code(64);
    println!("captured stderr:\n{}", out.stderr);
    for name in [
        "low (1)",
        "normal (5)",
        "high (8)",
        "critical (10)",
        "0 to 10",
    ] {
        assert!(out.stderr.contains(name), "{name}: {}", out.stderr);
    }
}

#[test]
fn publish_delay_and_at_schedule_and_bad_times_are_refused() {
    let b = Broker::new();
    let tasks = b.name("tasks");
    // No `topology apply` first: a scheduled publish declares the topology
    // with scheduled delivery itself.
    let one = b
        .run(&[
            "publish",
            "-e",
            &tasks,
            "-k",
            "background",
            "--payload",
            "later",
            "--delay",
            "1s",
        ])
        .ok();
    assert_eq!(one.lines().len(), 1, "{}", one.stdout);
    let at =
        humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(3))
            .to_string();
    let two = b
        .run(&[
            "publish",
            "-e",
            &tasks,
            "-k",
            "background",
            "--payload",
            "at",
            "--at",
            &at,
            "--json",
        ])
        .ok();
    let v: serde_json::Value = serde_json::from_str(two.lines()[0].as_str()).unwrap();
    assert_eq!(
        (v["confirmed"].as_bool(), v["scheduled"].as_bool()),
        (Some(true), Some(true))
    );
    b.eventually(
        Duration::from_secs(20),
        "both scheduled messages in tasks.background",
        || b.ready(&b.name("tasks.background")) == 2,
    );

    let refused = |args: &[&str], code: i32, want: &str| {
        let mut all = vec![
            "publish",
            "-e",
            &tasks,
            "-k",
            "background",
            "--payload",
            "x",
        ];
        all.extend_from_slice(args);
        let out = b.run(&all).expect_code(code);
        assert!(out.stderr.contains(want), "{args:?}: {}", out.stderr);
        assert!(out.stdout.is_empty(), "nothing confirmed: {}", out.stdout);
    };
    refused(&["--delay", "500ms"], 1, "from 1s to 30days");
    refused(&["--delay", "31days"], 1, "from 1s to 30days");
    refused(&["--delay", "soon"], 64, "is not a duration");
    refused(&["--at", "2020-01-01T00:00:00Z"], 1, "in the past");
    refused(&["--at", "tomorrow"], 64, "is not an RFC 3339 time");
    refused(
        &["--delay", "5s", "--expiration", "1s"],
        64,
        "cannot be used with",
    );
    let out = b
        .run(&[
            "publish",
            "-e",
            &tasks,
            "-k",
            "nope",
            "--payload",
            "x",
            "--delay",
            "5s",
        ])
        .expect_code(1);
    assert!(out.stderr.contains("unroutable"), "{}", out.stderr);
}
