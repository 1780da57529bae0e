//! From the loose tree (file + environment) to a typed [`Config`], collecting
//! every problem instead of stopping at the first.
//!
//! Each problem is one line: `field.path = `value` (where it came from): what
//! is wrong; how to fix it`. The password's value is always shown as `***`.

use super::env::EnvLayer;
use super::loose::Loose;
use super::{Config, HelixConfig, RabbitMqConfig, Secret, TlsConfig};
use std::collections::{HashMap, HashSet};
use std::net::Ipv6Addr;
use std::path::Path;
use std::time::Duration;

/// The keys of each section, in the order `messaging.yaml` lists them.
const ROOT_KEYS: &[&str] = &["rabbitmq", "helixmq"];
const RABBITMQ_KEYS: &[&str] = &[
    "host",
    "port",
    "hosts",
    "username",
    "password",
    "vhost",
    "connect_timeout",
    "heartbeat",
    "max_reconnect_attempts",
    "reconnect_delay",
    "publisher_confirm",
    "publish_timeout",
    "prefetch_count",
    "prefetch_global",
    "tls",
];
const TLS_KEYS: &[&str] = &[
    "enabled",
    "cert_file",
    "key_file",
    "ca_file",
    "skip_verify",
    "verify_peer",
];
const HELIXMQ_KEYS: &[&str] = &["prefix", "max_attempts", "retry_delay", "queue_type"];

/// The field whose value is never shown.
const SECRET_PATH: &str = "rabbitmq.password";

/// Longest prefix accepted: names add at most `.notifications.websocket` and
/// RabbitMQ caps names at 255 bytes.
const MAX_PREFIX_LEN: usize = 200;

/// Inputs of the build: the interpolated file tree and the environment.
pub(crate) struct Sources<'a> {
    /// The file, interpolated. `Loose::Null` when there is no file.
    pub file: &'a Loose,
    /// The environment's overrides.
    pub env: &'a EnvLayer,
    /// Raw text of interpolated file values, by path (`${RABBITMQ_PORT:-5672}`).
    pub raw: &'a HashMap<String, String>,
    /// Paths whose interpolation failed (already reported).
    pub failed: &'a HashSet<String>,
}

/// Builds the typed configuration and collects problems.
struct Builder<'a> {
    src: Sources<'a>,
    problems: Vec<String>,
}

/// A value with where it came from.
struct Found<'a> {
    value: &'a Loose,
    origin: Option<String>,
}

/// Build and validate. Returns the configuration and every problem found.
pub(crate) fn build(src: Sources<'_>) -> (Config, Vec<String>) {
    let mut b = Builder {
        src,
        problems: Vec::new(),
    };
    let config = b.config();
    (config, b.problems)
}

