//! Sinks with CreateMultiple semantics (SPEC §5): a batch is one atomic write;
//! replays are skipped; conflicting ids and records the store refuses are
//! dead-lettered; transient failures are retried with backoff, forever.

pub mod dataverse;
pub mod policy_sql;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value as Json;
use uuid::Uuid;

use crate::batch::Batch;
use crate::config::SinkUrl;
use crate::metrics::Metrics;
use crate::operations::policy::{PolicyRecord, RetentionPolicy};
use crate::query::fetchxml::Criteria;
use crate::query::page::PageQuery;
use crate::reason::{Reason, Rejection};

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// Same id, same content already stored.
    Replay,
    /// The id was purged; it is never re-created.
    PurgedReplay,
    /// The id was deleted (Delete, BulkDelete); it is never re-created.
    DeletedReplay,
    /// Must go to the DLQ.
    Rejected(Rejection),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BackendError {
    /// Worth retrying as is: connection lost, database unavailable, lock timeout.
    #[error("transient sink error: {0}")]
    Transient(String),
    /// Caused by the data: retrying the same batch cannot succeed.
    #[error("permanent sink error: {0}")]
    Permanent(String),
    /// The configuration is wrong (credentials refused, app not a user of the
    /// environment): fatal at start-up; while running, retried like a
    /// transient error so nothing is lost while an operator fixes it.
    #[error("{0}")]
    Fatal(String),
}

