//! FetchXML criteria (`fetch / entity / filter / condition`), parsed by a small
//! strict XML reader, checked against the table definition and compiled to a
//! SQL predicate whose every value is a bound parameter. Column names in the
//! SQL come from the table definition, never from the document.
//!
//! Hostile input is refused up front: documents over [`MAX_DOCUMENT_BYTES`],
//! nesting over [`MAX_DEPTH`], more than [`MAX_CONDITIONS`] conditions, any
//! DOCTYPE/ENTITY declaration, and entity references other than the five
//! predefined ones and numeric character references.

use chrono::{DateTime, Duration, Months, NaiveDate, Utc};
use uuid::Uuid;

use crate::normalize::{parse_datetime, parse_guid};
use crate::table::{Column, ColumnType, table};

pub const MAX_DOCUMENT_BYTES: usize = 64 * 1024;
pub const MAX_DEPTH: usize = 32;
pub const MAX_CONDITIONS: usize = 256;
pub(super) const MAX_IN_VALUES: usize = 1000;

/// A parsed XML element (attributes and children; text content only for `<value>`).
#[derive(Debug, Clone)]
pub(super) struct Element {
    pub(super) name: String,
    attributes: Vec<(String, String)>,
    pub(super) children: Vec<Element>,
    text: String,
}

