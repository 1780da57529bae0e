//! `helixmq dlq` against the local RabbitMQ: listing leaves everything in
//! place, filters, show, replay (dry run, by filter, by id, --to, a failed
//! replay keeps the message), purge needs --yes.

use helixmq_testkit::cli::{mgmt_peek, on_a_terminal, seed_dead_letters, Broker};
use std::collections::BTreeSet;
use std::time::Duration;

fn list(b: &Broker, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["dlq", "list", "--json"];
    args.extend_from_slice(extra);
    serde_json::from_str(&b.run(&args).ok().stdout).unwrap()
}

fn ids(v: &[serde_json::Value]) -> BTreeSet<String> {
    v.iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// Put a dead letter in the DLQ the way the consumer does: through `{p}.dlx`
/// with the failure headers.
fn dead_letter(b: &Broker, origin: &str, reason: &str, payload: &str) -> String {
    let origin_q = b.name(origin);
    let out = b
        .run(&[
            "publish",
            "-e",
            &b.name("dlx"),
            "-k",
            &origin_q,
            "--payload",
            payload,
            "-H",
            &format!("x-helixmq-origin-queue={origin_q}"),
            "-H",
            &format!("x-helixmq-dead-letter-reason={reason}"),
            "-H",
            "x-helixmq-first-failure-ms=1795760000000",
            "-H",
            "x-helixmq-last-failure-ms=1795760001000",
            "-H",
            "x-helixmq-attempt=3",
        ])
        .ok();
    out.lines()[0].clone()
}

#[test]
fn dlq_list_show_replay_purge() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let mut bg = Vec::new();
    for i in 0..3 {
        bg.push(dead_letter(
            &b,
            "tasks.background",
            "boom A",
            &format!("payload {i}"),
        ));
    }
    let debate: Vec<String> = (0..2)
        .map(|i| dead_letter(&b, "tasks.debate", "boom B", &format!("d{i}")))
        .collect();

    // Listing twice shows the same five messages: nothing was consumed.
    let all = list(&b, &[]);
    assert_eq!(all.len(), 5);
    assert_eq!(ids(&list(&b, &[])), ids(&all));
    assert_eq!(all[0]["reason"], "boom A");
    assert_eq!(all[0]["first_failure"], "2026-11-27T06:13:20.000Z");
    assert_eq!(
        ids(&list(&b, &["--queue", &b.name("tasks.background")])),
        bg.iter().cloned().collect()
    );
    assert_eq!(
        ids(&list(&b, &["--reason", "BOOM b"])),
        debate.iter().cloned().collect()
    );
    assert_eq!(list(&b, &["--limit", "2"]).len(), 2);
    let text = b.run(&["dlq", "list"]).ok();
    assert!(
        text.stdout.contains("ORIGIN QUEUE") && text.stdout.contains(&bg[0]),
        "{}",
        text.stdout
    );
    assert!(text.stderr.contains("nothing was removed"));

    // show
    let show = b.run(&["dlq", "show", &debate[1]]).ok();
    assert!(
        show.stdout.contains("boom B")
            && show.stdout.contains("d1")
            && show.stdout.contains(&b.name("tasks.debate")),
        "{}",
        show.stdout
    );
    let out = b.run(&["dlq", "show", "no-such-id"]).expect_code(1);
    assert!(
        out.stderr.contains("no message with id 'no-such-id'"),
        "{}",
        out.stderr
    );

    // replay: a selector is required (a usage error); a dry run changes nothing.
    let out = b.run(&["dlq", "replay"]).expect_code(64);
    println!("captured stderr of `dlq replay`:\n{}", out.stderr);
    assert!(
        out.stderr.contains("--id") && out.stderr.contains("--all"),
        "{}",
        out.stderr
    );
    let dry = b.run(&["dlq", "replay", "--all", "--dry-run"]).ok();
    assert_eq!(
        dry.lines()
            .iter()
            .filter(|l| l.starts_with("would replay"))
            .count(),
        5
    );
    assert_eq!(list(&b, &[]).len(), 5);

    // replay by origin filter: back to the origin queue with attempt 1, out of the DLQ.
    let r = b
        .run(&["dlq", "replay", "--queue", &b.name("tasks.background")])
        .ok();
    assert_eq!(
        r.lines()
            .iter()
            .filter(|l| l.starts_with("replayed"))
            .count(),
        3,
        "{}",
        r.stdout
    );
    assert_eq!(ids(&list(&b, &[])), debate.iter().cloned().collect());
    let q = b.name("tasks.background");
    b.eventually(
        Duration::from_secs(10),
        "replayed messages in the origin queue",
        || mgmt_peek(&q, 10).len() == 3,
    );
    for m in mgmt_peek(&q, 10) {
        let h = &m["properties"]["headers"];
        assert_eq!(h["x-helixmq-attempt"], 1, "attempt reset: {m}");
        assert!(
            h.get("x-helixmq-dead-letter-reason").is_none(),
            "failure headers cleared: {m}"
        );
        assert!(bg.contains(&m["properties"]["message_id"].as_str().unwrap().to_string()));
    }

    // replay one id elsewhere with --to.
    let r = b
        .run(&[
            "dlq",
            "replay",
            "--id",
            &debate[0],
            "--to",
            &b.name("tasks.llm"),
        ])
        .ok();
    assert!(
        r.stdout.contains(&format!(
            "replayed {} -> {}",
            debate[0],
            b.name("tasks.llm")
        )),
        "{}",
        r.stdout
    );
    assert_eq!(
        ids(&list(&b, &[])),
        [debate[1].clone()].into_iter().collect()
    );

    // A replay that cannot be confirmed leaves the message in the DLQ.
    let out = b
        .run(&[
            "dlq",
            "replay",
            "--id",
            &debate[1],
            "--to",
            &b.name("not-a-queue"),
        ])
        .expect_code(1);
    assert!(
        out.stderr.contains("unroutable") && out.stderr.contains("not-a-queue"),
        "{}",
        out.stderr
    );
    assert_eq!(list(&b, &[]).len(), 1);

    // purge
    let out = b.run(&["dlq", "purge"]).expect_code(1);
    assert!(
        out.stderr.contains("refusing to purge 1 message(s)") && out.stderr.contains("--yes"),
        "{}",
        out.stderr
    );
    assert_eq!(list(&b, &[]).len(), 1);
    let out = b.run(&["dlq", "purge", "--yes"]).ok();
    assert!(out.stdout.contains("purged 1 message(s)"), "{}", out.stdout);
    assert!(list(&b, &[]).is_empty());
}

