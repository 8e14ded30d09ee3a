//! Retention policies and the operation rows read back, on SQLite. Times
//! are stored as Unix milliseconds (`*_ms`), so both backends compare them
//! the same way. SQLite is single-instance, but the claim is the same
//! compare-and-set as PostgreSQL's, so the scheduler has one code path.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Row};
use uuid::Uuid;

use super::SqliteBackend;
use crate::backend::policy_sql::{
    CLAIM_SET, CLAIM_WHERE, ColumnValues, FINISH_SET, OPERATION_COLUMNS, POLICY_COLUMNS, millis as ms, policy_of,
    sqlite, uuid,
};
use crate::backend::{BackendError, OPERATION_TABLE, OperationRecord, POLICY_TABLE, PolicyClaim};
use crate::operations::policy::{PolicyRecord, PolicyStatus, RetentionPolicy};

/// The policy table, and the operation columns a policy run adds.
pub(super) fn ddl(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {POLICY_TABLE} (uniquename TEXT PRIMARY KEY NOT NULL, name TEXT NOT NULL,
            entitylogicalname TEXT NOT NULL, criteria TEXT NOT NULL, starttime_ms INTEGER NOT NULL,
            recurrence TEXT NOT NULL, statuscode INTEGER NOT NULL, purge_after_seconds INTEGER,
            page_size INTEGER NOT NULL, source TEXT NOT NULL, nextrun_ms INTEGER,
            run_operationid TEXT, run_due_ms INTEGER, run_lease_until_ms INTEGER,
            lastrun_ms INTEGER, last_outcome TEXT, last_success_ms INTEGER, last_operationid TEXT,
            createdon_ms INTEGER NOT NULL, modifiedon_ms INTEGER NOT NULL)"
    ))?;
    let columns: Vec<String> = {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({OPERATION_TABLE})"))?;
        stmt.query_map([], |r| r.get::<_, String>(1))?.collect::<Result<_, _>>()?
    };
    for (column, def) in [("purged", "INTEGER NOT NULL DEFAULT 0"), ("policy", "TEXT"), ("error", "TEXT")] {
        if !columns.iter().any(|c| c == column) {
            conn.execute_batch(&format!("ALTER TABLE {OPERATION_TABLE} ADD COLUMN {column} {def}"))?;
        }
    }
    Ok(())
}

impl ColumnValues for Row<'_> {
    type Error = rusqlite::Error;
    fn text(&self, k: usize) -> rusqlite::Result<Option<String>> {
        self.get(k)
    }
    fn int(&self, k: usize) -> rusqlite::Result<Option<i64>> {
        self.get(k)
    }
}

fn operation_of(r: &Row<'_>) -> rusqlite::Result<OperationRecord> {
    let datetime = |k: usize| -> rusqlite::Result<Option<DateTime<Utc>>> {
        Ok(r.get::<_, Option<String>>(k)?.and_then(|t| DateTime::parse_from_rfc3339(&t).ok()).map(|d| d.to_utc()))
    };
    Ok(OperationRecord {
        operation_id: uuid(r.get(0)?).unwrap_or_default(),
        command_id: r.get(1)?,
        message: r.get(2)?,
        policy: r.get(3)?,
        criteria: r.get(4)?,
        status: r.get(5)?,
        total: r.get(6)?,
        purged: r.get(7)?,
        started_on: datetime(8)?.unwrap_or_default(),
        ended_on: datetime(9)?,
        error: r.get(10)?,
    })
}

