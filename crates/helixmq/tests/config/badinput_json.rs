//! Bad JSON where a handler expects JSON: the message goes to the DLQ with the
//! parse error as its reason, on its first attempt (retrying cannot fix bad
//! input), and the subscription goes on handling the next good message.
//! Run on RabbitMQ (as the least-privilege user) and on the embedded broker.
//!
//! The recommended handler pattern is [`handle_llm_request`]: decode with
//! `Message::parse_json`, and answer `Outcome::DeadLetter(parse error)` when
//! it fails.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use helixmq::message::header;
use helixmq::{
    BoxError, Broker, Config, Context, Message, Outcome, RetryPolicy, SubscribeOptions, Topology,
};
use helixmq_testkit::broker;
use serde::Deserialize;
use tokio::sync::mpsc;

/// What the llm queue's producers are supposed to send.
#[derive(Debug, Deserialize)]
struct LlmRequest {
    prompt: String,
    max_tokens: u32,
}

/// The recommended pattern for a handler that expects JSON.
async fn handle_llm_request(
    message: Message,
    done: mpsc::Sender<(String, LlmRequest)>,
) -> Result<Outcome, BoxError> {
    let request: LlmRequest = match message.parse_json() {
        Ok(r) => r,
        // Bad input does not get better by retrying: straight to the DLQ, with
        // the parse error (it names the message and the position) as the reason.
        Err(e) => return Ok(Outcome::DeadLetter(e.to_string())),
    };
    // ... the real work would go here ...
    done.send((message.id, request)).await?;
    Ok(Outcome::Ack)
}

/// Each bad payload, and a fragment of the serde error it must produce.
const BAD: &[(&str, &[u8], &str)] = &[
    (
        "not json",
        b"hello, world",
        "expected value at line 1 column 1",
    ),
    ("empty", b"", "EOF while parsing a value"),
    (
        "truncated",
        br#"{"prompt":"hi","max_tokens":"#,
        "EOF while parsing a value",
    ),
    (
        "wrong type",
        br#"{"prompt":5,"max_tokens":1}"#,
        "invalid type: integer `5`, expected a string",
    ),
    (
        "missing field",
        br#"{"prompt":"hi"}"#,
        "missing field `max_tokens`",
    ),
    (
        "out of range",
        br#"{"prompt":"hi","max_tokens":-1}"#,
        "invalid value: integer `-1`",
    ),
    (
        "invalid utf-8",
        b"{\"prompt\":\"\xff\xfe\",\"max_tokens\":1}",
        "invalid unicode code point",
    ),
    (
        // serde reads a struct from an array positionally: the first field is wrong.
        "array",
        b"[1,2,3]",
        "invalid type: integer `1`, expected a string",
    ),
    (
        "json string",
        br#""just text""#,
        "invalid type: string \"just text\", expected struct LlmRequest",
    ),
    (
        "trailing garbage",
        br#"{"prompt":"hi","max_tokens":1} and more"#,
        "trailing characters",
    ),
];

async fn bad_json_goes_to_the_dlq_and_the_subscription_keeps_running(b: Broker) {
    let names = b.names().clone();
    b.declare(&Topology::spec(&names)).await.unwrap();
    let exchange = names.tasks_exchange();
    let queue = names.task_queue("llm");
    let dlq = names.dlq();

    let (tx, mut good) = mpsc::channel(16);
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let sub = b
        .subscribe(
            &queue,
            move |m: Message, _ctx: Context| {
                counted.fetch_add(1, Ordering::SeqCst);
                handle_llm_request(m, tx.clone())
            },
            SubscribeOptions {
                prefetch: Some(4),
                retry: Some(RetryPolicy {
                    max_attempts: 3,
                    delays: vec![Duration::from_secs(1)],
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();

    let mut bad_ids = Vec::new();
    for (i, (case, payload, _)) in BAD.iter().enumerate() {
        let mut m = Message::new(payload.to_vec()).with_header("case", *case);
        m.content_type = Some("application/json".into());
        bad_ids.push(m.id.clone());
        b.publish(&exchange, "llm", m).await.unwrap();

        // The next good message is handled: the bad one did not stop the subscription.
        let ok =
            Message::json(&serde_json::json!({"prompt": format!("good {i}"), "max_tokens": i}))
                .unwrap();
        let ok_id = ok.id.clone();
        b.publish(&exchange, "llm", ok).await.unwrap();
        let (id, req) = tokio::time::timeout(Duration::from_secs(20), good.recv())
            .await
            .unwrap_or_else(|_| panic!("good message after '{case}' not handled within 20 s"))
            .expect("handler alive");
        assert_eq!(id, ok_id);
        assert_eq!(req.prompt, format!("good {i}"));
        assert_eq!(req.max_tokens as usize, i);
        assert!(sub.is_active(), "subscription stopped after '{case}'");
    }

    let dead = broker::take(&b, &dlq, BAD.len(), Duration::from_secs(20)).await;
    for m in &dead {
        let case = m.header_str("case").expect("case header kept");
        let (_, payload, fragment) = BAD.iter().find(|(c, _, _)| *c == case).unwrap();
        assert!(bad_ids.contains(&m.id), "unexpected DLQ message {m:?}");
        assert_eq!(&m.payload[..], *payload, "{case}: payload kept as sent");
        let reason = m
            .header_str(header::DEAD_LETTER_REASON)
            .unwrap_or_else(|| panic!("{case}: no dead-letter reason in {:?}", m.headers));
        assert!(
            reason.contains(&format!(
                "payload of message {} is not the expected JSON",
                m.id
            )) && reason.contains(fragment),
            "{case}: reason should carry the parse error '{fragment}': {reason}"
        );
        assert_eq!(m.header_str(header::LAST_ERROR), Some(reason));
        assert_eq!(m.header_str(header::ORIGIN_QUEUE), Some(queue.as_str()));
        assert_eq!(m.attempt, 1, "{case}: bad input must not be retried");
    }

    // Every message ran the handler exactly once: nothing retried, nothing lost.
    assert_eq!(calls.load(Ordering::SeqCst), 2 * BAD.len());
    assert_eq!(b.backend().queue_stats(&queue).await.unwrap().messages, 0);
    assert_eq!(b.backend().queue_stats(&dlq).await.unwrap().messages, 0);
    assert!(sub.is_active());
    let report = sub.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.abandoned, 0);
}

#[tokio::test]
async fn rabbitmq_bad_json_goes_to_the_dlq_and_the_subscription_keeps_running() {
    let p = broker::prefix();
    let b = broker::broker(broker::config(broker::HELIXAGENT, &p))
        .await
        .expect("connect as helixagent (run scripts/provision)");
    bad_json_goes_to_the_dlq_and_the_subscription_keeps_running(b.clone()).await;
    broker::cleanup(&b, Some(&Topology::spec(b.names()))).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn embedded_bad_json_goes_to_the_dlq_and_the_subscription_keeps_running() {
    let mut c = Config::default();
    c.helixmq.prefix = broker::prefix().to_string();
    let b = Broker::embedded(c);
    bad_json_goes_to_the_dlq_and_the_subscription_keeps_running(b.clone()).await;
    b.close().await.unwrap();
}
