//! Where configuration values come from: TOML sections read key by key
//! (every unknown key and badly typed value reported, secrets never echoed),
//! and `COPILOT_INGEST__SECTION__KEY` environment overrides.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use super::{ENV_PREFIX, Secret};

/// Keys whose values may be credentials: a type error on them must not echo the value.
pub(super) fn holds_secrets(section: &str, key: &str) -> bool {
    matches!(
        (section, key),
        ("kafka", "options")
            | ("sink", "url")
            | ("sink", "dataverse")
            | ("control", "hmac_key")
            | ("control", "hmac_key_previous")
            | ("avro", "registry_url")
    )
}

/// A deserializer's message without the values it quotes (toml and serde
/// quote them in backticks or double quotes): `invalid type: integer
/// `55555555`, expected a string` becomes `invalid type: integer, expected a string`.
pub(super) fn without_quoted_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quote: Option<char> = None;
    for c in message.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '`' || c == '"' => quote = Some(c),
            None => out.push(c),
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ").replace(" ,", ",")
}

/// Checks `kafka.options` the way librdkafka will apply them, without
/// connecting: an unknown property or a refused value is a configuration
/// error naming the key. librdkafka's own text may quote the value, which is
/// masked here.
pub(super) fn check_kafka_options(options: &BTreeMap<String, Secret>, errors: &mut Vec<String>) {
    for (key, value) in options {
        let mut single = rdkafka::ClientConfig::new();
        single.set(key, value.expose());
        if let Err(e) = single.create_native_config() {
            let description = crate::kafka_log::refused_property(&e).map_or_else(|| e.to_string(), |(_, d)| d);
            errors.push(format!("kafka.options.{key}: refused by librdkafka: {}", without_quoted_values(&description)));
        }
    }
}

/// Deserializes one section, reporting every unknown key and every badly
/// typed value (each key is tried alone, so one bad key does not hide others).
pub(super) fn load_section<T: DeserializeOwned + Default>(
    section: &str,
    table: toml::Table,
    defaults: &toml::Table,
    errors: &mut Vec<String>,
) -> T {
    let mut good = toml::Table::new();
    for (key, value) in table {
        if !defaults.contains_key(&key) {
            errors.push(format!("{section}.{key}: unknown key"));
            continue;
        }
        let mut single = toml::Table::new();
        single.insert(key.clone(), value.clone());
        match T::deserialize(toml::Value::Table(single)) {
            Ok(_) => {
                good.insert(key, value);
            }
            Err(e) if holds_secrets(section, &key) => {
                errors.push(format!("{section}.{key}: {} (value not shown)", without_quoted_values(e.message().trim())))
            }
            Err(e) => errors.push(format!("{section}.{key}: {}", e.message().trim())),
        }
    }
    T::deserialize(toml::Value::Table(good)).unwrap_or_default()
}

/// Overlays `COPILOT_INGEST__SECTION__KEY[__SUBKEY]` variables. A value whose
/// default is a string stays a string; others are read as TOML literals.
pub(super) fn apply_env(
    root: &mut toml::Table,
    defaults: &toml::Table,
    env: &[(String, String)],
    errors: &mut Vec<String>,
) {
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else { continue };
        let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
        if parts.len() < 2 || parts.iter().any(String::is_empty) {
            errors.push(format!("{name}: expected {ENV_PREFIX}<SECTION>__<KEY>"));
            continue;
        }
        let section = &parts[0];
        let key = &parts[1];
        let default = defaults.get(section).and_then(|s| s.get(key));
        let entry = root.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(section_table) = entry else {
            errors.push(format!("{name}: [{section}] is not a table"));
            continue;
        };
        if parts.len() == 3 {
            // Map-valued keys (kafka.options: librdkafka names use dots; avro.schemas)
            // and sub-sections (sink.dataverse).
            let sub =
                if section == "kafka" && key == "options" { parts[2].replace('_', ".") } else { parts[2].clone() };
            let sub_default = default.and_then(|d| d.get(&sub));
            let map = section_table.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(m) = map {
                m.insert(sub, typed_like(sub_default, raw));
            }
            continue;
        }
        if parts.len() > 3 {
            errors.push(format!("{name}: too many __ separators"));
            continue;
        }
        section_table.insert(key.clone(), typed_like(default, raw));
    }
}

/// An environment value as TOML of the default's type (strings stay verbatim).
fn typed_like(default: Option<&toml::Value>, raw: &str) -> toml::Value {
    match default {
        Some(toml::Value::String(_)) | None => toml::Value::String(raw.to_owned()),
        Some(_) => match format!("v = {raw}").parse::<toml::Table>() {
            Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
            Err(_) => toml::Value::String(raw.to_owned()),
        },
    }
}
