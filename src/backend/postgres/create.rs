//! CreateMultiple on PostgreSQL. Each batch is one transaction: a tombstone
//! lookup, then the rows in binary `COPY` (inside a savepoint) when the batch
//! has no duplicate and nothing purged; when COPY is refused (an id already
//! exists, a value the table refuses) or skipped, one
//! `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING RETURNING id` with
//! every value bound as a typed array parameter, and a content check of the
//! ids that already existed. Several instances may share one database: the
//! primary key and `ON CONFLICT` arbitrate, `versionnumber` comes from a sequence.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Statement};
use uuid::Uuid;

use super::{PostgresBackend, is_data_error};
use crate::backend::{BackendError, Outcome, classify_existing};
use crate::batch::Batch;
use crate::record::{Value, create_columns};
use crate::table::{ColumnType, table};

/// Batches written through `INSERT … ON CONFLICT` after a refused `COPY`.
const COPY_COOLDOWN_BATCHES: u32 = 16;

/// After a refused `COPY`, the next batches skip it: replays after a restart
/// come in runs, and each refused COPY is work thrown away.
#[derive(Debug, Default)]
pub(super) struct CopyCooldown(std::sync::atomic::AtomicU32);

impl CopyCooldown {
    fn refused(&self) {
        self.0.store(COPY_COOLDOWN_BATCHES, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this batch may try `COPY` (counts the cool-down down).
    fn allows_copy(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_err()
    }
}

pub(super) fn insert_sql() -> String {
    let t = table();
    let mut cols = Vec::new();
    let mut exprs = Vec::new();
    for (n, &i) in create_columns().iter().enumerate() {
        let c = &t.columns[i];
        cols.push(c.logical_name.clone());
        let array_type = match c.column_type {
            ColumnType::Uniqueidentifier | ColumnType::Lookup => "uuid[]",
            ColumnType::String | ColumnType::Memo => "text[]",
            ColumnType::Bigint => "int8[]",
            ColumnType::Datetime => "timestamptz[]",
            _ => "int4[]",
        };
        exprs.push(format!("${}::{array_type}", n + 1));
    }
    let base = exprs.len();
    for (k, (col, ty)) in [
        ("statecode", "int4[]"),
        ("createdon", "timestamptz[]"),
        ("ingest_topic", "text[]"),
        ("ingest_partition", "int4[]"),
        ("ingest_offset", "int8[]"),
        ("ingest_content_hash", "uuid[]"),
    ]
    .into_iter()
    .enumerate()
    {
        cols.push(col.into());
        exprs.push(format!("${}::{ty}", base + k + 1));
    }
    format!(
        "INSERT INTO {name} ({cols}) SELECT * FROM unnest({exprs}) ON CONFLICT ({id}) DO NOTHING RETURNING {id}",
        name = t.logical_name,
        cols = cols.join(", "),
        exprs = exprs.join(", "),
        id = t.primary_id_attribute
    )
}

/// One typed column of parameters.
enum ParamColumn {
    Uuid(Vec<Option<Uuid>>),
    Text(Vec<Option<String>>),
    Int(Vec<Option<i32>>),
    Time(Vec<Option<DateTime<Utc>>>),
}

impl PostgresBackend {
    pub async fn write(&self, batch: &Arc<Batch>, indices: &[usize]) -> Result<Vec<Outcome>, BackendError> {
        let _permit = self.permits.acquire().await.map_err(|e| BackendError::Transient(e.to_string()))?;
        let mut pooled = self.client().await?;
        let result = match pooled.insert(&self.insert_sql).await {
            Ok(insert) => self.write_tx(&mut pooled.client, &insert, batch, indices).await,
            Err(e) => Err(e),
        };
        self.put_back(pooled);
        if let Ok(outcomes) = &result {
            let inserted = outcomes.iter().filter(|o| matches!(o, Outcome::Written)).count();
            self.statistics.inserted(&self.url, inserted as u64);
        }
        result
    }

    async fn write_tx(
        &self,
        client: &mut Client,
        insert: &Statement,
        batch: &Batch,
        indices: &[usize],
    ) -> Result<Vec<Outcome>, BackendError> {
        let t = table();
        let mut tx = client.transaction().await?;

        // Duplicates inside the batch: the first occurrence is written; the
        // later ones are compared, once the write is done, with what the
        // table then holds for their id (not with the first occurrence: that
        // one may be a conflict with a stored row the later one replays).
        let mut outcomes: Vec<Option<Outcome>> = vec![None; indices.len()];
        let mut first: HashMap<Uuid, Uuid> = HashMap::with_capacity(indices.len());
        let mut candidates: Vec<usize> = Vec::with_capacity(indices.len());
        let mut later: Vec<usize> = Vec::new();
        for (k, &i) in indices.iter().enumerate() {
            let r = &batch[i].record;
            if let std::collections::hash_map::Entry::Vacant(slot) = first.entry(r.id()) {
                slot.insert(r.content_hash());
                candidates.push(k);
            } else {
                later.push(k);
            }
        }

        let ids: Vec<Uuid> = candidates.iter().map(|&k| batch[indices[k]].record.id()).collect();
        let tombstoned = tombstones(&tx, &ids).await?;
        let mut to_insert = Vec::with_capacity(candidates.len());
        for &k in &candidates {
            if let Some(outcome) = tombstoned.get(&batch[indices[k]].record.id()) {
                outcomes[k] = Some(outcome.clone());
            } else {
                to_insert.push(k);
            }
        }

        // Fast path: no duplicate inside the batch and nothing purged, so the
        // rows go in with binary COPY, the bulk path PostgreSQL loads fastest.
        // Any refusal (a replay hits the primary key, a value the table
        // refuses) undoes it and the batch takes the INSERT … ON CONFLICT path,
        // which sorts replays from conflicts and yields the same errors.
        if to_insert.len() == indices.len() && self.copy_cooldown.allows_copy() {
            let savepoint = tx.savepoint("copy_fast_path").await?;
            match copy_rows(&savepoint, &self.topic, batch, indices).await {
                Ok(()) => {
                    savepoint.commit().await?;
                    let written: Vec<Uuid> = indices.iter().map(|&i| batch[i].record.id()).collect();
                    let purged = undo_purged_inserts(&tx, &written).await?;
                    tx.commit().await?;
                    self.metrics.postgres_batches_total.with_label_values(&["copy"]).inc();
                    return Ok(indices
                        .iter()
                        .map(|&i| purged.get(&batch[i].record.id()).cloned().unwrap_or(Outcome::Written))
                        .collect());
                }
                Err(CopyFailure::Database(e)) if !is_data_error(&e) => return Err(BackendError::from(e)),
                Err(failure) => {
                    if let CopyFailure::Encode(e) = failure {
                        tracing::warn!(error = %e, "binary COPY encoding refused a value; writing the batch with INSERT");
                    }
                    self.copy_cooldown.refused();
                    savepoint.rollback().await?;
                }
            }
        }

        let inserted: HashSet<Uuid> = if to_insert.is_empty() {
            HashSet::new()
        } else {
            let params = self.parameters(batch, indices, &to_insert);
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|p| {
                    let r: &(dyn ToSql + Sync) = p.as_ref();
                    r
                })
                .collect();
            tx.query(insert, &refs).await?.iter().map(|row| row.get::<_, Uuid>(0)).collect()
        };

        let existing_ids: Vec<Uuid> =
            to_insert.iter().map(|&k| batch[indices[k]].record.id()).filter(|id| !inserted.contains(id)).collect();
        let stored: HashMap<Uuid, Option<Uuid>> = if existing_ids.is_empty() {
            HashMap::new()
        } else {
            tx.query(
                &format!(
                    "SELECT {1}, ingest_content_hash FROM {0} WHERE {1} = ANY($1)",
                    t.logical_name, t.primary_id_attribute
                ),
                &[&existing_ids],
            )
            .await?
            .iter()
            .map(|row| (row.get::<_, Uuid>(0), row.get::<_, Option<Uuid>>(1)))
            .collect()
        };
        // Ids inserted, and ids that existed at the insert but are gone now:
        // either may have been purged by a transaction that committed while
        // this one ran.
        let recheck: Vec<Uuid> = inserted
            .iter()
            .copied()
            .chain(existing_ids.iter().copied().filter(|id| !stored.contains_key(id)))
            .collect();
        let purged = undo_purged_inserts(&tx, &recheck).await?;
        for &k in &to_insert {
            let r = &batch[indices[k]].record;
            outcomes[k] = Some(if let Some(outcome) = purged.get(&r.id()) {
                outcome.clone()
            } else if inserted.contains(&r.id()) {
                Outcome::Written
            } else {
                classify_existing(r.content_hash(), stored.get(&r.id()).copied().flatten(), r.id())
            });
        }
        for &k in &later {
            let r = &batch[indices[k]].record;
            let id = r.id();
            outcomes[k] = Some(if let Some(outcome) = tombstoned.get(&id).or_else(|| purged.get(&id)) {
                outcome.clone()
            } else if inserted.contains(&id) {
                classify_existing(r.content_hash(), first.get(&id).copied(), id)
            } else {
                classify_existing(r.content_hash(), stored.get(&id).copied().flatten(), id)
            });
        }
        tx.commit().await?;
        self.metrics.postgres_batches_total.with_label_values(&["insert"]).inc();
        Ok(outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Replay)).collect())
    }

    /// The bound parameters of the insert: one typed array per column.
    fn parameters(&self, batch: &Batch, indices: &[usize], rows: &[usize]) -> Vec<Box<dyn ToSql + Sync + Send>> {
        let t = table();
        let layout = create_columns();
        let n = rows.len();
        let mut columns: Vec<ParamColumn> = layout
            .iter()
            .map(|&i| match t.columns[i].column_type {
                ColumnType::Uniqueidentifier | ColumnType::Lookup => ParamColumn::Uuid(Vec::with_capacity(n)),
                ColumnType::String | ColumnType::Memo => ParamColumn::Text(Vec::with_capacity(n)),
                ColumnType::Datetime => ParamColumn::Time(Vec::with_capacity(n)),
                _ => ParamColumn::Int(Vec::with_capacity(n)),
            })
            .collect();
        let mut state = Vec::with_capacity(n);
        let mut created = Vec::with_capacity(n);
        let mut topic = Vec::with_capacity(n);
        let mut partition = Vec::with_capacity(n);
        let mut offset = Vec::with_capacity(n);
        let mut hash = Vec::with_capacity(n);
        for &k in rows {
            let entry = &batch[indices[k]];
            let r = &entry.record;
            for (col, value) in columns.iter_mut().zip(r.values()) {
                match (col, value) {
                    (ParamColumn::Uuid(v), Value::Guid(g)) => v.push(Some(*g)),
                    (ParamColumn::Uuid(v), _) => v.push(None),
                    (ParamColumn::Text(v), Value::Text(s)) => v.push(Some(s.clone())),
                    (ParamColumn::Text(v), _) => v.push(None),
                    (ParamColumn::Int(v), Value::Int(i)) => v.push(Some(*i)),
                    (ParamColumn::Int(v), _) => v.push(None),
                    (ParamColumn::Time(v), Value::DateTime(d)) => v.push(Some(*d)),
                    (ParamColumn::Time(v), _) => v.push(None),
                }
            }
            state.push(r.state_code());
            created.push(r.created_on());
            topic.push(self.topic.clone());
            partition.push(entry.message.partition);
            offset.push(entry.message.offset);
            hash.push(r.content_hash());
        }
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = columns
            .into_iter()
            .map(|c| -> Box<dyn ToSql + Sync + Send> {
                match c {
                    ParamColumn::Uuid(v) => Box::new(v),
                    ParamColumn::Text(v) => Box::new(v),
                    ParamColumn::Int(v) => Box::new(v),
                    ParamColumn::Time(v) => Box::new(v),
                }
            })
            .collect();
        params.push(Box::new(state));
        params.push(Box::new(created));
        params.push(Box::new(topic));
        params.push(Box::new(partition));
        params.push(Box::new(offset));
        params.push(Box::new(hash));
        params
    }
}

