//! Event fields → validated [`Record`]: validation against the table
//! definition and normalization (SPEC §5); the fields come from
//! [`crate::decode`] (JSON or Avro). Every limit comes from
//! [`crate::table`]; every failure is a [`Rejection`] with a stable reason.

use std::borrow::Cow;

use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use uuid::Uuid;

use crate::decode::json::{CompactError, MAX_JSON_DEPTH, compact_json};
use crate::reason::{Reason, Rejection};
use crate::record::{self, Origin, Record, Value, create_columns};
use crate::table::{Column, ColumnType, table};

/// Largest accepted message value. The memo column alone may hold 1,048,576
/// UTF-16 code units (up to ~3 MiB of UTF-8); anything above this bound cannot
/// be a valid event and is refused before parsing.
pub const MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;

/// What to do with fields that are not columns of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFields {
    #[default]
    Reject,
    Ignore,
}

#[derive(Debug, Clone)]
pub struct Normalizer {
    pub unknown_fields: UnknownFields,
    pub max_payload_bytes: usize,
}

impl Default for Normalizer {
    fn default() -> Self {
        Normalizer { unknown_fields: UnknownFields::Reject, max_payload_bytes: MAX_PAYLOAD_BYTES }
    }
}

/// One field value of an event (from JSON or Avro), borrowing strings from
/// the payload where possible.
#[derive(Debug)]
pub enum FieldValue<'a> {
    Null,
    Bool,
    Int(i64),
    UInt(u64),
    Float(f64),
    /// A string. Borrowed text is always a JSON string as written in the
    /// payload, without escapes: JSON forbids raw control characters there,
    /// so it holds no NUL; only owned text (unescaped, or from Avro) may.
    Str(Cow<'a, str>),
    Object(serde_json::Value),
    /// A JSON object for a memo column, as its text in the payload
    /// (validated JSON, not yet compacted).
    RawObject(&'a str),
    /// A JSON object for a memo column whose text in the payload is already
    /// what [`compact_json`] would make of it: valid, without whitespace
    /// between tokens, no key twice. It is stored as sent.
    CompactObject(&'a str),
    Array,
    /// A value of a type no column can hold (Avro bytes, fixed, …).
    Unsupported(&'static str),
}

impl FieldValue<'_> {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            FieldValue::Null => "null",
            FieldValue::Bool => "a boolean",
            FieldValue::Int(_) | FieldValue::UInt(_) | FieldValue::Float(_) => "a number",
            FieldValue::Str(_) => "a string",
            FieldValue::Object(_) | FieldValue::RawObject(_) | FieldValue::CompactObject(_) => "an object",
            FieldValue::Array => "an array",
            FieldValue::Unsupported(kind) => kind,
        }
    }
}

impl Normalizer {
    /// Decodes, validates and normalizes one JSON event.
    ///
    /// `origin` is the Kafka position (used only to derive the id of an event
    /// that has neither an id nor a client timestamp); `now` is the ingestion time.
    pub fn normalize_json(
        &self,
        payload: &[u8],
        origin: Option<&Origin>,
        now: DateTime<Utc>,
    ) -> Result<Record, Rejection> {
        let fields = crate::decode::json::event_fields(payload, self.max_payload_bytes)?;
        self.normalize_fields(fields, origin, now)
    }

    /// Validates and normalizes decoded fields (shared by JSON and Avro).
    pub fn normalize_fields(
        &self,
        fields: Vec<(Cow<'_, str>, FieldValue<'_>)>,
        origin: Option<&Origin>,
        now: DateTime<Utc>,
    ) -> Result<Record, Rejection> {
        self.normalize_in_state(fields, origin, now, false)
    }

    /// Validates and normalizes a stored record with changes applied (Update,
    /// SetState): as an event, except that the record's state follows its
    /// status instead of being the state of a new record.
    pub fn normalize_changed_json(&self, payload: &[u8], now: DateTime<Utc>) -> Result<Record, Rejection> {
        let fields = crate::decode::json::event_fields(payload, self.max_payload_bytes)?;
        self.normalize_in_state(fields, None, now, true)
    }

