//! Records as the Web API returns them: lookups as `_<name>_value`,
//! datetimes to the second (`YYYY-MM-DDTHH:MM:SSZ`, which DynamicsWebApi
//! turns into dates), `@odata.etag` = `W/"<versionnumber>"`, formatted
//! values only when `Prefer: odata.include-annotations` asks for them.

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::{Map, Value as Json};

use super::request::Prefer;
use crate::normalize::parse_datetime;
use crate::operations::retrieve::{FORMATTED_VALUE, formatted_value_key, option_label};
use crate::query::odata::{property_column, property_name};
use crate::table::{ColumnType, table};

/// The ETag of a record version.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// An entity collection's body, written straight from the page as read:
/// the annotations, `value`, then `@odata.nextLink` (Dataverse's order).
pub struct Collection<'a> {
    pub annotations: Vec<(&'static str, Json)>,
    pub columns: &'a [usize],
    pub rows: &'a [Vec<Json>],
    pub shape: WebShape,
    pub next_link: Option<String>,
}

impl Serialize for Collection<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Entities<'a>(&'a Collection<'a>);
        impl Serialize for Entities<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let Collection { columns, rows, shape, .. } = *self.0;
                serializer.collect_seq(rows.iter().map(|values| WebEntity { columns, values, shape }))
            }
        }
        let mut map = serializer.serialize_map(None)?;
        for (key, value) in &self.annotations {
            map.serialize_entry(key, value)?;
        }
        map.serialize_entry("value", &Entities(self))?;
        if let Some(link) = &self.next_link {
            map.serialize_entry("@odata.nextLink", link)?;
        }
        map.end()
    }
}

/// A stored row in the Web API's shape, serialized straight from the row
/// as read (a page of 5,000 rows builds no map per record).
/// `versionnumber` gives the ETag and is written only when `keep_version`
/// (it was selected); labels only when `formatted`.
pub struct WebEntity<'a> {
    pub columns: &'a [usize],
    pub values: &'a [Json],
    pub shape: WebShape,
}

/// What a request asked of every entity it gets back.
#[derive(Debug, Clone, Copy)]
pub struct WebShape {
    pub formatted: bool,
    pub keep_version: bool,
    /// The column of `versionnumber`, looked up once per response.
    version_index: Option<usize>,
}

impl WebShape {
    pub fn of(prefer: &Prefer, keep_version: bool) -> WebShape {
        WebShape {
            formatted: prefer.wants(FORMATTED_VALUE),
            keep_version,
            version_index: table().index_of("versionnumber"),
        }
    }
}

impl Serialize for WebEntity<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let t = table();
        let version_index = self.shape.version_index;
        let mut map = serializer.serialize_map(None)?;
        let rows = || self.columns.iter().copied().zip(self.values);
        if let Some(version) = rows().find(|&(i, _)| Some(i) == version_index).and_then(|(_, v)| v.as_i64()) {
            map.serialize_entry("@odata.etag", &etag(version))?;
        }
        for (index, value) in rows() {
            if Some(index) == version_index && !self.shape.keep_version {
                continue;
            }
            // Option sets are never lookups, so the logical name is the property.
            if self.shape.formatted
                && let Some(label) = option_label(index, value)
            {
                map.serialize_entry(formatted_value_key(index), label)?;
            }
            let name = property_name(index);
            match (t.columns[index].column_type, value) {
                (ColumnType::Datetime, Json::String(text)) => map.serialize_entry(name, &ToTheSecond(text))?,
                _ => map.serialize_entry(name, value)?,
            }
        }
        map.end()
    }
}

/// A stored datetime written to the second, as the Web API gives it.
struct ToTheSecond<'a>(&'a str);

