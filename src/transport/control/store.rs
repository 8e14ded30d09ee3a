//! What the control commands do to the tables, on SQLite and PostgreSQL.
//!
//! Every page of BulkRetain and PurgeRetainedContent is its own transaction,
//! and the operation's running total is updated in that same transaction, so
//! a run killed halfway resumes from where it stopped with exact counts
//! (the operation id is derived from the command id).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use serde_json::{Value as Json, json};
use uuid::Uuid;

use super::{Command, Parameters, Reply, count_response};
use crate::config::SinkUrl;
use crate::query::fetchxml;
use crate::query::fetchxml::{Criteria, Dialect, Param, Predicate};
use crate::record::format_datetime;
use crate::table::table;

/// Retention tables (operations and stored replies), created with the sink's.
pub const OPERATION_TABLE: &str = "copilot_ingest_retention_operation";
pub const REPLY_TABLE: &str = "copilot_ingest_control_reply";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Retry later: the database is unreachable or busy.
    #[error("{0}")]
    Transient(String),
    /// The command cannot succeed as given.
    #[error("{0}")]
    Permanent(String),
}

// Each backend classifies its driver's errors once; the sinks use the same
// predicates, so a command and a write never disagree about a retry.
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if crate::backend::sqlite::is_permanent(&e) {
            StoreError::Permanent(e.to_string())
        } else {
            StoreError::Transient(e.to_string())
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        let message =
            e.as_db_error().map(|d| format!("{}: {}", d.code().code(), d.message())).unwrap_or_else(|| e.to_string());
        if crate::backend::postgres::is_data_error(&e) {
            StoreError::Permanent(message)
        } else {
            StoreError::Transient(message)
        }
    }
}

pub fn sqlite_ddl() -> String {
    let t = table();
    format!(
        "CREATE TABLE IF NOT EXISTS {OPERATION_TABLE} (operationid TEXT PRIMARY KEY NOT NULL, command_id TEXT NOT NULL, message TEXT NOT NULL,
            criteria TEXT, status TEXT NOT NULL, total INTEGER NOT NULL DEFAULT 0, started_on TEXT NOT NULL, ended_on TEXT);
         CREATE TABLE IF NOT EXISTS {REPLY_TABLE} (command_id TEXT PRIMARY KEY NOT NULL, message TEXT, reply TEXT NOT NULL, created_on TEXT NOT NULL);
         CREATE INDEX IF NOT EXISTS {name}_retention_op_idx ON {name} (msft_retention_operationid);",
        name = t.logical_name
    )
}

pub fn postgres_ddl() -> String {
    let t = table();
    format!(
        "CREATE TABLE IF NOT EXISTS {OPERATION_TABLE} (operationid uuid PRIMARY KEY, command_id text NOT NULL, message text NOT NULL,
            criteria text, status text NOT NULL, total bigint NOT NULL DEFAULT 0, started_on timestamptz NOT NULL, ended_on timestamptz);
         CREATE TABLE IF NOT EXISTS {REPLY_TABLE} (command_id text PRIMARY KEY, message text, reply text NOT NULL, created_on timestamptz NOT NULL);
         ALTER TABLE {tombstones} ADD COLUMN IF NOT EXISTS retention_operationid uuid;
         CREATE INDEX IF NOT EXISTS {name}_retention_op_idx ON {name} (msft_retention_operationid);",
        name = t.logical_name,
        tombstones = t.tombstone_table()
    )
}

/// A command claimed by this instance; dropping it (closing the session) releases it.
pub struct Claim {
    _session: Option<tokio_postgres::Client>,
}

/// Where commands execute.
#[derive(Debug, Clone)]
pub enum Store {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Store {
    /// `None` for Dataverse, which runs retention itself (its long-term retention policies).
    pub fn new(url: &SinkUrl) -> Option<Store> {
        match url {
            SinkUrl::Sqlite(p) => Some(Store::Sqlite(p.clone())),
            SinkUrl::Postgres(u) => Some(Store::Postgres(u.clone())),
            SinkUrl::Dataverse(_) => None,
        }
    }

