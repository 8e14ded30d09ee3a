//! Avro events in the Confluent wire format: byte 0 = 0, a 4-byte big-endian
//! schema id, then the Avro binary datum. Writer schemas come from
//! `[avro.schemas]` files, from a Confluent-compatible Schema Registry
//! (`GET /schemas/ids/{id}`, fetched once per id), or — when neither is
//! configured — the schemas bundled from `schemas/` (ids 1 and 2).
//!
//! Each schema is prepared for decoding once per id (names resolved, reader
//! built) and reused; the datum is decoded with its writer schema and its
//! fields are handed to the same validation and normalization as JSON, by
//! name, so older schema versions (fewer fields) need no resolution step.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Read;
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value as AvroValue;

use crate::config::AvroConfig;
use crate::http_client::{Endpoint, HttpClient, base64};
use crate::normalize::FieldValue;
use crate::reason::{Reason, Rejection};

/// The bundled schemas: (id, text), used when nothing is configured.
pub const BUNDLED: [(u32, &str); 2] = [
    (1, include_str!("../../schemas/copilot_interaction_event.v1.avsc")),
    (2, include_str!("../../schemas/copilot_interaction_event.avsc")),
];

/// Upper bound of any single allocation the Avro decoder makes (a hostile
/// length prefix must not reserve gigabytes).
const MAX_ALLOCATION_BYTES: usize = 8 * 1024 * 1024;

/// Splits the Confluent framing: `Some((schema id, datum))`, or `None` if the
/// message is not framed Avro (no magic byte or too short).
pub fn frame(payload: &[u8]) -> Option<(u32, &[u8])> {
    if payload.len() < 5 || payload[0] != 0 {
        return None;
    }
    let id = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
    Some((id, &payload[5..]))
}

/// Confluent framing of an Avro datum.
pub fn framed(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(datum.len() + 5);
    out.push(0);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// What decoding a framed message needs or produced.
pub enum Lookup<'a> {
    Ready(&'a Prepared),
    /// Not known locally; the registry may have it.
    Fetch,
    Unknown,
}

/// A writer schema prepared for decoding.
pub struct Prepared {
    schema: &'static Schema,
    reader: GenericDatumReader<'static>,
}

/// Schemas kept at most: a deployment has a handful of writer schema
/// versions; ids beyond this are treated as unknown (each prepared schema is
/// kept for the process's life).
pub const MAX_SCHEMAS: usize = 256;
/// Ids remembered as unknown to the registry, oldest forgotten first: random
/// ids from a hostile producer cannot grow memory without bound.
pub const MAX_MISSING_IDS: usize = 10_000;

/// Writer schemas by id, each prepared once.
pub struct AvroSchemas {
    readers: HashMap<u32, Prepared>,
    /// Ids the registry answered 404 for (bounded; see [`MAX_MISSING_IDS`]).
    missing: HashSet<u32>,
    missing_order: VecDeque<u32>,
    registry: Option<Registry>,
}

impl AvroSchemas {
    /// Loads the configured schemas (or the bundled ones). Errors name the key.
    pub fn load(config: &AvroConfig) -> Result<AvroSchemas, Vec<String>> {
        apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
        let mut errors = Vec::new();
        let mut schemas = AvroSchemas {
            readers: HashMap::new(),
            missing: HashSet::new(),
            missing_order: VecDeque::new(),
            registry: None,
        };
        if !config.registry_url.is_empty() {
            match Registry::parse(&config.registry_url) {
                Ok(r) => schemas.registry = Some(r),
                Err(e) => errors.push(format!("avro.registry_url: {e}")),
            }
        }
        for (id, path) in &config.schemas {
            let Ok(id) = id.parse::<u32>() else {
                errors.push(format!("avro.schemas.{id}: schema ids are non-negative integers"));
                continue;
            };
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    if let Err(e) = schemas.insert(id, &text) {
                        errors.push(format!("avro.schemas.{id}: {path}: {e}"));
                    }
                }
                Err(e) => errors.push(format!("avro.schemas.{id}: {path}: {e}")),
            }
        }
        if config.schemas.is_empty() && schemas.registry.is_none() {
            for (id, text) in BUNDLED {
                if let Err(e) = schemas.insert(id, text) {
                    errors.push(format!("bundled schema {id}: {e}"));
                }
            }
        }
        if errors.is_empty() { Ok(schemas) } else { Err(errors) }
    }

    /// Parses a schema and prepares its reader. Schemas live for the whole
    /// process (a handful of ids), so they are leaked to let the prepared
    /// reader borrow them.
    pub fn insert(&mut self, id: u32, text: &str) -> Result<(), String> {
        let schema: &'static Schema = Box::leak(Box::new(Schema::parse_str(text).map_err(|e| e.to_string())?));
        let reader = GenericDatumReader::builder(schema).build().map_err(|e| e.to_string())?;
        self.readers.insert(id, Prepared { schema, reader });
        Ok(())
    }

    pub fn lookup(&self, id: u32) -> Lookup<'_> {
        match self.readers.get(&id) {
            Some(r) => Lookup::Ready(r),
            None if self.registry.is_some() && !self.missing.contains(&id) => Lookup::Fetch,
            None => Lookup::Unknown,
        }
    }

    /// The registry, for a fetch made elsewhere (off the ordered path).
    pub fn registry(&self) -> Option<Registry> {
        self.registry.clone()
    }

    /// Records the registry's answer for `id`: its schema text, or `None`
    /// (404). A schema that does not parse, or one past [`MAX_SCHEMAS`],
    /// makes the id unknown.
    pub fn apply_fetched(&mut self, id: u32, schema: Option<String>) {
        match schema {
            Some(_) if self.readers.len() >= MAX_SCHEMAS => {
                tracing::warn!(schema_id = id, limit = MAX_SCHEMAS, "schema cache full; treating the id as unknown");
                self.mark_missing(id);
            }
            Some(text) => {
                if let Err(e) = self.insert(id, &text) {
                    tracing::warn!(schema_id = id, error = %e, "registry schema does not parse; treating the id as unknown");
                    self.mark_missing(id);
                }
            }
            None => self.mark_missing(id),
        }
    }

    fn mark_missing(&mut self, id: u32) {
        if self.missing.insert(id) {
            self.missing_order.push_back(id);
            while self.missing_order.len() > MAX_MISSING_IDS {
                if let Some(oldest) = self.missing_order.pop_front() {
                    self.missing.remove(&oldest);
                }
            }
        }
    }

    /// How many ids are cached (schemas, ids known to be missing).
    pub fn cached(&self) -> (usize, usize) {
        (self.readers.len(), self.missing.len())
    }
}

