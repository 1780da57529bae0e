//! The transactional outbox and the inbox: an order row and its task commit
//! together, the relay publishes the task, and the worker's effect (marking
//! the order shipped) is applied once even when the task arrives twice.
//!
//! Needs PostgreSQL; uses a schema of its own (`outbox_example`, dropped at
//! the end) and the embedded broker unless `RABBITMQ_URL` is set.
//!
//! ```sh
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/helixmq_test \
//!   cargo run -p helixmq --features postgres --example outbox
//! ```

use std::time::Duration;

use helixmq::inbox::Inbox;
use helixmq::outbox::{Outbox, RelayOptions};
use helixmq::{Broker, Message, Outcome, SubscribeOptions, Topology};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

#[tokio::main]
async fn main() -> Result<(), helixmq::BoxError> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/helixmq_test".into());
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await?;
    sqlx::query("DROP SCHEMA IF EXISTS outbox_example CASCADE")
        .execute(&admin)
        .await?;
    sqlx::query("CREATE SCHEMA outbox_example")
        .execute(&admin)
        .await?;
    let opts: PgConnectOptions = url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(5)
        .connect_with(opts.options([("search_path", "outbox_example")]))
        .await?;
    Outbox::migrate(&pool).await?; // helixmq_outbox, helixmq_inbox
    sqlx::query("CREATE TABLE orders (id bigint PRIMARY KEY, shipped int NOT NULL DEFAULT 0)")
        .execute(&pool)
        .await?;

    let config = helixmq::config::load(None, &Default::default())?;
    let broker = match std::env::var_os("RABBITMQ_URL") {
        Some(_) => Broker::connect(config).await?,
        None => Broker::embedded(config),
    };
    let names = broker.names().clone();
    broker.declare(&Topology::spec(&names)).await?;

    // 1. The service: the order and its task in one transaction.
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders (id) VALUES (42)")
        .execute(&mut *tx)
        .await?;
    let task = Message::json(&serde_json::json!({"ship": 42}))?;
    Outbox::enqueue(&mut tx, &names.tasks_exchange(), "background", &task).await?;
    tx.commit().await?; // no commit, no task; commit, and the task will go out

    // A rolled-back order leaves no task behind.
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO orders (id) VALUES (43)")
        .execute(&mut *tx)
        .await?;
    let ghost = Message::json(&serde_json::json!({"ship": 43}))?;
    Outbox::enqueue(&mut tx, &names.tasks_exchange(), "background", &ghost).await?;
    tx.rollback().await?;

    // 2. The relay: committed rows → confirmed publishes → rows deleted.
    let relay = Outbox::relay(pool.clone(), broker.clone(), RelayOptions::default());

    // 3. The worker: its effect in the inbox transaction, committed on Ack.
    let sub = broker
        .subscribe(
            &names.task_queue("background"),
            |m: Message, _ctx| async move {
                let order: serde_json::Value = m.parse_json()?;
                let tx = helixmq::inbox::transaction().ok_or("no inbox")?;
                sqlx::query("UPDATE orders SET shipped = shipped + 1 WHERE id = $1")
                    .bind(order["ship"].as_i64())
                    .execute(&mut *tx.conn().await?)
                    .await?;
                println!("shipped order {}", order["ship"]);
                Ok(Outcome::Ack)
            },
            SubscribeOptions::default().inbox_with(Inbox::new(pool.clone())),
        )
        .await?;

    // The same task once more, as a relay restarted after a crash would send
    // it: acked without running the handler (counted as a skipped duplicate).
    broker
        .publish(&names.tasks_exchange(), "background", task.clone())
        .await?;
    let skipped = broker
        .metrics()
        .duplicates_skipped
        .get_or_create(&helixmq::metrics::QueueLabel {
            queue: names.task_queue("background"),
        })
        .clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while skipped.get() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the copy never arrived"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let shipped: i32 = sqlx::query_scalar("SELECT shipped FROM orders WHERE id = 42")
        .fetch_one(&pool)
        .await?;
    let pending = Outbox::pending(&pool).await?;
    println!(
        "order 42 shipped {shipped} time(s) from 2 deliveries; order 43 rolled back, never sent; outbox pending {}",
        pending.rows
    );
    assert_eq!(shipped, 1);

    sub.shutdown(Duration::from_secs(5)).await;
    relay.shutdown().await;
    broker.close().await?;
    pool.close().await;
    sqlx::query("DROP SCHEMA outbox_example CASCADE")
        .execute(&admin)
        .await?;
    Ok(())
}
