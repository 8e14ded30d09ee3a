//! CreateMultiple on SQLite: the writer thread and its group commit. Each
//! batch is one `BEGIN IMMEDIATE … COMMIT` transaction with prepared
//! statements; batches queued behind a commit share the next one.

use std::path::PathBuf;
use std::sync::mpsc;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::{Job, migrate, open_connection};
use crate::backend::{BackendError, DeadLetterOp, Outcome, classify_existing};
use crate::batch::Batch;
use crate::record::{Value, create_columns, write_datetime};
use crate::table::table;

/// Most rows committed in one transaction when batches queue up: room for
/// every batch of the default 32 in flight.
const GROUP_COMMIT_ROWS: usize = 32_000;

pub(super) fn writer_thread(mut conn: Connection, rx: mpsc::Receiver<Job>, topic: String, path: PathBuf) {
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
                if results.iter().any(|r| matches!(r, Err(BackendError::Transient(_)))) {
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
            Job::Run(statements) => statements(&mut conn),
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
                let _ = reply.send(result.map_err(BackendError::from));
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
) -> Vec<Result<Vec<Outcome>, BackendError>> {
    let alone = |conn: &mut Connection, write| write_tx(conn, &[write], topic).map(|mut o| o.pop().unwrap_or_default());
    if let [write] = writes {
        return vec![alone(conn, *write)];
    }
    match write_tx(conn, writes, topic) {
        Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
        Err(BackendError::Permanent(_)) => writes.iter().map(|&write| alone(conn, write)).collect(),
        Err(e) => writes.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// Batches in one transaction: outcomes per batch, or nothing committed.
fn write_tx(
    conn: &mut Connection,
    writes: &[(&Batch, &[usize])],
    topic: &str,
) -> Result<Vec<Vec<Outcome>>, BackendError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut version: i64 = tx
        .query_row("SELECT value FROM copilot_ingest_meta WHERE key = 'versionnumber'", [], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let mut outcomes = Vec::with_capacity(writes.len());
    for &(batch, indices) in writes {
        outcomes.push(write_rows(&tx, batch, indices, topic, &mut version)?);
    }
    tx.execute(
        "INSERT INTO copilot_ingest_meta (key, value) VALUES ('versionnumber', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [version],
    )?;
    tx.commit()?;
    Ok(outcomes)
}

/// One batch's rows, inside the caller's transaction.
fn write_rows(
    tx: &rusqlite::Transaction<'_>,
    batch: &Batch,
    indices: &[usize],
    topic: &str,
    version: &mut i64,
) -> Result<Vec<Outcome>, BackendError> {
    let t = table();
    let insert = insert_sql();
    let tombstone_sql =
        format!("SELECT deleted_by IS NOT NULL FROM {} WHERE {} = ?1", t.tombstone_table(), t.primary_id_attribute);
    let existing_sql =
        format!("SELECT ingest_content_hash FROM {0} WHERE {1} = ?1", t.logical_name, t.primary_id_attribute);
    let mut outcomes = Vec::with_capacity(indices.len());
    let mut insert_stmt = tx.prepare_cached(&insert)?;
    let mut tombstone_stmt = tx.prepare_cached(&tombstone_sql)?;
    let mut existing_stmt = tx.prepare_cached(&existing_sql)?;
    // Nothing was ever purged (the usual case): no per-row tombstone probe.
    let any_tombstone: bool =
        tx.query_row(&format!("SELECT EXISTS (SELECT 1 FROM {})", t.tombstone_table()), [], |r| r.get(0))?;
    // Text forms of ids and datetimes are written here and bound from here
    // (SQLite copies bound text), so a row costs no allocation.
    let mut scratch = String::with_capacity(64);
    for &i in indices {
        let entry = &batch[i];
        let record = &entry.record;
        let id = record.id();
        // Only the rare paths look the id up by its text. A later occurrence
        // of an id in the same batch needs no bookkeeping: the transaction
        // reads its own writes, so it meets the first occurrence's row (or
        // the tombstone) exactly as a replay in a later batch would.
        let id_text = || id.hyphenated().to_string();
        if any_tombstone
            && let Some(deleted) = tombstone_stmt.query_row([id_text()], |r| r.get::<_, bool>(0)).optional()?
        {
            outcomes.push(if deleted { Outcome::DeletedReplay } else { Outcome::PurgedReplay });
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
            bind(index, value)?;
        }
        for value in
            [Value::Int(record.state_code()), Value::DateTime(record.created_on()), Value::Guid(record.content_hash())]
        {
            index += 1;
            bind(index, &value)?;
        }
        for number in [*version, i64::from(entry.message.partition), entry.message.offset] {
            index += 1;
            insert_stmt.raw_bind_parameter(index, number)?;
        }
        insert_stmt.raw_bind_parameter(index + 1, topic)?;
        let inserted = insert_stmt.raw_execute()?;
        if inserted == 1 {
            outcomes.push(Outcome::Written);
        } else {
            let stored: Option<String> = existing_stmt.query_row([id_text()], |r| r.get(0)).optional()?;
            let stored = stored.and_then(|s| Uuid::parse_str(&s).ok());
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
    use crate::transport::ingest::source::Inbound;

    /// One event per name; `id` (when given) is carried by every event, so
    /// the same name is the same content and another name a conflict.
    fn events(names: &[&str], id: Option<&str>) -> Batch {
        let id_field = id.map(|id| format!(r#""msdyn_copilotinteractionid":"{id}","#)).unwrap_or_default();
        names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let payload = format!(
                    r#"{{{id_field}"msdyn_name":"{name}","msdyn_scenariorequestid":"r","msdyn_interactiontype":"Copy","msdyn_scenariotype":"Copilot"}}"#
                );
                let record = Normalizer::default().normalize_json(payload.as_bytes(), None, chrono::Utc::now()).unwrap();
                Entry { record, message: Inbound::for_test(0, i as i64, payload.into_bytes()) }
            })
            .collect()
    }

    fn batch(names: &[&str]) -> Batch {
        events(names, None)
    }

    const REPEATED_ID: &str = "5d1c0c8e-7c55-4a8e-9d67-0a4c3e3b9f11";

    fn same_id(names: &[&str]) -> Batch {
        events(names, Some(REPEATED_ID))
    }

    #[test]
    fn an_id_repeated_in_one_batch_meets_its_first_occurrence() {
        let dir = std::env::temp_dir().join(format!("sqlite-repeat-{}", Uuid::new_v4().simple()));
        let mut conn = open_connection(&dir.join("t.db")).unwrap();
        migrate(&conn).unwrap();
        let id = Uuid::parse_str(REPEATED_ID).unwrap();
        let write = |conn: &mut Connection, batch: &Batch| {
            let all: Vec<usize> = (0..batch.len()).collect();
            write_batches(conn, &[(batch, &all)], "t").pop().unwrap().unwrap()
        };
        let conflict = crate::backend::classify_existing(Uuid::nil(), None, id);
        assert_eq!(
            write(&mut conn, &same_id(&["x", "y", "x", "y"])),
            [Outcome::Written, conflict.clone(), Outcome::Replay, conflict.clone()]
        );
        // Stored content first: the later occurrences are compared with it, whatever came before them.
        assert_eq!(write(&mut conn, &same_id(&["y", "x"])), [conflict, Outcome::Replay]);
        conn.execute(
            "INSERT INTO msdyn_copilotinteraction_tombstone (msdyn_copilotinteractionid, purgedon) VALUES (?1, 'now')",
            [id.hyphenated().to_string()],
        )
        .unwrap();
        conn.execute("DELETE FROM msdyn_copilotinteraction", []).unwrap();
        assert_eq!(write(&mut conn, &same_id(&["x", "x"])), [Outcome::PurgedReplay, Outcome::PurgedReplay]);
        assert!(names_in(&conn).is_empty(), "a purged id is never re-created, not even by its second occurrence");
        drop(conn);
        let _ = std::fs::remove_dir_all(dir);
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
        assert!(
            matches!(&results[0], Err(BackendError::Permanent(m)) if m.contains("refused by policy")),
            "{results:?}"
        );
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
        assert!(results.iter().all(|r| matches!(r, Err(BackendError::Transient(_)))), "{results:?}");
        conn.pragma_update(None, "query_only", false).unwrap();
        assert_eq!(names_in(&conn), ["a1", "a2", "c1", "d1"]);
        drop(conn);
        let _ = std::fs::remove_dir_all(dir);
    }
}