impl SqliteBackend {
    pub(crate) async fn operation(&self, operation_id: Uuid) -> Result<Option<OperationRecord>, BackendError> {
        self.read(move |conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {OPERATION_COLUMNS} FROM {OPERATION_TABLE} WHERE operationid = ?1"),
                    [operation_id.hyphenated().to_string()],
                    operation_of,
                )
                .optional()?)
        })
        .await
    }

    pub(crate) async fn operations(&self, limit: i64) -> Result<Vec<OperationRecord>, BackendError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {OPERATION_COLUMNS} FROM {OPERATION_TABLE} ORDER BY started_on DESC, operationid LIMIT ?1"
            ))?;
            Ok(stmt.query_map([limit], operation_of)?.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(crate) async fn set_operation_error(&self, operation_id: Uuid, error: &str) -> Result<(), BackendError> {
        let error = error.to_owned();
        self.run(move |conn| {
            conn.execute(
                &format!("UPDATE {OPERATION_TABLE} SET error = ?2 WHERE operationid = ?1"),
                rusqlite::params![operation_id.hyphenated().to_string(), error],
            )?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn policies(&self) -> Result<Vec<PolicyRecord>, BackendError> {
        self.read(move |conn| {
            let mut stmt = conn.prepare(&format!("SELECT {POLICY_COLUMNS} FROM {POLICY_TABLE} ORDER BY uniquename"))?;
            Ok(stmt.query_map([], |r| policy_of(r))?.collect::<Result<_, _>>()?)
        })
        .await
    }

    pub(crate) async fn save_policy(
        &self,
        policy: &RetentionPolicy,
        next_run: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        let p = policy.clone();
        self.run(move |conn| {
            conn.execute(
                &format!(
                    "INSERT INTO {POLICY_TABLE} (uniquename, name, entitylogicalname, criteria, starttime_ms, recurrence,
                        statuscode, purge_after_seconds, page_size, source, nextrun_ms, createdon_ms, modifiedon_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?12)
                     ON CONFLICT (uniquename) DO UPDATE SET name = excluded.name,
                        entitylogicalname = excluded.entitylogicalname, criteria = excluded.criteria,
                        starttime_ms = excluded.starttime_ms, recurrence = excluded.recurrence,
                        statuscode = excluded.statuscode, purge_after_seconds = excluded.purge_after_seconds,
                        page_size = excluded.page_size, source = excluded.source, nextrun_ms = excluded.nextrun_ms,
                        modifiedon_ms = excluded.modifiedon_ms"
                ),
                rusqlite::params![
                    p.uniquename,
                    p.name,
                    p.entitylogicalname,
                    p.criteria,
                    ms(p.starttime),
                    p.recurrence,
                    p.status.statuscode(),
                    p.purge_after_seconds,
                    p.page_size,
                    p.source.name(),
                    next_run.map(ms),
                    ms(now)
                ],
            )?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn delete_policy(&self, uniquename: &str) -> Result<bool, BackendError> {
        let uniquename = uniquename.to_owned();
        self.run(move |conn| {
            Ok(conn.execute(&format!("DELETE FROM {POLICY_TABLE} WHERE uniquename = ?1"), [uniquename])? == 1)
        })
        .await
    }

    pub(crate) async fn claim_policy_run(
        &self,
        claim: &PolicyClaim,
    ) -> Result<Option<(Uuid, DateTime<Utc>)>, BackendError> {
        let claim = claim.clone();
        self.run(move |conn| {
            let won: Option<(String, i64)> = conn
                .query_row(
                    &sqlite(&format!(
                        "UPDATE {POLICY_TABLE} SET {CLAIM_SET} WHERE uniquename = $1 AND {CLAIM_WHERE}
                         RETURNING run_operationid, run_due_ms"
                    )),
                    rusqlite::params![
                        claim.uniquename,
                        claim.operation_id.hyphenated().to_string(),
                        ms(claim.now),
                        claim.next_run.map(ms),
                        ms(claim.lease_until),
                        PolicyStatus::Scheduled.statuscode()
                    ],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(won.and_then(|(op, due)| Some((Uuid::parse_str(&op).ok()?, DateTime::from_timestamp_millis(due)?))))
        })
        .await
    }

    pub(crate) async fn renew_policy_lease(
        &self,
        uniquename: &str,
        operation_id: Uuid,
        lease_until: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        let uniquename = uniquename.to_owned();
        self.run(move |conn| {
            conn.execute(
                &format!(
                    "UPDATE {POLICY_TABLE} SET run_lease_until_ms = ?3 WHERE uniquename = ?1 AND run_operationid = ?2"
                ),
                rusqlite::params![uniquename, operation_id.hyphenated().to_string(), ms(lease_until)],
            )?;
            Ok(())
        })
        .await
    }

    pub(crate) async fn finish_policy_run(
        &self,
        uniquename: &str,
        operation_id: Uuid,
        outcome: &str,
        now: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        let (uniquename, outcome) = (uniquename.to_owned(), outcome.to_owned());
        self.run(move |conn| {
            conn.execute(
                &sqlite(&format!(
                    "UPDATE {POLICY_TABLE} SET {FINISH_SET} WHERE uniquename = $1 AND run_operationid = $2"
                )),
                rusqlite::params![uniquename, operation_id.hyphenated().to_string(), outcome, ms(now)],
            )?;
            Ok(())
        })
        .await
    }
}
