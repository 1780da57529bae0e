//! Property tests of the AMQP header mapping (`message::amqp`): decoding any
//! header table never panics, what is decoded encodes again to the same
//! values, what helixmq encodes decodes back unchanged (also through the wire
//! format lapin sends), names AMQP cannot carry and floats RabbitMQ cannot
//! decode (NaN, infinity) are refused with an error,
//! and arbitrary bytes on the wire never make the decoder panic.

use std::collections::BTreeMap;
use std::time::Duration;

use helixmq::message::amqp::{
    from_amqp_value, from_field_table, from_properties, to_amqp_value, to_field_table,
    to_properties,
};
use helixmq::message::DeliveryMode;
use helixmq::{Error, HeaderValue, Message, Priority};
use lapin::types::generation::gen_field_table;
use lapin::types::parsing::parse_field_table;
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::BasicProperties;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

/// Equality where NaN equals NaN and floats compare by bits (so -0.0 ≠ 0.0).
fn same(a: &HeaderValue, b: &HeaderValue) -> bool {
    use HeaderValue::*;
    match (a, b) {
        (Float(x), Float(y)) => x.to_bits() == y.to_bits(),
        (Array(x), Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b)),
        (Table(x), Table(y)) => same_table(x, y),
        _ => a == b,
    }
}

fn same_table(x: &BTreeMap<String, HeaderValue>, y: &BTreeMap<String, HeaderValue>) -> bool {
    x.len() == y.len()
        && x.iter()
            .zip(y)
            .all(|((ka, va), (kb, vb))| ka == kb && same(va, vb))
}

/// AMQP short strings (table keys), any Unicode, at most 255 bytes.
fn short_string() -> impl Strategy<Value = ShortString> {
    "\\PC{0,24}".prop_map(|s| ShortString::from(s.as_str()))
}

/// Every AMQP field type, nested up to 4 levels.
fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        short_string().prop_map(AMQPValue::ShortString),
        vec(any::<u8>(), 0..48).prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        "\\PC{0,24}".prop_map(|s| AMQPValue::LongString(LongString::from(s.into_bytes()))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        vec(any::<u8>(), 0..48).prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(4, 96, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            btree_map(short_string(), inner, 0..8).prop_map(|m| {
                let mut t = FieldTable::default();
                for (k, v) in m {
                    t.insert(k, v);
                }
                AMQPValue::FieldTable(t)
            }),
        ]
    })
}

fn amqp_table() -> impl Strategy<Value = FieldTable> {
    btree_map(short_string(), amqp_value(), 0..12).prop_map(|m| {
        let mut t = FieldTable::default();
        for (k, v) in m {
            t.insert(k, v);
        }
        t
    })
}

/// Header names: mostly ordinary, sometimes around AMQP's 255-byte limit.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "\\PC{0,16}",
        1 => "x{250,260}",
        1 => "é{126,130}",
    ]
}

/// Every `HeaderValue`, nested up to 4 levels.
fn header_value() -> impl Strategy<Value = HeaderValue> {
    let leaf = prop_oneof![
        Just(HeaderValue::Void),
        any::<bool>().prop_map(HeaderValue::Bool),
        any::<i64>().prop_map(HeaderValue::Int),
        any::<f64>().prop_map(HeaderValue::Float),
        "\\PC{0,32}".prop_map(HeaderValue::String),
        vec(any::<u8>(), 0..32).prop_map(HeaderValue::Bytes),
        any::<u64>().prop_map(HeaderValue::Timestamp),
    ];
    leaf.prop_recursive(4, 96, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(HeaderValue::Array),
            btree_map(header_name(), inner, 0..6).prop_map(HeaderValue::Table),
        ]
    })
}

fn headers() -> impl Strategy<Value = BTreeMap<String, HeaderValue>> {
    btree_map(header_name(), header_value(), 0..10)
}

/// Whether RabbitMQ can carry the value: names at every depth fit an AMQP
/// short string (≤ 255 bytes) and every float is finite (Erlang has no NaN or
/// infinity: RabbitMQ would close the connection).
fn value_fits(v: &HeaderValue) -> bool {
    match v {
        HeaderValue::Float(f) => f.is_finite(),
        HeaderValue::Array(a) => a.iter().all(value_fits),
        HeaderValue::Table(t) => names_fit(t),
        _ => true,
    }
}

/// [`value_fits`] for a whole table.
fn names_fit(h: &BTreeMap<String, HeaderValue>) -> bool {
    h.iter().all(|(k, v)| k.len() <= 255 && value_fits(v))
}

/// The refusal names one of the two limits.
fn names_a_limit(text: &str) -> bool {
    text.contains("255") || text.contains("not a finite number")
}

