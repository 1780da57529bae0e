//! The deployment configuration boots a real RabbitMQ and helixmq works on it.
//!
//! No Docker here, so the test does what the compose files' containers do, on a
//! dedicated node from the Debian package (`scripts/node`, hqdeploy on 5694):
//! `deploy/rabbitmq/entrypoint.sh` writes the user and the definitions, and the
//! node boots with `configs/rabbitmq/rabbitmq.conf` (its container paths pointed
//! at the test's folder). Then, as the spec's least-privilege user with the
//! password from the environment: the whole topology is already there before
//! any client declared it; declaring the code's topology again is accepted (the
//! definitions file and the code agree, no 406); a message goes through.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::{Broker, Message, Metrics, Names, Outcome, Secret, SubscribeOptions, Topology};
use helixmq_testkit::broker;
use helixmq_testkit::node::Node;
use helixmq_testkit::scripts::{repo_root, script};
use tokio::sync::mpsc;

const NODE: &str = "hqdeploy";
const PORT: u16 = 5694;

#[tokio::test]
async fn deployment_config_boots_and_serves_the_topology() {
    // Removed after the node (declared first, dropped last).
    let work = tempfile::Builder::new()
        .prefix("hx-deploy-boot-")
        .tempdir()
        .unwrap();
    let work = work.path();
    let defs_dir = work.join("definitions.d");
    let root = repo_root();
    // A leftover node from an interrupted run would keep its old definitions.
    script("node", &["stop", NODE]);

    // The definitions the compose files mount (generated from the code).
    let names = Names::new(helixmq::topology::DEFAULT_PREFIX);
    let defs = root.join("configs/rabbitmq/definitions.json");
    assert!(
        defs.exists(),
        "{} is missing: generate it with `helixmq topology export`",
        defs.display()
    );

    // The container's entrypoint, in "definitions only" mode.
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let out = Command::new(root.join("deploy/rabbitmq/entrypoint.sh"))
        .env("HELIXMQ_DEFS_ONLY", "1")
        .env("HELIXMQ_DEFINITIONS", &defs)
        .env("DEFS_DIR", &defs_dir)
        .env("RABBITMQ_USER", "helixagent")
        .env("RABBITMQ_PASSWORD", &password)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "entrypoint: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // configs/rabbitmq/rabbitmq.conf, minus the ports scripts/node assigns, with
    // the definitions folder where this test put it.
    let conf = std::fs::read_to_string(root.join("configs/rabbitmq/rabbitmq.conf")).unwrap();
    let mut snippet = String::new();
    let mut loads = 0;
    for line in conf.lines() {
        let key = line.split(" = ").next().unwrap_or_default();
        if ["listeners.", "management.", "prometheus."]
            .iter()
            .any(|p| key.starts_with(p))
        {
            continue;
        }
        if key == "load_definitions" {
            loads += 1;
            snippet.push_str(&format!("load_definitions = {}\n", defs_dir.display()));
        } else {
            snippet.push_str(line);
            snippet.push('\n');
        }
    }
    assert_eq!(loads, 1, "rabbitmq.conf must set load_definitions once");
    // The node runs as `rabbitmq`: let it read the folder.
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(work)
        .status()
        .unwrap();
    // Stopped when dropped, also when an assertion fails.
    let _node = Node::start(NODE, PORT, Some(&snippet));

    // The spec's user, with the password from the environment, least privilege.
    let mut config = broker::config(("helixagent", &password), helixmq::topology::DEFAULT_PREFIX);
    config.rabbitmq.port = PORT;
    config.rabbitmq.password = Secret::new(password.clone());
    let metrics = Metrics::default();
    let backend =
        RabbitBackend::connect_named(&config.rabbitmq, metrics.clone(), "hxtest-deploy-boot")
            .await
            .expect("the user written by the entrypoint logs in");
    let broker = Broker::builder(config)
        .metrics(metrics)
        .custom_backend(Arc::new(backend));

    // Imported at boot: every queue of the spec exists before anyone declared it.
    let spec = Topology::spec(&names);
    for q in &spec.queues {
        broker
            .backend()
            .queue_stats(&q.name)
            .await
            .unwrap_or_else(|e| panic!("queue {} not imported at boot: {e}", q.name));
    }
    // The code's declarations agree with the imported ones (a difference is a 406).
    broker
        .declare(&spec)
        .await
        .expect("definitions and code agree");

    let (tx, mut rx) = mpsc::channel::<String>(4);
    let sub = broker
        .subscribe(
            &names.task_queue("background"),
            move |m: Message, _ctx| {
                let tx = tx.clone();
                async move {
                    tx.send(m.id).await.ok();
                    Ok(Outcome::Ack)
                }
            },
            SubscribeOptions::default(),
        )
        .await
        .unwrap();
    let m = Message::new("deployed");
    let id = m.id.clone();
    broker
        .publish(&names.tasks_exchange(), "background", m)
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("delivered")
        .unwrap();
    assert_eq!(got, id);
    sub.shutdown(Duration::from_secs(5)).await;
    broker.close().await.unwrap();
}
