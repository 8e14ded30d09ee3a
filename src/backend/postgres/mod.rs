//! The PostgreSQL backend: its DDL and migrations, a small connection pool
//! shared by every operation, and the one classification of its errors.
//! CreateMultiple is in [`create`], the other operations' SQL in [`records`].

use std::sync::Arc;

use std::sync::Mutex;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::{Client, Statement};

pub mod connect;
mod create;
mod policies;
mod records;
mod statistics;

pub use create::encode_copy_rows;

use super::BackendError;
use crate::table::{Column, ColumnType, EXTRA_COLUMNS, ExtraColumnKind, table};

pub struct PostgresBackend {
    url: String,
    topic: String,
    idle: Mutex<Vec<Pooled>>,
    permits: Semaphore,
    /// Connections of the reads that serve the Web API and the control
    /// topic's Retrieve messages, apart from `permits`: a page never waits
    /// behind the writer's batches, nor takes a connection from them.
    read_permits: Semaphore,
    insert_sql: String,
    copy_cooldown: create::CopyCooldown,
    metrics: Arc<crate::metrics::Metrics>,
    statistics: Arc<statistics::PlannerStatistics>,
}

/// SQLSTATE classes 22 (data exception) and 23 (integrity violation): the
/// data's fault, so retrying the same rows cannot succeed.
pub(crate) fn is_data_error(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| c.code().starts_with("22") || c.code().starts_with("23"))
}

/// Errors caused by the data are permanent; everything else — connection
/// loss, shutdown, missing database, lock timeouts — is retried.
impl From<tokio_postgres::Error> for BackendError {
    fn from(e: tokio_postgres::Error) -> Self {
        let message = match e.as_db_error() {
            Some(db) => format!("{}: {}", db.code().code(), db.message()),
            None => e.to_string(),
        };
        if is_data_error(&e) { BackendError::Permanent(message) } else { BackendError::Transient(message) }
    }
}

fn pg_type(c: &Column) -> String {
    match c.column_type {
        ColumnType::Uniqueidentifier | ColumnType::Lookup => "uuid".into(),
        ColumnType::String => format!("varchar({})", c.max_length.unwrap_or(100)),
        ColumnType::Memo => "text".into(),
        ColumnType::Picklist | ColumnType::State | ColumnType::Status | ColumnType::Integer => "integer".into(),
        ColumnType::Bigint => "bigint".into(),
        ColumnType::Datetime => "timestamptz".into(),
    }
}

/// PostgreSQL's type for each column beyond the table definition.
fn extra_type(kind: ExtraColumnKind) -> &'static str {
    match kind {
        ExtraColumnKind::DataState => "integer NOT NULL DEFAULT 0",
        ExtraColumnKind::Guid => "uuid",
        ExtraColumnKind::Text => "text",
        ExtraColumnKind::Int => "integer",
        ExtraColumnKind::Bigint => "bigint",
    }
}

/// Creates or upgrades the tables; idempotent and safe to run from several
/// instances at once (serialized by an advisory lock).
pub async fn migrate(client: &Client) -> Result<(), tokio_postgres::Error> {
    let t = table();
    let name = &t.logical_name;
    let id = &t.primary_id_attribute;
    let seq = format!("{name}_versionnumber_seq");
    let mut defs: Vec<String> = Vec::new();
    for c in t.stored_columns() {
        let mut def = format!("{} {}", c.logical_name, pg_type(c));
        if c.logical_name == *id {
            def.push_str(" PRIMARY KEY");
        } else if c.logical_name == "versionnumber" {
            def.push_str(&format!(" NOT NULL DEFAULT nextval('{seq}')"));
        }
        defs.push(def);
    }
    for (col, kind) in EXTRA_COLUMNS {
        defs.push(format!("{col} {}", extra_type(kind)));
    }
    client.batch_execute("SELECT pg_advisory_lock(7215300001)").await?;
    let result = async {
        client
            .batch_execute(&format!(
                "CREATE SEQUENCE IF NOT EXISTS {seq};
                 CREATE TABLE IF NOT EXISTS {name} ({});
                 CREATE TABLE IF NOT EXISTS {tombstones} ({id} uuid PRIMARY KEY, purgedon timestamptz NOT NULL, versionnumber bigint,
                     retention_operationid uuid);
                 CREATE INDEX IF NOT EXISTS {name}_createdon_idx ON {name} (createdon);
                 CREATE TABLE IF NOT EXISTS {ledger} (ingest_topic text NOT NULL, ingest_partition integer NOT NULL,
                     ingest_offset bigint NOT NULL, message_digest text NOT NULL, sent_at timestamptz NOT NULL DEFAULT now(),
                     PRIMARY KEY (ingest_topic, ingest_partition, ingest_offset, message_digest));",
                defs.join(", "),
                ledger = super::DEAD_LETTER_TABLE,
                tombstones = t.tombstone_table()
            ))
            .await?;
        for def in defs.iter().skip(1) {
            client.batch_execute(&format!("ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {def}")).await?;
        }
        client.batch_execute(&records::ddl()).await?;
        client.batch_execute(&policies::ddl()).await?;
        Ok(())
    }
    .await;
    client.batch_execute("SELECT pg_advisory_unlock(7215300001)").await?;
    result
}

pub use connect::connect;

