//! `${VAR}` and `${VAR:-default}` interpolation inside configuration values.
//!
//! Why not a crate: `shellexpand` 3 handles `${VAR:-default}` but silently
//! leaves an unterminated `${` in place and also expands bare `$NAME`, which
//! would rewrite a literal password such as `pa$word`; serde-saphyr's property
//! interpolation stops the whole parse at the first bad reference, while
//! validation must report every problem at once with its field path. The
//! grammar needed here is tiny, so it lives here, with tests.
//!
//! Grammar (applied to each YAML string scalar, after parsing, so a value
//! coming from the environment can never change the YAML structure):
//! - `${NAME}`: the variable's value; an error when it is unset.
//! - `${NAME:-default}`: the value, or `default` when unset or empty
//!   (shell semantics). The default runs up to the first `}`.
//! - `$${` is a literal `${`. Any other `$` is kept as is.
//!
//! `NAME` is `[A-Za-z_][A-Za-z0-9_]*`.

use std::fmt;

/// Why a value could not be interpolated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum InterpolateError {
    /// A `${` with no closing `}`.
    Unterminated,
    /// `${...}` whose name is not a valid variable name.
    InvalidName(String),
    /// `${NAME}` with `NAME` unset and no default.
    Unset(String),
}

impl fmt::Display for InterpolateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterpolateError::Unterminated => {
                f.write_str("unterminated `${`: add the closing `}` (or write `$${` for a literal `${`)")
            }
            InterpolateError::InvalidName(name) => write!(
                f,
                "`${{{name}}}` is not a valid variable reference: names are letters, digits and `_`, not starting with a digit; use `${{NAME}}` or `${{NAME:-default}}`"
            ),
            InterpolateError::Unset(name) => write!(
                f,
                "environment variable `{name}` is not set and has no default: set it, or write `${{{name}:-default}}`"
            ),
        }
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c == '_' || c.is_ascii_alphabetic() => {}
        _ => return false,
    }
    chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Interpolate `input`, looking variables up with `lookup`.
///
/// Every error of the value is returned, so one bad reference does not hide
/// another one in the same value.
pub(super) fn interpolate(
    input: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<InterpolateError>> {
    if !input.contains('$') {
        return Ok(input.to_string());
    }
    let mut out = String::with_capacity(input.len());
    let mut errors = Vec::new();
    let mut rest = input;
    while let Some(idx) = rest.find('$') {
        out.push_str(&rest[..idx]);
        let after = &rest[idx..];
        if let Some(tail) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = tail;
        } else if let Some(body_and_tail) = after.strip_prefix("${") {
            let Some(close) = body_and_tail.find('}') else {
                errors.push(InterpolateError::Unterminated);
                // Nothing after an unterminated `${` can be a reference.
                rest = "";
                break;
            };
            let body = &body_and_tail[..close];
            rest = &body_and_tail[close + 1..];
            let (name, default) = match body.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (body, None),
            };
            if !valid_name(name) {
                errors.push(InterpolateError::InvalidName(body.to_string()));
                continue;
            }
            match (lookup(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => errors.push(InterpolateError::Unset(name.to_string())),
            }
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(input: &str, vars: &[(&str, &str)]) -> Result<String, Vec<InterpolateError>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        interpolate(input, |k| map.get(k).cloned())
    }

    #[test]
    fn plain_text_is_unchanged() {
        assert_eq!(run("localhost", &[]).unwrap(), "localhost");
        assert_eq!(run("", &[]).unwrap(), "");
    }

    #[test]
    fn braced_variable_is_replaced() {
        assert_eq!(run("${H}", &[("H", "rabbit")]).unwrap(), "rabbit");
        assert_eq!(run("a-${H}-b", &[("H", "x")]).unwrap(), "a-x-b");
        assert_eq!(run("${A}${B}", &[("A", "1"), ("B", "2")]).unwrap(), "12");
    }

    #[test]
    fn default_used_when_unset_or_empty() {
        assert_eq!(run("${P:-5672}", &[]).unwrap(), "5672");
        assert_eq!(run("${P:-5672}", &[("P", "")]).unwrap(), "5672");
        assert_eq!(run("${P:-5672}", &[("P", "5671")]).unwrap(), "5671");
        assert_eq!(run("${V:-/}", &[]).unwrap(), "/");
        assert_eq!(run("${V:-}", &[]).unwrap(), "");
        assert_eq!(run("${V:-a:-b}", &[]).unwrap(), "a:-b");
    }

    #[test]
    fn unset_without_default_is_an_error() {
        assert_eq!(
            run("${NOPE}", &[]),
            Err(vec![InterpolateError::Unset("NOPE".into())])
        );
    }

    #[test]
    fn unterminated_is_an_error() {
        assert_eq!(
            run("${HOST:-localhost", &[]),
            Err(vec![InterpolateError::Unterminated])
        );
        assert_eq!(run("abc${", &[]), Err(vec![InterpolateError::Unterminated]));
    }

    #[test]
    fn invalid_names_are_errors() {
        assert_eq!(
            run("${}", &[]),
            Err(vec![InterpolateError::InvalidName(String::new())])
        );
        assert_eq!(
            run("${1A}", &[]),
            Err(vec![InterpolateError::InvalidName("1A".into())])
        );
        assert_eq!(
            run("${:-x}", &[]),
            Err(vec![InterpolateError::InvalidName(":-x".into())])
        );
        assert_eq!(
            run("${A B}", &[]),
            Err(vec![InterpolateError::InvalidName("A B".into())])
        );
    }

    #[test]
    fn every_error_of_a_value_is_reported() {
        let errs = run("${A}${1}${", &[]).unwrap_err();
        assert_eq!(
            errs,
            vec![
                InterpolateError::Unset("A".into()),
                InterpolateError::InvalidName("1".into()),
                InterpolateError::Unterminated
            ]
        );
    }

    #[test]
    fn lone_dollars_are_kept_and_escape_works() {
        assert_eq!(run("pa$word", &[("word", "X")]).unwrap(), "pa$word");
        assert_eq!(run("$", &[]).unwrap(), "$");
        assert_eq!(run("a$$b", &[]).unwrap(), "a$$b");
        assert_eq!(run("$${H}", &[("H", "x")]).unwrap(), "${H}");
        assert_eq!(run("€${H}€", &[("H", "ü")]).unwrap(), "€ü€");
    }

    #[test]
    fn values_are_not_interpolated_twice() {
        assert_eq!(run("${A}", &[("A", "${B}"), ("B", "no")]).unwrap(), "${B}");
    }
}
