//! Loading: YAML file → interpolation → environment → validated [`Config`].
//!
//! Every stage adds to one list of problems, so a user fixing a configuration
//! sees all that is wrong with it at once ([`Error::InvalidConfig`]).

use super::env::{EnvLayer, EnvSource};
use super::interpolate::interpolate;
use super::loose::{yaml_options, Loose};
use super::validate::{build, Sources};
use super::Config;
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// Secrets shorter than this are not scrubbed from messages: replacing every
/// `abc` in a message would garble it, and such a password is not worth hiding
/// more than the message is worth reading.
const MIN_SCRUB_LEN: usize = 4;

/// A configuration file is a few hundred bytes; anything this big is a mistake
/// (and would only make the YAML parser work for nothing).
const MAX_FILE_BYTES: usize = 1 << 20;

/// Load a configuration: file (optional) + environment, validated.
///
/// Without a file, the defaults (the spec's values) plus the environment apply.
pub fn load(path: Option<&Path>, env: &EnvSource) -> Result<Config> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| Error::Io {
            context: format!(
                "cannot read configuration file {}: {e} (check the --config path)",
                p.display()
            ),
            source: e,
        })?,
        None => String::new(),
    };
    load_from_str(&text, env)
}

/// Load from YAML text + environment, validated.
pub fn load_from_str(text: &str, env: &EnvSource) -> Result<Config> {
    if text.len() > MAX_FILE_BYTES {
        return Err(Error::invalid_config(format!(
            "(file): the configuration is {} bytes, more than the {MAX_FILE_BYTES} accepted; is this the right file?",
            text.len()
        )));
    }
    let mut problems = Vec::new();
    let mut secrets = Vec::new();

    let mut file = parse_yaml(text, &mut problems);
    match file.get("rabbitmq").and_then(|r| r.get("password")) {
        Some(Loose::Seq(_) | Loose::Map(_) | Loose::Null) | None => {}
        Some(Loose::Str(p)) => secrets.push(p.clone()),
        Some(p) => secrets.push(p.show()),
    }

    // Interpolate string scalars in place, remembering the raw text (for
    // messages) and the paths that failed (already reported, not re-checked).
    let mut raw = HashMap::new();
    let mut failed = HashSet::new();
    file.for_each_str_mut("", &mut |path, value| {
        if !value.contains('$') {
            return;
        }
        let secret = path == "rabbitmq.password";
        let shown = if secret {
            "***".to_string()
        } else {
            Loose::Str(value.clone()).show()
        };
        match interpolate(value, |name| env.get(name)) {
            Ok(expanded) => {
                if secret {
                    secrets.push(expanded.clone());
                }
                raw.insert(path.to_string(), std::mem::replace(value, expanded));
            }
            Err(errors) => {
                for e in errors {
                    problems.push(format!("{path} = `{shown}`: {e}"));
                }
                failed.insert(path.to_string());
            }
        }
    });

    let layer = EnvLayer::read(env);
    problems.extend(layer.problems.iter().cloned());
    secrets.extend(layer.secrets.iter().cloned());

    let (config, more) = build(Sources {
        file: &file,
        env: &layer,
        raw: &raw,
        failed: &failed,
    });
    problems.extend(more);

    if problems.is_empty() {
        return Ok(config);
    }
    secrets.push(config.rabbitmq.password.expose().to_string());
    // Defence in depth: a password may reach a message through a path no
    // check foresaw (a YAML error quoting a line, `host: ${RABBITMQ_PASSWORD}`).
    secrets.retain(|s| s.chars().count() >= MIN_SCRUB_LEN);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for p in &mut problems {
        for s in &secrets {
            if p.contains(s.as_str()) {
                *p = p.replace(s.as_str(), "***");
            }
        }
    }
    Err(Error::InvalidConfig { problems })
}

/// Parse YAML into the loose tree; a syntax error becomes one problem and an empty tree.
fn parse_yaml(text: &str, problems: &mut Vec<String>) -> Loose {
    if text.trim().is_empty() {
        return Loose::Null;
    }
    match serde_saphyr::from_str_with_options::<Loose>(text, yaml_options()) {
        Ok(tree) => tree,
        Err(e) => {
            // The parser's advice is for programmers embedding it, not for users.
            let e = e.to_string().replace(
                ", set DuplicateKeyPolicy in Options if acceptable",
                "; remove one of them",
            );
            problems.push(format!(
                "(file): not valid YAML: {e}; fix the syntax (indent with spaces, quote values holding `: ` or ` #`)"
            ));
            Loose::Null
        }
    }
}