impl Element {
    pub(super) fn attr(&self, name: &str) -> Option<&str> {
        self.attributes.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

struct Reader<'a> {
    input: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }
    fn starts_with(&self, s: &str) -> bool {
        self.input[self.pos..].starts_with(s.as_bytes())
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|b| b.is_ascii_whitespace()) {
            self.pos += 1;
        }
    }
    fn expect(&mut self, s: &str) -> Result<(), String> {
        if self.starts_with(s) {
            self.pos += s.len();
            Ok(())
        } else {
            Err(format!("expected '{s}' at byte {}", self.pos))
        }
    }
    fn name(&mut self) -> Result<String, String> {
        let start = self.pos;
        while self.peek().is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.')) {
            self.pos += 1;
        }
        if start == self.pos {
            return Err(format!("expected a name at byte {}", self.pos));
        }
        Ok(String::from_utf8_lossy(&self.input[start..self.pos]).into_owned())
    }
    /// Skips the XML declaration, comments and whitespace; refuses DTDs.
    fn skip_misc(&mut self) -> Result<(), String> {
        loop {
            self.skip_ws();
            if self.starts_with("<?xml") {
                let end = find(&self.input[self.pos..], b"?>").ok_or("unterminated XML declaration")?;
                self.pos += end + 2;
            } else if self.starts_with("<!--") {
                let end = find(&self.input[self.pos + 4..], b"-->").ok_or("unterminated comment")?;
                self.pos += 4 + end + 3;
            } else if self.starts_with("<!") || self.starts_with("<?") {
                return Err("DOCTYPE, ENTITY and processing instructions are not allowed".into());
            } else {
                return Ok(());
            }
        }
    }
    fn element(&mut self, depth: usize) -> Result<Element, String> {
        if depth > MAX_DEPTH {
            return Err(format!("nesting deeper than {MAX_DEPTH} levels"));
        }
        self.expect("<")?;
        let name = self.name()?;
        let mut attributes = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(b'/') => {
                    self.expect("/>")?;
                    return Ok(Element { name, attributes, children: Vec::new(), text: String::new() });
                }
                Some(b'>') => {
                    self.pos += 1;
                    break;
                }
                Some(_) => {
                    let key = self.name()?;
                    self.skip_ws();
                    self.expect("=")?;
                    self.skip_ws();
                    let quote =
                        self.peek().filter(|q| *q == b'"' || *q == b'\'').ok_or("attribute values must be quoted")?;
                    self.pos += 1;
                    let end = self.input[self.pos..]
                        .iter()
                        .position(|b| *b == quote)
                        .ok_or("unterminated attribute value")?;
                    let raw = &self.input[self.pos..self.pos + end];
                    self.pos += end + 1;
                    if attributes.iter().any(|(k, _)| *k == key) {
                        return Err(format!("attribute '{key}' given twice"));
                    }
                    attributes.push((key, unescape(raw)?));
                }
                None => return Err("unexpected end of document".into()),
            }
        }
        let mut children = Vec::new();
        let mut text = String::new();
        loop {
            if self.starts_with("<!--") {
                let end = find(&self.input[self.pos + 4..], b"-->").ok_or("unterminated comment")?;
                self.pos += 4 + end + 3;
            } else if self.starts_with("</") {
                self.pos += 2;
                let closing = self.name()?;
                if closing != name {
                    return Err(format!("</{closing}> closes <{name}>"));
                }
                self.skip_ws();
                self.expect(">")?;
                return Ok(Element { name, attributes, children, text });
            } else if self.starts_with("<!") || self.starts_with("<?") {
                return Err("DOCTYPE, ENTITY, CDATA and processing instructions are not allowed".into());
            } else if self.peek() == Some(b'<') {
                children.push(self.element(depth + 1)?);
            } else if self.peek().is_some() {
                let end = self.input[self.pos..].iter().position(|b| *b == b'<').ok_or("unexpected end of document")?;
                text.push_str(&unescape(&self.input[self.pos..self.pos + end])?);
                self.pos += end;
            } else {
                return Err(format!("<{name}> is not closed"));
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Resolves the five predefined entities and numeric references; anything
/// else (a custom entity) is refused, so entity expansion cannot happen.
fn unescape(raw: &[u8]) -> Result<String, String> {
    let s = std::str::from_utf8(raw).map_err(|_| "the document is not UTF-8".to_owned())?;
    if !s.contains('&') {
        return Ok(s.to_owned());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let end = rest[i..].find(';').ok_or("unterminated entity reference")?;
        let entity = &rest[i + 1..i + end];
        let c = match entity {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "apos" => '\'',
            "quot" => '"',
            e if e.starts_with("#x") => {
                u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32).ok_or("bad character reference")?
            }
            e if e.starts_with('#') => {
                e[1..].parse::<u32>().ok().and_then(char::from_u32).ok_or("bad character reference")?
            }
            other => return Err(format!("entity '&{other};' is not allowed")),
        };
        out.push(c);
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Comparison operators of the supported subset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    Null,
    NotNull,
    Like,
    NotLike,
    OnOrBefore,
    OnOrAfter,
    OlderThanXDays,
    OlderThanXHours,
    OlderThanXMonths,
    LastXDays,
}

impl Operator {
    fn parse(s: &str) -> Option<Operator> {
        Some(match s {
            "eq" => Operator::Eq,
            "ne" | "neq" => Operator::Ne,
            "lt" => Operator::Lt,
            "le" => Operator::Le,
            "gt" => Operator::Gt,
            "ge" => Operator::Ge,
            "in" => Operator::In,
            "not-in" => Operator::NotIn,
            "null" => Operator::Null,
            "not-null" => Operator::NotNull,
            "like" => Operator::Like,
            "not-like" => Operator::NotLike,
            "on-or-before" => Operator::OnOrBefore,
            "on-or-after" => Operator::OnOrAfter,
            "olderthan-x-days" => Operator::OlderThanXDays,
            "olderthan-x-hours" => Operator::OlderThanXHours,
            "olderthan-x-months" => Operator::OlderThanXMonths,
            "last-x-days" => Operator::LastXDays,
            _ => return None,
        })
    }

    fn is_relative_date(self) -> bool {
        matches!(
            self,
            Operator::OlderThanXDays | Operator::OlderThanXHours | Operator::OlderThanXMonths | Operator::LastXDays
        )
    }
}

/// A bound parameter of a compiled predicate.
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Text(String),
    Int(i64),
    Guid(Uuid),
    DateTime(DateTime<Utc>),
}

#[derive(Debug, Clone)]
pub struct Condition {
    pub column: usize,
    pub operator: Operator,
    pub values: Vec<Param>,
}

#[derive(Debug, Clone)]
pub enum Filter {
    And(Vec<Filter>),
    Or(Vec<Filter>),
    /// OData's `not`; FetchXML has no negation of a group.
    Not(Box<Filter>),
    Condition(Condition),
}

/// Validated criteria, ready to compile.
#[derive(Debug, Clone)]
pub struct Criteria {
    pub filter: Option<Filter>,
    /// `<fetch datasource="retained">`.
    pub retained: bool,
}

/// Parses and validates a FetchXML document against the table definition.
/// `now` anchors relative dates (`olderthan-x-days`, …).
pub fn parse(document: &str, now: DateTime<Utc>) -> Result<Criteria, String> {
    criteria_of(&parse_document(document)?, now)
}

/// Reads a whole FetchXML document (or a paging cookie) into its root element.
pub(super) fn parse_document(document: &str) -> Result<Element, String> {
    if document.len() > MAX_DOCUMENT_BYTES {
        return Err(format!("FetchXml is {} bytes; the limit is {MAX_DOCUMENT_BYTES}", document.len()));
    }
    let mut reader = Reader { input: document.as_bytes(), pos: 0 };
    reader.skip_misc()?;
    let root = reader.element(0)?;
    reader.skip_misc()?;
    if reader.pos != reader.input.len() {
        return Err(format!("content after the <{}> element", root.name));
    }
    Ok(root)
}

/// The criteria of a parsed `<fetch>`: its datasource and filters.
pub(super) fn criteria_of(root: &Element, now: DateTime<Utc>) -> Result<Criteria, String> {
    if root.name != "fetch" {
        return Err(format!("the root element must be <fetch>, not <{}>", root.name));
    }
    let retained = root.attr("datasource") == Some("retained");
    let entities: Vec<&Element> = root.children.iter().filter(|c| c.name == "entity").collect();
    let [entity] = entities.as_slice() else {
        return Err("<fetch> must contain exactly one <entity>".into());
    };
    let t = table();
    match entity.attr("name") {
        Some(name) if name == t.logical_name => {}
        Some(name) => return Err(format!("entity '{name}' is not supported; only '{}'", t.logical_name)),
        None => return Err("<entity> needs a name attribute".into()),
    }
    let mut conditions = 0usize;
    let mut filters = Vec::new();
    for child in &entity.children {
        match child.name.as_str() {
            "filter" => filters.push(parse_filter(child, now, &mut conditions)?),
            "attribute" | "all-attributes" | "order" => {}
            other => return Err(format!("<{other}> is not supported inside <entity>")),
        }
    }
    let filter = match filters.len() {
        0 => None,
        1 => filters.pop(),
        _ => Some(Filter::And(filters)),
    };
    Ok(Criteria { filter, retained })
}

fn parse_filter(element: &Element, now: DateTime<Utc>, conditions: &mut usize) -> Result<Filter, String> {
    let mut parts = Vec::new();
    for child in &element.children {
        match child.name.as_str() {
            "condition" => {
                *conditions += 1;
                if *conditions > MAX_CONDITIONS {
                    return Err(format!("more than {MAX_CONDITIONS} conditions"));
                }
                parts.push(Filter::Condition(parse_condition(child, now)?));
            }
            "filter" => parts.push(parse_filter(child, now, conditions)?),
            other => return Err(format!("<{other}> is not supported inside <filter>")),
        }
    }
    match element.attr("type").unwrap_or("and") {
        "and" => Ok(Filter::And(parts)),
        "or" => Ok(Filter::Or(parts)),
        other => Err(format!("filter type '{other}' is not 'and' or 'or'")),
    }
}

fn parse_condition(element: &Element, now: DateTime<Utc>) -> Result<Condition, String> {
    let attribute = element.attr("attribute").ok_or("<condition> needs an attribute")?;
    if element.attr("entityname").is_some() {
        return Err("conditions on linked entities are not supported".into());
    }
    let op_text = element.attr("operator").ok_or("<condition> needs an operator")?;
    let mut raw: Vec<String> = element.attr("value").map(|v| vec![v.to_owned()]).unwrap_or_default();
    for child in &element.children {
        if child.name != "value" {
            return Err(format!("<{}> is not supported inside <condition>", child.name));
        }
        raw.push(child.text.clone());
    }
    condition_of(attribute, op_text, raw, now)
}

/// One condition: a column, a FetchXML operator and its raw values, typed
/// and checked against the column (shared with OData's query functions).
pub(super) fn condition_of(
    attribute: &str,
    op_text: &str,
    raw: Vec<String>,
    now: DateTime<Utc>,
) -> Result<Condition, String> {
    let t = table();
    let column_index = t
        .index_of(attribute)
        .filter(|&i| t.columns[i].stored)
        .ok_or_else(|| format!("'{}' is not a column of {}", truncate(attribute), t.logical_name))?;
    let column = &t.columns[column_index];
    let operator =
        Operator::parse(op_text).ok_or_else(|| format!("operator '{}' is not supported", truncate(op_text)))?;
    let datetime = column.column_type == ColumnType::Datetime;
    let text = column.column_type.is_text();
    let type_name = format!("{:?}", column.column_type).to_lowercase();
    let wrong_type = || format!("operator '{op_text}' is not valid for '{attribute}' ({type_name})");
    let values = match operator {
        Operator::Null | Operator::NotNull => {
            if !raw.is_empty() {
                return Err(format!("operator '{op_text}' takes no value"));
            }
            Vec::new()
        }
        Operator::Like | Operator::NotLike => {
            if !text {
                return Err(wrong_type());
            }
            vec![Param::Text(single(&raw, op_text)?.to_owned())]
        }
        Operator::OnOrBefore | Operator::OnOrAfter => {
            if !datetime {
                return Err(wrong_type());
            }
            let v = single(&raw, op_text)?;
            let date = NaiveDate::parse_from_str(v.get(..10).unwrap_or(v), "%Y-%m-%d")
                .map_err(|_| format!("'{}' is not a date (YYYY-MM-DD) for '{attribute}'", truncate(v)))?;
            let midnight = date.and_hms_opt(0, 0, 0).map(|d| d.and_utc()).ok_or("bad date")?;
            // on-or-before D means "before the start of D+1".
            let bound = if operator == Operator::OnOrBefore { midnight + Duration::days(1) } else { midnight };
            vec![Param::DateTime(bound)]
        }
        op if op.is_relative_date() => {
            if !datetime {
                return Err(wrong_type());
            }
            let v = single(&raw, op_text)?;
            let n: u32 = v
                .trim()
                .parse()
                .ok()
                .filter(|n| *n <= 100_000)
                .ok_or_else(|| format!("'{}' is not a whole number for operator '{op_text}'", truncate(v)))?;
            let at = match op {
                Operator::OlderThanXHours => now - Duration::hours(i64::from(n)),
                Operator::OlderThanXMonths => now.checked_sub_months(Months::new(n)).ok_or("too many months")?,
                _ => now - Duration::days(i64::from(n)),
            };
            if op == Operator::LastXDays {
                vec![Param::DateTime(at), Param::DateTime(now)]
            } else {
                vec![Param::DateTime(at)]
            }
        }
        Operator::In | Operator::NotIn => {
            if raw.is_empty() || raw.len() > MAX_IN_VALUES {
                return Err(format!("operator '{op_text}' needs 1 to {MAX_IN_VALUES} <value> elements"));
            }
            raw.iter().map(|v| typed_value(column, v)).collect::<Result<_, _>>()?
        }
        _ => vec![typed_value(column, single(&raw, op_text)?)?],
    };
    Ok(Condition { column: column_index, operator, values })
}

fn single<'v>(raw: &'v [String], op: &str) -> Result<&'v str, String> {
    match raw {
        [v] => Ok(v),
        [] => Err(format!("operator '{op}' needs a value")),
        _ => Err(format!("operator '{op}' takes one value")),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A condition value parsed as the column's type.
pub(super) fn typed_value(column: &Column, v: &str) -> Result<Param, String> {
    let bad =
        || format!("'{}' is not a valid {:?} value for '{}'", truncate(v), column.column_type, column.logical_name);
    Ok(match column.column_type {
        ColumnType::String | ColumnType::Memo => Param::Text(v.to_owned()),
        ColumnType::Uniqueidentifier | ColumnType::Lookup => Param::Guid(parse_guid(v).ok_or_else(bad)?),
        ColumnType::Datetime => Param::DateTime(parse_datetime(v).ok_or_else(bad)?),
        ColumnType::Picklist | ColumnType::State | ColumnType::Status => {
            let value = v.trim().parse::<i32>().ok().or_else(|| column.option_by_label(v)).ok_or_else(bad)?;
            if column.option(value).is_none() {
                return Err(format!("{value} is not an option of '{}'", column.logical_name));
            }
            Param::Int(i64::from(value))
        }
        ColumnType::Integer | ColumnType::Bigint => {
            let n: i64 = v.trim().parse().map_err(|_| bad())?;
            if column.min_value.is_some_and(|m| n < m) || column.max_value.is_some_and(|m| n > m) {
                return Err(format!("{n} is out of range for '{}'", column.logical_name));
            }
            Param::Int(n)
        }
    })
}

pub(super) use super::compile::placeholder;
pub use super::compile::{Dialect, Predicate};

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).single().unwrap()
    }

    fn doc(filter: &str) -> String {
        format!("<fetch><entity name='msdyn_copilotinteraction'>{filter}</entity></fetch>")
    }

    fn cond(attr: &str, op: &str, value: &str) -> String {
        doc(&format!("<filter><condition attribute='{attr}' operator='{op}' value='{value}'/></filter>"))
    }

    #[test]
    fn an_empty_or_matches_nothing_and_empty_filters_are_detected() {
        let empty_or = parse(&doc("<filter type='or'></filter>"), now()).unwrap();
        assert_eq!(empty_or.compile(Dialect::Postgres, 1).sql, "FALSE");
        assert_eq!(empty_or.compile(Dialect::Sqlite, 1).sql, "0");
        assert!(!empty_or.matches_everything());
        assert!(!empty_or.has_empty_and());

        let empty_and = parse(&doc("<filter></filter>"), now()).unwrap();
        assert!(empty_and.has_empty_and() && empty_and.matches_everything());
        let nested = parse(
            &doc("<filter type='or'><filter/><condition attribute='msdyn_name' operator='null'/></filter>"),
            now(),
        )
        .unwrap();
        assert!(nested.has_empty_and() && nested.matches_everything());

        let none = parse(&doc(""), now()).unwrap();
        assert!(none.matches_everything() && !none.has_empty_and());
        let real = parse(&cond("msdyn_name", "eq", "x"), now()).unwrap();
        assert!(!real.matches_everything() && !real.has_empty_and());
        let or_of_conditions = parse(&doc("<filter type='or'><condition attribute='msdyn_name' operator='null'/><condition attribute='msdyn_name' operator='not-null'/></filter>"), now()).unwrap();
        assert!(!or_of_conditions.matches_everything());
    }

    #[test]
    fn the_spec_example_compiles_to_a_bound_predicate() {
        let c = parse(&cond("createdon", "olderthan-x-days", "90"), now()).unwrap();
        let p = c.compile(Dialect::Postgres, 1);
        assert_eq!(p.sql, "(createdon < $1::timestamptz)");
        assert_eq!(p.params, vec![Param::DateTime(now() - Duration::days(90))]);
    }

    #[test]
    fn every_operator_is_supported() {
        let cases = [
            ("msdyn_name", "eq", "x", "lower(msdyn_name) = lower(?3)"),
            ("msdyn_name", "ne", "x", "lower(msdyn_name) <> lower(?3)"),
            ("importsequencenumber", "lt", "5", "importsequencenumber < ?3"),
            ("importsequencenumber", "le", "5", "importsequencenumber <= ?3"),
            ("importsequencenumber", "gt", "5", "importsequencenumber > ?3"),
            ("importsequencenumber", "ge", "5", "importsequencenumber >= ?3"),
            ("msdyn_name", "like", "Thumbs%", "msdyn_name LIKE ?3 ESCAPE '\\'"),
            ("msdyn_name", "not-like", "Thumbs%", "msdyn_name NOT LIKE ?3 ESCAPE '\\'"),
            ("createdon", "on-or-before", "2024-01-31", "createdon < ?3"),
            ("createdon", "on-or-after", "2024-01-01", "createdon >= ?3"),
            ("createdon", "olderthan-x-days", "30", "createdon < ?3"),
            ("createdon", "olderthan-x-hours", "12", "createdon < ?3"),
            ("createdon", "olderthan-x-months", "6", "createdon < ?3"),
            ("createdon", "last-x-days", "7", "(createdon >= ?3 AND createdon <= ?4)"),
        ];
        for (attr, op, value, sql) in cases {
            let p = parse(&cond(attr, op, value), now())
                .unwrap_or_else(|e| panic!("{op}: {e}"))
                .compile(Dialect::Sqlite, 3);
            assert_eq!(p.sql, format!("({sql})"), "{op}");
        }
        let null =
            parse(&doc("<filter><condition attribute='msdyn_interactiondataid' operator='null'/></filter>"), now())
                .unwrap();
        assert_eq!(null.compile(Dialect::Sqlite, 1).sql, "(msdyn_interactiondataid IS NULL)");
        let not_null =
            parse(&doc("<filter><condition attribute='msdyn_interactiondataid' operator='not-null'/></filter>"), now())
                .unwrap();
        assert_eq!(not_null.compile(Dialect::Sqlite, 1).sql, "(msdyn_interactiondataid IS NOT NULL)");
        let in_list = parse(
            &doc("<filter><condition attribute='msdyn_interactiontype' operator='in'><value>100230301</value><value>ThumbsDown</value></condition></filter>"),
            now(),
        )
        .unwrap()
        .compile(Dialect::Postgres, 1);
        assert_eq!(
            in_list.sql,
            "((msdyn_interactiontype IS NOT NULL AND msdyn_interactiontype IN ($1::bigint, $2::bigint)))"
        );
        assert_eq!(in_list.params, vec![Param::Int(100230301), Param::Int(100230302)]);
        let not_in = parse(
            &doc("<filter><condition attribute='msdyn_scenariotype' operator='not-in'><value>100230201</value></condition></filter>"),
            now(),
        )
        .unwrap()
        .compile(Dialect::Postgres, 1);
        assert!(not_in.sql.contains("NOT IN ($1::bigint)"));
    }

    #[test]
    fn on_or_before_includes_the_whole_day() {
        let p = parse(&cond("createdon", "on-or-before", "2024-01-31"), now()).unwrap().compile(Dialect::Postgres, 1);
        assert_eq!(p.params, vec![Param::DateTime(Utc.with_ymd_and_hms(2024, 2, 1, 0, 0, 0).single().unwrap())]);
    }

    #[test]
    fn nested_filters_keep_their_logic() {
        let d = doc("<filter type='and'>
               <condition attribute='createdon' operator='olderthan-x-days' value='90'/>
               <filter type='or'>
                 <condition attribute='msdyn_interactiontype' operator='eq' value='ThumbsUp'/>
                 <condition attribute='msdyn_interactiontype' operator='eq' value='100230302'/>
               </filter>
             </filter>");
        let p = parse(&d, now()).unwrap().compile(Dialect::Sqlite, 1);
        assert_eq!(p.sql, "(createdon < ?1 AND (msdyn_interactiontype = ?2 OR msdyn_interactiontype = ?3))");
    }

    #[test]
    fn validation_errors_are_clear() {
        let cases = [
            (cond("msdyn_nope", "eq", "x"), "not a column"),
            (cond("createdby", "eq", "x"), "not a column"),
            (cond("msdyn_name", "olderthan-x-days", "3"), "not valid for"),
            (cond("createdon", "like", "2024%"), "not valid for"),
            (cond("createdon", "eq", "yesterday"), "not a valid"),
            (cond("importsequencenumber", "eq", "abc"), "not a valid"),
            (cond("importsequencenumber", "eq", "99999999999"), "out of range"),
            (cond("msdyn_interactiontype", "eq", "Sideways"), "not a valid"),
            (cond("msdyn_interactiontype", "eq", "42"), "not an option"),
            (cond("msdyn_copilotinteractionid", "eq", "not-a-guid"), "not a valid"),
            (cond("createdon", "olderthan-x-days", "-3"), "whole number"),
            (cond("msdyn_name", "between", "x"), "not supported"),
            ("<fetch><entity name='account'/></fetch>".into(), "entity 'account'"),
            ("<fetch/>".into(), "exactly one <entity>"),
            ("<query/>".into(), "root element"),
            (doc("<filter type='xor'/>"), "not 'and' or 'or'"),
            (doc("<link-entity name='x'/>"), "not supported"),
            ("<fetch><entity name='msdyn_copilotinteraction'>".into(), "not closed"),
        ];
        for (d, needle) in cases {
            let err = parse(&d, now()).expect_err(&d);
            assert!(err.contains(needle), "{d}: '{err}' lacks '{needle}'");
        }
    }

    #[test]
    fn hostile_documents_are_refused() {
        let entity_bomb = "<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;'>]><fetch><entity name='msdyn_copilotinteraction'><filter><condition attribute='msdyn_name' operator='eq' value='&lol2;'/></filter></entity></fetch>";
        assert!(parse(entity_bomb, now()).unwrap_err().contains("DOCTYPE"));
        let custom_entity = cond("msdyn_name", "eq", "&xxe;");
        assert!(parse(&custom_entity, now()).unwrap_err().contains("not allowed"));
        let deep = format!(
            "<fetch><entity name='msdyn_copilotinteraction'>{}{}</entity></fetch>",
            "<filter>".repeat(10_000),
            "</filter>".repeat(10_000)
        );
        assert!(parse(&deep, now()).is_err());
        let huge = format!(
            "<fetch><entity name='msdyn_copilotinteraction'><!--{}--></entity></fetch>",
            "x".repeat(10 * 1024 * 1024)
        );
        assert!(parse(&huge, now()).unwrap_err().contains("limit"));
        let many =
            doc(&format!("<filter>{}</filter>", "<condition attribute='msdyn_name' operator='null'/>".repeat(300)));
        assert!(parse(&many, now()).unwrap_err().contains("conditions"));
    }

    #[test]
    fn injection_attempts_stay_values() {
        for value in ["' OR 1=1 --", "x'; DROP TABLE msdyn_copilotinteraction; --", "\" OR \"\"=\"", "%' OR '1'='1"] {
            let escaped = value.replace('&', "&amp;").replace('\'', "&apos;").replace('"', "&quot;");
            let p = parse(&cond("msdyn_name", "eq", &escaped), now()).unwrap().compile(Dialect::Postgres, 1);
            assert_eq!(p.sql, "(lower(msdyn_name) = lower($1::text))");
            assert_eq!(p.params, vec![Param::Text(value.to_owned())]);
        }
        // An attribute name is looked up, never pasted.
        let err = parse(&cond("msdyn_name = '' OR 1=1 --", "eq", "x"), now()).unwrap_err();
        assert!(err.contains("expected") || err.contains("not a column"), "{err}");
    }

    #[test]
    fn comments_declaration_and_entities_are_handled() {
        let d = "<?xml version='1.0' encoding='utf-8'?>\n<!-- policy --><fetch datasource=\"retained\"><entity name=\"msdyn_copilotinteraction\"><attribute name='msdyn_name'/><filter><condition attribute=\"msdyn_name\" operator=\"eq\" value=\"a &amp; b &#x263A;\"/></filter></entity></fetch>";
        let c = parse(d, now()).unwrap();
        assert!(c.retained);
        assert_eq!(c.compile(Dialect::Postgres, 1).params, vec![Param::Text("a & b ☺".into())]);
    }
}