    fn normalize_in_state(
        &self,
        fields: Vec<(Cow<'_, str>, FieldValue<'_>)>,
        origin: Option<&Origin>,
        now: DateTime<Utc>,
        state_follows_status: bool,
    ) -> Result<Record, Rejection> {
        let t = table();
        let layout = create_columns();
        let mut values = vec![Value::Null; layout.len()];
        // One bit per layout position (the layout has fewer than 64 columns,
        // checked by a test).
        let mut seen = 0u64;
        for (key, raw) in fields {
            let Some(index) = lookup_column(&key) else {
                match self.unknown_fields {
                    UnknownFields::Reject => {
                        return Err(Rejection::new(
                            Reason::UnknownField,
                            Some(&key),
                            format!("'{}' is not a column of {}", truncate(&key, 100), t.logical_name),
                        ));
                    }
                    UnknownFields::Ignore => continue,
                }
            };
            let column = &t.columns[index];
            let Some(pos) = layout_position(index) else {
                return Err(Rejection::new(
                    Reason::ReadOnlyField,
                    Some(&column.logical_name),
                    format!("'{}' is not valid for create", column.logical_name),
                ));
            };
            if seen & (1 << pos) != 0 {
                return Err(Rejection::new(
                    Reason::MalformedJson,
                    Some(&column.logical_name),
                    format!("'{}' appears more than once", column.logical_name),
                ));
            }
            seen |= 1 << pos;
            values[pos] = parse_value(column, raw, now)?;
        }

        let plan = create_plan();
        for &pos in &plan.required {
            if matches!(values[pos], Value::Null) {
                let column = &t.columns[layout[pos]];
                return Err(Rejection::new(
                    Reason::MissingRequiredField,
                    Some(&column.logical_name),
                    format!("'{}' is required", column.logical_name),
                ));
            }
        }
        for &(pos, default) in &plan.defaults {
            if matches!(values[pos], Value::Null) {
                values[pos] = Value::Int(default);
            }
        }

        // Records are created active: the state is the schema default, and a
        // status given by the event must belong to that state.
        let mut state_code = plan.default_state;
        if state_follows_status {
            let status_state = plan.statuses.iter().find_map(|&pos| match values[pos] {
                Value::Int(v) => t.columns[layout[pos]].option(v).and_then(|o| o.state),
                _ => None,
            });
            state_code = status_state.unwrap_or(state_code);
        }
        for &pos in &plan.statuses {
            if let Value::Int(v) = values[pos] {
                let column = &t.columns[layout[pos]];
                let state = column.option(v).and_then(|o| o.state);
                if state != Some(state_code) {
                    return Err(Rejection::new(
                        Reason::InvalidOption,
                        Some(&column.logical_name),
                        format!("status {v} is not valid for a new record (state {state_code})"),
                    ));
                }
            }
        }

        let content_hash = record::content_hash(&values);

        let positions = special_positions();
        let id = match values[positions.id] {
            Value::Guid(g) => g,
            _ => {
                let has_client_timestamp = matches!(values[positions.client_timestamp], Value::DateTime(_));
                let id = record::derived_id(&content_hash, has_client_timestamp, origin);
                values[positions.id] = Value::Guid(id);
                id
            }
        };
        let created_on = match values[positions.overridden_created_on] {
            Value::DateTime(d) => d,
            _ => truncate_to_millis(now),
        };
        Ok(Record { values, id, content_hash, created_on, state_code })
    }
}

/// What the create rules need of each layout position, worked out once from
/// the table: per event they are then a few index reads instead of a scan of
/// every column's definition (string compares included).
struct CreatePlan {
    /// Positions of the required columns, in layout order (the first missing
    /// one is reported).
    required: Vec<usize>,
    /// Positions of option columns with a schema default, and the default.
    defaults: Vec<(usize, i32)>,
    /// Positions of status columns.
    statuses: Vec<usize>,
    /// The state of a new record: the state column's default.
    default_state: i32,
}