fn closest<'k>(key: &str, valid: &[&'k str]) -> Option<&'k str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut cur = vec![i + 1; b.len() + 1];
            for (j, cb) in b.iter().enumerate() {
                let cost = usize::from(ca != *cb);
                cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[b.len()]
    }
    // Cheap guard: keys are short; a pasted paragraph needs no suggestion.
    if key.len() > 64 {
        return None;
    }
    valid
        .iter()
        .map(|v| (distance(&key.to_lowercase(), v), *v))
        .filter(|(d, v)| {
            let key = key.to_lowercase();
            // One edit per three letters: `url` is not a typo of `tls`.
            *d <= (v.len() / 3).max(1) || (key.len() >= 4 && (v.contains(&*key) || key.contains(v)))
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

impl<'a> Builder<'a> {
    fn problem(
        &mut self,
        path: &str,
        value: &Loose,
        origin: Option<&str>,
        msg: impl std::fmt::Display,
    ) {
        let shown = if path == SECRET_PATH {
            "***".to_string()
        } else {
            value.show()
        };
        let from = origin.map(|o| format!(" ({o})")).unwrap_or_default();
        self.problems
            .push(format!("{path} = `{shown}`{from}: {msg}"));
    }

    /// Check that `value` (the section at `path`) is a mapping with known keys.
    /// Returns whether the section can be read.
    fn section(&mut self, path: &str, value: Option<&Loose>, keys: &[&str]) -> bool {
        let place = if path.is_empty() {
            "at the top level".to_string()
        } else {
            format!("in section `{path}`")
        };
        match value {
            None | Some(Loose::Null) => false,
            Some(Loose::Map(entries)) => {
                for (key, _) in entries {
                    if keys.contains(&key.as_str()) {
                        continue;
                    }
                    let full = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    let hint = closest(key, keys)
                        .map(|k| format!(" Did you mean `{k}`?"))
                        .unwrap_or_default();
                    self.problems.push(format!(
                        "{full}: unknown key `{key}` {place}; valid keys there are: {}.{hint}",
                        keys.join(", ")
                    ));
                }
                true
            }
            Some(other) => {
                let shown = other.show();
                let kind = other.kind();
                let msg = if path.is_empty() {
                    format!(
                        "(top level) = `{shown}`: the configuration must be a mapping with the sections {}, got {kind}",
                        keys.join(" and ")
                    )
                } else {
                    format!(
                        "{path} = `{shown}`: `{path}` must be a mapping of settings ({}), got {kind}",
                        keys.join(", ")
                    )
                };
                self.problems.push(msg);
                false
            }
        }
    }

    /// The value for `path`: environment first, then the file.
    fn find(&self, path: &'static str) -> Option<Found<'a>> {
        if let Some(o) = self.src.env.overrides.get(path) {
            return Some(Found {
                value: &o.value,
                origin: Some(format!("from {}", o.origin)),
            });
        }
        if self.src.failed.contains(path) {
            return None;
        }
        let mut node = self.src.file;
        for part in path.split('.') {
            node = node.get(part)?;
        }
        let origin = match self.src.raw.get(path) {
            Some(raw) if path != SECRET_PATH => Some(format!("from `{raw}`")),
            _ => None,
        };
        Some(Found {
            value: node,
            origin,
        })
    }

    /// Look `path` up and convert it; on failure report and return `None`.
    fn field<T>(
        &mut self,
        path: &'static str,
        convert: impl FnOnce(&Loose) -> Result<T, String>,
    ) -> Option<T> {
        let found = self.find(path)?;
        match convert(found.value) {
            Ok(v) => Some(v),
            Err(msg) => {
                self.problem(path, found.value, found.origin.as_deref(), msg);
                None
            }
        }
    }

    fn config(&mut self) -> Config {
        let root = self.src.file;
        self.section("", Some(root), ROOT_KEYS);
        let rabbit = root.get("rabbitmq");
        if self.section("rabbitmq", rabbit, RABBITMQ_KEYS) {
            self.section("rabbitmq.tls", rabbit.and_then(|r| r.get("tls")), TLS_KEYS);
        }
        self.section("helixmq", root.get("helixmq"), HELIXMQ_KEYS);
        let rabbitmq = self.rabbitmq();
        let helixmq = self.helixmq();
        Config { rabbitmq, helixmq }
    }

    fn rabbitmq(&mut self) -> RabbitMqConfig {
        let d = RabbitMqConfig::default();
        let tls = self.tls();
        let host = self.field("rabbitmq.host", |v| {
            text(v).and_then(|h| check_host(&h).map(|_| h))
        });
        let port_given = self.find("rabbitmq.port").is_some();
        let port = self.field("rabbitmq.port", |v| {
            int(
                v,
                1,
                65535,
                "use the broker's AMQP port, e.g. 5672, or 5671 for TLS",
            )
            .map(|p| p as u16)
        });
        // amqps listens on 5671 by convention; only when nobody chose a port.
        let port = port.unwrap_or(if tls.enabled && !port_given {
            5671
        } else {
            d.port
        });
        let hosts = self.hosts(port);
        let username = self.field("rabbitmq.username", text).unwrap_or(d.username);
        let password = self
            .field("rabbitmq.password", text)
            .map(Secret::new)
            .unwrap_or(d.password);
        let vhost = self.field("rabbitmq.vhost", |v| {
            text(v).and_then(|s| {
                if s.is_empty() {
                    Err("the vhost is empty; use `/` for RabbitMQ's default vhost".into())
                } else {
                    Ok(s)
                }
            })
        });
        let connect_timeout = self.field("rabbitmq.connect_timeout", |v| positive(duration(v)?));
        let heartbeat = self.field("rabbitmq.heartbeat", |v| {
            let h = duration(v)?;
            if h.subsec_nanos() != 0 || h.as_secs() > 65535 {
                Err("AMQP negotiates the heartbeat in whole seconds from 0 (off) to 65535; use e.g. `10s`".into())
            } else {
                Ok(h)
            }
        });
        let max_reconnect_attempts = self.field("rabbitmq.max_reconnect_attempts", |v| {
            int(v, 0, u32::MAX.into(), "0 means retry forever").map(|n| n as u32)
        });
        let reconnect_delay = self.field("rabbitmq.reconnect_delay", |v| positive(duration(v)?));
        let publisher_confirm = self.field("rabbitmq.publisher_confirm", boolean);
        let publish_timeout = self.field("rabbitmq.publish_timeout", |v| positive(duration(v)?));
        let prefetch_count = self.field("rabbitmq.prefetch_count", |v| {
            int(v, 1, 65535, "basic.qos takes 1 to 65535 unacknowledged deliveries per consumer; 10 is the spec's default")
                .map(|n| n as u16)
        });
        let prefetch_global = self.field("rabbitmq.prefetch_global", boolean);

        if username.is_empty() && tls.cert_file.is_empty() {
            let origin = self.find("rabbitmq.username").and_then(|f| f.origin);
            self.problem(
                "rabbitmq.username",
                &Loose::Str(String::new()),
                origin.as_deref(),
                "the user name is empty; set it (RABBITMQ_USER), or use a TLS client certificate (tls.cert_file) to log in with SASL EXTERNAL",
            );
        }

        RabbitMqConfig {
            host: host.unwrap_or(d.host),
            port,
            hosts,
            username,
            password,
            vhost: vhost.unwrap_or(d.vhost),
            connect_timeout: connect_timeout.unwrap_or(d.connect_timeout),
            heartbeat: heartbeat.unwrap_or(d.heartbeat),
            max_reconnect_attempts: max_reconnect_attempts.unwrap_or(d.max_reconnect_attempts),
            reconnect_delay: reconnect_delay.unwrap_or(d.reconnect_delay),
            publisher_confirm: publisher_confirm.unwrap_or(d.publisher_confirm),
            publish_timeout: publish_timeout.unwrap_or(d.publish_timeout),
            prefetch_count: prefetch_count.unwrap_or(d.prefetch_count),
            prefetch_global: prefetch_global.unwrap_or(d.prefetch_global),
            tls,
        }
    }

    /// `hosts`: a list (or a comma-separated string) of `host[:port]`, normalised to `host:port`.
    fn hosts(&mut self, default_port: u16) -> Vec<String> {
        let Some(found) = self.find("rabbitmq.hosts") else {
            return Vec::new();
        };
        let items: Vec<Loose> = match found.value {
            Loose::Null => Vec::new(),
            Loose::Seq(items) => items.clone(),
            Loose::Str(s) => s
                .split(',')
                .map(|h| Loose::Str(h.trim().to_string()))
                .collect(),
            other => {
                self.problem(
                    "rabbitmq.hosts",
                    other,
                    found.origin.as_deref(),
                    format!(
                        "expected a list of `host:port` entries, got {}",
                        other.kind()
                    ),
                );
                return Vec::new();
            }
        };
        let from_file = !self.src.env.overrides.contains_key("rabbitmq.hosts");
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("rabbitmq.hosts[{i}]");
            if from_file && self.src.failed.contains(&path) {
                continue; // its interpolation problem is already reported
            }
            let parsed = match item {
                Loose::Str(s) => parse_host_port(s, default_port),
                other => Err(format!(
                    "expected a `host:port` string, got {}",
                    other.kind()
                )),
            };
            match parsed {
                Ok((host, port)) => {
                    let host = if host.contains(':') {
                        format!("[{host}]")
                    } else {
                        host
                    };
                    out.push(format!("{host}:{port}"));
                }
                Err(msg) => self.problem(&path, item, found.origin.as_deref(), msg),
            }
        }
        out
    }

    fn tls(&mut self) -> TlsConfig {
        let d = TlsConfig {
            verify_peer: true,
            ..TlsConfig::default()
        };
        let enabled = self
            .field("rabbitmq.tls.enabled", boolean)
            .unwrap_or(d.enabled);
        let cert_file = self
            .field("rabbitmq.tls.cert_file", text)
            .unwrap_or_default();
        let key_file = self
            .field("rabbitmq.tls.key_file", text)
            .unwrap_or_default();
        let ca_file = self.field("rabbitmq.tls.ca_file", text).unwrap_or_default();
        let skip_verify = self
            .field("rabbitmq.tls.skip_verify", boolean)
            .unwrap_or(d.skip_verify);
        let verify_peer = self
            .field("rabbitmq.tls.verify_peer", boolean)
            .unwrap_or(d.verify_peer);

        if !key_file.is_empty() && cert_file.is_empty() {
            self.problem(
                "rabbitmq.tls.key_file",
                &Loose::Str(key_file.clone()),
                None,
                "a client key without a certificate: set tls.cert_file to the matching certificate, or remove tls.key_file",
            );
        }
        if !cert_file.is_empty() && key_file.is_empty() {
            self.problem(
                "rabbitmq.tls.cert_file",
                &Loose::Str(cert_file.clone()),
                None,
                "a client certificate without its key: set tls.key_file to the matching private key, or remove tls.cert_file",
            );
        }
        if enabled {
            for (path, file, what) in [
                ("rabbitmq.tls.cert_file", &cert_file, "client certificate"),
                ("rabbitmq.tls.key_file", &key_file, "client private key"),
                ("rabbitmq.tls.ca_file", &ca_file, "CA bundle"),
            ] {
                if file.is_empty() {
                    continue;
                }
                let p = Path::new(file.as_str());
                let msg = match std::fs::metadata(p) {
                    Ok(m) if m.is_file() => continue,
                    Ok(_) => format!("the {what} path is not a regular file; give the path of a PEM file"),
                    Err(e) => format!("cannot read the {what} file ({e}); fix the path or create the file (TLS is enabled)"),
                };
                self.problem(path, &Loose::Str(file.clone()), None, msg);
            }
        }
        TlsConfig {
            enabled,
            cert_file,
            key_file,
            ca_file,
            skip_verify,
            verify_peer,
        }
    }

    fn helixmq(&mut self) -> HelixConfig {
        let d = HelixConfig::default();
        let prefix = self.field("helixmq.prefix", |v| {
            text(v).and_then(|p| check_prefix(&p).map(|_| p))
        });
        let max_attempts = self.field("helixmq.max_attempts", |v| {
            int(
                v,
                1,
                u32::MAX.into(),
                "it counts the first delivery, so 1 means no retry; the default is 3",
            )
            .map(|n| n as u32)
        });
        let retry_delay = self.field("helixmq.retry_delay", |v| {
            let d = positive(duration(v)?)?;
            if d.as_millis() > u128::from(u32::MAX) {
                Err("RabbitMQ's x-message-ttl is at most 4294967295 ms (about 49 days); use a shorter delay".into())
            } else {
                Ok(d)
            }
        });
        let queue_type = self.field("helixmq.queue_type", |v| {
            match text(v)?.as_str() {
                "classic" => Ok(crate::topology::QueueType::Classic),
                "quorum" => Ok(crate::topology::QueueType::Quorum),
                _ => Err("expected `classic` (the default) or `quorum` (replicated queues on a cluster; priority queues stay classic)".into()),
            }
        });
        HelixConfig {
            prefix: prefix.unwrap_or(d.prefix),
            max_attempts: max_attempts.unwrap_or(d.max_attempts),
            retry_delay: retry_delay.unwrap_or(d.retry_delay),
            queue_type: queue_type.unwrap_or(d.queue_type),
        }
    }
}

/// A text value. Numbers and booleans must be quoted so that, e.g., a password
/// `0x1F` or `1e3` is never silently turned into `31` or `1000`.
fn text(v: &Loose) -> Result<String, String> {
    match v {
        Loose::Str(s) => Ok(s.clone()),
        Loose::Null => Ok(String::new()),
        Loose::Bool(_) | Loose::Int(_) | Loose::Float(_) => Err(format!(
            "expected text, got {}: YAML reads it as a number or boolean, so put it in quotes",
            v.kind()
        )),
        Loose::Seq(_) | Loose::Map(_) => Err(format!("expected text, got {}", v.kind())),
    }
}

/// A whole number within `min..=max`.
fn int(v: &Loose, min: i128, max: i128, hint: &str) -> Result<i128, String> {
    let n = match v {
        Loose::Int(n) => *n,
        Loose::Str(s) => s.trim().parse::<i128>().map_err(|_| {
            format!("not a whole number; expected a number from {min} to {max}; {hint}")
        })?,
        Loose::Float(_) => {
            return Err(format!(
                "not a whole number; expected a number from {min} to {max}; {hint}"
            ))
        }
        other => {
            return Err(format!(
                "expected a number from {min} to {max}, got {}; {hint}",
                other.kind()
            ))
        }
    };
    if n < min || n > max {
        Err(format!("out of range: must be from {min} to {max}; {hint}"))
    } else {
        Ok(n)
    }
}

fn boolean(v: &Loose) -> Result<bool, String> {
    let err = || format!("not a boolean: use `true` or `false` (got {})", v.kind());
    match v {
        Loose::Bool(b) => Ok(*b),
        Loose::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            _ => Err(err()),
        },
        _ => Err(err()),
    }
}

/// A duration written like `30s`, `5m`, `1h30m`, `500ms` (humantime).
fn duration(v: &Loose) -> Result<Duration, String> {
    let usage = "write a number with a unit, e.g. `30s`, `5m`, `1h30m` or `500ms`";
    match v {
        Loose::Str(s) => humantime::parse_duration(s.trim())
            .map_err(|e| format!("not a duration ({e}); {usage}")),
        Loose::Int(n) => Err(format!("a duration needs a unit: write `{n}s` or `{n}ms`")),
        other => Err(format!(
            "expected a duration, got {}; {usage}",
            other.kind()
        )),
    }
}

fn positive(d: Duration) -> Result<Duration, String> {
    if d.is_zero() {
        Err("must be longer than zero; e.g. `5s`".into())
    } else {
        Ok(d)
    }
}

/// A host name or address. `host:port` and URLs are refused with a pointer to the right field.
fn check_host(host: &str) -> Result<(), String> {
    if host.trim().is_empty() {
        return Err("the host is empty; set the broker's host name or address (RABBITMQ_HOST), e.g. `localhost`".into());
    }
    if host.contains("://") {
        return Err("looks like a URL; put URLs in RABBITMQ_URL and only a host name here".into());
    }
    let allowed =
        |c: char| c.is_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']' | '%');
    if let Some(bad) = host.chars().find(|c| !allowed(*c)) {
        let several = if bad == ',' {
            " (several nodes go in `hosts`)"
        } else {
            ""
        };
        return Err(format!(
            "contains `{}`, which a host name cannot hold; give a host name or IP address{several}",
            bad.escape_default()
        ));
    }
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    // An IPv6 link-local address may carry a zone: `fe80::1%eth0`.
    let bare = bare.split_once('%').map_or(bare, |(addr, _zone)| addr);
    if host.contains(':') && bare.parse::<Ipv6Addr>().is_err() {
        return Err(
            "a host, not `host:port`: put the port in `rabbitmq.port` (RABBITMQ_PORT)".into(),
        );
    }
    Ok(())
}

