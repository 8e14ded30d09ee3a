//! Criteria compiled to SQL: a predicate with numbered placeholders and
//! the values to bind, in the PostgreSQL or SQLite dialect. Column names come
//! only from the table definition; every value is a bound parameter.

use super::fetchxml::{Criteria, Filter, Operator, Param};
use crate::table::table;

/// SQL placeholder style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// A compiled predicate: SQL text with numbered placeholders starting after
/// `first_param - 1`, and the values to bind, in order.
#[derive(Debug, Clone)]
pub struct Predicate {
    pub sql: String,
    pub params: Vec<Param>,
}

impl Criteria {
    /// True when some `<filter type="and">` has no conditions: it would
    /// compile to TRUE, which destructive messages refuse.
    pub fn has_empty_and(&self) -> bool {
        fn walk(f: &Filter) -> bool {
            match f {
                Filter::And(parts) if parts.is_empty() => true,
                Filter::And(parts) | Filter::Or(parts) => parts.iter().any(walk),
                Filter::Not(inner) => walk(inner),
                Filter::Condition(_) => false,
            }
        }
        self.filter.as_ref().is_some_and(walk)
    }

    /// True when the criteria select every record regardless of its values
    /// (no filter, or filters without any condition that can be false).
    pub fn matches_everything(&self) -> bool {
        fn always(f: &Filter) -> bool {
            match f {
                Filter::And(parts) => parts.iter().all(always),
                // An empty `or` is false, not true.
                Filter::Or(parts) => parts.iter().any(always),
                Filter::Not(inner) => never(inner),
                Filter::Condition(_) => false,
            }
        }
        fn never(f: &Filter) -> bool {
            match f {
                Filter::And(parts) => parts.iter().any(never),
                Filter::Or(parts) => parts.iter().all(never),
                Filter::Not(inner) => always(inner),
                Filter::Condition(_) => false,
            }
        }
        self.filter.as_ref().is_none_or(always)
    }

    /// Compiles to a predicate; `first_param` is the number of the first placeholder.
    pub fn compile(&self, dialect: Dialect, first_param: usize) -> Predicate {
        let mut p = Predicate { sql: String::new(), params: Vec::new() };
        match &self.filter {
            Some(f) => compile_filter(f, dialect, first_param, &mut p),
            None => p.sql.push_str("TRUE"),
        }
        if dialect == Dialect::Sqlite {
            p.sql = p.sql.replace("TRUE", "1").replace("FALSE", "0");
        }
        p
    }
}

/// A numbered placeholder; PostgreSQL's carry the value's type so the server
/// never has to guess it from the column (an integer column compared with a
/// bigint parameter, a varchar with text).
pub(crate) fn placeholder(dialect: Dialect, n: usize, value: &Param) -> String {
    match dialect {
        Dialect::Postgres => {
            let ty = match value {
                Param::Text(_) => "text",
                Param::Int(_) => "bigint",
                Param::Guid(_) => "uuid",
                Param::DateTime(_) => "timestamptz",
            };
            format!("${n}::{ty}")
        }
        Dialect::Sqlite => format!("?{n}"),
    }
}

fn compile_filter(f: &Filter, dialect: Dialect, first: usize, p: &mut Predicate) {
    match f {
        Filter::And(parts) | Filter::Or(parts) => {
            if parts.is_empty() {
                // The identity of each connective: an empty `and` holds, an
                // empty `or` (no alternative) never does.
                p.sql.push_str(if matches!(f, Filter::And(_)) { "TRUE" } else { "FALSE" });
                return;
            }
            let joiner = if matches!(f, Filter::And(_)) { " AND " } else { " OR " };
            p.sql.push('(');
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    p.sql.push_str(joiner);
                }
                compile_filter(part, dialect, first, p);
            }
            p.sql.push(')');
        }
        Filter::Not(inner) => {
            p.sql.push_str("NOT (");
            compile_filter(inner, dialect, first, p);
            p.sql.push(')');
        }
        Filter::Condition(c) => {
            let column = &table().columns[c.column].logical_name;
            let bind = |p: &mut Predicate, v: &Param| {
                p.params.push(v.clone());
                placeholder(dialect, first + p.params.len() - 1, v)
            };
            let sql = match c.operator {
                Operator::Null => format!("{column} IS NULL"),
                Operator::NotNull => format!("{column} IS NOT NULL"),
                Operator::In | Operator::NotIn => {
                    let list: Vec<String> = c.values.iter().map(|v| bind(p, v)).collect();
                    let not = if c.operator == Operator::NotIn { "NOT " } else { "" };
                    format!("({column} IS NOT NULL AND {column} {not}IN ({}))", list.join(", "))
                }
                Operator::LastXDays => {
                    let from = bind(p, &c.values[0]);
                    let to = bind(p, &c.values[1]);
                    format!("({column} >= {from} AND {column} <= {to})")
                }
                op => {
                    let sql_op = match op {
                        Operator::Eq => "=",
                        Operator::Ne => "<>",
                        Operator::Lt
                        | Operator::OnOrBefore
                        | Operator::OlderThanXDays
                        | Operator::OlderThanXHours
                        | Operator::OlderThanXMonths => "<",
                        Operator::Le => "<=",
                        Operator::Gt => ">",
                        Operator::Ge | Operator::OnOrAfter => ">=",
                        // Dataverse compares case-insensitively; SQLite's LIKE already does.
                        Operator::Like if dialect == Dialect::Postgres => "ILIKE",
                        Operator::NotLike if dialect == Dialect::Postgres => "NOT ILIKE",
                        Operator::Like => "LIKE",
                        Operator::NotLike => "NOT LIKE",
                        _ => "=",
                    };
                    let ph = bind(p, &c.values[0]);
                    if matches!(c.operator, Operator::Eq | Operator::Ne) && matches!(c.values[0], Param::Text(_)) {
                        // Dataverse compares strings case-insensitively.
                        format!("lower({column}) {sql_op} lower({ph})")
                    } else if matches!(c.operator, Operator::Like | Operator::NotLike) {
                        // One escape character on both databases (SQLite has none by default).
                        format!("{column} {sql_op} {ph} ESCAPE '\\'")
                    } else {
                        format!("{column} {sql_op} {ph}")
                    }
                }
            };
            p.sql.push_str(&sql);
        }
    }
}
