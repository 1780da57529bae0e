//! The configuration as parsed, before any type is imposed on it.
//!
//! Deserializing straight into [`Config`](super::Config) would stop at the
//! first problem (serde fails on `port: 70000` before anything else is looked
//! at) and would give no field paths for interpolated values. So the YAML is
//! first read into this loose tree, which accepts any YAML; interpolation,
//! environment overrides and validation then work on it and collect every
//! problem.

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::fmt;

/// Any YAML value. Mappings keep their order, so problems come out in file order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Loose {
    /// `~`, `null` or nothing.
    Null,
    /// A YAML boolean.
    Bool(bool),
    /// A YAML integer (i128 so that `port: 99999999999999999999` is a range problem, not a parse failure).
    Int(i128),
    /// A YAML float.
    Float(f64),
    /// A string (quoted or plain).
    Str(String),
    /// A sequence.
    Seq(Vec<Loose>),
    /// A mapping; keys as text.
    Map(Vec<(String, Loose)>),
}

/// How configuration YAML is read.
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    // Snippets quote the source line, which may hold a password.
    options.with_snippet = false;
    // YAML 1.1 reads `y`, `n`, `on`, `off`, `yes`, `no` as booleans: a host
    // named `y` or a user named `no` must stay text. Boolean fields still
    // accept those words (see validate.rs).
    options.strict_booleans = true;
    // `0123` and `1_000` stay text rather than becoming 123 and 1000.
    options.leading_zero_numbers_as_strings = true;
    options.underscored_numbers_as_strings = true;
    options
}

impl Loose {
    /// What kind of value this is, for messages ("a mapping", "a list").
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Loose::Null => "nothing (null)",
            Loose::Bool(_) => "a boolean",
            Loose::Int(_) => "a number",
            Loose::Float(_) => "a number",
            Loose::Str(_) => "a string",
            Loose::Seq(_) => "a list",
            Loose::Map(_) => "a mapping",
        }
    }

    /// The value as shown in a problem line.
    pub(crate) fn show(&self) -> String {
        match self {
            Loose::Null => "null".into(),
            Loose::Bool(b) => b.to_string(),
            Loose::Int(i) => i.to_string(),
            Loose::Float(f) => f.to_string(),
            Loose::Str(s) => {
                // Keep problem lines readable when someone pastes a whole file into a value.
                const MAX: usize = 80;
                if s.chars().count() > MAX {
                    let cut: String = s.chars().take(MAX).collect();
                    format!("{cut}…")
                } else {
                    s.clone()
                }
            }
            Loose::Seq(_) => "[…]".into(),
            Loose::Map(_) => "{…}".into(),
        }
    }

    /// The entry `key` of a mapping.
    pub(crate) fn get(&self, key: &str) -> Option<&Loose> {
        match self {
            Loose::Map(entries) => entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// Apply `f` to every string scalar, with its dotted path.
    pub(crate) fn for_each_str_mut(&mut self, path: &str, f: &mut dyn FnMut(&str, &mut String)) {
        match self {
            Loose::Str(s) => f(path, s),
            Loose::Seq(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    item.for_each_str_mut(&format!("{path}[{i}]"), f);
                }
            }
            Loose::Map(entries) => {
                for (k, v) in entries.iter_mut() {
                    let child = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    v.for_each_str_mut(&child, f);
                }
            }
            _ => {}
        }
    }
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LooseVisitor)
    }
}

struct LooseVisitor;

impl<'de> Visitor<'de> for LooseVisitor {
    type Value = Loose;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Loose, E> {
        Ok(Loose::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Loose, D::Error> {
        Loose::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Loose, E> {
        Ok(Loose::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Loose, E> {
        Ok(Loose::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Loose, E> {
        Ok(Loose::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Loose, E> {
        Ok(Loose::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Loose, E> {
        Ok(Loose::Int(i128::try_from(v).unwrap_or(i128::MAX)))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Loose, E> {
        Ok(Loose::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Loose, E> {
        Ok(Loose::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Loose, E> {
        Ok(Loose::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Loose, E> {
        Ok(Loose::Str(String::from_utf8_lossy(v).into_owned()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Loose, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Loose>()? {
            items.push(item);
        }
        Ok(Loose::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Loose, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Loose>()? {
            let key = match key {
                Loose::Str(s) => s,
                Loose::Seq(_) | Loose::Map(_) => "<complex key>".to_string(),
                other => other.show(),
            };
            let value = map.next_value::<Loose>()?;
            entries.push((key, value));
        }
        Ok(Loose::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Loose {
        serde_saphyr::from_str_with_options(text, yaml_options()).unwrap()
    }

    #[test]
    fn scalars_keep_their_yaml_type() {
        let v = parse("a: 70000\nb: x\nc: true\nd: ~\ne: 1.5\nf: 99999999999999999999\n");
        assert_eq!(v.get("a"), Some(&Loose::Int(70000)));
        assert_eq!(v.get("b"), Some(&Loose::Str("x".into())));
        assert_eq!(v.get("c"), Some(&Loose::Bool(true)));
        assert_eq!(v.get("d"), Some(&Loose::Null));
        assert_eq!(v.get("e"), Some(&Loose::Float(1.5)));
        assert!(matches!(
            v.get("f"),
            Some(Loose::Int(_)) | Some(Loose::Float(_)) | Some(Loose::Str(_))
        ));
    }

    #[test]
    fn interpolation_forms_parse_as_strings() {
        let v = parse("port: ${RABBITMQ_PORT:-5672}\nvhost: ${RABBITMQ_VHOST:-/}\n");
        assert_eq!(
            v.get("port"),
            Some(&Loose::Str("${RABBITMQ_PORT:-5672}".into()))
        );
        assert_eq!(
            v.get("vhost"),
            Some(&Loose::Str("${RABBITMQ_VHOST:-/}".into()))
        );
    }

    #[test]
    fn paths_of_strings() {
        let mut v = parse("a:\n  b: x\n  c: [y, z]\n  d: 0123\n");
        let mut seen = Vec::new();
        v.for_each_str_mut("", &mut |p, s| seen.push(format!("{p}={s}")));
        assert_eq!(seen, ["a.b=x", "a.c[0]=y", "a.c[1]=z", "a.d=0123"]);
    }
}
