//! The raw sink limits the service is compared with: the same rows the sink
//! stores (source columns included) written by the database's fastest path,
//! with nothing of the service in between.

use std::time::Instant;

use crate::record::{Record, Value, create_columns, format_datetime};
use crate::table::table;

pub(super) fn raw_sqlite(path: &std::path::Path, records: &[Record]) -> anyhow::Result<f64> {
    let mut conn = crate::backend::sqlite::open_connection(path)?;
    crate::backend::sqlite::migrate(&conn)?;
    let t = table();
    let cols: Vec<&str> = create_columns().iter().map(|&i| t.columns[i].logical_name.as_str()).collect();
    let sql = format!(
        "INSERT INTO {} ({}, statecode, createdon, versionnumber, ingest_topic, ingest_partition, ingest_offset, \
         ingest_content_hash) VALUES ({})",
        t.logical_name,
        cols.join(", "),
        (1..=cols.len() + 7).map(|i| format!("?{i}")).collect::<Vec<_>>().join(", ")
    );
    let started = Instant::now();
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare(&sql)?;
        for (i, r) in records.iter().enumerate() {
            let mut params: Vec<rusqlite::types::Value> = r
                .values()
                .iter()
                .map(|v| match v {
                    Value::Null => rusqlite::types::Value::Null,
                    Value::Text(s) => s.clone().into(),
                    Value::Int(i) => i64::from(*i).into(),
                    Value::Guid(g) => g.hyphenated().to_string().into(),
                    Value::DateTime(d) => format_datetime(d).into(),
                })
                .collect();
            params.push(i64::from(r.state_code()).into());
            params.push(format_datetime(&r.created_on()).into());
            params.push((i as i64).into());
            let (partition, offset) = source_position(i);
            params.push(BENCH_TOPIC.to_owned().into());
            params.push(partition.into());
            params.push(offset.into());
            params.push(r.content_hash().hyphenated().to_string().into());
            stmt.execute(rusqlite::params_from_iter(params))?;
        }
    }
    tx.commit()?;
    let rate = records.len() as f64 / started.elapsed().as_secs_f64();
    drop(conn);
    remove_database(path);
    Ok(rate)
}

/// Removes a measured SQLite database at once: its dirty pages are then
/// dropped instead of written back by the kernel during the next
/// measurement (which slowed the following drain by up to half).
pub(super) fn remove_database(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

/// The service's SQLite write path alone, without Kafka: the same rows in
/// batches of `batch_rows`, `group` batches per transaction (what the group
/// commit gathers during a drain), through the writer's own `write_batches`.
/// Against the raw insert it shows what the write path costs; against the
/// end-to-end run, what the rest of the pipeline costs on shared cores.
pub(super) fn sqlite_writer_alone(
    path: &std::path::Path,
    records: &[Record],
    batch_rows: usize,
    group: usize,
) -> anyhow::Result<f64> {
    use crate::batch::{Batch, Entry};
    use crate::transport::ingest::source::Inbound;
    let mut conn = crate::backend::sqlite::open_connection(path)?;
    crate::backend::sqlite::migrate(&conn)?;
    let batches: Vec<Batch> = records
        .chunks(batch_rows.max(1))
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let (partition, offset) = source_position(b * batch_rows + i);
                    Entry { record: r.clone(), message: Inbound::without_message(partition as i32, offset) }
                })
                .collect()
        })
        .collect();
    let indices: Vec<Vec<usize>> = batches.iter().map(|b| (0..b.len()).collect()).collect();
    let started = Instant::now();
    for (batches, indices) in batches.chunks(group.max(1)).zip(indices.chunks(group.max(1))) {
        let writes: Vec<(&Batch, &[usize])> = batches.iter().zip(indices).map(|(b, i)| (b, i.as_slice())).collect();
        for result in crate::backend::sqlite::write_batches(&mut conn, &writes, BENCH_TOPIC) {
            result.map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    let rate = records.len() as f64 / started.elapsed().as_secs_f64();
    drop(conn);
    remove_database(path);
    Ok(rate)
}

/// Stands in for the topic in the raw baselines' source columns.
const BENCH_TOPIC: &str = "copilot.interactions.bench";

/// A plausible Kafka position for the raw baselines' i-th row.
fn source_position(i: usize) -> (i64, i64) {
    ((i % 64) as i64, (i / 64) as i64)
}

/// COPY text-format escaping.
fn copy_text(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// The table a raw COPY writes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CopyTable {
    /// The product's own table, indexes and `versionnumber` default included.
    Product,
    /// The same columns with only the primary key; `versionnumber` is sent.
    Bare,
    /// The index set before this release: B-trees on `createdon` and on the
    /// retention operation column, and the `versionnumber` default.
    PreviousIndexes,
}

impl CopyTable {
    pub(super) fn describe(self) -> &'static str {
        match self {
            CopyTable::Product => "raw PostgreSQL COPY (text) into the product's table",
            CopyTable::Bare => "raw PostgreSQL COPY (text) into the same columns, primary key only",
            CopyTable::PreviousIndexes => {
                "raw PostgreSQL COPY (text), previous index set (B-tree createdon, B-tree retention operation)"
            }
        }
    }
}

