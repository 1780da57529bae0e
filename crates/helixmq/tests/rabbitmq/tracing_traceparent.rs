//! W3C trace context travels from publisher to handler through the message
//! headers, on RabbitMQ and on the embedded broker, and the `publish` and
//! `handle` spans carry the ids operators search logs by.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use helixmq::{Broker, Config, Message, Outcome, RetryPolicy, SubscribeOptions, Topology};
use helixmq_testkit::broker;
use tokio::sync::mpsc;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Records every span's name and fields.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanRecord>>>);

/// A span's name and its fields as text.
type SpanRecord = (String, HashMap<String, String>);

struct Fields<'a>(&'a mut HashMap<String, String>);
impl Visit for Fields<'_> {
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(
            f.name().to_string(),
            format!("{v:?}").trim_matches('"').to_string(),
        );
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().to_string(), v.to_string());
    }
}

impl<S: tracing::Subscriber> Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        _: &tracing::Id,
        _: Context<'_, S>,
    ) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0
            .lock()
            .unwrap()
            .push((attrs.metadata().name().to_string(), fields));
    }
}

impl Spans {
    fn named(&self, name: &str, message_id: &str) -> Vec<HashMap<String, String>> {
        let all = self.0.lock().unwrap();
        all.iter()
            .filter(|(n, f)| {
                n == name && f.get("message_id").map(String::as_str) == Some(message_id)
            })
            .map(|(_, f)| f.clone())
            .collect()
    }
}

fn is_traceparent(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3] == "01"
        && parts[1..3]
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Publishes one message with a traceparent and one without; the handler fails
/// the second once so its retry is seen too. Returns after both were handled.
async fn propagate(broker: Broker, spans: Spans) {
    let names = broker.names().clone();
    broker.declare(&Topology::spec(&names)).await.unwrap();
    let queue = names.task_queue("background");
    let (tx, mut rx) = mpsc::channel::<(String, u32, Option<String>)>(16);
    let sub = broker
        .subscribe(
            &queue,
            move |m: Message, _ctx| {
                let tx = tx.clone();
                async move {
                    let tp = m.traceparent().map(str::to_string);
                    let _ = tx.send((m.id.clone(), m.attempt, tp)).await;
                    if m.kind.as_deref() == Some("flaky") && m.attempt == 1 {
                        return Ok(Outcome::retry("first attempt fails"));
                    }
                    Ok(Outcome::Ack)
                }
            },
            SubscribeOptions {
                retry: Some(RetryPolicy {
                    max_attempts: 3,
                    delays: vec![Duration::from_millis(300)],
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let traced = Message::new("traced").with_traceparent(given);
    let untraced = Message::new("untraced").with_kind("flaky");
    let (traced_id, untraced_id) = (traced.id.clone(), untraced.id.clone());
    let tasks = names.tasks_exchange();
    broker.publish(&tasks, "background", traced).await.unwrap();
    broker
        .publish(&tasks, "background", untraced)
        .await
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .expect("handler saw all deliveries in time")
            .unwrap();
        seen.push(got);
    }
    sub.shutdown(Duration::from_secs(5)).await;

    // The given traceparent reaches the handler unchanged.
    let t: Vec<_> = seen.iter().filter(|(id, _, _)| *id == traced_id).collect();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].2.as_deref(), Some(given));
    // A message published without one gets a valid one, kept across its retry.
    let u: Vec<_> = seen
        .iter()
        .filter(|(id, _, _)| *id == untraced_id)
        .collect();
    assert_eq!(u.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 2]);
    let generated = u[0].2.clone().expect("a traceparent was generated");
    assert!(is_traceparent(&generated), "{generated}");
    assert_eq!(
        u[1].2.as_deref(),
        Some(generated.as_str()),
        "retry keeps the trace"
    );

    // The spans carry the ids.
    let publish = spans.named("publish", &untraced_id);
    assert_eq!(publish.len(), 1, "one publish span");
    assert_eq!(publish[0]["traceparent"], generated);
    assert_eq!(publish[0]["routing_key"], "background");
    let handle = spans.named("handle", &untraced_id);
    assert_eq!(handle.len(), 2, "one handle span per attempt");
    for h in &handle {
        assert_eq!(h["traceparent"], generated);
        assert_eq!(h["queue"], queue);
    }
    assert_eq!(
        handle
            .iter()
            .map(|h| h["attempt"].clone())
            .collect::<Vec<_>>(),
        ["1", "2"]
    );
    assert_eq!(spans.named("handle", &traced_id)[0]["traceparent"], given);
}

fn capture() -> (Spans, tracing::subscriber::DefaultGuard) {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    (spans, tracing::subscriber::set_default(subscriber))
}

// current_thread runtimes: every task of the broker runs on the thread whose
// default subscriber records the spans.
#[tokio::test]
async fn traceparent_reaches_the_handler_on_the_embedded_broker() {
    let (spans, _g) = capture();
    let mut config = Config::default();
    config.helixmq.prefix = broker::prefix().to_string();
    propagate(Broker::embedded(config), spans).await;
}

#[tokio::test]
async fn traceparent_reaches_the_handler_through_rabbitmq() {
    let (spans, _g) = capture();
    let prefix = broker::prefix();
    let broker = broker::broker(broker::config(broker::GUEST, &prefix))
        .await
        .unwrap();
    propagate(broker.clone(), spans).await;
    broker::cleanup(&broker, None).await;
    broker.close().await.unwrap();
}
