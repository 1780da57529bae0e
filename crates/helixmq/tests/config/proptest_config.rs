//! The loader never panics: arbitrary text and arbitrary environment values
//! give `Ok` or `Err(InvalidConfig)`, and the password never leaks.

use helixmq::config::{load_from_str, EnvSource};
use helixmq::Error;
use proptest::prelude::*;

const VARS: &[&str] = &[
    "RABBITMQ_HOST",
    "RABBITMQ_PORT",
    "RABBITMQ_USER",
    "RABBITMQ_PASSWORD",
    "RABBITMQ_VHOST",
    "RABBITMQ_PREFETCH_COUNT",
    "RABBITMQ_PUBLISHER_CONFIRM",
    "RABBITMQ_HOSTS",
    "RABBITMQ_URL",
    "HELIXMQ_PREFIX",
];

const KEYS: &[&str] = &[
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
    "enabled",
    "cert_file",
    "key_file",
    "ca_file",
    "skip_verify",
    "verify_peer",
    "prefix",
    "max_attempts",
    "retry_delay",
    "rabbitmq",
    "helixmq",
];

/// Values that hit the interesting paths: interpolation, numbers, durations, URLs.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[ -~]{0,30}",
        r"\$\{[A-Z_]{0,8}(:-[a-z0-9/]{0,5})?\}?",
        any::<i64>().prop_map(|n| n.to_string()),
        r"[0-9]{1,6}(ms|s|m|h|d|x)?",
        r"amqps?://([a-z%0-9@:]{0,12}@)?[a-z0-9.\[\]:]{0,12}(:[0-9]{0,6})?(/[a-z%0-9/]{0,8})?(\?[a-z_=0-9&]{0,20})?",
        Just(String::new()),
    ]
}

/// Text shaped like a configuration file, so the validator (not only the parser) is exercised.
fn yaml_like() -> impl Strategy<Value = String> {
    let line = (0usize..3, prop::sample::select(KEYS), value())
        .prop_map(|(indent, key, v)| format!("{}{key}: {v}", "  ".repeat(indent)));
    prop::collection::vec(line, 0..12).prop_map(|lines| lines.join("\n"))
}

fn env_strategy() -> impl Strategy<Value = Vec<(usize, String)>> {
    prop::collection::vec((0..VARS.len(), value()), 0..6)
}

fn run(text: &str, env: &[(usize, String)]) {
    let env = EnvSource::map(env.iter().map(|(i, v)| (VARS[*i], v.clone())));
    match load_from_str(text, &env) {
        Ok(_) => {}
        Err(Error::InvalidConfig { problems }) => assert!(!problems.is_empty()),
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn never_panics_on_arbitrary_text(text in any::<String>(), env in env_strategy()) {
        run(&text, &env);
    }

    #[test]
    fn never_panics_on_config_shaped_text(text in yaml_like(), env in env_strategy()) {
        run(&text, &env);
    }

    #[test]
    fn password_never_leaks(
        text in yaml_like(),
        password in "[A-Za-z0-9]{6,16}",
        in_url in any::<bool>(),
        env in env_strategy(),
    ) {
        let mut pairs: Vec<(String, String)> =
            env.iter().map(|(i, v)| (VARS[*i].to_string(), v.clone())).collect();
        if in_url {
            pairs.push(("RABBITMQ_URL".into(), format!("amqp://u:{password}@h:0/x/y")));
        } else {
            pairs.push(("RABBITMQ_PASSWORD".into(), password.clone()));
            pairs.push(("RABBITMQ_PORT".into(), "0".into()));
        }
        let text = format!("{text}\nrabbitmq_password_marker: {password}\n");
        let env = EnvSource::map(pairs);
        if let Err(e) = load_from_str(&text, &env) {
            let shown = e.to_string();
            prop_assert!(!shown.contains(&password), "{}", shown);
        }
    }
}

#[test]
fn deep_nesting_is_an_error_not_a_crash() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    run(&deep, &[]);
    let deep_map = "a:\n".to_string()
        + &(1..2000)
            .map(|i| format!("{}a:\n", " ".repeat(i)))
            .collect::<String>();
    run(&deep_map, &[]);
}

#[test]
fn alias_bomb_is_an_error_not_a_hang() {
    let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let prev = i - 1;
        yaml.push_str(&format!("a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]\n"));
    }
    run(&yaml, &[]);
}
