//! `helixmq demo` on the embedded broker: finishes, accounts for every message,
//! shows the priority order and the summary table.

use helixmq_testkit::cli;
use helixmq_testkit::cli::{bare, run};
use std::time::{Duration, Instant};

#[test]
fn demo_on_the_embedded_broker_accounts_for_every_message() {
    let mut c = bare();
    c.args(["demo", "--broker", "memory"]);
    let started = Instant::now();
    let out = run(c, b"").ok();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the demo must finish within a minute"
    );
    let s = &out.stdout;
    assert!(s.contains("embedded"), "says which broker: {s}");
    for q in [
        "tasks.llm",
        "tasks.background",
        "events.debate",
        "events.verify",
        "events.audit",
        "notifications.websocket",
        "notifications.sse",
        "notifications.webhooks",
    ] {
        assert!(s.lines().any(|l| l.starts_with(q)), "{q} row missing:\n{s}");
    }
    assert!(
        s.contains("critical×") && s.contains("✓ higher priority first"),
        "{s}"
    );
    assert!(
        s.contains("gave up after 3 attempts") && s.contains("rejected as poison"),
        "{s}"
    );
    assert!(s.contains("✓ every message accounted for"), "{s}");
    // The total row: retried and dead-lettered are both non-zero.
    let total: Vec<&str> = s
        .lines()
        .find(|l| l.starts_with("total"))
        .unwrap()
        .split_whitespace()
        .collect();
    let n = |i: usize| total[i].parse::<u64>().unwrap();
    assert_eq!(
        n(1),
        n(2) + n(4),
        "published = processed + dead-lettered: {total:?}"
    );
    assert!(n(3) > 0 && n(4) > 0, "{total:?}");
}

#[test]
fn demo_on_an_unreachable_rabbitmq_fails_clearly() {
    let mut c = bare();
    c.args(["demo", "--broker", "rabbitmq"])
        .env("RABBITMQ_HOST", "127.0.0.1")
        .env("RABBITMQ_PORT", "1");
    let out = run(c, b"").expect_code(1);
    assert!(out.stderr.contains("127.0.0.1:1"), "{}", out.stderr);
}

#[test]
fn demo_auto_falls_back_to_the_embedded_broker() {
    let mut c = bare();
    c.args(["demo", "--jobs", "40"])
        .env("RABBITMQ_HOST", "127.0.0.1")
        .env("RABBITMQ_PORT", "1");
    let out = run(c, b"").ok();
    assert!(
        out.stdout
            .contains("embedded (in-process): nothing listens at 127.0.0.1:1"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("✓ every message accounted for"));
}

#[test]
fn demo_on_rabbitmq_runs_and_cleans_up() {
    let b = cli::Broker::new();
    let mut c = b.cmd();
    c.args(["demo", "--broker", "rabbitmq", "--jobs", "100"]);
    let out = run(c, b"").ok();
    assert!(
        out.stdout.contains("RabbitMQ at 127.0.0.1:5672"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("✓ every message accounted for"),
        "{}",
        out.stdout
    );
    let under = format!("{}.", b.prefix);
    let left: Vec<String> = cli::mgmt_get("queues/%2F")
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .filter(|n| n.starts_with(&under))
        .collect();
    assert!(left.is_empty(), "the demo deletes its queues: {left:?}");
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let mut c = bare();
    c.args([
        "--log-format",
        "json",
        "demo",
        "--broker",
        "memory",
        "--jobs",
        "40",
    ])
    .env("RUST_LOG", "helixmq=warn");
    let out = run(c, b"").ok();
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        !lines.is_empty(),
        "the demo's dead letters are logged at warn"
    );
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.get("level").is_some() && v.get("fields").is_some(), "{l}");
    }
}

#[test]
fn demo_whose_login_is_refused_says_so_with_the_fix() {
    let b = cli::Broker::new();
    // Reachable broker, refused login: an error with the fix, not a quiet fallback.
    let mut c = b.cmd();
    c.args(["demo", "--jobs", "40"])
        .env("RABBITMQ_USER", "helixagent")
        .env("RABBITMQ_PASSWORD", "not-the-password");
    let out = run(c, b"").expect_code(1);
    println!("captured stderr:\n{}", out.stderr);
    // The permission pattern is the configured prefix's (`^helixagent\..*` by default).
    let perm = format!(
        "set_permissions -p / helixagent '^{}\\..*'",
        b.prefix.replace('.', "\\.")
    );
    for fix in [
        "REFUSED THE LOGIN of user 'helixagent'",
        "rabbitmqctl add_user helixagent",
        perm.as_str(),
        "set_user_tags helixagent management",
        "scripts/provision",
        "RABBITMQ_USER=guest RABBITMQ_PASSWORD=guest",
        "--broker auto",
    ] {
        assert!(out.stderr.contains(fix), "{fix}: {}", out.stderr);
    }
    assert!(!out.stderr.contains("not-the-password"), "no secret");
    assert!(
        !out.stdout.contains("accounted for"),
        "did not run: {}",
        out.stdout
    );

    // `--broker auto` given explicitly: falls back, and says why.
    let mut c = b.cmd();
    c.args(["demo", "--broker", "auto", "--jobs", "40"])
        .env("RABBITMQ_USER", "helixagent")
        .env("RABBITMQ_PASSWORD", "not-the-password");
    let out = run(c, b"").ok();
    println!("captured stdout:\n{}", out.stdout);
    assert!(
        out.stdout
            .contains("embedded (in-process): RabbitMQ at 127.0.0.1:5672")
            && out.stdout.contains("REFUSED THE LOGIN"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("rabbitmqctl add_user"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.contains("✓ every message accounted for"));
}
