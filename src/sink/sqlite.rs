//! The embedded SQLite sink: one file in WAL mode, written by a dedicated
//! thread (SQLite calls block, so they never run on the async runtime). Each
//! batch is one `BEGIN IMMEDIATE … COMMIT` transaction with prepared statements.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::{DEAD_LETTER_TABLE, DeadLetterKey, DeadLetterOp, Outcome, SinkError, classify_existing};
use crate::batch::Batch;
use crate::record::{Value, create_columns, write_datetime};
use crate::table::{ColumnType, EXTRA_COLUMNS, ExtraColumnKind, table};

enum Job {
    Write {
        batch: Arc<Batch>,
        indices: Vec<usize>,
        reply: oneshot::Sender<Result<Vec<Outcome>, SinkError>>,
    },
    Ping {
        reply: oneshot::Sender<bool>,
    },
    DeadLetter {
        op: DeadLetterOp,
        topic: String,
        partition: i32,
        offset: i64,
        digest: String,
        reply: oneshot::Sender<Result<bool, SinkError>>,
    },
}

pub struct SqliteSink {
    jobs: mpsc::SyncSender<Job>,
}

/// The one retry classification of SQLite errors, for ingestion and the
/// control commands alike: only an error caused by the data (a constraint,
/// a type, a size) is permanent; anything else (busy, locked, I/O, a full
/// disk, an unexpected SQL error) is retried, so nothing is dead-lettered or
/// failed for a fault of the database.
pub(crate) fn is_permanent(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(err, _)
        if matches!(err.code, ErrorCode::ConstraintViolation | ErrorCode::TypeMismatch | ErrorCode::TooBig))
}

fn classify(e: rusqlite::Error) -> SinkError {
    if is_permanent(&e) { SinkError::Permanent(e.to_string()) } else { SinkError::Transient(e.to_string()) }
}

fn sqlite_type(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Picklist | ColumnType::State | ColumnType::Status | ColumnType::Integer | ColumnType::Bigint => {
            "INTEGER"
        }
        _ => "TEXT",
    }
}

/// SQLite's type for each column beyond the table definition.
fn extra_type(kind: ExtraColumnKind) -> &'static str {
    match kind {
        ExtraColumnKind::DataState => "INTEGER NOT NULL DEFAULT 0",
        ExtraColumnKind::Guid | ExtraColumnKind::Text => "TEXT",
        ExtraColumnKind::Int | ExtraColumnKind::Bigint => "INTEGER",
    }
}

/// Creates or upgrades the tables; idempotent.
pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let t = table();
    let name = &t.logical_name;
    let mut defs: Vec<String> = Vec::new();
    for c in t.stored_columns() {
        let mut def = format!("{} {}", c.logical_name, sqlite_type(c.column_type));
        if c.logical_name == t.primary_id_attribute {
            def.push_str(" PRIMARY KEY NOT NULL");
        }
        defs.push(def);
    }
    for (col, kind) in EXTRA_COLUMNS {
        defs.push(format!("{col} {}", extra_type(kind)));
    }
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {name} ({});
         CREATE TABLE IF NOT EXISTS {tombstones} ({id} TEXT PRIMARY KEY NOT NULL, purgedon TEXT NOT NULL, versionnumber INTEGER,
             retention_operationid TEXT);
         CREATE TABLE IF NOT EXISTS copilot_ingest_meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS {DEAD_LETTER_TABLE} (ingest_topic TEXT NOT NULL, ingest_partition INTEGER NOT NULL,
             ingest_offset INTEGER NOT NULL, message_digest TEXT NOT NULL,
             sent_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
             PRIMARY KEY (ingest_topic, ingest_partition, ingest_offset, message_digest)) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS {name}_createdon_idx ON {name} (createdon);",
        defs.join(", "),
        tombstones = t.tombstone_table(),
        id = t.primary_id_attribute
    ))?;
    // Upgrade: add any column the definition gained since the table was made.
    let existing: Vec<String> = {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({name})"))?;
        stmt.query_map([], |r| r.get::<_, String>(1))?.collect::<Result<_, _>>()?
    };
    for def in defs.iter().skip(1) {
        let col = def.split_whitespace().next().unwrap_or_default();
        if !existing.iter().any(|e| e == col) {
            let def = def.replace(" NOT NULL DEFAULT 0", " DEFAULT 0");
            conn.execute_batch(&format!("ALTER TABLE {name} ADD COLUMN {def}"))?;
        }
    }
    conn.execute_batch(&crate::control::store::sqlite_ddl())?;
    Ok(())
}