/// The AMQP wire bytes of a table, as lapin writes them.
fn wire(t: &FieldTable) -> Vec<u8> {
    let write = gen_field_table(t);
    write(Vec::new().into()).expect("a table serializes").write
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any table decodes without panicking; what it decodes to encodes again,
    /// and decoding that gives the same values (the mapping is stable).
    #[test]
    fn any_amqp_table_decodes_and_re_encodes_stably(t in amqp_table()) {
        let decoded = from_field_table(&t);
        prop_assert_eq!(decoded.len(), t.inner().len());
        // Names come from short strings; only a non-finite float is refused.
        match to_field_table(&decoded) {
            Ok(again) => prop_assert!(same_table(&from_field_table(&again), &decoded)),
            Err(Error::InvalidMessage(text)) => {
                prop_assert!(!names_fit(&decoded));
                prop_assert!(text.contains("not a finite number"), "{}", text);
            }
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
        }
    }

    /// Each value alone, including the widening rules.
    #[test]
    fn any_amqp_value_decodes_by_the_documented_rules(v in amqp_value()) {
        let h = from_amqp_value(&v);
        match (&v, &h) {
            (AMQPValue::ShortShortInt(i), HeaderValue::Int(o)) => prop_assert_eq!(*i as i64, *o),
            (AMQPValue::ShortShortUInt(i), HeaderValue::Int(o)) => prop_assert_eq!(*i as i64, *o),
            (AMQPValue::ShortInt(i), HeaderValue::Int(o)) => prop_assert_eq!(*i as i64, *o),
            (AMQPValue::ShortUInt(i), HeaderValue::Int(o)) => prop_assert_eq!(*i as i64, *o),
            (AMQPValue::LongInt(i), HeaderValue::Int(o)) => prop_assert_eq!(*i as i64, *o),
            (AMQPValue::LongUInt(i), HeaderValue::Int(o)) => prop_assert_eq!(*i as i64, *o),
            (AMQPValue::LongLongInt(i), HeaderValue::Int(o)) => prop_assert_eq!(*i, *o),
            (AMQPValue::Float(f), HeaderValue::Float(o)) => {
                prop_assert_eq!((*f as f64).to_bits(), o.to_bits())
            }
            (AMQPValue::Double(f), HeaderValue::Float(o)) => prop_assert_eq!(f.to_bits(), o.to_bits()),
            (AMQPValue::DecimalValue(d), HeaderValue::String(s)) => {
                // The exact text: the digits of the value, the point `scale` places from the right.
                let digits: String = s.chars().filter(|c| *c != '.').collect();
                prop_assert_eq!(digits.trim_start_matches('0').to_string(),
                                d.value.to_string().trim_start_matches('0').to_string());
                let frac = s.split_once('.').map(|(_, f)| f.len()).unwrap_or(0);
                prop_assert_eq!(frac, d.scale as usize);
            }
            (AMQPValue::ShortString(s), HeaderValue::String(o)) => prop_assert_eq!(s.as_str(), o),
            (AMQPValue::LongString(s), HeaderValue::String(o)) => prop_assert_eq!(s.as_bytes(), o.as_bytes()),
            (AMQPValue::LongString(s), HeaderValue::Bytes(o)) => {
                prop_assert!(std::str::from_utf8(s.as_bytes()).is_err());
                prop_assert_eq!(s.as_bytes(), &o[..]);
            }
            (AMQPValue::ByteArray(b), HeaderValue::Bytes(o)) => prop_assert_eq!(b.as_slice(), &o[..]),
            (AMQPValue::Timestamp(t), HeaderValue::Timestamp(o)) => prop_assert_eq!(t, o),
            (AMQPValue::Boolean(b), HeaderValue::Bool(o)) => prop_assert_eq!(b, o),
            (AMQPValue::Void, HeaderValue::Void) => {}
            (AMQPValue::FieldArray(a), HeaderValue::Array(o)) => prop_assert_eq!(a.as_slice().len(), o.len()),
            (AMQPValue::FieldTable(t), HeaderValue::Table(o)) => prop_assert_eq!(t.inner().len(), o.len()),
            (v, h) => prop_assert!(false, "{:?} decoded as {:?}", v, h),
        }
        match to_amqp_value(&h) {
            Ok(back) => prop_assert!(same(&from_amqp_value(&back), &h)),
            Err(_) => prop_assert!(!value_fits(&h), "{:?} refused", h),
        }
    }

    /// What helixmq encodes comes back unchanged, through lapin's wire format
    /// too; names over 255 bytes are refused with an error, never a panic.
    #[test]
    fn helixmq_headers_round_trip_or_are_refused(h in headers()) {
        match to_field_table(&h) {
            Ok(t) => {
                prop_assert!(names_fit(&h));
                prop_assert!(same_table(&from_field_table(&t), &h));
                let bytes = wire(&t);
                let (rest, parsed) = parse_field_table(&bytes[..])
                    .map_err(|e| TestCaseError::fail(format!("lapin cannot parse its own table: {e:?}")))?;
                prop_assert!(rest.is_empty());
                prop_assert!(same_table(&from_field_table(&parsed), &h));
            }
            Err(Error::InvalidMessage(text)) => {
                prop_assert!(!names_fit(&h), "refused although everything fits: {}", text);
                prop_assert!(names_a_limit(&text), "{}", text);
            }
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
        }
    }

    /// Arbitrary bytes where a header table is expected: the parser may refuse
    /// them, and whatever it accepts decodes without panicking.
    #[test]
    fn arbitrary_wire_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        if let Ok((_, t)) = parse_field_table(&bytes[..]) {
            let h = from_field_table(&t);
            let _ = to_field_table(&h);
        }
    }

    /// Well-formed tables with corrupted bytes: still never a panic.
    #[test]
    fn corrupted_wire_tables_never_panic(
        t in amqp_table(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = wire(&t);
        if !bytes.is_empty() {
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
        }
        if let Ok((_, t)) = parse_field_table(&bytes[..]) {
            let _ = from_field_table(&t);
        }
    }

    /// Properties of any shape another client might send decode without
    /// panicking, into a valid message (priority 0-10, attempt ≥ 1).
    #[test]
    fn any_properties_decode_into_a_valid_message(
        t in proptest::option::of(amqp_table()),
        attempt in proptest::option::of(amqp_value()),
        priority in proptest::option::of(any::<u8>()),
        expiration in proptest::option::of("\\PC{0,12}"),
        delivery_mode in proptest::option::of(any::<u8>()),
        id in proptest::option::of("\\PC{0,40}"),
        body in vec(any::<u8>(), 0..64),
    ) {
        let mut p = BasicProperties::default();
        let mut table = t.unwrap_or_default();
        if let Some(a) = attempt {
            table.insert(ShortString::from("x-helixmq-attempt"), a);
        }
        p = p.with_headers(table);
        if let Some(v) = priority { p = p.with_priority(v); }
        if let Some(e) = expiration { p = p.with_expiration(ShortString::from(e.as_str())); }
        if let Some(d) = delivery_mode { p = p.with_delivery_mode(d); }
        if let Some(i) = &id { p = p.with_message_id(ShortString::from(i.as_str())); }
        let m = from_properties(&p, body.clone());
        prop_assert!(m.attempt >= 1);
        prop_assert!(m.priority.map(|p| p.value() <= 10).unwrap_or(true));
        prop_assert!(!m.headers.contains_key("x-helixmq-attempt"));
        prop_assert_eq!(&m.payload[..], &body[..]);
        match id {
            Some(i) => prop_assert_eq!(m.id, i),
            None => prop_assert!(!m.id.is_empty()),
        }
    }

    /// A whole message through the AMQP properties: back equal, or refused
    /// clearly when a name or text field exceeds 255 bytes.
    #[test]
    fn messages_round_trip_through_properties(
        h in headers(),
        kind in proptest::option::of("\\PC{0,20}"),
        correlation in proptest::option::of(prop_oneof!["\\PC{0,20}", "c{250,260}"]),
        priority in proptest::option::of(0u8..=10),
        attempt in 1u32..1000,
        ttl in proptest::option::of(0u64..10_000_000),
        transient in any::<bool>(),
        body in vec(any::<u8>(), 0..64),
    ) {
        let mut m = Message::new(body);
        m.headers = h.into_iter().filter(|(k, _)| k != "x-helixmq-attempt").collect();
        m.kind = kind;
        m.correlation_id = correlation;
        m.priority = priority.map(|p| Priority::new(p).unwrap());
        m.attempt = attempt;
        m.expiration = ttl.map(Duration::from_millis);
        m.delivery_mode = if transient { DeliveryMode::Transient } else { DeliveryMode::Persistent };
        let fits = names_fit(&m.headers)
            && m.correlation_id.as_ref().map(|c| c.len() <= 255).unwrap_or(true);
        match to_properties(&m) {
            Ok(p) => {
                prop_assert!(fits);
                let back = from_properties(&p, m.payload.clone());
                prop_assert!(same_table(&back.headers, &m.headers));
                // Headers compared above (NaN-aware); the rest with ==.
                let (mut back, mut m) = (back, m);
                back.headers.clear();
                m.headers.clear();
                prop_assert_eq!(back, m);
            }
            Err(Error::InvalidMessage(text)) => {
                prop_assert!(!fits, "refused although everything fits: {}", text);
                prop_assert!(names_a_limit(&text), "{}", text);
            }
            Err(other) => prop_assert!(false, "unexpected error {:?}", other),
        }
    }
}
