//! Environment overrides: the spec's variables, RABBITMQ_HOSTS, RABBITMQ_URL,
//! HELIXMQ_PREFIX, and `${VAR}` interpolation. Every test uses a map
//! `EnvSource`, never the process environment.

use helixmq_testkit::config::ok;
use std::time::Duration;

const FILE: &str = include_str!("../../../../configs/messaging.yaml");

#[test]
fn spec_variables_override_the_file() {
    let c = ok(
        "rabbitmq:\n  host: filehost\n  port: 1111\n  username: fileuser\n  password: filepass\n  vhost: filevhost\n  prefetch_count: 3\n  publisher_confirm: true\n",
        &[
            ("RABBITMQ_HOST", "envhost"),
            ("RABBITMQ_PORT", "5673"),
            ("RABBITMQ_USER", "envuser"),
            ("RABBITMQ_PASSWORD", "envpass"),
            ("RABBITMQ_VHOST", "envvhost"),
            ("RABBITMQ_PREFETCH_COUNT", "50"),
            ("RABBITMQ_PUBLISHER_CONFIRM", "false"),
        ],
    );
    let r = &c.rabbitmq;
    assert_eq!(r.host, "envhost");
    assert_eq!(r.port, 5673);
    assert_eq!(r.username, "envuser");
    assert_eq!(r.password.expose(), "envpass");
    assert_eq!(r.vhost, "envvhost");
    assert_eq!(r.prefetch_count, 50);
    assert!(!r.publisher_confirm);
}

#[test]
fn spec_file_interpolates_from_the_environment() {
    let c = ok(
        FILE,
        &[
            ("RABBITMQ_HOST", "rabbit.internal"),
            ("RABBITMQ_PORT", "5680"),
            ("RABBITMQ_USER", "svc"),
            ("RABBITMQ_PASSWORD", "s3cret"),
            ("RABBITMQ_VHOST", "prod"),
        ],
    );
    assert_eq!(c.rabbitmq.host, "rabbit.internal");
    assert_eq!(c.rabbitmq.port, 5680);
    assert_eq!(c.rabbitmq.username, "svc");
    assert_eq!(c.rabbitmq.password.expose(), "s3cret");
    assert_eq!(c.rabbitmq.vhost, "prod");
}

#[test]
fn interpolation_without_a_spec_variable() {
    let c = ok(
        "rabbitmq:\n  host: \"${MY_RABBIT}-1.${MY_DOMAIN:-local}\"\n",
        &[("MY_RABBIT", "node")],
    );
    assert_eq!(c.rabbitmq.host, "node-1.local");
}

#[test]
fn empty_variables_count_as_unset() {
    let c = ok(
        FILE,
        &[
            ("RABBITMQ_HOST", ""),
            ("RABBITMQ_PORT", ""),
            ("HELIXMQ_PREFIX", ""),
        ],
    );
    assert_eq!(c.rabbitmq.host, "localhost");
    assert_eq!(c.rabbitmq.port, 5672);
    assert_eq!(c.helixmq.prefix, "helixagent");
}

#[test]
fn boolean_spellings() {
    for (v, want) in [
        ("true", true),
        ("FALSE", false),
        ("1", true),
        ("0", false),
        ("yes", true),
        ("off", false),
    ] {
        let c = ok("", &[("RABBITMQ_PUBLISHER_CONFIRM", v)]);
        assert_eq!(c.rabbitmq.publisher_confirm, want, "{v}");
    }
}

#[test]
fn helixmq_prefix_overrides_the_file() {
    let c = ok(
        "helixmq:\n  prefix: fromfile\n",
        &[("HELIXMQ_PREFIX", "hxt-abc123")],
    );
    assert_eq!(c.helixmq.prefix, "hxt-abc123");
}

#[test]
fn rabbitmq_hosts_become_endpoints() {
    let c = ok(
        FILE,
        &[(
            "RABBITMQ_HOSTS",
            "rabbit-2:5673, rabbit-3 ,[::1]:5674,localhost:5672",
        )],
    );
    assert_eq!(
        c.rabbitmq.hosts,
        [
            "rabbit-2:5673",
            "rabbit-3:5672",
            "[::1]:5674",
            "localhost:5672"
        ]
    );
    assert_eq!(
        c.rabbitmq.endpoints(),
        [
            ("localhost".to_string(), 5672),
            ("rabbit-2".to_string(), 5673),
            ("rabbit-3".to_string(), 5672),
            ("::1".to_string(), 5674),
        ]
    );
}

#[test]
fn hosts_from_the_file() {
    let c = ok(
        "rabbitmq:\n  port: 5700\n  hosts:\n    - b:5701\n    - c\n",
        &[],
    );
    assert_eq!(c.rabbitmq.hosts, ["b:5701", "c:5700"]);
    assert_eq!(c.rabbitmq.endpoints().len(), 3);
    let c = ok("rabbitmq:\n  hosts: \"b:1,c:2\"\n", &[]);
    assert_eq!(c.rabbitmq.hosts, ["b:1", "c:2"]);
}

#[test]
fn url_credentials_are_percent_decoded() {
    // user `app@acme`, password `p@ss:w/rd%`, vhost `/`.
    let c = ok(
        FILE,
        &[(
            "RABBITMQ_URL",
            "amqp://app%40acme:p%40ss%3Aw%2Frd%25@rabbit.example:5673/%2F",
        )],
    );
    let r = &c.rabbitmq;
    assert_eq!(r.username, "app@acme");
    assert_eq!(r.password.expose(), "p@ss:w/rd%");
    assert_eq!(r.host, "rabbit.example");
    assert_eq!(r.port, 5673);
    assert_eq!(r.vhost, "/");
    assert!(!r.tls.enabled);
}

