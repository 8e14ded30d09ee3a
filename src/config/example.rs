//! `copilot-ingest config example` and `config show`: the configuration as
//! commented TOML, generated from the parser's own defaults, and the
//! effective configuration with every secret masked.

use super::{Config, redact_url};

/// What every key means, for `config example`. A unit test checks that this
/// names exactly the keys the parser knows, so the example cannot drift.
const KEY_DOCS: &[(&str, &str)] = &[
    ("api.auth", "token | jwt | none (none only on a loopback address)"),
    ("api.cert_file", "PEM certificate chain; with key_file the API serves https (Microsoft's Python SDK needs it)"),
    ("api.jwt.audience", "auth = \"jwt\": the aud claim (this API's application id URI or client id)"),
    ("api.jwt.issuer", "auth = \"jwt\": the iss claim, e.g. https://login.microsoftonline.com/<tenant>/v2.0"),
    (
        "api.jwt.jwks_url",
        "auth = \"jwt\": the issuer's keys, e.g. https://login.microsoftonline.com/<tenant>/discovery/v2.0/keys",
    ),
    ("api.jwt.leeway_seconds", "clock skew allowed on exp and nbf"),
    ("api.key_file", "PEM private key of cert_file"),
    ("api.listen", "the Dataverse-compatible Web API, e.g. 127.0.0.1:8443; empty = off"),
    ("api.max_body_bytes", "largest request body"),
    ("api.max_connections", "connections served at once; more wait in the backlog"),
    ("api.max_requests_in_flight", "requests executed at once; more are answered 429 with Retry-After"),
    ("api.request_timeout_ms", "longest one request may take"),
    (
        "api.tokens",
        "[[api.tokens]] sha256 = \"<hex SHA-256 of the token>\", role = \"read\" | \"write\" | \"retention\", name = \"…\"",
    ),
    (
        "avro.registry_url",
        "Confluent-compatible Schema Registry, http(s)://[user:password@]host:8081; empty = local schemas only",
    ),
    (
        "avro.schemas",
        "schema id = .avsc file, e.g. 1 = \"schemas/copilot_interaction_event.avsc\" (none: the bundled ids 1 and 2)",
    ),
    ("batch.linger_ms", "a batch is written at most this long after its first record"),
    ("batch.max_bytes", "bytes of records per batch"),
    ("batch.max_in_flight", "batches written at once; 0 = the sink's default (PostgreSQL 4, SQLite 32)"),
    ("batch.max_records", "records per batch (one atomic CreateMultiple write)"),
    ("control.allow_unsigned", "without a key, unsigned commands are refused unless this is true"),
    ("control.hmac_key", "at least 32 bytes (openssl rand -hex 32): verifies commands, signs replies"),
    ("control.hmac_key_previous", "during a key rotation, commands signed with this key still verify"),
    ("kafka.brokers", "\"embedded\" (in-process broker on loopback) or host:port,host:port"),
    ("kafka.control_reply_topic", "replies to control commands"),
    ("kafka.control_topic", "retention and purge commands"),
    ("kafka.dlq_topic", "dead letters: the original message plus x-ingest-* headers"),
    ("kafka.embedded_partitions", "partitions of the topics the embedded broker creates"),
    ("kafka.format", "json | avro | auto (magic byte 0 = Avro)"),
    ("kafka.group_id", "consumer group; the control consumer uses <group_id>.control"),
    ("kafka.options", "librdkafka properties passed through, e.g. \"security.protocol\" = \"SASL_SSL\""),
    ("kafka.topic", "events to ingest"),
    ("metrics.listen", "/metrics, /healthz, /readyz (run and demo on the embedded broker use 127.0.0.1)"),
    (
        "retention.lease_seconds",
        "a run's claim without renewal (one per page); a killed instance's run resumes elsewhere after this",
    ),
    (
        "retention.policies",
        "[[retention.policies]] uniquename, criteria (FetchXML), starttime (RFC 3339), recurrence = \"FREQ=DAILY;INTERVAL=1\", \
         status = \"Scheduled\" | \"Unscheduled\" | \"Cancelled\", purge_after = \"30d\", page_size",
    ),
    ("shutdown.drain_timeout_ms", "how long SIGTERM may take to flush and commit"),
    ("sink.dataverse.api_url", "overrides https://<org host> (e.g. a local emulator)"),
    ("sink.dataverse.api_version", "Web API version"),
    ("sink.dataverse.authority", "token issuer: {authority}/{tenant_id}/oauth2/v2.0/token"),
    ("sink.dataverse.bypass_custom_plugins", "send MSCRM.BypassCustomPluginExecution (needs prvBypassCustomPlugins)"),
    ("sink.dataverse.client_id", "Entra ID application (client) id"),
    ("sink.dataverse.client_secret", "its client secret (never printed)"),
    ("sink.dataverse.interactiondata_navigation_property", "navigation property of msdyn_interactiondataid"),
    ("sink.dataverse.max_in_flight", "concurrent CreateMultiple requests (the service allows 52)"),
    ("sink.dataverse.request_timeout_ms", "per request"),
    ("sink.dataverse.scope", "overrides https://<org host>/.default"),
    ("sink.dataverse.tenant_id", "Entra ID tenant"),
    ("sink.prune_after_hours", "dead-letter ledger and stored control replies older than this are deleted"),
    (
        "sink.url",
        "sqlite://PATH | postgres://user:password@host:5432/db[?sslmode=verify-full&sslrootcert=ca.pem] | dataverse://org.crm.dynamics.com",
    ),
    ("validation.unknown_fields", "reject | ignore"),
];