/// The backends that run the table's operations themselves.
enum Records<'a> {
    Sqlite(&'a sqlite::SqliteBackend),
    Postgres(&'a postgres::PostgresBackend),
}

/// Calls the same method on whichever backend `records` is.
macro_rules! dispatch {
    ($records:expr, $method:ident($($arg:expr),*)) => {
        match $records {
            Records::Sqlite(b) => b.$method($($arg),*).await,
            Records::Postgres(b) => b.$method($($arg),*).await,
        }
    };
}
/// The configured sink.
pub enum Backend {
    Sqlite(sqlite::SqliteBackend),
    Postgres(postgres::PostgresBackend),
    Dataverse(Box<dataverse::DataverseBackend>),
}

impl Backend {
    /// Connects and migrates (idempotent).
    pub async fn open(
        url: &SinkUrl,
        topic: &str,
        connections: usize,
        metrics: &Arc<Metrics>,
    ) -> Result<Backend, BackendError> {
        match url {
            SinkUrl::Dataverse(target) => {
                Ok(Backend::Dataverse(Box::new(dataverse::DataverseBackend::open(target, Arc::clone(metrics)).await?)))
            }
            SinkUrl::Sqlite(path) => Ok(Backend::Sqlite(sqlite::SqliteBackend::open(path, topic)?)),
            SinkUrl::Postgres(url) => Ok(Backend::Postgres(
                postgres::PostgresBackend::open(url, topic, connections, Arc::clone(metrics)).await?,
            )),
        }
    }

    /// The `sink` metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
            Backend::Dataverse(_) => "dataverse",
        }
    }

    /// Writes the records at `indices` of `batch` as one atomic write.
    /// Returns one outcome per index, in order.
    pub async fn write(&self, batch: &Arc<Batch>, indices: &[usize]) -> Result<Vec<Outcome>, BackendError> {
        match self {
            Backend::Sqlite(s) => s.write(batch, indices).await,
            Backend::Postgres(s) => s.write(batch, indices).await,
            Backend::Dataverse(s) => s.write(batch, indices).await,
        }
    }

    /// Whether the message at these coordinates was already dead-lettered
    /// (then a redelivery must not send it again). Dataverse keeps no such
    /// ledger: always `false` there, so its dead letters are at-least-once.
    pub async fn dead_letter_sent(&self, letter: &DeadLetterKey<'_>) -> Result<bool, BackendError> {
        match self {
            Backend::Sqlite(s) => s.dead_letter(DeadLetterOp::Check, letter).await,
            Backend::Postgres(s) => s.dead_letter(DeadLetterOp::Check, letter).await,
            Backend::Dataverse(_) => Ok(false),
        }
    }

    /// Records that the broker acknowledged the dead letter of these coordinates.
    pub async fn record_dead_letter(&self, letter: &DeadLetterKey<'_>) -> Result<(), BackendError> {
        match self {
            Backend::Sqlite(s) => s.dead_letter(DeadLetterOp::Record, letter).await.map(drop),
            Backend::Postgres(s) => s.dead_letter(DeadLetterOp::Record, letter).await.map(drop),
            Backend::Dataverse(_) => Ok(()),
        }
    }

    /// The backend of the table's operations beyond CreateMultiple; `Err`
    /// for Dataverse, whose environment runs those messages itself.
    fn records(&self) -> Result<Records<'_>, BackendError> {
        match self {
            Backend::Sqlite(s) => Ok(Records::Sqlite(s)),
            Backend::Postgres(s) => Ok(Records::Postgres(s)),
            Backend::Dataverse(_) => {
                Err(BackendError::Permanent("the dataverse:// sink does not run this message itself".into()))
            }
        }
    }

    /// Claims `command_id` for this instance until the claim is dropped;
    /// `None` while another instance holds it. On PostgreSQL the claim is a
    /// session advisory lock, so a killed instance's claim ends with its
    /// connection and the command can resume elsewhere at once. SQLite is
    /// single-instance: one process, one control loop, nothing to claim.
    pub async fn claim(&self, command_id: &str) -> Result<Option<Claim>, BackendError> {
        match self.records()? {
            Records::Sqlite(_) => Ok(Some(Claim { _session: None })),
            Records::Postgres(p) => Ok(p.claim(command_id).await?.map(|session| Claim { _session: Some(session) })),
        }
    }

    /// Deletes dead-letter ledger entries and stored replies older than
    /// `cutoff`; returns how many of each. Tombstones are never pruned: they
    /// are the record of erasure. Safe because a signed command older than
    /// five minutes is refused anyway, and the topics' retention is shorter
    /// than the default age (7 days), so nothing that old is redelivered.
    pub async fn prune(&self, cutoff: DateTime<Utc>) -> Result<(u64, u64), BackendError> {
        dispatch!(self.records()?, prune(cutoff))
    }

    /// The reply stored for `command_id`, as JSON text.
    pub async fn stored_reply(&self, command_id: &str) -> Result<Option<String>, BackendError> {
        dispatch!(self.records()?, stored_reply(command_id))
    }

    /// Stores a command's reply (the first one stored wins).
    pub async fn store_reply(&self, command_id: &str, message: Option<&str>, reply: &str) -> Result<(), BackendError> {
        dispatch!(self.records()?, store_reply(command_id, message, reply))
    }

    /// Creates the operation row, or finds it; returns its running total.
    pub async fn begin_operation(&self, start: &OperationStart) -> Result<i64, BackendError> {
        dispatch!(self.records()?, begin_operation(start))
    }

    /// One operation's row.
    pub async fn operation(&self, operation_id: Uuid) -> Result<Option<OperationRecord>, BackendError> {
        dispatch!(self.records()?, operation(operation_id))
    }

    /// The newest operations, at most `limit` (newest first).
    pub async fn operations(&self, limit: i64) -> Result<Vec<OperationRecord>, BackendError> {
        dispatch!(self.records()?, operations(limit.clamp(1, MAX_OPERATIONS_LISTED)))
    }

    /// Records why an operation failed.
    pub async fn set_operation_error(&self, operation_id: Uuid, error: &str) -> Result<(), BackendError> {
        dispatch!(self.records()?, set_operation_error(operation_id, error))
    }

    /// Every stored retention policy, by uniquename.
    pub async fn policies(&self) -> Result<Vec<PolicyRecord>, BackendError> {
        dispatch!(self.records()?, policies())
    }

    /// Creates or replaces a policy's definition and sets its next run; its
    /// run history is kept.
    pub async fn save_policy(
        &self,
        policy: &RetentionPolicy,
        next_run: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        dispatch!(self.records()?, save_policy(policy, next_run, now))
    }

    /// Deletes a policy; `false` if there was none.
    pub async fn delete_policy(&self, uniquename: &str) -> Result<bool, BackendError> {
        dispatch!(self.records()?, delete_policy(uniquename))
    }

    /// Claims a policy's due run for this instance, in one statement so that
    /// exactly one of many instances wins: a run that is due (`nextrun <= now`
    /// and none in progress) becomes `claim.operation_id` and the next run
    /// moves to `claim.next_run`; a run whose lease expired (its instance was
    /// killed) is taken over with its own operation id, to resume. Returns the
    /// run claimed (operation id and due time), or `None`.
    pub async fn claim_policy_run(&self, claim: &PolicyClaim) -> Result<Option<(Uuid, DateTime<Utc>)>, BackendError> {
        dispatch!(self.records()?, claim_policy_run(claim))
    }

    /// Extends the lease of the run this instance holds.
    pub async fn renew_policy_lease(
        &self,
        uniquename: &str,
        operation_id: Uuid,
        lease_until: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        dispatch!(self.records()?, renew_policy_lease(uniquename, operation_id, lease_until))
    }

    /// Ends the run this instance holds, recording its outcome.
    pub async fn finish_policy_run(
        &self,
        uniquename: &str,
        operation_id: Uuid,
        outcome: &str,
        now: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        dispatch!(self.records()?, finish_policy_run(uniquename, operation_id, outcome, now))
    }

    /// The message that started an operation, if it exists.
    pub async fn operation_message(&self, operation_id: Uuid) -> Result<Option<String>, BackendError> {
        dispatch!(self.records()?, operation_message(operation_id))
    }

    /// Sets an operation's status; `ended` also stamps its end time.
    pub async fn set_operation_status(
        &self,
        operation_id: Uuid,
        status: &str,
        ended: bool,
    ) -> Result<(), BackendError> {
        dispatch!(self.records()?, set_operation_status(operation_id, status, ended))
    }

    /// Marks up to `limit` live records matching `criteria` retained, adding
    /// the count to the operation's total in the same transaction.
    pub async fn retain_page(&self, operation_id: Uuid, criteria: &Criteria, limit: i64) -> Result<i64, BackendError> {
        dispatch!(self.records()?, retain_page(operation_id, criteria, limit))
    }

    /// Returns the retained records of `scope` to live, in one transaction.
    pub async fn rollback(&self, scope: RollbackScope) -> Result<RollbackCounts, BackendError> {
        dispatch!(self.records()?, rollback(scope))
    }

    /// Deletes up to `limit` records of `page`, tombstoning each id, and adds
    /// the count to the operation's total, in one transaction.
    pub async fn delete_page(&self, operation_id: Uuid, page: &DeletePage, limit: i64) -> Result<i64, BackendError> {
        dispatch!(self.records()?, delete_page(operation_id, page, limit))
    }

    /// Deletes one record, live or retained, and tombstones its id; `false`
    /// if there was no such record.
    pub async fn delete_record(&self, id: Uuid) -> Result<bool, BackendError> {
        dispatch!(self.records()?, delete_record(id))
    }

    /// Writes new values into live records, all in one transaction. `Some(k)`
    /// when `rows[k]` matched no live record (or not its expected version):
    /// then nothing was written.
    pub async fn update_rows(&self, rows: &[RowUpdate]) -> Result<Option<usize>, BackendError> {
        dispatch!(self.records()?, update_rows(rows))
    }

    /// One page of a RetrieveMultiple: up to `limit` rows of `query.columns`, after its cookie.
    pub async fn retrieve_page(&self, query: &PageQuery, limit: i64) -> Result<Vec<Vec<Json>>, BackendError> {
        dispatch!(self.records()?, retrieve_page(query, limit))
    }

    /// How many records match (live, or retained with `datasource="retained"`).
    pub async fn count(&self, criteria: &Criteria) -> Result<i64, BackendError> {
        dispatch!(self.records()?, count(criteria))
    }

    pub async fn record_state(&self, id: Uuid) -> Result<RecordState, BackendError> {
        dispatch!(self.records()?, record_state(id))
    }

    /// The stored values of `columns` (table column indices) of one record,
    /// live or retained, as JSON; `None` if there is no such record.
    pub async fn retrieve(&self, id: Uuid, columns: &[usize]) -> Result<Option<Vec<Json>>, BackendError> {
        dispatch!(self.records()?, retrieve(id, columns))
    }

    /// Cheap reachability check for `/readyz`.
    pub async fn ping(&self) -> bool {
        match self {
            Backend::Sqlite(s) => s.ping().await,
            Backend::Postgres(s) => s.ping().await,
            Backend::Dataverse(s) => s.ping().await,
        }
    }
}

