//! The validated, normalized `msdyn_copilotinteraction` record. It can only be
//! built by [`crate::normalize`], so a sink never receives unvalidated data.

use chrono::{DateTime, SecondsFormat, Utc};
use uuid::Uuid;

use crate::table::table;

/// One column value, already in the stored form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Text(String),
    /// Integers and option-set values.
    Int(i32),
    Guid(Uuid),
    DateTime(DateTime<Utc>),
}

impl Value {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// Where a record came from in Kafka (borrowed: built for every message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
}

/// A validated record. Values are indexed like [`create_columns`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub(crate) values: Vec<Value>,
    pub(crate) id: Uuid,
    pub(crate) content_hash: Uuid,
    pub(crate) created_on: DateTime<Utc>,
    pub(crate) state_code: i32,
}

/// Indices (into the table's columns) of the columns an event may set, which
/// is also the layout of [`Record`] values.
pub fn create_columns() -> &'static [usize] {
    use std::sync::LazyLock;
    static COLUMNS: LazyLock<Vec<usize>> = LazyLock::new(|| {
        let t = table();
        t.columns.iter().enumerate().filter(|(_, c)| c.valid_for_create && c.stored).map(|(i, _)| i).collect()
    });
    &COLUMNS
}

impl Record {
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// A digest of the event content (every value but the id and the ingestion
    /// time); two records with the same id and hash are the same interaction.
    pub fn content_hash(&self) -> Uuid {
        self.content_hash
    }

    pub fn created_on(&self) -> DateTime<Utc> {
        self.created_on
    }

    pub fn state_code(&self) -> i32 {
        self.state_code
    }

    /// Values in the order of [`create_columns`].
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    /// The value of a column by logical name (`None` if the event cannot set it).
    pub fn get(&self, logical_name: &str) -> Option<&Value> {
        let index = table().index_of(logical_name)?;
        let pos = create_columns().iter().position(|&i| i == index)?;
        self.values.get(pos)
    }

    /// Approximate in-memory size, for batch byte limits.
    pub fn approx_bytes(&self) -> usize {
        let text: usize = self.values.iter().map(|v| if let Value::Text(s) = v { s.len() } else { 0 }).sum();
        text + self.values.len() * std::mem::size_of::<Value>() + 64
    }

    /// The record as a JSON object keyed by logical names (for `validate` and logs).
    pub fn to_json(&self) -> serde_json::Value {
        let t = table();
        let mut map = serde_json::Map::new();
        for (pos, &index) in create_columns().iter().enumerate() {
            let column = &t.columns[index];
            let value = match &self.values[pos] {
                Value::Null => serde_json::Value::Null,
                Value::Text(s) => serde_json::Value::String(s.clone()),
                Value::Int(i) => serde_json::Value::from(*i),
                Value::Guid(g) => serde_json::Value::String(g.hyphenated().to_string()),
                Value::DateTime(d) => serde_json::Value::String(format_datetime(d)),
            };
            map.insert(column.logical_name.clone(), value);
        }
        map.insert("statecode".into(), self.state_code.into());
        map.insert("createdon".into(), format_datetime(&self.created_on).into());
        serde_json::Value::Object(map)
    }
}

/// The stored text form of a datetime: RFC 3339, UTC, millisecond precision.
pub fn format_datetime(d: &DateTime<Utc>) -> String {
    d.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Namespaces of the UUIDv5 digests. Fixed forever: changing either changes
/// every derived id and would turn replays into new rows.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f0b_4c1e_2a57_4d0e_9b1c_0c0b_71c5_7a01);
const CONTENT_NAMESPACE: Uuid = Uuid::from_u128(0x6f0b_4c1e_2a57_4d0e_9b1c_0c0b_71c5_7a02);

/// Canonical bytes of the content: every non-null value except the primary
/// id, as `logical_name NUL tag value RS`, in table order. Null values are left
/// out so that a column added later does not change older events' identity.
pub(crate) fn canonical_content(values: &[Value], out: &mut Vec<u8>) {
    let t = table();
    for (pos, &index) in create_columns().iter().enumerate() {
        let column = &t.columns[index];
        if column.logical_name == t.primary_id_attribute {
            continue;
        }
        let value = &values[pos];
        if matches!(value, Value::Null) {
            continue;
        }
        out.extend_from_slice(column.logical_name.as_bytes());
        out.push(0);
        match value {
            Value::Null => {}
            Value::Text(s) => {
                out.push(b's');
                out.extend_from_slice(&(s.len() as u64).to_be_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Value::Int(i) => {
                out.push(b'i');
                out.extend_from_slice(&i.to_be_bytes());
            }
            Value::Guid(g) => {
                out.push(b'g');
                out.extend_from_slice(g.as_bytes());
            }
            Value::DateTime(d) => {
                out.push(b'd');
                out.extend_from_slice(&d.timestamp_millis().to_be_bytes());
            }
        }
        out.push(0x1e);
    }
}

pub(crate) fn content_hash(canonical: &[u8]) -> Uuid {
    Uuid::new_v5(&CONTENT_NAMESPACE, canonical)
}

/// The id of an event that carries none, derived from its content digest.
/// With a client timestamp the content alone identifies the interaction, so a
/// client's resend maps to the same id. Without one, two identical events may
/// be two real interactions, so the Kafka coordinates are mixed in: the same
/// message still always yields the same id.
pub(crate) fn derived_id(content_hash: &Uuid, has_client_timestamp: bool, origin: Option<&Origin<'_>>) -> Uuid {
    let mut name = Vec::with_capacity(64);
    name.extend_from_slice(content_hash.as_bytes());
    if !has_client_timestamp && let Some(o) = origin {
        name.extend_from_slice(b"\0kafka\0");
        name.extend_from_slice(o.topic.as_bytes());
        name.push(0);
        name.extend_from_slice(&o.partition.to_be_bytes());
        name.extend_from_slice(&o.offset.to_be_bytes());
    }
    Uuid::new_v5(&ID_NAMESPACE, &name)
}
