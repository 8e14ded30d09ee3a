//! RetrieveMultiple's FetchXML: the columns (`attribute`, `all-attributes`),
//! the order, the page (`count`, `page`, `paging-cookie`) and
//! `returntotalrecordcount`, beside the criteria of [`super::fetchxml`].
//!
//! Pages are keyset pages: the order always ends with the primary key, and
//! the paging cookie carries the last row's order values, so the next page
//! starts strictly after that row. Rows inserted while a client pages
//! (ingestion goes on) never shift a page: nothing is missed or repeated.
//! Only columns that are never empty can be ordered by, so the keyset
//! comparison needs no NULL rules.

use chrono::{DateTime, Utc};
use serde_json::Value as Json;

use super::fetchxml::{
    Criteria, Dialect, Element, MAX_DOCUMENT_BYTES, Param, Predicate, criteria_of, parse_document, placeholder,
    typed_value,
};
use crate::table::table;

/// The largest page (Dataverse's limit).
pub const MAX_PAGE_SIZE: i64 = 5000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Order {
    pub column: usize,
    pub descending: bool,
}

/// A parsed RetrieveMultiple query.
#[derive(Debug, Clone)]
pub struct PageQuery {
    pub criteria: Criteria,
    /// Table column indices to return; the id is always among them.
    pub columns: Vec<usize>,
    /// The order; its last entry is the primary key.
    pub order: Vec<Order>,
    pub count: i64,
    pub page: i64,
    /// The previous page's last row, in `order`.
    pub after: Option<Vec<Param>>,
    pub total_record_count: bool,
}

/// Whether rows can be ordered by this column: it always has a value.
pub(super) fn orderable(index: usize) -> bool {
    let t = table();
    let c = &t.columns[index];
    c.stored
        && (c.logical_name == t.primary_id_attribute
            || matches!(c.logical_name.as_str(), "createdon" | "versionnumber" | "statecode")
            || c.is_required())
}

pub fn parse(document: &str, now: DateTime<Utc>) -> Result<PageQuery, String> {
    let root = parse_document(document)?;
    let criteria = criteria_of(&root, now)?;
    let t = table();
    let id = t.index_of(&t.primary_id_attribute).unwrap_or(0);
    let entity = root.children.iter().find(|c| c.name == "entity").ok_or("<fetch> must contain an <entity>")?;
    let mut columns = vec![id];
    let mut all = false;
    let mut order = Vec::new();
    for child in &entity.children {
        match child.name.as_str() {
            "all-attributes" => all = true,
            "attribute" => {
                let name = child.attr("name").ok_or("<attribute> needs a name")?;
                let index = stored_column(name)?;
                if !columns.contains(&index) {
                    columns.push(index);
                }
            }
            "order" => {
                let name = child.attr("attribute").ok_or("<order> needs an attribute")?;
                let index = stored_column(name)?;
                if !orderable(index) {
                    return Err(format!("ordering by '{name}' is not supported: it may be empty"));
                }
                let descending = match child.attr("descending") {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(other) => return Err(format!("descending='{other}' is not true or false")),
                };
                if !order.iter().any(|o: &Order| o.column == index) {
                    order.push(Order { column: index, descending });
                }
            }
            _ => {}
        }
    }
    if all || columns.len() == 1 {
        columns = t.columns.iter().enumerate().filter(|(_, c)| c.stored).map(|(i, _)| i).collect();
    }
    if !order.iter().any(|o| o.column == id) {
        order.push(Order { column: id, descending: false });
    }
    let number = |name: &str, default: i64, max: i64| -> Result<i64, String> {
        match root.attr(name) {
            None => Ok(default),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| format!("{name}='{v}' must be a whole number from 1 to {max}")),
        }
    };
    let count = number("count", MAX_PAGE_SIZE, MAX_PAGE_SIZE)?;
    let page = number("page", 1, i64::MAX / MAX_PAGE_SIZE)?;
    let after = match root.attr("paging-cookie").filter(|c| !c.is_empty()) {
        Some(cookie) => Some(parse_cookie(cookie, &order)?),
        None => None,
    };
    let total_record_count = root.attr("returntotalrecordcount") == Some("true");
    Ok(PageQuery { criteria, columns, order, count, page, after, total_record_count })
}

fn stored_column(name: &str) -> Result<usize, String> {
    let t = table();
    t.index_of(name)
        .filter(|&i| t.columns[i].stored)
        .ok_or_else(|| format!("'{}' is not a column of {}", name.chars().take(64).collect::<String>(), t.logical_name))
}

/// `<cookie page="N"><column last="value"/>…</cookie>`: the last row of page
/// N, one element per order column, in order.
pub fn paging_cookie(page: i64, order: &[Order], last_row: &[Json]) -> String {
    let t = table();
    let mut cookie = format!("<cookie page=\"{page}\">");
    for (o, value) in order.iter().zip(last_row) {
        let text = match value {
            Json::String(s) => s.clone(),
            other => other.to_string(),
        };
        cookie.push_str(&format!("<{} last=\"{}\" />", t.columns[o.column].logical_name, escape(&text)));
    }
    cookie.push_str("</cookie>");
    cookie
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&apos;")
}