/// A commented TOML file with every key at its default, generated from the
/// parser's own defaults (`copilot-ingest config example`).
pub fn example() -> String {
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    let doc = |key: &str| KEY_DOCS.iter().find(|(k, _)| *k == key).map(|(_, d)| *d).unwrap_or("");
    let mut out = String::from(
        "# copilot-ingest configuration: every key with its default. Each can be\n\
         # overridden by COPILOT_INGEST__<SECTION>__<KEY> in the environment.\n",
    );
    fn write_table(out: &mut String, path: &str, table: &toml::Table, doc: &dyn Fn(&str) -> &'static str) {
        out.push_str(&format!("\n[{path}]\n"));
        let mut sub_tables = Vec::new();
        for (key, value) in table {
            let full = format!("{path}.{key}");
            match value {
                toml::Value::Table(t) if !t.is_empty() || !doc(&full).is_empty() => sub_tables.push((full, t)),
                _ => out.push_str(&format!("{key} = {value}  # {}\n", doc(&full))),
            }
        }
        for (full, t) in sub_tables {
            if t.is_empty() {
                out.push_str(&format!("\n# [{full}]  {}\n", doc(&full)));
            } else {
                write_table(out, &full, t, doc);
            }
        }
    }
    for (section, value) in &defaults {
        if let toml::Value::Table(t) = value {
            write_table(&mut out, section, t, &doc);
        }
    }
    out
}

/// The effective configuration as TOML, every secret masked (`config show`).
pub fn show(config: &Config) -> String {
    let mut table = toml::Table::try_from(config).unwrap_or_default();
    let mask = |v: &mut toml::Value| {
        if v.as_str().is_some_and(|s| !s.is_empty()) {
            *v = toml::Value::String("***".into());
        }
    };
    let redact = |v: &mut toml::Value| {
        if let Some(s) = v.as_str() {
            *v = toml::Value::String(redact_url(s));
        }
    };
    let mut at = |path: &[&str], f: &dyn Fn(&mut toml::Value)| {
        let mut value = table.get_mut(path[0]);
        for key in &path[1..] {
            value = value.and_then(|v| v.get_mut(*key));
        }
        if let Some(v) = value {
            f(v);
        }
    };
    at(&["control", "hmac_key"], &mask);
    at(&["control", "hmac_key_previous"], &mask);
    at(&["sink", "dataverse", "client_secret"], &mask);
    at(&["sink", "url"], &redact);
    at(&["avro", "registry_url"], &redact);
    at(&["kafka", "options"], &|options: &mut toml::Value| {
        if let Some(t) = options.as_table_mut() {
            t.iter_mut().for_each(|(_, v)| mask(v));
        }
    });
    toml::to_string(&table).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every key the parser knows is documented, and nothing else is.
    fn leaf_keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in table {
            let full = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(t) if !t.is_empty() => leaf_keys(&full, t, out),
                _ => out.push(full),
            }
        }
    }

    #[test]
    fn the_example_documents_every_key_and_parses_back_to_the_defaults() {
        let mut keys = Vec::new();
        leaf_keys("", &toml::Table::try_from(Config::default()).unwrap(), &mut keys);
        let mut documented: Vec<String> = KEY_DOCS.iter().map(|(k, _)| k.to_string()).collect();
        keys.sort();
        documented.sort();
        assert_eq!(keys, documented);
        let text = example();
        let parsed = Config::from_sources(Some(&text), &[]).unwrap();
        assert_eq!(toml::Table::try_from(parsed).unwrap(), toml::Table::try_from(Config::default()).unwrap());
        for (key, _) in KEY_DOCS {
            let leaf = key.rsplit('.').next().unwrap();
            assert!(text.contains(leaf), "{key} missing from the example");
        }
    }

    #[test]
    fn show_masks_every_secret() {
        let text = "[control]\nhmac_key = \"k-k-k-k-k-k-k-k-k-k-k-k-k-k-k-k-SECRET1\"\n[sink]\nurl = \"postgres://u:SECRET2@h/db?password=SECRET3\"\n[sink.dataverse]\nclient_secret = \"SECRET4\"\n[kafka.options]\n\"sasl.password\" = \"SECRET5\"\n[avro]\nregistry_url = \"https://u:SECRET6@r:8081\"\n";
        let shown = show(&Config::from_sources(Some(text), &[]).unwrap());
        for n in 1..=6 {
            assert!(!shown.contains(&format!("SECRET{n}")), "SECRET{n} shown:\n{shown}");
        }
        assert!(shown.contains("postgres://u:***@h/db?password=***"), "{shown}");
        assert!(shown.contains("\"sasl.password\" = \"***\""), "{shown}");
    }
}
