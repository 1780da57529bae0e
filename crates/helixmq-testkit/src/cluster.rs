//! The three-node cluster `hq1..hq3@localhost` on 5681–5683 (`scripts/cluster`,
//! never the shared broker): a [`Cluster`] handle that starts it
//! idempotently and stops it when dropped, the node behind a port, and what
//! `rabbitmqctl` on a node says about connections and queues.

use std::process::Command;
use std::time::Duration;

use helixmq::topology::QueueType;
use helixmq::{Config, Secret};

use crate::scripts::script;

/// The AMQP ports of `hq1`, `hq2`, `hq3`.
pub const PORTS: [u16; 3] = [5681, 5682, 5683];

/// The running cluster; `scripts/cluster stop` when dropped (also on panic).
#[derive(Debug)]
pub struct Cluster {
    _private: (),
}

impl Cluster {
    /// `scripts/cluster start` (idempotent: nodes already up are kept).
    /// Blocking: call it from `spawn_blocking` in async tests.
    pub fn start() -> Cluster {
        Cluster::bring_back();
        Cluster { _private: () }
    }

    /// Start whichever node is down again (`scripts/cluster start`); it
    /// rejoins with its data.
    pub fn bring_back() {
        script("cluster", &["start"]);
    }

    /// SIGKILL node `node` (`hq1`..`hq3`): its Erlang VM, `scripts/node kill`.
    pub fn kill(node: &str) {
        script("node", &["kill", node]);
    }

    /// `scripts/cluster status`; panics if it fails.
    pub fn status() -> String {
        script("cluster", &["status"])
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(crate::scripts::repo_root().join("scripts/cluster"))
            .arg("stop")
            .output();
    }
}

/// The node (`hq1`..`hq3`) listening on `port`.
pub fn node_of_port(port: u16) -> String {
    let i = PORTS
        .iter()
        .position(|p| *p == port)
        .expect("a cluster port")
        + 1;
    format!("hq{i}")
}

/// `rabbitmqctl -n NODE list_connections client_properties` mentions `name`.
pub fn node_has_connection(node: &str, name: &str) -> bool {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "-n",
            &format!("{node}@localhost"),
            "list_connections",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout).contains(&format!("\"{name}\""))
}

/// `name type` of every queue under `prefix`, as node `node` lists them.
pub fn queue_types(node: &str, prefix: &str) -> Vec<(String, String)> {
    let out = Command::new("rabbitmqctl")
        .args([
            "-q",
            "-n",
            &format!("{node}@localhost"),
            "list_queues",
            "name",
            "type",
        ])
        .output()
        .expect("rabbitmqctl runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (n, t) = (w.next()?, w.next()?);
            n.starts_with(prefix)
                .then(|| (n.to_string(), t.to_string()))
        })
        .collect()
}

/// Configuration for the whole cluster as guest (first node, the others as
/// fallback hosts), quorum queues, reconnecting forever from 200 ms.
pub fn config(prefix: &str) -> Config {
    let mut c = Config::default();
    c.rabbitmq.host = "127.0.0.1".into();
    c.rabbitmq.port = PORTS[0];
    c.rabbitmq.hosts = PORTS[1..]
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    c.rabbitmq.username = "guest".into();
    c.rabbitmq.password = Secret::new("guest");
    c.rabbitmq.vhost = "/".into();
    c.rabbitmq.connect_timeout = Duration::from_secs(10);
    c.rabbitmq.heartbeat = Duration::from_secs(5);
    c.rabbitmq.reconnect_delay = Duration::from_millis(200);
    c.rabbitmq.max_reconnect_attempts = 0;
    // Generous: a loaded 2-core machine, and a quorum leader election after the kill.
    c.rabbitmq.publish_timeout = Duration::from_secs(90);
    c.helixmq.prefix = prefix.into();
    c.helixmq.queue_type = QueueType::Quorum;
    c
}
