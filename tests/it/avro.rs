//! Avro in the Confluent wire format: events written by an independent
//! implementation (Python fastavro) with both schema versions, and the Schema
//! Registry path (fetched once per id; an outage pauses, never dead-letters).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use chrono::Utc;
use copilot_ingest::config::{AvroConfig, Format};
use copilot_ingest::decode::{Decoded, Decoder};
use copilot_ingest::normalize::Normalizer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

const FASTAVRO_SCRIPT: &str = r#"
import io, json, struct, sys
import fastavro
v1 = fastavro.parse_schema(json.load(open(sys.argv[1])))
v2 = fastavro.parse_schema(json.load(open(sys.argv[2])))
v1_fields = {f["name"] for f in json.load(open(sys.argv[1]))["fields"]}
events = [
    {"msdyn_name": "ThumbsUp - Case summary", "msdyn_scenariorequestid": "3f0b6e5c-2b7e-4a61-9a4e-0d8c1c1f7a10",
     "msdyn_interactiontype": 100230301, "msdyn_scenariotype": "Case summary", "msdyn_clienttimestamp": 1717237800123,
     "msdyn_interactioncontext": "{\"latencyMs\":812}", "msdyn_interactionforid": "CAS-01234"},
    {"msdyn_name": "Copy \u00e9\u00e8 \u6f22\u5b57 \U0001F600", "msdyn_scenariorequestid": "req-2",
     "msdyn_interactiontype": "copy", "msdyn_scenariotype": 100230202, "msdyn_clienttimestamp": "2024-06-01T12:30:00+02:00",
     "msdyn_interactiondataid": "{8A3C9D5E-1F2A-4B3C-8D4E-5F6A7B8C9D0E}", "msdyn_copilotinteractionid": "0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d",
     "overriddencreatedon": 1577836800000, "importsequencenumber": 7, "timezoneruleversionnumber": 0, "utcconversiontimezonecode": 85},
    {"msdyn_name": "Available", "msdyn_scenariorequestid": "req-3", "msdyn_interactiontype": "AVAILABLE",
     "msdyn_scenariotype": "copilot", "msdyn_interactionforid": "c0ffee00-0000-4000-8000-000000000001",
     "msdyn_interactionforlogicalname": "systemuser"},
]
out = []
for e in events:
    row = {"json": e}
    for sid, schema, fields in ((1, v1, v1_fields), (2, v2, None)):
        record = {k: v for k, v in e.items() if fields is None or k in fields}
        if sid == 2 and isinstance(record.get("overriddencreatedon"), int):
            import datetime
            record["overriddencreatedon"] = datetime.datetime.fromtimestamp(record["overriddencreatedon"] / 1000, datetime.timezone.utc)
        if sid == 2 and isinstance(record.get("msdyn_clienttimestamp"), int):
            import datetime
            record["msdyn_clienttimestamp"] = datetime.datetime.fromtimestamp(record["msdyn_clienttimestamp"] / 1000, datetime.timezone.utc)
        buf = io.BytesIO()
        buf.write(b"\x00" + struct.pack(">I", sid))
        fastavro.schemaless_writer(buf, schema, record)
        row["v%d" % sid] = buf.getvalue().hex()
        row["json_v%d" % sid] = {k: v for k, v in e.items() if fields is None or k in fields}
    out.append(row)
