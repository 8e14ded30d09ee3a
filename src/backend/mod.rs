//! Sinks with CreateMultiple semantics (SPEC §5): a batch is one atomic write;
//! replays are skipped; conflicting ids and records the store refuses are
//! dead-lettered; transient failures are retried with backoff, forever.

pub mod dataverse;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use crate::batch::Batch;
use crate::config::SinkUrl;
use crate::metrics::Metrics;
use crate::reason::{Reason, Rejection};

/// What happened to one record of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// Same id, same content already stored.
    Replay,
    /// The id was purged; it is never re-created.
    PurgedReplay,
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

    /// Cheap reachability check for `/readyz`.
    pub async fn ping(&self) -> bool {
        match self {
            Backend::Sqlite(s) => s.ping().await,
            Backend::Postgres(s) => s.ping().await,
            Backend::Dataverse(s) => s.ping().await,
        }
    }
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
