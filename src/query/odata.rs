//! OData query options of the Web API (`$select`, `$filter`, `$orderby`,
//! `$top`, `$count`, `$skiptoken`) compiled into the same [`PageQuery`] and
//! [`Criteria`] as FetchXML, so one implementation binds every value and
//! pages every result, whichever way the query came.
//!
//! The `$filter` subset: `eq ne gt ge lt le` against literals (strings,
//! numbers, `null`, GUIDs, datetimes with or without quotes), `and`, `or`,
//! `not`, parentheses, `contains`/`startswith`/`endswith`, and the Dataverse
//! query functions `Microsoft.Dynamics.CRM.In`, `NotIn`, `Between`,
//! `NotBetween`, `LastXDays`, `OlderThanXDays`, `OlderThanXHours`,
//! `OlderThanXMonths`, `OnOrBefore`, `OnOrAfter`, `Null`, `NotNull`.

use chrono::{DateTime, Utc};

use super::fetchxml::{Condition, Criteria, Filter, MAX_CONDITIONS, MAX_DEPTH, Operator, Param, typed_value};
use super::page::{MAX_PAGE_SIZE, Order, PageQuery, orderable, parse_cookie};
use crate::table::{ColumnType, table};

/// Longest `$filter` accepted: far above what any client builds by hand,
/// and what bounds the parser's work.
pub const MAX_FILTER_BYTES: usize = 32 * 1024;
/// Tokens a `$filter` may have: room for [`MAX_CONDITIONS`] conditions.
const MAX_TOKENS: usize = 4 * MAX_CONDITIONS + 64;

/// The table column an OData property names: its logical name, or for a
/// lookup Dataverse's `_<name>_value`.
pub fn property_column(name: &str) -> Option<usize> {
    let t = table();
    let logical = name.strip_prefix('_').and_then(|n| n.strip_suffix("_value")).unwrap_or(name);
    t.index_of(logical).filter(|&i| {
        let c = &t.columns[i];
        // A lookup is named `_x_value` in the Web API, and only so.
        c.stored && ((c.column_type == ColumnType::Lookup) == (logical != name))
    })
}

/// The OData property name of a column (lookups as `_<name>_value`).
pub fn property_name(index: usize) -> &'static str {
    // Worked out once per column: a page writes one per row and column.
    static NAMES: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
        let names = table().columns.iter().map(|c| {
            if c.column_type == ColumnType::Lookup {
                format!("_{}_value", c.logical_name)
            } else {
                c.logical_name.clone()
            }
        });
        names.collect()
    });
    NAMES.get(index).map_or("", String::as_str)
}

/// The query options of one GET on the entity set, already percent-decoded.
#[derive(Debug, Default, Clone)]
pub struct QueryOptions {
    pub select: Option<String>,
    pub filter: Option<String>,
    pub orderby: Option<String>,
    pub top: Option<String>,
    pub count: Option<String>,
    pub skiptoken: Option<String>,
}

/// The compiled query, and whether `$count=true` asked for the total.
pub fn page_query(options: &QueryOptions, page_size: i64, now: DateTime<Utc>) -> Result<PageQuery, String> {
    let t = table();
    let id = t.index_of(&t.primary_id_attribute).unwrap_or(0);
    let mut columns = vec![id];
    match options.select.as_deref().map(str::trim) {
        None | Some("") | Some("*") => {
            columns = t.columns.iter().enumerate().filter(|(_, c)| c.stored).map(|(i, _)| i).collect();
        }
        Some(select) => {
            for name in select.split(',').map(str::trim) {
                let index = property_column(name).ok_or_else(|| unknown_property(name))?;
                if !columns.contains(&index) {
                    columns.push(index);
                }
            }
        }
    }
    let mut order = Vec::new();
    if let Some(orderby) = options.orderby.as_deref().filter(|o| !o.trim().is_empty()) {
        for clause in orderby.split(',') {
            let mut words = clause.split_whitespace();
            let name = words.next().ok_or("$orderby: an empty clause")?;
            let index = property_column(name).ok_or_else(|| unknown_property(name))?;
            let descending = match words.next().map(str::to_ascii_lowercase).as_deref() {
                None | Some("asc") => false,
                Some("desc") => true,
                Some(other) => return Err(format!("$orderby: '{other}' is not asc or desc")),
            };
            if words.next().is_some() {
                return Err(format!("$orderby: '{}' is not '<property> [asc|desc]'", clause.trim()));
            }
            if !orderable(index) {
                return Err(format!(
                    "$orderby: ordering by '{name}' is not supported (it may be empty); order by createdon, versionnumber, statecode, the id or a required column"
                ));
            }
            if !order.iter().any(|o: &Order| o.column == index) {
                order.push(Order { column: index, descending });
            }
        }
    }
    if !order.iter().any(|o| o.column == id) {
        order.push(Order { column: id, descending: false });
    }
    let top = match options.top.as_deref() {
        None => None,
        Some(v) => Some(
            v.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| format!("$top: '{v}' is not a whole number"))?,
        ),
    };
    let count = top.map_or(page_size, |top| top.min(page_size)).clamp(0, MAX_PAGE_SIZE);
    let total_record_count = match options.count.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(format!("$count: '{other}' is not true or false")),
    };
    let filter = match options.filter.as_deref().filter(|f| !f.trim().is_empty()) {
        Some(text) => Some(parse_filter(text, now)?),
        None => None,
    };
    let after = match options.skiptoken.as_deref() {
        Some(token) => Some(parse_cookie(token, &order).map_err(|e| format!("$skiptoken: {e}"))?),
        None => None,
    };
    Ok(PageQuery {
        criteria: Criteria { filter, retained: false },
        columns,
        order,
        count,
        page: 1,
        after,
        total_record_count,
    })
}

