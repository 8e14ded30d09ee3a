//! The binary: exit codes, `validate`, configuration errors, SIGTERM drain.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn bin() -> Command {
    binary()
}

#[test]
fn validate_prints_records_and_reasons_and_exits_1_on_rejection() {
    let input = concat!(
        r#"{"msdyn_name":"n","msdyn_scenariorequestid":"r","msdyn_interactiontype":"ThumbsUp","msdyn_scenariotype":"Copilot","msdyn_clienttimestamp":0}"#,
        "\n",
        r#"{"msdyn_name":"n","msdyn_scenariorequestid":"r","msdyn_interactiontype":"Nope","msdyn_scenariotype":"Copilot"}"#,
        "\n\n",
        "not json\n"
    );
    let out = validate_stdin(input.as_bytes());
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["status"], "ok");
    assert_eq!(lines[0]["record"]["msdyn_interactiontype"], 100230301);
    assert_eq!(lines[0]["record"]["msdyn_clienttimestamp"], "1970-01-01T00:00:00.000Z");
    assert_eq!(lines[1]["reason"], "invalid_option");
    assert_eq!(lines[1]["field"], "msdyn_interactiontype");
    assert_eq!(lines[2]["reason"], "malformed_json");
    assert_eq!(lines[2]["line"], 4);
}

