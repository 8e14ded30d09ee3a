//! Retention policies and the operation rows read back, on PostgreSQL.
//! Times are Unix milliseconds (`*_ms`), as on SQLite; the claim is one
//! compare-and-set `UPDATE … RETURNING`, so of many instances sharing the
//! database exactly one runs each due run (the row lock serialises them and
//! the loser's `WHERE` no longer matches).

use chrono::{DateTime, Utc};
use tokio_postgres::Row;
use uuid::Uuid;

use super::PostgresBackend;
use crate::backend::policy_sql::{
    CLAIM_SET, CLAIM_WHERE, ColumnValues, FINISH_SET, OPERATION_COLUMNS, POLICY_COLUMNS, millis as ms, policy_of, uuid,
};
use crate::backend::{BackendError, OPERATION_TABLE, OperationRecord, POLICY_TABLE, PolicyClaim};
use crate::operations::policy::{PolicyRecord, PolicyStatus, RetentionPolicy};

/// The policy table, and the operation columns a policy run adds.
pub(super) fn ddl() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {POLICY_TABLE} (uniquename text PRIMARY KEY, name text NOT NULL,
            entitylogicalname text NOT NULL, criteria text NOT NULL, starttime_ms bigint NOT NULL,
            recurrence text NOT NULL, statuscode bigint NOT NULL, purge_after_seconds bigint,
            page_size bigint NOT NULL, source text NOT NULL, nextrun_ms bigint,
            run_operationid text, run_due_ms bigint, run_lease_until_ms bigint,
            lastrun_ms bigint, last_outcome text, last_success_ms bigint, last_operationid text,
            createdon_ms bigint NOT NULL, modifiedon_ms bigint NOT NULL);
         ALTER TABLE {OPERATION_TABLE} ADD COLUMN IF NOT EXISTS purged bigint NOT NULL DEFAULT 0;
         ALTER TABLE {OPERATION_TABLE} ADD COLUMN IF NOT EXISTS policy text;
         ALTER TABLE {OPERATION_TABLE} ADD COLUMN IF NOT EXISTS error text;"
    )
}

impl ColumnValues for Row {
    type Error = tokio_postgres::Error;
    fn text(&self, k: usize) -> Result<Option<String>, tokio_postgres::Error> {
        self.try_get(k)
    }
    fn int(&self, k: usize) -> Result<Option<i64>, tokio_postgres::Error> {
        self.try_get(k)
    }
}

fn operation_of(r: &Row) -> Result<OperationRecord, tokio_postgres::Error> {
    Ok(OperationRecord {
        operation_id: r.try_get(0)?,
        command_id: r.try_get(1)?,
        message: r.try_get(2)?,
        policy: r.try_get(3)?,
        criteria: r.try_get(4)?,
        status: r.try_get(5)?,
        total: r.try_get(6)?,
        purged: r.try_get(7)?,
        started_on: r.try_get(8)?,
        ended_on: r.try_get(9)?,
        error: r.try_get(10)?,
    })
}

impl PostgresBackend {
    pub(crate) async fn operation(&self, operation_id: Uuid) -> Result<Option<OperationRecord>, BackendError> {
        let row = self
            .query_opt(
                &format!("SELECT {OPERATION_COLUMNS} FROM {OPERATION_TABLE} WHERE operationid = $1"),
                &[&operation_id],
            )
            .await?;
        Ok(row.as_ref().map(operation_of).transpose()?)
    }

    pub(crate) async fn operations(&self, limit: i64) -> Result<Vec<OperationRecord>, BackendError> {
        let rows = self
            .query(
                &format!(
                    "SELECT {OPERATION_COLUMNS} FROM {OPERATION_TABLE} ORDER BY started_on DESC, operationid LIMIT $1"
                ),
                &[&limit],
            )
            .await?;
        Ok(rows.iter().map(operation_of).collect::<Result<_, _>>()?)
    }