/// The operations' bookkeeping tables, created with the record table.
pub const OPERATION_TABLE: &str = "copilot_ingest_retention_operation";
pub const REPLY_TABLE: &str = "copilot_ingest_control_reply";

/// The retention policies, whichever way they came.
pub const POLICY_TABLE: &str = "copilot_ingest_retention_policy";

/// A claim of a policy's run (see [`Backend::claim_policy_run`]).
#[derive(Debug, Clone)]
pub struct PolicyClaim {
    pub uniquename: String,
    /// The id a new run gets (derived from the policy and its due time).
    pub operation_id: Uuid,
    pub now: DateTime<Utc>,
    /// The policy's run after this one.
    pub next_run: Option<DateTime<Utc>>,
    pub lease_until: DateTime<Utc>,
}

/// Where a record id stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    Live,
    Retained,
    /// Gone, with a tombstone.
    Purged,
    Missing,
}

impl RecordState {
    /// From a record's `msft_datastate` (`None`: no row) and whether its id is tombstoned.
    pub(crate) fn of(data_state: Option<i64>, tombstoned: bool) -> RecordState {
        match (data_state, tombstoned) {
            (Some(1), _) => RecordState::Retained,
            (Some(_), _) => RecordState::Live,
            (None, true) => RecordState::Purged,
            (None, false) => RecordState::Missing,
        }
    }
}