/// Decodes a datum into the event's fields, by name.
pub fn decode(prepared: &Prepared, datum: &[u8]) -> Result<Vec<(Cow<'static, str>, FieldValue<'static>)>, Rejection> {
    let mut input = EndAware { data: datum, hit_end: false };
    let value = prepared.reader.read_value(&mut input).map_err(|e| {
        Rejection::new(
            Reason::MalformedAvro,
            None,
            format!("datum does not match its schema: {}", truncate(&e.to_string())),
        )
    })?;
    if input.hit_end {
        return Err(Rejection::new(Reason::MalformedAvro, None, "the datum is truncated"));
    }
    if !input.data.is_empty() {
        return Err(Rejection::new(Reason::MalformedAvro, None, format!("{} bytes after the datum", input.data.len())));
    }
    // apache-avro yields nulls instead of an error when the datum ends early;
    // checking the value against its schema catches a truncated datum.
    if !value.validate(prepared.schema) {
        return Err(Rejection::new(Reason::MalformedAvro, None, "the datum is truncated or does not match its schema"));
    }
    match value {
        AvroValue::Record(fields) => Ok(fields.into_iter().map(|(name, v)| (Cow::Owned(name), field(v))).collect()),
        _ => Err(Rejection::new(Reason::NotAnObject, None, "the Avro datum is not a record")),
    }
}

/// A byte reader that remembers whether the decoder asked for bytes past the
/// end: a complete datum never does, a truncated one always does.
struct EndAware<'a> {
    data: &'a [u8],
    hit_end: bool,
}

impl Read for EndAware<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.data.is_empty() {
            self.hit_end = true;
            return Ok(0);
        }
        let n = buf.len().min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(200).collect()
}