fn unknown_property(name: &str) -> String {
    format!(
        "Could not find a property named '{}' on type 'Microsoft.Dynamics.CRM.{}'",
        name.chars().take(64).collect::<String>(),
        table().logical_name
    )
}

/// Parses a `$filter` expression into criteria over the table.
pub fn parse_filter(text: &str, now: DateTime<Utc>) -> Result<Filter, String> {
    if text.len() > MAX_FILTER_BYTES {
        return Err(format!("$filter is longer than {MAX_FILTER_BYTES} bytes"));
    }
    let tokens = tokenize(text)?;
    let mut parser = Parser { tokens, at: 0, now, conditions: 0 };
    let filter = parser.or_expression(0)?;
    match parser.tokens.get(parser.at) {
        None => Ok(filter),
        Some(token) => Err(format!("$filter: unexpected {} after a complete expression", token.describe())),
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// A name, keyword, number, GUID, datetime or `null`/`true`/`false`.
    Word(String),
    /// A `'quoted'` or `"quoted"` string, unescaped.
    Text(String),
    Open,
    Close,
    Comma,
    Equals,
    OpenList,
    CloseList,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("'{}'", w.chars().take(64).collect::<String>()),
            Token::Text(_) => "a string".into(),
            Token::Open => "'('".into(),
            Token::Close => "')'".into(),
            Token::Comma => "','".into(),
            Token::Equals => "'='".into(),
            Token::OpenList => "'['".into(),
            Token::CloseList => "']'".into(),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | ',' | '=' | '[' | ']' => {
                chars.next();
                tokens.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    ',' => Token::Comma,
                    '=' => Token::Equals,
                    '[' => Token::OpenList,
                    _ => Token::CloseList,
                });
            }
            '\'' | '"' => {
                chars.next();
                let mut value = String::new();
                loop {
                    match chars.next() {
                        None => return Err("$filter: a string without its closing quote".into()),
                        // A doubled quote is one quote character (OData's escape).
                        Some((_, q)) if q == c => {
                            if chars.peek().map(|&(_, n)| n) == Some(c) {
                                chars.next();
                                value.push(c);
                            } else {
                                break;
                            }
                        }
                        Some((_, other)) => value.push(other),
                    }
                }
                tokens.push(Token::Text(value));
            }
            _ => {
                let mut end = start;
                while let Some(&(i, w)) = chars.peek() {
                    if w.is_whitespace() || "(),=[]'\"".contains(w) {
                        break;
                    }
                    end = i + w.len_utf8();
                    chars.next();
                }
                tokens.push(Token::Word(text[start..end].to_owned()));
            }
        }
        if tokens.len() > MAX_TOKENS {
            return Err(format!("$filter is too long: more than {MAX_TOKENS} names, values and symbols"));
        }
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    now: DateTime<Utc>,
    conditions: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn expect(&mut self, expected: Token) -> Result<(), String> {
        match self.next() {
            Some(t) if t == expected => Ok(()),
            Some(t) => Err(format!("$filter: expected {} but found {}", expected.describe(), t.describe())),
            None => Err(format!("$filter: expected {} at the end", expected.describe())),
        }
    }

    fn keyword(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(word))
    }

    fn or_expression(&mut self, depth: usize) -> Result<Filter, String> {
        if depth > MAX_DEPTH {
            return Err(format!("$filter is nested more than {MAX_DEPTH} levels deep"));
        }
        let mut parts = vec![self.and_expression(depth)?];
        while self.keyword("or") {
            self.at += 1;
            parts.push(self.and_expression(depth)?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Filter::Or(parts) })
    }

    fn and_expression(&mut self, depth: usize) -> Result<Filter, String> {
        let mut parts = vec![self.unary(depth)?];
        while self.keyword("and") {
            self.at += 1;
            parts.push(self.unary(depth)?);
        }
        Ok(if parts.len() == 1 { parts.remove(0) } else { Filter::And(parts) })
    }

    fn unary(&mut self, depth: usize) -> Result<Filter, String> {
        if self.keyword("not") {
            self.at += 1;
            return Ok(Filter::Not(Box::new(self.unary(depth + 1)?)));
        }
        if self.peek() == Some(&Token::Open) {
            self.at += 1;
            let inner = self.or_expression(depth + 1)?;
            self.expect(Token::Close)?;
            return Ok(inner);
        }
        self.conditions += 1;
        if self.conditions > MAX_CONDITIONS {
            return Err(format!("$filter has more than {MAX_CONDITIONS} conditions"));
        }
        let word = match self.next() {
            Some(Token::Word(w)) => w,
            Some(other) => return Err(format!("$filter: expected a property or function, found {}", other.describe())),
            None => return Err("$filter: an expression is missing".into()),
        };
        if self.peek() == Some(&Token::Open) {
            return self.function(&word);
        }
        self.comparison(&word)
    }

    fn column(&self, name: &str) -> Result<usize, String> {
        property_column(name).ok_or_else(|| unknown_property(name))
    }

    fn comparison(&mut self, property: &str) -> Result<Filter, String> {
        let column = self.column(property)?;
        let operator = match self.next() {
            Some(Token::Word(op)) => match op.to_ascii_lowercase().as_str() {
                "eq" => Operator::Eq,
                "ne" => Operator::Ne,
                "gt" => Operator::Gt,
                "ge" => Operator::Ge,
                "lt" => Operator::Lt,
                "le" => Operator::Le,
                _ => return Err(format!("$filter: '{op}' is not a supported operator (eq ne gt ge lt le)")),
            },
            _ => return Err(format!("$filter: '{property}' must be followed by an operator (eq ne gt ge lt le)")),
        };
        let literal = self.literal()?;
        if literal.is_none() {
            return match operator {
                Operator::Eq => Ok(condition(column, Operator::Null, Vec::new())),
                Operator::Ne => Ok(condition(column, Operator::NotNull, Vec::new())),
                _ => Err(format!("$filter: null can only be compared with eq or ne ('{property}')")),
            };
        }
        let value = typed_value(&table().columns[column], literal.as_deref().unwrap_or_default())?;
        Ok(condition(column, operator, vec![value]))
    }

    /// A literal as text (`None` for `null`).
    fn literal(&mut self) -> Result<Option<String>, String> {
        match self.next() {
            Some(Token::Text(t)) => Ok(Some(t)),
            Some(Token::Word(w)) if w == "null" => Ok(None),
            Some(Token::Word(w)) => Ok(Some(w)),
            Some(other) => Err(format!("$filter: expected a value, found {}", other.describe())),
            None => Err("$filter: a value is missing at the end".into()),
        }
    }

    fn function(&mut self, name: &str) -> Result<Filter, String> {
        self.expect(Token::Open)?;
        let lower = name.to_ascii_lowercase();
        if let Some(kind) = ["contains", "startswith", "endswith"].iter().find(|k| **k == lower) {
            let property = match self.next() {
                Some(Token::Word(w)) => w,
                _ => return Err(format!("$filter: {name}() needs a property first")),
            };
            let column = self.column(&property)?;
            if !table().columns[column].column_type.is_text() {
                return Err(format!("$filter: {name}() needs a text property; '{property}' is not"));
            }
            self.expect(Token::Comma)?;
            let value = match self.next() {
                Some(Token::Text(t)) => t,
                _ => return Err(format!("$filter: {name}() needs a quoted string second")),
            };
            self.expect(Token::Close)?;
            let escaped = escape_like(&value);
            let pattern = match *kind {
                "contains" => format!("%{escaped}%"),
                "startswith" => format!("{escaped}%"),
                _ => format!("%{escaped}"),
            };
            return Ok(condition(column, Operator::Like, vec![Param::Text(pattern)]));
        }
        let Some(function) = name.strip_prefix("Microsoft.Dynamics.CRM.") else {
            return Err(format!("$filter: the function '{name}' is not supported"));
        };
        let mut property = None;
        let mut values: Vec<String> = Vec::new();
        loop {
            let parameter = match self.next() {
                Some(Token::Word(w)) => w,
                Some(Token::Close) => break,
                _ => return Err(format!("$filter: {function}(PropertyName=…, PropertyValue(s)=…) expected")),
            };
            self.expect(Token::Equals)?;
            match parameter.as_str() {
                "PropertyName" => property = self.literal()?,
                "PropertyValue" => values.push(self.literal()?.unwrap_or_default()),
                "PropertyValues" => {
                    self.expect(Token::OpenList)?;
                    while self.peek() != Some(&Token::CloseList) {
                        values.push(self.literal()?.unwrap_or_default());
                        if self.peek() == Some(&Token::Comma) {
                            self.at += 1;
                        }
                        if values.len() > super::fetchxml::MAX_IN_VALUES {
                            return Err(format!(
                                "$filter: {function} takes at most {} values",
                                super::fetchxml::MAX_IN_VALUES
                            ));
                        }
                    }
                    self.at += 1;
                }
                other => return Err(format!("$filter: {function} has no parameter '{other}'")),
            }
            if self.peek() == Some(&Token::Comma) {
                self.at += 1;
            }
        }
        let property = property.ok_or_else(|| format!("$filter: {function} needs PropertyName"))?;
        let fetch_operator = match function {
            "In" => "in",
            "NotIn" => "not-in",
            "Between" | "NotBetween" => "between",
            "LastXDays" => "last-x-days",
            "OlderThanXDays" => "olderthan-x-days",
            "OlderThanXHours" => "olderthan-x-hours",
            "OlderThanXMonths" => "olderthan-x-months",
            "OnOrBefore" => "on-or-before",
            "OnOrAfter" => "on-or-after",
            "Null" => "null",
            "NotNull" => "not-null",
            other => return Err(format!("$filter: Microsoft.Dynamics.CRM.{other} is not supported")),
        };
        if fetch_operator == "between" {
            // Between is two comparisons; NotBetween their negation.
            let column = self.column(&property)?;
            let [low, high] = values.as_slice() else {
                return Err(format!("$filter: {function} needs PropertyValues=[low,high]"));
            };
            let c = &table().columns[column];
            let range = Filter::And(vec![
                condition(column, Operator::Ge, vec![typed_value(c, low)?]),
                condition(column, Operator::Le, vec![typed_value(c, high)?]),
            ]);
            return Ok(if function == "NotBetween" { Filter::Not(Box::new(range)) } else { range });
        }
        // The other functions are FetchXML's operators under another name:
        // the FetchXML reader types and checks their values.
        let condition = super::fetchxml::condition_of(&property, fetch_operator, values, self.now)?;
        Ok(Filter::Condition(condition))
    }
}

