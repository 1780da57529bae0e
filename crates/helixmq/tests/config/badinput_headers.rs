//! Header values of every AMQP field type through RabbitMQ: those helixmq
//! writes come back equal (on RabbitMQ and on the embedded broker); those
//! another client writes decode as `message::amqp` documents; and what AMQP
//! cannot carry (names over 255 bytes, NaN and infinity, which RabbitMQ's
//! Erlang decoder crashes on, properties larger than one frame) is refused
//! clearly, before sending, without hurting the connection.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use helixmq::message::amqp::from_field_table;
use helixmq::topology::Queue;
use helixmq::{Broker, Config, Error, HeaderValue, Message, Topology};
use helixmq_testkit::broker;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;

/// One header of every `HeaderValue` variant, with edge values.
fn every_value() -> BTreeMap<String, HeaderValue> {
    let mut inner = BTreeMap::new();
    inner.insert("n".to_string(), HeaderValue::Int(-7));
    inner.insert(
        "deeper".to_string(),
        HeaderValue::Table(BTreeMap::from([(
            "list".to_string(),
            HeaderValue::Array(vec![HeaderValue::Void, HeaderValue::Bool(false)]),
        )])),
    );
    let mut h = BTreeMap::new();
    let mut put = |k: &str, v: HeaderValue| {
        h.insert(k.to_string(), v);
    };
    put("void", HeaderValue::Void);
    put("bool-true", HeaderValue::Bool(true));
    put("bool-false", HeaderValue::Bool(false));
    put("int-min", HeaderValue::Int(i64::MIN));
    put("int-max", HeaderValue::Int(i64::MAX));
    put("int-zero", HeaderValue::Int(0));
    put("float", HeaderValue::Float(-1.5e-300));
    put("float-max", HeaderValue::Float(f64::MAX));
    put("float-tiny", HeaderValue::Float(f64::MIN_POSITIVE / 4.0));
    put("float-neg-zero", HeaderValue::Float(-0.0));
    put("string", HeaderValue::String("héllo, 世界 🦀".into()));
    put("string-empty", HeaderValue::String(String::new()));
    put("string-nul", HeaderValue::String("a\0b".into()));
    put("string-long", HeaderValue::String("x".repeat(60_000)));
    put("bytes", HeaderValue::Bytes(vec![0, 0xff, 0xfe, 0x80, 1]));
    put("bytes-empty", HeaderValue::Bytes(Vec::new()));
    put("timestamp", HeaderValue::Timestamp(1_700_000_000));
    put("timestamp-zero", HeaderValue::Timestamp(0));
    put(
        "array",
        HeaderValue::Array(vec![
            HeaderValue::Int(1),
            HeaderValue::String("two".into()),
            HeaderValue::Float(3.0),
            HeaderValue::Table(inner.clone()),
            HeaderValue::Array(vec![]),
        ]),
    );
    put("array-empty", HeaderValue::Array(Vec::new()));
    put("table", HeaderValue::Table(inner));
    put("table-empty", HeaderValue::Table(BTreeMap::new()));
    put("ünïcode-name", HeaderValue::Int(1));
    put(
        &"k".repeat(255),
        HeaderValue::String("longest name AMQP allows".into()),
    );
    h
}

