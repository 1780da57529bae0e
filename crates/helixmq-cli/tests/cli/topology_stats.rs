//! `topology apply | diff | delete` and `stats` against the local RabbitMQ and
//! its management API.

use helixmq_testkit::cli;
use helixmq_testkit::cli::{mgmt_delete_queue, mgmt_put_queue, Broker};
use serde_json::json;
use std::time::Duration;

#[test]
fn diff_apply_conflict_and_delete() {
    let b = Broker::new();
    let llm = b.name("tasks.llm");
    let out = b.run(&["topology", "diff"]).expect_code(2);
    assert!(
        out.stdout.contains(&format!("missing  queue {llm}")),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains(&format!("missing  exchange {} (topic)", b.name("events"))),
        "{}",
        out.stdout
    );

    let out = b.run(&["topology", "apply"]).ok();
    assert!(
        // The spec's 6 exchanges and 13 queues, and scheduled delivery's 26
        // exchanges (24 levels, final, due) and 25 queues (24 levels, final).
        out.stdout.contains("declared 32 exchanges, 38 queues"),
        "{}",
        out.stdout
    );
    b.run(&["topology", "apply"]).ok(); // idempotent
    let out = b.run(&["topology", "diff"]).ok();
    assert!(out.stdout.contains("in sync"), "{}", out.stdout);

    // A stray queue under the prefix, and the llm queue re-made with another priority.
    mgmt_put_queue(&b.name("stray"), json!({}));
    mgmt_delete_queue(&llm);
    mgmt_put_queue(
        &llm,
        json!({"x-max-priority": 5, "x-dead-letter-exchange": b.name("dlx")}),
    );
    let out = b.run(&["topology", "diff"]).expect_code(2);
    assert!(
        out.stdout
            .contains(&format!("extra    queue {}", b.name("stray"))),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!(
            "differs  queue {llm}: x-max-priority: broker 5, configured 10"
        )),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!(
            "missing  binding {} -> {llm} (key 'llm')",
            b.name("tasks")
        )),
        "{}",
        out.stdout
    );

    // apply explains the conflict and its fix.
    let out = b.run(&["topology", "apply"]).expect_code(1);
    let e = out.stderr.to_lowercase();
    assert!(
        e.contains("precondition failed") && e.contains(&llm) && e.contains("x-max-priority"),
        "{}",
        out.stderr
    );
    assert!(e.contains("delete"), "the fix is named: {}", out.stderr);

    // delete refuses without --yes, then removes everything under the prefix.
    let out = b.run(&["topology", "delete"]).expect_code(1);
    assert!(out.stderr.contains("--yes"), "{}", out.stderr);
    b.run(&["topology", "delete", "--yes"]).ok();
    let left: Vec<String> = cli::mgmt_get("queues/%2F")
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|q| q["name"].as_str().map(str::to_string))
        .filter(|n| n.starts_with(&format!("{}.", b.prefix)) && *n != b.name("stray"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn stats_reports_queues_and_flags_thresholds() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let out = b.run(&["stats", "--json"]);
    assert!(out.code == 0 || out.code == 2, "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let names: Vec<&str> = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    // The spec's 13 and scheduled delivery's 25 (24 delay levels, final).
    assert_eq!(names.len(), 38, "only this prefix's queues: {names:?}");
    assert!(names.contains(&b.name("tasks.llm").as_str()));
    assert!(v["connections"].is_u64() && v["channels"].is_u64());

    let text = b.run(&["stats"]);
    assert!(
        text.stdout.contains("READY")
            && text.stdout.contains("UNACKED")
            && text.stdout.contains("connections:"),
        "{}",
        text.stdout
    );

    // Cross the ready threshold on one queue: exit 2 and the alert names it.
    let q = b.name("tasks.background");
    b.run(&[
        "publish",
        "--queue",
        &q,
        "--payload",
        "x",
        "--count",
        "10001",
    ])
    .ok();
    let mut last = None;
    b.eventually(Duration::from_secs(30), "the ready alert", || {
        let out = b.run(&["stats"]);
        let hit = out.code == 2
            && out
                .stdout
                .contains(&format!("ALERT queue {q}: 10001 ready > 10000"));
        last = Some(out.stdout);
        hit
    });
    drop(last);
}

#[test]
fn stats_without_the_management_api_says_how_to_enable_it() {
    let b = Broker::new();
    let out = b
        .run(&["--management-url", "http://127.0.0.1:1", "stats"])
        .expect_code(1);
    assert!(
        out.stderr.contains("not reachable at http://127.0.0.1:1"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("rabbitmq-plugins enable rabbitmq_management"),
        "{}",
        out.stderr
    );

    let mut c = b.cmd();
    c.args(["stats"]).env("RABBITMQ_PASSWORD", "wrong-secret");
    let out = cli::run(c, b"").expect_code(1);
    assert!(
        out.stderr.contains("401") && !out.stderr.contains("wrong-secret"),
        "{}",
        out.stderr
    );
}

#[test]
fn stats_shows_real_publish_rates_and_diff_speaks_json() {
    let b = Broker::new();
    let out = b.run(&["topology", "diff", "--json"]).expect_code(2);
    println!("captured `topology diff --json`:\n{}", out.stdout);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["in_sync"], false);
    assert!(
        v["differences"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["kind"] == "missing"
                && d["object"] == format!("queue {}", b.name("tasks.llm")))
    );
    b.run(&["topology", "apply"]).ok();
    let out = b.run(&["topology", "diff", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["in_sync"], true, "{v}");
    assert_eq!(v["differences"], json!([]));

    // A burst: the counters and the minute's average show it, long after the
    // last 5-second sample has gone back to 0.
    let q = b.name("tasks.debate");
    b.run(&["publish", "-q", &q, "--payload", "x", "--count", "3000"])
        .ok();
    let mut last = String::new();
    let mut tries = Vec::new();
    let started = std::time::Instant::now();
    let waited = b.try_eventually(Duration::from_secs(30), || {
        let t = std::time::Instant::now();
        let out = b.run(&["stats", "--json"]);
        last = out.stdout.clone();
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        let row = v["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["name"] == q.as_str())
            .cloned();
        // What each look saw, for the failure message: when, how long the
        // command took, and the queue's counters (or the command's error).
        tries.push(format!(
            "at {:.1?} ({:.1?}): {}",
            started.elapsed(),
            t.elapsed(),
            match &row {
                Some(r) => format!(
                    "published_total {} publish_rate_1m {}",
                    r["published_total"], r["publish_rate_1m"]
                ),
                None => format!("no row; exit {}, stderr {}", out.code, out.stderr.trim()),
            }
        ));
        row.is_some_and(|r| {
            r["published_total"] == 3000 && r["publish_rate_1m"].as_f64().unwrap_or(0.0) > 0.0
        })
    });
    assert!(
        waited,
        "no publish rate for the burst of 3000 within 30 s; each look:\n{}",
        tries.join("\n")
    );
    println!("captured `stats --json`:\n{last}");
    let text = b.run(&["stats"]);
    println!("captured `stats`:\n{}", text.stdout);
    let row = text.stdout.lines().find(|l| l.starts_with(&q)).unwrap();
    assert!(row.trim_end().ends_with("3000"), "{row}");
    assert!(text.stdout.contains("PUBLISH/s 5s|1m"), "{}", text.stdout);
}
