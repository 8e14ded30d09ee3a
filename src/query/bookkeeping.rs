//! FetchXML queries of the retention bookkeeping entities
//! (`retentionconfig`, `retentionoperation`): kept apart from the table's
//! criteria, since their columns are not the table's.

use super::fetchxml::parse_document;

/// A query of one of the bookkeeping entities (`retentionconfig`,
/// `retentionoperation`): which entity, equality conditions on the columns
/// `allowed` names for it, and the `count` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookkeepingQuery {
    pub entity: String,
    pub conditions: Vec<(String, String)>,
    pub count: Option<i64>,
}

/// Reads `document` as a query of a bookkeeping entity; `Ok(None)` when its
/// entity is not one (the table's own queries go to [`super::fetchxml::parse`]).
pub fn query(
    document: &str,
    allowed: &dyn Fn(&str) -> Option<&'static [&'static str]>,
) -> Result<Option<BookkeepingQuery>, String> {
    let root = parse_document(document)?;
    let Some(entity) = root.children.iter().find(|c| c.name == "entity") else { return Ok(None) };
    let Some(name) = entity.attr("name") else { return Ok(None) };
    let Some(columns) = allowed(name) else { return Ok(None) };
    let count = match root.attr("count") {
        None => None,
        Some(c) => {
            Some(c.parse::<i64>().ok().filter(|n| (1..=5000).contains(n)).ok_or("count must be from 1 to 5000")?)
        }
    };
    let mut conditions = Vec::new();
    for child in &entity.children {
        match child.name.as_str() {
            "attribute" | "all-attributes" | "order" => {}
            "filter" if child.attr("type").is_none_or(|t| t == "and") => {
                for condition in &child.children {
                    let (Some(attribute), Some("eq"), Some(value)) =
                        (condition.attr("attribute"), condition.attr("operator"), condition.attr("value"))
                    else {
                        return Err(format!("{name} queries take only <condition attribute=… operator='eq' value=…/>"));
                    };
                    if !columns.contains(&attribute) {
                        return Err(format!("{name} can be filtered on {} only", columns.join(", ")));
                    }
                    conditions.push((attribute.to_owned(), value.to_owned()));
                }
            }
            other => return Err(format!("<{other}> is not supported in a {name} query")),
        }
    }
    Ok(Some(BookkeepingQuery { entity: name.to_owned(), conditions, count }))
}
