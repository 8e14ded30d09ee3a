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

/// Position of the primary id in [`create_columns`], found once: the content
/// digest leaves it out of every event.
fn primary_id_position() -> usize {
    use std::sync::LazyLock;
    static POSITION: LazyLock<usize> = LazyLock::new(|| {
        let t = table();
        create_columns().iter().position(|&i| t.columns[i].logical_name == t.primary_id_attribute).unwrap_or(usize::MAX)
    });
    *POSITION
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
    let mut out = String::with_capacity(24);
    write_datetime(&mut out, d);
    out
}

/// Appends the stored text form of a datetime (`YYYY-MM-DDTHH:MM:SS.mmmZ`).
/// Written digit by digit: the SQLite writer formats several per row.
pub fn write_datetime(out: &mut String, d: &DateTime<Utc>) {
    use chrono::{Datelike, Timelike};
    let year = d.year();
    if !(0..=9999).contains(&year) {
        // Outside the table's range; never stored, but still printed correctly.
        out.push_str(&d.to_rfc3339_opts(SecondsFormat::Millis, true));
        return;
    }
    let digits = |out: &mut String, value: u32, width: u32| {
        for place in (0..width).rev() {
            out.push(char::from(b'0' + (value / 10u32.pow(place) % 10) as u8));
        }
    };
    digits(out, year as u32, 4);
    out.push('-');
    digits(out, d.month(), 2);
    out.push('-');
    digits(out, d.day(), 2);
    out.push('T');
    digits(out, d.hour(), 2);
    out.push(':');
    digits(out, d.minute(), 2);
    out.push(':');
    // A leap second is kept in the nanoseconds (chrono prints it as :60).
    let leap = d.nanosecond() >= 1_000_000_000;
    digits(out, d.second() + u32::from(leap), 2);
    out.push('.');
    digits(out, d.nanosecond() % 1_000_000_000 / 1_000_000, 3);
    out.push('Z');
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
    let id_position = primary_id_position();
    for (pos, &index) in create_columns().iter().enumerate() {
        let value = &values[pos];
        if pos == id_position || matches!(value, Value::Null) {
            continue;
        }
        let column = &t.columns[index];
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

/// The content digest of record values: UUIDv5 of [`canonical_content`].
pub(crate) fn content_hash(values: &[Value]) -> Uuid {
    thread_local! {
        // Reused per thread: the canonical bytes only live for the digest.
        static CANONICAL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    CANONICAL.with_borrow_mut(|canonical| {
        canonical.clear();
        canonical_content(values, canonical);
        let hash = uuid_v5(&CONTENT_NAMESPACE, canonical);
        if canonical.capacity() > 64 * 1024 {
            // Do not keep one huge event's buffer for the life of the thread.
            *canonical = Vec::new();
        }
        hash
    })
}

/// RFC 9562 UUIDv5 (SHA-1 of namespace and name), identical to
/// `Uuid::new_v5`, computed with OpenSSL: it uses the CPU's SHA extensions
/// where present, several times faster than the portable SHA-1 `uuid` uses,
/// and the content digest is the largest per-event cost of normalization.
pub fn uuid_v5(namespace: &Uuid, name: &[u8]) -> Uuid {
    let mut hasher = v5_hasher(namespace);
    hasher.update(name);
    v5_finish(hasher)
}

/// A UUIDv5 computation whose name is fed in parts.
fn v5_hasher(namespace: &Uuid) -> openssl::sha::Sha1 {
    let mut hasher = openssl::sha::Sha1::new();
    hasher.update(namespace.as_bytes());
    hasher
}

fn v5_finish(hasher: openssl::sha::Sha1) -> Uuid {
    let digest = hasher.finish();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// The id of an event that carries none, derived from its content digest.
/// With a client timestamp the content alone identifies the interaction, so a
/// client's resend maps to the same id. Without one, two identical events may
/// be two real interactions, so the Kafka coordinates are mixed in: the same
/// message still always yields the same id. The name is
/// `content digest [NUL "kafka" NUL topic NUL partition offset]`.
pub(crate) fn derived_id(content_hash: &Uuid, has_client_timestamp: bool, origin: Option<&Origin<'_>>) -> Uuid {
    let mut hasher = v5_hasher(&ID_NAMESPACE);
    hasher.update(content_hash.as_bytes());
    if !has_client_timestamp && let Some(o) = origin {
        hasher.update(b"\0kafka\0");
        hasher.update(o.topic.as_bytes());
        hasher.update(&[0]);
        hasher.update(&o.partition.to_be_bytes());
        hasher.update(&o.offset.to_be_bytes());
    }
    v5_finish(hasher)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_print_as_chrono_prints_them() {
        use chrono::TimeZone;
        let mut millis: i64 = -62_135_596_800_000; // 0001-01-01
        while millis < 253_402_300_799_999 {
            let d = Utc.timestamp_millis_opt(millis).unwrap();
            assert_eq!(format_datetime(&d), d.to_rfc3339_opts(SecondsFormat::Millis, true));
            millis += 9_876_543_217; // ~114 days: irregular steps through every field
        }
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31).unwrap().and_hms_milli_opt(23, 59, 59, 1_500).unwrap();
        let leap = Utc.from_utc_datetime(&leap);
        assert_eq!(format_datetime(&leap), leap.to_rfc3339_opts(SecondsFormat::Millis, true));
    }

    #[test]
    fn the_record_layout_fits_the_normalizers_field_bitmask() {
        assert!(create_columns().len() < 64, "normalize tracks seen fields in a u64");
    }

    #[test]
    fn uuid_v5_matches_the_reference_implementation() {
        let mut name = Vec::new();
        for len in [0usize, 1, 55, 56, 63, 64, 65, 500, 4096] {
            name.clear();
            name.extend((0..len).map(|i| (i * 31 + len) as u8));
            for namespace in [ID_NAMESPACE, CONTENT_NAMESPACE, Uuid::NAMESPACE_DNS] {
                assert_eq!(uuid_v5(&namespace, &name), Uuid::new_v5(&namespace, &name), "length {len}");
            }
        }
        // The derived id fed in parts is the UUIDv5 of the whole name.
        let hash = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        let origin = Origin { topic: "copilot.interactions", partition: 7, offset: 1 << 40 };
        let mut whole = hash.as_bytes().to_vec();
        assert_eq!(derived_id(&hash, true, Some(&origin)), Uuid::new_v5(&ID_NAMESPACE, &whole));
        whole.extend_from_slice(b"\0kafka\0copilot.interactions\0");
        whole.extend_from_slice(&7i32.to_be_bytes());
        whole.extend_from_slice(&(1i64 << 40).to_be_bytes());
        assert_eq!(derived_id(&hash, false, Some(&origin)), Uuid::new_v5(&ID_NAMESPACE, &whole));
    }
}
