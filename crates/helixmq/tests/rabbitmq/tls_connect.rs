//! TLS end to end, against the dedicated TLS node that `scripts/tls` starts
//! (`hqtls@localhost`, TLS on 5671, certificates in `target/tls/`; the script
//! is idempotent and the tests run it themselves):
//!
//! - a verified connection (server certificate checked against our CA and
//!   host name) publishes and consumes a message, and the broker sees TLS;
//! - a server certificate from a CA we do not trust is refused;
//! - a client certificate from a CA the broker does not trust is refused;
//! - a host name that is not in the certificate is refused;
//! - a client certificate logs in with SASL EXTERNAL and no password;
//! - `skip_verify` (and `verify_peer: false`) connect anyway, logging a warning.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::topology::{Exchange, ExchangeKind, Queue};
use helixmq::{
    BoxError, Broker, Config, Context, Error, Message, Metrics, Outcome, RetryPolicy, Secret,
    SubscribeOptions, Topology,
};
use helixmq_testkit::broker;
use helixmq_testkit::logs::LogCapture;
use helixmq_testkit::scripts::{rabbitmqctl, random_suffix, script_locked};

/// What `scripts/tls` wrote to `target/tls/env`.
struct TlsNode {
    dir: PathBuf,
    port: u16,
    node: String,
    client_cn: String,
    mismatch_host: String,
}

impl TlsNode {
    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }
}

/// Make the certificates and start the TLS node once per test binary.
fn node() -> &'static TlsNode {
    static NODE: OnceLock<TlsNode> = OnceLock::new();
    NODE.get_or_init(|| {
        script_locked("tls", "tls", &["start"]);
        let env =
            std::fs::read_to_string(helixmq_testkit::scripts::repo_root().join("target/tls/env"))
                .expect("scripts/tls writes target/tls/env");
        let var = |k: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .unwrap_or_else(|| panic!("{k} missing from target/tls/env"))
                .to_string()
        };
        TlsNode {
            dir: PathBuf::from(var("HELIXMQ_TLS_DIR")),
            port: var("HELIXMQ_TLS_PORT").parse().expect("port"),
            node: var("HELIXMQ_TLS_NODE"),
            client_cn: var("HELIXMQ_TLS_CLIENT_CN"),
            mismatch_host: var("HELIXMQ_TLS_MISMATCH_HOST"),
        }
    })
}

/// A TLS configuration for the node at `host`, as guest/guest (PLAIN over TLS)
/// and trusting `ca` (a file in `target/tls/`), under a fresh prefix.
fn tls_config(host: &str, ca: Option<&str>) -> Config {
    let n = node();
    let mut c = Config::default();
    c.rabbitmq.host = host.into();
    c.rabbitmq.port = n.port;
    c.rabbitmq.username = "guest".into();
    c.rabbitmq.password = Secret::new("guest");
    c.rabbitmq.vhost = "/".into();
    c.rabbitmq.connect_timeout = Duration::from_secs(10);
    c.rabbitmq.reconnect_delay = Duration::from_millis(200);
    c.rabbitmq.publish_timeout = Duration::from_secs(20);
    c.rabbitmq.tls.enabled = true;
    c.rabbitmq.tls.ca_file = ca.map(|f| n.file(f)).unwrap_or_default();
    c.helixmq.prefix = format!("helixagent.tls{}", random_suffix());
    c
}

/// Connect on a connection named after the prefix (to find it in `list_connections`).
async fn connect(cfg: &Config) -> helixmq::Result<(Broker, String)> {
    let name = format!("hxtest-{}", cfg.helixmq.prefix);
    let metrics = Metrics::default();
    let backend = RabbitBackend::connect_named(&cfg.rabbitmq, metrics.clone(), &name).await?;
    Ok((
        Broker::builder(cfg.clone())
            .metrics(metrics)
            .custom_backend(Arc::new(backend)),
        name,
    ))
}

/// The TLS node's view of our connection: `user auth_mechanism ssl ssl_protocol`.
fn broker_view(connection_name: &str) -> String {
    let out = rabbitmqctl(
        Some(&node().node),
        &[
            "list_connections",
            "user",
            "auth_mechanism",
            "ssl",
            "ssl_protocol",
            "client_properties",
        ],
    );
    out.lines()
        .find(|l| l.contains(&format!("\"{connection_name}\"")))
        .map(|l| l.split('\t').take(4).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| {
            panic!("connection {connection_name} not listed by the TLS node:\n{out}")
        })
}

