//! The table's operations beyond CreateMultiple on PostgreSQL: reads,
//! retention pages, tombstones, operation rows, stored replies and the
//! command claim. Connections come from the backend's pool; every page is one
//! transaction that also adds its count to the operation's total, so a run
//! killed halfway resumes with exact counts. Pages lock their rows with
//! `FOR UPDATE SKIP LOCKED`, so instances sharing the database never wait on
//! each other's pages.

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row};
use uuid::Uuid;

use super::{PostgresBackend, connect};
use crate::backend::{
    BackendError, DEAD_LETTER_TABLE, DeletePage, OPERATION_TABLE, OperationCounter, OperationStart, REPLY_TABLE,
    RecordState, RollbackCounts, RollbackScope, RowUpdate, update_columns,
};
use crate::query::fetchxml::{Criteria, Dialect, Param, Predicate};
use crate::query::page::PageQuery;
use crate::record::format_datetime;
use crate::table::{ColumnType, table};

/// The tables of the operations' bookkeeping, and the index retention uses:
/// partial, because the column is empty for every live record, and a full
/// index cost every insert an entry (COPY of 400,000 rows: 105k–139k rows/s
/// with it, 154k–158k with the partial one; a query by operation id uses
/// the partial index alike).
pub(super) fn ddl() -> String {
    let t = table();
    format!(
        "CREATE TABLE IF NOT EXISTS {OPERATION_TABLE} (operationid uuid PRIMARY KEY, command_id text NOT NULL, message text NOT NULL,
            criteria text, status text NOT NULL, total bigint NOT NULL DEFAULT 0, started_on timestamptz NOT NULL, ended_on timestamptz);
         CREATE TABLE IF NOT EXISTS {REPLY_TABLE} (command_id text PRIMARY KEY, message text, reply text NOT NULL, created_on timestamptz NOT NULL);
         ALTER TABLE {tombstones} ADD COLUMN IF NOT EXISTS retention_operationid uuid;
         ALTER TABLE {tombstones} ADD COLUMN IF NOT EXISTS deleted_by text;
         DROP INDEX IF EXISTS {name}_retention_op_idx;
         CREATE INDEX IF NOT EXISTS {name}_retention_op_partial_idx ON {name} (msft_retention_operationid)
             WHERE msft_retention_operationid IS NOT NULL;",
        name = t.logical_name,
        tombstones = t.tombstone_table()
    )
}

type BoxedParam = Box<dyn ToSql + Sync + Send>;

fn param(p: &Param) -> BoxedParam {
    match p {
        Param::Text(s) => Box::new(s.clone()),
        Param::Int(i) => Box::new(*i),
        Param::Guid(g) => Box::new(*g),
        Param::DateTime(d) => Box::new(*d as DateTime<Utc>),
    }
}

fn refs(params: &[BoxedParam]) -> Vec<&(dyn ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
}

/// A record value bound as its column's PostgreSQL type.
fn value_param(value: &crate::record::Value, column_type: ColumnType) -> BoxedParam {
    use crate::record::Value;
    match (value, column_type) {
        (Value::Text(s), _) => Box::new(Some(s.clone())),
        (Value::Guid(g), _) => Box::new(Some(*g)),
        (Value::DateTime(d), _) => Box::new(Some(*d)),
        (Value::Int(i), ColumnType::Bigint) => Box::new(Some(i64::from(*i))),
        (Value::Int(i), _) => Box::new(Some(*i)),
        (Value::Null, ColumnType::Uniqueidentifier | ColumnType::Lookup) => Box::new(None::<Uuid>),
        (Value::Null, ColumnType::String | ColumnType::Memo) => Box::new(None::<String>),
        (Value::Null, ColumnType::Datetime) => Box::new(None::<DateTime<Utc>>),
        (Value::Null, ColumnType::Bigint) => Box::new(None::<i64>),
        (Value::Null, _) => Box::new(None::<i32>),
    }
}

