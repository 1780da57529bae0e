//! The outbox relay: what it publishes, what it never publishes, and in which order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use helixmq::outbox::{relay::relay_batch, Outbox, RelayOptions, Retention};
use helixmq::{Broker, Message, Outcome, SubscribeOptions, Subscription};
use sqlx::PgPool;

use helixmq_testkit::ledger::Ledger;
use helixmq_testkit::postgres::{tag, Rabbit, TestDb, WORK};

/// A relay that polls often: tests wait on it.
fn fast() -> RelayOptions {
    RelayOptions {
        idle_interval: Duration::from_millis(10),
        ..RelayOptions::default()
    }
}

/// A subscription that records every delivery in `ledger` (and, for the
/// ordering test, the payloads in delivery order).
async fn consume(
    broker: &Broker,
    queue: &str,
    ledger: Arc<Ledger>,
    order: Option<Arc<Mutex<Vec<String>>>>,
    concurrency: usize,
) -> Subscription {
    broker
        .subscribe(
            queue,
            move |m: Message, _ctx| {
                ledger.consumed(&m.id);
                if let Some(o) = &order {
                    o.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&m.payload).into_owned());
                }
                async { Ok(Outcome::Ack) }
            },
            SubscribeOptions {
                prefetch: Some(100),
                concurrency: Some(concurrency),
                ..Default::default()
            },
        )
        .await
        .expect("subscribe")
}

async fn business_table(pool: &PgPool) {
    sqlx::query("CREATE TABLE orders (id bigserial PRIMARY KEY, note text NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
}

/// One business transaction: an order row and its message; committed or rolled back.
async fn order(pool: &PgPool, exchange: &str, commit: bool, hold: Duration) -> (String, i64) {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders (note) VALUES ('x')")
        .execute(&mut *tx)
        .await
        .unwrap();
    let m = Message::new("order");
    let id = Outbox::enqueue(&mut tx, exchange, WORK, &m).await.unwrap();
    if !hold.is_zero() {
        tokio::time::sleep(hold).await;
    }
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
    (m.id, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_committed_rows_and_never_rolled_back_ones() {
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    business_table(&db.pool).await;
    let broker = rabbit.broker("relay").await;
    let ledger = Arc::new(Ledger::default());
    let sub = consume(&broker, &rabbit.queue, ledger.clone(), None, 8).await;
    let relay = Outbox::relay(db.pool_named("relay", 3).await, broker.clone(), fast());

    let (mut committed, mut rolled_back) = (Vec::new(), Vec::new());
    for i in 0..400u32 {
        let commit = !i.is_multiple_of(5);
        let (id, _) = order(&db.pool, &rabbit.exchange, commit, Duration::ZERO).await;
        if commit {
            committed.push(id);
        } else {
            rolled_back.push(id);
        }
    }
    let c = ledger
        .wait_consumed(&committed, Duration::from_secs(60))
        .await;
    assert_eq!(c.lost, 0, "committed rows never consumed: {c:?}");
    // The outbox is empty once every confirmed row was deleted.
    let report = relay.shutdown().await;
    assert_eq!(db.count("SELECT count(*) FROM helixmq_outbox").await, 0);
    let leaked = ledger.counts_of(&rolled_back).consumed;
    println!(
        "relay: committed={} rolled_back={} consumed={} lost={} duplicates={} rolled_back_consumed={leaked} relayed={}",
        committed.len(),
        rolled_back.len(),
        c.consumed,
        c.lost,
        c.duplicates,
        report.relayed
    );
    assert_eq!(leaked, 0, "a rolled-back row's message was published");
    assert_eq!(report.relayed, committed.len() as u64);
    assert_eq!(c.duplicates, 0, "no fault, so no copy");
    assert_eq!(
        db.count("SELECT count(*) FROM orders").await,
        committed.len() as i64
    );
    sub.shutdown(Duration::from_secs(5)).await;
    broker.close().await.ok();
}

/// A transaction that took its id first and commits last is not skipped:
/// while it is open, rows with higher ids commit and are relayed; then it
/// commits and its message is relayed too. Around it, writers commit with
/// random delays (more late commits) while two relays run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commit_is_never_skipped() {
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    business_table(&db.pool).await;
    let broker = rabbit.broker("relay").await;
    let ledger = Arc::new(Ledger::default());
    let sub = consume(&broker, &rabbit.queue, ledger.clone(), None, 8).await;
    let relays = [
        Outbox::relay(db.pool_named("relay", 3).await, broker.clone(), fast()),
        Outbox::relay(db.pool_named("relay", 3).await, broker.clone(), fast()),
    ];

    // The late transaction: id allocated now, commit at the very end.
    let mut late = db.pool.begin().await.unwrap();
    let late_msg = Message::new("late");
    let late_row = Outbox::enqueue(&mut late, &rabbit.exchange, WORK, &late_msg)
        .await
        .unwrap();

    // Writers with random hold times before commit: every one that holds
    // commits after rows with higher ids were visible (and relayed).
    let writers: Vec<_> = (0..6)
        .map(|_| {
            let pool = db.pool.clone();
            let exchange = rabbit.exchange.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..150 {
                    let hold = if rand::random::<u8>() < 40 {
                        Duration::from_millis(rand::random::<u64>() % 300)
                    } else {
                        Duration::ZERO
                    };
                    out.push(order(&pool, &exchange, true, hold).await);
                }
                out
            })
        })
        .collect();
    let mut rows = Vec::new();
    for w in writers {
        rows.extend(w.await.unwrap());
    }
    let ids: Vec<String> = rows.iter().map(|(m, _)| m.clone()).collect();
    let c = ledger.wait_consumed(&ids, Duration::from_secs(60)).await;
    assert_eq!(c.lost, 0, "rows committed around the late one: {c:?}");
    let above = rows.iter().filter(|(_, r)| *r > late_row).count();
    assert_eq!(above, rows.len(), "every other row has a higher id");
    // Everything above it went out; it is still invisible, not skipped.
    assert_eq!(ledger.times_consumed(&late_msg.id), 0);
    late.commit().await.unwrap();
    let c_late = ledger
        .wait_consumed(std::slice::from_ref(&late_msg.id), Duration::from_secs(30))
        .await;
    let mut relayed = 0;
    for r in relays {
        relayed += r.shutdown().await.relayed;
    }
    println!(
        "late_commit: rows={} late_row_id={late_row} rows_with_higher_id_relayed_first={above} \
         late_consumed={} lost={} duplicates={} relayed={relayed} skipped={}",
        rows.len() + 1,
        c_late.consumed,
        c.lost + c_late.lost,
        c.duplicates + c_late.duplicates,
        c_late.lost
    );
    assert_eq!(c_late.lost, 0, "the late-committed row was skipped");
    assert_eq!(db.count("SELECT count(*) FROM helixmq_outbox").await, 0);
    sub.shutdown(Duration::from_secs(5)).await;
    broker.close().await.ok();
}

