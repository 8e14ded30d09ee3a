//! Interop with an independent Kafka implementation, tansu, and a third-party
//! client (Python confluent-kafka): produce, ingest, count, restart, count —
//! in plain text and over TLS (socat terminating TLS in front of tansu).
//!
//! tansu is installed by `.ci/run` (`cargo install tansu`); without it these
//! tests fail under `CI=true` and are skipped elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn tansu_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo/bin/tansu")));
    let found = candidates.into_iter().find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("CI").is_err(),
            "tansu is not installed (cargo install tansu --locked --features dynostore)"
        );
        eprintln!("SKIPPED: tansu is not installed (cargo install tansu --locked --features dynostore)");
    }
    found
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts a quiet helper process (broker, TLS proxy) and waits until it listens on `port`.
fn start_listening(command: &mut Command, port: u16, children: &mut Vec<Service>) {
    children.push(Service::spawn(command.stdout(Stdio::null()).stderr(Stdio::null())));
    wait_for_port(port);
}

/// tansu on `port`, advertising `advertised` (the TLS port when a proxy fronts it).
fn start_tansu(tansu: &Path, port: u16, advertised: u16, children: &mut Vec<Service>) {
    start_listening(
        Command::new(tansu).args([
            "broker",
            "--listener-url",
            &format!("tcp://127.0.0.1:{port}"),
            "--advertised-listener-url",
            &format!("tcp://127.0.0.1:{advertised}"),
            "--storage-engine",
            "memory://tansu/",
        ]),
        port,
        children,
    );
}

fn create_topic(tansu: &Path, port: u16, name: &str, partitions: i32) {
    let out = Command::new(tansu)
        .args(["topic", "create", name, "--partitions", &partitions.to_string(), "--broker"])
        .arg(format!("tcp://127.0.0.1:{port}"))
        .output()
        .expect("tansu topic create");
    assert!(out.status.success(), "creating {name}: {}", String::from_utf8_lossy(&out.stderr));
}

