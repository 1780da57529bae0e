//! The one mapping between a [`Message`] and AMQP 0-9-1 properties and headers.
//!
//! | `Message` field      | AMQP                                               |
//! |----------------------|----------------------------------------------------|
//! | `id`                 | `message_id`                                       |
//! | `kind`               | `type`                                             |
//! | `timestamp`          | `timestamp` (Unix seconds)                         |
//! | `content_type`       | `content_type`                                     |
//! | `content_encoding`   | `content_encoding`                                 |
//! | `priority`           | `priority`                                         |
//! | `correlation_id`     | `correlation_id`                                   |
//! | `reply_to`           | `reply_to`                                         |
//! | `expiration`         | `expiration`, a string of milliseconds             |
//! | `delivery`           | `delivery_mode` 2 (persistent) / 1 (transient)     |
//! | `attempt`            | header [`header::ATTEMPT`] (absent = 1)            |
//! | `traceparent`        | header [`header::TRACEPARENT`] (W3C trace context) |
//! | `headers`            | `headers`, typed (see [`to_amqp_value`])           |
//!
//! Header values: every AMQP field type decodes to a [`HeaderValue`]; integers of
//! every width become `Int`, `f32`/`f64` become `Float`, a long string that is
//! not UTF-8 becomes `Bytes`, and a **decimal** becomes the `String` of its exact
//! decimal text (e.g. scale 2, value 12345 → `"123.45"`), because `HeaderValue`
//! has no decimal type and a float would round it. Encoding never panics: names
//! and values that do not fit AMQP's limits (short strings ≤ 255 bytes; floats
//! must be finite, as RabbitMQ cannot decode NaN or infinity) are refused with
//! [`Error::InvalidMessage`].

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use super::{header, DeliveryMode, HeaderValue, Headers, Message, Priority};
use crate::error::{Error, Result};

/// A short string (≤ 255 bytes), refused clearly when longer; `what` names the field.
pub(crate) fn short(what: &str, s: &str) -> Result<ShortString> {
    ShortString::try_new(s).map_err(|_| {
        Error::InvalidMessage(format!(
            "{what} is {} bytes long; AMQP allows at most 255",
            s.len()
        ))
    })
}

/// Encode one header value.
pub fn to_amqp_value(v: &HeaderValue) -> Result<AMQPValue> {
    Ok(match v {
        HeaderValue::Void => AMQPValue::Void,
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        // RabbitMQ (Erlang) cannot decode NaN or infinity: its channel crashes and the
        // whole connection is closed. Refuse them here, where the cause is clear.
        HeaderValue::Float(f) if !f.is_finite() => {
            return Err(Error::InvalidMessage(format!(
                "header value {f} is not a finite number: RabbitMQ cannot carry NaN or infinity in a header (send it as a string)"
            )))
        }
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.clone())),
        HeaderValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        HeaderValue::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(to_amqp_value).collect::<Result<Vec<_>>>()?,
        )),
        HeaderValue::Table(t) => AMQPValue::FieldTable(to_field_table(t)?),
    })
}

/// Decode one header value (see the module doc for the widening rules).
pub fn from_amqp_value(v: &AMQPValue) -> HeaderValue {
    match v {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::ShortInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::ShortUInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::LongInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::LongUInt(i) => HeaderValue::Int(*i as i64),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Float(f) => HeaderValue::Float(*f as f64),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::DecimalValue(d) => HeaderValue::String(decimal_text(d.scale, d.value)),
        AMQPValue::ShortString(s) => HeaderValue::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(t) => HeaderValue::String(t.to_string()),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::FieldArray(a) => {
            HeaderValue::Array(a.as_slice().iter().map(from_amqp_value).collect())
        }
        AMQPValue::Timestamp(t) => HeaderValue::Timestamp(*t),
        AMQPValue::FieldTable(t) => HeaderValue::Table(from_field_table(t)),
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::Void => HeaderValue::Void,
    }
}

/// The exact decimal text of an AMQP decimal (`value × 10^-scale`).
fn decimal_text(scale: u8, value: u32) -> String {
    let digits = value.to_string();
    let scale = scale as usize;
    if scale == 0 {
        return digits;
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{int}.{frac}")
}

/// Encode a header table.
pub fn to_field_table(h: &BTreeMap<String, HeaderValue>) -> Result<FieldTable> {
    let mut t = FieldTable::default();
    for (k, v) in h {
        let name = ShortString::try_new(k.as_str()).map_err(|_| {
            let head: String = k.chars().take(32).collect();
            Error::InvalidMessage(format!(
                "header name '{head}…' is {} bytes long; AMQP allows at most 255",
                k.len()
            ))
        })?;
        let value = to_amqp_value(v).map_err(|e| match e {
            Error::InvalidMessage(why) => Error::InvalidMessage(format!("header '{k}': {why}")),
            other => other,
        })?;
        t.insert(name, value);
    }
    Ok(t)
}

/// Decode a header table.
pub fn from_field_table(t: &FieldTable) -> BTreeMap<String, HeaderValue> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), from_amqp_value(v)))
        .collect()
}

