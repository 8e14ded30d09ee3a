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
        let size = serde_json::to_string(&record).map_or(0, |s| s.len()) + 1;
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