pub(super) fn parse_cookie(cookie: &str, order: &[Order]) -> Result<Vec<Param>, String> {
    if cookie.len() > MAX_DOCUMENT_BYTES {
        return Err("paging-cookie is too long".into());
    }
    let root: Element = parse_document(cookie).map_err(|e| format!("paging-cookie: {e}"))?;
    let t = table();
    if root.name != "cookie" || root.children.len() != order.len() {
        return Err("paging-cookie does not belong to this query's order".into());
    }
    root.children
        .iter()
        .zip(order)
        .map(|(element, o)| {
            let column = &t.columns[o.column];
            if element.name != column.logical_name {
                return Err("paging-cookie does not belong to this query's order".to_owned());
            }
            let last = element.attr("last").ok_or("paging-cookie: a column without its last value")?;
            typed_value(column, last).map_err(|e| format!("paging-cookie: {e}"))
        })
        .collect()
}

impl PageQuery {
    /// `ORDER BY` for the query's order.
    pub fn order_by(&self) -> String {
        let t = table();
        self.order
            .iter()
            .map(|o| format!("{} {}", t.columns[o.column].logical_name, if o.descending { "DESC" } else { "ASC" }))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The rows after the cookie's row in the query's order:
    /// `(a > va) OR (a = va AND b > vb) OR …` (`<` where descending).
    pub fn keyset(&self, dialect: Dialect, first_param: usize) -> Predicate {
        let t = table();
        let Some(after) = &self.after else {
            return Predicate { sql: if dialect == Dialect::Sqlite { "1" } else { "TRUE" }.into(), params: Vec::new() };
        };
        let mut params = Vec::new();
        let mut alternatives = Vec::new();
        for k in 0..self.order.len() {
            let mut terms = Vec::new();
            for (j, (o, value)) in self.order.iter().zip(after).enumerate().take(k + 1) {
                let name = &t.columns[o.column].logical_name;
                let op = if j < k {
                    "="
                } else if o.descending {
                    "<"
                } else {
                    ">"
                };
                let n = first_param + params.len();
                terms.push(format!("{name} {op} {}", placeholder(dialect, n, value)));
                params.push(value.clone());
            }
            alternatives.push(format!("({})", terms.join(" AND ")));
        }
        Predicate { sql: format!("({})", alternatives.join(" OR ")), params }
    }

    /// Rows skipped before the page when no cookie says where the last page
    /// ended (Dataverse's `page` without `paging-cookie`).
    pub fn offset(&self) -> i64 {
        if self.after.is_some() { 0 } else { (self.page - 1).saturating_mul(self.count) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(attributes: &str) -> String {
        format!("<fetch count='2'><entity name='msdyn_copilotinteraction'>{attributes}</entity></fetch>")
    }

    #[test]
    fn the_order_ends_with_the_id_and_cookies_round_trip() {
        let q =
            parse(&query("<attribute name='msdyn_name'/><order attribute='createdon' descending='true'/>"), Utc::now())
                .unwrap();
        let t = table();
        assert_eq!(q.columns.len(), 2, "the id and the asked column");
        assert_eq!(
            q.order.last().map(|o| t.columns[o.column].logical_name.as_str()),
            Some("msdyn_copilotinteractionid")
        );
        let cookie = paging_cookie(
            1,
            &q.order,
            &[Json::from("2024-06-01T00:00:00.000Z"), Json::from("0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d")],
        );
        let document = format!(
            "<fetch count='2' page='2' paging-cookie='{}'><entity name='msdyn_copilotinteraction'><order attribute='createdon' descending='true'/></entity></fetch>",
            escape(&cookie)
        );
        let next = parse(&document, Utc::now()).unwrap();
        assert_eq!(next.after.as_ref().map(Vec::len), Some(2));
        let keyset = next.keyset(Dialect::Postgres, 1);
        assert_eq!(
            keyset.sql,
            "((createdon < $1::timestamptz) OR (createdon = $2::timestamptz AND msdyn_copilotinteractionid > $3::uuid))"
        );
        assert_eq!(next.offset(), 0, "a cookie replaces the offset");
    }

    #[test]
    fn unorderable_columns_bad_pages_and_foreign_cookies_are_refused() {
        assert!(
            parse(&query("<order attribute='msdyn_clienttimestamp'/>"), Utc::now())
                .unwrap_err()
                .contains("may be empty")
        );
        let big = "<fetch count='5001'><entity name='msdyn_copilotinteraction'/></fetch>";
        assert!(parse(big, Utc::now()).unwrap_err().contains("count"));
        let foreign = "<fetch paging-cookie='&lt;cookie page=\"1\"&gt;&lt;createdon last=\"x\"/&gt;&lt;/cookie&gt;'><entity name='msdyn_copilotinteraction'/></fetch>";
        assert!(parse(foreign, Utc::now()).unwrap_err().contains("paging-cookie"));
    }
}
