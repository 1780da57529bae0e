//! Fault test of the outbox and the inbox end to end, with the relay as the
//! `helixmq outbox relay` process: 10,000 business rows each with its outbox
//! message (and 1,000 rolled-back ones), written while the relay is killed
//! with SIGKILL twice (and restarted), this test's RabbitMQ connections are
//! force-closed (`rabbitmqctl close_connection`) and its PostgreSQL
//! connections terminated (`pg_terminate_backend`). A consumer with the inbox
//! applies each message's effect in its transaction.
//!
//! Verdict: every committed row's message consumed (lost 0), none of a
//! rolled-back row, every effect exactly once; redeliveries reported.
//!
//! Here rather than in the library's `tests/postgres.rs`: killing a relay
//! with SIGKILL needs it in a process of its own, and only this crate's tests
//! have the `helixmq` binary (`CARGO_BIN_EXE_helixmq`).

use helixmq_testkit::postgres as kit;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use helixmq::inbox::Inbox;
use helixmq::outbox::Outbox;
use helixmq::{Message, Outcome, RetryPolicy, SubscribeOptions};
use helixmq_testkit::ledger::Ledger;
use kit::{tag, Rabbit, TestDb, WORK};

/// Committed business rows.
const ROWS: usize = 10_000;
/// Every this many transactions, one rolls back (on top of ROWS).
const ROLLBACK_EVERY: usize = 10;
/// Writers, paced together at about this many transactions per second.
const WRITERS: usize = 4;
const RATE: u64 = 1_000;

/// The relay process, its log in a file.
struct RelayProc {
    child: Child,
    log: std::path::PathBuf,
}

