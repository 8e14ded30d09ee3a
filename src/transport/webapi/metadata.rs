//! The metadata Dataverse clients read, generated from the table definition
//! (`schemas/msdyn_copilotinteraction.table.json`), never a second copy:
//! `EntityDefinitions` (Microsoft's Python SDK resolves the entity set and
//! the picklist labels through it), `$metadata` (CSDL), `WhoAmI` and the
//! service document.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value as Json, json};
use uuid::Uuid;

use super::error::ApiError;
use super::json_response;
use super::request::Call;
use crate::query::odata::property_name;
use crate::table::{Column, ColumnType, table};

const NAMESPACE: Uuid = Uuid::from_u128(0x3a9c_51d2_7e44_4b0f_a1d6_52c0_9e1b_66f4);

/// A stable id for a named piece of metadata (the same on every instance).
fn metadata_id(name: &str) -> Uuid {
    Uuid::new_v5(&NAMESPACE, name.as_bytes())
}

fn label(text: &str) -> Json {
    let localized = json!({"Label": text, "LanguageCode": 1033});
    json!({"LocalizedLabels": [localized.clone()], "UserLocalizedLabel": localized})
}

fn attribute_type(c: &Column) -> &'static str {
    match c.column_type {
        ColumnType::Uniqueidentifier => "Uniqueidentifier",
        ColumnType::Lookup => "Lookup",
        ColumnType::String => "String",
        ColumnType::Memo => "Memo",
        ColumnType::Picklist => "Picklist",
        ColumnType::State => "State",
        ColumnType::Status => "Status",
        ColumnType::Integer => "Integer",
        ColumnType::Bigint => "BigInt",
        ColumnType::Datetime => "DateTime",
    }
}

fn definition() -> Map<String, Json> {
    let t = table();
    let Json::Object(map) = json!({
        "MetadataId": metadata_id(&t.logical_name),
        "LogicalName": t.logical_name,
        "SchemaName": schema_name(),
        "EntitySetName": t.entity_set_name,
        "LogicalCollectionName": t.entity_set_name,
        "PrimaryIdAttribute": t.primary_id_attribute,
        "PrimaryNameAttribute": t.primary_name_attribute,
        "ObjectTypeCode": 10000,
        "IsCustomEntity": false,
        "TableType": "Standard",
        "DisplayName": label("Copilot Interaction"),
        "DisplayCollectionName": label("Copilot Interactions"),
    }) else {
        return Map::new();
    };
    map
}

fn schema_name() -> String {
    let t = table();
    t.column(&t.primary_id_attribute)
        .map(|c| c.schema_name.trim_end_matches("Id").to_owned())
        .unwrap_or_else(|| t.logical_name.clone())
}

/// Keeps only the `$select`ed properties (annotations stay).
fn select(mut map: Map<String, Json>, call: &Call) -> Map<String, Json> {
    if let Some(select) = call.option("$select").filter(|s| !s.trim().is_empty()) {
        let keep: Vec<&str> = select.split(',').map(str::trim).collect();
        map.retain(|k, _| k.starts_with('@') || keep.contains(&k.as_str()));
    }
    map
}

/// `LogicalName eq '<name>'` in a `$filter` on EntityDefinitions: the only
/// filter the clients send there. `None` when there is no filter.
fn filtered_name(call: &Call) -> Result<Option<String>, ApiError> {
    let Some(filter) = call.option("$filter").map(str::trim).filter(|f| !f.is_empty()) else {
        return Ok(None);
    };
    let name = filter
        .strip_prefix("LogicalName")
        .map(str::trim_start)
        .and_then(|f| f.strip_prefix("eq"))
        .map(|f| f.trim().trim_matches('\''))
        .ok_or_else(|| ApiError::bad_request("EntityDefinitions can be filtered by LogicalName eq '<name>' only"))?;
    Ok(Some(name.to_owned()))
}

