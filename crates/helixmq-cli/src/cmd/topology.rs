//! `helixmq topology export | apply | diff | delete`.
//!
//! `export` needs no broker: it renders the configured topology as RabbitMQ
//! definitions JSON (the source of `configs/rabbitmq/definitions.json`).
//! `apply` declares it over AMQP; `diff` compares it with what the management
//! API reports; `delete` removes it (tests, demos, teardown).

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use helixmq::topology::definitions_json;
use serde_json::Value;

use crate::common::{applied_topology, connect, endpoint, load_config};
use crate::Global;
use helixmq::management::Management;

/// `helixmq topology ...`
#[derive(Debug, Subcommand)]
pub enum TopologyCmd {
    /// Print the RabbitMQ definitions JSON (exchanges, queues with arguments,
    /// bindings, the user's permissions; no password) for `rabbitmqctl import_definitions`.
    Export,
    /// Declare every exchange, queue and binding (idempotent). A conflict with an
    /// existing queue (406 PRECONDITION_FAILED) is explained with its fix.
    Apply,
    /// Compare the broker (management API) with the configuration: missing,
    /// extra (under the prefix) and different objects. Exit 2 when they differ.
    Diff {
        /// JSON output: `{"in_sync", "differences": [{"kind", "object", "detail"}], "notes"}`.
        #[arg(long)]
        json: bool,
    },
    /// Delete every exchange and queue of the topology, retry tiers,
    /// request-reply's reply queues and the shared rate limits' queues included.
    /// Messages in them are lost: refuses without `--yes`.
    Delete {
        /// Really delete.
        #[arg(long)]
        yes: bool,
    },
}

/// Run a `topology` subcommand.
pub async fn run(global: &Global, cmd: TopologyCmd) -> anyhow::Result<ExitCode> {
    let cfg = load_config(global)?;
    match cmd {
        TopologyCmd::Export => {
            outln!("{}", export_json(&cfg));
            Ok(ExitCode::SUCCESS)
        }
        TopologyCmd::Apply => {
            let t = applied_topology(&cfg);
            let broker = connect(&cfg).await?;
            let res = broker.declare(&t).await.context("topology apply failed");
            let _ = broker.close().await;
            res?;
            outln!(
                "declared {} exchanges, {} queues, {} bindings under prefix '{}' on {} (vhost '{}')",
                t.exchanges.len(),
                t.queues.len(),
                t.bindings.len(),
                cfg.helixmq.prefix,
                endpoint(&cfg),
                cfg.rabbitmq.vhost
            );
            Ok(ExitCode::SUCCESS)
        }
        TopologyCmd::Diff { json } => diff(global, &cfg, json).await,
        TopologyCmd::Delete { yes } => delete(global, &cfg, yes).await,
    }
}

/// The definitions document as pretty JSON (what `export` prints).
pub fn export_json(cfg: &helixmq::Config) -> String {
    let doc = definitions_json(
        &applied_topology(cfg),
        &cfg.rabbitmq.vhost,
        &cfg.rabbitmq.username,
    );
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// One difference between the broker and the configuration.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Diff {
    Missing(String),
    Extra(String),
    Differs(String, String),
}

