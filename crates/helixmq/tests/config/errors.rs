//! Each bad configuration is refused with a message naming the field path and
//! the bad value; several problems come out together.

use helixmq::config::load_from_str;
use helixmq_testkit::config::{env, one_problem, problems, rabbit};

#[test]
fn port_zero() {
    one_problem(
        &rabbit("port: 0"),
        &[],
        &["rabbitmq.port = `0`", "from 1 to 65535"],
    );
}

#[test]
fn port_70000() {
    one_problem(
        &rabbit("port: 70000"),
        &[],
        &["rabbitmq.port = `70000`", "out of range", "from 1 to 65535"],
    );
}

#[test]
fn port_huge_is_a_range_problem_not_a_parse_failure() {
    one_problem(
        &rabbit("port: 99999999999999999999999"),
        &[],
        &["rabbitmq.port", "from 1 to 65535"],
    );
}

#[test]
fn port_from_interpolation_shows_where_it_came_from() {
    one_problem(
        &rabbit("port: ${RABBITMQ_PORT:-70000}"),
        &[],
        &[
            "rabbitmq.port = `70000` (from `${RABBITMQ_PORT:-70000}`)",
            "from 1 to 65535",
        ],
    );
}

#[test]
fn port_not_a_number() {
    one_problem(
        &rabbit("port: abc"),
        &[],
        &["rabbitmq.port = `abc`", "not a whole number"],
    );
    one_problem(
        &rabbit("port: 5672.5"),
        &[],
        &["rabbitmq.port = `5672.5`", "not a whole number"],
    );
    one_problem(&rabbit("port: [1]"), &[], &["rabbitmq.port", "got a list"]);
}

#[test]
fn port_from_environment_names_the_variable() {
    one_problem(
        "",
        &[("RABBITMQ_PORT", "70000")],
        &["rabbitmq.port = `70000` (from RABBITMQ_PORT)"],
    );
    one_problem(
        "",
        &[("RABBITMQ_PORT", "five")],
        &[
            "rabbitmq.port = `five` (from RABBITMQ_PORT)",
            "not a whole number",
        ],
    );
}

#[test]
fn prefetch_zero() {
    one_problem(
        &rabbit("prefetch_count: 0"),
        &[],
        &["rabbitmq.prefetch_count = `0`", "from 1 to 65535"],
    );
}

#[test]
fn prefetch_above_65535() {
    one_problem(
        &rabbit("prefetch_count: 65536"),
        &[],
        &["rabbitmq.prefetch_count = `65536`", "from 1 to 65535"],
    );
    one_problem(
        "",
        &[("RABBITMQ_PREFETCH_COUNT", "100000")],
        &["rabbitmq.prefetch_count = `100000` (from RABBITMQ_PREFETCH_COUNT)"],
    );
}

#[test]
fn malformed_durations() {
    one_problem(
        &rabbit("heartbeat: 10 parsecs"),
        &[],
        &[
            "rabbitmq.heartbeat = `10 parsecs`",
            "not a duration",
            "`30s`",
        ],
    );
    one_problem(
        &rabbit("connect_timeout: soon"),
        &[],
        &["rabbitmq.connect_timeout = `soon`", "not a duration"],
    );
    one_problem(
        &rabbit("publish_timeout: 30"),
        &[],
        &["rabbitmq.publish_timeout = `30`", "needs a unit", "`30s`"],
    );
    one_problem(
        "helixmq:\n  retry_delay: 1x\n",
        &[],
        &["helixmq.retry_delay = `1x`", "not a duration"],
    );
}

#[test]
fn out_of_range_durations() {
    one_problem(
        &rabbit("heartbeat: 500ms"),
        &[],
        &["rabbitmq.heartbeat = `500ms`", "whole seconds"],
    );
    one_problem(
        &rabbit("heartbeat: 20h"),
        &[],
        &["rabbitmq.heartbeat = `20h`", "65535"],
    );
    one_problem(
        &rabbit("publish_timeout: 0s"),
        &[],
        &["rabbitmq.publish_timeout = `0s`", "longer than zero"],
    );
    one_problem(
        "helixmq:\n  retry_delay: 100d\n",
        &[],
        &["helixmq.retry_delay = `100d`", "x-message-ttl"],
    );
}