/// Declare a queue under the prefix, publish one message (confirmed), consume
/// it through a subscription, then delete what was declared.
async fn publish_and_consume(b: &Broker) {
    let names = b.names().clone();
    let x = names.tasks_exchange();
    let q = names.task_queue("tls");
    let mut t = Topology::system(&names);
    t.exchanges.push(Exchange {
        name: x.clone(),
        kind: ExchangeKind::Direct,
        durable: true,
        alternate_exchange: None,
    });
    t.add_work_queue(Queue::durable(&q), &x, "tls");
    b.declare(&t).await.expect("declare over TLS");

    let m = Message::new("sent over TLS").with_header("secret-ish", "value");
    let id = m.id.clone();
    b.publish(&x, "tls", m)
        .await
        .expect("confirmed publish over TLS");

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(4);
    let sub = b
        .subscribe(
            &q,
            move |m: Message, _ctx: Context| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(m).await;
                    Ok::<_, BoxError>(Outcome::Ack)
                }
            },
            SubscribeOptions {
                retry: Some(RetryPolicy {
                    max_attempts: 3,
                    delays: vec![Duration::from_secs(1)],
                }),
                ..Default::default()
            },
        )
        .await
        .expect("subscribe over TLS");
    let got = tokio::time::timeout(Duration::from_secs(15), rx.recv())
        .await
        .expect("message consumed within 15 s")
        .expect("handler ran");
    assert_eq!(got.id, id);
    assert_eq!(&got.payload[..], b"sent over TLS");
    assert_eq!(got.header_str("secret-ish"), Some("value"));
    sub.shutdown(Duration::from_secs(5)).await;
    assert_eq!(b.backend().queue_stats(&q).await.unwrap().messages, 0);
    broker::cleanup(b, None).await;
}

/// The failure must come at once (no reconnect loop) and be a connection error
/// naming the endpoint; returns its text.
async fn refused(cfg: &Config, why: &str) -> String {
    let started = Instant::now();
    let err = match connect(cfg).await {
        Ok((b, _)) => {
            b.close().await.ok();
            panic!("{why}: the connection was accepted")
        }
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{why}: took {:?}",
        started.elapsed()
    );
    let endpoint = format!("{}:{}", cfg.rabbitmq.host, cfg.rabbitmq.port);
    assert!(
        matches!(&err, Error::Connect { endpoint: e, .. } if *e == endpoint),
        "{why}: expected Error::Connect for {endpoint}, got {err:?}"
    );
    let text = err.to_string();
    assert!(!text.contains("guest:guest"), "credentials leaked: {text}");
    eprintln!("{why}: {text}");
    text
}

#[tokio::test]
async fn verified_connection_publishes_and_consumes() {
    // By DNS name (SAN DNS:localhost) and by address (SAN IP:127.0.0.1).
    for host in ["localhost", "127.0.0.1"] {
        let cfg = tls_config(host, Some("ca.crt"));
        let (b, name) = connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("verified TLS connection to {host}: {e}"));
        let view = broker_view(&name);
        assert!(
            view.starts_with("guest PLAIN true tlsv1.")
                || view.starts_with("guest PLAIN true 'tlsv1."),
            "the broker must see a TLS connection logged in with PLAIN: {view}"
        );
        publish_and_consume(&b).await;
        b.close().await.unwrap();
    }
}

#[tokio::test]
async fn server_certificate_from_an_untrusted_ca_is_refused() {
    let text = refused(
        &tls_config("localhost", Some("untrusted-ca.crt")),
        "untrusted server CA",
    )
    .await;
    assert!(
        text.contains("TLS handshake failed")
            && text.contains("UnknownIssuer")
            && text.contains("rabbitmq.tls.ca_file"),
        "the error must say the server certificate is not trusted: {text}"
    );
}