/// Which records a RollbackRetain returns to live.
#[derive(Debug, Clone, Copy)]
pub enum RollbackScope {
    Operation(Uuid),
    Record(Uuid),
}

/// What a rollback did: records returned to live, and records of the scope
/// already purged (they cannot come back).
#[derive(Debug, Clone, Copy, Default)]
pub struct RollbackCounts {
    pub restored: i64,
    pub purged: i64,
}

/// A long operation's row, created when it starts (or found, when a
/// redelivered command resumes it).
#[derive(Debug, Clone)]
pub struct OperationStart {
    pub operation_id: Uuid,
    pub command_id: String,
    pub message: &'static str,
    pub criteria: Option<String>,
    /// The policy whose scheduled run this is.
    pub policy: Option<String>,
}

/// Which records a bulk deletion removes.
#[derive(Debug, Clone)]
pub struct DeletePage {
    /// Retained records (PurgeRetainedContent, BulkDelete of retained rows) or live ones.
    pub retained: bool,
    /// Only records with `versionnumber <= max_version`.
    pub max_version: Option<i64>,
    pub criteria: Criteria,
    /// The message recorded in the tombstone (`None`: a purge).
    pub deleted_by: Option<&'static str>,
    /// Only records retained by an operation that ended at or before this
    /// time (a policy's `purge_after`).
    pub retained_before: Option<DateTime<Utc>>,
    /// Which of the operation's counts the page adds to.
    pub counter: OperationCounter,
}

/// An operation's counts: `total` (what its message did: retained, deleted,
/// purged) and `purged` (what a policy run purged after retaining).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationCounter {
    Total,
    Purged,
}

impl OperationCounter {
    pub fn column(self) -> &'static str {
        match self {
            OperationCounter::Total => "total",
            OperationCounter::Purged => "purged",
        }
    }
}

/// An operation's row, as read back (`control operation`, `retentionoperations`).
#[derive(Debug, Clone, PartialEq)]
pub struct OperationRecord {
    pub operation_id: Uuid,
    pub command_id: String,
    pub message: String,
    /// The policy whose scheduled run this is.
    pub policy: Option<String>,
    pub criteria: Option<String>,
    pub status: String,
    pub total: i64,
    pub purged: i64,
    pub started_on: DateTime<Utc>,
    pub ended_on: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// The most operations one read returns (newest first).
pub const MAX_OPERATIONS_LISTED: i64 = 5000;

/// New values for one live record: the whole create-column layout, already
/// validated and normalized as ingestion does.
#[derive(Debug, Clone)]
pub struct RowUpdate {
    pub id: Uuid,
    pub values: Vec<crate::record::Value>,
    pub state_code: i32,
    /// `IfRowVersionMatches`: only while the record is at this version.
    pub expected_version: Option<i64>,
}

/// The positions in the create-column layout that Update writes (valid for
/// update), with their table column indices.
pub(crate) fn update_columns() -> &'static [(usize, usize)] {
    static COLUMNS: std::sync::LazyLock<Vec<(usize, usize)>> = std::sync::LazyLock::new(|| {
        let t = crate::table::table();
        crate::record::create_columns()
            .iter()
            .enumerate()
            .filter(|&(_, &i)| t.columns[i].valid_for_update)
            .map(|(position, &i)| (position, i))
            .collect()
    });
    &COLUMNS
}

