//! Per-event costs on one core: decode + validate + normalize (typical event
//! and one with a 16 KB context; JSON and Avro), the offset tracker, and
//! batch assembly, and building the sinks' SQL input (PostgreSQL's binary
//! COPY stream; SQLite's bound insert, executed in memory).

use std::hint::black_box;
use std::time::Duration;

use chrono::Utc;
use copilot_ingest::normalize::Normalizer;
use copilot_ingest::record::Origin;
use copilot_ingest::transport::ingest::offsets::OffsetTracker;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn typical_event() -> Vec<u8> {
    serde_json::json!({
        "msdyn_name": "SendToCustomer - Live conversation response",
        "msdyn_scenariorequestid": "3f0b6e5c-2b7e-4a61-9a4e-0d8c1c1f7a10",
        "msdyn_interactiontype": "SendToCustomer",
        "msdyn_scenariotype": "Live conversation response",
        "msdyn_clienttimestamp": "2024-06-01T12:30:00.123+02:00",
        "msdyn_interactioncontext": {"client": "agent-desktop", "version": "9.2.24064", "locale": "en-US", "latencyMs": 812, "responseLength": 1290},
        "msdyn_interactiondataid": "{8A3C9D5E-1F2A-4B3C-8D4E-5F6A7B8C9D0E}",
        "msdyn_interactionforid": "CAS-01234-X7Y8Z9",
        "msdyn_interactionforlogicalname": "incident"
    })
    .to_string()
    .into_bytes()
}

fn large_event() -> Vec<u8> {
    let context = "Customer asked about the refund policy for damaged items. ".repeat(280);
    serde_json::json!({
        "msdyn_name": "Generated - Case summary",
        "msdyn_scenariorequestid": "req-77",
        "msdyn_interactiontype": 100230305,
        "msdyn_scenariotype": 100230205,
        "msdyn_clienttimestamp": 1717237800123i64,
        "msdyn_interactioncontext": context,
    })
    .to_string()
    .into_bytes()
}

fn normalize(c: &mut Criterion) {
    let n = Normalizer::default();
    let now = Utc::now();
    let origin = Origin { topic: "copilot.interactions", partition: 3, offset: 123_456 };
    let mut group = c.benchmark_group("normalize");
    for (name, payload) in [("typical_json", typical_event()), ("context_16k_json", large_event())] {
        group.throughput(Throughput::Elements(1));
        group.bench_function(format!("{name}_{}_bytes", payload.len()), |b| {
            b.iter(|| black_box(n.normalize_json(black_box(&payload), Some(&origin), now)).is_ok())
        });
    }
    group.finish();
}

fn offsets(c: &mut Criterion) {
    let mut group = c.benchmark_group("offsets");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("receive_and_ack_1000_out_of_order", |b| {
        let mut next = 0i64;
        let mut t = OffsetTracker::new();
        b.iter(|| {
            for o in next..next + 1000 {
                t.received(0, 0, o);
            }
            // Acknowledge in two interleaved halves, as two batches finishing out of order.
            for o in (next + 500..next + 1000).chain(next..next + 500) {
                t.done(0, 0, o);
            }
            next += 1000;
            black_box(t.committable_for(0, 0))
        })
    });
    group.finish();
}

