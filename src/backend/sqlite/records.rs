//! The table's operations beyond CreateMultiple on SQLite: reads, retention
//! pages, tombstones, operation rows and stored replies. Every statement runs
//! on the writer thread's connection; every page is one transaction that also
//! adds its count to the operation's total, so a run killed halfway resumes
//! with exact counts.

use chrono::{DateTime, Utc};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde_json::Value as Json;
use uuid::Uuid;

use super::SqliteBackend;
use crate::backend::{
    BackendError, DEAD_LETTER_TABLE, DeletePage, OPERATION_TABLE, OperationCounter, OperationStart, REPLY_TABLE,
    RecordState, RollbackCounts, RollbackScope, RowUpdate, update_columns,
};
use crate::query::fetchxml::{Criteria, Dialect, Param};
use crate::query::page::PageQuery;
use crate::record::format_datetime;
use crate::table::table;

/// The tables of the operations' bookkeeping, and the index retention uses:
/// partial, because the column is empty for every live record, and a full
/// index cost every insert an entry (COPY of 400,000 rows: 105k–139k rows/s
/// with it, 154k–158k with the partial one; a query by operation id uses
/// the partial index alike).
pub(super) fn ddl() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {OPERATION_TABLE} (operationid TEXT PRIMARY KEY NOT NULL, command_id TEXT NOT NULL, message TEXT NOT NULL,
            criteria TEXT, status TEXT NOT NULL, total INTEGER NOT NULL DEFAULT 0, started_on TEXT NOT NULL, ended_on TEXT);
         CREATE TABLE IF NOT EXISTS {REPLY_TABLE} (command_id TEXT PRIMARY KEY NOT NULL, message TEXT, reply TEXT NOT NULL, created_on TEXT NOT NULL);
         DROP INDEX IF EXISTS {name}_retention_op_idx;
         CREATE INDEX IF NOT EXISTS {name}_retention_op_partial_idx ON {name} (msft_retention_operationid)
             WHERE msft_retention_operationid IS NOT NULL;",
        name = table().logical_name
    )
}

fn text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

fn param(p: &Param) -> SqlValue {
    match p {
        Param::Text(s) => s.clone().into(),
        Param::Int(i) => (*i).into(),
        Param::Guid(g) => text(*g).into(),
        Param::DateTime(d) => format_datetime(d).into(),
    }
}

/// The next version number of the file (shared with the ingest writer).
fn next_version(tx: &Transaction<'_>) -> rusqlite::Result<i64> {
    let current: i64 = tx
        .query_row("SELECT value FROM copilot_ingest_meta WHERE key = 'versionnumber'", [], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    tx.execute(
        "INSERT INTO copilot_ingest_meta (key, value) VALUES ('versionnumber', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [current + 1],
    )?;
    Ok(current + 1)
}

/// Adds a page's count to its operation's total and commits: the change and
/// its count land together or not at all.
fn commit_page(
    tx: Transaction<'_>,
    operation_id: Uuid,
    counter: OperationCounter,
    n: i64,
) -> Result<i64, BackendError> {
    let column = counter.column();
    tx.execute(
        &format!("UPDATE {OPERATION_TABLE} SET {column} = {column} + ?2 WHERE operationid = ?1"),
        rusqlite::params![text(operation_id), n],
    )?;
    tx.commit()?;
    Ok(n)
}

fn immediate(conn: &mut Connection) -> rusqlite::Result<Transaction<'_>> {
    conn.transaction_with_behavior(TransactionBehavior::Immediate)
}

/// Tombstones one record (with the message that deleted it; `None` for a
/// purge) and deletes it; `false` if there was no such record.
fn tombstone_and_delete(tx: &Transaction<'_>, record: &str, deleted_by: Option<&str>) -> rusqlite::Result<bool> {
    let t = table();
    let (name, id) = (&t.logical_name, &t.primary_id_attribute);
    tx.prepare_cached(&format!(
        "INSERT INTO {} ({id}, purgedon, versionnumber, retention_operationid, deleted_by)
         SELECT {id}, ?2, versionnumber, msft_retention_operationid, ?3 FROM {name} WHERE {id} = ?1
         ON CONFLICT({id}) DO NOTHING",
        t.tombstone_table()
    ))?
    .execute(rusqlite::params![record, format_datetime(&Utc::now()), deleted_by])?;
    Ok(tx.prepare_cached(&format!("DELETE FROM {name} WHERE {id} = ?1"))?.execute([record])? == 1)
}

