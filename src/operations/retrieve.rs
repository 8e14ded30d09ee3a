//! Retrieve: one record, live or retained, as Dataverse's `Entity`.

use serde::Serialize;
use serde_json::{Map, Value as Json};
use uuid::Uuid;

use super::OperationError;
use crate::backend::Backend;
use crate::table::table;

#[derive(Debug, Clone)]
pub struct Retrieve {
    pub target: Uuid,
    /// Indices of stored table columns; the id is always returned.
    pub columns: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RetrieveResponse {
    pub entity: Map<String, Json>,
}

/// The id and the asked columns by logical name, option sets as values with
/// their labels as `<column>@OData.Community.Display.V1.FormattedValue`. An
/// unknown, purged or deleted id is Dataverse's not-found.
pub async fn retrieve(backend: &Backend, request: &Retrieve) -> Result<RetrieveResponse, OperationError> {
    let (columns, values) = retrieve_row(backend, request).await?;
    Ok(RetrieveResponse { entity: entity(&columns, values) })
}

/// The record's stored values for the id and the asked columns, with those
/// columns (a transport that writes its own shape starts from these).
pub async fn retrieve_row(backend: &Backend, request: &Retrieve) -> Result<(Vec<usize>, Vec<Json>), OperationError> {
    let t = table();
    let id_index = t.index_of(&t.primary_id_attribute).unwrap_or(0);
    let mut columns = vec![id_index];
    columns.extend(request.columns.iter().copied().filter(|&c| c != id_index));
    let values = backend.retrieve(request.target, &columns).await?.ok_or_else(|| super::not_found(request.target))?;
    Ok((columns, values))
}

/// The annotation of an option set's label beside its value (Dataverse's own).
pub const FORMATTED_VALUE: &str = "OData.Community.Display.V1.FormattedValue";

/// A row as Dataverse's entity JSON: logical names, option-set labels beside their values.
pub fn entity(columns: &[usize], values: Vec<Json>) -> Map<String, Json> {
    let t = table();
    let mut entity = Map::new();
    for (&i, value) in columns.iter().zip(values) {
        if let Some(label) = option_label(i, &value) {
            entity.insert(formatted_value_key(i).to_owned(), Json::String(label.to_owned()));
        }
        entity.insert(t.columns[i].logical_name.clone(), value);
    }
    entity
}

/// A row in the shape of [`entity`], serialized from the row as read (a
/// page measures every record's size this way; none is built as a map).
pub struct EntityView<'a> {
    pub columns: &'a [usize],
    pub values: &'a [Json],
}

impl Serialize for EntityView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let t = table();
        let mut map = serializer.serialize_map(None)?;
        for (&i, value) in self.columns.iter().zip(self.values) {
            if let Some(label) = option_label(i, value) {
                map.serialize_entry(formatted_value_key(i), label)?;
            }
            map.serialize_entry(&t.columns[i].logical_name, value)?;
        }
        map.end()
    }
}

/// The label of an option-set column's stored value, if it has one.
pub fn option_label(index: usize, value: &Json) -> Option<&'static str> {
    let column = &table().columns[index];
    if !column.column_type.is_option_set() {
        return None;
    }
    let option = column.option(value.as_i64().and_then(|v| i32::try_from(v).ok())?)?;
    Some(option.label.as_str())
}

/// `<column>@OData.Community.Display.V1.FormattedValue`, written once per
/// column rather than once per row of every page.
pub fn formatted_value_key(index: usize) -> &'static str {
    static KEYS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        table().columns.iter().map(|c| format!("{}@{FORMATTED_VALUE}", c.logical_name)).collect()
    });
    KEYS.get(index).map_or("", String::as_str)
}