fn spawn_relay(db: &TestDb, rabbit: &Rabbit, config: &std::path::Path, n: usize) -> RelayProc {
    let log = std::env::temp_dir().join(format!("{}-relay-{n}.log", db.schema));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_helixmq"))
        .args(["--config", config.to_str().unwrap(), "outbox", "relay"])
        .args(["--database-url", &db.url("relay")])
        .args(["--connection-name", &rabbit.connection_name("relay")])
        .args(["--idle-interval", "10ms"])
        .env_remove("RABBITMQ_URL")
        .env_remove("HELIXMQ_PREFIX")
        .env("RUST_LOG", "helixmq=info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .expect("spawn helixmq outbox relay");
    RelayProc { child, log }
}

fn tail(path: &std::path::Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_and_connections_cut_lose_nothing_and_apply_once() {
    let t = tag();
    let db = TestDb::new(&t).await;
    let rabbit = Rabbit::new(&t);
    sqlx::query("CREATE TABLE orders (id bigserial PRIMARY KEY, message_id text NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("CREATE TABLE effects (message_id text NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    let config = std::env::temp_dir().join(format!("{t}-messaging.yaml"));
    std::fs::write(
        &config,
        format!(
            "rabbitmq:\n  host: 127.0.0.1\n  port: 5672\n  username: guest\n  password: guest\n  \
             vhost: /\n  reconnect_delay: 200ms\n  max_reconnect_attempts: 0\n  publish_timeout: 30s\n\
             helixmq:\n  prefix: {}\n",
            rabbit.prefix
        ),
    )
    .unwrap();

    // The consumer: effects written in the inbox transaction.
    let consumer = rabbit.broker("consume").await;
    let runs = Arc::new(Ledger::default());
    let opts = SubscribeOptions {
        prefetch: Some(100),
        concurrency: Some(8),
        retry: Some(RetryPolicy {
            max_attempts: 50,
            delays: vec![Duration::from_secs(1)],
        }),
        ..Default::default()
    }
    .inbox_with(Inbox::new(db.pool_named("consume", 10).await));
    let r = runs.clone();
    let sub = consumer
        .subscribe(
            &rabbit.queue,
            move |m: Message, _ctx| {
                r.consumed(&m.id);
                async move {
                    let tx = helixmq::inbox::transaction().ok_or("no inbox transaction")?;
                    sqlx::query("INSERT INTO effects VALUES ($1)")
                        .bind(&m.id)
                        .execute(&mut *tx.conn().await?)
                        .await?;
                    Ok(Outcome::Ack)
                }
            },
            opts,
        )
        .await
        .expect("subscribe");

    let mut relay = spawn_relay(&db, &rabbit, &config, 0);

    // Writers: one business row and its message per transaction, paced.
    let committed = Arc::new(AtomicUsize::new(0));
    let writer_pool = db.pool_named("writer", WRITERS as u32).await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let pool = writer_pool.clone();
            let exchange = rabbit.exchange.clone();
            let committed = committed.clone();
            tokio::spawn(async move {
                let (mut ok, mut rolled) = (Vec::new(), Vec::new());
                let mut tick =
                    tokio::time::interval(Duration::from_micros(1_000_000 * WRITERS as u64 / RATE));
                let mine = ROWS / WRITERS;
                let mut i = 0usize;
                while ok.len() < mine {
                    tick.tick().await;
                    i += 1;
                    let rollback = (i + w).is_multiple_of(ROLLBACK_EVERY);
                    let m = Message::new(format!("order {w}-{i}"));
                    let mut tx = pool.begin().await.unwrap();
                    sqlx::query("INSERT INTO orders (message_id) VALUES ($1)")
                        .bind(&m.id)
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    Outbox::enqueue(&mut tx, &exchange, WORK, &m).await.unwrap();
                    if rollback {
                        tx.rollback().await.unwrap();
                        rolled.push(m.id);
                    } else {
                        tx.commit().await.unwrap();
                        ok.push(m.id);
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                (ok, rolled)
            })
        })
        .collect();

    // Faults, each once the writers got that far: SIGKILL at 20 % and 70 %.
    let mut kills = 0;
    let mut closed = 0;
    let mut terminated = 0;
    let mut relays_started = 1;
    let plan = [
        (1_500, "kill"),
        (3_000, "close"),
        (4_500, "terminate"),
        (6_500, "kill"),
        (8_000, "close"),
        (9_000, "terminate"),
    ];
    for (at, what) in plan {
        while committed.load(Ordering::Relaxed) < at {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match what {
            "kill" => {
                relay.child.kill().expect("SIGKILL the relay");
                let status = relay.child.wait().unwrap();
                assert!(!status.success(), "the relay was killed: {status:?}");
                kills += 1;
                relay = spawn_relay(&db, &rabbit, &config, relays_started);
                relays_started += 1;
            }
            "close" => {
                let names = [
                    rabbit.connection_name("relay"),
                    rabbit.connection_name("consume"),
                ];
                let n = tokio::task::spawn_blocking(move || {
                    names
                        .iter()
                        .map(|n| kit::close_connections_named(n))
                        .sum::<usize>()
                })
                .await
                .unwrap();
                assert!(n >= 2, "{n} RabbitMQ connections of ours to close");
                closed += n;
            }
            _ => {
                let n = db.terminate("relay").await + db.terminate("consume").await;
                assert!(n >= 1, "no PostgreSQL connection of ours to terminate");
                terminated += n;
            }
        }
    }
    let (mut ok, mut rolled) = (Vec::new(), Vec::new());
    for w in writers {
        let (o, r) = w.await.unwrap();
        ok.extend(o);
        rolled.extend(r);
    }
    let written = Instant::now();

    // Every committed row's effect, exactly once.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut applied = 0;
    while Instant::now() < deadline {
        applied = db
            .count("SELECT count(DISTINCT message_id) FROM effects")
            .await;
        if applied as usize >= ok.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let drained = written.elapsed();
    // Let redeliveries still on their way arrive before counting them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = relay.child.kill();
    let _ = relay.child.wait();
    sub.shutdown(Duration::from_secs(10)).await;

    let c = runs.counts_of(&ok);
    let leaked = runs.counts_of(&rolled).consumed;
    let effects = db.count("SELECT count(*) FROM effects").await;
    let twice = db
        .count("SELECT count(*) FROM (SELECT message_id FROM effects GROUP BY 1 HAVING count(*) > 1) x")
        .await;
    let rolled_effects = {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM effects e WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.message_id = e.message_id)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        n
    };
    let skipped = consumer
        .metrics()
        .duplicates_skipped
        .get_or_create(&helixmq::metrics::QueueLabel {
            queue: rabbit.queue.clone(),
        })
        .get();
    let pending = Outbox::pending(&db.pool).await.unwrap().rows;
    println!(
        "outbox_fault: committed={} rolled_back={} consumed={} lost={} rolled_back_consumed={leaked} \
         effects={effects} effects_twice={twice} effects_of_rolled_back={rolled_effects} \
         handler_reruns={} skipped_by_inbox={skipped} duplicates_delivered={} \
         relay_sigkills={kills} rabbit_connections_closed={closed} pg_backends_terminated={terminated} \
         outbox_pending={pending} drain_after_writes_ms={}",
        ok.len(),
        rolled.len(),
        c.consumed,
        ok.len() - applied as usize,
        c.duplicates,
        c.duplicates + skipped,
        drained.as_millis()
    );
    if applied as usize != ok.len() {
        eprintln!("last relay log:\n{}", tail(&relay.log));
    }
    assert_eq!(
        applied as usize,
        ok.len(),
        "lost: committed rows without effect"
    );
    assert_eq!(c.lost, 0);
    assert_eq!(leaked, 0, "a rolled-back row's message was delivered");
    assert_eq!(rolled_effects, 0);
    assert_eq!(twice, 0, "an effect was applied more than once");
    assert_eq!(effects as usize, ok.len());
    assert_eq!(kills, 2);
    assert_eq!(pending, 0);
    consumer.close().await.ok();
    let _ = std::fs::remove_file(&config);
    for n in 0..relays_started {
        let _ = std::fs::remove_file(std::env::temp_dir().join(format!("{t}-relay-{n}.log")));
    }
}