/// The AMQP properties (with headers) of `m`.
pub fn to_properties(m: &Message) -> Result<BasicProperties> {
    let mut headers = m.headers.clone();
    headers.insert(
        header::ATTEMPT.to_string(),
        HeaderValue::Int(m.attempt as i64),
    );
    if let Some(tp) = &m.traceparent {
        headers.insert(header::TRACEPARENT.to_string(), tp.clone().into());
    }
    let mut p = BasicProperties::default()
        .with_message_id(short("message id", &m.id)?)
        .with_timestamp(m.timestamp)
        .with_delivery_mode(match m.delivery_mode {
            DeliveryMode::Persistent => 2,
            DeliveryMode::Transient => 1,
        })
        .with_headers(to_field_table(&headers)?);
    if let Some(k) = &m.kind {
        p = p.with_type(short("message type", k)?);
    }
    if let Some(ct) = &m.content_type {
        p = p.with_content_type(short("content type", ct)?);
    }
    if let Some(ce) = &m.content_encoding {
        p = p.with_content_encoding(short("content encoding", ce)?);
    }
    if let Some(pr) = m.priority {
        p = p.with_priority(pr.value());
    }
    if let Some(c) = &m.correlation_id {
        p = p.with_correlation_id(short("correlation id", c)?);
    }
    if let Some(r) = &m.reply_to {
        p = p.with_reply_to(short("reply-to", r)?);
    }
    if let Some(e) = m.expiration {
        p = p.with_expiration(short("expiration", &e.as_millis().to_string())?);
    }
    Ok(p)
}

/// How many bytes `p` takes on the wire. A content header travels in one AMQP
/// frame, so properties and headers larger than the negotiated `frame_max`
/// cannot be sent at all (RabbitMQ closes the whole connection).
pub fn encoded_properties_len(p: &BasicProperties) -> usize {
    let write = lapin::protocol::basic::gen_properties(p);
    write(Vec::new().into())
        .map(|ctx| ctx.write.len())
        .unwrap_or(usize::MAX)
}

