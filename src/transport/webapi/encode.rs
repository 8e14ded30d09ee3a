//! Records as the Web API returns them: lookups as `_<name>_value`,
//! datetimes to the second (`YYYY-MM-DDTHH:MM:SSZ`, which DynamicsWebApi
//! turns into dates), `@odata.etag` = `W/"<versionnumber>"`, formatted
//! values only when `Prefer: odata.include-annotations` asks for them.

use serde_json::{Map, Value as Json};

use super::request::Prefer;
use crate::normalize::parse_datetime;
use crate::query::odata::{property_column, property_name};
use crate::table::{ColumnType, table};

pub const FORMATTED_VALUE: &str = "OData.Community.Display.V1.FormattedValue";

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
        let value = match (t.columns[index].column_type, value) {
            (ColumnType::Datetime, Json::String(s)) => Json::String(to_the_second(&s)),
            (_, v) => v,
        };
        out.insert(property_name(index), value);
    }
    out
}

fn to_the_second(text: &str) -> String {
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
