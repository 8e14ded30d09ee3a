//! The Web API driven by the two real Dataverse client libraries, installed
//! unmodified: Microsoft's Python SDK (`PowerPlatform-Dataverse-Client`, over
//! https with a local CA, as it requires) and DynamicsWebApi (npm
//! `dynamics-web-api`), against the built binary on SQLite and PostgreSQL
//! while the Kafka pipeline keeps ingesting. The scripts in `tests/clients/`
//! assert each answer; this test then checks the table itself and replays
//! the topic to prove a deleted record stays deleted.
//!
//! `.ci/run` installs both clients; without them this test fails under
//! `CI=true` and is skipped elsewhere.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::control::{ControlClient, ControlService, query_i64, query_text, sink_urls};
use crate::common::*;
use crate::dataverse_emulator::{Behaviour, CLIENT_ID, CLIENT_SECRET, Emulator, TENANT};

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python interpreter with the SDK installed, and node with DynamicsWebApi.
fn clients() -> Option<(PathBuf, PathBuf)> {
    let python = std::env::var_os("COPILOT_INGEST_DATAVERSE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("copilot-ingest-dataverse-venv/bin/python"));
    let python_ok = Command::new(&python)
        .args(["-c", "import PowerPlatform.Dataverse"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let node_modules = repository().join("tests/clients/node_modules/dynamics-web-api");
    let node_ok = node_modules.is_dir()
        && Command::new("node").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if python_ok && node_ok {
        return Some((python, PathBuf::from("node")));
    }
    let why = format!(
        "the Dataverse clients are not installed (python {} with PowerPlatform-Dataverse-Client: {python_ok}; \
         node with tests/clients/node_modules/dynamics-web-api: {node_ok}); .ci/run installs them",
        python.display()
    );
    assert!(std::env::var("CI").is_err(), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}

/// A CA-less self-signed certificate for 127.0.0.1 (urllib3 2 needs the SAN).
fn certificate(dir: &Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let status = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl");
    assert!(status.success(), "openssl req failed");
    (cert, key)
}

fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

struct Tokens {
    read: String,
    write: String,
    retention: String,
}

fn config_file(dir: &Path, cert: &Path, key: &Path, tokens: &Tokens) -> PathBuf {
    let mut text = format!(
        "[api]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    for (token, role) in [(&tokens.read, "read"), (&tokens.write, "write"), (&tokens.retention, "retention")] {
        text.push_str(&format!(
            "[[api.tokens]]\nsha256 = \"{}\"\nrole = \"{role}\"\nname = \"{role}\"\n",
            sha256_hex(token)
        ));
    }
    let path = dir.join("copilot-ingest.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts the service and returns it with the Web API's `https://host:port`.
fn start(kafka: &TestKafka, url: &str, config: &Path) -> (Service, String) {
    let mut command = kafka.run_binary(url);
    command.arg("--config").arg(config).stdout(Stdio::piped());
    let mut child = command.spawn().expect("the service starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("Web API listening on ") {
                let _ = tx.send(rest.split("/api/").next().unwrap_or_default().to_owned());
            }
        }
    });
    let server = rx.recv_timeout(Duration::from_secs(60)).expect("the Web API listens");
    (Service::from_child(child), server)
}

fn run_client(mut command: Command, what: &str) -> serde_json::Value {
    let output = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{what} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{what}: the last line is not the summary ({e}): {last}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_and_dynamics_web_api_work_unmodified_on_both_sinks() {
    let Some((python, node)) = clients() else { return };
    let (urls, _db, dir) = sink_urls().await;
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = certificate(&dir);
    let tokens = Tokens {
        read: format!("read-{}", uuid::Uuid::new_v4()),
        write: format!("write-{}", uuid::Uuid::new_v4()),
        retention: format!("retention-{}", uuid::Uuid::new_v4()),
    };
    let config = config_file(&dir, &cert, &key, &tokens);
    for url in urls {
        const EVENTS: i64 = 2000;
        let kafka = TestKafka::new(2);
        let first_wave = Workload::generate(71, EVENTS as usize, 0.0);
        kafka.produce(&first_wave.messages).await;
        let (service, server) = start(&kafka, &url, &config);
        let rows = || {
            let url = url.clone();
            async move { query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction").await }
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while rows().await < EVENTS {
            assert!(std::time::Instant::now() < deadline, "the first wave was not ingested");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ingested = query_text(
            &url,
            "SELECT msdyn_copilotinteractionid FROM msdyn_copilotinteraction ORDER BY createdon LIMIT 1",
        )
        .await;
        // A second wave arrives while the clients page through the table.
        let second_wave = Workload::generate(72, EVENTS as usize, 0.0);
        let producing = {
            let messages = second_wave.messages.clone();
            let bootstrap = kafka.bootstrap.clone();
            let topic = kafka.config.kafka.topic.clone();
            tokio::spawn(async move { produce_slowly(&bootstrap, &topic, &messages).await })
        };

        let py_tag = format!("py{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut py = Command::new(&python);
        py.arg(repository().join("tests/clients/python_sdk.py"))
            .args([&server, &tokens.write, &tokens.read, &py_tag])
            .env("REQUESTS_CA_BUNDLE", &cert);
        let python_summary = run_client(py, "the Python SDK script");
        assert_eq!(python_summary["paged_ids"], python_summary["paged_distinct"], "a page repeated a row");
        assert!(python_summary["paged_ids"].as_i64().unwrap() >= EVENTS, "{python_summary}");

        let js_tag = format!("js{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let mut js = Command::new(&node);
        js.arg(repository().join("tests/clients/dynamics_web_api.js"))
            .args([&server, &tokens.write, &tokens.retention, &js_tag, &ingested])
            .env("NODE_EXTRA_CA_CERTS", &cert)
            .env_remove("http_proxy")
            .env_remove("https_proxy");
        let js_summary = run_client(js, "the DynamicsWebApi script");
        producing.await.unwrap();
        assert!(js_summary["policy"].is_string(), "the retentionconfigs steps ran: {js_summary}");
        assert_eq!(query_i64(&url, "SELECT count(*) FROM copilot_ingest_retention_policy").await, 0, "deleted");

        // What the clients did is in the table.
        let value = |sql: String| {
            let url = url.clone();
            async move { query_i64(&url, &sql).await }
        };
        let id_is = |id: &serde_json::Value| format!("msdyn_copilotinteractionid = '{}'", id.as_str().unwrap());
        let py_first = id_is(&python_summary["first"]);
        assert_eq!(
            query_text(&url, &format!("SELECT msdyn_name FROM msdyn_copilotinteraction WHERE {py_first}")).await,
            format!("{py_tag}-0-updated")
        );
        for deleted in [&python_summary["deleted"], &js_summary["deleted"]] {
            assert_eq!(
                value(format!("SELECT count(*) FROM msdyn_copilotinteraction WHERE {}", id_is(deleted))).await,
                0
            );
            assert_eq!(
                value(format!("SELECT count(*) FROM msdyn_copilotinteraction_tombstone WHERE {}", id_is(deleted)))
                    .await,
                1
            );
        }
        let retained = id_is(&js_summary["retained"]);
        assert_eq!(
            value(format!("SELECT CAST(msft_datastate AS BIGINT) FROM msdyn_copilotinteraction WHERE {retained}"))
                .await,
            1
        );

        // Replaying the first wave brings back nothing that was deleted.
        kafka.produce(&first_wave.messages).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while kafka.committed() != kafka.log_end() {
            assert!(std::time::Instant::now() < deadline, "the replay was not consumed");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ingested_is = format!("msdyn_copilotinteractionid = '{ingested}'");
        assert_eq!(value(format!("SELECT count(*) FROM msdyn_copilotinteraction WHERE {ingested_is}")).await, 0);
        assert_eq!(
            value(format!("SELECT count(*) FROM msdyn_copilotinteraction_tombstone WHERE {ingested_is}")).await,
            1
        );
        // Both waves, less the deleted one, plus what the clients created and kept.
        let from_kafka =
            value("SELECT count(*) FROM msdyn_copilotinteraction WHERE ingest_partition >= 0".to_owned()).await;
        assert_eq!(from_kafka, 2 * EVENTS - 1);
        service.terminate();
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Publishes over about ten seconds, so ingestion runs while the clients page.
async fn produce_slowly(bootstrap: &str, topic: &str, messages: &[(String, Vec<u8>)]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap).create().expect("producer");
    for chunk in messages.chunks(100) {
        for (key, value) in chunk {
            producer
                .send(FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(10))
                .await
                .expect("produced");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// copilot-ingest A's Dataverse sink writing into copilot-ingest B's Web API
/// (the emulator only issues A's token, which B knows by its digest): every
/// valid event one row in B, every invalid one dead-lettered by A, a full
/// replay by a fresh consumer group adds nothing and conflicts with nothing
/// (B answers a re-create of identical content as success, so A counts those
/// as written rather than as replays). Then A's control topic: Retrieve,
/// RetrieveMultiple paged to the end, Update (and a stale RowVersion),
/// UpdateMultiple, SetState, IsValidStateTransition and Delete are executed by
/// B as Dataverse, retention is refused. Both sides of the Dataverse
/// protocol, ours against ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dataverse_sink_writes_into_and_forwards_messages_to_another_instances_web_api() {
    const LONG: Duration = Duration::from_secs(120);
    let (dir, url) = temp_sqlite();
    std::fs::create_dir_all(&dir).unwrap();
    let token = format!("a-to-b-{}", uuid::Uuid::new_v4());
    let config = dir.join("b.toml");
    std::fs::write(
        &config,
        format!("[api]\nlisten = \"127.0.0.1:0\"\n[[api.tokens]]\nsha256 = \"{}\"\nrole = \"write\"\nname = \"instance A\"\n", sha256_hex(&token)),
    )
    .unwrap();
    let b_kafka = TestKafka::new(1);
    let (b, server) = start(&b_kafka, &url, &config);

    let emulator = Emulator::start(Behaviour { fixed_token: Some(token), ..Behaviour::default() });
    let kafka = TestKafka::new(2);
    let mut a = kafka.config_with_sink("dataverse://contoso.crm.dynamics.com");
    a.sink.dataverse.tenant_id = TENANT.into();
    a.sink.dataverse.client_id = CLIENT_ID.into();
    a.sink.dataverse.client_secret = copilot_ingest::config::Secret::new(CLIENT_SECRET);
    a.sink.dataverse.authority = emulator.url.clone();
    a.sink.dataverse.api_url = server;
    a.batch.max_records = 100;
    let workload = Workload::generate(91, 1500, 0.1);
    let pipeline = RunningPipeline::start(a.clone());
    kafka.produce(&workload.messages).await;
    pipeline.wait_handled(workload.messages.len() as u64, LONG).await;
    let metrics = std::sync::Arc::clone(&pipeline.metrics);
    pipeline.stop().await;
    let rows = query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction").await;
    assert_eq!(rows, workload.valid() as i64, "every valid event is exactly one row in B");
    assert_eq!(kafka.read_dlq(workload.invalid()).len(), workload.invalid());
    assert_eq!(kafka.committed(), kafka.log_end());
    assert_eq!(metrics.dlq_events_total.with_label_values(&["duplicate_id_conflict"]).get(), 0);
    assert_eq!(metrics.dlq_events_total.with_label_values(&["sink_rejected"]).get(), 0, "B refused what A accepted");

    let mut replay = a.clone();
    replay.kafka.group_id = unique("replay");
    let pipeline = RunningPipeline::start(replay);
    pipeline.wait_handled(workload.messages.len() as u64, LONG).await;
    let metrics = std::sync::Arc::clone(&pipeline.metrics);
    pipeline.stop().await;
    assert_eq!(query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction").await, workload.valid() as i64);
    let settled = metrics.records_skipped_total.with_label_values(&["replay"]).get()
        + copilot_ingest::metrics::Metrics::total(&metrics.records_written_total);
    assert_eq!(settled, workload.valid() as u64);
    assert_eq!(metrics.dlq_events_total.with_label_values(&["duplicate_id_conflict"]).get(), 0);

    // A's control topic: the table's messages are executed by "Dataverse" (B).
    let service = ControlService::start(a.clone()).await;
    let client = ControlClient::new(&kafka);
    let ids: Vec<String> = {
        let conn = rusqlite::Connection::open(url.trim_start_matches("sqlite://")).unwrap();
        let mut stmt = conn
            .prepare("SELECT msdyn_copilotinteractionid FROM msdyn_copilotinteraction ORDER BY createdon LIMIT 4")
            .unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().map(Result::unwrap).collect()
    };
    let b_text = |sql: String| {
        let url = url.clone();
        async move { query_text(&url, &sql).await }
    };
    let ok = |reply: &serde_json::Value| assert_eq!(reply["status"], "Succeeded", "{reply}");
    let reply = client
        .call("Retrieve", serde_json::json!({"Target": ids[0], "ColumnSet": ["msdyn_name", "msdyn_interactiontype"]}))
        .await;
    ok(&reply);
    let stored_name = b_text(format!(
        "SELECT msdyn_name FROM msdyn_copilotinteraction WHERE msdyn_copilotinteractionid = '{}'",
        ids[0]
    ))
    .await;
    assert_eq!(reply["response"]["Entity"]["msdyn_name"], stored_name.as_str(), "{reply}");
    assert!(
        reply["response"]["Entity"]["msdyn_interactiontype@OData.Community.Display.V1.FormattedValue"].is_string(),
        "{reply}"
    );
    let query = "<fetch count='500'><entity name='msdyn_copilotinteraction'><attribute name='msdyn_name'/><order attribute='createdon'/></entity></fetch>";
    let mut seen = std::collections::HashSet::new();
    let mut cookie: Option<String> = None;
    for page in 1.. {
        let fetch = match &cookie {
            None => query.to_owned(),
            Some(c) => query.replacen(
                "<fetch ",
                &format!(
                    "<fetch page='{page}' paging-cookie='{}' ",
                    c.replace('&', "&amp;")
                        .replace('<', "&lt;")
                        .replace('>', "&gt;")
                        .replace('\'', "&apos;")
                        .replace('"', "&quot;")
                ),
                1,
            ),
        };
        let reply = client.call("RetrieveMultiple", serde_json::json!({"Query": fetch})).await;
        ok(&reply);
        let collection = &reply["response"]["EntityCollection"];
        for e in collection["Entities"].as_array().unwrap() {
            assert!(seen.insert(e["msdyn_copilotinteractionid"].as_str().unwrap().to_owned()), "a row came twice");
        }
        if collection["MoreRecords"] != true {
            break;
        }
        cookie = collection["PagingCookie"].as_str().map(str::to_owned);
        assert!(cookie.is_some(), "more records without a cookie: {reply}");
    }
    assert_eq!(seen.len(), workload.valid(), "paging through Dataverse returns every row once");
    ok(&client
        .call(
            "Update",
            serde_json::json!({"Target": {"msdyn_copilotinteractionid": ids[0], "msdyn_name": "via-dataverse"}}),
        )
        .await);
    assert_eq!(
        b_text(format!(
            "SELECT msdyn_name FROM msdyn_copilotinteraction WHERE msdyn_copilotinteractionid = '{}'",
            ids[0]
        ))
        .await,
        "via-dataverse"
    );
    let stale = client
        .call(
            "Update",
            serde_json::json!({"Target": {"msdyn_copilotinteractionid": ids[0], "msdyn_name": "stale"},
            "ConcurrencyBehavior": "IfRowVersionMatches", "RowVersion": 1}),
        )
        .await;
    assert_eq!(stale["status"], "Failed", "{stale}");
    assert_eq!(stale["error"]["code"], "0x80060882", "{stale}");
    ok(&client
        .call(
            "UpdateMultiple",
            serde_json::json!({"Targets": [
        {"msdyn_copilotinteractionid": ids[1], "msdyn_name": "many-1"},
        {"msdyn_copilotinteractionid": ids[2], "msdyn_name": "many-2"}]}),
        )
        .await);
    assert_eq!(
        b_text(format!(
            "SELECT msdyn_name FROM msdyn_copilotinteraction WHERE msdyn_copilotinteractionid = '{}'",
            ids[2]
        ))
        .await,
        "many-2"
    );
    ok(&client.call("SetState", serde_json::json!({"EntityMoniker": ids[1], "State": 1, "Status": -1})).await);
    assert_eq!(
        query_i64(
            &url,
            &format!("SELECT statecode FROM msdyn_copilotinteraction WHERE msdyn_copilotinteractionid = '{}'", ids[1])
        )
        .await,
        1
    );
    let valid = client
        .call("IsValidStateTransition", serde_json::json!({"Entity": ids[1], "NewState": "Active", "NewStatus": 1}))
        .await;
    assert_eq!(valid["response"]["IsValid"], true, "{valid}");
    ok(&client.call("Delete", serde_json::json!({"Target": ids[3]})).await);
    assert_eq!(
        query_i64(
            &url,
            &format!("SELECT count(*) FROM msdyn_copilotinteraction WHERE msdyn_copilotinteractionid = '{}'", ids[3])
        )
        .await,
        0
    );
    let missing = client.call("Retrieve", serde_json::json!({"Target": ids[3]})).await;
    assert_eq!(missing["error"]["code"], "0x80040217", "{missing}");
    let retention = client.call("Retain", serde_json::json!({"Target": ids[0]})).await;
    assert_eq!(
        (&retention["status"], &retention["error"]["code"]),
        (&serde_json::json!("Rejected"), &serde_json::json!("NotSupported")),
        "{retention}"
    );
    service.stop().await;
    b.terminate();
    let _ = std::fs::remove_dir_all(dir);
}

/// `run` on the embedded defaults serves the Web API on loopback without
/// authentication, as it does the embedded broker: a record created over
/// HTTP is counted there.
#[test]
fn run_on_the_embedded_defaults_serves_the_web_api_on_loopback() {
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(unique("embedded-api"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_copilot-ingest"))
        .arg("run")
        .current_dir(&dir)
        .env_remove("COPILOT_INGEST__API__LISTEN")
        .env("COPILOT_INGEST__METRICS__LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines().map_while(Result::ok);
    let url = lines.find_map(|l| l.strip_prefix("Web API listening on ").map(str::to_owned)).expect("the API listens");
    std::thread::spawn(move || lines.for_each(drop));
    let service = Service::from_child(child);
    assert!(url.starts_with("http://127.0.0.1:8080/api/data/v9.2/"), "{url}");
    let exchange = |request: String| {
        let mut s = std::net::TcpStream::connect("127.0.0.1:8080").unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    let body = r#"{"msdyn_name":"local","msdyn_scenariorequestid":"r","msdyn_interactiontype":100230301,"msdyn_scenariotype":100230201}"#;
    let created = exchange(format!(
        "POST /api/data/v9.2/msdyn_copilotinteractions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    assert!(created.starts_with("HTTP/1.1 204"), "{created}");
    let counted = exchange(
        "GET /api/data/v9.2/msdyn_copilotinteractions/$count HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nConnection: close\r\n\r\n"
            .into(),
    );
    assert!(counted.starts_with("HTTP/1.1 200") && counted.ends_with("\r\n\r\n1"), "{counted}");
    service.terminate();
    let _ = std::fs::remove_dir_all(dir);
}

/// Hostile requests are answered within their bounds and never take the
/// service down: no or a wrong token, an oversized body, a request head over
/// 64 KiB (a 10,000-term `$filter` in the URL), the same filter and 10,000
/// nested parentheses inside a `$batch`, malformed multipart, and a client
/// that never finishes its request while others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_bounded_and_others_still_served() {
    use std::io::{Read, Write};
    let (dir, url) = temp_sqlite();
    std::fs::create_dir_all(&dir).unwrap();
    let token = format!("t-{}", uuid::Uuid::new_v4());
    let config = dir.join("api.toml");
    std::fs::write(
        &config,
        format!(
            "[api]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = 1048576\n[[api.tokens]]\nsha256 = \"{}\"\nrole = \"write\"\n",
            sha256_hex(&token)
        ),
    )
    .unwrap();
    let kafka = TestKafka::new(1);
    let (service, server) = start(&kafka, &url, &config);
    let authority = server.trim_start_matches("http://").to_owned();
    let send = |head: String, body: &[u8]| -> String {
        let mut s = std::net::TcpStream::connect(&authority).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = s.write_all(head.as_bytes());
        let _ = s.write_all(body);
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    };
    let request = |method: &str, target: &str, extra: &str, body: &[u8]| {
        format!(
            "{method} /api/data/v9.2/{target} HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer {token}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
    };
    let status = |answer: &str| answer.split_whitespace().nth(1).unwrap_or("none").to_owned();

    // A client that never finishes its request head holds one connection only.
    let mut slow = std::net::TcpStream::connect(&authority).unwrap();
    slow.write_all(b"GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: x\r\n").unwrap();

    let no_token =
        send(format!("GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"), b"");
    assert_eq!(status(&no_token), "401", "{no_token}");
    assert!(no_token.contains("0x80072560"), "{no_token}");
    let wrong = send(
        format!(
            "GET /api/data/v9.2/WhoAmI HTTP/1.1\r\nHost: {authority}\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n"
        ),
        b"",
    );
    assert_eq!(status(&wrong), "401");
    assert!(!wrong.contains(&token));

    let big = vec![b'x'; 2 * 1024 * 1024];
    let oversized =
        send(request("POST", "msdyn_copilotinteractions", "Content-Type: application/json\r\n", &big), &big);
    assert!(oversized.is_empty() || status(&oversized) == "413", "{}", &oversized[..oversized.len().min(300)]);

    let terms = vec!["msdyn_name eq 'x'"; 10_000].join(" or ");
    let long_url =
        send(request("GET", &format!("msdyn_copilotinteractions?$filter={}", terms.replace(' ', "%20")), "", b""), b"");
    assert!(long_url.is_empty() || status(&long_url) == "431", "{}", &long_url[..long_url.len().min(300)]);

    let batch = |inner: &str| {
        format!(
            "--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET {server}/api/data/v9.2/msdyn_copilotinteractions?$filter={inner} HTTP/1.1\r\n\r\n--b--\r\n"
        )
    };
    for (inner, why) in [
        (terms.replace(' ', "%20"), "longer than"),
        (format!("{}msdyn_name%20eq%20'x'{}", "(".repeat(10_000), ")".repeat(10_000)), "too long"),
    ] {
        let body = batch(&inner);
        let answer = send(
            request("POST", "$batch", "Content-Type: multipart/mixed; boundary=b\r\n", body.as_bytes()),
            body.as_bytes(),
        );
        assert_eq!(status(&answer), "200", "{}", &answer[..answer.len().min(300)]);
        assert!(answer.contains("HTTP/1.1 400") && answer.contains(why), "{why}: {}", &answer[..answer.len().min(600)]);
    }
    for (content_type, body) in [
        ("multipart/mixed; boundary=b", "no parts at all"),
        ("multipart/mixed", "--b\r\n\r\n--b--"),
        (
            "multipart/mixed; boundary=b",
            "--b\r\nContent-Type: application/http\r\n\r\nNOT AN HTTP REQUEST\r\n--b--\r\n",
        ),
    ] {
        let answer = send(
            request("POST", "$batch", &format!("Content-Type: {content_type}\r\n"), body.as_bytes()),
            body.as_bytes(),
        );
        assert_eq!(status(&answer), "400", "{content_type} {body:?}: {answer}");
    }

    // Others are served all along, and the service is still up.
    let who = send(request("GET", "WhoAmI", "", b""), b"");
    assert_eq!(status(&who), "200", "{who}");
    assert_eq!(query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction").await, 0, "nothing was written");
    drop(slow);
    service.terminate();
    let _ = std::fs::remove_dir_all(dir);
}

/// With autovacuum off (as on this machine's server) nothing but the service
/// analyzes the table: once the writer has inserted enough rows it runs
/// `ANALYZE` itself, and a keyset page walks the primary key instead of
/// scanning and sorting the whole table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyset_pages_on_postgres_walk_the_primary_key_once_the_writer_has_analyzed_the_table() {
    let Some(db) = PgDb::create().await else { return };
    let client = db.client().await;
    // Only a manual `ANALYZE` counts here (autovacuum's own are `autoanalyze_count`).
    let analyses = "SELECT analyze_count FROM pg_stat_user_tables WHERE relname = 'msdyn_copilotinteraction'";
    let estimate = "SELECT reltuples::bigint FROM pg_class WHERE relname = 'msdyn_copilotinteraction'";
    let backend = open_backend_at(&db.url).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let wait_for_analyses = |count: i64, what: &'static str| {
        let client = &client;
        async move {
            while client.query_one(analyses, &[]).await.unwrap().get::<_, i64>(0) < count {
                assert!(std::time::Instant::now() < deadline, "{what}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(client.query_one(estimate, &[]).await.unwrap().get::<_, i64>(0) < 1_000);
    seed(&backend, 0, 0, 12_000).await;
    // The writer analyzes once 10,000 rows are in (the threshold of a table never analyzed).
    wait_for_analyses(1, "12,000 inserted rows never led to an ANALYZE").await;
    assert!(client.query_one(estimate, &[]).await.unwrap().get::<_, i64>(0) >= 10_000);
    let page = "EXPLAIN SELECT msdyn_copilotinteractionid, msdyn_name FROM msdyn_copilotinteraction \
                WHERE msft_datastate = 0 AND msdyn_copilotinteractionid > '7f000000-0000-0000-0000-000000000000'::uuid \
                ORDER BY msdyn_copilotinteractionid LIMIT 500";
    let plan: Vec<String> = client.query(page, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    assert!(plan.iter().any(|l| l.contains("Index Scan using msdyn_copilotinteraction_pkey")), "{plan:#?}");
}

/// On PostgreSQL, the Web API's reads have connections of their own: with
/// every writer connection stuck in a batch (the table locked against
/// inserts by another session), a count is still answered, and the batch is
/// written once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_are_answered_while_every_writer_connection_waits() {
    let Some(db) = PgDb::create().await else { return };
    // One writer connection (`open_backend_at` gives two: both are held below).
    let backend = open_backend_at(&db.url).await;
    seed(&backend, 0, 0, 3).await;
    let mut locker = db.client().await;
    let lock = locker.transaction().await.unwrap();
    // SHARE mode refuses inserts and lets reads through.
    lock.batch_execute("LOCK TABLE msdyn_copilotinteraction IN SHARE MODE").await.unwrap();
    let writers: Vec<_> = (0..2)
        .map(|k| {
            let backend = std::sync::Arc::clone(&backend);
            tokio::spawn(async move { seed(&backend, 100 + k * 10, 0, 1).await })
        })
        .collect();
    let waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'msdyn_copilotinteraction'::regclass";
    let client = db.client().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while client.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) < 2 {
        assert!(std::time::Instant::now() < deadline, "the writers never reached the lock");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let criteria = copilot_ingest::query::fetchxml::Criteria { filter: None, retained: false };
    // A read that waited for a writer's connection, or for the lock (a new
    // connection preparing the insert), would hang here: the timeout turns
    // that into a failure.
    let count = tokio::time::timeout(Duration::from_secs(30), backend.count(&criteria))
        .await
        .expect("a read waited for the writer connections")
        .unwrap();
    assert_eq!(count, 3);
    assert!(writers.iter().all(|w| !w.is_finished()), "the writers are still held");
    lock.rollback().await.unwrap();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(db.row_counts().await, (5, 5));
}
