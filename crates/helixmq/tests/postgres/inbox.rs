//! The inbox: a message's effect, written in the handler's transaction, is
//! applied once — whichever worker gets the copies, across restarts — and a
//! rolled-back attempt leaves no trace and is retried.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use helixmq::inbox::Inbox;
use helixmq::{Broker, Message, Outcome, RetryPolicy, SubscribeOptions, Subscription};
use sqlx::PgPool;

use helixmq_testkit::postgres::{tag, Rabbit, TestDb, WORK};

async fn effects_table(pool: &PgPool) {
    sqlx::query("CREATE TABLE effects (message_id text NOT NULL, attempt int NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
}

/// A subscription whose handler writes one effect row in the inbox
/// transaction; `fail_first` makes every message's first attempt write its
/// row and then fail (rolled back).
async fn subscribe(
    broker: &Broker,
    queue: &str,
    pool: PgPool,
    runs: Arc<AtomicU32>,
    fail_first: bool,
) -> Subscription {
    let opts = SubscribeOptions {
        prefetch: Some(20),
        concurrency: Some(4),
        retry: Some(RetryPolicy {
            max_attempts: 5,
            delays: vec![Duration::from_secs(1)],
        }),
        ..Default::default()
    }
    .inbox_with(Inbox::new(pool));
    broker
        .subscribe(
            queue,
            move |m: Message, _ctx| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let tx = helixmq::inbox::transaction().ok_or("no inbox transaction")?;
                    sqlx::query("INSERT INTO effects VALUES ($1, $2)")
                        .bind(&m.id)
                        .bind(m.attempt as i32)
                        .execute(&mut *tx.conn().await?)
                        .await?;
                    if fail_first && m.attempt == 1 {
                        return Ok(Outcome::retry("first attempt fails after writing"));
                    }
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .expect("subscribe")
}

fn skipped(b: &Broker, queue: &str) -> u64 {
    b.metrics()
        .duplicates_skipped
        .get_or_create(&helixmq::metrics::QueueLabel {
            queue: queue.to_string(),
        })
        .get()
}

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Copies of one message to two workers, then to a third started after the
/// first two stopped: the handler runs once, the others are acked unrun.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_to_any_worker_and_after_restart_apply_once() {
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    effects_table(&db.pool).await;
    let publisher = rabbit.broker("publish").await;
    let (w1, w2) = (rabbit.broker("w1").await, rabbit.broker("w2").await);
    let runs = Arc::new(AtomicU32::new(0));
    let s1 = subscribe(
        &w1,
        &rabbit.queue,
        db.pool_named("w1", 4).await,
        runs.clone(),
        false,
    )
    .await;
    let s2 = subscribe(
        &w2,
        &rabbit.queue,
        db.pool_named("w2", 4).await,
        runs.clone(),
        false,
    )
    .await;
    let m = Message::new("pay 10");
    for _ in 0..6 {
        publisher
            .publish(&rabbit.exchange, WORK, m.clone())
            .await
            .unwrap();
    }
    let q = rabbit.queue.clone();
    wait_for("6 deliveries", Duration::from_secs(20), || {
        runs.load(Ordering::SeqCst) as u64 + skipped(&w1, &q) + skipped(&w2, &q) == 6
    })
    .await;
    s1.shutdown(Duration::from_secs(5)).await;
    s2.shutdown(Duration::from_secs(5)).await;
    // A restart: a new worker, a new connection, the same inbox table.
    let w3 = rabbit.broker("w3").await;
    let s3 = subscribe(
        &w3,
        &rabbit.queue,
        db.pool_named("w3", 4).await,
        runs.clone(),
        false,
    )
    .await;
    publisher
        .publish(&rabbit.exchange, WORK, m.clone())
        .await
        .unwrap();
    wait_for(
        "the copy after the restart",
        Duration::from_secs(20),
        || skipped(&w3, &q) == 1,
    )
    .await;
    s3.shutdown(Duration::from_secs(5)).await;
    let effects = db.count("SELECT count(*) FROM effects").await;
    let skipped_total = skipped(&w1, &q) + skipped(&w2, &q) + skipped(&w3, &q);
    println!(
        "inbox_copies: delivered=7 handler_runs={} effects={effects} skipped_by_inbox={skipped_total}",
        runs.load(Ordering::SeqCst)
    );
    assert_eq!(effects, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(skipped_total, 6);
    assert_eq!(db.count("SELECT count(*) FROM helixmq_inbox").await, 1);
    for b in [publisher, w1, w2, w3] {
        b.close().await.ok();
    }
}

/// An attempt that fails after writing is rolled back (no effect, no inbox
/// row) and retried through the retry route; the retry's effect stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_attempt_leaves_nothing_and_is_retried() {
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    effects_table(&db.pool).await;
    let b = rabbit.broker("w").await;
    let runs = Arc::new(AtomicU32::new(0));
    let s = subscribe(
        &b,
        &rabbit.queue,
        db.pool_named("w", 4).await,
        runs.clone(),
        true,
    )
    .await;
    let ids: Vec<String> = (0..10).map(|i| Message::new(format!("m{i}")).id).collect();
    for id in &ids {
        let mut m = Message::new("x");
        m.id = id.clone();
        b.publish(&rabbit.exchange, WORK, m).await.unwrap();
    }
    let pool = db.pool.clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM effects")
            .fetch_one(&pool)
            .await
            .unwrap();
        if n == 10 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "effects: {n} of 10");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.shutdown(Duration::from_secs(5)).await;
    let first = db
        .count("SELECT count(*) FROM effects WHERE attempt = 1")
        .await;
    let per_id = db
        .count("SELECT count(*) FROM (SELECT message_id FROM effects GROUP BY 1 HAVING count(*) = 1) x")
        .await;
    println!(
        "inbox_rollback: messages=10 handler_runs={} effects=10 first_attempt_effects={first}",
        runs.load(Ordering::SeqCst)
    );
    assert_eq!(first, 0, "a rolled-back attempt's effect stayed");
    assert_eq!(per_id, 10);
    assert_eq!(runs.load(Ordering::SeqCst), 20);
    b.close().await.ok();
}

