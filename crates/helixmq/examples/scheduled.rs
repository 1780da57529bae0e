//! Scheduled tasks: `publish_delayed` and `publish_at` confirm at once and
//! deliver at their time (1 s to 30 days), without the delayed-message
//! plugin; a short delay never waits behind a long one.
//!
//! ```sh
//! cargo run -p helixmq --example scheduled                  # embedded broker
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ cargo run -p helixmq --example scheduled
//! ```

use std::time::{Duration, Instant, SystemTime};

use helixmq::{Broker, Error, Message, Outcome, SubscribeOptions, Topology};
use tokio::sync::mpsc;

#[tokio::main]
async fn main() -> helixmq::Result<()> {
    let config = helixmq::config::load(None, &Default::default())?;
    let broker = match std::env::var_os("RABBITMQ_URL") {
        Some(_) => Broker::connect(config).await?,
        None => Broker::embedded(config),
    };
    let names = broker.names().clone();
    // Declared through the broker, the destination's bindings are mirrored
    // where scheduled messages fall due.
    broker.declare(&Topology::spec(&names)).await?;
    let (tasks, queue) = (names.tasks_exchange(), names.task_queue("background"));
    let later = |text: &str| Message::new(text.to_string());

    // Published first, due last: it holds nothing back. This first scheduled
    // publish also declares the delay levels.
    let ten_minutes = Duration::from_secs(600);
    broker
        .publish_delayed(&tasks, "background", later("in ten minutes"), ten_minutes)
        .await?;
    let start = Instant::now();
    let (seen, mut rx) = mpsc::channel::<String>(8);
    let handler = move |m: Message, _ctx: helixmq::Context| {
        let seen = seen.clone();
        async move {
            let text = String::from_utf8_lossy(&m.payload).into_owned();
            let _ = seen
                .send(format!("{:>5.1?}  {text}", start.elapsed()))
                .await;
            Ok(Outcome::Ack)
        }
    };
    let sub = broker
        .subscribe(&queue, handler, SubscribeOptions::default())
        .await?;
    for (text, secs) in [("in three seconds", 3), ("in one second", 1)] {
        let delay = Duration::from_secs(secs);
        broker
            .publish_delayed(&tasks, "background", later(text), delay)
            .await?;
    }
    let at = SystemTime::now() + Duration::from_secs(2);
    broker
        .publish_at(&tasks, "background", later("at now + 2 s"), at)
        .await?;
    for _ in 0..3 {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(line)) => println!("{line}"),
            _ => return Err(Error::InvalidMessage("a task did not arrive".into())),
        }
    }
    let short = Duration::from_millis(10);
    if let Err(e) = broker
        .publish_delayed(&tasks, "background", later("x"), short)
        .await
    {
        println!("refused: {e}");
    }
    sub.shutdown(Duration::from_secs(5)).await;
    broker.close().await
}
