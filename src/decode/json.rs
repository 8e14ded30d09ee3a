//! JSON events: the bytes of one message → its fields in document order,
//! borrowing strings from the payload. A direct reader ([`super::flat_json`])
//! takes the usual flat event; serde_json reads everything else and is its
//! reference. Objects stored as text (the memo column) are compacted here.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::decode::flat_json::string_end;
use crate::normalize::FieldValue;
use crate::reason::{Reason, Rejection};
use crate::table::{ColumnType, table};

/// The fields of one JSON event, after the checks every payload gets: size,
/// not empty, UTF-8, an object.
pub(crate) fn event_fields(
    payload: &[u8],
    max_payload_bytes: usize,
) -> Result<Vec<(Cow<'_, str>, FieldValue<'_>)>, Rejection> {
    if payload.len() > max_payload_bytes {
        return Err(Rejection::new(
            Reason::PayloadTooLarge,
            None,
            format!("message is {} bytes; the limit is {max_payload_bytes}", payload.len()),
        ));
    }
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Err(Rejection::new(Reason::MalformedJson, None, "empty message"));
    }
    // One validation of the whole payload is cheaper than serde_json's
    // per-string checks, which reading from a `str` skips.
    let text = match std::str::from_utf8(payload) {
        Ok(t) => t,
        Err(e) => {
            return Err(Rejection::new(
                Reason::MalformedJson,
                None,
                format!("not valid JSON: invalid UTF-8 at byte {}", e.valid_up_to()),
            ));
        }
    };
    if let Some(fields) = super::flat_json::read_flat_object(text, is_memo_column) {
        return Ok(fields);
    }
    match fields_with_serde(text) {
        Ok(TopLevel::Object(fields)) => Ok(fields),
        Ok(TopLevel::Other(kind)) => {
            Err(Rejection::new(Reason::NotAnObject, None, format!("the event is {kind}, not a JSON object")))
        }
        Err(e) => Err(Rejection::new(Reason::MalformedJson, None, format!("not valid JSON: {e}"))),
    }
}

impl<'de> de::Deserialize<'de> for FieldValue<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(FieldValue::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(FieldValue::Null)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(FieldValue::Bool)
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(FieldValue::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(match i64::try_from(v) {
                    Ok(i) => FieldValue::Int(i),
                    Err(_) => FieldValue::UInt(v),
                })
            }
            fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
                Ok(FieldValue::Float(v))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(FieldValue::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(FieldValue::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(FieldValue::Str(Cow::Owned(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let value = de::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FieldValue::Object(serde_json::Value::Object(value)))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(FieldValue::Array)
            }
        }
        d.deserialize_any(V)
    }
}

/// The top level of an event: an object as a list of fields in document
/// order, or a note of what else it was.
pub(crate) enum TopLevel<'a> {
    Object(Vec<(Cow<'a, str>, FieldValue<'a>)>),
    Other(&'static str),
}

impl<'de> de::Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(16);
                while let Some(FieldName(key)) = map.next_key::<FieldName<'de>>()? {
                    let value = if is_memo_column(&key) {
                        // Kept as text: building a map only to print it again
                        // was the largest cost of a typical event.
                        memo_value(map.next_value::<&'de serde_json::value::RawValue>()?.get())
                            .map_err(de::Error::custom)?
                    } else {
                        map.next_value::<FieldValue<'de>>()?
                    };
                    fields.push((key, value));
                }
                Ok(TopLevel::Object(fields))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(TopLevel::Other("an array"))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("null"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("a boolean"))
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("a number"))
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("a number"))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("a number"))
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(TopLevel::Other("a string"))
            }
        }
        d.deserialize_any(V)
    }
}

/// The reference reading of an event's JSON (every payload the flat reader
/// declines goes through it).
pub(crate) fn fields_with_serde(text: &str) -> Result<TopLevel<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let top = <TopLevel as de::Deserialize>::deserialize(&mut de)?;
    de.end()?;
    Ok(top)
}

/// A field name, borrowed from the payload unless it has escapes (serde's own
/// `Cow<str>` always copies).
struct FieldName<'a>(Cow<'a, str>);