fn field(value: AvroValue) -> FieldValue<'static> {
    match value {
        AvroValue::Null => FieldValue::Null,
        AvroValue::Boolean(_) => FieldValue::Bool,
        AvroValue::Int(i) => FieldValue::Int(i64::from(i)),
        AvroValue::Long(l) => FieldValue::Int(l),
        AvroValue::Float(f) => FieldValue::Float(f64::from(f)),
        AvroValue::Double(d) => FieldValue::Float(d),
        AvroValue::String(s) | AvroValue::Enum(_, s) => FieldValue::Str(Cow::Owned(s)),
        AvroValue::Uuid(u) => FieldValue::Str(Cow::Owned(u.hyphenated().to_string())),
        AvroValue::TimestampMillis(ms) | AvroValue::LocalTimestampMillis(ms) => FieldValue::Int(ms),
        AvroValue::TimestampMicros(us) | AvroValue::LocalTimestampMicros(us) => FieldValue::Int(us.div_euclid(1000)),
        AvroValue::TimestampNanos(ns) | AvroValue::LocalTimestampNanos(ns) => FieldValue::Int(ns.div_euclid(1_000_000)),
        AvroValue::Date(days) => match chrono::NaiveDate::from_num_days_from_ce_opt(days + 719_163) {
            Some(d) => FieldValue::Str(Cow::Owned(d.format("%Y-%m-%d").to_string())),
            None => FieldValue::Unsupported("a date out of range"),
        },
        AvroValue::Union(_, inner) => field(*inner),
        AvroValue::Map(_) | AvroValue::Record(_) => FieldValue::Object(to_json(value)),
        AvroValue::Array(_) => FieldValue::Array,
        _ => FieldValue::Unsupported("an Avro type the table has no column for"),
    }
}

/// Nested records and maps become JSON (stored compact, like a JSON object).
fn to_json(value: AvroValue) -> serde_json::Value {
    use serde_json::Value as J;
    match value {
        AvroValue::Null => J::Null,
        AvroValue::Boolean(b) => J::Bool(b),
        AvroValue::Int(i) => J::from(i),
        AvroValue::Long(l) => J::from(l),
        AvroValue::Float(f) => J::from(f64::from(f)),
        AvroValue::Double(d) => J::from(d),
        AvroValue::String(s) | AvroValue::Enum(_, s) => J::String(s),
        AvroValue::Uuid(u) => J::String(u.to_string()),
        AvroValue::Union(_, inner) => to_json(*inner),
        AvroValue::Array(items) => J::Array(items.into_iter().map(to_json).collect()),
        AvroValue::Map(m) => J::Object(m.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
        AvroValue::Record(fields) => J::Object(fields.into_iter().map(|(k, v)| (k, to_json(v))).collect()),
        AvroValue::TimestampMillis(ms) => J::from(ms),
        other => J::String(format!("{other:?}")),
    }
}

/// A Confluent-compatible Schema Registry over HTTP or HTTPS, with optional
/// basic auth from the URL's user info.
#[derive(Clone)]
pub struct Registry {
    client: std::sync::Arc<HttpClient>,
    authorization: Option<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The endpoint's origin only: the user info may hold a password.
        f.debug_struct("Registry").field("origin", &self.client.endpoint().origin()).finish()
    }
}

impl Registry {
    pub fn parse(url: &str) -> Result<Registry, String> {
        let endpoint = Endpoint::parse(url)?;
        let authorization = endpoint.userinfo.as_ref().map(|u| format!("Basic {}", base64(u.as_bytes())));
        let client = HttpClient::new(endpoint, Duration::from_secs(10))?;
        Ok(Registry { client: std::sync::Arc::new(client), authorization })
    }

    /// `Ok(Some(schema text))`, `Ok(None)` for an id the registry does not
    /// have (404), `Err` for anything transient.
    pub fn schema(&self, id: u32) -> Result<Option<String>, String> {
        let mut headers = vec![("Accept", "application/vnd.schemaregistry.v1+json, application/json")];
        if let Some(auth) = &self.authorization {
            headers.push(("Authorization", auth));
        }
        let response = self
            .client
            .request("GET", &format!("/schemas/ids/{id}"), &headers, b"")
            .map_err(|e| format!("registry: {e}"))?;
        match response.status {
            200 => {
                let json: serde_json::Value =
                    serde_json::from_slice(&response.body).map_err(|e| format!("registry body: {e}"))?;
                json.get("schema")
                    .and_then(|s| s.as_str())
                    .map(|s| Some(s.to_owned()))
                    .ok_or_else(|| "registry body has no schema".into())
            }
            404 => Ok(None),
            401 | 403 => Err(format!("registry refused the credentials ({})", response.status)),
            other => Err(format!("registry answered {other}")),
        }
    }
}