/// Batch assembly: 1000 normalized records with their messages into the
/// batcher at the default limits (one batch comes out).
fn batches(c: &mut Criterion) {
    use copilot_ingest::batch::{Batcher, Entry};
    use copilot_ingest::transport::ingest::source::Inbound;

    let payload = typical_event();
    let record = Normalizer::default().normalize_json(&payload, None, Utc::now()).unwrap();
    let entries = || -> Vec<Entry> {
        (0..1000)
            .map(|i| Entry {
                record: record.clone(),
                message: Inbound {
                    partition: i % 64,
                    offset: i64::from(i),
                    timestamp_ms: Some(1_717_237_800_123),
                    key: Some(b"user-7".to_vec()),
                    payload: Some(payload.clone()),
                    headers: Vec::new(),
                },
            })
            .collect()
    };
    let mut group = c.benchmark_group("batch");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("assemble_1000_records", |b| {
        b.iter_batched(
            entries,
            |entries| {
                let mut batcher = Batcher::new(1000, 4_194_304, Duration::from_millis(200));
                let mut out = Vec::new();
                for entry in entries {
                    batcher.push(entry, &mut out);
                }
                black_box(out.len())
            },
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// 1000 distinct normalized records with their messages, as a batch.
fn thousand_record_batch() -> copilot_ingest::batch::Batch {
    use copilot_ingest::batch::Entry;
    use copilot_ingest::transport::ingest::source::Inbound;
    let normalizer = Normalizer::default();
    let now = Utc::now();
    (0..1000)
        .map(|i| {
            let mut event: serde_json::Value = serde_json::from_slice(&typical_event()).unwrap();
            event["msdyn_scenariorequestid"] = format!("req-{i}").into();
            let payload = event.to_string().into_bytes();
            let record = normalizer.normalize_json(&payload, None, now).unwrap();
            let message = Inbound {
                partition: i % 64,
                offset: i64::from(i),
                timestamp_ms: Some(1_717_237_800_123),
                key: None,
                payload: Some(payload),
                headers: Vec::new(),
            };
            Entry { record, message }
        })
        .collect()
}

fn sink_input(c: &mut Criterion) {
    let batch = thousand_record_batch();
    let indices: Vec<usize> = (0..batch.len()).collect();
    let mut group = c.benchmark_group("sink");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("postgres_binary_copy_encode_1000_rows", |b| {
        let mut out = bytes::BytesMut::new();
        b.iter(|| {
            out.clear();
            copilot_ingest::backend::postgres::encode_copy_rows("copilot.interactions", &batch, &indices, &mut out)
                .unwrap();
            black_box(out.len())
        })
    });
    // Binding and inserting 1000 rows into an empty in-memory table in one
    // transaction: the writer's per-row cost without the disk.
    group.bench_function("sqlite_bind_insert_1000_rows_in_memory", |b| {
        use copilot_ingest::backend::sqlite;
        b.iter_batched(
            || {
                let conn = rusqlite::Connection::open_in_memory().unwrap();
                sqlite::migrate(&conn).unwrap();
                conn
            },
            |mut conn| {
                let outcomes = sqlite::write_batches(&mut conn, &[(&batch, &indices)], "copilot.interactions");
                black_box(outcomes.len())
            },
            criterion::BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn avro(c: &mut Criterion) {
    use copilot_ingest::avro::{AvroSchemas, BUNDLED, encode_json, framed};
    use copilot_ingest::config::{AvroConfig, Format};
    use copilot_ingest::decode::{Decoded, Decoder};

    let schema = apache_avro::Schema::parse_str(BUNDLED[1].1).unwrap();
    let event: serde_json::Value = serde_json::from_slice(&typical_event()).unwrap();
    let datum = encode_json(&schema, &event).unwrap();
    let payload = framed(2, &datum);
    let json = typical_event();
    let decoder = Decoder {
        normalizer: Normalizer::default(),
        format: Format::Auto,
        avro: AvroSchemas::load(&AvroConfig::default()).unwrap(),
    };
    let now = Utc::now();
    let mut group = c.benchmark_group("avro");
    group.throughput(Throughput::Elements(1));
    group.bench_function(format!("json_decode_normalize_{}_bytes", json.len()), |b| {
        b.iter(|| matches!(decoder.decode(black_box(&json), None, now), Decoded::Record(_)))
    });
    group.bench_function(format!("avro_decode_normalize_{}_bytes_prepared_once", payload.len()), |b| {
        b.iter(|| matches!(decoder.decode(black_box(&payload), None, now), Decoded::Record(_)))
    });
    let copilot_ingest::avro::Lookup::Ready(prepared) = decoder.avro.lookup(2) else { panic!("bundled schema 2") };
    group.bench_function("avro_decode_only_prepared_once", |b| {
        b.iter(|| copilot_ingest::avro::decode(prepared, black_box(&datum)).is_ok())
    });
    // The slow path the decoder avoids: resolving writer against reader schema on every message.
    group.bench_function("avro_decode_only_resolving_schemas_per_message", |b| {
        b.iter(|| {
            #[allow(deprecated)]
            let v = apache_avro::from_avro_datum(&schema, &mut black_box(&datum[..]), Some(&schema));
            v.is_ok()
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = normalize, offsets, batches, sink_input, avro
}
criterion_main!(benches);