pub fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        let _ = std::fs::create_dir_all(dir);
    }
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL lets readers (dashboards, the control plane) run beside the writer;
    // synchronous=FULL makes every committed batch survive power loss.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Random UUID keys touch pages all over the primary-key index: a larger
    // page cache keeps batch inserts in memory, and a WAL of up to 256 MB
    // between checkpoints lets one checkpoint copy each index page once for
    // the many commits that rewrote it (measured with 60,000 events/s
    // arriving: p99 end-to-end 1.0–2.4 s with 64 MB, 0.49 s with 256 MB).
    // A checkpointing thread beside the writer was tried and made it worse.
    conn.pragma_update(None, "cache_size", -131_072)?;
    conn.pragma_update(None, "wal_autocheckpoint", 65_536)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

impl SqliteSink {
    pub fn open(path: &Path, topic: &str) -> Result<SqliteSink, SinkError> {
        let conn = open_connection(path).map_err(|e| SinkError::Transient(format!("{}: {e}", path.display())))?;
        migrate(&conn).map_err(|e| SinkError::Transient(format!("migrating {}: {e}", path.display())))?;
        let (jobs, rx) = mpsc::sync_channel::<Job>(16);
        let topic = topic.to_owned();
        let path: PathBuf = path.to_owned();
        std::thread::Builder::new()
            .name("sqlite-sink".into())
            .spawn(move || writer_thread(conn, rx, topic, path))
            .map_err(|e| SinkError::Transient(format!("starting the SQLite writer: {e}")))?;
        Ok(SqliteSink { jobs })
    }

    pub async fn write(&self, batch: &Arc<Batch>, indices: &[usize]) -> Result<Vec<Outcome>, SinkError> {
        let batch = Arc::clone(batch);
        let indices = indices.to_vec();
        self.submit(move |reply| Job::Write { batch, indices, reply }).await
    }

    pub async fn dead_letter(&self, op: DeadLetterOp, letter: &DeadLetterKey<'_>) -> Result<bool, SinkError> {
        let (topic, partition, offset, digest) =
            (letter.topic.to_owned(), letter.partition, letter.offset, letter.digest.clone());
        self.submit(move |reply| Job::DeadLetter { op, topic, partition, offset, digest, reply }).await
    }

    /// Hands a job to the writer thread and waits for its answer.
    async fn submit<T: Send + 'static>(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<T, SinkError>>) -> Job + Send + 'static,
    ) -> Result<T, SinkError> {
        let (reply, rx) = oneshot::channel();
        let job = job(reply);
        let jobs = self.jobs.clone();
        // The queue is small and the writer fast; a blocking send would stall a
        // runtime thread, so it goes through spawn_blocking.
        tokio::task::spawn_blocking(move || jobs.send(job))
            .await
            .map_err(|e| SinkError::Transient(e.to_string()))?
            .map_err(|_| SinkError::Transient("SQLite writer stopped".into()))?;
        rx.await.map_err(|_| SinkError::Transient("SQLite writer stopped".into()))?
    }

    pub async fn ping(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.jobs.try_send(Job::Ping { reply }).is_err() {
            // A full queue means the writer is busy, which is alive.
            return true;
        }
        rx.await.unwrap_or(false)
    }
}

/// Most rows committed in one transaction when batches queue up.
const GROUP_COMMIT_ROWS: usize = 20_000;