/// Rows with the same ordering key reach the queue in the order their
/// transactions committed, with two relays of two workers each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_key_is_published_in_commit_order() {
    const KEYS: usize = 4;
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    sqlx::query("CREATE TABLE counters (key text PRIMARY KEY, n int NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    for k in 0..KEYS {
        sqlx::query("INSERT INTO counters VALUES ($1, 0)")
            .bind(format!("k{k}"))
            .execute(&db.pool)
            .await
            .unwrap();
    }
    let broker = rabbit.broker("relay").await;
    let ledger = Arc::new(Ledger::default());
    let order = Arc::new(Mutex::new(Vec::new()));
    // One handler at a time: the consumed order is the queue's order.
    let sub = consume(
        &broker,
        &rabbit.queue,
        ledger.clone(),
        Some(order.clone()),
        1,
    )
    .await;
    let relays = [
        Outbox::relay(db.pool_named("relay", 3).await, broker.clone(), fast()),
        Outbox::relay(db.pool_named("relay", 3).await, broker.clone(), fast()),
    ];
    let writers: Vec<_> = (0..6)
        .map(|_| {
            let pool = db.pool.clone();
            let exchange = rabbit.exchange.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for _ in 0..60 {
                    let key = format!("k{}", rand::random::<u32>() as usize % KEYS);
                    let mut tx = pool.begin().await.unwrap();
                    let m = Message::new("pending");
                    // The key's lock first, then the counter: n is the commit order.
                    let id_probe = Outbox::enqueue_ordered(&mut tx, &key, &exchange, WORK, &m)
                        .await
                        .unwrap();
                    let n: i32 = sqlx::query_scalar(
                        "UPDATE counters SET n = n + 1 WHERE key = $1 RETURNING n",
                    )
                    .bind(&key)
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                    sqlx::query("UPDATE helixmq_outbox SET payload = $1 WHERE id = $2")
                        .bind(format!("{key}:{n}").into_bytes())
                        .bind(id_probe)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    if rand::random::<u8>() < 60 {
                        tokio::time::sleep(Duration::from_millis(rand::random::<u64>() % 30)).await;
                    }
                    tx.commit().await.unwrap();
                    ids.push(m.id);
                }
                ids
            })
        })
        .collect();
    let mut ids = Vec::new();
    for w in writers {
        ids.extend(w.await.unwrap());
    }
    let c = ledger.wait_consumed(&ids, Duration::from_secs(90)).await;
    for r in relays {
        r.shutdown().await;
    }
    assert_eq!(c.lost, 0, "{c:?}");
    let mut last: HashMap<String, i32> = HashMap::new();
    let mut out_of_order = Vec::new();
    for p in order.lock().unwrap().iter() {
        let (k, n) = p.split_once(':').unwrap();
        let n: i32 = n.parse().unwrap();
        let prev = last.insert(k.to_string(), n).unwrap_or(0);
        if n <= prev {
            out_of_order.push(format!("{k}: {n} after {prev}"));
        }
    }
    println!(
        "ordering: rows={} keys={KEYS} consumed={} lost={} duplicates={} out_of_order={}",
        ids.len(),
        c.consumed,
        c.lost,
        c.duplicates,
        out_of_order.len()
    );
    assert!(out_of_order.is_empty(), "{out_of_order:?}");
    sub.shutdown(Duration::from_secs(5)).await;
    broker.close().await.ok();
}

