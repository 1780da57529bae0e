//! Bad priorities, URLs, credentials, vhosts and permissions → their own
//! error variants, with messages that say what is wrong and never leak the
//! password. Completes `rabbitmq_errors.rs` (guest with a wrong password,
//! an unknown vhost, hx_noperm declaring) and the config tests (malformed URLs):
//! here the URL path end to end, other users, a vhost that exists but is not
//! granted, and each permission the least-privilege user lacks.

use std::time::{Duration, Instant};

use helixmq::config::{load_from_str, EnvSource};
use helixmq::topology::{Exchange, ExchangeKind, Queue};
use helixmq::{BoxError, Broker, Context, Error, Message, Outcome, Priority, SubscribeOptions};
use helixmq_testkit::broker;
use helixmq_testkit::broker::*;
use helixmq_testkit::scripts::{rabbitmqctl, random_suffix};

#[test]
fn priorities_outside_0_to_10_and_unknown_names_are_refused() {
    for v in 0..=u8::MAX {
        match Priority::new(v) {
            Ok(p) => {
                assert!(v <= 10);
                assert_eq!(p.value(), v);
            }
            Err(e) => {
                assert!(v > 10);
                assert!(
                    matches!(&e, Error::InvalidPriority { priority, .. } if *priority == v),
                    "{e:?}"
                );
                let t = e.to_string();
                assert!(t.contains(&v.to_string()) && t.contains("0 to 10"), "{t}");
            }
        }
    }
    for (text, want) in [
        ("low", 1),
        ("NORMAL", 5),
        ("High", 8),
        ("critical", 10),
        ("0", 0),
        ("10", 10),
    ] {
        assert_eq!(text.parse::<Priority>().unwrap().value(), want, "{text}");
    }
    for bad in ["urgent", "", " 5", "-1", "11", "256", "5.0", "high!", "0x5"] {
        let e = bad.parse::<Priority>().unwrap_err();
        assert!(matches!(e, Error::InvalidPriority { .. }), "{bad}: {e:?}");
        let t = e.to_string();
        assert!(
            t.contains("0 to 10") || t.contains("0-10"),
            "'{bad}': the message must say what is accepted: {t}"
        );
    }
    assert!("urgent"
        .parse::<Priority>()
        .unwrap_err()
        .to_string()
        .contains("low/normal/high/critical"));
}

/// A configuration from `RABBITMQ_URL` only, as a deployment would set it.
fn from_url(url: &str) -> helixmq::Config {
    let env = EnvSource::map([("RABBITMQ_URL", url)]);
    let mut c = load_from_str("", &env).unwrap_or_else(|e| panic!("{url} should load: {e}"));
    c.rabbitmq.connect_timeout = Duration::from_secs(10);
    c.helixmq.prefix = prefix().to_string();
    c
}

async fn connect_err(c: helixmq::Config) -> Error {
    let started = Instant::now();
    let err = match Broker::connect(c).await {
        Ok(b) => {
            b.close().await.ok();
            panic!("connection accepted")
        }
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, no retry loop: {:?}",
        started.elapsed()
    );
    err
}

#[tokio::test]
async fn rabbitmq_url_with_bad_credentials_vhost_or_port_gives_each_its_variant() {
    // Wrong password for the real least-privilege user; the password has a
    // percent-encoded '@' that must be decoded (and must never be shown).
    let err = connect_err(from_url(
        "amqp://helixagent:Wr0ng%40Secret@127.0.0.1:5672/%2F",
    ))
    .await;
    assert!(
        matches!(&err, Error::AccessRefused { user: Some(u), .. } if u == "helixagent"),
        "{err:?}"
    );
    for shown in [err.to_string(), format!("{err:?}")] {
        assert!(!shown.contains("Wr0ng"), "password leaked: {shown}");
        assert!(!shown.contains("%40Secret"), "password leaked: {shown}");
    }

    // A user that does not exist: the same variant (the broker does not tell which).
    let ghost = format!("hx-ghost-{}", random_suffix());
    let err = connect_err(from_url(&format!(
        "amqp://{ghost}:whatever@127.0.0.1:5672/%2F"
    )))
    .await;
    assert!(
        matches!(&err, Error::AccessRefused { user: Some(u), .. } if *u == ghost),
        "{err:?}"
    );
    assert!(err.to_string().contains("RABBITMQ_USER"), "{err}");

    // An unknown vhost, percent-encoded in the URL path.
    let vhost = format!("helixmq/missing-{}", random_suffix());
    let encoded = vhost.replace('/', "%2F");
    let err = connect_err(from_url(&format!(
        "amqp://guest:guest@127.0.0.1:5672/{encoded}"
    )))
    .await;
    assert!(
        matches!(&err, Error::VhostNotAllowed { vhost: v } if *v == vhost),
        "{err:?}"
    );
    assert!(err.to_string().contains(&format!("'{vhost}'")), "{err}");

    // A port where nothing listens.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = connect_err(from_url(&format!("amqp://guest:guest@127.0.0.1:{port}/"))).await;
    assert!(
        matches!(&err, Error::ConnectionRefused { port: p, .. } if *p == port),
        "{err:?}"
    );
}

