//! Configuration checks: every problem reported with its key, secrets never echoed.
use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn defaults_match_the_contract() {
    let c = Config::from_sources(None, &[]).unwrap();
    assert_eq!(c.kafka.brokers, "embedded");
    assert_eq!(c.kafka.topic, "copilot.interactions");
    assert_eq!(c.batch.max_records, 1000);
    assert_eq!(c.batch.max_bytes, 4_194_304);
    assert_eq!(c.batch.linger_ms, 200);
    assert_eq!(c.sink_url().unwrap(), SinkUrl::Sqlite(PathBuf::from("./data/copilot-ingest.db")));
    assert_eq!(c.metrics.listen, "0.0.0.0:9464");
    assert_eq!(c.validation.unknown_fields, UnknownFields::Reject);
}

#[test]
fn every_problem_is_reported_at_once_with_its_key() {
    let text = r#"
        [kafka]
        brokers = "localhost:9092"
        bogus = 1
        format = "xml"
        [batch]
        max_records = "many"
        linger_ms = -5
        [sink]
        url = "mysql://x"
        [nonsense]
        a = 1
    "#;
    let errs = Config::from_sources(Some(text), &[]).unwrap_err().0;
    let joined = errs.join("\n");
    for needle in ["kafka.bogus", "kafka.format", "batch.max_records", "batch.linger_ms", "sink.url", "nonsense"] {
        assert!(joined.contains(needle), "missing {needle} in:\n{joined}");
    }
}

#[test]
fn environment_overrides_the_file() {
    let text = "[kafka]\nbrokers = \"a:1\"\n[batch]\nmax_records = 10\n";
    let c = Config::from_sources(
        Some(text),
        &env(&[
            ("COPILOT_INGEST__KAFKA__BROKERS", "b:2,c:3"),
            ("COPILOT_INGEST__KAFKA__GROUP_ID", "123"),
            ("COPILOT_INGEST__BATCH__MAX_RECORDS", "500"),
            ("COPILOT_INGEST__KAFKA__OPTIONS__SECURITY_PROTOCOL", "SASL_SSL"),
            ("COPILOT_INGEST__CONTROL__HMAC_KEY", "s3cret-s3cret-s3cret-s3cret-0123"),
        ]),
    )
    .unwrap();
    assert_eq!(c.kafka.brokers, "b:2,c:3");
    assert_eq!(c.kafka.group_id, "123");
    assert_eq!(c.batch.max_records, 500);
    assert_eq!(c.kafka.options.get("security.protocol").map(Secret::expose), Some("SASL_SSL"));
    assert_eq!(c.control.hmac_key.expose(), "s3cret-s3cret-s3cret-s3cret-0123");
}

#[test]
fn a_set_metrics_address_is_told_apart_from_the_default() {
    assert!(!Config::from_sources(None, &[]).unwrap().metrics.listen_set);
    let file = Config::from_sources(Some("[metrics]\nlisten = \"0.0.0.0:9464\"\n"), &[]).unwrap();
    assert!(file.metrics.listen_set, "set to the default's value, but set");
    let env = Config::from_sources(None, &env(&[("COPILOT_INGEST__METRICS__LISTEN", "0.0.0.0:9464")])).unwrap();
    assert!(env.metrics.listen_set);
}

#[test]
fn short_hmac_keys_are_refused_and_unsigned_commands_are_off_by_default() {
    assert!(!Config::default().control.allow_unsigned);
    let errs = Config::from_sources(Some("[control]\nhmac_key = \"short-key\"\n"), &[]).unwrap_err().0.join("\n");
    assert!(errs.contains("control.hmac_key: must be at least 32 bytes (it is 9)"), "{errs}");
    assert!(!errs.contains("short-key"), "the key itself is never printed: {errs}");
    let only_previous = format!("[control]\nhmac_key_previous = \"{}\"\n", "k".repeat(32));
    let errs = Config::from_sources(Some(&only_previous), &[]).unwrap_err().0.join("\n");
    assert!(errs.contains("control.hmac_key_previous: set only beside"), "{errs}");
    let good = format!("[control]\nhmac_key = \"{}\"\nhmac_key_previous = \"{}\"\n", "a".repeat(32), "b".repeat(40));
    assert!(Config::from_sources(Some(&good), &[]).is_ok());
}

