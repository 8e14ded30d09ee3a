//! Records as the Web API returns them: lookups as `_<name>_value`,
//! datetimes to the second (`YYYY-MM-DDTHH:MM:SSZ`, which DynamicsWebApi
//! turns into dates), `@odata.etag` = `W/"<versionnumber>"`, formatted
//! values only when `Prefer: odata.include-annotations` asks for them.

use serde_json::{Map, Value as Json};

use super::request::Prefer;
use crate::normalize::parse_datetime;
use crate::query::odata::{property_column, property_name};
use crate::table::{ColumnType, table};

pub use crate::operations::retrieve::FORMATTED_VALUE;

/// The ETag of a record version.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// An entity of the operations (logical names, formatted values beside
/// option sets) in the Web API's shape. `versionnumber` gives the ETag and is
/// dropped unless `keep_version` (it was selected).
pub fn web_entity(entity: Map<String, Json>, prefer: &Prefer, keep_version: bool) -> Map<String, Json> {
    let t = table();
    let formatted = prefer.wants(FORMATTED_VALUE);
    let mut out = Map::new();
    if let Some(version) = entity.get("versionnumber").and_then(Json::as_i64) {
        out.insert("@odata.etag".into(), Json::String(etag(version)));
    }
    for (key, value) in entity {
        if let Some((column, _annotation)) = key.split_once('@') {
            if formatted && let Some(index) = t.index_of(column) {
                out.insert(format!("{}@{FORMATTED_VALUE}", property_name(index)), value);
            }
            continue;
        }
        if key == "versionnumber" && !keep_version {
            continue;
        }
        let Some(index) = t.index_of(&key) else { continue };
        let column_type = t.columns[index].column_type;
        let value = match (column_type, value) {
            (ColumnType::Datetime, Json::String(s)) => Json::String(to_the_second(&s)),
            (_, v) => v,
        };
        // Only a lookup is renamed; every other key is kept as it is (a page
        // of 5,000 rows would otherwise copy each of its keys once more).
        let name = if column_type == ColumnType::Lookup { property_name(index) } else { key };
        out.insert(name, value);
    }
    out
}

fn to_the_second(text: &str) -> String {
    // Both backends give datetimes in the stored form
    // `YYYY-MM-DDTHH:MM:SS.mmmZ`, whose first 19 bytes are the second: a
    // page of thousands of rows then skips a parse and a format per row.
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
    if stored_form {
        return format!("{}Z", &text[..19]);
    }
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
        let entity = json!({
            "msdyn_copilotinteractionid": "8d2b6f3e-3c9f-4b8e-9a36-0c4d9d8c0001",
            "versionnumber": 7,
            "createdon": "2024-05-01T10:00:00.123Z",
            "msdyn_interactiondataid": "8d2b6f3e-3c9f-4b8e-9a36-0c4d9d8c0002",
            "msdyn_interactiontype": 100230301,
            "msdyn_interactiontype@OData.Community.Display.V1.FormattedValue": "ThumbsUp",
        });
        let Json::Object(entity) = entity else { unreachable!() };
        let plain = web_entity(entity.clone(), &Prefer::default(), false);
        assert_eq!(plain["@odata.etag"], "W/\"7\"");
        assert_eq!(plain["createdon"], "2024-05-01T10:00:00Z");
        assert!(plain.contains_key("_msdyn_interactiondataid_value") && !plain.contains_key("versionnumber"));
        assert!(!plain.keys().any(|k| k.contains("FormattedValue")));
        let all = Prefer { annotations: vec!["*".into()], ..Prefer::default() };
        let annotated = web_entity(entity, &all, true);
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
            proptest::prop_assert_eq!(Some(to_the_second(&stored)), reference, "{}", stored);
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