/// A record value bound as SQLite stores it.
fn sql_value(value: &crate::record::Value) -> SqlValue {
    use crate::record::Value;
    match value {
        Value::Null => SqlValue::Null,
        Value::Text(s) => s.clone().into(),
        Value::Int(i) => i64::from(*i).into(),
        Value::Guid(g) => text(*g).into(),
        Value::DateTime(d) => format_datetime(d).into(),
    }
}

/// A stored SQLite value as JSON (ids and datetimes are stored as text).
fn json_of(value: SqlValue) -> Json {
    match value {
        SqlValue::Integer(n) => Json::from(n),
        SqlValue::Real(f) => Json::from(f),
        SqlValue::Text(s) => Json::String(s),
        SqlValue::Null | SqlValue::Blob(_) => Json::Null,
    }
}

impl SqliteBackend {
    pub(crate) async fn prune(&self, cutoff: DateTime<Utc>) -> Result<(u64, u64), BackendError> {
        self.run(move |conn| {
            let at = format_datetime(&cutoff);
            let letters = conn.execute(&format!("DELETE FROM {DEAD_LETTER_TABLE} WHERE sent_at < ?1"), [&at])?;
            let replies = conn.execute(&format!("DELETE FROM {REPLY_TABLE} WHERE created_on < ?1"), [&at])?;
            Ok((letters as u64, replies as u64))
        })
        .await
    }

    pub(crate) async fn stored_reply(&self, command_id: &str) -> Result<Option<String>, BackendError> {
        let id = command_id.to_owned();
        self.run(move |conn| {
            Ok(conn
                .query_row(&format!("SELECT reply FROM {REPLY_TABLE} WHERE command_id = ?1"), [id], |r| r.get(0))
                .optional()?)
        })
        .await
    }

    pub(crate) async fn store_reply(
        &self,
        command_id: &str,
        message: Option<&str>,
        reply: &str,
    ) -> Result<(), BackendError> {
        let (id, message, reply) = (command_id.to_owned(), message.map(str::to_owned), reply.to_owned());
        self.run(move |conn| {
            conn.execute(
                &format!(
                    "INSERT INTO {REPLY_TABLE} (command_id, message, reply, created_on) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (command_id) DO NOTHING"
                ),
                rusqlite::params![id, message, reply, format_datetime(&Utc::now())],
            )?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn begin_operation(&self, start: &OperationStart) -> Result<i64, BackendError> {
        let start = start.clone();
        self.run(move |conn| {
            let op = text(start.operation_id);
            conn.execute(
                &format!(
                    "INSERT INTO {OPERATION_TABLE} (operationid, command_id, message, criteria, status, started_on, policy)
                     VALUES (?1, ?2, ?3, ?4, 'Marking', ?5, ?6) ON CONFLICT (operationid) DO NOTHING"
                ),
                rusqlite::params![
                    op,
                    start.command_id,
                    start.message,
                    start.criteria,
                    format_datetime(&Utc::now()),
                    start.policy
                ],
            )?;
            Ok(conn.query_row(&format!("SELECT total FROM {OPERATION_TABLE} WHERE operationid = ?1"), [op], |r| {
                r.get(0)
            })?)
        })
        .await
    }

    pub(crate) async fn operation_message(&self, operation_id: Uuid) -> Result<Option<String>, BackendError> {
        self.run(move |conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT message FROM {OPERATION_TABLE} WHERE operationid = ?1"),
                    [text(operation_id)],
                    |r| r.get(0),
                )
                .optional()?)
        })
        .await
    }