fn create_plan() -> &'static CreatePlan {
    static PLAN: std::sync::LazyLock<CreatePlan> = std::sync::LazyLock::new(|| {
        let t = table();
        let columns = || create_columns().iter().enumerate().map(|(pos, &index)| (pos, &t.columns[index]));
        CreatePlan {
            required: columns().filter(|(_, c)| c.is_required()).map(|(pos, _)| pos).collect(),
            defaults: columns().filter_map(|(pos, c)| c.default_value.map(|d| (pos, d))).collect(),
            statuses: columns().filter(|(_, c)| c.column_type == ColumnType::Status).map(|(pos, _)| pos).collect(),
            default_state: t
                .columns
                .iter()
                .find(|c| c.column_type == ColumnType::State)
                .and_then(|c| c.default_value)
                .unwrap_or(0),
        }
    });
    &PLAN
}

/// Positions in the record layout of the columns the identity and creation
/// rules name.
struct SpecialPositions {
    id: usize,
    client_timestamp: usize,
    overridden_created_on: usize,
}

fn special_positions() -> &'static SpecialPositions {
    static POSITIONS: std::sync::LazyLock<SpecialPositions> = std::sync::LazyLock::new(|| {
        let position_of = |logical_name: &str| {
            table()
                .index_of(logical_name)
                .and_then(|index| create_columns().iter().position(|&i| i == index))
                .unwrap_or_else(|| panic!("schemas/: {logical_name} must be a create column"))
        };
        SpecialPositions {
            id: position_of(&table().primary_id_attribute),
            client_timestamp: position_of("msdyn_clienttimestamp"),
            overridden_created_on: position_of("overriddencreatedon"),
        }
    });
    &POSITIONS
}

/// Position in the record layout of each table column (None: not settable on create).
fn layout_position(index: usize) -> Option<usize> {
    static POSITIONS: std::sync::LazyLock<Vec<Option<usize>>> = std::sync::LazyLock::new(|| {
        (0..table().columns.len()).map(|i| create_columns().iter().position(|&c| c == i)).collect()
    });
    POSITIONS.get(index).copied().flatten()
}

