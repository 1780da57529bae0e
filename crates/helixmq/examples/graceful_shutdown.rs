//! Graceful shutdown: stop taking messages, let the handlers in flight finish
//! within a deadline, settle them, then close. Whatever is still running at
//! the deadline is aborted and its message goes back to the queue, unacked.
//!
//! ```sh
//! cargo run -p helixmq --example graceful_shutdown                  # embedded broker
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ cargo run -p helixmq --example graceful_shutdown
//! ```

use std::time::Duration;

use helixmq::{Broker, Message, Outcome, SubscribeOptions, Topology};

#[tokio::main]
async fn main() -> helixmq::Result<()> {
    let config = helixmq::config::load(None, &Default::default())?;
    let broker = match std::env::var_os("RABBITMQ_URL") {
        Some(_) => Broker::connect(config).await?,
        None => Broker::embedded(config),
    };
    let names = broker.names().clone();
    broker.declare(&Topology::spec(&names)).await?;
    let queue = names.task_queue("verification");

    // Each job takes its payload's number of milliseconds.
    let handler = |m: Message, _ctx| async move {
        let ms: u64 = String::from_utf8_lossy(&m.payload).parse().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(Outcome::Ack)
    };
    let opts = SubscribeOptions {
        concurrency: Some(4),
        ..SubscribeOptions::default()
    };
    let sub = broker.subscribe(&queue, handler, opts).await?;
    for ms in [100, 200, 300, 10_000] {
        broker
            .publish(
                &names.tasks_exchange(),
                "verification",
                Message::new(ms.to_string()),
            )
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(50)).await; // let all four start

    // In a service: on SIGTERM. Here: now, with one second to finish.
    let report = sub.shutdown(Duration::from_secs(1)).await;
    println!(
        "drained {}, abandoned {} (back in the queue)",
        report.drained, report.abandoned
    );
    // RabbitMQ requeues it as the consumer's channel closes, a moment later.
    for _ in 0..50 {
        let left = broker.backend().queue_stats(&queue).await?.messages;
        if left > 0 {
            println!("{queue}: {left} message(s) ready again");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker.close().await
}