    /// Claims `command_id` for this instance until the claim is dropped;
    /// `None` while another instance holds it. On PostgreSQL the claim is a
    /// session advisory lock, so a killed instance's claim ends with its
    /// connection and the command can resume elsewhere at once. SQLite is
    /// single-instance: one process, one control loop, nothing to claim.
    pub async fn claim(&self, command_id: &str) -> Result<Option<Claim>, StoreError> {
        match self {
            Store::Sqlite(_) => Ok(Some(Claim { _session: None })),
            Store::Postgres(url) => {
                let session = pg(url).await?;
                let key = format!("copilot-ingest control command {command_id}");
                let claimed: bool =
                    session.query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key]).await?.get(0);
                Ok(claimed.then_some(Claim { _session: Some(session) }))
            }
        }
    }

    /// Deletes dead-letter ledger entries and stored replies older than
    /// `cutoff`; returns how many of each. Tombstones are never pruned: they
    /// are the record of erasure. Safe because a signed command older than
    /// five minutes is refused anyway, and the topics' retention is shorter
    /// than the default age (7 days), so nothing that old is redelivered.
    pub async fn prune(&self, cutoff: DateTime<Utc>) -> Result<(u64, u64), StoreError> {
        let ledger = crate::backend::DEAD_LETTER_TABLE;
        match self {
            Store::Sqlite(path) => {
                sqlite(path, move |conn| {
                    let at = format_datetime(&cutoff);
                    let letters = conn.execute(&format!("DELETE FROM {ledger} WHERE sent_at < ?1"), [&at])?;
                    let replies = conn.execute(&format!("DELETE FROM {REPLY_TABLE} WHERE created_on < ?1"), [&at])?;
                    Ok((letters as u64, replies as u64))
                })
                .await
            }
            Store::Postgres(url) => {
                let client = pg(url).await?;
                let letters = client.execute(&format!("DELETE FROM {ledger} WHERE sent_at < $1"), &[&cutoff]).await?;
                let replies =
                    client.execute(&format!("DELETE FROM {REPLY_TABLE} WHERE created_on < $1"), &[&cutoff]).await?;
                Ok((letters, replies))
            }
        }
    }

    pub async fn stored_reply(&self, command_id: &str) -> Result<Option<Reply>, StoreError> {
        let sql_sqlite = format!("SELECT reply FROM {REPLY_TABLE} WHERE command_id = ?1");
        let text: Option<String> = match self {
            Store::Sqlite(path) => {
                let id = command_id.to_owned();
                sqlite(path, move |conn| {
                    use rusqlite::OptionalExtension;
                    Ok(conn.query_row(&sql_sqlite, [id], |r| r.get(0)).optional()?)
                })
                .await?
            }
            Store::Postgres(url) => {
                let client = pg(url).await?;
                client
                    .query_opt(&format!("SELECT reply FROM {REPLY_TABLE} WHERE command_id = $1"), &[&command_id])
                    .await?
                    .map(|r| r.get(0))
            }
        };
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    pub async fn store_reply(&self, reply: &Reply) -> Result<(), StoreError> {
        let Some(id) = reply.command_id.clone() else { return Ok(()) };
        let text = serde_json::to_string(reply).map_err(|e| StoreError::Permanent(e.to_string()))?;
        let message = reply.message.clone();
        self.statement(
            &format!("INSERT INTO {REPLY_TABLE} (command_id, message, reply, created_on) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (command_id) DO NOTHING"),
            vec![Bind::Text(Some(id)), Bind::Text(message), Bind::Text(Some(text)), Bind::Time(Some(Utc::now()))],
        )
        .await
    }

    /// Executes a validated command. Permanent problems become a Failed reply;
    /// transient ones are returned for the caller to retry.
    pub async fn execute(&self, command: &Command) -> Result<Reply, StoreError> {
        let result = match &command.parameters {
            Parameters::ValidateRetentionConfig { fetch_xml } => {
                let (ok, message) = match fetchxml::parse(fetch_xml, Utc::now()) {
                    Ok(_) => (true, None),
                    Err(e) => (false, Some(e)),
                };
                return Ok(Reply::succeeded(command, json!({"IsValidationSuccessful": ok, "ErrorMessage": message})));
            }
            Parameters::Retain { target } => self.retain(command, *target).await,
            Parameters::BulkRetain { criteria, fetch_xml, page_size } => {
                self.bulk_retain(command, criteria, fetch_xml, *page_size).await
            }
            Parameters::RollbackRetain { operation_id, target } => self.rollback(command, *operation_id, *target).await,
            Parameters::PurgeRetainedContent { max_version, criteria, page_size } => {
                self.purge(command, *max_version, criteria.as_ref(), *page_size).await
            }
            Parameters::Retrieve { target, columns } => self.retrieve(command, *target, columns).await,
        };
        match result {
            Err(StoreError::Permanent(e)) => Ok(Reply::failed(command, "ExecutionFailed", e)),
            other => other,
        }
    }

    /// Creates the operation row (or finds it, when a redelivered command resumes) and returns its total so far.
    async fn begin_operation(&self, command: &Command, criteria: Option<&str>) -> Result<i64, StoreError> {
        let op = command.operation_id();
        let (id, message, criteria) =
            (command.command_id.clone(), command.message.name().to_owned(), criteria.map(str::to_owned));
        self.statement(
            &format!("INSERT INTO {OPERATION_TABLE} (operationid, command_id, message, criteria, status, started_on) VALUES (?1, ?2, ?3, ?4, 'Marking', ?5) ON CONFLICT (operationid) DO NOTHING"),
            vec![Bind::Guid(op), Bind::Text(Some(id)), Bind::Text(Some(message)), Bind::Text(criteria), Bind::Time(Some(Utc::now()))],
        )
        .await?;
        match self {
            Store::Sqlite(path) => {
                sqlite(path, move |conn| {
                    Ok(conn.query_row(
                        &format!("SELECT total FROM {OPERATION_TABLE} WHERE operationid = ?1"),
                        [op.hyphenated().to_string()],
                        |r| r.get(0),
                    )?)
                })
                .await
            }
            Store::Postgres(url) => {
                let client = pg(url).await?;
                Ok(client
                    .query_one(&format!("SELECT total FROM {OPERATION_TABLE} WHERE operationid = $1"), &[&op])
                    .await?
                    .get(0))
            }
        }
    }

    async fn end_operation(&self, command: &Command, status: &str) -> Result<(), StoreError> {
        self.set_operation_status(command.operation_id(), status, true).await
    }

    async fn retain(&self, command: &Command, target: Uuid) -> Result<Reply, StoreError> {
        let t = table();
        self.begin_operation(command, None).await?;
        let id_param = Param::Guid(target);
        let criteria = Criteria {
            filter: Some(fetchxml::Filter::Condition(fetchxml::Condition {
                column: t.index_of(&t.primary_id_attribute).unwrap_or(0),
                operator: fetchxml::Operator::Eq,
                values: vec![id_param],
            })),
            retained: false,
        };
        let marked = self.retain_page(command.operation_id(), &criteria, 1).await?;
        if marked == 1 {
            self.end_operation(command, "Succeeded").await?;
            return Ok(Reply::succeeded(command, count_response(1, json!({"OperationId": command.operation_id()}))));
        }
        self.end_operation(command, "Failed").await?;
        let state = self.record_state(target).await?;
        Ok(match state {
            RecordState::Retained => {
                Reply::failed(command, "AlreadyRetained", format!("record {target} is already retained"))
            }
            RecordState::Purged => Reply::failed(command, "RecordPurged", format!("record {target} was purged")),
            _ => Reply::failed(command, "RecordNotFound", format!("record {target} does not exist")),
        })
    }

    async fn bulk_retain(
        &self,
        command: &Command,
        criteria: &Criteria,
        fetch_xml: &str,
        page_size: i64,
    ) -> Result<Reply, StoreError> {
        let mut total = self.begin_operation(command, Some(fetch_xml)).await?;
        loop {
            let n = self.retain_page(command.operation_id(), criteria, page_size).await?;
            total += n;
            if n < page_size {
                break;
            }
        }
        self.end_operation(command, "Succeeded").await?;
        Ok(Reply::succeeded(
            command,
            count_response(
                total,
                json!({"OperationId": command.operation_id(), "HasMoreRecords": false, "FailedRecords": []}),
            ),
        ))
    }

    /// Marks up to `limit` live records matching the criteria as retained, in one transaction.
    async fn retain_page(&self, op: Uuid, criteria: &Criteria, limit: i64) -> Result<i64, StoreError> {
        let t = table();
        let (name, id) = (&t.logical_name, &t.primary_id_attribute);
        match self {
            Store::Sqlite(path) => {
                let predicate = criteria.compile(Dialect::Sqlite, 4);
                let sql = format!(
                    "UPDATE {name} SET msft_datastate = 1, versionnumber = ?1, msft_retention_operationid = ?2
                     WHERE {id} IN (SELECT {id} FROM {name} WHERE msft_datastate = 0 AND ({}) LIMIT ?3)",
                    predicate.sql
                );
                sqlite(path, move |conn| {
                    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let version = next_sqlite_version(&tx)?;
                    let mut params: Vec<rusqlite::types::Value> =
                        vec![version.into(), op.hyphenated().to_string().into(), limit.into()];
                    params.extend(predicate.params.iter().map(sqlite_param));
                    let n = tx.execute(&sql, rusqlite::params_from_iter(params))? as i64;
                    commit_sqlite_page(tx, op, n)
                })
                .await
            }
            Store::Postgres(url) => {
                let predicate = criteria.compile(Dialect::Postgres, 3);
                let sql = format!(
                    "UPDATE {name} SET msft_datastate = 1, versionnumber = nextval('{name}_versionnumber_seq'), msft_retention_operationid = $1
                     WHERE {id} IN (SELECT {id} FROM {name} WHERE msft_datastate = 0 AND ({}) LIMIT $2 FOR UPDATE SKIP LOCKED)",
                    predicate.sql
                );
                pg_page(url, op, &sql, vec![Box::new(op), Box::new(limit)], &predicate).await
            }
        }
    }

    async fn rollback(
        &self,
        command: &Command,
        operation: Option<Uuid>,
        target: Option<Uuid>,
    ) -> Result<Reply, StoreError> {
        let t = table();
        let (name, id) = (&t.logical_name, &t.primary_id_attribute);
        // Which records: those an operation retained, or one record.
        let (filter_sql_sqlite, filter_sql_pg, key) = match (operation, target) {
            (Some(op), _) => {
                ("msft_retention_operationid = ?1".to_owned(), "msft_retention_operationid = $1".to_owned(), op)
            }
            (None, Some(target)) => (format!("{id} = ?1"), format!("{id} = $1"), target),
            (None, None) => {
                return Ok(Reply::failed(command, "InvalidParameters", "OperationId or Target is required"));
            }
        };
        let tombstone_filter = if operation.is_some() { "retention_operationid" } else { id.as_str() };
        if let Some(op) = operation {
            match self.operation_message(op).await?.as_deref() {
                None => return Ok(Reply::failed(command, "OperationNotFound", format!("no retention operation {op}"))),
                Some("BulkRetain" | "Retain") => {}
                // A purge's record of deletions must never be rewritten as rolled back.
                Some(other) => {
                    return Ok(Reply::failed(
                        command,
                        "NotRollbackable",
                        format!("operation {op} is a {other}; only BulkRetain and Retain operations roll back"),
                    ));
                }
            }
        }
        let (restored, not_restored): (i64, i64) = match self {
            Store::Sqlite(path) => {
                let path = path.clone();
                let update = format!(
                    "UPDATE {name} SET msft_datastate = 0, versionnumber = ?2, msft_retention_operationid = NULL WHERE msft_datastate = 1 AND {filter_sql_sqlite}"
                );
                let purged = format!("SELECT count(*) FROM {} WHERE {tombstone_filter} = ?1", t.tombstone_table());
                blocking(move || {
                    let mut conn = crate::backend::sqlite::open_connection(&path)?;
                    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let version = next_sqlite_version(&tx)?;
                    let n = tx.execute(&update, rusqlite::params![key.hyphenated().to_string(), version])? as i64;
                    let purged: i64 = tx.query_row(&purged, [key.hyphenated().to_string()], |r| r.get(0))?;
                    tx.commit()?;
                    Ok((n, purged))
                })
                .await?
            }
            Store::Postgres(url) => {
                let mut client = pg(url).await?;
                let tx = client.transaction().await?;
                let n = tx
                    .execute(
                        &format!("UPDATE {name} SET msft_datastate = 0, versionnumber = nextval('{name}_versionnumber_seq'), msft_retention_operationid = NULL WHERE msft_datastate = 1 AND {filter_sql_pg}"),
                        &[&key],
                    )
                    .await? as i64;
                let purged: i64 = tx
                    .query_one(
                        &format!("SELECT count(*) FROM {} WHERE {tombstone_filter} = $1", t.tombstone_table()),
                        &[&key],
                    )
                    .await?
                    .get(0);
                tx.commit().await?;
                (n, purged)
            }
        };
        if let Some(op) = operation {
            let status = if not_restored > 0 { "RolledBackPartially" } else { "RolledBack" };
            self.set_operation_status(op, status, false).await?;
        } else if restored == 0 && not_restored == 0 {
            let target = target.unwrap_or_default();
            return Ok(match self.record_state(target).await? {
                RecordState::Live => Reply::failed(command, "NotRetained", format!("record {target} is not retained")),
                _ => Reply::failed(command, "RecordNotFound", format!("record {target} does not exist")),
            });
        }
        Ok(Reply::succeeded(
            command,
            count_response(
                restored,
                json!({"OperationId": operation, "FailedRecordCount": not_restored, "FailedRecords": [], "ErrorMessage": if not_restored > 0 { Some(format!("{not_restored} record(s) were purged and cannot be rolled back")) } else { None }}),
            ),
        ))
    }

    async fn purge(
        &self,
        command: &Command,
        max_version: Option<i64>,
        criteria: Option<&Criteria>,
        page_size: i64,
    ) -> Result<Reply, StoreError> {
        let everything = Criteria { filter: None, retained: true };
        let criteria = criteria.unwrap_or(&everything);
        let mut total = self.begin_operation(command, None).await?;
        loop {
            let n = self.purge_page(command.operation_id(), max_version, criteria, page_size).await?;
            total += n;
            if n < page_size {
                break;
            }
        }
        self.end_operation(command, "Succeeded").await?;
        Ok(Reply::succeeded(
            command,
            count_response(total, json!({"OperationId": command.operation_id(), "HasMoreRecords": false})),
        ))
    }

    /// Deletes up to `limit` retained records (tombstoning each id), in one transaction.
    async fn purge_page(
        &self,
        op: Uuid,
        max_version: Option<i64>,
        criteria: &Criteria,
        limit: i64,
    ) -> Result<i64, StoreError> {
        let t = table();
        let (name, id, tombstones) = (&t.logical_name, &t.primary_id_attribute, t.tombstone_table());
        match self {
            Store::Sqlite(path) => {
                let predicate = criteria.compile(Dialect::Sqlite, 3);
                let select = format!(
                    "SELECT {id} FROM {name} WHERE msft_datastate = 1 AND (?1 IS NULL OR versionnumber <= ?1) AND ({}) LIMIT ?2",
                    predicate.sql
                );
                sqlite(path, move |conn| {
                    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let ids: Vec<String> = {
                        let mut params: Vec<rusqlite::types::Value> = vec![max_version.into(), limit.into()];
                        params.extend(predicate.params.iter().map(sqlite_param));
                        let mut stmt = tx.prepare(&select)?;
                        stmt.query_map(rusqlite::params_from_iter(params), |r| r.get(0))?.collect::<Result<_, _>>()?
                    };
                    let now = format_datetime(&Utc::now());
                    {
                        let mut tomb = tx.prepare(&format!(
                            "INSERT INTO {tombstones} ({id}, purgedon, versionnumber, retention_operationid)
                             SELECT {id}, ?2, versionnumber, msft_retention_operationid FROM {name} WHERE {id} = ?1
                             ON CONFLICT({id}) DO NOTHING"
                        ))?;
                        let mut delete = tx.prepare(&format!("DELETE FROM {name} WHERE {id} = ?1"))?;
                        for record in &ids {
                            tomb.execute(rusqlite::params![record, now])?;
                            delete.execute([record])?;
                        }
                    }
                    let n = ids.len() as i64;
                    commit_sqlite_page(tx, op, n)
                })
                .await
            }
            Store::Postgres(url) => {
                let predicate = criteria.compile(Dialect::Postgres, 3);
                let sql = format!(
                    "WITH doomed AS (
                        DELETE FROM {name} WHERE {id} IN (
                            SELECT {id} FROM {name} WHERE msft_datastate = 1 AND ($1::bigint IS NULL OR versionnumber <= $1::bigint) AND ({})
                            LIMIT $2 FOR UPDATE SKIP LOCKED)
                        RETURNING {id}, versionnumber, msft_retention_operationid)
                     INSERT INTO {tombstones} ({id}, purgedon, versionnumber, retention_operationid)
                     SELECT {id}, now(), versionnumber, msft_retention_operationid FROM doomed
                     ON CONFLICT ({id}) DO NOTHING",
                    predicate.sql
                );
                pg_page(url, op, &sql, vec![Box::new(max_version), Box::new(limit)], &predicate).await
            }
        }
    }

    /// One record, live or retained, as Dataverse's `Entity`: the id and the
    /// asked columns by logical name, option sets as values with their
    /// labels as `<column>@OData.Community.Display.V1.FormattedValue`.
    async fn retrieve(&self, command: &Command, target: Uuid, columns: &[usize]) -> Result<Reply, StoreError> {
        let t = table();
        let id_index = t.index_of(&t.primary_id_attribute).unwrap_or(0);
        let mut wanted: Vec<usize> = vec![id_index];
        wanted.extend(columns.iter().copied().filter(|&c| c != id_index));
        let names: Vec<&str> = wanted.iter().map(|&i| t.columns[i].logical_name.as_str()).collect();
        let values: Option<Vec<Json>> = match self {
            Store::Sqlite(path) => {
                let sql = format!(
                    "SELECT {} FROM {} WHERE {} = ?1",
                    names.join(", "),
                    t.logical_name,
                    t.primary_id_attribute
                );
                let count = wanted.len();
                sqlite(path, move |conn| {
                    use rusqlite::OptionalExtension;
                    Ok(conn
                        .query_row(&sql, [target.hyphenated().to_string()], |row| {
                            (0..count)
                                .map(|i| {
                                    Ok(match row.get::<_, rusqlite::types::Value>(i)? {
                                        rusqlite::types::Value::Integer(n) => Json::from(n),
                                        rusqlite::types::Value::Real(f) => Json::from(f),
                                        rusqlite::types::Value::Text(s) => Json::String(s),
                                        rusqlite::types::Value::Null | rusqlite::types::Value::Blob(_) => Json::Null,
                                    })
                                })
                                .collect::<Result<Vec<_>, rusqlite::Error>>()
                        })
                        .optional()?)
                })
                .await?
            }
            Store::Postgres(url) => {
                let client = pg(url).await?;
                let sql = format!(
                    "SELECT {} FROM {} WHERE {} = $1",
                    names.join(", "),
                    t.logical_name,
                    t.primary_id_attribute
                );
                match client.query_opt(&sql, &[&target]).await? {
                    None => None,
                    Some(row) => Some(
                        wanted
                            .iter()
                            .enumerate()
                            .map(|(k, &i)| pg_json(&row, k, t.columns[i].column_type))
                            .collect::<Result<Vec<_>, tokio_postgres::Error>>()?,
                    ),
                }
            }
        };
        let Some(values) = values else {
            // Dataverse's "does not exist" (also for a purged or deleted id).
            return Ok(Reply::failed(
                command,
                "0x80040217",
                format!("{} With Id = {target} Does Not Exist", t.logical_name),
            ));
        };
        let mut entity = serde_json::Map::new();
        for (&i, value) in wanted.iter().zip(values) {
            let column = &t.columns[i];
            if column.column_type.is_option_set()
                && let Some(label) = value.as_i64().and_then(|v| i32::try_from(v).ok()).and_then(|v| column.option(v))
            {
                entity.insert(
                    format!("{}@OData.Community.Display.V1.FormattedValue", column.logical_name),
                    Json::String(label.label.clone()),
                );
            }
            entity.insert(column.logical_name.clone(), value);
        }
        Ok(Reply::succeeded(command, json!({ "Entity": entity })))
    }

    /// The message that started an operation, if it exists.
    async fn operation_message(&self, op: Uuid) -> Result<Option<String>, StoreError> {
        match self {
            Store::Sqlite(path) => {
                sqlite(path, move |conn| {
                    use rusqlite::OptionalExtension;
                    Ok(conn
                        .query_row(
                            &format!("SELECT message FROM {OPERATION_TABLE} WHERE operationid = ?1"),
                            [op.hyphenated().to_string()],
                            |r| r.get(0),
                        )
                        .optional()?)
                })
                .await
            }
            Store::Postgres(url) => {
                let client = pg(url).await?;
                Ok(client
                    .query_opt(&format!("SELECT message FROM {OPERATION_TABLE} WHERE operationid = $1"), &[&op])
                    .await?
                    .map(|r| r.get(0)))
            }
        }
    }

    /// Sets an operation's status; `ended` also stamps its end time.
    async fn set_operation_status(&self, op: Uuid, status: &str, ended: bool) -> Result<(), StoreError> {
        self.statement(
            &format!(
                "UPDATE {OPERATION_TABLE} SET status = ?2, ended_on = COALESCE(?3, ended_on) WHERE operationid = ?1"
            ),
            vec![Bind::Guid(op), Bind::Text(Some(status.to_owned())), Bind::Time(ended.then(Utc::now))],
        )
        .await
    }

    /// Runs one statement outside any transaction. `sql` uses `?N`
    /// placeholders; PostgreSQL gets them as `$N`.
    async fn statement(&self, sql: &str, binds: Vec<Bind>) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(path) => {
                let sql = sql.to_owned();
                sqlite(path, move |conn| {
                    conn.execute(&sql, rusqlite::params_from_iter(binds.iter().map(Bind::sqlite)))?;
                    Ok(())
                })
                .await
            }
            Store::Postgres(url) => {
                let sql = question_to_dollar(sql);
                let params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> =
                    binds.into_iter().map(Bind::postgres).collect();
                pg(url).await?.execute(&sql, &refs(&params)).await?;
                Ok(())
            }
        }
    }

    async fn record_state(&self, record: Uuid) -> Result<RecordState, StoreError> {
        let t = table();
        let (name, id) = (t.logical_name.clone(), t.primary_id_attribute.clone());
        let (state, purged): (Option<i64>, bool) = match self {
            Store::Sqlite(path) => {
                sqlite(path, move |conn| {
                    use rusqlite::OptionalExtension;
                    let key = record.hyphenated().to_string();
                    let state = conn
                        .query_row(&format!("SELECT msft_datastate FROM {name} WHERE {id} = ?1"), [&key], |r| r.get(0))
                        .optional()?;
                    let purged = conn
                        .prepare(&format!("SELECT 1 FROM {name} WHERE {id} = ?1", name = table().tombstone_table()))?
                        .exists([&key])?;
                    Ok((state, purged))
                })
                .await?
            }
            Store::Postgres(url) => {
                let client = pg(url).await?;
                let state = client
                    .query_opt(&format!("SELECT msft_datastate FROM {name} WHERE {id} = $1"), &[&record])
                    .await?
                    .map(|r| i64::from(r.get::<_, i32>(0)));
                let purged = client
                    .query_opt(&format!("SELECT 1 FROM {} WHERE {id} = $1", t.tombstone_table()), &[&record])
                    .await?
                    .is_some();
                (state, purged)
            }
        };
        Ok(match (state, purged) {
            (Some(1), _) => RecordState::Retained,
            (Some(_), _) => RecordState::Live,
            (None, true) => RecordState::Purged,
            (None, false) => RecordState::Missing,
        })
    }
}