/// Parse `host:port`, `[v6]:port`, or a bare host (then `default_port`).
pub(crate) fn parse_host_port(entry: &str, default_port: u16) -> Result<(String, u16), String> {
    let entry = entry.trim();
    if entry.is_empty() {
        return Err("empty entry; write `host:port`, separated by commas".into());
    }
    let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
        let (addr, after) = rest
            .split_once(']')
            .ok_or("unclosed `[` of an IPv6 address; write `[addr]:port`")?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or("expected `:port` after `]`")?),
        };
        if addr.parse::<Ipv6Addr>().is_err() {
            return Err(format!("`{addr}` is not an IPv6 address"));
        }
        (addr.to_string(), port)
    } else if entry.matches(':').count() > 1 {
        return Err("write IPv6 addresses in brackets: `[addr]:port`".into());
    } else {
        match entry.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (entry.to_string(), None),
        }
    };
    if !host.contains(':') {
        check_host(&host)?;
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u32>() {
            Ok(n) if (1..=65535).contains(&n) => n as u16,
            _ => {
                return Err(format!(
                    "port `{p}` is not from 1 to 65535; write `host:port`, e.g. `rabbit-2:5672`"
                ))
            }
        },
    };
    Ok((host, port))
}

/// A prefix that makes valid, permission-friendly RabbitMQ names.
fn check_prefix(prefix: &str) -> Result<(), String> {
    let rule = "use letters, digits, `-` and `_`, optionally separated by single dots (e.g. `helixagent`, `acme.prod`)";
    if prefix.is_empty() {
        return Err(format!(
            "the prefix is empty; every exchange and queue name starts with it: {rule}"
        ));
    }
    if prefix.len() > MAX_PREFIX_LEN {
        return Err(format!(
            "longer than {MAX_PREFIX_LEN} bytes; RabbitMQ names are limited to 255 bytes"
        ));
    }
    if let Some(bad) = prefix
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "contains `{}`, which RabbitMQ names and permission patterns should not hold: {rule}",
            bad.escape_default()
        ));
    }
    if prefix.starts_with('.') || prefix.ends_with('.') || prefix.contains("..") {
        return Err(format!(
            "empty name segment (leading, trailing or double dot): {rule}"
        ));
    }
    if prefix == "amq" || prefix.starts_with("amq.") {
        return Err(
            "names starting with `amq.` are reserved by RabbitMQ; choose another prefix".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_entries() {
        assert_eq!(parse_host_port("a:1", 9), Ok(("a".into(), 1)));
        assert_eq!(parse_host_port(" a ", 9), Ok(("a".into(), 9)));
        assert_eq!(parse_host_port("[::1]:5673", 9), Ok(("::1".into(), 5673)));
        assert_eq!(parse_host_port("[::1]", 9), Ok(("::1".into(), 9)));
        assert!(parse_host_port("a:0", 9).unwrap_err().contains("`0`"));
        assert!(parse_host_port("a:70000", 9)
            .unwrap_err()
            .contains("`70000`"));
        assert!(parse_host_port("a:x", 9).is_err());
        assert!(parse_host_port(":5672", 9).unwrap_err().contains("empty"));
        assert!(parse_host_port("", 9).is_err());
        assert!(parse_host_port("::1:5672", 9)
            .unwrap_err()
            .contains("brackets"));
        assert!(parse_host_port("[zz]:1", 9).is_err());
        assert!(parse_host_port("[::1", 9).is_err());
    }

    #[test]
    fn prefixes() {
        assert!(check_prefix("helixagent").is_ok());
        assert!(check_prefix("hxt-abc_1.x").is_ok());
        assert!(check_prefix("").is_err());
        assert!(check_prefix("a b").unwrap_err().contains("` `"));
        assert!(check_prefix("a*").is_err());
        assert!(check_prefix(".a").is_err());
        assert!(check_prefix("a..b").is_err());
        assert!(check_prefix("amq.x").is_err());
        assert!(check_prefix(&"a".repeat(201)).is_err());
    }

    #[test]
    fn hosts() {
        assert!(check_host("localhost").is_ok());
        assert!(check_host("10.0.0.1").is_ok());
        assert!(check_host("::1").is_ok());
        assert!(check_host("[::1]").is_ok());
        assert!(check_host("").is_err());
        assert!(check_host("h:5672").unwrap_err().contains("rabbitmq.port"));
        assert!(check_host("amqp://h").unwrap_err().contains("RABBITMQ_URL"));
        assert!(check_host("a b").unwrap_err().contains("` `"));
        assert!(check_host("${X").unwrap_err().contains("`$`"));
        assert!(check_host("a,b").unwrap_err().contains("hosts"));
        assert!(check_host("fe80::1%eth0").is_ok());
        assert!(check_host("bücher.example").is_ok());
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("prefetch", RABBITMQ_KEYS), Some("prefetch_count"));
        assert_eq!(closest("hots", RABBITMQ_KEYS), Some("hosts"));
        assert_eq!(closest("hostname", RABBITMQ_KEYS), Some("host"));
        assert_eq!(closest("usernmae", RABBITMQ_KEYS), Some("username"));
        assert_eq!(closest("zzzzzzzzzzzzzz", RABBITMQ_KEYS), None);
    }

    #[test]
    fn durations() {
        assert_eq!(
            duration(&Loose::Str("1h30m".into())),
            Ok(Duration::from_secs(5400))
        );
        assert_eq!(
            duration(&Loose::Str("500ms".into())),
            Ok(Duration::from_millis(500))
        );
        assert!(duration(&Loose::Int(30)).unwrap_err().contains("`30s`"));
        assert!(duration(&Loose::Str("30 parsecs".into())).is_err());
    }

    #[test]
    fn queue_type() {
        use crate::config::{load_from_str, EnvSource};
        use crate::topology::QueueType;
        let env = EnvSource::map(Vec::<(String, String)>::new());
        let c = load_from_str("helixmq:\n  queue_type: quorum\n", &env).unwrap();
        assert_eq!(c.helixmq.queue_type, QueueType::Quorum);
        let c = load_from_str("helixmq: {}\n", &env).unwrap();
        assert_eq!(c.helixmq.queue_type, QueueType::Classic);
        let e = load_from_str("helixmq:\n  queue_type: stream\n", &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("helixmq.queue_type"), "{e}");
        assert!(e.contains("stream"), "{e}");
        assert!(e.contains("`classic` (the default) or `quorum`"), "{e}");
    }
}