/// Connections kept for record reads beside the writer's (as SQLite keeps
/// two read connections).
const READ_CONNECTIONS: usize = 2;

/// A connection with its prepared insert, prepared by the first write on it:
/// preparing an INSERT takes a lock on the table, and a connection that only
/// serves reads must not wait for it (behind a `LOCK TABLE`, say).
struct Pooled {
    client: Client,
    insert: Option<Statement>,
}

impl Pooled {
    async fn insert(&mut self, sql: &str) -> Result<Statement, BackendError> {
        if let Some(statement) = &self.insert {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.insert = Some(statement.clone());
        Ok(statement)
    }
}

/// A connection borrowed from the pool (see [`PostgresBackend::lease`]).
struct Lease<'a> {
    backend: &'a PostgresBackend,
    pooled: Option<Pooled>,
    _permit: SemaphorePermit<'a>,
}

impl Lease<'_> {
    fn client(&mut self) -> Result<&mut Client, BackendError> {
        self.pooled.as_mut().map(|p| &mut p.client).ok_or_else(|| BackendError::Transient("connection returned".into()))
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(pooled) = self.pooled.take() {
            self.backend.put_back(pooled);
        }
    }
}

impl PostgresBackend {
    pub async fn open(
        url: &str,
        topic: &str,
        connections: usize,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<PostgresBackend, BackendError> {
        let client = connect(url).await?;
        migrate(&client).await.map_err(|e| BackendError::Transient(format!("migrating: {e}")))?;
        let insert_sql = create::insert_sql();
        // Prepared once here all the same: a table the insert does not fit
        // (a column missing after a failed migration) fails at start.
        let insert = Some(client.prepare(&insert_sql).await?);
        // No ANALYZE at start: statistics of a still-empty table made the
        // planner take it for empty after the first rows arrived (a retention
        // page over 6,000 rows ran for minutes); the first one waits for rows.
        let statistics = Arc::new(statistics::PlannerStatistics::default());
        Ok(PostgresBackend {
            url: url.to_owned(),
            topic: topic.to_owned(),
            idle: Mutex::new(vec![Pooled { client, insert }]),
            permits: Semaphore::new(connections.max(1)),
            read_permits: Semaphore::new(READ_CONNECTIONS),
            insert_sql,
            copy_cooldown: create::CopyCooldown::default(),
            metrics,
            statistics,
        })
    }

    async fn client(&self) -> Result<Pooled, BackendError> {
        let reusable = {
            let mut idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let mut found = None;
            while let Some(c) = idle.pop() {
                if !c.client.is_closed() {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        match reusable {
            Some(c) => Ok(c),
            None => {
                let client = connect(&self.url).await?;
                Ok(Pooled { client, insert: None })
            }
        }
    }

    fn put_back(&self, client: Pooled) {
        if !client.client.is_closed() {
            self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(client);
        }
    }

    /// A pooled connection within the connection budget, returned to the
    /// pool when the lease is dropped.
    /// One statement on a pooled connection: the rows it changed.
    pub(super) async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, BackendError> {
        Ok(self.lease().await?.client()?.execute(sql, params).await?)
    }

    /// One query on a pooled connection: its rows.
    pub(super) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, BackendError> {
        Ok(self.lease().await?.client()?.query(sql, params).await?)
    }

    /// One query on a pooled connection: its row, if any.
    pub(super) async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, BackendError> {
        Ok(self.lease().await?.client()?.query_opt(sql, params).await?)
    }

    async fn lease(&self) -> Result<Lease<'_>, BackendError> {
        self.lease_within(&self.permits).await
    }

    /// A connection for a record read (Retrieve, a RetrieveMultiple page, a
    /// count), within the read budget.
    async fn read_lease(&self) -> Result<Lease<'_>, BackendError> {
        self.lease_within(&self.read_permits).await
    }

    async fn lease_within<'a>(&'a self, budget: &'a Semaphore) -> Result<Lease<'a>, BackendError> {
        let permit = budget.acquire().await.map_err(|e| BackendError::Transient(e.to_string()))?;
        let pooled = self.client().await?;
        Ok(Lease { backend: self, pooled: Some(pooled), _permit: permit })
    }

    pub async fn dead_letter(
        &self,
        op: super::DeadLetterOp,
        letter: &super::DeadLetterKey<'_>,
    ) -> Result<bool, BackendError> {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&letter.topic, &letter.partition, &letter.offset, &letter.digest];
        // Same connection budget as the writes: dead letters never open more.
        let _permit = self.permits.acquire().await.map_err(|e| BackendError::Transient(e.to_string()))?;
        let pooled = self.client().await?;
        let result = match op {
            super::DeadLetterOp::Check => {
                pooled.client.query_one(&op.postgres_sql(), &params).await.map(|row| row.get::<_, i64>(0) > 0)
            }
            super::DeadLetterOp::Record => pooled.client.execute(&op.postgres_sql(), &params).await.map(|_| true),
        };
        self.put_back(pooled);
        result.map_err(BackendError::from)
    }

    pub async fn ping(&self) -> bool {
        match self.client().await {
            Ok(c) => {
                let ok = c.client.simple_query("SELECT 1").await.is_ok();
                self.put_back(c);
                ok
            }
            Err(_) => false,
        }
    }
}