    pub(crate) async fn set_operation_error(&self, operation_id: Uuid, error: &str) -> Result<(), BackendError> {
        self.execute(
            &format!("UPDATE {OPERATION_TABLE} SET error = $2 WHERE operationid = $1"),
            &[&operation_id, &error],
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn policies(&self) -> Result<Vec<PolicyRecord>, BackendError> {
        let rows = self.query(&format!("SELECT {POLICY_COLUMNS} FROM {POLICY_TABLE} ORDER BY uniquename"), &[]).await?;
        Ok(rows.iter().map(policy_of).collect::<Result<_, _>>()?)
    }

    pub(crate) async fn save_policy(
        &self,
        p: &RetentionPolicy,
        next_run: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        self.execute(
            &format!(
                "INSERT INTO {POLICY_TABLE} (uniquename, name, entitylogicalname, criteria, starttime_ms, recurrence,
                        statuscode, purge_after_seconds, page_size, source, nextrun_ms, createdon_ms, modifiedon_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)
                     ON CONFLICT (uniquename) DO UPDATE SET name = excluded.name,
                        entitylogicalname = excluded.entitylogicalname, criteria = excluded.criteria,
                        starttime_ms = excluded.starttime_ms, recurrence = excluded.recurrence,
                        statuscode = excluded.statuscode, purge_after_seconds = excluded.purge_after_seconds,
                        page_size = excluded.page_size, source = excluded.source, nextrun_ms = excluded.nextrun_ms,
                        modifiedon_ms = excluded.modifiedon_ms"
            ),
            &[
                &p.uniquename,
                &p.name,
                &p.entitylogicalname,
                &p.criteria,
                &ms(p.starttime),
                &p.recurrence,
                &p.status.statuscode(),
                &p.purge_after_seconds,
                &p.page_size,
                &p.source.name(),
                &next_run.map(ms),
                &ms(now),
            ],
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn delete_policy(&self, uniquename: &str) -> Result<bool, BackendError> {
        let n = self.execute(&format!("DELETE FROM {POLICY_TABLE} WHERE uniquename = $1"), &[&uniquename]).await?;
        Ok(n == 1)
    }

    pub(crate) async fn claim_policy_run(
        &self,
        claim: &PolicyClaim,
    ) -> Result<Option<(Uuid, DateTime<Utc>)>, BackendError> {
        let row = self
            .query_opt(
                &format!(
                    "UPDATE {POLICY_TABLE} SET {CLAIM_SET} WHERE uniquename = $1 AND {CLAIM_WHERE}
                     RETURNING run_operationid, run_due_ms"
                ),
                &[
                    &claim.uniquename,
                    &claim.operation_id.hyphenated().to_string(),
                    &ms(claim.now),
                    &claim.next_run.map(ms),
                    &ms(claim.lease_until),
                    &PolicyStatus::Scheduled.statuscode(),
                ],
            )
            .await?;
        let Some(row) = row else { return Ok(None) };
        let (op, due): (Option<String>, Option<i64>) = (row.try_get(0)?, row.try_get(1)?);
        Ok(uuid(op).zip(due.and_then(DateTime::from_timestamp_millis)))
    }

    pub(crate) async fn renew_policy_lease(
        &self,
        uniquename: &str,
        operation_id: Uuid,
        lease_until: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        self.execute(
            &format!(
                "UPDATE {POLICY_TABLE} SET run_lease_until_ms = $3 WHERE uniquename = $1 AND run_operationid = $2"
            ),
            &[&uniquename, &operation_id.hyphenated().to_string(), &ms(lease_until)],
        )
        .await?;
        Ok(())
    }

    pub(crate) async fn finish_policy_run(
        &self,
        uniquename: &str,
        operation_id: Uuid,
        outcome: &str,
        now: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        self.execute(
            &format!("UPDATE {POLICY_TABLE} SET {FINISH_SET} WHERE uniquename = $1 AND run_operationid = $2"),
            &[&uniquename, &operation_id.hyphenated().to_string(), &outcome, &ms(now)],
        )
        .await?;
        Ok(())
    }
}