async fn diff(global: &Global, cfg: &helixmq::Config, json: bool) -> anyhow::Result<ExitCode> {
    let t = applied_topology(cfg);
    let want = definitions_json(&t, &cfg.rabbitmq.vhost, &cfg.rabbitmq.username);
    let mgmt = Management::from_config(cfg, global.management_url.as_deref())?;
    let vh = Management::vhost_segment(&cfg.rabbitmq.vhost);
    let have_q = mgmt
        .get(&format!("queues/{vh}?columns=name,durable,arguments"))
        .await?;
    let have_x = mgmt
        .get(&format!(
            "exchanges/{vh}?columns=name,type,durable,arguments"
        ))
        .await?;
    let have_b = mgmt.get(&format!("bindings/{vh}")).await?;
    let prefix = format!("{}.", cfg.helixmq.prefix);
    let retry_tier = format!("{}retry.", prefix);

    let mut diffs = Vec::new();
    let mut notes = Vec::new();
    let by_name = |v: &Value| -> BTreeMap<String, Value> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| Some((o.get("name")?.as_str()?.to_string(), o.clone())))
            .collect()
    };
    // Exchanges: kind, durability, arguments (alternate-exchange).
    let want_x = by_name(&want["exchanges"]);
    let have_x = by_name(&have_x);
    for (name, w) in &want_x {
        match have_x.get(name) {
            None => diffs.push(Diff::Missing(format!(
                "exchange {name} ({})",
                w["type"].as_str().unwrap_or("?")
            ))),
            Some(h) => {
                for field in ["type", "durable"] {
                    if h.get(field) != w.get(field) {
                        diffs.push(Diff::Differs(
                            format!("exchange {name}"),
                            format!(
                                "{field}: broker {}, configured {}",
                                show(h.get(field)),
                                show(w.get(field))
                            ),
                        ));
                    }
                }
                for d in arg_diffs(&w["arguments"], &h["arguments"]) {
                    diffs.push(Diff::Differs(format!("exchange {name}"), d));
                }
            }
        }
    }
    for name in have_x
        .keys()
        .filter(|n| n.starts_with(&prefix) && !want_x.contains_key(*n))
    {
        if name.starts_with(&retry_tier) {
            notes.push(format!(
                "retry tier exchange {name} (declared by a worker with another --retry-delay)"
            ));
        } else {
            diffs.push(Diff::Extra(format!("exchange {name}")));
        }
    }
    // Queues: durability and every x- argument.
    let want_q = by_name(&want["queues"]);
    let have_q = by_name(&have_q);
    for (name, w) in &want_q {
        match have_q.get(name) {
            None => diffs.push(Diff::Missing(format!("queue {name}"))),
            Some(h) => {
                if h.get("durable") != w.get("durable") {
                    diffs.push(Diff::Differs(
                        format!("queue {name}"),
                        format!(
                            "durable: broker {}, configured {}",
                            show(h.get("durable")),
                            show(w.get("durable"))
                        ),
                    ));
                }
                for d in arg_diffs(&w["arguments"], &h["arguments"]) {
                    diffs.push(Diff::Differs(format!("queue {name}"), d));
                }
            }
        }
    }
    for name in have_q
        .keys()
        .filter(|n| n.starts_with(&prefix) && !want_q.contains_key(*n))
    {
        if name.starts_with(&retry_tier) {
            notes.push(format!(
                "retry tier queue {name} (declared by a worker with another --retry-delay)"
            ));
        } else {
            diffs.push(Diff::Extra(format!("queue {name}")));
        }
    }
    // Bindings as (source, destination, key); the default exchange's implicit ones are skipped.
    let key = |b: &Value| -> Option<(String, String, String)> {
        Some((
            b.get("source")?.as_str()?.to_string(),
            b.get("destination")?.as_str()?.to_string(),
            b.get("routing_key")?.as_str()?.to_string(),
        ))
    };
    let want_b: BTreeSet<_> = want["bindings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(key)
        .collect();
    let have_b: BTreeSet<_> = have_b
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| b.get("destination_type").and_then(Value::as_str) == Some("queue"))
        .filter_map(key)
        .filter(|(s, d, _)| !s.is_empty() && (s.starts_with(&prefix) || d.starts_with(&prefix)))
        .collect();
    for (s, d, k) in want_b.difference(&have_b) {
        diffs.push(Diff::Missing(format!("binding {s} -> {d} (key '{k}')")));
    }
    for (s, d, k) in have_b.difference(&want_b) {
        if s.starts_with(&retry_tier) || d.starts_with(&retry_tier) {
            continue;
        }
        diffs.push(Diff::Extra(format!("binding {s} -> {d} (key '{k}')")));
    }

    diffs.sort();
    if json {
        let differences: Vec<Value> = diffs
            .iter()
            .map(|d| match d {
                Diff::Missing(what) => serde_json::json!({"kind": "missing", "object": what}),
                Diff::Extra(what) => serde_json::json!({"kind": "extra", "object": what}),
                Diff::Differs(what, how) => {
                    serde_json::json!({"kind": "differs", "object": what, "detail": how})
                }
            })
            .collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "in_sync": diffs.is_empty(),
                "prefix": cfg.helixmq.prefix,
                "vhost": cfg.rabbitmq.vhost,
                "differences": differences,
                "notes": notes,
            }))?
        );
        return Ok(if diffs.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        });
    }
    for n in &notes {
        outln!("note     {n}");
    }
    if diffs.is_empty() {
        outln!(
            "in sync: {} exchanges, {} queues, {} bindings under '{}' match the configuration ({} vhost '{}')",
            want_x.len(),
            want_q.len(),
            want_b.len(),
            cfg.helixmq.prefix,
            mgmt.base(),
            cfg.rabbitmq.vhost
        );
        return Ok(ExitCode::SUCCESS);
    }
    for d in &diffs {
        match d {
            Diff::Missing(what) => outln!("missing  {what}"),
            Diff::Extra(what) => outln!("extra    {what}"),
            Diff::Differs(what, how) => outln!("differs  {what}: {how}"),
        }
    }
    outln!(
        "{} difference(s); `helixmq topology apply` creates what is missing; a queue whose \
         arguments differ must be deleted and re-declared (or the configuration changed)",
        diffs.len()
    );
    Ok(ExitCode::from(2))
}

