//! The statements of the policy scheduler's claim, written once for both
//! SQL backends (PostgreSQL's `$n` placeholders; [`sqlite`] turns them into
//! SQLite's `?n`). Times are Unix milliseconds in both.

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
