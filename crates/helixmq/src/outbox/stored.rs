//! A [`Message`] as an outbox row (`payload` + `properties` JSON) and back.
//!
//! Everything but the payload goes into one JSON document so that a new
//! message property needs no migration. Header values keep their type
//! (`{"t": "Int", "v": 3}`): an `Int` header must come back an `Int`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::message::{HeaderValue, Message, Priority};

#[derive(Serialize, Deserialize)]
struct Properties {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_encoding: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    headers: BTreeMap<String, Header>,
    timestamp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expiration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    transient: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "t", content = "v")]
enum Header {
    Void,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Bytes(Vec<u8>),
    Timestamp(u64),
    Array(Vec<Header>),
    Table(BTreeMap<String, Header>),
}

impl From<&HeaderValue> for Header {
    fn from(v: &HeaderValue) -> Self {
        match v {
            HeaderValue::Void => Header::Void,
            HeaderValue::Bool(b) => Header::Bool(*b),
            HeaderValue::Int(i) => Header::Int(*i),
            HeaderValue::Float(f) => Header::Float(*f),
            HeaderValue::String(s) => Header::String(s.clone()),
            HeaderValue::Bytes(b) => Header::Bytes(b.clone()),
            HeaderValue::Timestamp(t) => Header::Timestamp(*t),
            HeaderValue::Array(a) => Header::Array(a.iter().map(Header::from).collect()),
            HeaderValue::Table(t) => {
                Header::Table(t.iter().map(|(k, v)| (k.clone(), v.into())).collect())
            }
        }
    }
}

impl From<Header> for HeaderValue {
    fn from(h: Header) -> Self {
        match h {
            Header::Void => HeaderValue::Void,
            Header::Bool(b) => HeaderValue::Bool(b),
            Header::Int(i) => HeaderValue::Int(i),
            Header::Float(f) => HeaderValue::Float(f),
            Header::String(s) => HeaderValue::String(s),
            Header::Bytes(b) => HeaderValue::Bytes(b),
            Header::Timestamp(t) => HeaderValue::Timestamp(t),
            Header::Array(a) => HeaderValue::Array(a.into_iter().map(Into::into).collect()),
            Header::Table(t) => {
                HeaderValue::Table(t.into_iter().map(|(k, v)| (k, v.into())).collect())
            }
        }
    }
}

/// The `properties` column of `m`.
pub(super) fn properties(m: &Message) -> Result<String> {
    let p = Properties {
        kind: m.kind.clone(),
        content_type: m.content_type.clone(),
        content_encoding: m.content_encoding.clone(),
        headers: m
            .headers
            .iter()
            .map(|(k, v)| (k.clone(), v.into()))
            .collect(),
        timestamp: m.timestamp,
        priority: m.priority.map(Priority::value),
        correlation_id: m.correlation_id.clone(),
        reply_to: m.reply_to.clone(),
        expiration_ms: m.expiration.map(|d| d.as_millis() as u64),
        transient: is_transient(m),
        traceparent: m.traceparent.clone(),
    };
    serde_json::to_string(&p)
        .map_err(|e| Error::InvalidMessage(format!("cannot store message {}: {e}", m.id)))
}

/// The message of an outbox row.
pub(super) fn message(id: String, payload: Vec<u8>, properties: &str) -> Result<Message> {
    let p: Properties = serde_json::from_str(properties).map_err(|e| {
        Error::InvalidMessage(format!("outbox row of message {id}: bad properties: {e}"))
    })?;
    let mut m = Message::new(Bytes::from(payload));
    m.id = id;
    m.kind = p.kind;
    m.content_type = p.content_type;
    m.content_encoding = p.content_encoding;
    m.headers = p.headers.into_iter().map(|(k, v)| (k, v.into())).collect();
    m.timestamp = p.timestamp;
    m.priority = p.priority.map(Priority::new).transpose()?;
    m.correlation_id = p.correlation_id;
    m.reply_to = p.reply_to;
    m.expiration = p.expiration_ms.map(Duration::from_millis);
    if p.transient {
        set_transient(&mut m);
    }
    m.traceparent = p.traceparent;
    Ok(m)
}

// The only two lines that name the delivery-mode type.
fn is_transient(m: &Message) -> bool {
    m.delivery_mode == crate::message::DeliveryMode::Transient
}
fn set_transient(m: &mut Message) {
    m.delivery_mode = crate::message::DeliveryMode::Transient;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_property() {
        let mut m = Message::new("body")
            .with_kind("order.created")
            .with_priority(Priority::HIGH)
            .with_correlation_id("c-1")
            .with_header("n", HeaderValue::Int(3))
            .with_header(
                "t",
                HeaderValue::Table([("a".to_string(), HeaderValue::Bool(true))].into()),
            )
            .with_expiration(Duration::from_millis(1500))
            .with_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        m.content_type = Some("text/plain".into());
        m.reply_to = Some("replies".into());
        set_transient(&mut m);
        let back = message(m.id.clone(), m.payload.to_vec(), &properties(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }
}
