//! RetrieveMultiple: one page of records matching a FetchXML query, as
//! Dataverse's `EntityCollection`, with a paging cookie for the next page
//! (keyset paging: see [`crate::query::page`]).

use serde::Serialize;
use serde_json::{Map, Value as Json};

use super::OperationError;
use super::retrieve::{EntityView, entity};
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

/// One page as read: each row holds the asked columns' values, in the
/// order of `columns` (a transport that writes its own shape starts here).
#[derive(Debug, Clone)]
pub struct Page {
    pub columns: Vec<usize>,
    pub rows: Vec<Vec<Json>>,
    pub more_records: bool,
    pub paging_cookie: Option<String>,
    /// `-1` unless the query asked for `returntotalrecordcount`.
    pub total_record_count: i64,
}

pub async fn retrieve_multiple(
    backend: &Backend,
    request: &RetrieveMultiple,
) -> Result<RetrieveMultipleResponse, OperationError> {
    let page = retrieve_page(backend, request).await?;
    let entities = page.rows.into_iter().map(|row| entity(&page.columns, row)).collect();
    Ok(RetrieveMultipleResponse {
        entity_collection: EntityCollection {
            entities,
            more_records: page.more_records,
            paging_cookie: page.paging_cookie,
            total_record_count: page.total_record_count,
        },
    })
}

pub async fn retrieve_page(backend: &Backend, request: &RetrieveMultiple) -> Result<Page, OperationError> {
    let asked = &request.query;
    // The order columns are read too, for the cookie, even when not asked for.
    let mut query = asked.clone();
    for o in &asked.order {
        if !query.columns.contains(&o.column) {
            query.columns.push(o.column);
        }
    }
    let order_positions: Vec<Option<usize>> =
        query.order.iter().map(|o| query.columns.iter().position(|&c| c == o.column)).collect();
    let mut rows = backend.retrieve_page(&query, asked.count + 1).await?;
    let mut more_records = rows.len() as i64 > asked.count;
    rows.truncate(usize::try_from(asked.count).unwrap_or(0));
    let mut bytes = 0usize;
    let mut kept = 0;
    for row in &rows {
        let size = serialized_size(&EntityView {
            columns: &asked.columns,
            values: &row[..asked.columns.len().min(row.len())],
        }) + 1;
        if bytes + size > request.max_response_bytes {
            if kept == 0 {
                return Err(OperationError::failed(
                    "ResponseTooLarge",
                    format!("one record is {size} bytes, more than a reply may carry; ask for fewer columns"),
                ));
            }
            more_records = true;
            break;
        }
        bytes += size;
        kept += 1;
    }
    rows.truncate(kept);
    let paging_cookie = rows.last().filter(|_| more_records).map(|last| {
        let order_values: Vec<Json> =
            order_positions.iter().map(|p| p.and_then(|k| last.get(k)).cloned().unwrap_or(Json::Null)).collect();
        paging_cookie(asked.page, &asked.order, &order_values)
    });
    for row in &mut rows {
        row.truncate(asked.columns.len());
    }
    let total_record_count = if asked.total_record_count { backend.count(&asked.criteria).await? } else { -1 };
    Ok(Page { columns: asked.columns.clone(), rows, more_records, paging_cookie, total_record_count })
}

/// Bytes of a record's JSON, counted as it is serialized (a page measures
/// every record; none is kept as text).
fn serialized_size(record: &impl Serialize) -> usize {
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
    // Serializing JSON values into memory cannot fail.
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

    /// A page measures rows through the view; its JSON must be the entity's,
    /// labels of option sets included.
    #[test]
    fn the_entity_view_writes_the_entity() {
        let t = crate::table::table();
        let column = |name: &str| t.index_of(name).unwrap();
        let columns = [
            column("msdyn_copilotinteractionid"),
            column("msdyn_interactiontype"),
            column("msdyn_name"),
            column("statecode"),
        ];
        let values = vec![
            Json::String("8d2b6f3e-3c9f-4b8e-9a36-0c4d9d8c0001".into()),
            Json::from(100230301),
            Json::String("é \"quoted\"\n\u{1}".into()),
            Json::from(0),
        ];
        let view = serde_json::to_value(EntityView { columns: &columns, values: &values }).unwrap();
        let map = entity(&columns, values.clone());
        assert!(map.keys().any(|k| k.starts_with("msdyn_interactiontype@")), "{map:?}");
        assert_eq!(view, Json::Object(map.clone()));
        assert_eq!(
            serialized_size(&EntityView { columns: &columns, values: &values }),
            serde_json::to_string(&map).unwrap().len()
        );
    }
}
