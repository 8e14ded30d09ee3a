//! RetrieveMultiple: one page of records matching a FetchXML query, as
//! Dataverse's `EntityCollection`, with a paging cookie for the next page
//! (keyset paging: see [`crate::query::page`]).

use serde::Serialize;
use serde_json::{Map, Value as Json};

use super::OperationError;
use super::retrieve::entity;
use crate::backend::Backend;
use crate::query::page::{PageQuery, paging_cookie};

#[derive(Debug, Clone)]
pub struct RetrieveMultiple {
    pub query: PageQuery,
    /// The FetchXML the query came from, when it came from FetchXML (a
    /// backend that forwards the message to Dataverse sends it as it is).
    pub fetch_xml: Option<String>,
    /// The most bytes of entities one response may carry (a transport's
    /// message limit); a page that would be larger is cut short, with
    /// `MoreRecords: true` and a cookie after the last row it holds.
    pub max_response_bytes: usize,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RetrieveMultipleResponse {
    pub entity_collection: EntityCollection,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct EntityCollection {
    pub entities: Vec<Map<String, Json>>,
    pub more_records: bool,
    pub paging_cookie: Option<String>,
    /// `-1` unless the query asked for `returntotalrecordcount`.
    pub total_record_count: i64,
}

pub async fn retrieve_multiple(
    backend: &Backend,
    request: &RetrieveMultiple,
) -> Result<RetrieveMultipleResponse, OperationError> {
    let asked = &request.query;
    // The order columns are read too, for the cookie, even when not asked for.
    let mut query = asked.clone();
    for o in &asked.order {
        if !query.columns.contains(&o.column) {
            query.columns.push(o.column);
        }
    }
    let rows = backend.retrieve_page(&query, asked.count + 1).await?;
    let mut more_records = rows.len() as i64 > asked.count;
    let mut entities = Vec::new();
    let mut bytes = 0usize;
    let mut last_row: Option<Vec<Json>> = None;
    for row in rows.into_iter().take(asked.count as usize) {
        let order_values: Vec<Json> = query
            .order
            .iter()
            .map(|o| query.columns.iter().position(|&c| c == o.column).map_or(Json::Null, |k| row[k].clone()))
            .collect();
        let record = entity(&asked.columns, row.into_iter().take(asked.columns.len()).collect());
        let size = serialized_size(&record) + 1;
        if bytes + size > request.max_response_bytes {
            if entities.is_empty() {
                return Err(OperationError::failed(
                    "ResponseTooLarge",
                    format!("one record is {size} bytes, more than a reply may carry; ask for fewer columns"),
                ));
            }
            more_records = true;
            break;
        }
        bytes += size;
        entities.push(record);
        last_row = Some(order_values);
    }
    let paging_cookie = last_row.filter(|_| more_records).map(|last| paging_cookie(asked.page, &asked.order, &last));
    let total_record_count = if asked.total_record_count { backend.count(&asked.criteria).await? } else { -1 };
    Ok(RetrieveMultipleResponse {
        entity_collection: EntityCollection { entities, more_records, paging_cookie, total_record_count },
    })
}

/// Bytes of a record's JSON, counted as it is serialized (a page measures
/// every record; none is kept as text).
fn serialized_size(record: &Map<String, Json>) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // Serializing a map of JSON values into memory cannot fail.
    let _ = serde_json::to_writer(&mut counter, record);
    counter.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_size_is_the_length_of_its_json() {
        let Json::Object(record) =
            serde_json::json!({"msdyn_name": "é \"quoted\"\n", "n": 12, "x": null, "nested": {"a": [1, 2]}})
        else {
            unreachable!()
        };
        assert_eq!(serialized_size(&record), serde_json::to_string(&record).unwrap().len());
    }
}
