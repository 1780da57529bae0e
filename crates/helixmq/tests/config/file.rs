//! `configs/messaging.yaml` loads, and with no variables set it gives the spec's values.

use helixmq::config::{load, Config};
use helixmq_testkit::config::{env, ok};
use std::path::Path;
use std::time::Duration;

fn spec_file() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../configs/messaging.yaml"
    ))
}

#[test]
fn messaging_yaml_gives_the_spec_defaults() {
    let c = load(Some(spec_file()), &env(&[])).unwrap();
    let r = &c.rabbitmq;
    assert_eq!(r.host, "localhost");
    assert_eq!(r.port, 5672);
    assert!(r.hosts.is_empty());
    assert_eq!(r.username, "helixagent");
    assert_eq!(r.password.expose(), "helixagent123");
    assert_eq!(r.vhost, "/");
    assert_eq!(r.connect_timeout, Duration::from_secs(30));
    assert_eq!(r.heartbeat, Duration::from_secs(10));
    assert_eq!(r.max_reconnect_attempts, 10);
    assert_eq!(r.reconnect_delay, Duration::from_secs(5));
    assert!(r.publisher_confirm);
    assert_eq!(r.publish_timeout, Duration::from_secs(10));
    assert_eq!(r.prefetch_count, 10);
    assert!(!r.prefetch_global);
    assert!(!r.tls.enabled);
    assert_eq!(r.tls.cert_file, "");
    assert_eq!(r.tls.key_file, "");
    assert_eq!(r.tls.ca_file, "");
    assert!(!r.tls.skip_verify);
    assert!(r.tls.verify_peer);
    assert_eq!(c.helixmq.prefix, "helixagent");
    assert_eq!(c.helixmq.max_attempts, 3);
    assert_eq!(c.helixmq.retry_delay, Duration::from_secs(60));
}

#[test]
fn messaging_yaml_equals_the_built_in_defaults() {
    let from_file = load(Some(spec_file()), &env(&[])).unwrap();
    assert_eq!(from_file, Config::default());
    assert_eq!(
        ok("", &[]),
        Config::default(),
        "no file at all gives the same"
    );
    assert_eq!(load(None, &env(&[])).unwrap(), Config::default());
}

#[test]
fn redacted_yaml_renders_the_effective_configuration() {
    let c = load(Some(spec_file()), &env(&[("RABBITMQ_HOSTS", "b:5673")])).unwrap();
    let yaml = c.to_redacted_yaml();
    for needle in [
        "rabbitmq:",
        "host: localhost",
        "port: 5672",
        "b:5673",
        "username: helixagent",
        "***",
        "connect_timeout: 30s",
        "heartbeat: 10s",
        "reconnect_delay: 5s",
        "prefetch_count: 10",
        "verify_peer: true",
        "helixmq:",
        "prefix: helixagent",
        "max_attempts: 3",
        "retry_delay: 1m",
    ] {
        assert!(yaml.contains(needle), "{needle:?} missing in:\n{yaml}");
    }
    assert!(!yaml.contains("helixagent123"), "{yaml}");
}

#[test]
fn redacted_yaml_loads_back_apart_from_the_password() {
    let c = load(
        Some(spec_file()),
        &env(&[("RABBITMQ_HOSTS", "b:5673,[::1]:5674")]),
    )
    .unwrap();
    let back = ok(&c.to_redacted_yaml(), &[]);
    assert_eq!(back.rabbitmq.password.expose(), "***");
    let mut expected = c.clone();
    expected.rabbitmq.password = back.rabbitmq.password.clone();
    assert_eq!(back, expected);
}

#[test]
fn tls_default_verifies_the_server() {
    let tls = helixmq::config::TlsConfig::default();
    assert!(tls.verify_peer);
    assert!(tls.verifies_server());
    let skip = helixmq::config::TlsConfig {
        skip_verify: true,
        ..Default::default()
    };
    assert!(!skip.verifies_server());
}