/// Closes the race between a batch and a concurrent purge of the same ids.
/// The tombstone lookup at the start of the batch cannot see a purge that
/// commits later; but an insert of an id whose row a purge is deleting waits
/// for that purge, so once the insert is done the purge has committed, and
/// this statement (READ COMMITTED: a fresh snapshot) sees its tombstone. The
/// ids found tombstoned are removed again inside the batch's transaction and
/// reported as purged replays: a purged id is never re-created.
async fn undo_purged_inserts(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Outcome>, BackendError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let t = table();
    let (name, id) = (&t.logical_name, &t.primary_id_attribute);
    let tombstoned = tombstones(tx, ids).await?;
    if !tombstoned.is_empty() {
        let doomed: Vec<Uuid> = tombstoned.keys().copied().collect();
        tx.execute(&format!("DELETE FROM {name} WHERE {id} = ANY($1)"), &[&doomed]).await?;
    }
    Ok(tombstoned)
}

/// The tombstoned ones of `ids`, each with its replay outcome (purged or deleted).
async fn tombstones(
    tx: &tokio_postgres::Transaction<'_>,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Outcome>, BackendError> {
    let t = table();
    let sql = format!(
        "SELECT {id}, deleted_by IS NOT NULL FROM {} WHERE {id} = ANY($1)",
        t.tombstone_table(),
        id = t.primary_id_attribute
    );
    Ok(tx
        .query(&sql, &[&ids])
        .await?
        .iter()
        .map(|row| {
            let outcome = if row.get::<_, bool>(1) { Outcome::DeletedReplay } else { Outcome::PurgedReplay };
            (row.get::<_, Uuid>(0), outcome)
        })
        .collect())
}