/// Publish a message with [`every_value`] headers and read it back.
async fn every_value_round_trips(b: &Broker) {
    let names = b.names().clone();
    let x = names.tasks_exchange();
    let q = names.task_queue("headers");
    let mut t = Topology::system(&names);
    t.exchanges.push(helixmq::topology::Exchange {
        name: x.clone(),
        kind: helixmq::topology::ExchangeKind::Direct,
        durable: true,
        alternate_exchange: None,
    });
    t.add_work_queue(Queue::durable(&q), &x, "headers");
    b.declare(&t).await.unwrap();

    let mut m = Message::new("headers");
    m.headers = every_value();
    b.publish(&x, "headers", m.clone()).await.unwrap();

    let mut got = broker::take(b, &q, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].id, m.id);
    for (k, v) in &m.headers {
        assert_eq!(got[0].headers.get(k), Some(v), "header '{k}' changed");
    }
    // publish starts a W3C trace when the message has none (a `traceparent`
    // header on the wire, the `traceparent` field here): nothing else is added.
    let tp = got[0]
        .traceparent
        .take()
        .expect("publish adds a traceparent");
    assert!(tp.starts_with("00-"), "{tp:?}");
    assert_eq!(got[0].headers, m.headers, "no header added or lost");
    assert_eq!(got[0], m, "the whole message round-trips");
    // -0.0 == 0.0 for PartialEq: check the sign survived too.
    match got[0].headers.get("float-neg-zero") {
        Some(HeaderValue::Float(f)) => assert!(f.is_sign_negative()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn rabbitmq_every_header_value_round_trips() {
    let p = broker::prefix();
    let b = broker::broker(broker::config(broker::HELIXAGENT, &p))
        .await
        .unwrap();
    every_value_round_trips(&b).await;
    broker::cleanup(&b, None).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn embedded_every_header_value_round_trips() {
    let mut c = Config::default();
    c.helixmq.prefix = broker::prefix().to_string();
    let b = Broker::embedded(c);
    every_value_round_trips(&b).await;
}

/// Another client (raw lapin) publishes every AMQP field type RabbitMQ knows;
/// helixmq decodes each as `message::amqp` documents: integers widen to `Int`,
/// floats to `Float`, decimals to their exact text, non-UTF-8 long strings to `Bytes`.
#[tokio::test]
async fn every_amqp_field_type_from_another_client_decodes() {
    let p = broker::prefix();
    let b = broker::broker(broker::config(broker::GUEST, &p))
        .await
        .unwrap();
    let q = format!("{p}.foreign");

    let conn = lapin::Connection::connect(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        ShortString::from(q.as_str()),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let cases: Vec<(&str, AMQPValue, HeaderValue)> = vec![
        ("t", AMQPValue::Boolean(true), HeaderValue::Bool(true)),
        ("b", AMQPValue::ShortShortInt(-128), HeaderValue::Int(-128)),
        ("B", AMQPValue::ShortShortUInt(255), HeaderValue::Int(255)),
        ("s", AMQPValue::ShortInt(-32768), HeaderValue::Int(-32768)),
        ("u", AMQPValue::ShortUInt(65535), HeaderValue::Int(65535)),
        (
            "I",
            AMQPValue::LongInt(i32::MIN),
            HeaderValue::Int(i32::MIN as i64),
        ),
        (
            "i",
            AMQPValue::LongUInt(u32::MAX),
            HeaderValue::Int(u32::MAX as i64),
        ),
        (
            "l",
            AMQPValue::LongLongInt(i64::MIN),
            HeaderValue::Int(i64::MIN),
        ),
        ("f", AMQPValue::Float(0.5), HeaderValue::Float(0.5)),
        ("d", AMQPValue::Double(-2.25), HeaderValue::Float(-2.25)),
        (
            "D",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
            HeaderValue::String("123.45".into()),
        ),
        (
            "S",
            AMQPValue::LongString(LongString::from(b"texte".to_vec())),
            HeaderValue::String("texte".into()),
        ),
        (
            "S-binary",
            AMQPValue::LongString(LongString::from(vec![0xffu8, 0x00, 0xc3])),
            HeaderValue::Bytes(vec![0xff, 0x00, 0xc3]),
        ),
        (
            "A",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::ShortShortInt(1),
                AMQPValue::Void,
            ])),
            HeaderValue::Array(vec![HeaderValue::Int(1), HeaderValue::Void]),
        ),
        (
            "T",
            AMQPValue::Timestamp(1_600_000_000),
            HeaderValue::Timestamp(1_600_000_000),
        ),
        (
            "F",
            AMQPValue::FieldTable({
                let mut t = FieldTable::default();
                t.insert(ShortString::from("k"), AMQPValue::ShortUInt(7));
                t
            }),
            HeaderValue::Table(BTreeMap::from([("k".to_string(), HeaderValue::Int(7))])),
        ),
        (
            "x",
            AMQPValue::ByteArray(ByteArray::from(vec![1u8, 2, 3])),
            HeaderValue::Bytes(vec![1, 2, 3]),
        ),
        ("V", AMQPValue::Void, HeaderValue::Void),
    ];
    let mut table = FieldTable::default();
    for (k, v, _) in &cases {
        table.insert(ShortString::from(*k), v.clone());
    }
    // The mapping itself, before the broker.
    let local = from_field_table(&table);
    for (k, _, want) in &cases {
        assert_eq!(local.get(*k), Some(want), "local decode of '{k}'");
    }
    ch.basic_publish(
        ShortString::from(""),
        ShortString::from(q.as_str()),
        BasicPublishOptions::default(),
        b"from another client",
        BasicProperties::default().with_headers(table),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let got = broker::take(&b, &q, 1, Duration::from_secs(10)).await;
    let m = &got[0];
    for (k, _, want) in &cases {
        assert_eq!(
            m.headers.get(*k),
            Some(want),
            "header '{k}' through RabbitMQ"
        );
    }
    assert_eq!(m.headers.len(), cases.len());
    // A foreign message has no helixmq id or attempt: it gets a fresh id and attempt 1.
    assert!(!m.id.is_empty());
    assert_eq!(m.attempt, 1);

    conn.close(200, ShortString::from("done")).await.unwrap();
    b.backend().delete_queue(&q).await.unwrap();
    b.close().await.unwrap();
}

/// What AMQP cannot carry is refused before anything is sent, with an error
/// saying what and why, and the connection is not disturbed.
#[tokio::test]
async fn headers_amqp_cannot_carry_are_refused_clearly() {
    let p = broker::prefix();
    let b = broker::broker(broker::config(broker::HELIXAGENT, &p))
        .await
        .unwrap();
    let names = b.names().clone();
    b.declare(&Topology::spec(&names)).await.unwrap();
    let x = names.tasks_exchange();
    let q = names.task_queue("background");

    // A header name over 255 bytes (AMQP short string).
    let m = Message::new("x").with_header("n".repeat(256), 1i64);
    let err = b.publish(&x, "background", m).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidMessage(t) if t.contains("header name") && t.contains("256 bytes") && t.contains("255")),
        "{err:?}"
    );
    // Same inside a nested table.
    let nested = HeaderValue::Table(BTreeMap::from([("m".repeat(300), HeaderValue::Void)]));
    let m = Message::new("x").with_header("outer", nested);
    let err = b.publish(&x, "background", m).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidMessage(t) if t.contains("300 bytes")),
        "{err:?}"
    );

    // Floats RabbitMQ cannot decode (Erlang has no NaN or infinity: its channel
    // would crash and take the connection down), at any depth.
    for (what, v) in [
        ("NaN", HeaderValue::Float(f64::NAN)),
        ("inf", HeaderValue::Float(f64::INFINITY)),
        ("-inf", HeaderValue::Float(f64::NEG_INFINITY)),
        (
            "nested NaN",
            HeaderValue::Array(vec![HeaderValue::Table(BTreeMap::from([(
                "deep".to_string(),
                HeaderValue::Float(f64::NAN),
            )]))]),
        ),
    ] {
        let started = Instant::now();
        let m = Message::new("x").with_header("measure", v);
        let err = b.publish(&x, "background", m).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: not at once"
        );
        assert!(
            matches!(&err, Error::InvalidMessage(t) if t.contains("header 'measure'") && t.contains("not a finite number")),
            "{what}: {err:?}"
        );
    }

    // Headers larger than one AMQP frame (frame_max 131072 here): the content
    // header must fit in a single frame, so this cannot be sent at all.
    let started = Instant::now();
    let m = Message::new("x").with_header("huge", "h".repeat(200_000));
    let id = m.id.clone();
    let err = b.publish(&x, "background", m).await.unwrap_err();
    eprintln!("oversized headers: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not after the publish timeout: {:?}",
        started.elapsed()
    );
    assert!(
        matches!(&err, Error::InvalidMessage(t) if t.contains(&id) && t.contains("frame_max") && t.contains("131072")),
        "expected InvalidMessage naming the message and the frame limit: {err:?}"
    );

    // Nothing was sent, nothing reached the queue, and the connection never dropped.
    let ok = Message::new("after");
    let ok_id = ok.id.clone();
    b.publish(&x, "background", ok).await.unwrap();
    let got = broker::take(&b, &q, 1, Duration::from_secs(10)).await;
    assert_eq!(got[0].id, ok_id);
    assert_eq!(b.backend().queue_stats(&q).await.unwrap().messages, 0);
    assert_eq!(
        b.metrics().connection_recoveries.get(),
        0,
        "a bad message must not cost a reconnect"
    );

    broker::cleanup(&b, Some(&Topology::spec(&names))).await;
    b.close().await.unwrap();
}