json.dump(out, sys.stdout)
"#;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// Events written by fastavro with both schema versions normalize to the
/// same records as their JSON twins.
#[test]
fn fastavro_events_match_their_json_twins() {
    let root = env!("CARGO_MANIFEST_DIR");
    let output = std::process::Command::new("python3")
        .args(["-c", FASTAVRO_SCRIPT])
        .arg(format!("{root}/schemas/copilot_interaction_event.v1.avsc"))
        .arg(format!("{root}/schemas/copilot_interaction_event.avsc"))
        .output();
    let output = match output {
        Ok(o) if o.status.success() => o,
        other => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("python3 with fastavro is required under CI: {other:?}");
            }
            eprintln!("skipping: python3 with fastavro not available");
            return;
        }
    };
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap();
    let decoder = Decoder {
        normalizer: Normalizer::default(),
        format: Format::Auto,
        avro: copilot_ingest::avro::AvroSchemas::load(&AvroConfig::default()).unwrap(),
    };
    let now = Utc::now();
    assert_eq!(rows.len(), 3);
    for row in rows {
        for version in ["v1", "v2"] {
            let avro = hex(row[version].as_str().unwrap());
            let twin = row[format!("json_{version}")].to_string();
            let from_avro = match decoder.decode(&avro, None, now) {
                Decoded::Record(r) => r,
                Decoded::Rejected(r) => panic!("{version}: {r} for {twin}"),
                Decoded::NeedsSchema(_) => panic!("schema"),
            };
            let Decoded::Record(from_json) = decoder.decode(twin.as_bytes(), None, now) else {
                panic!("json twin {twin}")
            };
            assert_eq!(from_avro.to_json(), from_json.to_json(), "{version} of {twin}");
            assert_eq!(from_avro.id(), from_json.id());
        }
    }
}

/// A tiny Schema Registry: counts fetches per id; answers 503 while "down".
struct FakeRegistry {
    addr: std::net::SocketAddr,
    hits: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
    /// While true, look-ups of ids the registry does not have hang.
    hold_unknown: Arc<AtomicBool>,
}