/// `EntityDefinitions`, `EntityDefinitions?$filter=LogicalName eq '…'` or
/// `EntityDefinitions(LogicalName='…')`.
pub fn entity_definitions(call: &Call, logical_name: Option<&str>) -> Result<Response, ApiError> {
    let t = table();
    if let Some(name) = logical_name {
        if name != t.logical_name {
            return Err(ApiError::not_found(format!("Could not find an entity with LogicalName = {name}")));
        }
        let mut body = Map::new();
        body.insert(
            "@odata.context".into(),
            Json::String(format!("{}/$metadata#EntityDefinitions/$entity", call.base)),
        );
        body.extend(select(definition(), call));
        return Ok(json_response(StatusCode::OK, &Json::Object(body)));
    }
    let matches = filtered_name(call)?.is_none_or(|n| n == t.logical_name);
    let value: Vec<Json> = if matches { vec![Json::Object(select(definition(), call))] } else { Vec::new() };
    Ok(json_response(
        StatusCode::OK,
        &json!({"@odata.context": format!("{}/$metadata#EntityDefinitions", call.base), "value": value}),
    ))
}

/// `EntityDefinitions(LogicalName='…')/Attributes[/Microsoft.Dynamics.CRM.PicklistAttributeMetadata]`,
/// with the option sets. An unknown table has no attributes (never 404:
/// Microsoft's Python SDK retries a 404 here for seconds, then fails the write).
pub fn attributes(call: &Call, logical_name: &str, picklists_only: bool) -> Result<Response, ApiError> {
    let t = table();
    let value: Vec<Json> = if logical_name == t.logical_name {
        t.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.stored && (!picklists_only || c.column_type == ColumnType::Picklist))
            .map(|(i, c)| {
                let mut a = json!({
                    "MetadataId": metadata_id(&format!("{}.{}", t.logical_name, c.logical_name)),
                    "LogicalName": c.logical_name,
                    "SchemaName": c.schema_name,
                    "AttributeType": attribute_type(c),
                    "IsValidForCreate": c.valid_for_create,
                    "IsValidForUpdate": c.valid_for_update,
                    "IsPrimaryId": c.logical_name == t.primary_id_attribute,
                    "IsPrimaryName": c.logical_name == t.primary_name_attribute,
                });
                if let Some(max) = c.max_length {
                    a["MaxLength"] = json!(max);
                }
                if c.column_type == ColumnType::Lookup {
                    a["Targets"] = json!(c.targets);
                    a["AttributeOf"] = json!(property_name(i));
                }
                if c.column_type.is_option_set() {
                    let options: Vec<Json> =
                        c.options.iter().map(|o| json!({"Value": o.value, "Label": label(&o.label)})).collect();
                    a["OptionSet"] = json!({"Name": c.logical_name, "Options": options});
                }
                a
            })
            .collect()
    } else {
        Vec::new()
    };
    let kind = if picklists_only { "Microsoft.Dynamics.CRM.PicklistAttributeMetadata" } else { "Attributes" };
    Ok(json_response(
        StatusCode::OK,
        &json!({"@odata.context": format!("{}/$metadata#EntityDefinitions('{}')/Attributes/{kind}", call.base, logical_name), "value": value}),
    ))
}

pub fn service_document(call: &Call) -> Response {
    let t = table();
    json_response(
        StatusCode::OK,
        &json!({
            "@odata.context": format!("{}/$metadata", call.base),
            "value": [{"name": t.entity_set_name, "kind": "EntitySet", "url": t.entity_set_name}],
        }),
    )
}

pub fn who_am_i(call: &Call) -> Response {
    json_response(
        StatusCode::OK,
        &json!({
            "@odata.context": format!("{}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", call.base),
            "BusinessUnitId": metadata_id("business-unit"),
            "UserId": metadata_id(&format!("user:{}", call.caller.name)),
            "OrganizationId": metadata_id("organization"),
        }),
    )
}