/// A command claimed by this instance; dropping it releases the claim.
pub struct Claim {
    _session: Option<tokio_postgres::Client>,
}

/// The dead-letter ledger: source coordinates of every acknowledged dead letter.
pub const DEAD_LETTER_TABLE: &str = "copilot_ingest_dead_letters";

/// A dead letter in the ledger: its source coordinates and a digest of the
/// message (so a topic deleted and re-created, whose offsets start over, is
/// not mistaken for a redelivery).
#[derive(Debug, Clone)]
pub struct DeadLetterKey<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub digest: String,
}

impl<'a> DeadLetterKey<'a> {
    pub fn new(topic: &'a str, partition: i32, offset: i64, key: Option<&[u8]>, value: Option<&[u8]>) -> Self {
        const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6f0b_4c1e_2a57_4d0e_9b1c_0c0b_71c5_7a03);
        let mut bytes = Vec::with_capacity(16 + key.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len));
        for part in [key, value] {
            bytes.extend_from_slice(&part.map_or(u64::MAX, |p| p.len() as u64).to_be_bytes());
            bytes.extend_from_slice(part.unwrap_or_default());
        }
        DeadLetterKey { topic, partition, offset, digest: crate::record::uuid_v5(&NAMESPACE, &bytes).to_string() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterOp {
    /// `true` if recorded.
    Check,
    /// Records (idempotent); returns `true`.
    Record,
}

impl DeadLetterOp {
    /// The statement, with `$1`/`?1` topic, partition, offset placeholders in the sink's dialect.
    fn sql(self, postgres: bool) -> String {
        let p = |n: usize| if postgres { format!("${n}") } else { format!("?{n}") };
        match self {
            DeadLetterOp::Check => format!(
                "SELECT count(*) FROM {DEAD_LETTER_TABLE} WHERE ingest_topic = {} AND ingest_partition = {} \
                 AND ingest_offset = {} AND message_digest = {}",
                p(1),
                p(2),
                p(3),
                p(4)
            ),
            DeadLetterOp::Record => format!(
                "INSERT INTO {DEAD_LETTER_TABLE} (ingest_topic, ingest_partition, ingest_offset, message_digest) \
                 VALUES ({}, {}, {}, {}) ON CONFLICT DO NOTHING",
                p(1),
                p(2),
                p(3),
                p(4)
            ),
        }
    }

    pub fn sqlite_sql(self) -> String {
        self.sql(false)
    }

    pub fn postgres_sql(self) -> String {
        self.sql(true)
    }
}

/// Classifies each record of a sub-batch against what the store already has.
/// `existing` answers, for an id not inserted, the stored content hash (or
/// `None` if absent, which cannot happen inside one transaction).
pub(crate) fn classify_existing(record_hash: uuid::Uuid, stored_hash: Option<uuid::Uuid>, id: uuid::Uuid) -> Outcome {
    match stored_hash {
        Some(h) if h == record_hash => Outcome::Replay,
        _ => Outcome::Rejected(Rejection::new(
            Reason::DuplicateIdConflict,
            Some("msdyn_copilotinteractionid"),
            format!("record {id} already exists with different content"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_digests_tell_messages_apart() {
        let d = |k: Option<&[u8]>, v: Option<&[u8]>| DeadLetterKey::new("t", 0, 7, k, v).digest;
        assert_eq!(d(Some(b"k"), Some(b"v")), d(Some(b"k"), Some(b"v")));
        assert_ne!(d(Some(b"k"), Some(b"v")), d(Some(b"kv"), Some(b"")));
        assert_ne!(d(None, Some(b"v")), d(Some(b""), Some(b"v")));
        assert_ne!(d(Some(b"k"), None), d(Some(b"k"), Some(b"")));
    }
}
