//! Environment variables: where they come from ([`EnvSource`]) and which
//! configuration fields they override.
//!
//! Precedence, lowest first: the file, the spec's `RABBITMQ_*` variables,
//! `RABBITMQ_HOSTS`, `RABBITMQ_URL`, `HELIXMQ_PREFIX`. A variable set to the
//! empty string counts as unset, like `${VAR:-default}` does, because
//! compose files and CI systems often pass empty variables through.
//!
//! `RABBITMQ_HOSTS` and the extra nodes of a comma-separated `RABBITMQ_URL`
//! (in that order) replace the file's `hosts`. A URL sets host, port, vhost
//! and TLS on/off, and user, password, `heartbeat`, `connection_timeout` only
//! when it has them, so `RABBITMQ_URL=amqp://host` plus `RABBITMQ_PASSWORD`
//! works.

use super::loose::Loose;
use super::url;
use std::collections::{BTreeMap, HashMap};

/// Where environment variables come from: the process, or a map in tests.
#[derive(Debug, Clone, Default)]
pub enum EnvSource {
    /// `std::env`.
    #[default]
    Process,
    /// A fixed map (tests).
    Map(HashMap<String, String>),
}

impl EnvSource {
    /// A map source from pairs, e.g. `EnvSource::map([("RABBITMQ_PORT", "5673")])`.
    pub fn map<K: Into<String>, V: Into<String>>(pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        EnvSource::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// Look a variable up. A variable that is not valid Unicode counts as unset.
    pub fn get(&self, key: &str) -> Option<String> {
        match self {
            EnvSource::Process => std::env::var(key).ok(),
            EnvSource::Map(m) => m.get(key).cloned(),
        }
    }

    /// Look a variable up, treating the empty string as unset.
    fn get_non_empty(&self, key: &str) -> Option<String> {
        self.get(key).filter(|v| !v.is_empty())
    }
}

/// The spec's variables and the field each one overrides.
pub(crate) const SIMPLE_VARS: &[(&str, &str)] = &[
    ("RABBITMQ_HOST", "rabbitmq.host"),
    ("RABBITMQ_PORT", "rabbitmq.port"),
    ("RABBITMQ_USER", "rabbitmq.username"),
    ("RABBITMQ_PASSWORD", "rabbitmq.password"),
    ("RABBITMQ_VHOST", "rabbitmq.vhost"),
    ("RABBITMQ_PREFETCH_COUNT", "rabbitmq.prefetch_count"),
    ("RABBITMQ_PUBLISHER_CONFIRM", "rabbitmq.publisher_confirm"),
];

/// One field's value from the environment, and which variable gave it.
#[derive(Debug, Clone)]
pub(crate) struct Override {
    /// The value, as loose as a file value so the same checks apply.
    pub value: Loose,
    /// The variable name(s), for problem lines.
    pub origin: String,
}

/// Everything the environment contributes.
#[derive(Debug, Default)]
pub(crate) struct EnvLayer {
    /// Field path → value.
    pub overrides: BTreeMap<&'static str, Override>,
    /// Problems with the variables themselves (a bad `RABBITMQ_URL`).
    pub problems: Vec<String>,
    /// Passwords seen, so that the loader can scrub them from every message.
    pub secrets: Vec<String>,
}

impl EnvLayer {
    fn set(&mut self, path: &'static str, value: Loose, origin: &str) {
        self.overrides.insert(
            path,
            Override {
                value,
                origin: origin.to_string(),
            },
        );
    }

    /// Read every variable helixmq knows from `env`.
    pub(crate) fn read(env: &EnvSource) -> EnvLayer {
        let mut layer = EnvLayer::default();
        for (var, path) in SIMPLE_VARS {
            if let Some(v) = env.get_non_empty(var) {
                if *var == "RABBITMQ_PASSWORD" {
                    layer.secrets.push(v.clone());
                }
                layer.set(path, Loose::Str(v), var);
            }
        }
        let mut hosts: Vec<Loose> = Vec::new();
        let mut hosts_origin: Vec<&str> = Vec::new();
        if let Some(list) = env.get_non_empty("RABBITMQ_HOSTS") {
            hosts.extend(list.split(',').map(|h| Loose::Str(h.trim().to_string())));
            hosts_origin.push("RABBITMQ_HOSTS");
        }
        if let Some(text) = env.get_non_empty("RABBITMQ_URL") {
            layer.secrets.extend(raw_passwords(&text));
            let (urls, errors) = url::parse_list(&text);
            layer
                .problems
                .extend(errors.into_iter().map(|e| format!("RABBITMQ_URL: {e}")));
            layer
                .secrets
                .extend(urls.iter().filter_map(|u| u.password.clone()));
            if let Some(first) = urls.first() {
                layer.check_same_settings(&urls);
                layer.set(
                    "rabbitmq.host",
                    Loose::Str(first.host.clone()),
                    "RABBITMQ_URL",
                );
                layer.set(
                    "rabbitmq.port",
                    Loose::Int(first.port.into()),
                    "RABBITMQ_URL",
                );
                layer.set(
                    "rabbitmq.vhost",
                    Loose::Str(first.vhost.clone()),
                    "RABBITMQ_URL",
                );
                layer.set(
                    "rabbitmq.tls.enabled",
                    Loose::Bool(first.tls),
                    "RABBITMQ_URL",
                );
                if let Some(u) = &first.username {
                    layer.set("rabbitmq.username", Loose::Str(u.clone()), "RABBITMQ_URL");
                }
                if let Some(p) = &first.password {
                    layer.set("rabbitmq.password", Loose::Str(p.clone()), "RABBITMQ_URL");
                }
                if let Some(h) = first.heartbeat {
                    layer.set(
                        "rabbitmq.heartbeat",
                        Loose::Str(format!("{}s", h.as_secs())),
                        "RABBITMQ_URL",
                    );
                }
                if let Some(t) = first.connect_timeout {
                    layer.set(
                        "rabbitmq.connect_timeout",
                        Loose::Str(format!("{}ms", t.as_millis())),
                        "RABBITMQ_URL",
                    );
                }
                for u in &urls[1..] {
                    let host = if u.host.contains(':') {
                        format!("[{}]", u.host)
                    } else {
                        u.host.clone()
                    };
                    hosts.push(Loose::Str(format!("{host}:{}", u.port)));
                }
                if urls.len() > 1 {
                    hosts_origin.push("RABBITMQ_URL");
                }
            }
        }
        if !hosts_origin.is_empty() {
            let origin = hosts_origin.join(" and ");
            layer.set("rabbitmq.hosts", Loose::Seq(hosts), &origin);
        }
        if let Some(prefix) = env.get_non_empty("HELIXMQ_PREFIX") {
            layer.set("helixmq.prefix", Loose::Str(prefix), "HELIXMQ_PREFIX");
        }
        layer
    }