#[test]
fn unknown_key_in_rabbitmq() {
    one_problem(
        &rabbit("prefetch: 5"),
        &[],
        &[
            "rabbitmq.prefetch: unknown key `prefetch` in section `rabbitmq`",
            "valid keys there are: host, port, hosts, username, password, vhost, connect_timeout",
            "Did you mean `prefetch_count`?",
        ],
    );
}

#[test]
fn unknown_key_in_tls_and_top_level_and_helixmq() {
    let ps = problems(
        "rabbitmq:\n  tls:\n    verify: true\nrabbit: {}\nhelixmq:\n  prefx: a\n",
        &[],
    );
    assert_eq!(ps.len(), 3, "{ps:#?}");
    assert!(ps[0].contains("rabbit: unknown key `rabbit` at the top level; valid keys there are: rabbitmq, helixmq. Did you mean `rabbitmq`?"), "{}", ps[0]);
    assert!(
        ps[1].contains("rabbitmq.tls.verify: unknown key `verify` in section `rabbitmq.tls`"),
        "{}",
        ps[1]
    );
    assert!(
        ps[1].contains("enabled, cert_file, key_file, ca_file, skip_verify, verify_peer"),
        "{}",
        ps[1]
    );
    assert!(
        ps[2].contains("helixmq.prefx: unknown key `prefx` in section `helixmq`"),
        "{}",
        ps[2]
    );
    assert!(ps[2].contains("Did you mean `prefix`?"), "{}", ps[2]);
}

#[test]
fn unterminated_interpolation() {
    one_problem(
        &rabbit("host: ${RABBITMQ_HOST:-localhost"),
        &[],
        &[
            "rabbitmq.host = `${RABBITMQ_HOST:-localhost`",
            "unterminated `${`",
            "closing `}`",
        ],
    );
}

#[test]
fn unset_variable_without_default() {
    one_problem(
        &rabbit("username: ${HELIXMQ_TEST_NOT_SET}"),
        &[],
        &[
            "rabbitmq.username = `${HELIXMQ_TEST_NOT_SET}`",
            "`HELIXMQ_TEST_NOT_SET` is not set",
        ],
    );
}

#[test]
fn invalid_variable_name() {
    one_problem(
        &rabbit("vhost: ${1X}"),
        &[],
        &["rabbitmq.vhost = `${1X}`", "not a valid variable reference"],
    );
}

#[test]
fn non_number_where_a_number_is_expected() {
    one_problem(
        &rabbit("max_reconnect_attempts: lots"),
        &[],
        &[
            "rabbitmq.max_reconnect_attempts = `lots`",
            "not a whole number",
        ],
    );
    one_problem(
        "helixmq:\n  max_attempts: three\n",
        &[],
        &["helixmq.max_attempts = `three`", "not a whole number"],
    );
}

#[test]
fn not_a_boolean() {
    one_problem(
        &rabbit("publisher_confirm: maybe"),
        &[],
        &["rabbitmq.publisher_confirm = `maybe`", "`true` or `false`"],
    );
    one_problem(
        "",
        &[("RABBITMQ_PUBLISHER_CONFIRM", "sure")],
        &["(from RABBITMQ_PUBLISHER_CONFIRM)", "not a boolean"],
    );
}

#[test]
fn tls_files_that_do_not_exist() {
    let yaml = "rabbitmq:\n  tls:\n    enabled: true\n    cert_file: /nonexistent/helixmq/client.pem\n    key_file: /nonexistent/helixmq/client.key\n    ca_file: /nonexistent/helixmq/ca.pem\n";
    let ps = problems(yaml, &[]);
    assert_eq!(ps.len(), 3, "{ps:#?}");
    assert!(ps[0].starts_with("rabbitmq.tls.cert_file = `/nonexistent/helixmq/client.pem`: cannot read the client certificate file"), "{}", ps[0]);
    assert!(ps[1].starts_with("rabbitmq.tls.key_file = `/nonexistent/helixmq/client.key`: cannot read the client private key file"), "{}", ps[1]);
    assert!(
        ps[2].starts_with(
            "rabbitmq.tls.ca_file = `/nonexistent/helixmq/ca.pem`: cannot read the CA bundle file"
        ),
        "{}",
        ps[2]
    );
}