    pub(crate) async fn set_operation_status(
        &self,
        operation_id: Uuid,
        status: &str,
        ended: bool,
    ) -> Result<(), BackendError> {
        let status = status.to_owned();
        self.run(move |conn| {
            conn.execute(
                &format!(
                    "UPDATE {OPERATION_TABLE} SET status = ?2, ended_on = COALESCE(?3, ended_on) WHERE operationid = ?1"
                ),
                rusqlite::params![text(operation_id), status, ended.then(|| format_datetime(&Utc::now()))],
            )?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn retain_page(
        &self,
        operation_id: Uuid,
        criteria: &Criteria,
        limit: i64,
    ) -> Result<i64, BackendError> {
        let t = table();
        let (name, id) = (&t.logical_name, &t.primary_id_attribute);
        let predicate = criteria.compile(Dialect::Sqlite, 4);
        let sql = format!(
            "UPDATE {name} SET msft_datastate = 1, versionnumber = ?1, msft_retention_operationid = ?2
             WHERE {id} IN (SELECT {id} FROM {name} WHERE msft_datastate = 0 AND ({}) LIMIT ?3)",
            predicate.sql
        );
        self.run(move |conn| {
            let tx = immediate(conn)?;
            let version = next_version(&tx)?;
            let mut params: Vec<SqlValue> = vec![version.into(), text(operation_id).into(), limit.into()];
            params.extend(predicate.params.iter().map(param));
            let n = tx.execute(&sql, rusqlite::params_from_iter(params))? as i64;
            commit_page(tx, operation_id, OperationCounter::Total, n)
        })
        .await
    }

    pub(crate) async fn rollback(&self, scope: RollbackScope) -> Result<RollbackCounts, BackendError> {
        let t = table();
        let (name, id) = (&t.logical_name, &t.primary_id_attribute);
        let (filter, tombstone_filter, key) = match scope {
            RollbackScope::Operation(op) => ("msft_retention_operationid", "retention_operationid", op),
            RollbackScope::Record(record) => (id.as_str(), id.as_str(), record),
        };
        let update = format!(
            "UPDATE {name} SET msft_datastate = 0, versionnumber = ?2, msft_retention_operationid = NULL
             WHERE msft_datastate = 1 AND {filter} = ?1"
        );
        let purged = format!("SELECT count(*) FROM {} WHERE {tombstone_filter} = ?1", t.tombstone_table());
        self.run(move |conn| {
            let tx = immediate(conn)?;
            let version = next_version(&tx)?;
            let restored = tx.execute(&update, rusqlite::params![text(key), version])? as i64;
            let purged: i64 = tx.query_row(&purged, [text(key)], |r| r.get(0))?;
            tx.commit()?;
            Ok(RollbackCounts { restored, purged })
        })
        .await
    }

    pub(crate) async fn delete_page(
        &self,
        operation_id: Uuid,
        page: &DeletePage,
        limit: i64,
    ) -> Result<i64, BackendError> {
        let t = table();
        let (name, id) = (&t.logical_name, &t.primary_id_attribute);
        let predicate = page.criteria.compile(Dialect::Sqlite, 5);
        let select = format!(
            "SELECT {id} FROM {name} WHERE msft_datastate = ?3 AND (?1 IS NULL OR versionnumber <= ?1)
             AND (?4 IS NULL OR msft_retention_operationid IN
                  (SELECT operationid FROM {OPERATION_TABLE} WHERE ended_on IS NOT NULL AND ended_on <= ?4))
             AND ({}) LIMIT ?2",
            predicate.sql
        );
        let (max_version, retained, deleted_by) = (page.max_version, i64::from(page.retained), page.deleted_by);
        let (retained_before, counter) = (page.retained_before.as_ref().map(format_datetime), page.counter);
        self.run(move |conn| {
            let tx = immediate(conn)?;
            let ids: Vec<String> = {
                let mut params: Vec<SqlValue> =
                    vec![max_version.into(), limit.into(), retained.into(), retained_before.into()];
                params.extend(predicate.params.iter().map(param));
                let mut stmt = tx.prepare(&select)?;
                stmt.query_map(rusqlite::params_from_iter(params), |r| r.get(0))?.collect::<Result<_, _>>()?
            };
            for record in &ids {
                tombstone_and_delete(&tx, record, deleted_by)?;
            }
            commit_page(tx, operation_id, counter, ids.len() as i64)
        })
        .await
    }

    pub(crate) async fn delete_record(&self, record: Uuid) -> Result<bool, BackendError> {
        self.run(move |conn| {
            let tx = immediate(conn)?;
            let deleted = tombstone_and_delete(&tx, &text(record), Some("Delete"))?;
            tx.commit()?;
            Ok(deleted)
        })
        .await
    }

    pub(crate) async fn update_rows(&self, rows: &[RowUpdate]) -> Result<Option<usize>, BackendError> {
        let t = table();
        let columns = update_columns();
        let mut sets: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(k, &(_, i))| format!("{} = ?{}", t.columns[i].logical_name, k + 1))
            .collect();
        let n = columns.len();
        sets.extend([
            format!("statecode = ?{}", n + 1),
            format!("versionnumber = ?{}", n + 2),
            format!("modifiedon = ?{}", n + 3),
        ]);
        let sql = format!(
            "UPDATE {} SET {} WHERE {} = ?{} AND msft_datastate = 0 AND (?{} IS NULL OR versionnumber = ?{})",
            t.logical_name,
            sets.join(", "),
            t.primary_id_attribute,
            n + 4,
            n + 5,
            n + 5
        );
        let rows = rows.to_vec();
        self.run(move |conn| {
            let tx = immediate(conn)?;
            let now = format_datetime(&Utc::now());
            {
                let mut stmt = tx.prepare(&sql)?;
                for (k, row) in rows.iter().enumerate() {
                    let version = next_version(&tx)?;
                    let mut params: Vec<SqlValue> =
                        columns.iter().map(|&(position, _)| sql_value(&row.values[position])).collect();
                    params.extend([
                        i64::from(row.state_code).into(),
                        version.into(),
                        now.clone().into(),
                        text(row.id).into(),
                        row.expected_version.into(),
                    ]);
                    if stmt.execute(rusqlite::params_from_iter(params))? == 0 {
                        // Dropping the transaction rolls every row back.
                        return Ok(Some(k));
                    }
                }
            }
            tx.commit()?;
            Ok(None)
        })
        .await
    }

    pub(crate) async fn retrieve_page(&self, query: &PageQuery, limit: i64) -> Result<Vec<Vec<Json>>, BackendError> {
        let t = table();
        let names: Vec<&str> = query.columns.iter().map(|&i| t.columns[i].logical_name.as_str()).collect();
        let predicate = query.criteria.compile(Dialect::Sqlite, 4);
        let keyset = query.keyset(Dialect::Sqlite, 4 + predicate.params.len());
        let sql = format!(
            "SELECT {} FROM {} WHERE msft_datastate = ?1 AND ({}) AND {} ORDER BY {} LIMIT ?2 OFFSET ?3",
            names.join(", "),
            t.logical_name,
            predicate.sql,
            keyset.sql,
            query.order_by()
        );
        let mut params: Vec<SqlValue> =
            vec![i64::from(query.criteria.retained).into(), limit.into(), query.offset().into()];
        params.extend(predicate.params.iter().chain(&keyset.params).map(param));
        let count = names.len();
        self.read(move |conn| {
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt
                .query_map(rusqlite::params_from_iter(params), |row| {
                    (0..count).map(|i| row.get::<_, SqlValue>(i).map(json_of)).collect::<Result<Vec<_>, _>>()
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    pub(crate) async fn count(&self, criteria: &Criteria) -> Result<i64, BackendError> {
        let t = table();
        let predicate = criteria.compile(Dialect::Sqlite, 2);
        let sql = format!("SELECT count(*) FROM {} WHERE msft_datastate = ?1 AND ({})", t.logical_name, predicate.sql);
        let mut params: Vec<SqlValue> = vec![i64::from(criteria.retained).into()];
        params.extend(predicate.params.iter().map(param));
        self.read(move |conn| Ok(conn.query_row(&sql, rusqlite::params_from_iter(params), |r| r.get(0))?)).await
    }

    pub(crate) async fn record_state(&self, record: Uuid) -> Result<RecordState, BackendError> {
        let t = table();
        let state_sql = format!("SELECT msft_datastate FROM {} WHERE {} = ?1", t.logical_name, t.primary_id_attribute);
        let tombstone_sql = format!("SELECT 1 FROM {} WHERE {} = ?1", t.tombstone_table(), t.primary_id_attribute);
        self.read(move |conn| {
            let key = text(record);
            let state: Option<i64> = conn.query_row(&state_sql, [&key], |r| r.get(0)).optional()?;
            let purged = conn.prepare(&tombstone_sql)?.exists([&key])?;
            Ok(RecordState::of(state, purged))
        })
        .await
    }

    pub(crate) async fn retrieve(&self, record: Uuid, columns: &[usize]) -> Result<Option<Vec<Json>>, BackendError> {
        let t = table();
        let names: Vec<&str> = columns.iter().map(|&i| t.columns[i].logical_name.as_str()).collect();
        let sql = format!("SELECT {} FROM {} WHERE {} = ?1", names.join(", "), t.logical_name, t.primary_id_attribute);
        let count = columns.len();
        self.read(move |conn| {
            Ok(conn
                .query_row(&sql, [text(record)], |row| {
                    (0..count).map(|i| row.get::<_, SqlValue>(i).map(json_of)).collect::<Result<Vec<_>, _>>()
                })
                .optional()?)
        })
        .await
    }
}