/// Columns and wire types of the binary COPY: the record layout, then the
/// state, creation time and source columns.
fn copy_columns() -> &'static (String, Vec<tokio_postgres::types::Type>) {
    use tokio_postgres::types::Type;
    static COLUMNS: std::sync::LazyLock<(String, Vec<Type>)> = std::sync::LazyLock::new(|| {
        let t = table();
        let mut names = Vec::new();
        let mut types = Vec::new();
        for &i in create_columns() {
            let c = &t.columns[i];
            names.push(c.logical_name.as_str());
            types.push(match c.column_type {
                ColumnType::Uniqueidentifier | ColumnType::Lookup => Type::UUID,
                ColumnType::String | ColumnType::Memo => Type::TEXT,
                ColumnType::Bigint => Type::INT8,
                ColumnType::Datetime => Type::TIMESTAMPTZ,
                ColumnType::Picklist | ColumnType::State | ColumnType::Status | ColumnType::Integer => Type::INT4,
            });
        }
        for (name, ty) in [
            ("statecode", Type::INT4),
            ("createdon", Type::TIMESTAMPTZ),
            ("ingest_topic", Type::TEXT),
            ("ingest_partition", Type::INT4),
            ("ingest_offset", Type::INT8),
            ("ingest_content_hash", Type::UUID),
        ] {
            names.push(name);
            types.push(ty);
        }
        (format!("COPY {} ({}) FROM STDIN (FORMAT binary)", t.logical_name, names.join(", ")), types)
    });
    &COLUMNS
}