fn condition(column: usize, operator: Operator, values: Vec<Param>) -> Filter {
    Filter::Condition(Condition { column, operator, values })
}

/// A LIKE pattern matching `value` literally (`\` escapes the wildcards).
fn escape_like(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | '%' | '_' | '[') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::fetchxml::Dialect;

    fn compile(filter: &str) -> (String, Vec<Param>) {
        let criteria = Criteria { filter: Some(parse_filter(filter, Utc::now()).unwrap()), retained: false };
        let p = criteria.compile(Dialect::Postgres, 1);
        (p.sql, p.params)
    }

    #[test]
    fn what_the_python_builder_emits_compiles_with_every_value_bound() {
        let (sql, params) = compile(
            "(msdyn_name eq 'a''b' and not (msdyn_interactiontype eq 100230301)) or contains(msdyn_name, '50%_x')",
        );
        assert_eq!(
            sql,
            "((lower(msdyn_name) = lower($1::text) AND NOT (msdyn_interactiontype = $2::bigint)) OR msdyn_name ILIKE $3::text ESCAPE '\\')"
        );
        assert_eq!(params, vec![Param::Text("a'b".into()), Param::Int(100230301), Param::Text("%50\\%\\_x%".into())]);
        let (sql, params) = compile(
            "Microsoft.Dynamics.CRM.In(PropertyName='msdyn_interactiontype',PropertyValues=[\"100230301\",\"100230302\"]) and createdon ge 2024-05-01T10:00:00Z and _msdyn_interactiondataid_value eq null",
        );
        assert!(sql.contains("IN ($1::bigint, $2::bigint)") && sql.contains("createdon >= $3::timestamptz"), "{sql}");
        assert!(sql.contains("msdyn_interactiondataid IS NULL"), "{sql}");
        assert_eq!(params.len(), 3);
    }

    #[test]
    fn between_last_x_days_and_null_functions_compile() {
        let (sql, _) = compile(
            "Microsoft.Dynamics.CRM.Between(PropertyName='createdon',PropertyValues=[\"2024-01-01\",\"2024-02-01\"])",
        );
        assert_eq!(sql, "(createdon >= $1::timestamptz AND createdon <= $2::timestamptz)");
        let (sql, params) = compile("Microsoft.Dynamics.CRM.LastXDays(PropertyName='createdon',PropertyValue=3)");
        assert!(sql.contains(">=") && params.len() == 2, "{sql}");
        let (sql, _) = compile("msdyn_name ne null");
        assert_eq!(sql, "msdyn_name IS NOT NULL");
    }

    #[test]
    fn bad_filters_get_a_clear_reason_and_never_panic() {
        for (filter, expected) in [
            ("nosuch eq 1", "Could not find a property named 'nosuch'"),
            ("msdyn_name eq", "a value is missing"),
            ("msdyn_name like 'x'", "not a supported operator"),
            ("(msdyn_name eq 'x'", "expected ')'"),
            ("msdyn_name eq 'x' garbage", "unexpected"),
            ("msdyn_interactiontype eq 'NotAnOption'", "not a valid"),
            ("createdon gt null", "null can only be compared"),
            ("contains(createdon, 'x')", "needs a text property"),
            ("Microsoft.Dynamics.CRM.Above(PropertyName='x')", "not supported"),
            ("msdyn_name eq 'unterminated", "closing quote"),
            ("MSDYN_NAME eq 'x'", "Could not find a property"),
            ("msdyn_interactiondataid eq null", "Could not find a property"),
        ] {
            let error = parse_filter(filter, Utc::now()).map(|_| ()).unwrap_err();
            assert!(error.contains(expected), "{filter}: {error}");
        }
        let deep = format!("{}msdyn_name eq 'x'{}", "(".repeat(100), ")".repeat(100));
        assert!(parse_filter(&deep, Utc::now()).unwrap_err().contains("nested"));
        let many = vec!["msdyn_name eq 'x'"; MAX_CONDITIONS + 1].join(" or ");
        let e = parse_filter(&many, Utc::now()).unwrap_err();
        assert!(e.contains("conditions") || e.contains("too long"), "{e}");
        let parens = format!("{}msdyn_name eq 'x'{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(parse_filter(&parens, Utc::now()).unwrap_err().contains("too long"));
    }

    #[test]
    fn select_orderby_top_and_skiptoken_make_a_keyset_page() {
        let options = QueryOptions {
            select: Some("msdyn_name,_msdyn_interactiondataid_value".into()),
            orderby: Some("createdon desc".into()),
            top: Some("10".into()),
            count: Some("true".into()),
            ..QueryOptions::default()
        };
        let q = page_query(&options, 5000, Utc::now()).unwrap();
        assert_eq!(q.columns.len(), 3);
        assert_eq!(q.count, 10);
        assert!(q.total_record_count);
        assert_eq!(q.order.len(), 2, "the id ends the order");
        let cookie = crate::query::page::paging_cookie(
            1,
            &q.order,
            &[serde_json::json!("2024-05-01T10:00:00Z"), serde_json::json!(uuid::Uuid::new_v4().to_string())],
        );
        let next = page_query(&QueryOptions { skiptoken: Some(cookie), ..options.clone() }, 5000, Utc::now()).unwrap();
        assert!(next.after.is_some());
        let bad = QueryOptions { orderby: Some("msdyn_interactiondataid desc".into()), ..QueryOptions::default() };
        assert!(page_query(&bad, 5000, Utc::now()).is_err());
    }
}
