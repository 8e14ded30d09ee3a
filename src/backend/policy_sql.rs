//! The policy table as both SQL backends read and write it, written once:
//! the columns, the row-to-policy mapping (over [`ColumnValues`], which each
//! backend's row type implements) and the statements of the scheduler's claim
//! (PostgreSQL's `$n` placeholders; [`sqlite`] turns them into SQLite's `?n`).
//! Times are Unix milliseconds in both.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::operations::policy::{PolicyRecord, PolicySource, PolicyStatus, RetentionPolicy};

/// The policy columns every read selects, in the order [`policy_of`] reads them.
pub const POLICY_COLUMNS: &str = "uniquename, name, entitylogicalname, criteria, starttime_ms, recurrence, statuscode,
    purge_after_seconds, page_size, source, nextrun_ms, lastrun_ms, last_outcome, last_success_ms, last_operationid,
    run_operationid, createdon_ms, modifiedon_ms";

/// The operation columns every read selects, in this order.
pub const OPERATION_COLUMNS: &str =
    "operationid, command_id, message, policy, criteria, status, total, purged, started_on, ended_on, error";

/// A time as the policy table stores it.
pub fn millis(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn time(ms: Option<i64>) -> Option<DateTime<Utc>> {
    ms.and_then(DateTime::from_timestamp_millis)
}

/// A stored id (text), if it reads as one.
pub fn uuid(text: Option<String>) -> Option<Uuid> {
    text.and_then(|t| Uuid::parse_str(&t).ok())
}

/// The two kinds of value a policy row holds, by column position.
pub trait ColumnValues {
    type Error;
    fn text(&self, k: usize) -> Result<Option<String>, Self::Error>;
    fn int(&self, k: usize) -> Result<Option<i64>, Self::Error>;
}

/// A row of [`POLICY_COLUMNS`] as a policy and its schedule's state.
pub fn policy_of<R: ColumnValues>(r: &R) -> Result<PolicyRecord, R::Error> {
    let text = |k| Ok::<_, R::Error>(r.text(k)?.unwrap_or_default());
    Ok(PolicyRecord {
        policy: RetentionPolicy {
            uniquename: text(0)?,
            name: text(1)?,
            entitylogicalname: text(2)?,
            criteria: text(3)?,
            starttime: time(r.int(4)?).unwrap_or_default(),
            recurrence: text(5)?,
            status: r.int(6)?.and_then(PolicyStatus::from_statuscode).unwrap_or(PolicyStatus::Unscheduled),
            purge_after_seconds: r.int(7)?,
            page_size: r.int(8)?.unwrap_or(crate::operations::parameters::DEFAULT_PAGE_SIZE),
            source: PolicySource::parse(&text(9)?),
        },
        next_run: time(r.int(10)?),
        last_run: time(r.int(11)?),
        last_outcome: r.text(12)?,
        last_success: time(r.int(13)?),
        last_operation_id: uuid(r.text(14)?),
        running_operation_id: uuid(r.text(15)?),
        created_on: time(r.int(16)?).unwrap_or_default(),
        modified_on: time(r.int(17)?).unwrap_or_default(),
    })
}

/// The claim's compare-and-set, shared by both backends' SQL (the same
/// placeholders: 1 uniquename, 2 new operation id, 3 now, 4 next run,
/// 5 lease end, 6 the Scheduled statuscode). The SET expressions read the
/// row as it was, so a takeover keeps its operation, due time and next run.
pub const CLAIM_SET: &str = "
    nextrun_ms = CASE WHEN run_operationid IS NULL THEN $4 ELSE nextrun_ms END,
    run_due_ms = CASE WHEN run_operationid IS NULL THEN nextrun_ms ELSE run_due_ms END,
    run_operationid = COALESCE(run_operationid, $2),
    run_lease_until_ms = $5";
pub const CLAIM_WHERE: &str = "statuscode = $6
    AND ((run_operationid IS NULL AND nextrun_ms IS NOT NULL AND nextrun_ms <= $3)
         OR (run_operationid IS NOT NULL AND run_lease_until_ms < $3))";
/// Ends a run (placeholders: 1 uniquename, 2 its operation id, 3 outcome, 4 now).
pub const FINISH_SET: &str = "run_operationid = NULL, run_due_ms = NULL, run_lease_until_ms = NULL,
    lastrun_ms = $4, last_outcome = $3, last_operationid = $2,
    last_success_ms = CASE WHEN $3 = 'Succeeded' THEN $4 ELSE last_success_ms END";

/// A statement of this module with SQLite's placeholders.
pub fn sqlite(sql: &str) -> String {
    sql.replace('$', "?")
}
