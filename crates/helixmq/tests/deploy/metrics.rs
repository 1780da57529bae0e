//! Every metric the Grafana dashboard and the Prometheus alert rules query
//! exists: either helixmq exports it (a real scrape of `Metrics::new`) or
//! RabbitMQ's rabbitmq_prometheus plugin exposes it on an endpoint that
//! `deploy/prometheus/prometheus.yml` scrapes (a real scrape of the local
//! broker's plugin on 15692, enabled by `scripts/provision`). Also: the spec's
//! thresholds are in the rules, and the rule and dashboard files are well formed.

use helixmq_testkit::prom;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use helixmq::metrics::{ExchangeLabel, QueueLabel};
use helixmq::Metrics;
use prometheus_client::registry::Registry;
use serde_json::Value;

const PLUGIN: &str = "http://127.0.0.1:15692";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Metric names a PromQL expression selects. Label matchers, ranges, strings,
/// grouping clauses, function and aggregation names and numbers are skipped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    // Aggregators may be followed by `by (...)` before their `(`, so they are keywords too.
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "Inf",
        "NaN",
        "inf",
        "nan",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
    ];
    let s: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    // Index just past the quoted string starting at `i`.
    let skip_string = |mut i: usize| -> usize {
        let q = s[i];
        i += 1;
        while i < s.len() && s[i] != q {
            if s[i] == '\\' {
                i += 1;
            }
            i += 1;
        }
        assert!(i < s.len(), "unterminated string in {expr:?}");
        i + 1
    };
    // Index just past the bracket matching the one at `i`, honouring strings.
    let skip_group = |mut i: usize, open: char, close: char| -> usize {
        let mut depth = 0;
        while i < s.len() {
            match s[i] {
                '"' | '\'' | '`' => {
                    i = skip_string(i);
                    continue;
                }
                c if c == open => depth += 1,
                c if c == close => {
                    depth -= 1;
                    if depth == 0 {
                        return i + 1;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        panic!("unbalanced {open}{close} in {expr:?}");
    };
    let mut skip_next_token = false;
    while i < s.len() {
        let c = s[i];
        if c == '{' {
            i = skip_group(i, '{', '}');
        } else if c == '[' {
            i = skip_group(i, '[', ']');
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_string(i);
        } else if c.is_ascii_digit()
            || (c == '.' && s.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            skip_next_token = false;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == '_' || s[i] == ':') {
                i += 1;
            }
            let word: String = s[start..i].iter().collect();
            let mut j = i;
            while j < s.len() && s[j].is_whitespace() {
                j += 1;
            }
            let called = s.get(j) == Some(&'(');
            if GROUPING.contains(&word.as_str()) {
                if called {
                    i = skip_group(j, '(', ')');
                }
            } else if std::mem::take(&mut skip_next_token)
                || called
                || KEYWORDS.contains(&word.as_str())
            {
                skip_next_token = word == "offset";
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn promql_names_are_extracted() {
    let n = metric_names(
        r#"histogram_quantile(0.99, sum by (le, queue) (rate(a_bucket{q=~"x.+\\.dlq",b!="}"}[5m] offset 1h))) > 1e3 and on(instance) group_left(x) b == bool 0"#,
    );
    assert_eq!(n, BTreeSet::from(["a_bucket".to_string(), "b".to_string()]));
    assert_eq!(
        metric_names("sum(rate(x_total[$__rate_interval])) > 0.5 * y"),
        BTreeSet::from(["x_total".into(), "y".into()])
    );
}

/// Every expression of the dashboard, with the panel title for messages.
fn dashboard_exprs() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(&read("deploy/grafana/helixmq-dashboard.json"))
        .expect("dashboard is JSON");
    assert!(d["title"].is_string() && d["uid"].is_string() && d["schemaVersion"].is_u64());
    let mut out = Vec::new();
    let mut ids = BTreeSet::new();
    fn walk(panels: &Value, out: &mut Vec<(String, String)>, ids: &mut BTreeSet<u64>) {
        for p in panels.as_array().into_iter().flatten() {
            let id = p["id"].as_u64().expect("panel id");
            assert!(ids.insert(id), "duplicate panel id {id}");
            let title = p["title"].as_str().unwrap_or_default().to_string();
            let mut refs = BTreeSet::new();
            for t in p["targets"].as_array().into_iter().flatten() {
                assert!(
                    refs.insert(t["refId"].as_str().expect("refId")),
                    "duplicate refId in {title}"
                );
                out.push((title.clone(), t["expr"].as_str().expect("expr").to_string()));
            }
            walk(&p["panels"], out, ids);
        }
    }
    walk(&d["panels"], &mut out, &mut ids);
    assert!(!out.is_empty(), "dashboard queries nothing");
    out
}

/// Every alert rule: (name, expr), checked for the fields Prometheus needs.
fn alert_rules() -> Vec<(String, String)> {
    let doc: Value =
        serde_saphyr::from_str(&read("deploy/prometheus/alerts.yml")).expect("alerts.yml is YAML");
    let mut out = Vec::new();
    for g in doc["groups"].as_array().expect("groups") {
        assert!(g["name"].is_string());
        for r in g["rules"].as_array().expect("rules") {
            let name = r["alert"].as_str().expect("alert name").to_string();
            let expr = r["expr"].as_str().expect("expr").trim().to_string();
            assert!(
                ["warning", "critical"].contains(&r["labels"]["severity"].as_str().unwrap_or("")),
                "{name}: severity"
            );
            assert!(r["annotations"]["summary"].is_string(), "{name}: summary");
            if let Some(f) = r.get("for") {
                humantime::parse_duration(f.as_str().unwrap())
                    .unwrap_or_else(|e| panic!("{name}: for: {e}"));
            }
            out.push((name, expr));
        }
    }
    out
}

/// What helixmq exports: a real scrape after touching every family once.
fn helixmq_names() -> BTreeSet<String> {
    let mut registry = Registry::default();
    let m = Metrics::new(&mut registry);
    let ex = ExchangeLabel {
        exchange: "x".into(),
    };
    let q = QueueLabel { queue: "q".into() };
    m.published.get_or_create(&ex).inc();
    m.publish_failures.get_or_create(&ex).inc();
    for f in [
        &m.consumed,
        &m.acked,
        &m.nacked,
        &m.retried,
        &m.dead_lettered,
        &m.duplicates_skipped,
    ] {
        f.get_or_create(&q).inc();
    }
    m.publish_latency.observe(0.01);
    m.handler_duration.observe(0.01);
    m.handlers_in_flight.inc();
    m.confirms_pending.inc();
    m.connection_state.set(1);
    m.connection_successes.inc();
    m.connection_failures.inc();
    m.connection_recoveries.inc();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let scrape = prom::parse(&text).unwrap();
    // Every family registered produced samples (a family without any would be invisible).
    for fam in scrape.types.keys() {
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.name.starts_with(fam.as_str())),
            "{fam} has no sample"
        );
    }
    scrape.names()
}

/// The endpoints of the plugin that prometheus.yml scrapes (jobs `rabbitmq*`).
fn plugin_endpoints() -> Vec<String> {
    let doc: Value = serde_saphyr::from_str(&read("deploy/prometheus/prometheus.yml"))
        .expect("prometheus.yml is YAML");
    let mut urls = Vec::new();
    for job in doc["scrape_configs"].as_array().expect("scrape_configs") {
        if !job["job_name"].as_str().unwrap().starts_with("rabbitmq") {
            continue;
        }
        let path = job["metrics_path"].as_str().unwrap_or("/metrics");
        let query: Vec<String> = job["params"]
            .as_object()
            .into_iter()
            .flatten()
            .flat_map(|(k, vs)| {
                vs.as_array()
                    .unwrap()
                    .iter()
                    .map(move |v| format!("{k}={}", v.as_str().unwrap()))
            })
            .collect();
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{}", query.join("&"))
        };
        urls.push(format!("{PLUGIN}{path}{q}"));
    }
    assert!(
        urls.len() >= 2,
        "prometheus.yml must scrape the plugin's aggregated and per-queue endpoints"
    );
    urls
}

async fn plugin_names() -> BTreeMap<String, BTreeSet<String>> {
    let mut out = BTreeMap::new();
    for url in plugin_endpoints() {
        let r = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(&url)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                "cannot scrape {url}: {e}. Is rabbitmq_prometheus enabled? Run scripts/provision"
            )
            });
        assert!(r.status().is_success(), "{url}: HTTP {}", r.status());
        let text = r.text().await.unwrap();
        let scrape = prom::parse(&text).unwrap_or_else(|e| panic!("{url} does not parse: {e}"));
        out.insert(url, scrape.names());
    }
    out
}