/// Differences between configured and broker queue arguments, one line each.
fn arg_diffs(want: &Value, have: &Value) -> Vec<String> {
    let empty = serde_json::Map::new();
    let w = want.as_object().unwrap_or(&empty);
    let h = have.as_object().unwrap_or(&empty);
    let mut out = Vec::new();
    for k in w.keys().chain(h.keys()).collect::<BTreeSet<_>>() {
        let (wv, hv) = (w.get(k), h.get(k));
        // Newer brokers fill in the default queue type; it is not a difference.
        if k == "x-queue-type" && wv.is_none() && hv.and_then(Value::as_str) == Some("classic") {
            continue;
        }
        if wv != hv {
            out.push(format!("{k}: broker {}, configured {}", show(hv), show(wv)));
        }
    }
    out
}

fn show(v: Option<&Value>) -> String {
    match v {
        None => "(none)".into(),
        Some(v) => v.to_string(),
    }
}

async fn delete(global: &Global, cfg: &helixmq::Config, yes: bool) -> anyhow::Result<ExitCode> {
    let t = applied_topology(cfg);
    let mut queues: Vec<String> = t.queues.iter().map(|q| q.name.clone()).collect();
    let mut exchanges: Vec<String> = t.exchanges.iter().map(|e| e.name.clone()).collect();
    // Retry tiers of other delays exist only on the broker: find them through the
    // management API when it is there.
    let tier = format!("{}.retry.", cfg.helixmq.prefix);
    // Request-reply's exchange and reply queues, and the shared rate limits'
    // exchange and queues, are declared on first use.
    exchanges.push(t.names.replies_exchange());
    exchanges.push(t.names.rate_limit_exchange());
    let on_first_use = [
        format!("{}.", t.names.replies_exchange()),
        format!("{}.", t.names.rate_limit_exchange()),
    ];
    if let Ok(m) = Management::from_config(cfg, global.management_url.as_deref()) {
        let vh = Management::vhost_segment(&cfg.rabbitmq.vhost);
        if let Ok(v) = m.get(&format!("queues/{vh}?columns=name")).await {
            for n in v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|q| q["name"].as_str())
            {
                if (n.starts_with(&tier) || on_first_use.iter().any(|p| n.starts_with(p)))
                    && !queues.iter().any(|q| q == n)
                {
                    queues.push(n.to_string());
                }
            }
        }
        if let Ok(v) = m.get(&format!("exchanges/{vh}?columns=name")).await {
            for n in v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|q| q["name"].as_str())
            {
                if n.starts_with(&tier) && !exchanges.iter().any(|q| q == n) {
                    exchanges.push(n.to_string());
                }
            }
        }
    }
    if !yes {
        anyhow::bail!(
            "refusing to delete {} queues and {} exchanges under '{}' (their messages are lost) without --yes",
            queues.len(),
            exchanges.len(),
            cfg.helixmq.prefix
        );
    }
    let broker = connect(cfg).await?;
    let backend = broker.backend();
    let mut failed = Vec::new();
    for q in &queues {
        if let Err(e) = backend.delete_queue(q).await {
            if !matches!(e, helixmq::Error::NotFound { .. }) {
                failed.push(format!("queue {q}: {e}"));
            }
        }
    }
    for x in &exchanges {
        if let Err(e) = backend.delete_exchange(x).await {
            if !matches!(e, helixmq::Error::NotFound { .. }) {
                failed.push(format!("exchange {x}: {e}"));
            }
        }
    }
    let _ = broker.close().await;
    if !failed.is_empty() {
        anyhow::bail!("could not delete:\n  {}", failed.join("\n  "));
    }
    outln!(
        "deleted {} queues and {} exchanges under '{}'",
        queues.len(),
        exchanges.len(),
        cfg.helixmq.prefix
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn argument_differences() {
        let w = json!({"x-max-priority": 10, "x-dead-letter-exchange": "p.dlx"});
        let h = json!({"x-max-priority": 5, "x-queue-type": "classic", "x-dead-letter-exchange": "p.dlx"});
        assert_eq!(
            arg_diffs(&w, &h),
            vec!["x-max-priority: broker 5, configured 10".to_string()]
        );
        assert!(arg_diffs(&w, &w).is_empty());
        assert_eq!(arg_diffs(&json!({}), &json!({"x-message-ttl": 1})).len(), 1);
    }
}
