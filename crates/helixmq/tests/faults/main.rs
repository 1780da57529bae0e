//! Fault injection: scenarios that publish and consume while connections are
//! cut, black-holed or force-closed, a node is stopped, alarmed or killed, or
//! a worker dies; each ends with `helixmq_testkit::scenario::Scenario::finish`
//! (lost = 0, duplicates counted). The cluster tests (quorum queues, failover)
//! belong here too. Those that stop, alarm or kill a node run two at a time
//! (`.config/nextest.toml`), each on a fault node of its own (picked by its
//! nextest group slot, `helixmq_testkit::node::node_name`) or the cluster,
//! never the shared broker.

mod black_hole;
mod broker_restart;
mod cluster_failover;
mod cluster_quorum;
mod force_close;
mod memory_alarm;
mod publisher_nack;
mod scheduled_restart;
mod total_queue;
mod worker_kill;