fn edm_type(c: &Column) -> &'static str {
    match c.column_type {
        ColumnType::Uniqueidentifier | ColumnType::Lookup => "Edm.Guid",
        ColumnType::String | ColumnType::Memo => "Edm.String",
        ColumnType::Picklist | ColumnType::State | ColumnType::Status | ColumnType::Integer => "Edm.Int32",
        ColumnType::Bigint => "Edm.Int64",
        ColumnType::Datetime => "Edm.DateTimeOffset",
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// `$metadata`: the CSDL of this entity, its entity set and the actions served.
pub fn csdl() -> Response {
    let t = table();
    let mut properties = String::new();
    for (i, c) in t.columns.iter().enumerate().filter(|(_, c)| c.stored) {
        let mut facets = String::new();
        if let Some(max) = c.max_length {
            facets.push_str(&format!(" MaxLength=\"{max}\""));
        }
        if c.logical_name == t.primary_id_attribute {
            facets.push_str(" Nullable=\"false\"");
        }
        properties.push_str(&format!(
            "<Property Name=\"{}\" Type=\"{}\"{facets}/>",
            xml_escape(property_name(i)),
            edm_type(c)
        ));
    }
    let entity = xml_escape(&t.logical_name);
    let actions: String =
        ["Retain", "BulkRetain", "RollbackRetain", "PurgeRetainedContent", "ValidateRetentionConfig", "BulkDelete"]
            .iter()
            .map(|a| format!("<Action Name=\"{a}\"/>"))
            .collect::<Vec<_>>()
            .join("");
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\
<edmx:Edmx Version=\"4.0\" xmlns:edmx=\"http://docs.oasis-open.org/odata/ns/edmx\">\
<edmx:DataServices><Schema Namespace=\"Microsoft.Dynamics.CRM\" Alias=\"mscrm\" xmlns=\"http://docs.oasis-open.org/odata/ns/edm\">\
<EntityType Name=\"{entity}\"><Key><PropertyRef Name=\"{key}\"/></Key>{properties}</EntityType>\
<ComplexType Name=\"WhoAmIResponse\"><Property Name=\"BusinessUnitId\" Type=\"Edm.Guid\" Nullable=\"false\"/>\
<Property Name=\"UserId\" Type=\"Edm.Guid\" Nullable=\"false\"/><Property Name=\"OrganizationId\" Type=\"Edm.Guid\" Nullable=\"false\"/></ComplexType>\
<Function Name=\"WhoAmI\"><ReturnType Type=\"mscrm.WhoAmIResponse\" Nullable=\"false\"/></Function>\
<Function Name=\"IsValidStateTransition\"><Parameter Name=\"Entity\" Type=\"mscrm.crmbaseentity\"/>\
<Parameter Name=\"NewState\" Type=\"Edm.String\"/><Parameter Name=\"NewStatus\" Type=\"Edm.Int64\"/></Function>\
<Action Name=\"CreateMultiple\" IsBound=\"true\"><Parameter Name=\"entityset\" Type=\"Collection(mscrm.{entity})\"/></Action>\
<Action Name=\"UpdateMultiple\" IsBound=\"true\"><Parameter Name=\"entityset\" Type=\"Collection(mscrm.{entity})\"/></Action>\
<Action Name=\"UpsertMultiple\" IsBound=\"true\"><Parameter Name=\"entityset\" Type=\"Collection(mscrm.{entity})\"/></Action>\
{actions}\
<EntityContainer Name=\"System\"><EntitySet Name=\"{set}\" EntityType=\"Microsoft.Dynamics.CRM.{entity}\"/></EntityContainer>\
</Schema></edmx:DataServices></edmx:Edmx>",
        key = xml_escape(&t.primary_id_attribute),
        set = xml_escape(&t.entity_set_name),
    );
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/xml"));
    response.headers_mut().insert("OData-Version", HeaderValue::from_static("4.0"));
    response
}
