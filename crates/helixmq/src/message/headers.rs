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