#[test]
fn unknown_environment_keys_are_errors() {
    let errs = Config::from_sources(None, &env(&[("COPILOT_INGEST__BATCH__MAX_RECORD", "5")])).unwrap_err();
    assert!(errs.0.iter().any(|e| e.contains("batch.max_record")), "{errs}");
}

#[test]
fn secrets_never_print() {
    let c = Config::from_sources(
        Some("[control]\nhmac_key = \"topsecret-topsecret-topsecret-0123\"\n[sink]\nurl = \"postgres://u:pw123@h/db\"\n[kafka.options]\n\"sasl.password\" = \"hunter2\"\n"),
        &[],
    )
    .unwrap();
    let printed = format!("{c:?}");
    for secret in ["topsecret", "pw123", "hunter2"] {
        assert!(!printed.contains(secret), "{secret} leaked: {printed}");
    }
    assert_eq!(redact_url("postgres://u:pw123@h:5432/db"), "postgres://u:***@h:5432/db");
}

#[test]
fn urls_are_redacted_whatever_their_shape() {
    let cases = [
        ("postgres://u:pw123@h:5432/db", "postgres://u:***@h:5432/db"),
        ("postgres://u:p/w?1#23@h/db", "postgres://u:***@h/db"),
        ("postgres://u@h/db?password=pw123&sslmode=require", "postgres://u@h/db?password=***&sslmode=require"),
        (
            "postgres://h/db?sslmode=verify-full&sslpassword=pw123",
            "postgres://h/db?sslmode=verify-full&sslpassword=***",
        ),
        ("postgres://h/db", "postgres://h/db"),
        ("https://user:pw123@registry:8081", "https://user:***@registry:8081"),
        ("no scheme pw123", "no scheme pw123"),
    ];
    for (url, redacted) in cases {
        assert_eq!(redact_url(url), redacted, "{url}");
    }
    let sink = SinkUrl::Postgres("postgres://u:pw123@h/db".into());
    assert_eq!(sink.to_string(), "PostgreSQL postgres://u:***@h/db");
    assert_eq!(SinkUrl::Sqlite("./data/x.db".into()).to_string(), "SQLite ./data/x.db");
}

#[test]
fn type_errors_on_secret_keys_do_not_echo_the_value() {
    let text = "[control]\nhmac_key = 55555555\n[sink]\nurl = 77777777\n[sink.dataverse]\nclient_secret = 66666666\n[kafka.options]\n\"sasl.password\" = 44444444\n";
    let errs = Config::from_sources(Some(text), &[]).unwrap_err().0.join("\n");
    for (key, value) in [
        ("control.hmac_key", "55555555"),
        ("sink.url", "77777777"),
        ("sink.dataverse", "66666666"),
        ("kafka.options", "44444444"),
    ] {
        assert!(errs.contains(key), "{key} not named: {errs}");
        assert!(!errs.contains(value), "{value} leaked: {errs}");
    }
    assert!(errs.contains("invalid type: integer, expected a string"), "{errs}");
}

#[test]
fn refused_librdkafka_options_name_the_key_not_the_value() {
    let text =
        "[kafka.options]\n\"session.timeout.ms\" = \"FAKE-SECRET-1\"\n\"no.such.property\" = \"FAKE-SECRET-2\"\n";
    let errs = Config::from_sources(Some(text), &[]).unwrap_err().0.join("\n");
    assert!(errs.contains("kafka.options.session.timeout.ms: refused by librdkafka"), "{errs}");
    assert!(errs.contains("kafka.options.no.such.property: refused by librdkafka"), "{errs}");
    assert!(!errs.contains("FAKE-SECRET"), "{errs}");
}
