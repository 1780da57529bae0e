//! Render a [`Topology`] as RabbitMQ definitions JSON (`rabbitmqctl import_definitions`).
//!
//! No user entry is written: a definitions file in a repository must not hold a
//! password, not even hashed. Create the user with
//! `rabbitmqctl add_user helixagent '<password>'`; the permissions entry is written.

use super::{ArgValue, Topology};
use serde_json::{json, Map, Value};

/// The definitions document for `vhost`, with the spec's permissions for `user`
/// (configure/write/read `{prefix}\..*`).
pub fn definitions_json(topology: &Topology, vhost: &str, user: &str) -> Value {
    let pattern = format!("^{}\\..*", regex_escape(topology.names.prefix()));
    let exchanges: Vec<Value> = topology
        .exchanges
        .iter()
        .map(|e| {
            let args: Map<String, Value> = e
                .arguments()
                .into_iter()
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            json!({
                "name": e.name, "vhost": vhost, "type": e.kind.as_str(),
                "durable": e.durable, "auto_delete": false, "internal": false, "arguments": args
            })
        })
        .collect();
    let queues: Vec<Value> = topology
        .queues
        .iter()
        .map(|q| {
            let mut args = Map::new();
            for (k, v) in q.arguments() {
                args.insert(
                    k.to_string(),
                    match v {
                        ArgValue::Int(i) => json!(i),
                        ArgValue::Str(s) => json!(s),
                        ArgValue::Bool(b) => json!(b),
                    },
                );
            }
            json!({"name": q.name, "vhost": vhost, "durable": q.durable, "auto_delete": false, "arguments": args})
        })
        .collect();
    let bindings: Vec<Value> = topology
        .bindings
        .iter()
        .map(|b| {
            json!({
                "source": b.exchange, "vhost": vhost, "destination": b.queue,
                "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}
            })
        })
        .collect();
    json!({
        "vhosts": [{"name": vhost}],
        "permissions": [{"user": user, "vhost": vhost, "configure": pattern, "write": pattern, "read": pattern}],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    })
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