#[tokio::test]
async fn client_certificate_from_an_untrusted_ca_is_refused_by_the_broker() {
    let mut cfg = tls_config("localhost", Some("ca.crt"));
    cfg.rabbitmq.tls.cert_file = node().file("untrusted-client.crt");
    cfg.rabbitmq.tls.key_file = node().file("untrusted-client.key");
    let text = refused(&cfg, "untrusted client certificate").await;
    // TLS 1.3: the broker checks our certificate after our side of the handshake
    // is done, so its refusal arrives as an alert or, racing it, as a reset.
    let alert = text.contains("TLS handshake failed")
        && text.contains("UnknownCA")
        && text.contains("refused our client certificate (rabbitmq.tls.cert_file)");
    let reset = text.contains("closed the connection during the handshake")
        && text.contains("client certificate it does not trust (rabbitmq.tls.cert_file)");
    assert!(
        alert || reset,
        "the error must point at the client certificate: {text}"
    );
}

#[tokio::test]
async fn host_name_not_in_the_certificate_is_refused() {
    let n = node();
    let cfg = tls_config(&n.mismatch_host, Some("ca.crt"));
    let text = refused(&cfg, "host name mismatch").await;
    assert!(
        text.contains("not valid for name")
            && text.contains(&n.mismatch_host)
            && text.contains("subjectAltName"),
        "the error must name the host the certificate does not cover: {text}"
    );
}

#[tokio::test]
async fn client_certificate_logs_in_with_sasl_external_and_no_password() {
    let n = node();
    let mut cfg = tls_config("localhost", Some("ca.crt"));
    // No password: the identity is the certificate's CN (helixmq-tls), whose
    // broker account has no password at all, so PLAIN could not log it in.
    cfg.rabbitmq.username = n.client_cn.clone();
    cfg.rabbitmq.password = Secret::new("");
    cfg.rabbitmq.tls.cert_file = n.file("client.crt");
    cfg.rabbitmq.tls.key_file = n.file("client.key");
    let (b, name) = connect(&cfg)
        .await
        .expect("EXTERNAL login with client certificate");
    let view = broker_view(&name);
    assert!(
        view.starts_with(&format!("{} EXTERNAL true", n.client_cn)),
        "the broker must see user {} logged in with EXTERNAL over TLS: {view}",
        n.client_cn
    );
    publish_and_consume(&b).await;
    b.close().await.unwrap();

    // Control: the same account cannot log in with a password (PLAIN).
    let mut plain = tls_config("localhost", Some("ca.crt"));
    plain.rabbitmq.username = n.client_cn.clone();
    plain.rabbitmq.password = Secret::new("guessed");
    let err = connect(&plain).await.unwrap_err();
    assert!(matches!(err, Error::AccessRefused { .. }), "{err:?}");
}

#[tokio::test]
async fn skip_verify_connects_and_logs_a_warning() {
    let n = node();
    // Control: untrusted CA and a host name not in the certificate are refused...
    let strict = tls_config(&n.mismatch_host, Some("untrusted-ca.crt"));
    refused(&strict, "strict control").await;

    // ...and the same with skip_verify (or verify_peer: false) connects, with a warning.
    for (skip, verify_peer) in [(true, true), (false, false)] {
        let logs = LogCapture::default();
        let _guard = logs.install();
        let mut cfg = tls_config(&n.mismatch_host, Some("untrusted-ca.crt"));
        cfg.rabbitmq.tls.skip_verify = skip;
        cfg.rabbitmq.tls.verify_peer = verify_peer;
        let (b, name) = connect(&cfg)
            .await
            .unwrap_or_else(|e| panic!("skip_verify={skip} verify_peer={verify_peer}: {e}"));
        assert!(broker_view(&name).starts_with("guest PLAIN true"));
        b.close().await.unwrap();
        let text = logs.text();
        assert!(
            text.contains("WARN") && text.contains("verification is DISABLED"),
            "skip_verify={skip} verify_peer={verify_peer}: expected a warning, logs were:\n{text}"
        );
    }

    // A verified connection logs no such warning.
    let logs = LogCapture::default();
    let _guard = logs.install();
    let (b, _) = connect(&tls_config("localhost", Some("ca.crt")))
        .await
        .unwrap();
    b.close().await.unwrap();
    assert!(
        !logs.text().contains("DISABLED"),
        "unexpected warning: {}",
        logs.text()
    );
}