/// A PostgreSQL column as JSON: ids lowercase hyphenated, datetimes as the
/// sinks format them, numbers as numbers.
fn pg_json(
    row: &tokio_postgres::Row,
    k: usize,
    column_type: crate::table::ColumnType,
) -> Result<Json, tokio_postgres::Error> {
    use crate::table::ColumnType;
    Ok(match column_type {
        ColumnType::Uniqueidentifier | ColumnType::Lookup => {
            row.try_get::<_, Option<Uuid>>(k)?.map(|u| Json::String(u.hyphenated().to_string())).unwrap_or(Json::Null)
        }
        ColumnType::String | ColumnType::Memo => {
            row.try_get::<_, Option<String>>(k)?.map(Json::String).unwrap_or(Json::Null)
        }
        ColumnType::Picklist | ColumnType::State | ColumnType::Status | ColumnType::Integer => {
            row.try_get::<_, Option<i32>>(k)?.map(Json::from).unwrap_or(Json::Null)
        }
        ColumnType::Bigint => row.try_get::<_, Option<i64>>(k)?.map(Json::from).unwrap_or(Json::Null),
        ColumnType::Datetime => {
            row.try_get::<_, Option<DateTime<Utc>>>(k)?.map(|d| Json::String(format_datetime(&d))).unwrap_or(Json::Null)
        }
    })
}

