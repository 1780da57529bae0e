//! Faults that touch a whole broker, on a dedicated RabbitMQ node this test
//! starts on its own ports (never the shared one): a memory alarm
//! (connection.blocked → `ConnectionState::Blocked`, publishes wait for their
//! confirms, bounded by their timeout), a broker application restart (the
//! topology is redeclared — a transient queue comes back — and the
//! subscription is restored), and TLS (verified CA, untrusted CA, SASL
//! EXTERNAL with a client certificate, `skip_verify`).
//!
//! Node `hxrabbit@localhost`: AMQP 127.0.0.1:5698, AMQPS 5699, management
//! 15698, prometheus 15798, distribution 25698. Stopped and wiped at the end.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::{ConnectionState, Error, Message, Metrics, Names, PublishOptions, Topology};
use helixmq_testkit::broker::*;

const NODE: &str = "hxrabbit@localhost";
const AMQP_PORT: u16 = 5698;
const AMQPS_PORT: u16 = 5699;

fn ctl(args: &[&str]) -> std::process::Output {
    Command::new("rabbitmqctl")
        .arg("-n")
        .arg(NODE)
        .args(args)
        .output()
        .expect("rabbitmqctl runs")
}

fn sh(cmd: &str, dir: &Path) {
    let st = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .current_dir(dir)
        .status()
        .unwrap();
    assert!(st.success(), "{cmd}");
}

/// The dedicated node; dropping it stops the node and removes its data.
struct Node {
    dir: PathBuf,
}

impl Node {
    fn start() -> Node {
        let dir = PathBuf::from("/tmp/hxrabbit-node");
        let _ = ctl(&["stop"]); // a leftover of an interrupted run
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A CA, a server certificate for localhost/127.0.0.1, and a second, untrusted CA.
        sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=hxtest-ca 2>/dev/null", &dir);
        sh("openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost 2>/dev/null", &dir);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        sh("openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile san.ext 2>/dev/null", &dir);
        sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout other.key -out other-ca.pem -days 2 -subj /CN=untrusted 2>/dev/null", &dir);
        // A client certificate for SASL EXTERNAL (user = its CN); v3 extensions, as webpki requires.
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        sh("openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj /CN=hxclient 2>/dev/null", &dir);
        sh("openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile client.ext 2>/dev/null", &dir);
        sh("chmod 755 . && chmod 644 *", &dir);
        let d = dir.display();
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.local = 127.0.0.1:{AMQP_PORT}\nlisteners.ssl.default = {AMQPS_PORT}\n\
                 ssl_options.cacertfile = {d}/ca.pem\nssl_options.certfile = {d}/server.pem\nssl_options.keyfile = {d}/server.key\n\
                 ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = false\n\
                 auth_mechanisms.1 = PLAIN\nauth_mechanisms.2 = AMQPLAIN\nauth_mechanisms.3 = EXTERNAL\n\
                 ssl_cert_login_from = common_name\n\
                 management.tcp.port = 15698\nprometheus.tcp.port = 15798\n"
            ),
        )
        .unwrap();
        let st = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", NODE)
            .env("RABBITMQ_NODE_PORT", AMQP_PORT.to_string())
            .env("RABBITMQ_DIST_PORT", "25698")
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
            .status()
            .expect("rabbitmq-server runs");
        assert!(st.success());
        let node = Node { dir };
        // Right after `-detached` the node is not registered yet and
        // await_startup fails at once: poll it (an external process, nothing to await).
        let started = Instant::now();
        loop {
            let out = ctl(&["await_startup", "--timeout", "60"]);
            if out.status.success() {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "dedicated node did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        node
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = ctl(&["stop"]);
        let _ = std::fs::remove_dir_all(format!("/var/lib/rabbitmq/mnesia/{NODE}"));
        let _ = std::fs::remove_dir_all(format!("/var/lib/rabbitmq/mnesia/{NODE}-plugins-expand"));
        let _ = std::fs::remove_file(format!("/var/lib/rabbitmq/mnesia/{NODE}-feature_flags"));
        let _ = std::fs::remove_file(format!("/var/lib/rabbitmq/mnesia/{NODE}.pid"));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_restart_and_tls_on_a_dedicated_node() {
    let node = tokio::task::spawn_blocking(Node::start).await.unwrap();
    memory_alarm_blocks_publishes_until_cleared().await;
    broker_restart_redeclares_the_topology_and_restores_consumers().await;
    tls(&node).await;
}

async fn memory_alarm_blocks_publishes_until_cleared() {
    let p = prefix();
    let mut cfg = config(GUEST, &p);
    cfg.rabbitmq.port = AMQP_PORT;
    let b = broker(cfg).await.unwrap();
    let names = Names::new(&p);
    b.declare(&Topology::spec(&names)).await.unwrap();
    let x = names.tasks_exchange();
    let mut state = b.state();

    let out = tokio::task::spawn_blocking(|| ctl(&["set_vm_memory_high_watermark", "0.0000001"]))
        .await
        .unwrap();
    assert!(out.status.success());
    // RabbitMQ blocks a connection when it next publishes: this publish waits.
    let waiting = {
        let b = b.clone();
        let x = x.clone();
        tokio::spawn(async move {
            b.publish(&x, "background", Message::new("during alarm"))
                .await
        })
    };
    tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(|s| *s == ConnectionState::Blocked),
    )
    .await
    .expect("connection.blocked observed as ConnectionState::Blocked")
    .unwrap();
    // A publish whose timeout is shorter than the alarm times out clearly.
    let short = PublishOptions {
        timeout: Some(Duration::from_millis(800)),
        ..Default::default()
    };
    let err = b
        .publish_with(&x, "background", Message::new("short"), &short)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PublishTimeout { .. }), "{err:?}");
    assert!(!waiting.is_finished(), "publish must wait while blocked");

    let out = tokio::task::spawn_blocking(|| ctl(&["set_vm_memory_high_watermark", "0.4"]))
        .await
        .unwrap();
    assert!(out.status.success());
    tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("the waiting publish completes once the alarm clears")
        .unwrap()
        .expect("and is confirmed");
    tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .unwrap()
    .unwrap();
    // Both messages are there (the timed-out one may have been stored too: at least once).
    let n = b
        .backend()
        .queue_stats(&names.task_queue("background"))
        .await
        .unwrap()
        .messages;
    assert!((1..=2).contains(&n), "{n}");
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