/// Encodes a JSON event with an Avro record schema (for `produce --format avro`
/// and tests): each field takes the union branch that fits the JSON value.
pub fn encode_json(schema: &Schema, event: &serde_json::Value) -> Result<Vec<u8>, String> {
    let Schema::Record(record) = schema else { return Err("the schema is not a record".into()) };
    let mut fields = Vec::with_capacity(record.fields.len());
    for f in &record.fields {
        let value = event.get(&f.name).unwrap_or(&serde_json::Value::Null);
        fields.push((f.name.clone(), to_avro(&f.schema, value).map_err(|e| format!("{}: {e}", f.name))?));
    }
    apache_avro::writer::datum::GenericDatumWriter::builder(schema)
        .build()
        .and_then(|w| w.write_value_to_vec(AvroValue::Record(fields)))
        .map_err(|e| e.to_string())
}

fn to_avro(schema: &Schema, value: &serde_json::Value) -> Result<AvroValue, String> {
    use serde_json::Value as J;
    Ok(match (schema, value) {
        (Schema::Union(u), v) => {
            let fits = |s: &Schema| match (s, v) {
                (Schema::Null, J::Null) => true,
                (Schema::Int, J::Number(n)) => n.as_i64().is_some_and(|i| i32::try_from(i).is_ok()),
                (Schema::Long | Schema::TimestampMillis, J::Number(n)) => n.as_i64().is_some(),
                (Schema::String | Schema::Uuid(_), J::String(_) | J::Object(_)) => true,
                _ => false,
            };
            let (index, branch) =
                u.variants().iter().enumerate().find(|(_, s)| fits(s)).ok_or("no union branch fits")?;
            AvroValue::Union(index as u32, Box::new(to_avro(branch, v)?))
        }
        (Schema::Null, _) => AvroValue::Null,
        (Schema::Int, J::Number(n)) => {
            AvroValue::Int(n.as_i64().and_then(|i| i32::try_from(i).ok()).ok_or("not an int")?)
        }
        (Schema::Long, J::Number(n)) => AvroValue::Long(n.as_i64().ok_or("not a long")?),
        (Schema::TimestampMillis, J::Number(n)) => AvroValue::TimestampMillis(n.as_i64().ok_or("not a long")?),
        (Schema::Uuid(_), J::String(s)) => AvroValue::Uuid(uuid::Uuid::try_parse(s).map_err(|e| e.to_string())?),
        (Schema::String, J::String(s)) => AvroValue::String(s.clone()),
        (Schema::String, J::Object(_)) => AvroValue::String(value.to_string()),
        (s, v) => return Err(format!("cannot write {v} as {s:?}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_urls_parse_and_carry_basic_auth() {
        let r = Registry::parse("http://u:p@registry:8081/base/").unwrap();
        assert_eq!(r.client.endpoint().base_path, "/base");
        assert_eq!(r.authorization.as_deref(), Some("Basic dTpw"));
        assert!(!format!("{r:?}").contains("u:p"));
        assert!(Registry::parse("ftp://x").is_err());
    }

    #[test]
    fn framing_round_trips() {
        let f = framed(7, b"abc");
        assert_eq!(frame(&f), Some((7, &b"abc"[..])));
        assert_eq!(frame(b"{\"a\":1}"), None);
        assert_eq!(frame(&[0, 0, 0]), None);
    }

    #[test]
    fn caches_stay_bounded_whatever_ids_arrive() {
        let config = AvroConfig { registry_url: "http://127.0.0.1:1".into(), schemas: Default::default() };
        let mut schemas = AvroSchemas::load(&config).unwrap();
        for id in 0..(MAX_MISSING_IDS as u32 + 5000) {
            schemas.apply_fetched(id, None);
        }
        assert_eq!(schemas.cached(), (0, MAX_MISSING_IDS));
        assert!(matches!(schemas.lookup(0), Lookup::Fetch), "the oldest unknown id was forgotten");
        assert!(matches!(schemas.lookup(MAX_MISSING_IDS as u32 + 4999), Lookup::Unknown));
        for id in 0..(MAX_SCHEMAS as u32 + 10) {
            schemas.apply_fetched(1_000_000 + id, Some(BUNDLED[1].1.to_owned()));
        }
        assert_eq!(schemas.cached().0, MAX_SCHEMAS);
        assert!(matches!(schemas.lookup(1_000_000 + MAX_SCHEMAS as u32 + 1), Lookup::Unknown));
    }
}