/// A PostgreSQL column as JSON: ids lowercase hyphenated, datetimes as the
/// sinks format them, numbers as numbers.
fn json_of(row: &Row, k: usize, column_type: ColumnType) -> Result<Json, tokio_postgres::Error> {
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

impl PostgresBackend {
    /// A session advisory lock on the command id, held by a connection of its
    /// own (outside the pool) for as long as the claim lives.
    pub(crate) async fn claim(&self, command_id: &str) -> Result<Option<Client>, BackendError> {
        let session = connect(&self.url).await?;
        let key = format!("copilot-ingest control command {command_id}");
        let claimed: bool =
            session.query_one("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", &[&key]).await?.get(0);
        Ok(claimed.then_some(session))
    }

    pub(crate) async fn prune(&self, cutoff: DateTime<Utc>) -> Result<(u64, u64), BackendError> {
        let mut lease = self.lease().await?;
        let client = lease.client()?;
        let letters =
            client.execute(&format!("DELETE FROM {DEAD_LETTER_TABLE} WHERE sent_at < $1"), &[&cutoff]).await?;
        let replies = client.execute(&format!("DELETE FROM {REPLY_TABLE} WHERE created_on < $1"), &[&cutoff]).await?;
        Ok((letters, replies))
    }

    pub(crate) async fn stored_reply(&self, command_id: &str) -> Result<Option<String>, BackendError> {
        let row =
            self.query_opt(&format!("SELECT reply FROM {REPLY_TABLE} WHERE command_id = $1"), &[&command_id]).await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(crate) async fn store_reply(
        &self,
        command_id: &str,
        message: Option<&str>,
        reply: &str,
    ) -> Result<(), BackendError> {
        self.execute(
            &format!(
                "INSERT INTO {REPLY_TABLE} (command_id, message, reply, created_on) VALUES ($1, $2, $3, now())
                     ON CONFLICT (command_id) DO NOTHING"
            ),
            &[&command_id, &message, &reply],
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn begin_operation(&self, start: &OperationStart) -> Result<i64, BackendError> {
        let mut lease = self.lease().await?;
        let client = lease.client()?;
        client
            .execute(
                &format!(
                    "INSERT INTO {OPERATION_TABLE} (operationid, command_id, message, criteria, status, started_on, policy)
                     VALUES ($1, $2, $3, $4, 'Marking', now(), $5) ON CONFLICT (operationid) DO NOTHING"
                ),
                &[&start.operation_id, &start.command_id, &start.message, &start.criteria, &start.policy],
            )
            .await?;
        let row = client
            .query_one(&format!("SELECT total FROM {OPERATION_TABLE} WHERE operationid = $1"), &[&start.operation_id])
            .await?;
        Ok(row.get(0))
    }

    pub(crate) async fn operation_message(&self, operation_id: Uuid) -> Result<Option<String>, BackendError> {
        let row = self
            .query_opt(&format!("SELECT message FROM {OPERATION_TABLE} WHERE operationid = $1"), &[&operation_id])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(crate) async fn set_operation_status(
        &self,
        operation_id: Uuid,
        status: &str,
        ended: bool,
    ) -> Result<(), BackendError> {
        let mut lease = self.lease().await?;
        let ended_on: Option<DateTime<Utc>> = ended.then(Utc::now);
        lease
            .client()?
            .execute(
                &format!(
                    "UPDATE {OPERATION_TABLE} SET status = $2, ended_on = COALESCE($3, ended_on) WHERE operationid = $1"
                ),
                &[&operation_id, &status, &ended_on],
            )
            .await?;
        Ok(())
    }

    /// One page of a bulk operation: `sql` (bound to `params`, then the
    /// predicate's values) and the operation's running total, in one
    /// transaction. Returns the rows the page changed.
    async fn page(
        &self,
        operation_id: Uuid,
        counter: OperationCounter,
        sql: &str,
        mut params: Vec<BoxedParam>,
        predicate: &Predicate,
    ) -> Result<i64, BackendError> {
        let mut lease = self.lease().await?;
        let tx = lease.client()?.transaction().await?;
        params.extend(predicate.params.iter().map(param));
        let n = tx.execute(sql, &refs(&params)).await? as i64;
        let column = counter.column();
        tx.execute(
            &format!("UPDATE {OPERATION_TABLE} SET {column} = {column} + $2 WHERE operationid = $1"),
            &[&operation_id, &n],
        )
        .await?;
        tx.commit().await?;
        Ok(n)
    }

    pub(crate) async fn retain_page(
        &self,
        operation_id: Uuid,
        criteria: &Criteria,
        limit: i64,
    ) -> Result<i64, BackendError> {
        let t = table();
        let (name, id) = (&t.logical_name, &t.primary_id_attribute);
        let predicate = criteria.compile(Dialect::Postgres, 3);
        let sql = format!(
            "UPDATE {name} SET msft_datastate = 1, versionnumber = nextval('{name}_versionnumber_seq'), msft_retention_operationid = $1
             WHERE {id} IN (SELECT {id} FROM {name} WHERE msft_datastate = 0 AND ({}) LIMIT $2 FOR UPDATE SKIP LOCKED)",
            predicate.sql
        );
        self.page(
            operation_id,
            OperationCounter::Total,
            &sql,
            vec![Box::new(operation_id), Box::new(limit)],
            &predicate,
        )
        .await
    }

    pub(crate) async fn rollback(&self, scope: RollbackScope) -> Result<RollbackCounts, BackendError> {
        let t = table();
        let (name, id) = (&t.logical_name, &t.primary_id_attribute);
        let (filter, tombstone_filter, key) = match scope {
            RollbackScope::Operation(op) => ("msft_retention_operationid", "retention_operationid", op),
            RollbackScope::Record(record) => (id.as_str(), id.as_str(), record),
        };
        let mut lease = self.lease().await?;
        let tx = lease.client()?.transaction().await?;
        let restored = tx
            .execute(
                &format!(
                    "UPDATE {name} SET msft_datastate = 0, versionnumber = nextval('{name}_versionnumber_seq'),
                     msft_retention_operationid = NULL WHERE msft_datastate = 1 AND {filter} = $1"
                ),
                &[&key],
            )
            .await? as i64;
        let purged: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {} WHERE {tombstone_filter} = $1", t.tombstone_table()), &[&key])
            .await?
            .get(0);
        tx.commit().await?;
        Ok(RollbackCounts { restored, purged })
    }

    pub(crate) async fn delete_page(
        &self,
        operation_id: Uuid,
        page: &DeletePage,
        limit: i64,
    ) -> Result<i64, BackendError> {
        let t = table();
        let (name, id, tombstones) = (&t.logical_name, &t.primary_id_attribute, t.tombstone_table());
        let predicate = page.criteria.compile(Dialect::Postgres, 6);
        let sql = format!(
            "WITH doomed AS (
                DELETE FROM {name} WHERE {id} IN (
                    SELECT {id} FROM {name} WHERE msft_datastate = $3 AND ($1::bigint IS NULL OR versionnumber <= $1::bigint)
                    AND ($5::timestamptz IS NULL OR msft_retention_operationid IN
                         (SELECT operationid FROM {OPERATION_TABLE} WHERE ended_on IS NOT NULL AND ended_on <= $5::timestamptz))
                    AND ({})
                    LIMIT $2 FOR UPDATE SKIP LOCKED)
                RETURNING {id}, versionnumber, msft_retention_operationid)
             INSERT INTO {tombstones} ({id}, purgedon, versionnumber, retention_operationid, deleted_by)
             SELECT {id}, now(), versionnumber, msft_retention_operationid, $4::text FROM doomed
             ON CONFLICT ({id}) DO NOTHING",
            predicate.sql
        );
        let params: Vec<BoxedParam> = vec![
            Box::new(page.max_version),
            Box::new(limit),
            Box::new(i32::from(page.retained)),
            Box::new(page.deleted_by.map(str::to_owned)),
            Box::new(page.retained_before),
        ];
        self.page(operation_id, page.counter, &sql, params, &predicate).await
    }

    pub(crate) async fn delete_record(&self, record: Uuid) -> Result<bool, BackendError> {
        let t = table();
        let (name, id) = (&t.logical_name, &t.primary_id_attribute);
        let sql = format!(
            "WITH doomed AS (DELETE FROM {name} WHERE {id} = $1 RETURNING {id}, versionnumber, msft_retention_operationid),
                  tombstone AS (INSERT INTO {} ({id}, purgedon, versionnumber, retention_operationid, deleted_by)
                     SELECT {id}, now(), versionnumber, msft_retention_operationid, 'Delete' FROM doomed
                     ON CONFLICT ({id}) DO NOTHING)
             SELECT count(*) FROM doomed",
            t.tombstone_table()
        );
        let mut lease = self.lease().await?;
        let deleted: i64 = lease.client()?.query_one(&sql, &[&record]).await?.get(0);
        Ok(deleted == 1)
    }

    pub(crate) async fn update_rows(&self, rows: &[RowUpdate]) -> Result<Option<usize>, BackendError> {
        let t = table();
        let name = &t.logical_name;
        let columns = update_columns();
        let mut sets: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(k, &(_, i))| format!("{} = ${}", t.columns[i].logical_name, k + 1))
            .collect();
        let n = columns.len();
        sets.extend([
            format!("statecode = ${}", n + 1),
            format!("versionnumber = nextval('{name}_versionnumber_seq')"),
            "modifiedon = now()".to_owned(),
        ]);
        let sql = format!(
            "UPDATE {name} SET {} WHERE {} = ${} AND msft_datastate = 0 AND (${}::bigint IS NULL OR versionnumber = ${}::bigint)",
            sets.join(", "),
            t.primary_id_attribute,
            n + 2,
            n + 3,
            n + 3
        );
        let mut lease = self.lease().await?;
        let tx = lease.client()?.transaction().await?;
        let statement = tx.prepare(&sql).await?;
        for (k, row) in rows.iter().enumerate() {
            let mut params: Vec<BoxedParam> = columns
                .iter()
                .map(|&(position, i)| value_param(&row.values[position], t.columns[i].column_type))
                .collect();
            params.push(Box::new(row.state_code));
            params.push(Box::new(row.id));
            params.push(Box::new(row.expected_version));
            if tx.execute(&statement, &refs(&params)).await? == 0 {
                // Dropping the transaction rolls every row back.
                return Ok(Some(k));
            }
        }
        tx.commit().await?;
        Ok(None)
    }

    pub(crate) async fn retrieve_page(&self, query: &PageQuery, limit: i64) -> Result<Vec<Vec<Json>>, BackendError> {
        let t = table();
        let names: Vec<&str> = query.columns.iter().map(|&i| t.columns[i].logical_name.as_str()).collect();
        let predicate = query.criteria.compile(Dialect::Postgres, 4);
        let keyset = query.keyset(Dialect::Postgres, 4 + predicate.params.len());
        let sql = format!(
            "SELECT {} FROM {} WHERE msft_datastate = $1 AND ({}) AND {} ORDER BY {} LIMIT $2 OFFSET $3",
            names.join(", "),
            t.logical_name,
            predicate.sql,
            keyset.sql,
            query.order_by()
        );
        let mut params: Vec<BoxedParam> =
            vec![Box::new(i32::from(query.criteria.retained)), Box::new(limit), Box::new(query.offset())];
        params.extend(predicate.params.iter().chain(&keyset.params).map(param));
        let mut lease = self.read_lease().await?;
        let rows = lease.client()?.query(&sql, &refs(&params)).await?;
        rows.iter()
            .map(|row| {
                query
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(k, &i)| json_of(row, k, t.columns[i].column_type))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(BackendError::from)
            })
            .collect()
    }

    pub(crate) async fn count(&self, criteria: &Criteria) -> Result<i64, BackendError> {
        let t = table();
        let predicate = criteria.compile(Dialect::Postgres, 2);
        let sql = format!("SELECT count(*) FROM {} WHERE msft_datastate = $1 AND ({})", t.logical_name, predicate.sql);
        let mut params: Vec<BoxedParam> = vec![Box::new(i32::from(criteria.retained))];
        params.extend(predicate.params.iter().map(param));
        let mut lease = self.read_lease().await?;
        Ok(lease.client()?.query_one(&sql, &refs(&params)).await?.get(0))
    }

    pub(crate) async fn record_state(&self, record: Uuid) -> Result<RecordState, BackendError> {
        let t = table();
        let (name, id) = (&t.logical_name, &t.primary_id_attribute);
        let mut lease = self.read_lease().await?;
        let client = lease.client()?;
        let state = client
            .query_opt(&format!("SELECT msft_datastate FROM {name} WHERE {id} = $1"), &[&record])
            .await?
            .map(|r| r.get::<_, i32>(0));
        let purged =
            client.query_opt(&format!("SELECT 1 FROM {} WHERE {id} = $1", t.tombstone_table()), &[&record]).await?;
        Ok(RecordState::of(state.map(i64::from), purged.is_some()))
    }

    pub(crate) async fn retrieve(&self, record: Uuid, columns: &[usize]) -> Result<Option<Vec<Json>>, BackendError> {
        let t = table();
        let names: Vec<&str> = columns.iter().map(|&i| t.columns[i].logical_name.as_str()).collect();
        let sql = format!("SELECT {} FROM {} WHERE {} = $1", names.join(", "), t.logical_name, t.primary_id_attribute);
        let mut lease = self.read_lease().await?;
        let Some(row) = lease.client()?.query_opt(&sql, &[&record]).await? else { return Ok(None) };
        let values = columns
            .iter()
            .enumerate()
            .map(|(k, &i)| json_of(&row, k, t.columns[i].column_type))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(values))
    }
}
