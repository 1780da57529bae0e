//! Confirmed publishing: `publish` returns `Ok` only once the broker confirmed
//! the message; a nack, an unroutable message or a timeout is an error you can
//! act on.
//!
//! ```sh
//! cargo run -p helixmq --example publish_confirmed                  # embedded broker
//! RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ cargo run -p helixmq --example publish_confirmed
//! ```

use helixmq::{Broker, Error, Message, Priority, PublishOptions, Topology};

#[tokio::main]
async fn main() -> helixmq::Result<()> {
    let config = helixmq::config::load(None, &Default::default())?;
    let broker = match std::env::var_os("RABBITMQ_URL") {
        Some(_) => Broker::connect(config).await?,
        None => Broker::embedded(config),
    };
    let names = broker.names().clone();
    broker.declare(&Topology::spec(&names)).await?;

    // One message, confirmed before `publish` returns.
    let request = Message::json(&serde_json::json!({"prompt": "summarise the debate"}))?
        .with_priority(Priority::HIGH);
    let id = request.id.clone();
    broker
        .publish(&names.tasks_exchange(), "llm", request)
        .await?;
    println!("confirmed {id} on {}", names.task_queue("llm"));

    // Many at once: all sent, then every confirm awaited; one result each.
    let batch: Vec<Message> = (0..100).map(|i| Message::new(format!("job {i}"))).collect();
    let results = broker
        .publish_batch(
            &names.tasks_exchange(),
            "background",
            &batch,
            &PublishOptions::default(),
        )
        .await;
    let confirmed = results.iter().filter(|r| r.is_ok()).count();
    println!("batch: {confirmed} of {} confirmed", batch.len());

    // A routing key no queue is bound to: mandatory publishes say so.
    match broker
        .publish(
            &names.tasks_exchange(),
            "no-such-route",
            Message::new("lost?"),
        )
        .await
    {
        Err(Error::Unroutable { routing_key, .. }) => {
            println!("unroutable, as expected: routing key '{routing_key}' reaches no queue")
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }

    broker.close().await
}
