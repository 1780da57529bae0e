//! Typed header values, a superset-free image of the AMQP field types.

use std::collections::BTreeMap;

/// Message headers, ordered for stable encoding.
pub type Headers = BTreeMap<String, HeaderValue>;

/// A header value. Every AMQP field type maps to one of these; integers widen to
/// `Int`, and they come back as `Int`.
#[derive(Debug, Clone, PartialEq)]
pub enum HeaderValue {
    /// No value (AMQP void).
    Void,
    /// Boolean.
    Bool(bool),
    /// Any integer width.
    Int(i64),
    /// Any float width.
    Float(f64),
    /// UTF-8 text.
    String(String),
    /// Raw bytes (AMQP byte array, or a long string that is not UTF-8).
    Bytes(Vec<u8>),
    /// AMQP timestamp (Unix seconds).
    Timestamp(u64),
    /// Array.
    Array(Vec<HeaderValue>),
    /// Nested table.
    Table(BTreeMap<String, HeaderValue>),
}

impl HeaderValue {
    /// The text, if a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            HeaderValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// The integer, if an integer (or a numeric string).
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            HeaderValue::Int(i) => Some(*i),
            HeaderValue::Timestamp(t) => Some(*t as i64),
            HeaderValue::String(s) => s.parse().ok(),
            _ => None,
        }
    }
}

/// As text for people: strings as they are, bytes lossily, arrays `[a,b]`,
/// tables `{k=v,...}`.
impl std::fmt::Display for HeaderValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderValue::Void => Ok(()),
            HeaderValue::Bool(b) => write!(f, "{b}"),
            HeaderValue::Int(i) => write!(f, "{i}"),
            HeaderValue::Float(x) => write!(f, "{x}"),
            HeaderValue::String(s) => f.write_str(s),
            HeaderValue::Bytes(b) => f.write_str(&String::from_utf8_lossy(b)),
            HeaderValue::Timestamp(t) => write!(f, "{t}"),
            HeaderValue::Array(a) => {
                f.write_str("[")?;
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("]")
            }
            HeaderValue::Table(t) => {
                f.write_str("{")?;
                for (i, (k, v)) in t.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{k}={v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

impl From<&str> for HeaderValue {
    fn from(s: &str) -> Self {
        HeaderValue::String(s.to_string())
    }
}
impl From<String> for HeaderValue {
    fn from(s: String) -> Self {
        HeaderValue::String(s)
    }
}
impl From<i64> for HeaderValue {
    fn from(v: i64) -> Self {
        HeaderValue::Int(v)
    }
}
impl From<u32> for HeaderValue {
    fn from(v: u32) -> Self {
        HeaderValue::Int(v as i64)
    }
}
impl From<bool> for HeaderValue {
    fn from(v: bool) -> Self {
        HeaderValue::Bool(v)
    }
}
impl From<f64> for HeaderValue {
    fn from(v: f64) -> Self {
        HeaderValue::Float(v)
    }
}