/// Three relays on one outbox share its rows: each row is published once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_relays_publish_each_row_once() {
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    business_table(&db.pool).await;
    let broker = rabbit.broker("relay").await;
    let ledger = Arc::new(Ledger::default());
    let sub = consume(&broker, &rabbit.queue, ledger.clone(), None, 8).await;
    let mut relays = Vec::new();
    for _ in 0..3 {
        let opts = RelayOptions {
            batch_size: 50,
            ..fast()
        };
        relays.push(Outbox::relay(
            db.pool_named("relay", 3).await,
            broker.clone(),
            opts,
        ));
    }
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let pool = db.pool.clone();
            let exchange = rabbit.exchange.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for _ in 0..500 {
                    out.push(order(&pool, &exchange, true, Duration::ZERO).await.0);
                }
                out
            })
        })
        .collect();
    let mut ids = Vec::new();
    for w in writers {
        ids.extend(w.await.unwrap());
    }
    let c = ledger.wait_consumed(&ids, Duration::from_secs(60)).await;
    let mut shares = Vec::new();
    for r in relays {
        shares.push(r.shutdown().await.relayed);
    }
    println!(
        "several_relays: rows={} consumed={} lost={} duplicates={} relayed_by_each={shares:?}",
        ids.len(),
        c.consumed,
        c.lost,
        c.duplicates
    );
    assert_eq!(c.lost, 0);
    assert_eq!(c.duplicates, 0, "a row was published by two relays");
    assert_eq!(shares.iter().sum::<u64>(), ids.len() as u64);
    sub.shutdown(Duration::from_secs(5)).await;
    broker.close().await.ok();
}

/// `Retention::Keep` marks rows instead of deleting them; the clean-up deletes
/// them once older than the retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_rows_are_marked_then_cleaned_up() {
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    business_table(&db.pool).await;
    let broker = rabbit.broker("relay").await;
    for _ in 0..20 {
        order(&db.pool, &rabbit.exchange, true, Duration::ZERO).await;
    }
    let opts = RelayOptions {
        retention: Retention::Keep(Duration::from_secs(3600)),
        ..fast()
    };
    let b = relay_batch(&db.pool, &broker, &opts).await.unwrap();
    assert_eq!((b.taken, b.relayed, b.failed), (20, 20, 0));
    // Nothing pending any more: a second batch finds nothing.
    assert_eq!(
        relay_batch(&db.pool, &broker, &opts).await.unwrap().taken,
        0
    );
    assert_eq!(
        db.count("SELECT count(*) FROM helixmq_outbox WHERE published_at IS NOT NULL")
            .await,
        20
    );
    assert_eq!(Outbox::pending(&db.pool).await.unwrap().rows, 0);
    assert_eq!(
        Outbox::cleanup(&db.pool, Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(Outbox::cleanup(&db.pool, Duration::ZERO).await.unwrap(), 20);
    assert_eq!(db.count("SELECT count(*) FROM helixmq_outbox").await, 0);
    broker.close().await.ok();
}

/// A row whose publish fails (nothing bound to its routing key) stays, with
/// its error and a later `available_at`, and goes out once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_publish_is_kept_and_retried() {
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    let broker = rabbit.broker("relay").await;
    let mut tx = db.pool.begin().await.unwrap();
    let m = Message::new("nowhere yet");
    Outbox::enqueue(&mut tx, &rabbit.exchange, "unbound", &m)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let opts = fast();
    let b = relay_batch(&db.pool, &broker, &opts).await.unwrap();
    assert_eq!((b.taken, b.relayed, b.failed), (1, 0, 1));
    let (attempts, error): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM helixmq_outbox")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 1);
    assert!(error.contains("unroutable"), "{error}");
    let p = Outbox::pending(&db.pool).await.unwrap();
    assert_eq!((p.rows, p.failing), (1, 1));
    // Not due yet.
    assert_eq!(
        relay_batch(&db.pool, &broker, &opts).await.unwrap().taken,
        0
    );
    // A queue for the key appears; the next attempt (after 1 s) succeeds.
    let mut topo = rabbit.topology();
    topo.add_work_queue(
        helixmq::topology::Queue::durable(format!("{}.tasks.unbound", rabbit.prefix)),
        &rabbit.exchange,
        "unbound",
    );
    broker.declare(&topo).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let b = relay_batch(&db.pool, &broker, &opts).await.unwrap();
    assert_eq!((b.taken, b.relayed), (1, 1));
    assert_eq!(db.count("SELECT count(*) FROM helixmq_outbox").await, 0);
    broker.close().await.ok();
}
