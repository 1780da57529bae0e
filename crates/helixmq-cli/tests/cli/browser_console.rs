//! `helixmq console` driven by a real headless chromium against the real
//! RabbitMQ: live numbers on the overview while messages flow; the DLQ
//! filtered by reason, a message opened, a group of 100 replayed and counted
//! in its origin queue by id, one deleted, purge refused without the typed
//! name; read-only mode with no action. The README's screenshots come from
//! here (`HELIXMQ_UPDATE_SCREENSHOTS=1` writes them to `docs/screenshots/`;
//! otherwise they go to `target/screenshots/`).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use helixmq_testkit::browser::Browser;
use helixmq_testkit::cli::{mgmt_peek, seed_dead_letters, Broker, Console};

const WAIT: Duration = Duration::from_secs(20);

/// Where a screenshot goes.
fn shot(name: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = if std::env::var_os("HELIXMQ_UPDATE_SCREENSHOTS").is_some() {
        root.join("docs/screenshots")
    } else {
        root.join("target/screenshots")
    };
    dir.join(name)
}

/// Run blocking CLI work off the browser's runtime thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_numbers_change_while_messages_flow() {
    let b = std::sync::Arc::new(Broker::new());
    b.run(&["topology", "apply"]).ok();
    let c = Console::start(&b, &[]);
    let browser = Browser::start().await.unwrap();
    browser.goto(&c.at("/")).await.unwrap();
    let bg = b.name("tasks.background");
    let cell = format!(r#"tr[data-queue="{bg}"] td.ready"#);
    browser.wait_for_text(&cell, "0", WAIT).await.unwrap();
    let sampled = browser.text("#sampled").await.unwrap();

    // Messages flow into the queue while the page stays open (no reload).
    let flow = {
        let b = b.clone();
        tokio::task::spawn_blocking(move || {
            for _ in 0..5 {
                b.run(&[
                    "publish",
                    "-e",
                    &b.name("tasks"),
                    "-k",
                    "background",
                    "-n",
                    "200",
                    "--payload",
                    "{}",
                ])
                .ok();
            }
        })
    };
    let grown = browser
        .wait_for_text_where(
            &cell,
            "the ready count to grow",
            |t| t.trim().parse::<u64>().is_ok_and(|n| n >= 200),
            WAIT,
        )
        .await
        .unwrap();
    flow.await.unwrap();
    let last = browser
        .wait_for_text_where(&cell, "all 1000 ready", |t| t.trim() == "1000", WAIT)
        .await
        .unwrap();
    assert_ne!(grown, "0");
    assert_eq!(last, "1000");
    assert_ne!(
        browser.text("#sampled").await.unwrap(),
        sampled,
        "the sample moved on"
    );
    // The publish rate the broker measured shows. The management API's rate
    // covers its last 5 s sample only, so it reads 0 again a few seconds after
    // a burst: under load the page could sample just after that window and
    // never see it (CI saw this once). Keep messages flowing while waiting.
    let flowing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let more = {
        let (b, flowing) = (b.clone(), flowing.clone());
        tokio::task::spawn_blocking(move || {
            while flowing.load(std::sync::atomic::Ordering::Relaxed) {
                b.run(&[
                    "publish",
                    "-e",
                    &b.name("tasks"),
                    "-k",
                    "background",
                    "-n",
                    "50",
                    "--payload",
                    "{}",
                ])
                .ok();
            }
        })
    };
    let rate = browser
        .wait_for_text_where(
            &format!(r#"tr[data-queue="{bg}"] td.publish"#),
            "a publish rate above 0",
            |t| {
                t.trim()
                    .replace(',', "")
                    .parse::<f64>()
                    .is_ok_and(|r| r > 0.0)
            },
            Duration::from_secs(30),
        )
        .await;
    flowing.store(false, std::sync::atomic::Ordering::Relaxed);
    more.await.unwrap();
    let rate = rate.unwrap();
    eprintln!("overview: ready {grown} -> {last}, publish rate {rate}/s");
    browser.screenshot(shot("overview.png")).await.unwrap();
    browser.close().await.unwrap();
    drop(c);
    blocking(move || drop(b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_finds_why_replays_a_group_deletes_one_and_cannot_purge_by_accident() {
    let b = std::sync::Arc::new(Broker::new());
    b.run(&["topology", "apply"]).ok();
    let llm = b.name("tasks.llm");
    let bg = b.name("tasks.background");
    let timeouts = seed_dead_letters(
        &b,
        &llm,
        "provider timeout after 30s (openai, 429)",
        100,
        r#"{"model":"gpt-4o","prompt":"Summarise the debate"}"#,
    );
    let invalid = seed_dead_letters(
        &b,
        &bg,
        "invalid input: missing field `user`",
        5,
        r#"{"task":"notify"}"#,
    );
    let c = Console::start(&b, &[]);
    let browser = Browser::start().await.unwrap();

    // Find why: the groups, then a reason filter.
    browser.goto(&c.at("/dlq")).await.unwrap();
    browser
        .wait_for_text("#matching", "105", WAIT)
        .await
        .unwrap();
    let groups = browser.text("#groups").await.unwrap();
    assert!(
        groups.contains("100 provider timeout after #s") && groups.contains("5 invalid input"),
        "{groups}"
    );
    browser.screenshot(shot("workbench.png")).await.unwrap();
    browser
        .fill(r#"input[name="reason"]"#, "missing field")
        .await
        .unwrap();
    browser.click("#apply").await.unwrap();
    browser.wait_for_text("#matching", "5", WAIT).await.unwrap();
    let rows = browser.text("#letters").await.unwrap();
    assert!(
        invalid.iter().all(|id| rows.contains(id.as_str())),
        "{rows}"
    );

    // Open one: properties, headers, the payload pretty-printed, the trace.
    browser.click("#letters td.id a").await.unwrap();
    browser
        .wait_for_text("#payload", "\"task\": \"notify\"", WAIT)
        .await
        .unwrap();
    assert!(browser
        .text("#reason")
        .await
        .unwrap()
        .contains("missing field `user`"));
    assert!(browser
        .text("#traceparent")
        .await
        .unwrap()
        .starts_with("00-"));
    let opened = browser.text("#message-id").await.unwrap();
    browser.screenshot(shot("message.png")).await.unwrap();

    // Delete that one.
    browser.click("#delete-one").await.unwrap();
    browser
        .wait_for_text("#job-outcome", "1 deleted", WAIT)
        .await
        .unwrap();

    // Replay the whole timeout group: one click shows it, one replays it.
    browser.goto(&c.at("/dlq")).await.unwrap();
    browser
        .wait_for_text("#matching", "104", WAIT)
        .await
        .unwrap();
    browser.click("#groups li:first-child a").await.unwrap();
    browser
        .wait_for_text("#matching", "100", WAIT)
        .await
        .unwrap();
    browser.click("#replay-matching").await.unwrap();
    browser
        .wait_for_text("#job-outcome", "100 replayed", WAIT)
        .await
        .unwrap();

    // Every replayed id is in the origin queue (confirmed there before it left the DLQ).
    {
        let b = b.clone();
        let llm = llm.clone();
        blocking(move || b.eventually(WAIT, "100 ready in tasks.llm", || b.ready(&llm) == 100))
            .await;
    }
    let arrived: BTreeSet<String> = {
        let llm = llm.clone();
        blocking(move || mgmt_peek(&llm, 200)).await
    }
    .iter()
    .filter_map(|m| m["properties"]["message_id"].as_str().map(str::to_string))
    .collect();
    let sent: BTreeSet<String> = timeouts.iter().cloned().collect();
    assert_eq!(arrived.len(), 100, "duplicates or extras in tasks.llm");
    assert_eq!(
        sent.difference(&arrived).count(),
        0,
        "lost: {:?}",
        sent.difference(&arrived)
    );

    // Purge is refused without the DLQ's name typed.
    browser.goto(&c.at("/dlq")).await.unwrap();
    browser.wait_for_text("#matching", "4", WAIT).await.unwrap();
    assert!(
        !browser
            .text("#letters")
            .await
            .unwrap()
            .contains(opened.as_str()),
        "deleted one gone"
    );
    browser.fill("#purge-confirm", "yes").await.unwrap();
    browser.click("#purge-button").await.unwrap();
    browser
        .wait_for_text("#error", "type the DLQ", WAIT)
        .await
        .unwrap();
    browser.goto(&c.at("/dlq")).await.unwrap();
    browser.wait_for_text("#matching", "4", WAIT).await.unwrap();
    browser.close().await.unwrap();
    drop(c);
    blocking(move || drop(b)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_mode_shows_no_action() {
    let b = Broker::new();
    b.run(&["topology", "apply"]).ok();
    let ids = seed_dead_letters(&b, &b.name("tasks.llm"), "boom", 3, "{}");
    let c = Console::start(&b, &["--read-only"]);
    let browser = Browser::start().await.unwrap();
    browser.goto(&c.at("/dlq")).await.unwrap();
    browser.wait_for_text("#matching", "3", WAIT).await.unwrap();
    browser
        .wait_for_text("#read-only", "read-only", WAIT)
        .await
        .unwrap();
    for sel in [
        "#replay-selected",
        "#replay-matching",
        "#delete-selected",
        "#delete-matching",
        "#purge-button",
        "input[type=checkbox]",
    ] {
        assert_eq!(
            browser.count(sel).await.unwrap(),
            0,
            "{sel} shown in read-only mode"
        );
    }
    browser
        .goto(&c.at(&format!("/dlq/message/{}", ids[0])))
        .await
        .unwrap();
    browser
        .wait_for_text("#reason", "boom", WAIT)
        .await
        .unwrap();
    assert_eq!(browser.count("#replay-one").await.unwrap(), 0);
    assert_eq!(browser.count("#delete-one").await.unwrap(), 0);
    browser.close().await.unwrap();
    drop(c);
    blocking(move || drop(b)).await;
}
