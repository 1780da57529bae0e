//! TLS end to end against the dedicated TLS node that `scripts/tls` starts
//! (hqtls@localhost, TLS on 5671, certificates in `target/tls/`): a verified
//! connection carries messages; an untrusted CA, a host name not in the
//! certificate and a client certificate from an unknown CA are refused;
//! client-certificate login with SASL EXTERNAL works with no password; and
//! `skip_verify` connects while logging a warning.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::topology::Queue;
use helixmq::{Broker, Config, Error, Message, Metrics, PublishOptions, Secret, Topology};

/// What `scripts/tls` wrote to `target/tls/env`.
struct Env {
    dir: PathBuf,
    port: u16,
    node: String,
    client_cn: String,
    mismatch_host: String,
}

fn env() -> Env {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let path = root.join("target/tls/env");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/tls first (it makes the certificates and starts the TLS node)",
            path.display()
        )
    });
    let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    let get = |k: &str| {
        vars.get(k)
            .unwrap_or_else(|| panic!("{k} missing in {}", path.display()))
            .to_string()
    };
    Env {
        dir: PathBuf::from(get("HELIXMQ_TLS_DIR")),
        port: get("HELIXMQ_TLS_PORT").parse().unwrap(),
        node: get("HELIXMQ_TLS_NODE"),
        client_cn: get("HELIXMQ_TLS_CLIENT_CN"),
        mismatch_host: get("HELIXMQ_TLS_MISMATCH_HOST"),
    }
}

impl Env {
    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    /// TLS to the node as guest (loopback), trusting `ca`.
    fn config(&self, ca: &str) -> Config {
        let mut c = Config::default();
        c.rabbitmq.host = "127.0.0.1".into();
        c.rabbitmq.port = self.port;
        c.rabbitmq.username = "guest".into();
        c.rabbitmq.password = Secret::new("guest");
        c.rabbitmq.vhost = "/".into();
        c.rabbitmq.connect_timeout = Duration::from_secs(10);
        c.rabbitmq.max_reconnect_attempts = 1;
        c.rabbitmq.tls.enabled = true;
        c.rabbitmq.tls.ca_file = self.file(ca);
        c.helixmq.prefix = format!("helixagent.tls{:08x}", rand::random::<u32>());
        c
    }
}

async fn connect(config: &Config, name: &str) -> helixmq::Result<Broker> {
    let metrics = Metrics::default();
    let backend = RabbitBackend::connect_named(&config.rabbitmq, metrics.clone(), name).await?;
    Ok(Broker::with_backend(
        Arc::new(backend),
        config.clone(),
        metrics,
    ))
}

