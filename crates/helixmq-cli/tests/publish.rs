//! `helixmq publish` against the local RabbitMQ: confirmed ids, pipelined
//! counts, and the bad inputs with their messages.

mod common;

use common::{bare, run, Broker};
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