#[test]
fn url_vhost_forms() {
    for (url, vhost) in [
        ("amqp://h", "/"),
        ("amqp://h/", "/"),
        ("amqp://h/%2F", "/"),
        ("amqp://h/prod", "prod"),
        ("amqp://h/team%2Fprod", "team/prod"),
        ("amqp://h/caf%C3%A9", "café"),
    ] {
        let c = ok("", &[("RABBITMQ_URL", url)]);
        assert_eq!(c.rabbitmq.vhost, vhost, "{url}");
    }
}

#[test]
fn amqps_enables_tls_on_5671() {
    let c = ok(FILE, &[("RABBITMQ_URL", "amqps://app:pw@secure.example/")]);
    assert!(c.rabbitmq.tls.enabled);
    assert_eq!(c.rabbitmq.port, 5671);
    assert_eq!(c.rabbitmq.host, "secure.example");
    let c = ok("", &[("RABBITMQ_URL", "amqps://secure.example:6671")]);
    assert_eq!(c.rabbitmq.port, 6671);
}

#[test]
fn amqp_url_turns_tls_off() {
    let c = ok(
        "rabbitmq:\n  tls:\n    enabled: true\n",
        &[("RABBITMQ_URL", "amqp://h")],
    );
    assert!(!c.rabbitmq.tls.enabled);
    assert_eq!(c.rabbitmq.port, 5672);
}

#[test]
fn tls_without_explicit_port_uses_5671() {
    let c = ok("rabbitmq:\n  tls:\n    enabled: true\n", &[]);
    assert_eq!(c.rabbitmq.port, 5671);
    let c = ok("rabbitmq:\n  port: 5672\n  tls:\n    enabled: true\n", &[]);
    assert_eq!(c.rabbitmq.port, 5672, "an explicit port wins");
}

#[test]
fn url_wins_over_single_variables_but_keeps_what_it_lacks() {
    let c = ok(
        "",
        &[
            ("RABBITMQ_HOST", "ignored"),
            ("RABBITMQ_USER", "envuser"),
            ("RABBITMQ_PASSWORD", "envpass"),
            ("RABBITMQ_URL", "amqp://urlhost:5680/v"),
        ],
    );
    assert_eq!(c.rabbitmq.host, "urlhost");
    assert_eq!(c.rabbitmq.port, 5680);
    assert_eq!(c.rabbitmq.vhost, "v");
    // The URL has no credentials: the variables' stay.
    assert_eq!(c.rabbitmq.username, "envuser");
    assert_eq!(c.rabbitmq.password.expose(), "envpass");
}

#[test]
fn url_list_names_several_nodes() {
    let c = ok(
        FILE,
        &[(
            "RABBITMQ_URL",
            "amqp://u:p@n1:5672/v, amqp://u:p@n2:5673/v,amqp://u:p@[fe80::1]/v",
        )],
    );
    assert_eq!(c.rabbitmq.host, "n1");
    assert_eq!(c.rabbitmq.hosts, ["n2:5673", "[fe80::1]:5672"]);
    assert_eq!(
        c.rabbitmq.endpoints(),
        [
            ("n1".to_string(), 5672),
            ("n2".to_string(), 5673),
            ("fe80::1".to_string(), 5672)
        ]
    );
}

#[test]
fn url_query_parameters() {
    let c = ok(
        "",
        &[(
            "RABBITMQ_URL",
            "amqp://h/?heartbeat=30&connection_timeout=1500",
        )],
    );
    assert_eq!(c.rabbitmq.heartbeat, Duration::from_secs(30));
    assert_eq!(c.rabbitmq.connect_timeout, Duration::from_millis(1500));
}

#[test]
fn durations_in_several_forms() {
    let c = ok(
        "rabbitmq:\n  connect_timeout: 1h30m\n  reconnect_delay: 500ms\n  publish_timeout: 5m\n  heartbeat: 0s\nhelixmq:\n  retry_delay: 2s\n",
        &[],
    );
    assert_eq!(c.rabbitmq.connect_timeout, Duration::from_secs(5400));
    assert_eq!(c.rabbitmq.reconnect_delay, Duration::from_millis(500));
    assert_eq!(c.rabbitmq.publish_timeout, Duration::from_secs(300));
    assert_eq!(
        c.rabbitmq.heartbeat,
        Duration::ZERO,
        "0s turns heartbeats off"
    );
    assert_eq!(c.helixmq.retry_delay, Duration::from_secs(2));
}

#[test]
fn yaml_one_one_words_stay_text() {
    let c = ok(
        "rabbitmq:\n  host: y\n  username: no\n  vhost: \"0123\"\n  password: 0123\n",
        &[],
    );
    assert_eq!(c.rabbitmq.host, "y");
    assert_eq!(c.rabbitmq.username, "no");
    assert_eq!(c.rabbitmq.vhost, "0123");
    assert_eq!(c.rabbitmq.password.expose(), "0123");
}

#[test]
fn literal_dollar_brace_by_escape() {
    let c = ok("rabbitmq:\n  password: \"a$${b}c$d\"\n", &[]);
    assert_eq!(c.rabbitmq.password.expose(), "a${b}c$d");
}