#[tokio::test]
async fn vhost_that_exists_but_is_not_granted_is_vhost_not_allowed() {
    let vhost = format!("helixmq-nogrant-{}", random_suffix());
    rabbitmqctl(None, &["add_vhost", &vhost]);
    let mut c = config(HELIXAGENT, &prefix());
    c.rabbitmq.vhost = vhost.clone();
    let res = Broker::connect(c).await;
    rabbitmqctl(None, &["delete_vhost", &vhost]);
    let err = res.expect_err("helixagent has no permissions on the new vhost");
    assert!(
        matches!(&err, Error::VhostNotAllowed { vhost: v } if *v == vhost),
        "{err:?}"
    );
    assert!(err.to_string().contains("set_permissions"), "{err}");
}

/// The least-privilege user is refused everything outside `helixagent\..*`,
/// each with a clear access-refused error naming the object, and the broker
/// handle keeps working for what it may do.
#[tokio::test]
async fn least_privilege_user_is_refused_outside_its_prefix() {
    let p = prefix();
    let b = broker::broker(config(HELIXAGENT, &p)).await.unwrap();
    let guest = broker::broker(config(GUEST, &p)).await.unwrap();
    let outside = format!("hx-outside-{}", random_suffix());

    // configure: declaring a queue or an exchange outside the prefix.
    let mut t = helixmq::Topology::system(b.names());
    t.queues.push(Queue::durable(&outside));
    let err = b.declare(&t).await.unwrap_err();
    assert!(
        matches!(&err, Error::AccessRefused { user: Some(u), .. } if u == "helixagent"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&outside) && msg.contains("access refused"),
        "{msg}"
    );

    let mut t = helixmq::Topology::system(b.names());
    t.exchanges.push(Exchange {
        name: format!("{outside}.x"),
        kind: ExchangeKind::Topic,
        durable: true,
        alternate_exchange: None,
    });
    let err = b.declare(&t).await.unwrap_err();
    assert!(matches!(&err, Error::AccessRefused { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("{outside}.x")), "{err}");

    // write: publishing to the default exchange (amq.default) or to amq.topic.
    guest
        .declare(&{
            let mut g = helixmq::Topology::system(guest.names());
            g.queues.clear();
            g.exchanges.clear();
            g.bindings.clear();
            g.queues.push(Queue::durable(&outside));
            g
        })
        .await
        .unwrap();
    for exchange in ["", "amq.topic"] {
        let started = Instant::now();
        let err = b
            .publish(exchange, &outside, Message::new("x"))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, Error::AccessRefused { .. }),
            "publish to '{exchange}': {err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "not a timeout");
    }

    // read: consuming or getting from a queue outside the prefix.
    let err = b
        .subscribe(
            &outside,
            |_m: Message, _c: Context| async { Ok::<_, BoxError>(Outcome::Ack) },
            SubscribeOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::AccessRefused { .. }),
        "subscribe: {err:?}"
    );
    assert!(err.to_string().contains(&outside), "{err}");
    let err = b.backend().get(&outside).await.unwrap_err();
    assert!(matches!(&err, Error::AccessRefused { .. }), "get: {err:?}");

    // Its own prefix still works on the same handle after all those refusals.
    let names = b.names().clone();
    b.declare(&helixmq::Topology::spec(&names)).await.unwrap();
    b.publish(&names.tasks_exchange(), "background", Message::new("mine"))
        .await
        .unwrap();
    let got = broker::take(
        &b,
        &names.task_queue("background"),
        1,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(&got[0].payload[..], b"mine");

    guest.backend().delete_queue(&outside).await.unwrap();
    cleanup(&b, Some(&helixmq::Topology::spec(&names))).await;
    b.close().await.unwrap();
    guest.close().await.unwrap();
}
