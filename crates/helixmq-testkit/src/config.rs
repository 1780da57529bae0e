//! Loading configurations in tests: YAML text with an environment made of
//! exactly the given variables, expecting success or exactly these problems.

use helixmq::config::{load_from_str, Config, EnvSource};
use helixmq::Error;

/// An environment with exactly these variables.
pub fn env(pairs: &[(&str, &str)]) -> EnvSource {
    EnvSource::map(pairs.iter().copied())
}

/// Load expecting success; panics with the problems otherwise.
pub fn ok(yaml: &str, pairs: &[(&str, &str)]) -> Config {
    match load_from_str(yaml, &env(pairs)) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid configuration, got: {e}"),
    }
}

/// Load expecting `InvalidConfig`; returns its problem lines.
pub fn problems(yaml: &str, pairs: &[(&str, &str)]) -> Vec<String> {
    match load_from_str(yaml, &env(pairs)) {
        Ok(c) => panic!("expected problems, got a valid configuration: {c:?}"),
        Err(Error::InvalidConfig { problems }) => problems,
        Err(other) => panic!("expected InvalidConfig, got {other:?}"),
    }
}

/// Load expecting exactly one problem, which contains every one of `needles`.
pub fn one_problem(yaml: &str, pairs: &[(&str, &str)], needles: &[&str]) -> String {
    let ps = problems(yaml, pairs);
    assert_eq!(ps.len(), 1, "expected exactly one problem, got {ps:#?}");
    for n in needles {
        assert!(
            ps[0].contains(n),
            "problem {:?} should contain {n:?}",
            ps[0]
        );
    }
    ps.into_iter().next().unwrap()
}

/// `rabbitmq:` section with one extra line.
pub fn rabbit(line: &str) -> String {
    format!("rabbitmq:\n  {line}\n")
}