/// Column lookup by logical name, exactly: the Dataverse Web API is
/// case-sensitive, so `MSDYN_NAME` is an unknown field, not `msdyn_name`.
fn lookup_column(key: &str) -> Option<usize> {
    table().index_of(key)
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

fn invalid_type(column: &Column, expected: &str, raw: &FieldValue) -> Rejection {
    Rejection::new(
        Reason::InvalidType,
        Some(&column.logical_name),
        format!("'{}' must be {expected}, got {}", column.logical_name, raw.kind()),
    )
}

/// Length in UTF-16 code units, as the table counts it. UTF-8 never has fewer
/// bytes than UTF-16 has units, so short strings skip the count.
pub fn utf16_len(s: &str) -> usize {
    s.encode_utf16().count()
}

fn check_length(column: &Column, s: &str) -> Result<(), Rejection> {
    let Some(max) = column.max_length else { return Ok(()) };
    if s.len() <= max {
        return Ok(());
    }
    let units = utf16_len(s);
    if units > max {
        return Err(Rejection::new(
            Reason::ValueTooLong,
            Some(&column.logical_name),
            format!("'{}' is {units} UTF-16 code units long; the limit is {max}", column.logical_name),
        ));
    }
    Ok(())
}

fn parse_value(column: &Column, raw: FieldValue<'_>, now: DateTime<Utc>) -> Result<Value, Rejection> {
    // Dataverse stores an empty string as null: for every column type it is
    // an absent value (a required column left "" is then missing).
    if matches!(&raw, FieldValue::Null) || matches!(&raw, FieldValue::Str(s) if s.is_empty()) {
        return Ok(Value::Null);
    }
    // Borrowed text cannot hold a NUL (see `FieldValue::Str`), which spares
    // the scan for the usual event's strings.
    debug_assert!(!matches!(&raw, FieldValue::Str(Cow::Borrowed(s)) if s.contains('\0')));
    if let FieldValue::Str(Cow::Owned(s)) = &raw
        && s.contains('\0')
    {
        return Err(Rejection::new(
            Reason::InvalidType,
            Some(&column.logical_name),
            format!("'{}' contains a NUL character (U+0000), which the table cannot store", column.logical_name),
        ));
    }
    match column.column_type {
        ColumnType::String => match raw {
            FieldValue::Str(s) => {
                check_length(column, &s)?;
                if s.is_empty() {
                    // Dataverse stores an empty string as null.
                    return Ok(Value::Null);
                }
                Ok(Value::Text(s.into_owned()))
            }
            other => Err(invalid_type(column, "a string", &other)),
        },
        ColumnType::Memo => {
            let text = match raw {
                FieldValue::Str(s) => s.into_owned(),
                FieldValue::Object(v) => v.to_string(),
                FieldValue::CompactObject(text) => text.to_owned(),
                FieldValue::RawObject(raw) => compact_json(raw).map_err(|e| {
                    let problem = match e {
                        CompactError::TooDeep => format!("is nested deeper than {MAX_JSON_DEPTH} levels"),
                        CompactError::DuplicateKey(key) => format!("repeats the key \"{}\"", truncate(&key, 64)),
                    };
                    Rejection::new(
                        Reason::MalformedJson,
                        Some(&column.logical_name),
                        format!("'{}' {problem}", column.logical_name),
                    )
                })?,
                other => return Err(invalid_type(column, "a string or a JSON object", &other)),
            };
            check_length(column, &text)?;
            if text.is_empty() {
                return Ok(Value::Null);
            }
            Ok(Value::Text(text))
        }
        ColumnType::Uniqueidentifier | ColumnType::Lookup => match raw {
            FieldValue::Str(s) => parse_guid(&s).map(Value::Guid).ok_or_else(|| {
                Rejection::new(
                    Reason::InvalidGuid,
                    Some(&column.logical_name),
                    format!("'{}' is not a GUID", column.logical_name),
                )
            }),
            other => Err(invalid_type(column, "a GUID string", &other)),
        },
        ColumnType::Picklist | ColumnType::State | ColumnType::Status => {
            let value = match &raw {
                FieldValue::Int(i) => Some(*i),
                FieldValue::Str(s) => {
                    let trimmed = s.trim();
                    match trimmed.parse::<i64>() {
                        Ok(i) => Some(i),
                        Err(_) => match column.option_by_label(trimmed) {
                            Some(v) => return Ok(Value::Int(v)),
                            None => None,
                        },
                    }
                }
                FieldValue::UInt(_) => None,
                FieldValue::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => Some(*f as i64),
                other => return Err(invalid_type(column, "an option label or value", other)),
            };
            match value.and_then(|v| i32::try_from(v).ok()).filter(|v| column.option(*v).is_some()) {
                Some(v) => Ok(Value::Int(v)),
                None => Err(Rejection::new(
                    Reason::InvalidOption,
                    Some(&column.logical_name),
                    format!("{} is not an option of '{}'", describe(&raw), column.logical_name),
                )),
            }
        }
        ColumnType::Integer | ColumnType::Bigint => {
            let value: Option<i128> = match &raw {
                FieldValue::Int(i) => Some(i128::from(*i)),
                FieldValue::UInt(u) => Some(i128::from(*u)),
                FieldValue::Str(s) => match s.trim().parse::<i128>() {
                    Ok(i) => Some(i),
                    Err(_) => return Err(invalid_type(column, "an integer", &raw)),
                },
                FieldValue::Float(f) if f.fract() == 0.0 && f.is_finite() => {
                    // An integral number written with an exponent or too large for i64.
                    if f.abs() < 1e30 { Some(*f as i128) } else { None }
                }
                other => return Err(invalid_type(column, "an integer", other)),
            };
            let min = i128::from(column.min_value.unwrap_or(i64::from(i32::MIN)));
            let max = i128::from(column.max_value.unwrap_or(i64::from(i32::MAX)));
            match value.filter(|v| (min..=max).contains(v)).and_then(|v| i32::try_from(v).ok()) {
                Some(v) => Ok(Value::Int(v)),
                None => Err(Rejection::new(
                    Reason::OutOfRange,
                    Some(&column.logical_name),
                    format!("{} is outside [{min}, {max}] for '{}'", describe(&raw), column.logical_name),
                )),
            }
        }
        ColumnType::Datetime => {
            let parsed = match &raw {
                FieldValue::Int(ms) => Utc.timestamp_millis_opt(*ms).single(),
                FieldValue::Str(s) => parse_datetime(s),
                FieldValue::UInt(_) => None,
                FieldValue::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => {
                    Utc.timestamp_millis_opt(*f as i64).single()
                }
                FieldValue::Float(_) => None,
                other => return Err(invalid_type(column, "an RFC 3339 string or epoch milliseconds", other)),
            };
            let Some(d) = parsed.map(truncate_to_millis) else {
                return Err(Rejection::new(
                    Reason::InvalidDatetime,
                    Some(&column.logical_name),
                    format!("{} is not a datetime (RFC 3339 or epoch milliseconds)", describe(&raw)),
                ));
            };
            let t = table();
            if d < t.min_datetime || d > t.max_datetime {
                return Err(Rejection::new(
                    Reason::InvalidDatetime,
                    Some(&column.logical_name),
                    format!(
                        "'{}' must lie between {} and {}",
                        column.logical_name,
                        t.min_datetime.date_naive(),
                        t.max_datetime.date_naive()
                    ),
                ));
            }
            if column.not_in_future && d > now {
                return Err(Rejection::new(
                    Reason::InvalidDatetime,
                    Some(&column.logical_name),
                    format!("'{}' lies in the future", column.logical_name),
                ));
            }
            Ok(Value::DateTime(d))
        }
    }
}

fn describe(raw: &FieldValue) -> String {
    match raw {
        FieldValue::Str(s) => format!("'{}'", truncate(s, 64)),
        FieldValue::Int(i) => i.to_string(),
        FieldValue::UInt(u) => u.to_string(),
        FieldValue::Float(f) => f.to_string(),
        other => other.kind().to_owned(),
    }
}

/// GUIDs in any case, with or without braces or hyphens; the nil GUID is not an id.
pub fn parse_guid(s: &str) -> Option<Uuid> {
    let s = s.trim();
    if s.len() > 45 {
        return None;
    }
    Uuid::try_parse(s).ok().filter(|u| !u.is_nil())
}

/// RFC 3339 with or without an offset (none = UTC), a space instead of `T`,
/// a bare date (midnight UTC), or epoch milliseconds as digits.
pub fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if s.len() > 64 {
        return None;
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(s) {
        return Some(d.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M"] {
        if let Ok(n) = NaiveDateTime::parse_from_str(s, format) {
            return Some(n.and_utc());
        }
    }
    if let Ok(d) = DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%:z") {
        return Some(d.with_timezone(&Utc));
    }
    if let Ok(date) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return date.and_hms_opt(0, 0, 0).map(|n| n.and_utc());
    }
    if !s.is_empty()
        && s.len() <= 16
        && s.bytes().all(|b| b.is_ascii_digit() || b == b'-')
        && let Ok(ms) = s.parse::<i64>()
    {
        return Utc.timestamp_millis_opt(ms).single();
    }
    None
}

fn truncate_to_millis(d: DateTime<Utc>) -> DateTime<Utc> {
    let nanos = d.nanosecond();
    // Dropping the sub-millisecond digits in place avoids rebuilding the
    // date from a timestamp; a leap second (nanoseconds past 10⁹) still takes
    // the timestamp round, which carries it into the next second.
    if nanos < 1_000_000_000
        && let Some(truncated) = d.with_nanosecond(nanos - nanos % 1_000_000)
    {
        return truncated;
    }
    Utc.timestamp_millis_opt(d.timestamp_millis()).single().unwrap_or(d)
}

#[cfg(test)]
mod tests;