/// A value bound in a statement written once for both dialects.
enum Bind {
    Text(Option<String>),
    Guid(Uuid),
    Time(Option<DateTime<Utc>>),
}

impl Bind {
    fn sqlite(&self) -> rusqlite::types::Value {
        match self {
            Bind::Text(t) => t.clone().into(),
            Bind::Guid(g) => g.hyphenated().to_string().into(),
            Bind::Time(t) => t.map(|d| format_datetime(&d)).into(),
        }
    }

    fn postgres(self) -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
        match self {
            Bind::Text(t) => Box::new(t),
            Bind::Guid(g) => Box::new(g),
            Bind::Time(t) => Box::new(t),
        }
    }
}

/// `?1` → `$1` (the statements here contain no other question marks).
fn question_to_dollar(sql: &str) -> String {
    sql.replace('?', "$")
}

enum RecordState {
    Live,
    Retained,
    Purged,
    Missing,
}

/// The next version number of the SQLite file (shared with the ingest writer).
fn next_sqlite_version(tx: &rusqlite::Transaction<'_>) -> Result<i64, StoreError> {
    use rusqlite::OptionalExtension;
    let current: i64 = tx
        .query_row("SELECT value FROM copilot_ingest_meta WHERE key = 'versionnumber'", [], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let next = current + 1;
    tx.execute(
        "INSERT INTO copilot_ingest_meta (key, value) VALUES ('versionnumber', ?1) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [next],
    )?;
    Ok(next)
}

fn sqlite_param(p: &Param) -> rusqlite::types::Value {
    match p {
        Param::Text(s) => s.clone().into(),
        Param::Int(i) => (*i).into(),
        Param::Guid(g) => g.hyphenated().to_string().into(),
        Param::DateTime(d) => format_datetime(d).into(),
    }
}

fn pg_param(p: &Param) -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
    match p {
        Param::Text(s) => Box::new(s.clone()),
        Param::Int(i) => Box::new(*i),
        Param::Guid(g) => Box::new(*g),
        Param::DateTime(d) => Box::new(*d as DateTime<Utc>),
    }
}