#[test]
fn dlq_of_an_undeclared_prefix_is_a_clear_error() {
    let b = Broker::new();
    let out = b.run(&["dlq", "list"]).expect_code(1);
    assert!(
        out.stderr.contains(&b.name("dlq")) && out.stderr.contains("not found"),
        "{}",
        out.stderr
    );
}

#[test]
fn expired_messages_are_listed_with_the_brokers_reason_and_replayed_without_their_ttl() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let q = b.name("tasks.debate");
    let id = b
        .run(&[
            "publish",
            "-e",
            &b.name("tasks"),
            "-k",
            "debate",
            "--payload",
            "late",
            "--expiration",
            "100ms",
        ])
        .ok()
        .lines()[0]
        .clone();
    b.eventually(
        Duration::from_secs(10),
        "the expired message in the DLQ",
        || list(&b, &[]).len() == 1,
    );
    let e = &list(&b, &[])[0];
    assert_eq!(e["id"], id.as_str());
    assert_eq!(e["reason"], "broker: expired");
    assert_eq!(e["origin_queue"], q.as_str());
    assert_eq!(e["origin_exchange"], b.name("tasks").as_str());

    b.run(&["dlq", "replay", "--id", &id]).ok();
    // Well past the old 100 ms TTL, it is still waiting in its queue.
    std::thread::sleep(Duration::from_millis(500));
    let peek = mgmt_peek(&q, 5);
    assert_eq!(peek.len(), 1, "{peek:?}");
    assert_eq!(peek[0]["properties"]["message_id"], id.as_str());
    assert!(list(&b, &[]).is_empty());
}

/// Publish to `exchange` through the management API with explicit AMQP
/// properties (the CLI always gives a fresh id; copies of one id need this).
fn mgmt_publish(exchange: &str, key: &str, properties: serde_json::Value, payload: &str) {
    let r = reqwest::blocking::Client::new()
        .post(format!(
            "http://127.0.0.1:15672/api/exchanges/%2F/{exchange}/publish"
        ))
        .basic_auth("guest", Some("guest"))
        .json(&serde_json::json!({
            "properties": properties,
            "routing_key": key,
            "payload": payload,
            "payload_encoding": "string",
        }))
        .send()
        .unwrap();
    let v: serde_json::Value = r.json().unwrap();
    assert_eq!(v["routed"], true, "{v}");
}