#[tokio::test]
async fn every_queried_metric_exists() {
    let helix = helixmq_names();
    let plugin = plugin_names().await;
    let plugin_all: BTreeSet<String> = plugin.values().flatten().cloned().collect();
    assert!(
        plugin_all.contains("rabbitmq_connections"),
        "unexpected plugin scrape: {plugin:?}"
    );

    let mut queried = dashboard_exprs();
    queried.extend(alert_rules());
    let mut used_helix = BTreeSet::new();
    let mut used_plugin = BTreeSet::new();
    let mut missing = Vec::new();
    for (owner, expr) in &queried {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{owner}: no metric in {expr:?}");
        for n in names {
            if helix.contains(&n) {
                used_helix.insert(n);
            } else if plugin_all.contains(&n) {
                used_plugin.insert(n);
            } else {
                missing.push(format!("{owner}: {n} (in {expr})"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "metrics neither helixmq nor the plugin exports:\n  {}\nhelixmq: {helix:?}",
        missing.join("\n  ")
    );
    // The spec's client metrics are all on the dashboard.
    for spec in [
        "rabbitmq_messages_published_total",
        "rabbitmq_messages_consumed_total",
        "rabbitmq_messages_acked_total",
        "rabbitmq_messages_nacked_total",
        "rabbitmq_messages_dead_lettered_total",
        "rabbitmq_publish_latency_seconds_bucket",
        "rabbitmq_connection_state",
        "rabbitmq_messages_retried_total",
    ] {
        assert!(used_helix.contains(spec), "{spec} is not queried anywhere");
    }
    assert!(
        used_plugin.len() >= 4,
        "broker-side panels missing: {used_plugin:?}"
    );
}

#[test]
fn spec_thresholds_are_alerted() {
    let rules = alert_rules();
    let norm = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    for want in [
        "rabbitmq_detailed_queue_messages_ready > 10000",
        "rabbitmq_detailed_queue_messages_unacked > 1000",
        "rabbitmq_channels > 100",
        "rabbitmq_connections > 50",
        "rabbitmq_connection_state == 0",
    ] {
        assert!(
            rules.iter().any(|(_, e)| norm(e) == want),
            "no rule `{want}` in alerts.yml"
        );
    }
    for (name, metric) in [
        ("DLQ growth", "rabbitmq_detailed_queue_messages"),
        ("dead-lettering", "rabbitmq_messages_dead_lettered_total"),
        ("publish failures", "rabbitmq_publish_failures_total"),
    ] {
        assert!(
            rules.iter().any(|(_, e)| metric_names(e).contains(metric)),
            "no {name} rule on {metric}"
        );
    }
}