/// The message carried by `properties` and `body`. A message without a
/// `message_id` (published by another client) gets a fresh UUID v7, so that
/// id-keyed machinery (duplicate guard) never lumps such messages together.
pub fn from_properties(properties: &BasicProperties, body: impl Into<Bytes>) -> Message {
    let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_string());
    let mut headers: Headers = properties
        .headers()
        .as_ref()
        .map(from_field_table)
        .unwrap_or_default();
    let traceparent = match headers.remove(header::TRACEPARENT) {
        Some(HeaderValue::String(tp)) => Some(tp),
        // Not text: not a W3C traceparent; leave it where it was.
        Some(other) => {
            headers.insert(header::TRACEPARENT.into(), other);
            None
        }
        None => None,
    };
    let attempt = headers
        .remove(header::ATTEMPT)
        .and_then(|v| v.as_i64())
        .and_then(|a| u32::try_from(a).ok())
        .filter(|a| *a >= 1)
        .unwrap_or(1);
    Message {
        id: text(properties.message_id()).unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        kind: text(properties.kind()),
        payload: body.into(),
        content_type: text(properties.content_type()),
        content_encoding: text(properties.content_encoding()),
        headers,
        timestamp: properties.timestamp().unwrap_or(0),
        // Another publisher may use priorities above ours; they mean "highest" here.
        priority: properties
            .priority()
            .map(|p| Priority::new(p.min(Priority::MAX)).unwrap_or(Priority::CRITICAL)),
        correlation_id: text(properties.correlation_id()),
        reply_to: text(properties.reply_to()),
        expiration: properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok())
            .map(Duration::from_millis),
        delivery_mode: match properties.delivery_mode() {
            Some(2) => DeliveryMode::Persistent,
            _ => DeliveryMode::Transient,
        },
        attempt,
        traceparent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::DecimalValue;

    fn every_type() -> Headers {
        let mut nested = BTreeMap::new();
        nested.insert("inner".to_string(), HeaderValue::Int(-7));
        nested.insert(
            "deeper".to_string(),
            HeaderValue::Array(vec![HeaderValue::Bool(false), HeaderValue::Void]),
        );
        let mut h = Headers::new();
        h.insert("void".into(), HeaderValue::Void);
        h.insert("bool".into(), HeaderValue::Bool(true));
        h.insert("int".into(), HeaderValue::Int(i64::MIN));
        h.insert("float".into(), HeaderValue::Float(1.5e-3));
        h.insert("string".into(), HeaderValue::String("héllo".into()));
        h.insert(
            "bytes".into(),
            HeaderValue::Bytes(vec![0, 159, 146, 150, 255]),
        );
        h.insert("timestamp".into(), HeaderValue::Timestamp(1_700_000_000));
        h.insert(
            "array".into(),
            HeaderValue::Array(vec![
                HeaderValue::Int(1),
                HeaderValue::String("two".into()),
                HeaderValue::Table(nested.clone()),
            ]),
        );
        h.insert("table".into(), HeaderValue::Table(nested));
        h
    }

    #[test]
    fn message_round_trips_through_properties() {
        let mut m = Message::new("body")
            .with_kind("llm.request")
            .with_priority(Priority::HIGH)
            .with_correlation_id("corr-1")
            .with_expiration(Duration::from_millis(1500));
        m.content_type = Some("application/json".into());
        m.content_encoding = Some("gzip".into());
        m.reply_to = Some("helixagent.replies".into());
        m.attempt = 3;
        m.headers = every_type();
        let p = to_properties(&m).unwrap();
        assert_eq!(p.delivery_mode(), &Some(2));
        assert_eq!(p.expiration().as_ref().unwrap().as_str(), "1500");
        assert_eq!(p.kind().as_ref().unwrap().as_str(), "llm.request");
        let back = from_properties(&p, m.payload.clone());
        assert_eq!(back, m);

        m.delivery_mode = DeliveryMode::Transient;
        m.priority = None;
        m.expiration = None;
        let p = to_properties(&m).unwrap();
        assert_eq!(p.delivery_mode(), &Some(1));
        assert_eq!(from_properties(&p, m.payload.clone()), m);
    }

    #[test]
    fn every_amqp_field_type_decodes() {
        let cases = [
            (AMQPValue::ShortShortInt(-3), HeaderValue::Int(-3)),
            (AMQPValue::ShortShortUInt(250), HeaderValue::Int(250)),
            (AMQPValue::ShortInt(-300), HeaderValue::Int(-300)),
            (AMQPValue::ShortUInt(60_000), HeaderValue::Int(60_000)),
            (AMQPValue::LongInt(-70_000), HeaderValue::Int(-70_000)),
            (
                AMQPValue::LongUInt(4_000_000_000),
                HeaderValue::Int(4_000_000_000),
            ),
            (AMQPValue::LongLongInt(i64::MAX), HeaderValue::Int(i64::MAX)),
            (AMQPValue::Float(0.5), HeaderValue::Float(0.5)),
            (AMQPValue::Double(0.25), HeaderValue::Float(0.25)),
            (
                AMQPValue::ShortString("short".into()),
                HeaderValue::String("short".into()),
            ),
            (
                AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
                HeaderValue::Bytes(vec![0xff, 0xfe]),
            ),
            (
                AMQPValue::DecimalValue(DecimalValue {
                    scale: 2,
                    value: 12345,
                }),
                HeaderValue::String("123.45".into()),
            ),
            (
                AMQPValue::DecimalValue(DecimalValue { scale: 3, value: 5 }),
                HeaderValue::String("0.005".into()),
            ),
            (
                AMQPValue::DecimalValue(DecimalValue { scale: 0, value: 7 }),
                HeaderValue::String("7".into()),
            ),
            (AMQPValue::Void, HeaderValue::Void),
        ];
        for (amqp, want) in cases {
            assert_eq!(from_amqp_value(&amqp), want, "{amqp:?}");
        }
    }

    #[test]
    fn too_long_names_are_refused_not_panicking() {
        let long = "x".repeat(300);
        let m = Message::new("b").with_header(long.clone(), 1i64);
        let e = to_properties(&m).unwrap_err().to_string();
        assert!(e.contains("header name") && e.contains("255"), "{e}");
        let m = Message::new("b").with_correlation_id(long);
        assert!(to_properties(&m)
            .unwrap_err()
            .to_string()
            .contains("correlation id"));
    }

    #[test]
    fn foreign_messages_get_defaults() {
        let p = BasicProperties::default().with_priority(200);
        let m = from_properties(&p, Bytes::from_static(b"x"));
        assert_eq!(m.attempt, 1);
        assert_eq!(m.priority, Some(Priority::CRITICAL));
        assert_eq!(m.delivery_mode, DeliveryMode::Transient);
        assert!(!m.id.is_empty());
    }
}