impl Serialize for ToTheSecond<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match stored_second(self.0) {
            Some(second) => serializer.serialize_str(second.as_str()),
            None => serializer.serialize_str(&reformatted_to_the_second(self.0)),
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` without an allocation.
struct Second([u8; 20]);

impl Second {
    fn as_str(&self) -> &str {
        // Built only from an ASCII prefix and `Z`.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// Both backends give datetimes in the stored form
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, whose first 19 bytes are the second: a page
/// of thousands of rows then skips a parse and a format per row.
fn stored_second(text: &str) -> Option<Second> {
    let b = text.as_bytes();
    let stored_form = b.len() == 24
        && b.iter().enumerate().all(|(i, &c)| match i {
            4 | 7 => c == b'-',
            10 => c == b'T',
            13 | 16 => c == b':',
            19 => c == b'.',
            23 => c == b'Z',
            _ => c.is_ascii_digit(),
        });
    if !stored_form {
        return None;
    }
    let mut second = [b'Z'; 20];
    second[..19].copy_from_slice(&b[..19]);
    Some(Second(second))
}

fn reformatted_to_the_second(text: &str) -> String {
    parse_datetime(text).map_or_else(|| text.to_owned(), |d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

/// A request body's record (Web API shape) as the validator reads events:
/// `@odata.*` annotations dropped, `_x_value` and `x@odata.bind`
/// (`/msdyn_copilotinteractiondatas(<id>)`) to the lookup's logical name.
pub fn event_fields(body: &Map<String, Json>) -> Result<Map<String, Json>, String> {
    let t = table();
    let mut out = Map::new();
    for (key, value) in body {
        if let Some(name) = key.strip_suffix("@odata.bind") {
            let index = t
                .columns
                .iter()
                .position(|c| c.column_type == ColumnType::Lookup && c.logical_name.eq_ignore_ascii_case(name))
                .ok_or_else(|| format!("'{name}' is not a lookup of {}", t.logical_name))?;
            let reference = value.as_str().unwrap_or_default();
            let id = reference
                .rsplit_once('(')
                .and_then(|(_, id)| id.strip_suffix(')'))
                .ok_or_else(|| format!("{key}: '{reference}' is not like /entityset(<id>)"))?;
            out.insert(t.columns[index].logical_name.clone(), Json::String(id.to_owned()));
            continue;
        }
        if key.contains('@') {
            continue;
        }
        match property_column(key) {
            Some(index) if key.starts_with('_') => {
                out.insert(t.columns[index].logical_name.clone(), value.clone());
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entities_get_etags_lookup_names_and_second_precision() {
        let t = table();
        let column = |name: &str| t.index_of(name).unwrap();
        let columns = [
            column("msdyn_copilotinteractionid"),
            column("versionnumber"),
            column("createdon"),
            column("modifiedon"),
            column("msdyn_interactiondataid"),
            column("msdyn_interactiontype"),
        ];
        let values = [
            json!("8d2b6f3e-3c9f-4b8e-9a36-0c4d9d8c0001"),
            json!(7),
            json!("2024-05-01T10:00:00.123Z"),
            // Not in the stored form: parsed and formatted instead.
            json!("2024-05-01T10:00:00.9+02:00"),
            json!("8d2b6f3e-3c9f-4b8e-9a36-0c4d9d8c0002"),
            json!(100230301),
        ];
        let web = |prefer: &Prefer, keep_version| {
            let entity = WebEntity { columns: &columns, values: &values, shape: WebShape::of(prefer, keep_version) };
            serde_json::to_value(entity).unwrap()
        };
        let plain = web(&Prefer::default(), false);
        assert_eq!(plain["@odata.etag"], "W/\"7\"");
        assert_eq!(plain["createdon"], "2024-05-01T10:00:00Z");
        assert_eq!(plain["modifiedon"], "2024-05-01T08:00:00Z");
        assert_eq!(plain["_msdyn_interactiondataid_value"], "8d2b6f3e-3c9f-4b8e-9a36-0c4d9d8c0002");
        assert!(plain.get("msdyn_interactiondataid").is_none() && plain.get("versionnumber").is_none());
        assert_eq!(plain.as_object().unwrap().len(), 6, "{plain}");
        let all = Prefer { annotations: vec!["*".into()], ..Prefer::default() };
        let annotated = web(&all, true);
        assert_eq!(annotated["msdyn_interactiontype@OData.Community.Display.V1.FormattedValue"], "ThumbsUp");
        assert_eq!(annotated["versionnumber"], 7);
    }

    proptest::proptest! {
        /// The stored form cut to the second is what parsing and formatting it
        /// gives, for every datetime the table can hold, leap seconds included.
        #[test]
        fn stored_datetimes_cut_to_the_second_as_parsed_and_formatted(
            seconds in -62_135_596_800i64..253_402_300_740,
            millis in 0u32..1000,
            leap in proptest::prelude::any::<bool>(),
        ) {
            // A leap second is representable only at :59.
            let (seconds, millis) = if leap { (seconds - seconds.rem_euclid(60) + 59, millis + 1000) } else { (seconds, millis) };
            let d = chrono::DateTime::from_timestamp(seconds, millis * 1_000_000).unwrap();
            let mut stored = String::new();
            crate::record::write_datetime(&mut stored, &d);
            let reference = parse_datetime(&stored).map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string());
            proptest::prop_assert_eq!(stored_second(&stored).map(|s| s.as_str().to_owned()), reference, "{}", stored);
        }
    }

    #[test]
    fn bodies_bind_lookups_and_drop_annotations() {
        let body = json!({
            "msdyn_name": "x",
            "@odata.type": "Microsoft.Dynamics.CRM.msdyn_copilotinteraction",
            "msdyn_InteractionDataId@odata.bind": "/msdyn_copilotinteractiondatas(8d2b6f3e-3c9f-4b8e-9a36-0c4d9d8c0002)",
        });
        let Json::Object(body) = body else { unreachable!() };
        let fields = event_fields(&body).unwrap();
        assert_eq!(fields["msdyn_interactiondataid"], "8d2b6f3e-3c9f-4b8e-9a36-0c4d9d8c0002");
        assert_eq!(fields.len(), 2);
    }
}