async fn fake_registry(schemas: Vec<(u32, String)>) -> FakeRegistry {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let down = Arc::new(AtomicBool::new(false));
    let hold_unknown = Arc::new(AtomicBool::new(false));
    let (h, d, hold) = (hits.clone(), down.clone(), hold_unknown.clone());
    let schemas = Arc::new(schemas);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (h, d, hold, schemas) = (h.clone(), d.clone(), hold.clone(), schemas.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = stream.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
                let requested: u32 = path.rsplit('/').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                while hold.load(Ordering::SeqCst) && !schemas.iter().any(|(i, _)| *i == requested) {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                let response = if d.load(Ordering::SeqCst) {
                    "HTTP/1.0 503 Service Unavailable\r\n\r\n".to_owned()
                } else {
                    h.fetch_add(1, Ordering::SeqCst);
                    let id: u32 = path.rsplit('/').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    match schemas.iter().find(|(i, _)| *i == id) {
                        Some((_, text))
                            if path.starts_with("/schemas/ids/")
                                // Header names are case-insensitive (HTTP/1.1 clients may send them lower-cased).
                                && request.to_ascii_lowercase().contains("authorization: basic dxnlcjpwyxnz") =>
                        {
                            let body = serde_json::json!({"schema": text}).to_string();
                            format!(
                                "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                                body.len()
                            )
                        }
                        Some(_) => "HTTP/1.0 401 Unauthorized\r\n\r\n".to_owned(),
                        None => "HTTP/1.0 404 Not Found\r\n\r\n{\"error_code\":40403}".to_owned(),
                    }
                };
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    FakeRegistry { addr, hits, down, hold_unknown }
}

/// Unknown schema ids from a hostile producer are looked up off the ordered
/// path: while the registry takes its time over them (here: hangs), valid
/// events on the other partition are written; once it answers 404 they are
/// dead-lettered as unknown_schema_id, and nothing is lost or stalled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_schema_ids_never_hold_back_other_partitions() {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let v2 = copilot_ingest::avro::BUNDLED[1].1.to_owned();
    let registry = fake_registry(vec![(7, v2.clone())]).await;
    registry.hold_unknown.store(true, Ordering::SeqCst);
    let kafka = TestKafka::new(2);
    let (_dir, url) = temp_sqlite();
    let mut config = kafka.config_with_sink(&url);
    config.avro.registry_url = format!("http://user:pass@{}", registry.addr);
    let pipeline = RunningPipeline::start(config);
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &kafka.bootstrap).create().unwrap();
    let send = |partition: i32, value: Vec<u8>| {
        let producer = producer.clone();
        let topic = kafka.config.kafka.topic.clone();
        async move {
            producer
                .send(FutureRecord::to(&topic).key("k").payload(&value).partition(partition), Duration::from_secs(10))
                .await
                .unwrap();
        }
    };
    // Partition 0: 50 messages with random schema ids the registry does not know.
    const UNKNOWN: usize = 50;
    for i in 0..UNKNOWN as u32 {
        send(0, copilot_ingest::avro::framed(1_000 + i * 7919, b"\x02x")).await;
    }
    // Partition 1: valid JSON events.
    let valid = Workload::generate(71, 200, 0.0);
    for (_, value) in &valid.messages {
        send(1, value.clone()).await;
    }
    wait_for("partition 1 written while partition 0 waits for the registry", Duration::from_secs(60), || {
        pipeline.written() == 200
    })
    .await;
    assert_eq!(Metrics::total(&pipeline.metrics.dlq_events_total), 0, "the unknown ids are still being looked up");

    registry.hold_unknown.store(false, Ordering::SeqCst);
    pipeline.wait_handled(200 + UNKNOWN as u64, Duration::from_secs(60)).await;
    assert_eq!(pipeline.metrics.dlq_events_total.with_label_values(&["unknown_schema_id"]).get(), UNKNOWN as u64);
    wait_for("offsets at the log end", Duration::from_secs(30), || kafka.committed() == kafka.log_end()).await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_schemas_are_fetched_once_and_an_outage_only_pauses() {
    let v2 = copilot_ingest::avro::BUNDLED[1].1.to_owned();
    let registry = fake_registry(vec![(7, v2.clone()), (8, v2.clone())]).await;
    let kafka = TestKafka::new(2);
    let (_dir, url) = temp_sqlite();
    let mut config = kafka.config_with_sink(&url);
    config.avro.registry_url = format!("http://user:pass@{}", registry.addr);
    let pipeline = RunningPipeline::start(config);

    let schema = apache_avro::Schema::parse_str(&v2).unwrap();
    let framed = |id: u32, workload: &Workload| -> Vec<(String, Vec<u8>)> {
        workload
            .messages
            .iter()
            .map(|(k, v)| {
                let event: serde_json::Value = serde_json::from_slice(v).unwrap();
                (
                    k.clone(),
                    copilot_ingest::avro::framed(id, &copilot_ingest::avro::encode_json(&schema, &event).unwrap()),
                )
            })
            .collect()
    };
    let first = Workload::generate(61, 300, 0.0);
    kafka.produce(&framed(7, &first)).await;
    pipeline.wait_handled(300, Duration::from_secs(60)).await;
    assert_eq!(pipeline.written(), 300);
    assert_eq!(registry.hits.load(Ordering::SeqCst), 1, "fetched once per id");

    // An id the registry does not have: unknown_schema_id, dead-lettered, no stall.
    kafka.produce(&framed(99, &Workload::generate(62, 5, 0.0))).await;
    pipeline.wait_handled(305, Duration::from_secs(60)).await;
    assert_eq!(pipeline.metrics.dlq_events_total.with_label_values(&["unknown_schema_id"]).get(), 5);

    // The registry goes down before a new id appears: consumption waits.
    registry.down.store(true, Ordering::SeqCst);
    let second = Workload::generate(63, 200, 0.0);
    kafka.produce(&framed(8, &second)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pipeline.handled(), 305, "nothing is processed while the schema cannot be fetched");
    assert_eq!(Metrics::total(&pipeline.metrics.dlq_events_total), 5, "an outage dead-letters nothing");
    registry.down.store(false, Ordering::SeqCst);
    pipeline.wait_handled(505, Duration::from_secs(60)).await;
    assert_eq!(pipeline.written(), 500);
    assert_eq!(Metrics::total(&pipeline.metrics.dlq_events_total), 5);
    pipeline.stop().await;
}

use copilot_ingest::metrics::Metrics;

/// A certificate authority and a server certificate it signs for 127.0.0.1.
pub fn test_pki() -> (openssl::x509::X509, openssl::pkey::PKey<openssl::pkey::Private>, openssl::x509::X509) {
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::rsa::Rsa;
    use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
    use openssl::x509::{X509, X509NameBuilder};
    let name = |cn: &str| {
        let mut b = X509NameBuilder::new().unwrap();
        b.append_entry_by_text("CN", cn).unwrap();
        b.build()
    };
    let ca_key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut ca = X509::builder().unwrap();
    ca.set_version(2).unwrap();
    ca.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap()).unwrap();
    ca.set_subject_name(&name("copilot-ingest test CA")).unwrap();
    ca.set_issuer_name(&name("copilot-ingest test CA")).unwrap();
    ca.set_pubkey(&ca_key).unwrap();
    ca.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    ca.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
    ca.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
    ca.sign(&ca_key, MessageDigest::sha256()).unwrap();
    let ca = ca.build();
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut cert = X509::builder().unwrap();
    cert.set_version(2).unwrap();
    cert.set_serial_number(&BigNum::from_u32(2).unwrap().to_asn1_integer().unwrap()).unwrap();
    cert.set_subject_name(&name("127.0.0.1")).unwrap();
    cert.set_issuer_name(ca.subject_name()).unwrap();
    cert.set_pubkey(&key).unwrap();
    cert.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    cert.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
    let san = SubjectAlternativeName::new().ip("127.0.0.1").build(&cert.x509v3_context(Some(&ca), None)).unwrap();
    cert.append_extension(san).unwrap();
    cert.sign(&ca_key, MessageDigest::sha256()).unwrap();
    (ca, key, cert.build())
}

