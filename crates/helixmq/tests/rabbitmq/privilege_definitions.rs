//! The RabbitMQ definitions helixmq generates import into a fresh vhost with
//! `rabbitmqctl import_definitions`, and the whole flow (publish, consume,
//! retry, DLQ, replay) then runs there as `helixagent` with only the
//! permissions the definitions grant. The topology the code declares must be
//! equivalent to the imported one (a difference would be a 406).
//!
//! Two sources: the JSON rendered by `topology::definitions_json` (what
//! `helixmq topology export` prints), and the repository's
//! `configs/rabbitmq/definitions.json`. Each goes into its own vhost
//! `helixmq-def-<random>` (the JSON's vhost names rewritten), deleted at the end.

use helixmq::backend::rabbitmq::RabbitBackend;
use helixmq::topology::definitions_json;
use helixmq::{Broker, Metrics, Names, Topology};
use helixmq_testkit::broker;
use helixmq_testkit::scripts::{rabbitmqctl, random_suffix, repo_root};
use serde_json::Value;

/// Deletes the vhost when dropped, so a failing test leaves nothing behind.
struct VhostGuard(String);

impl Drop for VhostGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.0])
            .status();
    }
}

/// `defs` with every vhost name replaced by `vhost`. User entries are dropped:
/// `helixagent` already exists (scripts/provision), and importing a user entry
/// would reset its password on the shared broker.
fn retarget(mut defs: Value, vhost: &str) -> Value {
    let obj = defs.as_object_mut().expect("definitions are a JSON object");
    obj.remove("users");
    obj.insert("vhosts".into(), serde_json::json!([{ "name": vhost }]));
    for key in [
        "permissions",
        "topic_permissions",
        "exchanges",
        "queues",
        "bindings",
        "policies",
        "parameters",
    ] {
        if let Some(Value::Array(items)) = obj.get_mut(key) {
            for item in items {
                if let Some(o) = item.as_object_mut() {
                    if o.contains_key("vhost") {
                        o.insert("vhost".into(), Value::String(vhost.into()));
                    }
                }
            }
        }
    }
    defs
}

async fn import_and_run(source: &str, defs: Value) {
    let vhost = format!("helixmq-def-{}", random_suffix());
    rabbitmqctl(None, &["add_vhost", &vhost]);
    let _guard = VhostGuard(vhost.clone());

    let defs = retarget(defs, &vhost);
    // The definitions grant exactly the spec's permissions to helixagent.
    let perms = defs["permissions"].as_array().expect("permissions entry");
    assert!(
        perms.iter().any(|p| p["user"] == "helixagent"
            && p["configure"] == r"^helixagent\..*"
            && p["write"] == r"^helixagent\..*"
            && p["read"] == r"^helixagent\..*"),
        "{source}: the spec's permissions for helixagent: {perms:?}"
    );
    let file = std::env::temp_dir().join(format!("{vhost}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(&defs).unwrap()).unwrap();
    let out = rabbitmqctl(None, &["import_definitions", file.to_str().unwrap()]);
    let _ = std::fs::remove_file(&file);
    eprintln!("{source}: imported into {vhost}: {}", out.trim());

    // What was imported: every queue and exchange of the spec topology.
    let spec = Topology::spec(&Names::default());
    let queues = rabbitmqctl(None, &["list_queues", "-p", &vhost, "name", "arguments"]);
    for q in &spec.queues {
        assert!(
            queues
                .lines()
                .any(|l| l.split('\t').next() == Some(q.name.as_str())),
            "{source}: queue {} not imported:\n{queues}",
            q.name
        );
    }
    let exchanges = rabbitmqctl(None, &["list_exchanges", "-p", &vhost, "name", "type"]);
    for e in &spec.exchanges {
        assert!(
            exchanges
                .lines()
                .any(|l| l == format!("{}\t{}", e.name, e.kind.as_str())),
            "{source}: exchange {} ({}) not imported:\n{exchanges}",
            e.name,
            e.kind.as_str()
        );
    }

    // The flow, as helixagent, with the default names, on the imported topology.
    let mut cfg = broker::config(broker::HELIXAGENT, "helixagent");
    cfg.rabbitmq.vhost = vhost.clone();
    let metrics = Metrics::default();
    let backend =
        RabbitBackend::connect_named(&cfg.rabbitmq, metrics.clone(), &format!("hxtest-{vhost}"))
            .await
            .unwrap_or_else(|e| panic!("{source}: helixagent connects to {vhost}: {e}"));
    let b = Broker::builder(cfg)
        .metrics(metrics)
        .custom_backend(std::sync::Arc::new(backend));
    // Before anything is declared by the client, the imported topology alone routes.
    b.backend()
        .queue_stats("helixagent.tasks.llm")
        .await
        .unwrap_or_else(|e| panic!("{source}: imported llm queue: {e}"));
    // The flow declares the spec topology again: equivalent arguments, no 406.
    helixmq_testkit::flow::whole_flow(&b).await;
    b.close().await.unwrap();
    drop(_guard);
    let vhosts = rabbitmqctl(None, &["list_vhosts"]);
    assert!(!vhosts.lines().any(|l| l == vhost), "{vhost} not deleted");
}

#[tokio::test]
async fn rendered_definitions_import_into_a_fresh_vhost_and_the_flow_runs() {
    let defs = definitions_json(&Topology::spec(&Names::default()), "/", "helixagent");
    import_and_run("definitions_json", defs).await;
}

#[tokio::test]
async fn repository_definitions_file_imports_into_a_fresh_vhost_and_the_flow_runs() {
    let path = repo_root().join("configs/rabbitmq/definitions.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: generate it with `helixmq topology export > configs/rabbitmq/definitions.json`",
            path.display()
        )
    });
    let defs: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    import_and_run("configs/rabbitmq/definitions.json", defs).await;
}

#[test]
fn retarget_rewrites_every_vhost_and_drops_users() {
    let defs = serde_json::json!({
        "users": [{"name": "helixagent", "password_hash": "x"}],
        "vhosts": [{"name": "/"}],
        "permissions": [{"user": "helixagent", "vhost": "/"}],
        "queues": [{"name": "q", "vhost": "/"}],
        "exchanges": [{"name": "x", "vhost": "/"}],
        "bindings": [{"source": "x", "vhost": "/"}],
    });
    let out = retarget(defs, "v");
    assert!(out.get("users").is_none());
    let text = out.to_string();
    assert!(!text.contains("\"/\""), "{text}");
    assert_eq!(text.matches("\"v\"").count(), 5, "{text}");
}