#[test]
fn dlq_show_every_copy_list_cuts_reasons_at_the_end_and_replay_by_short_name() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    // A fanned-out notification that failed in two queues: two copies, one id.
    let id = "0000-fanned-out";
    for q in ["notifications.websocket", "notifications.sse"] {
        let origin = b.name(q);
        mgmt_publish(
            &b.name("dlx"),
            &origin,
            serde_json::json!({
                "message_id": id,
                "delivery_mode": 2,
                "headers": {
                    "x-helixmq-origin-queue": origin,
                    "x-helixmq-dead-letter-reason": format!("{q} endpoint gone"),
                    "x-helixmq-attempt": 3,
                },
            }),
            "{}",
        );
    }
    let long = format!("START of a long reason {} END", "x".repeat(200));
    dead_letter(&b, "tasks.llm", &long, "p");

    let show = b.run(&["dlq", "show", id]).ok();
    println!("captured `dlq show`:\n{}", show.stdout);
    assert!(
        show.stdout.contains("2 copies of 0000-fanned-out")
            && show.stdout.contains("--- copy 1 of 2 ---")
            && show.stdout.contains("--- copy 2 of 2 ---")
            && show.stdout.contains(&b.name("notifications.websocket"))
            && show.stdout.contains(&b.name("notifications.sse")),
        "{}",
        show.stdout
    );
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&b.run(&["dlq", "show", id, "--json"]).ok().stdout).unwrap();
    assert_eq!(json.len(), 2);

    let text = b.run(&["dlq", "list", "--queue", "tasks.llm"]).ok();
    println!("captured `dlq list`:\n{}", text.stdout);
    let row = text
        .stdout
        .lines()
        .find(|l| l.contains("START"))
        .unwrap_or_else(|| panic!("{}", text.stdout));
    assert!(row.ends_with('…') && !row.contains("END"), "{row}");

    // Short origin names select and target like full ones.
    let out = b
        .run(&[
            "dlq",
            "replay",
            "--queue",
            "notifications.sse",
            "--to",
            "tasks.background",
        ])
        .ok();
    println!("captured `dlq replay`:\n{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("replayed {id} -> {}", b.name("tasks.background"))),
        "{}",
        out.stdout
    );
    assert!(!out.stderr.contains('\u{1b}'), "no bar off a terminal");
    assert_eq!(list(&b, &[]).len(), 2);
    let out = b.run(&["dlq", "purge", "--yes"]).ok();
    assert!(out.stdout.contains("purged 2 message(s)"), "{}", out.stdout);
}

/// `dlq replay --all` of 20,000 killed with SIGKILL mid-way: every letter is in
/// the DLQ or in its origin queue (counted by id), none nowhere.
#[test]
fn a_replay_killed_mid_way_leaves_every_letter_in_the_dlq_or_its_queue() {
    const N: usize = 20_000;
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let bg = b.name("tasks.background");
    let mut sent = BTreeSet::new();
    for _ in 0..4 {
        sent.extend(seed_dead_letters(&b, &bg, "boom", N / 4, "{}"));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut cfg = helixmq_testkit::broker::config(helixmq_testkit::broker::GUEST, &b.prefix);
    cfg.rabbitmq.publish_timeout = Duration::from_secs(30);
    let lib = rt.block_on(helixmq::Broker::connect(cfg)).unwrap();
    let depth = |q: &str| rt.block_on(lib.backend().queue_stats(q)).unwrap().messages;

    let mut c = b.cmd();
    c.args(["dlq", "replay", "--all"]);
    let mut replay = helixmq_testkit::cli::Background::spawn(c);
    // Kill it once copies are arriving and before it is done.
    let end = std::time::Instant::now() + Duration::from_secs(60);
    while depth(&bg) == 0 {
        assert!(std::time::Instant::now() < end, "no replayed copy arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut child = replay.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let at_kill = depth(&bg);
    assert!(
        at_kill < N as u64,
        "the kill landed mid-replay ({at_kill} of {N} replayed)"
    );

    // Count by id once the broker took back what the dead process held.
    let drain = |q: &str| rt.block_on(helixmq_testkit::broker::drain_ids(&lib, q));
    let in_queue = drain(&bg);
    let in_dlq = drain(&b.name("dlq"));
    let found: BTreeSet<String> = in_queue.iter().chain(&in_dlq).cloned().collect();
    let lost: Vec<&String> = sent.difference(&found).take(5).collect();
    let both = in_queue.len() + in_dlq.len() - found.len();
    eprintln!(
        "killed at {at_kill}: {} in the queue, {} in the DLQ, lost {}, in both {both}",
        in_queue.len(),
        in_dlq.len(),
        sent.len() - sent.intersection(&found).count()
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    rt.block_on(lib.close()).unwrap();
}

/// `publish --count`, `dlq replay` and `dlq purge` of many draw a progress bar
/// on a terminal (off one they print none: the other tests read their output).
#[test]
fn publish_replay_and_purge_of_many_draw_a_progress_bar_on_a_terminal() {
    const N: usize = 3000;
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let bg = b.name("tasks.background");
    let on_tty = |args: &[&str], bar: &str| {
        let mut c = b.cmd();
        c.args(args);
        let tty = on_a_terminal(&c);
        // The output is mostly ids; its last lines say what it ended with.
        let tail: Vec<&str> = tty.lines().rev().take(5).collect();
        assert!(
            tty.contains(&format!("{bar} [")),
            "no '{bar}' bar for {args:?} on a terminal; it ended: {tail:?}"
        );
    };
    on_tty(
        &[
            "publish",
            "-q",
            &bg,
            "--payload",
            "{}",
            "--count",
            &N.to_string(),
        ],
        "publishing",
    );
    b.eventually(Duration::from_secs(20), "every message published", || {
        b.ready(&bg) == N as u64
    });
    seed_dead_letters(&b, &bg, "boom", N, "{}");
    on_tty(&["dlq", "replay", "--all"], "replaying");
    assert_eq!(
        list(&b, &["--limit", "10"]).len(),
        0,
        "every letter replayed"
    );
    seed_dead_letters(&b, &bg, "boom", N, "{}");
    on_tty(&["dlq", "purge", "--yes"], "purging");
    assert_eq!(list(&b, &["--limit", "10"]).len(), 0, "purged");
}