async fn broker_restart_redeclares_the_topology_and_restores_consumers() {
    let p = prefix();
    let mut cfg = config(GUEST, &p);
    cfg.rabbitmq.port = AMQP_PORT;
    let b = broker(cfg).await.unwrap();
    let names = Names::new(&p);
    // A transient queue vanishes with the broker application: only a redeclare brings it back.
    let transient = format!("{p}.tasks.transient");
    let mut t = Topology::spec(&names);
    let mut q = helixmq::topology::Queue::durable(&transient);
    q.durable = false;
    t.add_work_queue(q, &names.tasks_exchange(), "transient");
    b.declare(&t).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let sub = b
        .subscribe(
            &transient,
            move |m: Message, _| {
                let tx = tx.clone();
                async move {
                    tx.send(m.id).await.unwrap();
                    Ok(helixmq::Outcome::Ack)
                }
            },
            helixmq::SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let mut state = b.state();
    let out = tokio::task::spawn_blocking(|| {
        let a = ctl(&["stop_app"]);
        let b = ctl(&["start_app"]);
        (a, b)
    })
    .await
    .unwrap();
    assert!(out.0.status.success() && out.1.status.success());
    tokio::time::timeout(
        Duration::from_secs(30),
        state.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .expect("reconnected after the broker restart")
    .unwrap();
    let m = Message::new("after restart");
    let id = m.id.clone();
    b.publish(&names.tasks_exchange(), "transient", m)
        .await
        .expect("the redeclared route delivers");
    let got = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the restored subscription consumes")
        .unwrap();
    assert_eq!(got, id);
    assert!(sub.is_active());
    assert!(b.metrics().connection_recoveries.get() >= 1);
    sub.shutdown(Duration::from_secs(5)).await;
    cleanup(&b, None).await;
    b.close().await.unwrap();
}

async fn tls(node: &Node) {
    let p = prefix();
    let mut cfg = config(GUEST, &p).rabbitmq;
    cfg.host = "localhost".into();
    cfg.port = AMQPS_PORT;
    cfg.tls.enabled = true;
    cfg.tls.ca_file = node.file("ca.pem");

    // Verified against our CA: connects and works.
    let b = RabbitBackend::connect(&cfg, Metrics::default())
        .await
        .expect("verified TLS connection");
    use helixmq::backend::Backend;
    b.declare(&Topology::system(&Names::new(&p))).await.unwrap();
    b.delete_queue(&Names::new(&p).dlq()).await.unwrap();
    b.close().await.unwrap();

    // An untrusted CA: refused, with the reason.
    let mut bad = cfg.clone();
    bad.tls.ca_file = node.file("other-ca.pem");
    let started = Instant::now();
    let err = RabbitBackend::connect(&bad, Metrics::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    let msg = format!("{err} / {:?}", std::error::Error::source(&err));
    assert!(
        msg.to_lowercase().contains("certificate") || msg.contains("UnknownIssuer"),
        "{msg}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // Client certificate, no password: SASL EXTERNAL logs in as the certificate's CN.
    let out = tokio::task::spawn_blocking(|| {
        let _ = ctl(&["add_user", "hxclient", "unused-password"]);
        let _ = ctl(&["clear_password", "hxclient"]);
        ctl(&["set_permissions", "-p", "/", "hxclient", ".*", ".*", ".*"])
    })
    .await
    .unwrap();
    assert!(out.status.success());
    let mut ext = cfg.clone();
    ext.username = "hxclient".into();
    ext.password = helixmq::Secret::new("");
    ext.tls.cert_file = node.file("client.pem");
    ext.tls.key_file = node.file("client.key");
    let b = RabbitBackend::connect(&ext, Metrics::default())
        .await
        .expect("SASL EXTERNAL login with the client certificate");
    b.declare(&Topology::system(&Names::new(&p))).await.unwrap();
    b.delete_queue(&Names::new(&p).dlq()).await.unwrap();
    b.close().await.unwrap();

    // skip_verify accepts it (and logs a warning).
    let mut skip = bad.clone();
    skip.tls.skip_verify = true;
    let b = RabbitBackend::connect(&skip, Metrics::default())
        .await
        .expect("skip_verify connects");
    b.close().await.unwrap();
}