/// Creates the variant's table beside the product's; returns its name.
async fn copy_target(client: &tokio_postgres::Client, variant: CopyTable) -> anyhow::Result<String> {
    let t = table();
    let (name, id) = (&t.logical_name, &t.primary_id_attribute);
    Ok(match variant {
        CopyTable::Product => name.clone(),
        CopyTable::Bare => {
            client
                .batch_execute(&format!(
                    "CREATE TABLE bench_bare (LIKE {name} INCLUDING DEFAULTS); ALTER TABLE bench_bare ADD PRIMARY KEY ({id});
                     ALTER TABLE bench_bare ALTER COLUMN versionnumber DROP DEFAULT;"
                ))
                .await?;
            "bench_bare".into()
        }
        CopyTable::PreviousIndexes => {
            client
                .batch_execute(&format!(
                    "CREATE TABLE bench_previous (LIKE {name} INCLUDING DEFAULTS); ALTER TABLE bench_previous ADD PRIMARY KEY ({id});
                     CREATE INDEX ON bench_previous (createdon); CREATE INDEX ON bench_previous (msft_retention_operationid);"
                ))
                .await?;
            "bench_previous".into()
        }
    })
}

pub(super) async fn raw_copy(url: &str, records: &[Record], variant: CopyTable) -> anyhow::Result<f64> {
    use futures_util::SinkExt;
    let client = crate::backend::postgres::connect(url).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    crate::backend::postgres::migrate(&client).await?;
    let target = copy_target(&client, variant).await?;
    // Every variant starts from a clean checkpoint, so none pays for the
    // previous one's dirty pages (the bench connects as a superuser).
    let _ = client.batch_execute("CHECKPOINT").await;
    let t = table();
    let cols: Vec<&str> = create_columns().iter().map(|&i| t.columns[i].logical_name.as_str()).collect();
    // Without the sequence default, the version is part of the row.
    let version = variant == CopyTable::Bare;
    let started = Instant::now();
    let sink = client
        .copy_in(&format!(
            "COPY {target} ({}, statecode, createdon, ingest_topic, ingest_partition, ingest_offset, ingest_content_hash{}) \
             FROM STDIN",
            cols.join(", "),
            if version { ", versionnumber" } else { "" }
        ))
        .await?;
    let mut sink = std::pin::pin!(sink);
    let mut buf = String::with_capacity(8 << 20);
    for (i, r) in records.iter().enumerate() {
        for v in r.values() {
            match v {
                Value::Null => buf.push_str("\\N"),
                Value::Text(s) => copy_text(&mut buf, s),
                Value::Int(i) => buf.push_str(&i.to_string()),
                Value::Guid(g) => buf.push_str(&g.hyphenated().to_string()),
                Value::DateTime(d) => buf.push_str(&format_datetime(d)),
            }
            buf.push('\t');
        }
        buf.push_str(&r.state_code().to_string());
        buf.push('\t');
        buf.push_str(&format_datetime(&r.created_on()));
        let (partition, offset) = source_position(i);
        buf.push_str(&format!("\t{BENCH_TOPIC}\t{partition}\t{offset}\t{}", r.content_hash().hyphenated()));
        if version {
            buf.push_str(&format!("\t{}", i + 1));
        }
        buf.push('\n');
        if buf.len() > (4 << 20) {
            sink.send(bytes_of(&mut buf)).await?;
        }
    }
    if !buf.is_empty() {
        sink.send(bytes_of(&mut buf)).await?;
    }
    sink.as_mut().finish().await?;
    let rate = records.len() as f64 / started.elapsed().as_secs_f64();
    // Vacuumed now, outside the timing, so that autovacuum of this table
    // does not run during the next measurement.
    let _ = client.batch_execute(&format!("VACUUM (ANALYZE) {target}")).await;
    Ok(rate)
}

fn bytes_of(buf: &mut String) -> std::io::Cursor<Vec<u8>> {
    std::io::Cursor::new(std::mem::take(buf).into_bytes())
}