fn refs(
    params: &[Box<dyn tokio_postgres::types::ToSql + Sync + Send>],
) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params
        .iter()
        .map(|p| {
            let r: &(dyn tokio_postgres::types::ToSql + Sync) = p.as_ref();
            r
        })
        .collect()
}

async fn pg(url: &str) -> Result<tokio_postgres::Client, StoreError> {
    crate::backend::postgres::connect(url).await.map_err(|e| StoreError::Transient(e.to_string()))
}

/// One page of a bulk operation on PostgreSQL: `sql` (bound to `params`, then
/// the predicate's values) and the operation's running total, in one
/// transaction. Returns the rows the page changed.
async fn pg_page(
    url: &str,
    op: Uuid,
    sql: &str,
    mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
    predicate: &Predicate,
) -> Result<i64, StoreError> {
    let mut client = pg(url).await?;
    let tx = client.transaction().await?;
    params.extend(predicate.params.iter().map(pg_param));
    let n = tx.execute(sql, &refs(&params)).await? as i64;
    tx.execute(&format!("UPDATE {OPERATION_TABLE} SET total = total + $2 WHERE operationid = $1"), &[&op, &n]).await?;
    tx.commit().await?;
    Ok(n)
}

/// Adds a page's count to its operation's total and commits: the change and
/// its count land together or not at all.
fn commit_sqlite_page(tx: rusqlite::Transaction<'_>, op: Uuid, n: i64) -> Result<i64, StoreError> {
    tx.execute(
        &format!("UPDATE {OPERATION_TABLE} SET total = total + ?2 WHERE operationid = ?1"),
        rusqlite::params![op.hyphenated().to_string(), n],
    )?;
    tx.commit()?;
    Ok(n)
}

/// Runs `f` with a fresh connection to the SQLite file, off the async runtime.
async fn sqlite<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce(&mut rusqlite::Connection) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let path = path.to_owned();
    blocking(move || {
        let mut conn = crate::backend::sqlite::open_connection(&path)?;
        f(&mut conn)
    })
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| StoreError::Transient(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Commands and ingestion retry the same SQLite errors: only the data's
    /// own faults are permanent (an unexpected SQL error is retried, not failed).
    #[test]
    fn sqlite_errors_are_classified_as_the_sink_classifies_them() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (x TEXT NOT NULL)").unwrap();
        let constraint = conn.execute("INSERT INTO t (x) VALUES (NULL)", []).unwrap_err();
        let missing_table = conn.execute("INSERT INTO missing (x) VALUES (1)", []).unwrap_err();
        for (e, permanent) in [(constraint, true), (missing_table, false)] {
            assert_eq!(crate::backend::sqlite::is_permanent(&e), permanent, "{e}");
            assert_eq!(matches!(StoreError::from(e), StoreError::Permanent(_)), permanent);
        }
    }
}