/// `copilot-ingest validate -` on `input`.
fn validate_stdin(input: &[u8]) -> std::process::Output {
    let mut child = bin()
        .args(["validate", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn validate_exits_0_when_everything_is_valid() {
    // 1 is not an option value: rejected.
    let rejected = validate_stdin(
        br#"{"msdyn_name":"n","msdyn_scenariorequestid":"r","msdyn_interactiontype":1,"msdyn_scenariotype":100230201}"#,
    );
    assert_eq!(rejected.status.code(), Some(1));
    let valid = validate_stdin(br#"{"msdyn_name":"n","msdyn_scenariorequestid":"r","msdyn_interactiontype":100230301,"msdyn_scenariotype":100230201}"#);
    assert_eq!(valid.status.code(), Some(0));
}

#[test]
fn bad_configuration_lists_every_problem_and_exits_2() {
    let dir = std::env::temp_dir().join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[kafka]\nbogus = 1\n[batch]\nmax_records = 0\n[control]\nhmac_key = \"do-not-print-me\"\n")
        .unwrap();
    let out = bin()
        .args(["--config", file.to_str().unwrap(), "run"])
        .env("COPILOT_INGEST__SINK__URL", "mysql://nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["kafka.bogus", "batch.max_records", "sink.url"] {
        assert!(stderr.contains(key), "{key} missing from: {stderr}");
    }
    assert!(!stderr.contains("do-not-print-me"));
    let out = bin().args(["no-such-command"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// SIGTERM mid-stream: exit 0; every committed offset covers only records that
/// are written (or dead-lettered); a restart finishes the rest exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_commits_and_exits_0() {
    // Kept under the mock broker's per-partition retention (~5 MB).
    const EVENTS: i64 = 12_000;
    let kafka = TestKafka::new(4);
    let (dir, url) = temp_sqlite();
    let workload = Workload::generate(21, EVENTS as usize, 0.0);
    let positions = kafka.produce(&workload.messages).await;
    let spawn = || kafka.run_binary(&url).env("COPILOT_INGEST__BATCH__MAX_RECORDS", "200").spawn().unwrap();
    let db = std::path::PathBuf::from(url.trim_start_matches("sqlite://"));
    let rows = || -> i64 {
        rusqlite::Connection::open(&db)
            .and_then(|c| c.query_row("SELECT count(*) FROM msdyn_copilotinteraction", [], |r| r.get(0)))
            .unwrap_or(0)
    };
    let mut child = spawn();
    wait_for("some rows written", Duration::from_secs(60), || rows() > 0).await;
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let started = Instant::now();
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "did not exit after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, Some(0));

    // Everything below each committed offset is in the table.
    let committed = kafka.committed();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut stmt = conn
        .prepare("SELECT count(*) FROM msdyn_copilotinteraction WHERE ingest_partition = ?1 AND ingest_offset < ?2")
        .unwrap();
    let mut covered = 0;
    for (p, c) in &committed {
        let below = positions.iter().filter(|(pp, o)| pp == p && o < c).count() as i64;
        let written: i64 = stmt.query_row(rusqlite::params![p, c], |r| r.get(0)).unwrap();
        assert_eq!(written, below, "partition {p}: a committed offset passed an unwritten record");
        covered += below;
    }
    assert!(covered > 0 && covered <= rows(), "committed {covered}, rows {}", rows());

    // A restart finishes the stream: exactly one row per event.
    let mut child = spawn();
    wait_for("all rows", Duration::from_secs(90), || rows() == EVENTS).await;
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(rows(), EVENTS);
    let distinct: i64 = conn
        .query_row("SELECT count(DISTINCT msdyn_copilotinteractionid) FROM msdyn_copilotinteraction", [], |r| r.get(0))
        .unwrap();
    assert_eq!(distinct, EVENTS);
    assert_eq!(kafka.committed(), kafka.log_end());
    let _ = std::fs::remove_dir_all(dir);
}

/// `kill -9` in the middle of BulkRetain, of PurgeRetainedContent, then of a
/// BulkDelete over a second set of live rows: after a restart the redelivered
/// command completes the same operation, with exact totals and nothing
/// half-applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_retention_commands_complete_after_a_restart() {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    const EVENTS: i64 = 2000;
    let kafka = TestKafka::new(2);
    let (dir, url) = temp_sqlite();
    let db = std::path::PathBuf::from(url.trim_start_matches("sqlite://"));
    let spawn = || kafka.run_binary(&url).env("COPILOT_INGEST__BATCH__MAX_RECORDS", "200").spawn().unwrap();
    let query = |sql: &str| -> i64 {
        rusqlite::Connection::open(&db).and_then(|c| c.query_row(sql, [], |r| r.get(0))).unwrap_or(-1)
    };
    let mut child = spawn();
    kafka.produce(&Workload::generate(51, EVENTS as usize, 0.0).messages).await;
    wait_for("all rows", Duration::from_secs(90), || query("SELECT count(*) FROM msdyn_copilotinteraction") == EVENTS)
        .await;

    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &kafka.bootstrap).create().unwrap();
    let replies: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", unique("replies"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    replies.subscribe(&[&kafka.config.kafka.control_reply_topic]).unwrap();

    for (id, message, parameters, op_table_row, done_sql, seed) in [
        (
            "kill-bulk",
            "BulkRetain",
            serde_json::json!({"EntityName": "msdyn_copilotinteraction", "PageSize": 1,
                "FetchXml": "<fetch><entity name='msdyn_copilotinteraction'><filter><condition attribute='msdyn_name' operator='not-null'/></filter></entity></fetch>"}),
            "SELECT total FROM copilot_ingest_retention_operation WHERE command_id = 'kill-bulk'",
            "SELECT count(*) FROM msdyn_copilotinteraction WHERE msft_datastate = 1",
            None,
        ),
        (
            "kill-purge",
            "PurgeRetainedContent",
            serde_json::json!({"EntityName": "msdyn_copilotinteraction", "PageSize": 1}),
            "SELECT total FROM copilot_ingest_retention_operation WHERE command_id = 'kill-purge'",
            "SELECT count(*) FROM msdyn_copilotinteraction_tombstone WHERE deleted_by IS NULL",
            None,
        ),
        (
            "kill-delete",
            "BulkDelete",
            serde_json::json!({"EntityName": "msdyn_copilotinteraction", "PageSize": 1,
                "FetchXml": "<fetch><entity name='msdyn_copilotinteraction'><filter><condition attribute='msdyn_name' operator='not-null'/></filter></entity></fetch>"}),
            "SELECT total FROM copilot_ingest_retention_operation WHERE command_id = 'kill-delete'",
            "SELECT count(*) FROM msdyn_copilotinteraction_tombstone WHERE deleted_by = 'BulkDelete'",
            Some(52),
        ),
    ] {
        if let Some(seed) = seed {
            // Live rows to delete: the previous operations left none.
            kafka.produce(&Workload::generate(seed, EVENTS as usize, 0.0).messages).await;
            wait_for("the second set of rows", Duration::from_secs(90), || {
                query("SELECT count(*) FROM msdyn_copilotinteraction") == EVENTS
            })
            .await;
        }
        let body = serde_json::json!({"command_id": id, "message": message, "parameters": parameters}).to_string();
        producer
            .send(
                FutureRecord::to(&kafka.config.kafka.control_topic)
                    .key(id)
                    .payload(&body)
                    .headers(signed(body.as_bytes())),
                Duration::from_secs(10),
            )
            .await
            .unwrap();
        wait_for("the operation under way", Duration::from_secs(60), || query(op_table_row) > 10).await;
        Command::new("kill").args(["-KILL", &child.id().to_string()]).status().unwrap();
        child.wait().unwrap();
        let partial = query(op_table_row);
        assert!(partial < EVENTS, "{message} finished before the kill; the test proves nothing");
        // What the operation counted is exactly what was applied.
        assert_eq!(query(done_sql), partial, "{message}: counted and applied differ after the kill");

        child = spawn();
        let deadline = Instant::now() + Duration::from_secs(120);
        // Progress replies (InProgress) come first, counting up; then the final one.
        let mut progress = Vec::new();
        let reply = loop {
            assert!(Instant::now() < deadline, "no reply to {id} after the restart");
            if let Some(Ok(m)) = replies.poll(Duration::from_millis(200))
                && m.key() == Some(id.as_bytes())
            {
                let reply = serde_json::from_slice::<serde_json::Value>(m.payload().unwrap()).unwrap();
                if reply["status"] != "InProgress" {
                    break reply;
                }
                progress.push(reply["response"]["EntityCountCollection"]["msdyn_copilotinteraction"].as_i64().unwrap());
            }
        };
        assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{message}: progress counts go up: {progress:?}");
        assert!(progress.iter().all(|&c| c <= EVENTS), "{progress:?}");
        assert_eq!(reply["status"], "Succeeded", "{reply}");
        assert_eq!(reply["response"]["EntityCountCollection"]["msdyn_copilotinteraction"], EVENTS, "{reply}");
        assert_eq!(query(op_table_row), EVENTS);
        assert_eq!(query(done_sql), EVENTS);
    }
    assert_eq!(query("SELECT count(*) FROM msdyn_copilotinteraction"), 0);
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(dir);
}

/// Five `kill -9` at random points of a sustained stream, restarting each
/// time: every valid event is exactly one row, every invalid one reaches the
/// DLQ (at least once: a dead letter acknowledged just before a kill, whose
/// offset was not yet committed, is sent again), offsets end at the log end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_kill_9_loses_and_duplicates_no_row() {
    let Some(db) = PgDb::create().await else { return };
    let kafka = TestKafka::new(4);
    let batches: Vec<Workload> = (0..10).map(|i| Workload::generate(90 + i, 800, 0.05)).collect();
    let valid: i64 = batches.iter().map(|w| w.valid() as i64).sum();
    let invalid: usize = batches.iter().map(Workload::invalid).sum();
    let rows = || async {
        let client = db.client().await;
        client
            .query_one("SELECT count(*) FROM msdyn_copilotinteraction", &[])
            .await
            .map(|r| r.get::<_, i64>(0))
            .unwrap_or(0)
    };
    let mut rng = copilot_ingest::generator::Rng::new(std::process::id() as u64);
    let mut child = kafka.run_binary(&db.url).spawn().unwrap();
    let mut kills = 0;
    let mut rows_at_start = 0;
    for (i, w) in batches.iter().enumerate() {
        kafka.produce(&w.messages).await;
        if i % 2 == 1 && kills < 5 {
            // Kill it without warning while it is writing: once this process
            // has written something, after a random few milliseconds more.
            let deadline = Instant::now() + Duration::from_secs(60);
            while rows().await <= rows_at_start {
                assert!(Instant::now() < deadline, "no progress after restart {kills}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(rng.below(300))).await;
            Command::new("kill").args(["-KILL", &child.id().to_string()]).status().unwrap();
            child.wait().unwrap();
            kills += 1;
            rows_at_start = rows().await;
            child = kafka.run_binary(&db.url).spawn().unwrap();
        }
    }
    assert_eq!(kills, 5);
    let deadline = Instant::now() + Duration::from_secs(120);
    while rows().await < valid {
        assert!(Instant::now() < deadline, "rows stuck at {} of {valid}", rows().await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    wait_for("offsets at the log end", Duration::from_secs(60), || kafka.committed() == kafka.log_end()).await;
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));

    let client = db.client().await;
    let count: i64 = client.query_one("SELECT count(*) FROM msdyn_copilotinteraction", &[]).await.unwrap().get(0);
    let distinct: i64 = client
        .query_one("SELECT count(DISTINCT msdyn_copilotinteractionid) FROM msdyn_copilotinteraction", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((count, distinct), (valid, valid), "exactly one row per valid event");
    let dlq = kafka.read_dlq(invalid);
    assert_eq!(dead_letter_sources(&dlq), invalid, "every invalid event dead-lettered");
    eprintln!(
        "{kills} kills: {valid} rows, {invalid} invalid events, {} dead letters ({} re-sent after a kill)",
        dlq.len(),
        dlq.len() - invalid
    );
}

/// `copilot-ingest control` believes only a reply signed by the instance for
/// the command id it sent: a forger who sees the command on the control topic
/// and answers `Succeeded` first is ignored (timeout, exit 1); the genuine,
/// signed reply is printed (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_cli_ignores_forged_replies() {
    use rdkafka::Message as _;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let kafka = TestKafka::new(1);
    let commands: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &kafka.bootstrap)
        .set("group.id", unique("forger"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    commands.subscribe(&[&kafka.config.kafka.control_topic]).unwrap();
    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &kafka.bootstrap).create().unwrap();
    let target = uuid::Uuid::new_v4().to_string();

    for genuine in [false, true] {
        let child = bin()
            .args(["control", "--brokers", &kafka.bootstrap, "--timeout", "8", "retain", "--target", &target])
            .env("COPILOT_INGEST__CONTROL__HMAC_KEY", TEST_HMAC_KEY)
            .env("COPILOT_INGEST__KAFKA__CONTROL_TOPIC", &kafka.config.kafka.control_topic)
            .env("COPILOT_INGEST__KAFKA__CONTROL_REPLY_TOPIC", &kafka.config.kafka.control_reply_topic)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The command as the CLI sent it, read off the control topic.
        let deadline = Instant::now() + Duration::from_secs(30);
        let command_id = loop {
            assert!(Instant::now() < deadline, "the CLI sent no command");
            if let Some(Ok(m)) = commands.poll(Duration::from_millis(100)) {
                let command: serde_json::Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
                break command["command_id"].as_str().unwrap().to_owned();
            }
        };
        let reply = serde_json::json!({"command_id": command_id, "message": "Retain", "status": "Succeeded",
            "response": {"EntityCountCollection": {"msdyn_copilotinteraction": 1}}, "error": null})
        .to_string();
        let forged_key = "a-forger-has-some-other-key-0123456789";
        let mut records = vec![
            FutureRecord::to(&kafka.config.kafka.control_reply_topic).key(&command_id).payload(&reply),
            FutureRecord::to(&kafka.config.kafka.control_reply_topic)
                .key(&command_id)
                .payload(&reply)
                .headers(copilot_ingest::transport::control::signature_headers(forged_key, reply.as_bytes())),
        ];
        if genuine {
            records.push(
                FutureRecord::to(&kafka.config.kafka.control_reply_topic)
                    .key(&command_id)
                    .payload(&reply)
                    .headers(signed(reply.as_bytes())),
            );
        }
        for record in records {
            producer.send(record, Duration::from_secs(10)).await.unwrap();
        }
        let out = child.wait_with_output().unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if genuine {
            assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
            assert!(stdout.contains("Succeeded"), "{stdout}");
        } else {
            assert_eq!(out.status.code(), Some(1), "a forged reply was believed:\n{stdout}\n{stderr}");
            assert!(!stdout.contains("Succeeded"), "{stdout}");
            assert!(stderr.contains("ignored a reply"), "{stderr}");
        }
    }
}

/// Runs `command` for `seconds`, then SIGTERM (SIGKILL if it hangs); its output.
fn run_briefly(mut command: Command, seconds: u64) -> std::process::Output {
    let child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id().to_string();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline && !waiter.is_finished() {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !waiter.is_finished() {
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline && !waiter.is_finished() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    }
    waiter.join().unwrap()
}

/// Every exit path — an unreachable broker with SASL credentials, unreachable
/// databases with passwords in the userinfo (with an unencoded `/`) and in the
/// query, a refused librdkafka option, TOML type errors on secret keys, a
/// Dataverse sink whose token endpoint is down, and `demo` on PostgreSQL —
/// with recognisable fake secrets in every secret field, at debug log level:
/// none of them appears in anything printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_exit_path_prints_a_secret() {
    const HMAC: &str = "FAKE-HMAC-KEY-0123456789abcdefghijkl";
    let secrets = [
        "FAKE-HMAC-KEY",
        "FAKESASLPW",
        "FAKEPGPW1",
        "FAKEPGPW2",
        "FAKEPGPW3",
        "FAKEOPTVALUE",
        "FAKEOAUTHSECRET",
        "FAKEREGPW",
        "FAKEDVSECRET",
        "31415926535",
        "98765432123",
    ];
    let (dir, sqlite_url) = temp_sqlite();
    std::fs::create_dir_all(&dir).unwrap();
    let with_secrets = |args: &[&str], env: &[(&str, &str)]| {
        let mut c = bin();
        c.args(args)
            .current_dir(&dir)
            .env("RUST_LOG", "debug")
            .env("COPILOT_INGEST__CONTROL__HMAC_KEY", HMAC)
            .env("COPILOT_INGEST__AVRO__REGISTRY_URL", "http://registry-user:FAKEREGPW@127.0.0.1:1")
            .env("COPILOT_INGEST__METRICS__LISTEN", "127.0.0.1:0")
            .env("COPILOT_INGEST__SINK__URL", &sqlite_url);
        for (k, v) in env {
            c.env(k, v);
        }
        c
    };
    let pg = PgDb::create().await;
    let mut cases: Vec<(&str, Command, u64, Option<i32>)> = vec![
        (
            "unreachable broker with SASL",
            with_secrets(
                &["run"],
                &[
                    ("COPILOT_INGEST__KAFKA__BROKERS", "127.0.0.1:1"),
                    ("COPILOT_INGEST__KAFKA__OPTIONS__SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
                    ("COPILOT_INGEST__KAFKA__OPTIONS__SASL_MECHANISM", "PLAIN"),
                    ("COPILOT_INGEST__KAFKA__OPTIONS__SASL_USERNAME", "user"),
                    ("COPILOT_INGEST__KAFKA__OPTIONS__SASL_PASSWORD", "FAKESASLPW"),
                ],
            ),
            5,
            Some(0),
        ),
        (
            "unreachable database, password with a slash",
            with_secrets(&["run"], &[("COPILOT_INGEST__SINK__URL", "postgres://u:FAKEPGPW1/x@127.0.0.1:1/db")]),
            5,
            None,
        ),
        (
            "unreachable database, password in the query",
            with_secrets(&["run"], &[("COPILOT_INGEST__SINK__URL", "postgres://u@127.0.0.1:1/db?password=FAKEPGPW2")]),
            5,
            Some(0),
        ),
        (
            "refused librdkafka options",
            with_secrets(
                &["run"],
                &[
                    ("COPILOT_INGEST__KAFKA__OPTIONS__SESSION_TIMEOUT_MS", "FAKEOPTVALUE"),
                    ("COPILOT_INGEST__KAFKA__OPTIONS__SASL_OAUTHBEARER_CLIENT_SECRET", "FAKEOAUTHSECRET"),
                ],
            ),
            20,
            Some(2),
        ),
        (
            "Dataverse token endpoint down",
            with_secrets(
                &["run"],
                &[
                    ("COPILOT_INGEST__SINK__URL", "dataverse://contoso.crm.dynamics.com"),
                    ("COPILOT_INGEST__SINK__DATAVERSE__TENANT_ID", "tenant"),
                    ("COPILOT_INGEST__SINK__DATAVERSE__CLIENT_ID", "client"),
                    ("COPILOT_INGEST__SINK__DATAVERSE__CLIENT_SECRET", "FAKEDVSECRET"),
                    ("COPILOT_INGEST__SINK__DATAVERSE__AUTHORITY", "http://127.0.0.1:1"),
                    ("COPILOT_INGEST__SINK__DATAVERSE__API_URL", "http://127.0.0.1:1"),
                ],
            ),
            5,
            None,
        ),
    ];
    let bad_toml = dir.join("secrets.toml");
    std::fs::write(&bad_toml, "[control]\nhmac_key = 31415926535\n[sink.dataverse]\nclient_secret = 98765432123\n")
        .unwrap();
    cases.push((
        "TOML type errors on secret keys",
        with_secrets(&["--config", bad_toml.to_str().unwrap(), "run"], &[]),
        20,
        Some(2),
    ));
    let pg_url = pg.as_ref().map(|db| db.url.replacen("postgres://postgres@", "postgres://postgres:FAKEPGPW3@", 1));
    if let Some(url) = &pg_url {
        cases.push((
            "demo on PostgreSQL",
            with_secrets(&["demo", "--count", "300"], &[("COPILOT_INGEST__SINK__URL", url)]),
            120,
            Some(0),
        ));
    }
    for (name, command, seconds, expected_exit) in cases {
        let out = run_briefly(command, seconds);
        let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if let Some(code) = expected_exit {
            assert_eq!(out.status.code(), Some(code), "{name}:\n{printed}");
        }
        assert!(!printed.trim().is_empty(), "{name}: printed nothing, so the check proves nothing");
        for secret in secrets {
            assert!(!printed.contains(secret), "{name}: {secret} printed:\n{printed}");
        }
        if name == "refused librdkafka options" {
            assert!(printed.contains("kafka.options.session.timeout.ms"), "{name}: the key is named:\n{printed}");
        }
        if name == "demo on PostgreSQL" {
            assert!(printed.contains("PostgreSQL postgres://postgres:***@"), "{name}:\n{printed}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// The first command a new user runs: events flow within seconds, the
/// throughput counts from the first event, the output is for people (no
/// debug values, no carriage returns or colour codes when not on a terminal,
/// every progress line complete) and ends with next steps.
#[test]
fn the_demo_starts_fast_and_reads_well_off_a_terminal() {
    let dir = std::env::temp_dir().join(unique("demo"));
    std::fs::create_dir_all(&dir).unwrap();
    let out = bin()
        .args(["demo", "--count", "20000"])
        .current_dir(&dir)
        .env("COPILOT_INGEST__METRICS__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let first: f64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("first event"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no first-event line:\n{stdout}"));
    assert!(first < 10.0, "the first event took {first} s:\n{stdout}");
    let throughput = stdout.lines().find(|l| l.trim_start().starts_with("throughput")).expect("throughput line");
    eprintln!("demo (debug build): {}", throughput.trim());
    for needle in [
        "SQLite ./data/copilot-ingest.db",
        "rows in the sink    19,",
        "end-to-end latency  p50",
        "next steps",
        "sqlite3 ./data/copilot-ingest.db",
        "http://127.0.0.1:8080/api/data/v9.2/msdyn_copilotinteractions",
    ] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    for printed in [&stdout, &stderr] {
        assert!(!printed.contains("Sqlite(") && !printed.contains("Postgres("), "debug formatting:\n{printed}");
        assert!(!printed.contains('\r'), "carriage returns off a terminal");
        assert!(!printed.contains('\u{1b}'), "ANSI escape codes off a terminal");
    }
    assert!(stderr.ends_with('\n'), "the last line is complete");
    assert!(stderr.lines().any(|l| l.starts_with("received ")), "one plain progress line per interval:\n{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// `bench` at a small scale runs every phase it prints: the limits, the
/// drain, the Web API's reads, and the latency phase, whose events go to the
/// second broker's topic of `--live-partitions` and are all written.
#[test]
fn bench_runs_every_phase_and_writes_what_it_offers() {
    let out = bin()
        .args(["bench", "--events", "3000", "--partitions", "2", "--live-partitions", "3", "--sinks", "sqlite"])
        .args(["--api-seconds", "1", "--api-rate", "20", "--latency-seconds", "2", "--latency-rate", "500", "--quiet"])
        .env("COPILOT_INGEST__METRICS__LISTEN", "127.0.0.1:0")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for needle in [
        "3000 events of ~",
        "2 partitions (3 in the fixed-rate phases)",
        "| raw SQLite (prepared insert, one transaction) |",
        "| copilot-ingest → sqlite |",
        "| sqlite | 500 |",
        "| 1000 of 1000 |",
    ] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}\n{stderr}");
    }
    assert!(stdout.lines().any(|l| l.starts_with("| sqlite |") && l.contains("rows/s")), "no Web API row:\n{stdout}");
}

/// `produce` off a terminal: plain, complete progress lines; `--quiet`: none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_progress_is_plain_lines_off_a_terminal() {
    let kafka = TestKafka::new(2);
    let run = |quiet: bool| {
        let mut c = bin();
        c.args([
            "produce",
            "--brokers",
            &kafka.bootstrap,
            "--topic",
            &kafka.config.kafka.topic,
            "--count",
            "30000",
            "--rate",
            "15000",
        ]);
        if quiet {
            c.arg("--quiet");
        }
        c.output().unwrap()
    };
    let out = run(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains('\r') && !stderr.contains('\u{1b}'), "{stderr:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("produced ")).collect();
    assert!(lines.len() >= 2, "a line per second over two seconds:\n{stderr}");
    assert!(lines.iter().all(|l| l.ends_with("events/s")), "{lines:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("produced 30,000 events"));
    let quiet = run(true);
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains("produced "), "--quiet prints no progress");
}

/// `config example` parses back with `config check`; `config show` masks
/// secrets; completions and the manual page come from the CLI definition.
#[test]
fn config_subcommands_completions_and_the_manual_page() {
    let dir = std::env::temp_dir().join(unique("config"));
    std::fs::create_dir_all(&dir).unwrap();
    let example = bin().args(["config", "example"]).output().unwrap();
    assert_eq!(example.status.code(), Some(0));
    let file = dir.join("example.toml");
    std::fs::write(&file, &example.stdout).unwrap();
    let check = bin().args(["--config", file.to_str().unwrap(), "config", "check"]).output().unwrap();
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stderr));
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[batch]\nmax_records = 0\nbogus = 1\n").unwrap();
    let check = bin().args(["--config", bad.to_str().unwrap(), "config", "check"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2));
    assert!(stderr.contains("batch.max_records") && stderr.contains("batch.bogus"), "{stderr}");

    let show = bin()
        .args(["config", "show"])
        .env("COPILOT_INGEST__SINK__URL", "postgres://u:FAKEPW9@h/db")
        .env("COPILOT_INGEST__CONTROL__HMAC_KEY", "FAKE-HMAC-0123456789abcdefghijklmnopq")
        .env("COPILOT_INGEST__KAFKA__OPTIONS__SASL_PASSWORD", "FAKESASL9")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert_eq!(show.status.code(), Some(0));
    assert!(shown.contains("postgres://u:***@h/db"), "{shown}");
    for secret in ["FAKEPW9", "FAKE-HMAC", "FAKESASL9"] {
        assert!(!shown.contains(secret), "{secret}:\n{shown}");
    }

    let bash = bin().args(["completions", "bash"]).output().unwrap();
    assert!(String::from_utf8_lossy(&bash.stdout).contains("copilot-ingest"));
    let man = bin().arg("man").output().unwrap();
    let man = String::from_utf8_lossy(&man.stdout);
    assert!(man.contains(".TH") && man.contains("demo"), "{man}");
    let _ = std::fs::remove_dir_all(dir);
}