/// Inbox rows older than the retention are deleted by the clean-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_old_inbox_rows() {
    let t = tag();
    let db = TestDb::new(&t).await;
    sqlx::query(
        "INSERT INTO helixmq_inbox (queue, message_id, processed_at) VALUES \
         ('q', 'old', now() - interval '8 days'), ('q', 'new', now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let inbox = Inbox::new(db.pool.clone());
    assert_eq!(
        inbox.cleanup().await.unwrap(),
        1,
        "default retention: 7 days"
    );
    assert!(inbox.contains("q", "new").await.unwrap());
    assert!(!inbox.contains("q", "old").await.unwrap());
    let short = Inbox::new(db.pool.clone()).retention(Duration::ZERO);
    assert_eq!(short.cleanup().await.unwrap(), 1);
}

/// The consumer's PostgreSQL connections terminated (`pg_terminate_backend`)
/// while handlers hold open inbox transactions: those attempts roll back (or
/// their commit is lost) and are retried; every message's effect is applied
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_transactions_are_retried_and_apply_once() {
    const MESSAGES: usize = 400;
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    effects_table(&db.pool).await;
    let b = rabbit.broker("w").await;
    // All queued first: the faults then hit a consumer that is busy throughout.
    for i in 0..MESSAGES {
        b.publish(&rabbit.exchange, WORK, Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let opts = SubscribeOptions {
        prefetch: Some(20),
        concurrency: Some(8),
        retry: Some(RetryPolicy {
            max_attempts: 20,
            delays: vec![Duration::from_secs(1)],
        }),
        ..Default::default()
    }
    .inbox(db.pool_named("consume", 8).await);
    let sub = b
        .subscribe(
            &rabbit.queue,
            move |m: Message, _ctx| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    let tx = helixmq::inbox::transaction().ok_or("no inbox transaction")?;
                    sqlx::query("INSERT INTO effects VALUES ($1, $2)")
                        .bind(&m.id)
                        .bind(m.attempt as i32)
                        .execute(&mut *tx.conn().await?)
                        .await?;
                    // Keep the transaction open long enough to be cut.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .unwrap();
    let mut terminated = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done = db
            .count("SELECT count(DISTINCT message_id) FROM effects")
            .await;
        if done as usize == MESSAGES {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "effects: {done} of {MESSAGES}"
        );
        // Five rounds, spread over the first half of the run.
        if terminated < 5 && runs.load(Ordering::SeqCst) as usize > terminated * 40 + 10 {
            terminated += db.terminate("consume").await.min(1);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sub.shutdown(Duration::from_secs(5)).await;
    let effects = db.count("SELECT count(*) FROM effects").await;
    let retried = db
        .count("SELECT count(*) FROM effects WHERE attempt > 1")
        .await;
    println!(
        "inbox_terminated: messages={MESSAGES} termination_rounds={terminated} handler_runs={} \
         effects={effects} effects_from_retries={retried} lost=0",
        runs.load(Ordering::SeqCst)
    );
    assert_eq!(terminated, 5, "the faults did not all happen");
    assert_eq!(effects as usize, MESSAGES, "an effect applied twice");
    b.close().await.ok();
}