/// The registry over HTTPS: trusted through `SSL_CERT_FILE`, refused with a
/// clear error when the CA is not trusted.
#[test]
fn https_registry_is_verified_against_the_trust_store() {
    use openssl::ssl::{SslAcceptor, SslMethod};
    let (ca, key, cert) = test_pki();
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    acceptor.set_private_key(&key).unwrap();
    acceptor.set_certificate(&cert).unwrap();
    let acceptor = Arc::new(acceptor.build());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let schema = copilot_ingest::avro::BUNDLED[0].1.to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let Ok(mut tls) = acceptor.accept(stream) else { continue };
            use std::io::{Read, Write};
            let mut buf = [0u8; 2048];
            let _ = tls.read(&mut buf);
            let body = serde_json::json!({"schema": schema}).to_string();
            let _ =
                tls.write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
            let _ = tls.shutdown();
        }
    });
    let registry = copilot_ingest::avro::Registry::parse(&format!("https://127.0.0.1:{port}")).unwrap();

    // Not trusted yet: a clear handshake error, not a hang.
    let untrusted = registry.schema(1).unwrap_err();
    assert!(untrusted.contains("TLS handshake"), "{untrusted}");

    let dir = std::env::temp_dir().join(unique("ca"));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("ca.pem");
    std::fs::write(&ca_file, ca.to_pem().unwrap()).unwrap();
    // SAFETY: nextest runs each test in its own process; nothing else reads the environment concurrently here.
    unsafe { std::env::set_var("SSL_CERT_FILE", &ca_file) };
    // The trust store is read when the client is built (at start-up).
    let registry = copilot_ingest::avro::Registry::parse(&format!("https://127.0.0.1:{port}")).unwrap();
    let fetched = registry.schema(1).unwrap().expect("schema 1");
    assert!(fetched.contains("CopilotInteractionEvent"));
}