    /// Several URLs name nodes of one cluster: they must agree on everything but the address.
    fn check_same_settings(&mut self, urls: &[url::AmqpUrl]) {
        let first = &urls[0];
        for (i, u) in urls.iter().enumerate().skip(1) {
            let mut differs = Vec::new();
            if u.tls != first.tls {
                differs.push("scheme");
            }
            if u.username != first.username {
                differs.push("user");
            }
            if u.password != first.password {
                differs.push("password");
            }
            if u.vhost != first.vhost {
                differs.push("vhost");
            }
            if u.heartbeat != first.heartbeat || u.connect_timeout != first.connect_timeout {
                differs.push("query parameters");
            }
            if !differs.is_empty() {
                self.problems.push(format!(
                    "RABBITMQ_URL: entry {} (`{}:{}`) differs from entry 1 in its {}; the URLs of a comma-separated list are nodes of one cluster and must share scheme, user, password, vhost and parameters",
                    i + 1,
                    u.host,
                    u.port,
                    differs.join(", ")
                ));
            }
        }
    }
}

/// The password parts of URLs as written (still percent-encoded, possibly
/// unparseable), so that they are scrubbed even from messages about URLs that
/// did not parse.
fn raw_passwords(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for entry in text.split(',') {
        let Some((_, rest)) = entry.split_once("://") else {
            continue;
        };
        let (userinfo, has_at) = match rest.rfind('@') {
            Some(at) => (&rest[..at], true),
            None => (rest.split('/').next().unwrap_or(""), false),
        };
        if let Some((_, pass)) = userinfo.split_once(':') {
            // Without `@`, digits after `:` are a port, not a password.
            let is_port = !has_at && pass.bytes().all(|b| b.is_ascii_digit());
            if !pass.is_empty() && !is_port {
                out.push(pass.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_variables_override_their_fields() {
        let layer = EnvLayer::read(&EnvSource::map([
            ("RABBITMQ_HOST", "h"),
            ("RABBITMQ_PORT", "1"),
            ("RABBITMQ_USER", ""),
        ]));
        assert_eq!(
            layer.overrides["rabbitmq.host"].value,
            Loose::Str("h".into())
        );
        assert_eq!(layer.overrides["rabbitmq.port"].origin, "RABBITMQ_PORT");
        assert!(
            !layer.overrides.contains_key("rabbitmq.username"),
            "empty counts as unset"
        );
    }

    #[test]
    fn url_list_gives_hosts_after_rabbitmq_hosts() {
        let layer = EnvLayer::read(&EnvSource::map([
            ("RABBITMQ_HOSTS", "x:1, y:2"),
            (
                "RABBITMQ_URL",
                "amqp://u:p@a:5672/v,amqp://u:p@[::1]:5673/v",
            ),
        ]));
        assert!(layer.problems.is_empty(), "{:?}", layer.problems);
        assert_eq!(
            layer.overrides["rabbitmq.hosts"].value,
            Loose::Seq(vec![
                Loose::Str("x:1".into()),
                Loose::Str("y:2".into()),
                Loose::Str("[::1]:5673".into())
            ])
        );
        assert_eq!(
            layer.overrides["rabbitmq.hosts"].origin,
            "RABBITMQ_HOSTS and RABBITMQ_URL"
        );
    }

    #[test]
    fn url_list_must_agree() {
        let layer = EnvLayer::read(&EnvSource::map([(
            "RABBITMQ_URL",
            "amqp://u:secret1@a/v,amqps://u:secret2@b/w",
        )]));
        assert_eq!(layer.problems.len(), 1);
        let p = &layer.problems[0];
        assert!(p.contains("scheme, password, vhost"), "{p}");
        assert!(!p.contains("secret"), "{p}");
    }

    #[test]
    fn raw_passwords_are_found_even_in_broken_urls() {
        assert_eq!(raw_passwords("amqp://u:p%40ss@h"), ["p%40ss"]);
        assert_eq!(raw_passwords("amqp://u:pa@ss@h"), ["pa@ss"]);
        assert_eq!(raw_passwords("amqp://u:secret"), ["secret"]);
        assert!(raw_passwords("amqp://h:5672/v").is_empty());
    }
}