impl<'de> de::Deserialize<'de> for FieldName<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = FieldName<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(FieldName(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(FieldName(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(FieldName(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Whether a field name (as [`lookup_column`] matches it) is a memo column.
pub(crate) fn is_memo_column(key: &str) -> bool {
    static MEMO_COLUMNS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
        table().columns.iter().filter(|c| c.column_type == ColumnType::Memo).map(|c| c.logical_name.as_str()).collect()
    });
    MEMO_COLUMNS.contains(&key)
}

/// A memo column's value from its JSON text: objects stay text, anything else
/// is decoded as usual.
fn memo_value(raw: &str) -> Result<FieldValue<'_>, serde_json::Error> {
    match raw.as_bytes().first() {
        Some(b'{') => Ok(FieldValue::RawObject(raw)),
        // Skipped without recursion (arrays are not accepted anyway).
        Some(b'[') => Ok(FieldValue::Array),
        _ => serde_json::from_str(raw),
    }
}

/// Deepest nesting accepted in a JSON object stored as text (serde_json's own
/// limit for parsed values).
pub(crate) const MAX_JSON_DEPTH: usize = 128;

/// Why an object stored as text was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CompactError {
    TooDeep,
    /// A key repeated inside one object (its text, as sent).
    DuplicateKey(String),
}

/// The compact form of valid JSON text: whitespace between tokens removed,
/// everything else (member order, numbers, escapes) exactly as sent. Refuses
/// nesting deeper than [`MAX_JSON_DEPTH`] and a key repeated inside one
/// object (compared as sent: `"a"` and `"\u0061"` count as different).
pub(crate) fn compact_json(raw: &str) -> Result<String, CompactError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let (mut start, mut i) = (0usize, 0usize);
    // Per open container: its keys so far when it is an object (`None`: an array).
    let mut open: Vec<Option<KeySet<'_>>> = Vec::new();
    let mut expect_key = false;
    // Copies runs between whitespace in one go; only structural bytes and
    // string boundaries are looked at one by one.
    while i < bytes.len() {
        match bytes[i] {
            b' ' | b'\t' | b'\n' | b'\r' => {
                out.push_str(&raw[start..i]);
                start = i + 1;
            }
            b'"' => {
                let opening = i;
                i += 1;
                // To the closing quote, a word at a time between escapes. The
                // text is valid JSON, so no control byte stops the scan; one
                // would only be stepped over.
                loop {
                    match bytes.get(i..).and_then(string_end) {
                        Some(n) => i += n,
                        None => {
                            i = bytes.len();
                            break;
                        }
                    }
                    match bytes[i] {
                        b'"' => break,
                        b'\\' => i += 2,
                        _ => i += 1,
                    }
                }
                if expect_key {
                    expect_key = false;
                    let key = raw.get(opening + 1..i.min(raw.len())).unwrap_or("");
                    if let Some(Some(keys)) = open.last_mut()
                        && !keys.insert(key)
                    {
                        return Err(CompactError::DuplicateKey(key.to_owned()));
                    }
                }
            }
            b'{' => {
                if open.len() >= MAX_JSON_DEPTH {
                    return Err(CompactError::TooDeep);
                }
                open.push(Some(KeySet::default()));
                expect_key = true;
            }
            b'[' => {
                if open.len() >= MAX_JSON_DEPTH {
                    return Err(CompactError::TooDeep);
                }
                open.push(None);
                expect_key = false;
            }
            b'}' | b']' => {
                open.pop();
                expect_key = false;
            }
            b',' => expect_key = matches!(open.last(), Some(Some(_))),
            b':' => expect_key = false,
            _ => {}
        }
        i += 1;
    }
    out.push_str(&raw[start..]);
    Ok(out)
}

/// The keys of one JSON object, to find a repeated one. Context objects have
/// a handful of keys, where comparing with each is several times cheaper than
/// hashing; past [`KeySet::LINEAR_KEYS`] a hash set keeps large objects linear.
#[derive(Default)]
struct KeySet<'a> {
    few: Vec<&'a str>,
    many: Option<std::collections::HashSet<&'a str>>,
}

impl<'a> KeySet<'a> {
    const LINEAR_KEYS: usize = 16;

    /// False if the key was there already.
    fn insert(&mut self, key: &'a str) -> bool {
        if let Some(many) = &mut self.many {
            return many.insert(key);
        }
        if self.few.contains(&key) {
            return false;
        }
        if self.few.len() < Self::LINEAR_KEYS {
            self.few.push(key);
        } else {
            let mut many: std::collections::HashSet<&str> = self.few.drain(..).collect();
            many.insert(key);
            self.many = Some(many);
        }
        true
    }
}
