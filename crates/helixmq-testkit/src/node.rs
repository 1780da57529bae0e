//! Dedicated broker nodes: the fault node (started idempotently with
//! `scripts/node start`, never the shared one, kept running between tests and
//! stopped by `scripts/test`), a node of a test's own ([`Node`], stopped when
//! dropped), `rabbitmqctl` calls, and guards that undo a fault even when the
//! test panics.

use std::process::Command;

use crate::scripts::{repo_root, script_locked};

/// The dedicated node for faults that touch a whole broker: `hqfault@localhost`
/// unless `HELIXMQ_FAULT_NODE` names another (so two checkouts on one machine
/// can run their fault tests at once, each on its own node).
///
/// nextest runs the fault group two at a time (`.config/nextest.toml`) and
/// gives each running test of the group a slot (`NEXTEST_TEST_GROUP_SLOT`);
/// slot N > 0 has a node of its own, the name with N appended (`hqfault1`)
/// on the port + N, so two fault tests never share a node.
pub fn node_name() -> String {
    let base = std::env::var("HELIXMQ_FAULT_NODE").unwrap_or_else(|_| "hqfault".into());
    match group_slot() {
        0 => base,
        n => format!("{base}{n}"),
    }
}
/// Its AMQP port: 5690 (dist 25690, management 15790, prometheus 15890), or
/// `HELIXMQ_FAULT_PORT`; plus the group slot (see [`node_name`]).
pub fn node_port() -> u16 {
    let base = std::env::var("HELIXMQ_FAULT_PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(5690);
    base + group_slot()
}
/// The test's slot in its nextest test group, 0 outside one (cargo test, or a
/// test outside every group).
fn group_slot() -> u16 {
    std::env::var("NEXTEST_TEST_GROUP_SLOT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}
/// The shared node everyone else uses; only per-connection faults may touch it.
pub const SHARED_PORT: u16 = 5672;

/// Start the dedicated node if it is not running (`scripts/node start` is
/// idempotent: about 1 s when it runs already, about 15 s from cold), and make
/// sure no alarm or stopped app is left over from an interrupted earlier run.
pub async fn ensure_dedicated_node() {
    tokio::task::spawn_blocking(|| {
        let script = repo_root().join("scripts/node");
        let out = Command::new(&script)
            .args(["start", &node_name(), &node_port().to_string()])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "scripts/node start {} {} failed (run scripts/provision first?):\n{}{}",
            node_name(),
            node_port(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A previous run killed mid-fault may have left these behind.
        ctl(Some(&node_name()), &["start_app"]).expect("start_app on the dedicated node");
        ctl(Some(&node_name()), &["set_vm_memory_high_watermark", "0.4"])
            .expect("reset the memory watermark");
    })
    .await
    .expect("node start task");
}

/// `rabbitmqctl [-n NAME@localhost] ARGS` (the shared node when `node` is None);
/// stdout on success, a readable error otherwise.
pub fn ctl(node: Option<&str>, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("rabbitmqctl");
    cmd.arg("-q");
    if let Some(n) = node {
        cmd.args(["-n", &format!("{n}@localhost")]);
    }
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("cannot run rabbitmqctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "rabbitmqctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Close the connections whose client-provided name is `name` (only this
/// test's); returns how many were closed.
pub fn close_connections_named(node: Option<&str>, name: &str) -> usize {
    let list =
        ctl(node, &["list_connections", "pid", "client_properties"]).expect("list connections");
    let needle = format!("\"{name}\"");
    let mut n = 0;
    for line in list.lines().filter(|l| l.contains(&needle)) {
        let pid = line.split_whitespace().next().unwrap_or_default();
        if ctl(
            node,
            &["close_connection", pid, "helixmq fault test: forced close"],
        )
        .is_ok()
        {
            n += 1;
        }
    }
    n
}

/// `name ready unacked consumers` of every queue under `prefix` on `node`
/// (the shared node when None), one per line: where messages are when a wait
/// times out.
pub fn queue_depths(node: Option<&str>, prefix: &str) -> String {
    match ctl(
        node,
        &[
            "list_queues",
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        ],
    ) {
        Ok(list) => list
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => e,
    }
}

/// Raises the memory alarm on the dedicated node; clears it when dropped
/// (also on panic), so the node is never left alarmed.
#[derive(Debug)]
pub struct MemoryAlarm {
    cleared: bool,
}

impl MemoryAlarm {
    /// Set the watermark so low that the alarm goes off at once.
    pub fn raise() -> MemoryAlarm {
        ctl(
            Some(&node_name()),
            &["set_vm_memory_high_watermark", "0.0000001"],
        )
        .expect("raise the memory alarm");
        MemoryAlarm { cleared: false }
    }

    /// Restore the default watermark (0.4): the alarm clears.
    pub fn clear(&mut self) {
        ctl(Some(&node_name()), &["set_vm_memory_high_watermark", "0.4"])
            .expect("clear the memory alarm");
        self.cleared = true;
    }

    /// Whether the node reports a memory alarm now.
    pub fn active() -> bool {
        ctl(Some(&node_name()), &["eval", "rabbit_alarm:get_alarms()."])
            .map(|s| s.contains("memory"))
            .unwrap_or(false)
    }

    /// Wait until the node reports the alarm (at most 15 s). The alarm is
    /// the broker's state, not something a client can await: polled.
    pub async fn wait_active() {
        let raised = std::time::Instant::now();
        while !tokio::task::spawn_blocking(MemoryAlarm::active)
            .await
            .unwrap()
        {
            assert!(
                raised.elapsed() < std::time::Duration::from_secs(15),
                "memory alarm did not go off"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        if !self.cleared {
            let _ = ctl(Some(&node_name()), &["set_vm_memory_high_watermark", "0.4"]);
        }
    }
}

/// The dedicated node's application stopped; started again when dropped
/// (also on panic).
#[derive(Debug)]
pub struct AppStopped {
    started: bool,
}

impl AppStopped {
    /// `stop_app`: the node closes every connection and stops listening.
    pub fn stop() -> AppStopped {
        ctl(Some(&node_name()), &["stop_app"]).expect("stop_app on the dedicated node");
        AppStopped { started: false }
    }

    /// `start_app` and wait until it serves again.
    pub fn start(&mut self) {
        ctl(Some(&node_name()), &["start_app"]).expect("start_app on the dedicated node");
        ctl(Some(&node_name()), &["await_startup"]).expect("await_startup");
        self.started = true;
    }
}

impl Drop for AppStopped {
    fn drop(&mut self) {
        if !self.started {
            let _ = ctl(Some(&node_name()), &["start_app"]);
        }
    }
}

/// A dedicated node of one test's own (`scripts/node start NAME PORT
/// [SNIPPET]`, under a lock named after it); stopped when dropped, also when
/// an assertion fails.
#[derive(Debug)]
pub struct Node {
    name: String,
    port: u16,
}

impl Node {
    /// Start node `name` on AMQP port `port`, with the lines of
    /// `config_snippet` added to its `rabbitmq.conf` (none: the defaults).
    pub fn start(name: &str, port: u16, config_snippet: Option<&str>) -> Node {
        let snippet = config_snippet.map(|text| {
            let path =
                std::env::temp_dir().join(format!("helixmq-{name}-{}.conf", std::process::id()));
            std::fs::write(&path, text).expect("write the node's config snippet");
            path
        });
        let port_arg = port.to_string();
        let mut args = vec!["start", name, &port_arg];
        if let Some(p) = &snippet {
            args.push(p.to_str().expect("a UTF-8 temp path"));
        }
        // Stops it however the start ends: a half-started node is stopped too.
        let node = Node {
            name: name.to_string(),
            port,
        };
        script_locked(name, "node", &args);
        if let Some(p) = snippet {
            let _ = std::fs::remove_file(p);
        }
        node
    }

    /// Its AMQP port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/node"))
            .args(["stop", &self.name])
            .output();
    }
}