/// Declare a queue, publish to it, take the message back, delete the queue.
async fn round_trip(broker: &Broker) {
    let q = format!("{}.roundtrip", broker.names().prefix());
    let mut t = Topology::system(broker.names());
    t.exchanges.clear();
    t.bindings.clear();
    t.queues = vec![Queue::durable(q.clone())];
    broker.declare(&t).await.unwrap();
    let m = Message::new("over tls");
    let id = m.id.clone();
    broker
        .publish_with("", &q, m, &PublishOptions::default())
        .await
        .unwrap();
    let mut got = None;
    for _ in 0..50 {
        got = broker.backend().get(&q).await.unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = got.expect("message back over TLS");
    assert_eq!(d.message.id, id);
    assert_eq!(&d.message.payload[..], b"over tls");
    d.acker.ack().await.unwrap();
    broker.backend().delete_queue(&q).await.unwrap();
}

fn assert_refused(err: &Error, what: &str) {
    assert!(
        matches!(err, Error::Connect { .. }),
        "{what}: expected a connect error, got {err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(":5671") || msg.contains("5671"),
        "{what}: the error names the endpoint: {msg}"
    );
}

#[tokio::test]
async fn verified_connection_carries_messages() {
    let e = env();
    let broker = connect(&e.config("ca.crt"), "hxtest-tls-verified")
        .await
        .expect("verified TLS connection");
    assert!(broker.is_connected());
    round_trip(&broker).await;
    broker.close().await.unwrap();
}

#[tokio::test]
async fn untrusted_ca_is_refused() {
    let e = env();
    let err = connect(&e.config("untrusted-ca.crt"), "hxtest-tls-untrusted")
        .await
        .unwrap_err();
    assert_refused(&err, "untrusted CA");
    eprintln!("untrusted CA: {err}");
    let chain = format!("{err:?}").to_lowercase();
    assert!(
        chain.contains("certificate") || chain.contains("issuer"),
        "cause names the certificate: {chain}"
    );
}

#[tokio::test]
async fn host_name_mismatch_is_refused() {
    let e = env();
    let mut c = e.config("ca.crt");
    // Loopback, so the node answers, but not a name the certificate holds.
    c.rabbitmq.host = e.mismatch_host.clone();
    let err = connect(&c, "hxtest-tls-mismatch").await.unwrap_err();
    assert_refused(&err, "host name mismatch");
    eprintln!("mismatch: {err}");
    let chain = format!("{err:?}").to_lowercase();
    assert!(
        chain.contains("name") || chain.contains("certificate"),
        "cause names the mismatch: {chain}"
    );
}

#[tokio::test]
async fn client_certificate_logs_in_with_external_and_no_password() {
    let e = env();
    let mut c = e.config("ca.crt");
    c.rabbitmq.username = e.client_cn.clone();
    c.rabbitmq.password = Secret::new("");
    c.rabbitmq.tls.cert_file = e.file("client.crt");
    c.rabbitmq.tls.key_file = e.file("client.key");
    let name = format!("hxtest-tls-external-{:08x}", rand::random::<u32>());
    let broker = connect(&c, &name)
        .await
        .expect("EXTERNAL login with the client certificate");
    round_trip(&broker).await;

    // The broker says who logged in, and how. RabbitMQ 3.10 has no column for
    // the connection name, so find ours by its client properties.
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "-n",
            &e.node,
            "list_connections",
            "--no-table-headers",
        ])
        .args([
            "user",
            "auth_mechanism",
            "ssl",
            "peer_cert_subject",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "rabbitmqctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .find(|l| l.contains(&name))
        .unwrap_or_else(|| panic!("connection {name} not listed:\n{text}"));
    let cols: Vec<&str> = line.splitn(5, '\t').collect();
    assert_eq!(
        &cols[..3],
        [e.client_cn.as_str(), "EXTERNAL", "true"],
        "{line}"
    );
    assert!(cols[3].contains(&format!("CN={}", e.client_cn)), "{line}");
    broker.close().await.unwrap();
}

#[tokio::test]
async fn client_certificate_from_an_unknown_ca_is_refused() {
    let e = env();
    let mut c = e.config("ca.crt");
    c.rabbitmq.username = e.client_cn.clone();
    c.rabbitmq.password = Secret::new("");
    c.rabbitmq.tls.cert_file = e.file("untrusted-client.crt");
    c.rabbitmq.tls.key_file = e.file("untrusted-client.key");
    let err = connect(&c, "hxtest-tls-badclient").await.unwrap_err();
    eprintln!("bad client: {err}");
    assert!(
        matches!(err, Error::Connect { .. } | Error::AccessRefused { .. }),
        "expected a refusal, got {err:?}"
    );
}

#[tokio::test]
async fn skip_verify_connects_and_warns() {
    let e = env();
    // Trust nothing useful: only skip_verify can make this connect.
    let mut c = e.config("untrusted-ca.crt");
    c.rabbitmq.tls.skip_verify = true;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _guard = tracing::subscriber::set_default(Capture(seen.clone()));
    let broker = connect(&c, "hxtest-tls-skipverify")
        .await
        .expect("skip_verify connects");
    round_trip(&broker).await;
    broker.close().await.unwrap();
    let warnings = seen.lock().unwrap().clone();
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("verification is DISABLED")),
        "no warning about skip_verify; WARN events seen: {warnings:?}"
    );
}

/// A tracing subscriber that keeps the message of every WARN (or worse) event.
/// `set_default` scopes it to this thread: the tests run on tokio's
/// current-thread runtime, so the connection's own events land here.
struct Capture(Arc<Mutex<Vec<String>>>);

impl tracing::Subscriber for Capture {
    fn enabled(&self, m: &tracing::Metadata<'_>) -> bool {
        *m.level() <= tracing::Level::WARN
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Msg(String);
        impl tracing::field::Visit for Msg {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Msg(String::new());
        event.record(&mut m);
        self.0.lock().unwrap().push(m.0);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}