fn writer_thread(mut conn: Connection, rx: mpsc::Receiver<Job>, topic: String, path: PathBuf) {
    let mut deferred: std::collections::VecDeque<Job> = std::collections::VecDeque::new();
    loop {
        let job = match deferred.pop_front() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        match job {
            Job::Write { batch, indices, reply } => {
                // Group commit: batches that queued up while the last commit
                // was syncing go into one transaction, so one fsync covers
                // them all.
                let mut group = vec![(batch, indices, reply)];
                let mut rows = group[0].1.len();
                while rows < GROUP_COMMIT_ROWS {
                    match rx.try_recv() {
                        Ok(Job::Write { batch, indices, reply }) => {
                            rows += indices.len();
                            group.push((batch, indices, reply));
                        }
                        Ok(other) => {
                            deferred.push_back(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let writes: Vec<(&Batch, &[usize])> = group.iter().map(|(b, i, _)| (&**b, i.as_slice())).collect();
                let results = write_batches(&mut conn, &writes, &topic);
                if results.iter().any(|r| matches!(r, Err(SinkError::Transient(_)))) {
                    // A broken handle (file removed, I/O error) is reopened for the retry.
                    if let Ok(fresh) = open_connection(&path)
                        && migrate(&fresh).is_ok()
                    {
                        conn = fresh;
                    }
                }
                for ((_, _, reply), result) in group.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Job::Ping { reply } => {
                let ok = conn.query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).is_ok();
                let _ = reply.send(ok);
            }
            Job::DeadLetter { op, topic, partition, offset, digest, reply } => {
                let params = rusqlite::params![topic, partition, offset, digest];
                let result = match op {
                    DeadLetterOp::Check => conn
                        .prepare_cached(&op.sqlite_sql())
                        .and_then(|mut s| s.query_row(params, |r| r.get::<_, i64>(0)))
                        .map(|n| n > 0),
                    DeadLetterOp::Record => {
                        conn.prepare_cached(&op.sqlite_sql()).and_then(|mut s| s.execute(params)).map(|_| true)
                    }
                };
                let _ = reply.send(result.map_err(|e| SinkError::Transient(e.to_string())));
            }
        }
    }
}

fn insert_sql() -> String {
    let t = table();
    let mut cols: Vec<&str> = create_columns().iter().map(|&i| t.columns[i].logical_name.as_str()).collect();
    // In the order `write_rows` binds them.
    cols.extend([
        "statecode",
        "createdon",
        "ingest_content_hash",
        "versionnumber",
        "ingest_partition",
        "ingest_offset",
        "ingest_topic",
    ]);
    let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT({}) DO NOTHING",
        t.logical_name,
        cols.join(", "),
        placeholders.join(", "),
        t.primary_id_attribute
    )
}

/// Writes queued batches in one transaction (one sync for all). Should a
/// batch's data be refused, that transaction is rolled back and each batch is
/// written in a transaction of its own, so one bad batch never holds back the
/// others. Any other failure (locked, I/O) fails every batch at once: they
/// are retried later with backoff, not once more each right away.
/// (Savepoints per batch would isolate failures too, but cost a sub-journal
/// copy of every page they touch: about a tenth of the writer's time.)
pub fn write_batches(
    conn: &mut Connection,
    writes: &[(&Batch, &[usize])],
    topic: &str,
) -> Vec<Result<Vec<Outcome>, SinkError>> {
    let alone = |conn: &mut Connection, write| write_tx(conn, &[write], topic).map(|mut o| o.pop().unwrap_or_default());
    if let [write] = writes {
        return vec![alone(conn, *write)];
    }
    match write_tx(conn, writes, topic) {
        Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
        Err(SinkError::Permanent(_)) => writes.iter().map(|&write| alone(conn, write)).collect(),
        Err(e) => writes.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// Batches in one transaction: outcomes per batch, or nothing committed.
fn write_tx(conn: &mut Connection, writes: &[(&Batch, &[usize])], topic: &str) -> Result<Vec<Vec<Outcome>>, SinkError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(classify)?;
    let mut version: i64 = tx
        .query_row("SELECT value FROM copilot_ingest_meta WHERE key = 'versionnumber'", [], |r| r.get(0))
        .optional()
        .map_err(classify)?
        .unwrap_or(0);
    let mut outcomes = Vec::with_capacity(writes.len());
    for &(batch, indices) in writes {
        outcomes.push(write_rows(&tx, batch, indices, topic, &mut version)?);
    }
    tx.execute(
        "INSERT INTO copilot_ingest_meta (key, value) VALUES ('versionnumber', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [version],
    )
    .map_err(classify)?;
    tx.commit().map_err(classify)?;
    Ok(outcomes)
}

/// One batch's rows, inside the caller's transaction.
fn write_rows(
    tx: &rusqlite::Transaction<'_>,
    batch: &Batch,
    indices: &[usize],
    topic: &str,
    version: &mut i64,
) -> Result<Vec<Outcome>, SinkError> {
    let t = table();
    let insert = insert_sql();
    let tombstone_sql = format!("SELECT 1 FROM {} WHERE {} = ?1", t.tombstone_table(), t.primary_id_attribute);
    let existing_sql =
        format!("SELECT ingest_content_hash FROM {0} WHERE {1} = ?1", t.logical_name, t.primary_id_attribute);
    let mut outcomes = Vec::with_capacity(indices.len());
    let mut insert_stmt = tx.prepare_cached(&insert).map_err(classify)?;
    let mut tombstone_stmt = tx.prepare_cached(&tombstone_sql).map_err(classify)?;
    let mut existing_stmt = tx.prepare_cached(&existing_sql).map_err(classify)?;
    // Nothing was ever purged (the usual case): no per-row tombstone probe.
    let any_tombstone: bool = tx
        .query_row(&format!("SELECT EXISTS (SELECT 1 FROM {})", t.tombstone_table()), [], |r| r.get(0))
        .map_err(classify)?;
    // Per id seen in this batch: the content hash the table holds for it now (`None`: purged).
    let mut seen: std::collections::HashMap<Uuid, Option<Uuid>> =
        std::collections::HashMap::with_capacity(indices.len());
    // Text forms of ids and datetimes are written here and bound from here
    // (SQLite copies bound text), so a row costs no allocation.
    let mut scratch = String::with_capacity(64);
    for &i in indices {
        let entry = &batch[i];
        let record = &entry.record;
        let id = record.id();
        // Only the rare paths look the id up by its text.
        let id_text = || id.hyphenated().to_string();
        // A later occurrence of an id in this batch is compared with what the
        // table holds once the first occurrence was handled: the first one
        // may be the conflicting record and this one the stored content.
        if let Some(settled) = seen.get(&id) {
            outcomes.push(match settled {
                Some(stored) => classify_existing(record.content_hash(), Some(*stored), id),
                None => Outcome::PurgedReplay,
            });
            continue;
        }
        if any_tombstone && tombstone_stmt.exists([id_text()]).map_err(classify)? {
            seen.insert(id, None);
            outcomes.push(Outcome::PurgedReplay);
            continue;
        }
        *version += 1;
        let mut bind = |index: usize, value: &Value| match value {
            Value::Null => insert_stmt.raw_bind_parameter(index, rusqlite::types::Null),
            Value::Text(s) => insert_stmt.raw_bind_parameter(index, s.as_str()),
            Value::Int(i) => insert_stmt.raw_bind_parameter(index, i64::from(*i)),
            Value::Guid(g) => {
                insert_stmt.raw_bind_parameter(index, &*g.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
            }
            Value::DateTime(d) => {
                scratch.clear();
                write_datetime(&mut scratch, d);
                insert_stmt.raw_bind_parameter(index, scratch.as_str())
            }
        };
        let values = record.values();
        let mut index = 0;
        for value in values {
            index += 1;
            bind(index, value).map_err(classify)?;
        }
        for value in
            [Value::Int(record.state_code()), Value::DateTime(record.created_on()), Value::Guid(record.content_hash())]
        {
            index += 1;
            bind(index, &value).map_err(classify)?;
        }
        for number in [*version, i64::from(entry.message.partition), entry.message.offset] {
            index += 1;
            insert_stmt.raw_bind_parameter(index, number).map_err(classify)?;
        }
        insert_stmt.raw_bind_parameter(index + 1, topic).map_err(classify)?;
        let inserted = insert_stmt.raw_execute().map_err(classify)?;
        if inserted == 1 {
            seen.insert(id, Some(record.content_hash()));
            outcomes.push(Outcome::Written);
        } else {
            let stored: Option<String> =
                existing_stmt.query_row([id_text()], |r| r.get(0)).optional().map_err(classify)?;
            let stored = stored.and_then(|s| Uuid::parse_str(&s).ok());
            if let Some(hash) = stored {
                seen.insert(id, Some(hash));
            }
            outcomes.push(classify_existing(record.content_hash(), stored, id));
        }
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Entry;
    use crate::normalize::Normalizer;
    use crate::source::Inbound;

    fn batch(names: &[&str]) -> Batch {
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let payload = format!(
                    r#"{{"msdyn_name":"{name}","msdyn_scenariorequestid":"r","msdyn_interactiontype":"Copy","msdyn_scenariotype":"Copilot"}}"#
                );
                let record = Normalizer::default().normalize_json(payload.as_bytes(), None, chrono::Utc::now()).unwrap();
                Entry { record, message: Inbound::for_test(0, i as i64, payload.into_bytes()) }
            })
            .collect()
    }

    fn names_in(conn: &Connection) -> Vec<String> {
        let mut stmt = conn.prepare("SELECT msdyn_name FROM msdyn_copilotinteraction ORDER BY msdyn_name").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    }

    #[test]
    fn queued_batches_commit_together_and_a_failing_one_fails_alone() {
        let dir = std::env::temp_dir().join(format!("sqlite-group-{}", Uuid::new_v4().simple()));
        let mut conn = open_connection(&dir.join("t.db")).unwrap();
        migrate(&conn).unwrap();
        conn.execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON msdyn_copilotinteraction WHEN NEW.msdyn_name = 'refuse-me'
             BEGIN SELECT RAISE(ABORT, 'refused by policy'); END;",
        )
        .unwrap();
        let (a, b, c) = (batch(&["a1", "a2"]), batch(&["b1", "refuse-me", "b3"]), batch(&["c1"]));
        let all = |batch: &Batch| (0..batch.len()).collect::<Vec<_>>();
        let (ia, ib, ic) = (all(&a), all(&b), all(&c));

        let results = write_batches(&mut conn, &[(&a, &ia), (&c, &ic)], "t");
        assert!(results.iter().all(|r| matches!(r, Ok(o) if o.iter().all(|o| *o == Outcome::Written))));
        assert_eq!(names_in(&conn), ["a1", "a2", "c1"]);
        // Every bound column landed in its own place.
        let r = &a[1].record;
        let stored: (String, String, i64, String, String, i64, String, i64, i64) = conn
            .query_row(
                "SELECT msdyn_copilotinteractionid, msdyn_name, msdyn_interactiontype, createdon, ingest_content_hash,
                        versionnumber, ingest_topic, ingest_partition, ingest_offset
                 FROM msdyn_copilotinteraction WHERE msdyn_name = 'a2'",
                [],
                |row| {
                    Ok((
                        row.get(0)?,
                        row.get(1)?,
                        row.get(2)?,
                        row.get(3)?,
                        row.get(4)?,
                        row.get(5)?,
                        row.get(6)?,
                        row.get(7)?,
                        row.get(8)?,
                    ))
                },
            )
            .unwrap();
        assert_eq!(
            stored,
            (
                r.id().hyphenated().to_string(),
                "a2".to_owned(),
                i64::from(table().column("msdyn_interactiontype").and_then(|c| c.option_by_label("Copy")).unwrap()),
                crate::record::format_datetime(&r.created_on()),
                r.content_hash().hyphenated().to_string(),
                2,
                "t".to_owned(),
                0,
                1
            )
        );
        let statecode: i64 =
            conn.query_row("SELECT statecode FROM msdyn_copilotinteraction LIMIT 1", [], |row| row.get(0)).unwrap();
        assert_eq!(statecode, i64::from(r.state_code()));

        // The group fails on b; a and c are then written on their own (c as a replay).
        let d = batch(&["d1"]);
        let id = all(&d);
        let results = write_batches(&mut conn, &[(&b, &ib), (&d, &id), (&c, &ic)], "t");
        assert!(matches!(&results[0], Err(SinkError::Permanent(m)) if m.contains("refused by policy")), "{results:?}");
        assert!(matches!(&results[1], Ok(o) if o == &[Outcome::Written]));
        assert!(matches!(&results[2], Ok(o) if o == &[Outcome::Replay]));
        assert_eq!(names_in(&conn), ["a1", "a2", "c1", "d1"], "nothing of the failing batch is kept");
        let versions: Vec<i64> = conn
            .prepare("SELECT versionnumber FROM msdyn_copilotinteraction ORDER BY versionnumber")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(versions, [1, 2, 3, 4], "the rolled-back group used no version numbers");

        // A failure that is not the data's (here: a read-only connection) fails
        // every batch of the group as retryable, and writes nothing.
        conn.pragma_update(None, "query_only", true).unwrap();
        let e = batch(&["e1"]);
        let ie = all(&e);
        let results = write_batches(&mut conn, &[(&e, &ie), (&d, &id)], "t");
        assert!(results.iter().all(|r| matches!(r, Err(SinkError::Transient(_)))), "{results:?}");
        conn.pragma_update(None, "query_only", false).unwrap();
        assert_eq!(names_in(&conn), ["a1", "a2", "c1", "d1"]);
        drop(conn);
        let _ = std::fs::remove_dir_all(dir);
    }
}