/// A value the binary COPY encoding could not represent (a datetime outside
/// PostgreSQL's range, a text longer than a field may be). Never expected
/// after validation; the batch then takes the `INSERT` path, which reports
/// the value's own error.
#[derive(Debug)]
pub struct CopyEncodeError(String);

impl std::fmt::Display for CopyEncodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Appends one binary COPY field: its length, then the value in the type's
/// binary send format.
fn put_field<T: ToSql>(out: &mut BytesMut, ty: &tokio_postgres::types::Type, value: &T) -> Result<(), CopyEncodeError> {
    use tokio_postgres::types::IsNull;
    let at = out.len();
    out.put_i32(0);
    let is_null = value.to_sql(ty, out).map_err(|e| CopyEncodeError(e.to_string()))?;
    let len = match is_null {
        IsNull::Yes => {
            out.truncate(at + 4);
            -1
        }
        IsNull::No => i32::try_from(out.len() - at - 4)
            .map_err(|_| CopyEncodeError(format!("a {ty} value of {} bytes is too large", out.len() - at - 4)))?,
    };
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Encodes a batch's rows as a complete PostgreSQL binary COPY stream
/// (`COPY … FROM STDIN (FORMAT binary)` with [`copy_columns`]): the signature
/// header, one tuple per row, the trailer. Each value goes through its
/// type's own `ToSql` encoding, statically dispatched.
pub fn encode_copy_rows(
    topic: &str,
    batch: &Batch,
    indices: &[usize],
    out: &mut BytesMut,
) -> Result<(), CopyEncodeError> {
    use tokio_postgres::types::Type;
    let (_, types) = copy_columns();
    let field_count = i16::try_from(types.len()).map_err(|_| CopyEncodeError("too many COPY columns".into()))?;
    out.put_slice(b"PGCOPY\n\xff\r\n\0");
    out.put_i32(0); // flags: no OIDs
    out.put_i32(0); // header extension length
    for &i in indices {
        let entry = &batch[i];
        let r = &entry.record;
        out.put_i16(field_count);
        let (layout_types, source_types) = types.split_at(r.values().len());
        for (value, ty) in r.values().iter().zip(layout_types) {
            match value {
                Value::Null => out.put_i32(-1),
                Value::Guid(g) => put_field(out, ty, g)?,
                Value::Text(s) => put_field(out, ty, &s.as_str())?,
                Value::Int(v) if *ty == Type::INT8 => put_field(out, ty, &i64::from(*v))?,
                Value::Int(v) => put_field(out, ty, v)?,
                Value::DateTime(d) => put_field(out, ty, d)?,
            }
        }
        // The six columns after the layout, in `copy_columns` order.
        let [state, created, topic_type, partition, offset, hash] = source_types else {
            return Err(CopyEncodeError(format!("{} COPY columns after the record layout, not 6", source_types.len())));
        };
        put_field(out, state, &r.state_code())?;
        put_field(out, created, &r.created_on())?;
        put_field(out, topic_type, &topic)?;
        put_field(out, partition, &entry.message.partition)?;
        put_field(out, offset, &entry.message.offset)?;
        put_field(out, hash, &r.content_hash())?;
    }
    out.put_i16(-1);
    Ok(())
}

/// Why the binary COPY of a batch did not happen.
enum CopyFailure {
    Encode(CopyEncodeError),
    Database(tokio_postgres::Error),
}

/// Writes a batch's rows with binary COPY: encoded in memory, then sent as
/// one stream.
async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    topic: &str,
    batch: &Batch,
    indices: &[usize],
) -> Result<(), CopyFailure> {
    use futures_util::SinkExt;
    // About the size of a typical row's encoding, so most batches never regrow.
    let mut stream = BytesMut::with_capacity(indices.len() * 640 + 32);
    encode_copy_rows(topic, batch, indices, &mut stream).map_err(CopyFailure::Encode)?;
    let (sql, _) = copy_columns();
    let sink = tx.copy_in::<_, bytes::Bytes>(sql.as_str()).await.map_err(CopyFailure::Database)?;
    let mut sink = std::pin::pin!(sink);
    sink.send(stream.freeze()).await.map_err(CopyFailure::Database)?;
    sink.as_mut().finish().await.map_err(CopyFailure::Database)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads a binary COPY stream back into rows of optional field bytes.
    fn parse_copy_stream(mut s: &[u8]) -> Vec<Vec<Option<Vec<u8>>>> {
        fn take<'a>(s: &mut &'a [u8], n: usize) -> &'a [u8] {
            let (head, tail) = s.split_at(n);
            *s = tail;
            head
        }
        assert_eq!(take(&mut s, 11), b"PGCOPY\n\xff\r\n\0");
        assert_eq!(take(&mut s, 8), [0u8; 8], "no flags, no header extension");
        let mut rows = Vec::new();
        loop {
            let count = i16::from_be_bytes(take(&mut s, 2).try_into().unwrap());
            if count == -1 {
                assert!(s.is_empty(), "nothing after the trailer");
                return rows;
            }
            let row = (0..count)
                .map(|_| {
                    let len = i32::from_be_bytes(take(&mut s, 4).try_into().unwrap());
                    (len >= 0).then(|| take(&mut s, len as usize).to_vec())
                })
                .collect();
            rows.push(row);
        }
    }

    #[test]
    fn copy_rows_encode_every_column_in_the_binary_format() {
        use crate::batch::Entry;
        use crate::normalize::Normalizer;
        use crate::transport::ingest::source::Inbound;
        let payloads = [
            r#"{"msdyn_name":"Copy – ünïcode","msdyn_scenariorequestid":"r1","msdyn_interactiontype":"Copy",
                "msdyn_scenariotype":"Copilot","msdyn_clienttimestamp":"2024-06-01T12:30:00.123Z"}"#,
            r#"{"msdyn_name":"b","msdyn_scenariorequestid":"r2","msdyn_interactiontype":"ThumbsUp",
                "msdyn_scenariotype":"Copilot","msdyn_interactioncontext":{"k":[1,2]}}"#,
        ];
        let batch: Batch = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Entry {
                record: Normalizer::default().normalize_json(p.as_bytes(), None, chrono::Utc::now()).unwrap(),
                message: Inbound::for_test(7, 40 + i as i64, p.as_bytes().to_vec()),
            })
            .collect();
        let mut out = BytesMut::new();
        encode_copy_rows("copilot.interactions", &batch, &[1, 0], &mut out).unwrap();
        let rows = parse_copy_stream(&out);
        assert_eq!(rows.len(), 2, "the rows named by the indices, in their order");
        let (_, types) = copy_columns();
        let t = table();
        for (row, entry) in rows.iter().zip([&batch[1], &batch[0]]) {
            assert_eq!(row.len(), types.len());
            let r = &entry.record;
            for ((field, value), &index) in row.iter().zip(r.values()).zip(create_columns()) {
                let column = &t.columns[index].logical_name;
                let expected: Option<Vec<u8>> = match value {
                    Value::Null => None,
                    Value::Text(s) => Some(s.as_bytes().to_vec()),
                    Value::Guid(g) => Some(g.as_bytes().to_vec()),
                    Value::Int(v) if t.columns[index].column_type == ColumnType::Bigint => {
                        Some(i64::from(*v).to_be_bytes().to_vec())
                    }
                    Value::Int(v) => Some(v.to_be_bytes().to_vec()),
                    // Microseconds since 2000-01-01T00:00:00Z.
                    Value::DateTime(d) => Some((d.timestamp_micros() - 946_684_800_000_000).to_be_bytes().to_vec()),
                };
                assert_eq!(field, &expected, "{column}");
            }
            let extra = &row[r.values().len()..];
            assert_eq!(extra[0].as_deref(), Some(&r.state_code().to_be_bytes()[..]));
            let created = r.created_on().timestamp_micros() - 946_684_800_000_000;
            assert_eq!(extra[1].as_deref(), Some(&created.to_be_bytes()[..]));
            assert_eq!(extra[2].as_deref(), Some(&b"copilot.interactions"[..]));
            assert_eq!(extra[3].as_deref(), Some(&7i32.to_be_bytes()[..]));
            assert_eq!(extra[4].as_deref(), Some(&entry.message.offset.to_be_bytes()[..]));
            assert_eq!(extra[5].as_deref(), Some(&r.content_hash().as_bytes()[..]));
        }
    }

    #[test]
    fn a_refused_copy_is_skipped_for_the_next_batches_then_tried_again() {
        let cooldown = CopyCooldown::default();
        assert!(cooldown.allows_copy() && cooldown.allows_copy(), "COPY first while nothing was refused");
        cooldown.refused();
        let skipped = std::iter::repeat_with(|| cooldown.allows_copy()).take_while(|allowed| !allowed).count();
        assert_eq!(skipped, COPY_COOLDOWN_BATCHES as usize);
        assert!(cooldown.allows_copy());
    }
}
