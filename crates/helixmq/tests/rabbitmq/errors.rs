//! Each failure the spec's troubleshooting table names gives its own error
//! variant with a readable message, against the local RabbitMQ.

use std::time::{Duration, Instant};

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::topology::{Exchange, ExchangeKind, Queue};
use helixmq::{Error, Message, Metrics, PublishOptions, Topology};
use helixmq_testkit::broker::*;

fn empty(prefix: &str) -> Topology {
    let mut t = Topology::system(&helixmq::Names::new(prefix));
    t.exchanges.clear();
    t.queues.clear();
    t.bindings.clear();
    t
}

#[tokio::test]
async fn wrong_password_is_access_refused_at_once() {
    let cfg = config(("guest", "not-the-password"), &prefix());
    let started = Instant::now();
    let err = RabbitBackend::connect(&cfg.rabbitmq, Metrics::default())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no retry loop: took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, Error::AccessRefused { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("access refused")
            && msg.contains("'guest'")
            && msg.contains("RABBITMQ_PASSWORD"),
        "{msg}"
    );
    assert!(!msg.contains("not-the-password"), "password leaked: {msg}");
}

#[tokio::test]
async fn unknown_vhost_is_vhost_not_allowed() {
    let mut cfg = config(GUEST, &prefix());
    cfg.rabbitmq.vhost = "helixmq-no-such-vhost".into();
    let err = RabbitBackend::connect(&cfg.rabbitmq, Metrics::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::VhostNotAllowed { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("'helixmq-no-such-vhost'") && msg.contains("add_vhost"),
        "{msg}"
    );
}

#[tokio::test]
async fn nothing_listening_is_connection_refused_naming_the_address() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = config(GUEST, &prefix());
    cfg.rabbitmq.port = port;
    let err = RabbitBackend::connect(&cfg.rabbitmq, Metrics::default())
        .await
        .unwrap_err();
    match &err {
        Error::ConnectionRefused { host, port: p, .. } => {
            assert_eq!(host, "127.0.0.1");
            assert_eq!(*p, port);
        }
        other => panic!("expected ConnectionRefused, got {other:?}"),
    }
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[tokio::test]
async fn inequivalent_queue_arguments_are_precondition_failed_and_the_backend_keeps_working() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let name = format!("{p}.prio");
    let mut first = empty(&p);
    first.queues.push(Queue::durable(&name).max_priority(5));
    b.declare(&first).await.unwrap();
    // The same declaration again is fine (idempotent).
    b.declare(&first).await.unwrap();

    let mut second = empty(&p);
    second.queues.push(Queue::durable(&name).max_priority(10));
    let err = b.backend().declare(&second).await.unwrap_err();
    match &err {
        Error::PreconditionFailed {
            kind,
            name: n,
            detail,
        } => {
            assert_eq!(*kind, "queue");
            assert_eq!(n, &name);
            assert!(detail.contains("x-max-priority"), "{detail}");
        }
        other => panic!("expected PreconditionFailed, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&name) && msg.contains("x-max-priority") && msg.contains("delete"),
        "{msg}"
    );

    // The channel the 406 closed is replaced: later operations work.
    assert_eq!(b.backend().queue_stats(&name).await.unwrap().messages, 0);
    b.backend().delete_queue(&name).await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn unroutable_mandatory_publish_is_reported() {
    let p = prefix();
    let b = broker(config(GUEST, &p)).await.unwrap();
    let x = format!("{p}.nowhere");
    let mut t = empty(&p);
    t.exchanges.push(Exchange {
        name: x.clone(),
        kind: ExchangeKind::Direct,
        durable: false,
        alternate_exchange: None,
    });
    b.declare(&t).await.unwrap();

    let m = Message::new("lost?");
    let id = m.id.clone();
    let err = b.publish(&x, "no-such-key", m).await.unwrap_err();
    match &err {
        Error::Unroutable {
            message_id,
            exchange,
            routing_key,
        } => {
            assert_eq!(message_id, &id);
            assert_eq!(exchange, &x);
            assert_eq!(routing_key, "no-such-key");
        }
        other => panic!("expected Unroutable, got {other:?}"),
    }
    assert!(
        err.to_string().contains("unroutable") && err.to_string().contains(&x),
        "{err}"
    );

    // Not mandatory: the broker accepts (and drops) it, as AMQP says.
    let opts = PublishOptions {
        mandatory: false,
        ..Default::default()
    };
    b.publish_with(&x, "no-such-key", Message::new("dropped"), &opts)
        .await
        .unwrap();

    // A missing exchange is NotFound, and the publisher channel it killed is replaced.
    let err = b
        .publish(&format!("{p}.missing"), "k", Message::new("x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { kind: "exchange", name } if name == &format!("{p}.missing")),
        "{err:?}"
    );
    assert!(err.to_string().contains("not found"), "{err}");
    let err = b.publish(&x, "again", Message::new("y")).await.unwrap_err();
    assert!(matches!(err, Error::Unroutable { .. }), "{err:?}");

    cleanup(&b, Some(&t)).await;
    b.close().await.unwrap();
}

#[tokio::test]
async fn a_user_without_permissions_gets_access_refused() {
    let p = prefix();
    let b = broker(config(NOPERM, &p))
        .await
        .expect("hx_noperm may connect to / (run scripts/provision)");
    let mut t = empty(&p);
    t.exchanges.push(Exchange {
        name: format!("{p}.x"),
        kind: ExchangeKind::Direct,
        durable: true,
        alternate_exchange: None,
    });
    let err = b.backend().declare(&t).await.unwrap_err();
    assert!(
        matches!(&err, Error::AccessRefused { user: Some(u), .. } if u == "hx_noperm"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("access refused")
            && msg.contains("hx_noperm")
            && msg.contains(&format!("{p}.x")),
        "{msg}"
    );

    // Publishing is refused too, as its own clear error, not a timeout.
    let started = Instant::now();
    let err = b
        .publish("amq.direct", "k", Message::new("x"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::AccessRefused { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    b.close().await.unwrap();
}