#[test]
fn tls_files_are_not_checked_when_tls_is_off() {
    let yaml = "rabbitmq:\n  tls:\n    enabled: false\n    ca_file: /nonexistent/helixmq/ca.pem\n";
    assert!(load_from_str(yaml, &env(&[])).is_ok());
}

#[test]
fn tls_directory_instead_of_file() {
    let dir = std::env::temp_dir();
    let yaml = format!(
        "rabbitmq:\n  tls:\n    enabled: true\n    ca_file: {}\n",
        dir.display()
    );
    one_problem(
        &yaml,
        &[],
        &["rabbitmq.tls.ca_file = `", "not a regular file"],
    );
}

#[test]
fn tls_existing_files_are_accepted() {
    let dir = std::env::temp_dir().join(format!("helixmq-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["c.pem", "k.pem", "ca.pem"] {
        std::fs::write(dir.join(f), "-----BEGIN-----\n").unwrap();
    }
    let yaml = format!(
        "rabbitmq:\n  port: 5671\n  tls:\n    enabled: true\n    cert_file: {0}/c.pem\n    key_file: {0}/k.pem\n    ca_file: {0}/ca.pem\n",
        dir.display()
    );
    let result = load_from_str(&yaml, &env(&[]));
    std::fs::remove_dir_all(&dir).unwrap();
    let c = result.unwrap();
    assert!(c.rabbitmq.tls.enabled);
    assert!(c.rabbitmq.tls.verifies_server());
}

#[test]
fn client_key_without_certificate() {
    one_problem(
        "rabbitmq:\n  tls:\n    key_file: /etc/k.pem\n",
        &[],
        &[
            "rabbitmq.tls.key_file = `/etc/k.pem`",
            "a client key without a certificate",
            "tls.cert_file",
        ],
    );
}

#[test]
fn client_certificate_without_key() {
    one_problem(
        "rabbitmq:\n  tls:\n    cert_file: /etc/c.pem\n",
        &[],
        &[
            "rabbitmq.tls.cert_file = `/etc/c.pem`",
            "without its key",
            "tls.key_file",
        ],
    );
}

#[test]
fn empty_host() {
    one_problem(
        &rabbit("host: \"\""),
        &[],
        &["rabbitmq.host = ``", "the host is empty"],
    );
    one_problem(
        &rabbit("host: \"  \""),
        &[],
        &["rabbitmq.host = `  `", "the host is empty"],
    );
}

#[test]
fn host_with_port_or_url() {
    one_problem(
        &rabbit("host: rabbit:5672"),
        &[],
        &["rabbitmq.host = `rabbit:5672`", "rabbitmq.port"],
    );
    one_problem(
        &rabbit("host: amqp://rabbit"),
        &[],
        &["rabbitmq.host = `amqp://rabbit`", "RABBITMQ_URL"],
    );
}

#[test]
fn empty_prefix() {
    one_problem(
        "helixmq:\n  prefix: \"\"\n",
        &[],
        &["helixmq.prefix = ``", "the prefix is empty"],
    );
}

#[test]
fn prefix_with_characters_names_should_not_have() {
    one_problem(
        "helixmq:\n  prefix: \"my app\"\n",
        &[],
        &["helixmq.prefix = `my app`", "contains ` `"],
    );
    one_problem(
        "helixmq:\n  prefix: \"app*\"\n",
        &[],
        &["helixmq.prefix = `app*`", "contains `*`"],
    );
    one_problem(
        "helixmq:\n  prefix: app.\n",
        &[],
        &["helixmq.prefix = `app.`", "trailing"],
    );
    one_problem(
        "helixmq:\n  prefix: amq.x\n",
        &[],
        &["helixmq.prefix = `amq.x`", "reserved"],
    );
    one_problem(
        "",
        &[("HELIXMQ_PREFIX", "a/b")],
        &[
            "helixmq.prefix = `a/b` (from HELIXMQ_PREFIX)",
            "contains `/`",
        ],
    );
}

#[test]
fn max_attempts_zero() {
    one_problem(
        "helixmq:\n  max_attempts: 0\n",
        &[],
        &["helixmq.max_attempts = `0`", "from 1 to"],
    );
}

#[test]
fn bad_hosts_entries() {
    let ps = problems(
        &rabbit("hosts: [\"a:5672\", \"b:99999\", \"\", \"c:x\", 7, \"::1:5672\"]"),
        &[],
    );
    assert_eq!(ps.len(), 5, "{ps:#?}");
    assert!(
        ps[0].starts_with("rabbitmq.hosts[1] = `b:99999`: port `99999` is not from 1 to 65535"),
        "{}",
        ps[0]
    );
    assert!(
        ps[1].starts_with("rabbitmq.hosts[2] = ``: empty entry"),
        "{}",
        ps[1]
    );
    assert!(
        ps[2].starts_with("rabbitmq.hosts[3] = `c:x`: port `x`"),
        "{}",
        ps[2]
    );
    assert!(
        ps[3].starts_with("rabbitmq.hosts[4] = `7`: expected a `host:port` string"),
        "{}",
        ps[3]
    );
    assert!(
        ps[4].starts_with("rabbitmq.hosts[5] = `::1:5672`"),
        "{}",
        ps[4]
    );
    assert!(ps[4].contains("brackets"), "{}", ps[4]);
}

#[test]
fn bad_hosts_from_environment() {
    one_problem(
        "",
        &[("RABBITMQ_HOSTS", "a:1,b:0")],
        &[
            "rabbitmq.hosts[1] = `b:0` (from RABBITMQ_HOSTS)",
            "port `0`",
        ],
    );
}

#[test]
fn hosts_of_the_wrong_shape() {
    one_problem(
        &rabbit("hosts: {a: 1}"),
        &[],
        &[
            "rabbitmq.hosts",
            "expected a list of `host:port` entries, got a mapping",
        ],
    );
}

#[test]
fn bad_url_scheme() {
    one_problem(
        "",
        &[("RABBITMQ_URL", "http://app:hunter22@rabbit/")],
        &[
            "RABBITMQ_URL: `http://***@rabbit/` has scheme `http`",
            "only `amqp` and `amqps`",
        ],
    );
}

#[test]
fn bad_urls() {
    for (url, needle) in [
        ("amqp://app:hunter22@rabbit:99999/", "not a valid URL"),
        ("amqp://app:hunter22@/", "empty host"),
        ("amqp://app:hunter22@rabbit/a/b", "unescaped `/`"),
        (
            "amqp://app:hunter22@rabbit/?channel_max=1",
            "unknown query parameter `channel_max`",
        ),
        ("rabbit:5672", "scheme `rabbit`"),
        ("amqp://app:hunter22@rabbit/v,", "entry 2 is empty"),
    ] {
        one_problem("", &[("RABBITMQ_URL", url)], &["RABBITMQ_URL: ", needle]);
    }
}

#[test]
fn urls_of_one_list_must_agree() {
    one_problem(
        "",
        &[(
            "RABBITMQ_URL",
            "amqp://app:pw1234@a/v,amqp://app:pw5678@b/v",
        )],
        &["RABBITMQ_URL: entry 2 (`b:5672`) differs from entry 1 in its password"],
    );
}

#[test]
fn empty_vhost_and_user() {
    one_problem(
        &rabbit("vhost: \"\""),
        &[],
        &["rabbitmq.vhost = ``", "use `/`"],
    );
    one_problem(
        &rabbit("username: \"\""),
        &[],
        &["rabbitmq.username = ``", "SASL EXTERNAL"],
    );
}

#[test]
fn numbers_where_text_is_expected_must_be_quoted() {
    one_problem(
        &rabbit("username: 1234"),
        &[],
        &["rabbitmq.username = `1234`", "put it in quotes"],
    );
}

#[test]
fn sections_of_the_wrong_shape() {
    one_problem(
        "rabbitmq: localhost\n",
        &[],
        &["rabbitmq = `localhost`", "must be a mapping of settings"],
    );
    one_problem(
        "- a\n- b\n",
        &[],
        &[
            "(top level)",
            "must be a mapping with the sections rabbitmq and helixmq, got a list",
        ],
    );
}

#[test]
fn yaml_syntax_error() {
    one_problem(
        "rabbitmq:\n  host: [unclosed\n",
        &[],
        &["(file): not valid YAML"],
    );
}

#[test]
fn duplicate_keys_are_refused() {
    one_problem(
        "rabbitmq:\n  port: 1\n  port: 2\n",
        &[],
        &["(file): not valid YAML"],
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let yaml = "\
rabbitmq:
  host: \"\"
  port: 70000
  prefetch_count: 0
  heartbeat: 10 parsecs
  prefech_count: 5
  tls:
    enabled: true
    key_file: /nonexistent/helixmq/k.pem
  vhost: ${RABBITMQ_VHOST:-/
helixmq:
  prefix: \"bad prefix\"
  max_attempts: 0
";
    let ps = problems(
        yaml,
        &[
            ("RABBITMQ_URL", "ftp://x:y@z/"),
            ("RABBITMQ_HOSTS", "ok:1,bad:0"),
        ],
    );
    let expected = [
        "rabbitmq.vhost = `${RABBITMQ_VHOST:-/`: unterminated",
        "RABBITMQ_URL: `ftp://***@z/` has scheme `ftp`",
        "rabbitmq.prefech_count: unknown key",
        "rabbitmq.tls.key_file = `/nonexistent/helixmq/k.pem`: a client key without a certificate",
        "rabbitmq.tls.key_file = `/nonexistent/helixmq/k.pem`: cannot read the client private key file",
        "rabbitmq.host = ``",
        "rabbitmq.port = `70000`",
        "rabbitmq.hosts[1] = `bad:0` (from RABBITMQ_HOSTS)",
        "rabbitmq.heartbeat = `10 parsecs`",
        "rabbitmq.prefetch_count = `0`",
        "helixmq.prefix = `bad prefix`",
        "helixmq.max_attempts = `0`",
    ];
    for e in expected {
        assert!(
            ps.iter().any(|p| p.starts_with(e)),
            "missing {e:?} in {ps:#?}"
        );
    }
    assert_eq!(ps.len(), expected.len(), "{ps:#?}");
    // The error's Display lists them all, one per line.
    let err = load_from_str(
        yaml,
        &env(&[
            ("RABBITMQ_URL", "ftp://x:y@z/"),
            ("RABBITMQ_HOSTS", "ok:1,bad:0"),
        ]),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.starts_with("invalid configuration:\n"), "{text}");
    assert_eq!(text.lines().count(), expected.len() + 1, "{text}");
}

#[test]
fn missing_file_is_an_io_error_naming_the_path() {
    let err = helixmq::config::load(
        Some(std::path::Path::new("/nonexistent/helixmq.yaml")),
        &env(&[]),
    )
    .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/nonexistent/helixmq.yaml"), "{text}");
    assert!(matches!(err, helixmq::Error::Io { .. }));
}

#[test]
fn oversized_text_is_refused() {
    let yaml = format!("# {}\n", "x".repeat(2 << 20));
    one_problem(&yaml, &[], &["(file)", "bytes"]);
}

#[test]
fn host_with_characters_a_host_cannot_hold() {
    one_problem(
        &rabbit("host: \"rabbit host\""),
        &[],
        &["rabbitmq.host = `rabbit host`", "contains ` `"],
    );
    one_problem(
        "",
        &[("RABBITMQ_HOST", "a,b")],
        &["rabbitmq.host = `a,b` (from RABBITMQ_HOST)", "`hosts`"],
    );
}

#[test]
fn interpolation_problem_in_a_hosts_entry_is_reported_once() {
    one_problem(
        &rabbit("hosts: [\"${NODE2\"]"),
        &[],
        &["rabbitmq.hosts[0] = `${NODE2`", "unterminated"],
    );
}