fn python(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/kafka_client.py");
    let out = Command::new("python3").arg(script).args(args).output().expect("python3");
    assert!(out.status.success(), "kafka_client.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes messages for `kafka_client.py produce`.
fn message_file(messages: &[(String, Vec<u8>)]) -> PathBuf {
    use std::io::Write;
    let path = std::env::temp_dir().join(unique("messages"));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for (key, value) in messages {
        let line = serde_json::json!({"key": key, "value": copilot_ingest::http_client::base64(value)});
        writeln!(f, "{line}").unwrap();
    }
    path
}

struct Topics {
    events: String,
    dlq: String,
    control: String,
    replies: String,
}

impl Topics {
    fn create(tansu: &Path, port: u16, partitions: i32) -> Topics {
        let t = Topics {
            events: unique("events"),
            dlq: unique("dlq"),
            control: unique("control"),
            replies: unique("replies"),
        };
        create_topic(tansu, port, &t.events, partitions);
        create_topic(tansu, port, &t.dlq, partitions);
        create_topic(tansu, port, &t.control, 1);
        create_topic(tansu, port, &t.replies, 1);
        t
    }

    fn service(&self, bootstrap: &str, sink_url: &str, tls_ca: Option<&Path>) -> Command {
        let mut c = binary();
        c.arg("run")
            .env("COPILOT_INGEST__KAFKA__BROKERS", bootstrap)
            .env("COPILOT_INGEST__KAFKA__TOPIC", &self.events)
            .env("COPILOT_INGEST__KAFKA__DLQ_TOPIC", &self.dlq)
            .env("COPILOT_INGEST__KAFKA__CONTROL_TOPIC", &self.control)
            .env("COPILOT_INGEST__KAFKA__CONTROL_REPLY_TOPIC", &self.replies)
            .env("COPILOT_INGEST__KAFKA__GROUP_ID", unique("group"))
            .env("COPILOT_INGEST__SINK__URL", sink_url)
            .env("COPILOT_INGEST__METRICS__LISTEN", "127.0.0.1:0")
            .env("COPILOT_INGEST__KAFKA__OPTIONS__SESSION_TIMEOUT_MS", "6000")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(ca) = tls_ca {
            c.env("COPILOT_INGEST__KAFKA__OPTIONS__SECURITY_PROTOCOL", "SSL")
                .env("COPILOT_INGEST__KAFKA__OPTIONS__SSL_CA_LOCATION", ca);
        }
        c
    }
}

/// The end-to-end run: two produce-ingest rounds with a restart between.
async fn produce_ingest_restart(bootstrap: &str, topics: &Topics, partitions: i32, tls_ca: Option<&Path>) {
    let Some(db) = PgDb::create().await else { return };
    let first = Workload::generate(501, 1500, 0.1);
    let second = Workload::generate(502, 1500, 0.1);
    let ca = tls_ca.map(|p| p.to_string_lossy().into_owned());
    let produce = |w: &Workload| {
        let file = message_file(&w.messages);
        let mut args = vec!["produce", bootstrap, &topics.events];
        let partitions = partitions.to_string();
        let file = file.to_string_lossy().into_owned();
        args.push(&partitions);
        args.push(&file);
        if let Some(ca) = &ca {
            args.push(ca);
        }
        python(&args);
    };

    produce(&first);
    let service = Service::spawn(&mut topics.service(bootstrap, &db.url, tls_ca));
    db.wait_rows(first.valid() as i64, Duration::from_secs(180)).await;
    service.terminate();
    assert_eq!(db.row_counts().await, (first.valid() as i64, first.valid() as i64));

    produce(&second);
    let service = Service::spawn(&mut topics.service(bootstrap, &db.url, tls_ca));
    let valid = (first.valid() + second.valid()) as i64;
    db.wait_rows(valid, Duration::from_secs(180)).await;
    // Let the last commits land, then stop; a third run must find nothing to do.
    tokio::time::sleep(Duration::from_secs(2)).await;
    service.terminate();
    assert_eq!(db.row_counts().await, (valid, valid), "every valid event exactly one row across the restart");

    let mut args = vec!["count", bootstrap, topics.dlq.as_str()];
    if let Some(ca) = &ca {
        args.push(ca);
    }
    let counted: serde_json::Value = serde_json::from_str(python(&args).trim()).unwrap();
    let invalid = first.invalid() + second.invalid();
    assert_eq!(counted["sources"], invalid, "every invalid event dead-lettered: {counted}");
    assert_eq!(counted["messages"], invalid, "and only once: {counted}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_with_a_third_party_producer_loses_and_duplicates_nothing_across_a_restart() {
    let Some(tansu) = tansu_binary() else { return };
    let port = free_port();
    let mut children = Vec::new();
    start_tansu(&tansu, port, port, &mut children);
    let topics = Topics::create(&tansu, port, 3);
    produce_ingest_restart(&format!("127.0.0.1:{port}"), &topics, 3, None).await;
}

/// TLS: a CA made here signs the proxy's certificate (SAN 127.0.0.1); clients
/// trust that CA. A client trusting another CA fails with a clear error and
/// exit 2 instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_over_tls_and_a_wrong_ca_is_a_clear_exit_2() {
    let Some(tansu) = tansu_binary() else { return };
    let dir = std::env::temp_dir().join(unique("tls"));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca, key, cert) = crate::avro::test_pki();
    let ca_file = dir.join("ca.pem");
    let cert_file = dir.join("server.pem");
    let key_file = dir.join("server.key");
    std::fs::write(&ca_file, ca.to_pem().unwrap()).unwrap();
    std::fs::write(&cert_file, cert.to_pem().unwrap()).unwrap();
    std::fs::write(&key_file, key.private_key_to_pem_pkcs8().unwrap()).unwrap();

    let (port, tls_port) = (free_port(), free_port());
    let mut children = Vec::new();
    start_tansu(&tansu, port, tls_port, &mut children);
    start_listening(
        Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{tls_port},cert={},key={},verify=0,fork,reuseaddr,bind=127.0.0.1",
                cert_file.display(),
                key_file.display()
            ))
            .arg(format!("TCP:127.0.0.1:{port}")),
        tls_port,
        &mut children,
    );
    let topics = Topics::create(&tansu, port, 2);
    let bootstrap = format!("127.0.0.1:{tls_port}");
    produce_ingest_restart(&bootstrap, &topics, 2, Some(&ca_file)).await;

    // Another CA: the handshake fails verification.
    let (other_ca, _, _) = crate::avro::test_pki();
    let other_file = dir.join("other-ca.pem");
    std::fs::write(&other_file, other_ca.to_pem().unwrap()).unwrap();
    let (_dir, url) = temp_sqlite();
    let child = Service::spawn(topics.service(&bootstrap, &url, Some(&other_file)).stderr(Stdio::piped()));
    let (code, stderr) = child.exit_within(Duration::from_secs(60));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
}
