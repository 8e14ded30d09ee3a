//! Validation and normalization, case by case and by property (proptest).
use super::*;
use crate::decode::json::{TopLevel, fields_with_serde, is_memo_column};
use proptest::prelude::*;
use serde_json::json;

fn base() -> serde_json::Value {
    json!({
        "msdyn_name": "Copy - Case summary",
        "msdyn_scenariorequestid": "req-1",
        "msdyn_interactiontype": "Copy",
        "msdyn_scenariotype": "Case summary",
        "msdyn_clienttimestamp": "2024-05-01T10:00:00Z"
    })
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).single().unwrap()
}

fn norm(v: &serde_json::Value) -> Result<Record, Rejection> {
    Normalizer::default().normalize_json(v.to_string().as_bytes(), None, now())
}

fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
    let mut e = base();
    e[field] = value;
    e
}

fn reason_of(v: &serde_json::Value) -> Reason {
    norm(v).expect_err("expected a rejection").reason
}

#[test]
fn a_typical_event_normalizes() {
    let r = norm(&base()).unwrap();
    assert_eq!(r.get("msdyn_interactiontype"), Some(&Value::Int(100230304)));
    assert_eq!(r.get("msdyn_scenariotype"), Some(&Value::Int(100230205)));
    assert_eq!(r.get("statuscode"), Some(&Value::Int(1)));
    assert_eq!(r.state_code(), 0);
    assert_eq!(r.created_on(), now());
}

#[test]
fn every_reason_code_is_produced() {
    let cases: Vec<(Reason, Vec<u8>)> = vec![
        (Reason::MalformedJson, b"{\"msdyn_name\":".to_vec()),
        (Reason::MalformedJson, b"".to_vec()),
        (Reason::MalformedJson, b"\xff\xfe{}".to_vec()),
        (Reason::MalformedJson, b"{\"a\":1} trailing".to_vec()),
        (Reason::NotAnObject, b"[1,2]".to_vec()),
        (Reason::NotAnObject, b"\"text\"".to_vec()),
        (Reason::NotAnObject, b"42".to_vec()),
        (Reason::NotAnObject, b"null".to_vec()),
        (Reason::MissingRequiredField, json!({"msdyn_name": "x"}).to_string().into_bytes()),
        (Reason::MissingRequiredField, with("msdyn_name", json!(null)).to_string().into_bytes()),
        (Reason::MissingRequiredField, with("msdyn_name", json!("")).to_string().into_bytes()),
        (Reason::InvalidType, with("msdyn_name", json!(5)).to_string().into_bytes()),
        (Reason::InvalidType, with("msdyn_interactiontype", json!(true)).to_string().into_bytes()),
        (Reason::InvalidType, with("importsequencenumber", json!("abc")).to_string().into_bytes()),
        (Reason::InvalidType, with("msdyn_interactioncontext", json!([1])).to_string().into_bytes()),
        (Reason::InvalidType, with("msdyn_interactiondataid", json!(123)).to_string().into_bytes()),
        (Reason::ValueTooLong, with("msdyn_name", json!("a".repeat(101))).to_string().into_bytes()),
        (Reason::InvalidOption, with("msdyn_interactiontype", json!(100230310)).to_string().into_bytes()),
        (Reason::InvalidOption, with("msdyn_scenariotype", json!("Nope")).to_string().into_bytes()),
        (Reason::InvalidOption, with("statuscode", json!(2)).to_string().into_bytes()),
        (Reason::InvalidGuid, with("msdyn_copilotinteractionid", json!("1234")).to_string().into_bytes()),
        (
            Reason::InvalidGuid,
            with("msdyn_copilotinteractionid", json!("00000000-0000-0000-0000-000000000000")).to_string().into_bytes(),
        ),
        (Reason::InvalidDatetime, with("msdyn_clienttimestamp", json!("yesterday")).to_string().into_bytes()),
        (
            Reason::InvalidDatetime,
            with("msdyn_clienttimestamp", json!("1752-12-31T23:59:59Z")).to_string().into_bytes(),
        ),
        (Reason::InvalidDatetime, with("overriddencreatedon", json!("2030-01-01T00:00:00Z")).to_string().into_bytes()),
        (Reason::OutOfRange, with("timezoneruleversionnumber", json!(-2)).to_string().into_bytes()),
        (Reason::OutOfRange, with("importsequencenumber", json!(2147483648i64)).to_string().into_bytes()),
        (Reason::OutOfRange, with("importsequencenumber", json!(18446744073709551615u64)).to_string().into_bytes()),
        (Reason::UnknownField, with("msdyn_sentiment", json!("x")).to_string().into_bytes()),
        (Reason::ReadOnlyField, with("statecode", json!(0)).to_string().into_bytes()),
        (Reason::ReadOnlyField, with("createdon", json!("2024-01-01")).to_string().into_bytes()),
        (Reason::ReadOnlyField, with("versionnumber", json!(1)).to_string().into_bytes()),
        (Reason::PayloadTooLarge, vec![b' '; MAX_PAYLOAD_BYTES + 1]),
    ];
    for (expected, payload) in cases {
        let got = Normalizer::default().normalize_json(&payload, None, now());
        assert_eq!(
            got.as_ref().err().map(|r| r.reason),
            Some(expected),
            "payload {:?}",
            String::from_utf8_lossy(&payload[..payload.len().min(120)])
        );
    }
}

#[test]
fn rejections_name_the_field() {
    let r = norm(&with("msdyn_name", json!(5))).unwrap_err();
    assert_eq!(r.field.as_deref(), Some("msdyn_name"));
    let r = norm(&json!({"msdyn_name": "x", "msdyn_interactiontype": 100230301, "msdyn_scenariotype": 100230201}))
        .unwrap_err();
    assert_eq!(r.field.as_deref(), Some("msdyn_scenariorequestid"));
}

#[test]
fn unknown_fields_can_be_ignored() {
    let n = Normalizer { unknown_fields: UnknownFields::Ignore, ..Normalizer::default() };
    let e = with("msdyn_sentiment", json!("x"));
    assert!(n.normalize_json(e.to_string().as_bytes(), None, now()).is_ok());
    // Read-only columns are still refused.
    let e = with("statecode", json!(0));
    assert_eq!(n.normalize_json(e.to_string().as_bytes(), None, now()).unwrap_err().reason, Reason::ReadOnlyField);
}

#[test]
fn every_option_label_and_value_is_accepted() {
    for column in ["msdyn_interactiontype", "msdyn_scenariotype"] {
        let c = table().column(column).unwrap();
        for o in &c.options {
            let spellings = [
                json!(o.value),
                json!(o.value.to_string()),
                json!(o.label),
                json!(o.label.to_uppercase().replace(' ', "_")),
                json!(o.label.to_lowercase()),
                json!(format!(" {} ", o.label)),
            ];
            for s in spellings {
                let r = norm(&with(column, s.clone())).unwrap_or_else(|e| panic!("{column} {s}: {e}"));
                assert_eq!(r.get(column), Some(&Value::Int(o.value)), "{column} {s}");
            }
        }
    }
    // "thumbs up" with a space, as written by people.
    assert_eq!(
        norm(&with("msdyn_interactiontype", json!("thumbs up"))).unwrap().get("msdyn_interactiontype"),
        Some(&Value::Int(100230301))
    );
}

#[test]
fn datetime_forms_normalize_to_utc() {
    let expected = Utc.with_ymd_and_hms(2024, 5, 1, 10, 0, 0).single().unwrap();
    for form in [
        json!("2024-05-01T10:00:00Z"),
        json!("2024-05-01T12:00:00+02:00"),
        json!("2024-05-01T05:00:00-05:00"),
        json!("2024-05-01T10:00:00"),
        json!("2024-05-01 10:00:00"),
        json!("2024-05-01T10:00:00.000Z"),
        json!(expected.timestamp_millis()),
        json!(expected.timestamp_millis().to_string()),
    ] {
        let r = norm(&with("msdyn_clienttimestamp", form.clone())).unwrap_or_else(|e| panic!("{form}: {e}"));
        assert_eq!(r.get("msdyn_clienttimestamp"), Some(&Value::DateTime(expected)), "{form}");
    }
    let r = norm(&with("msdyn_clienttimestamp", json!("2024-05-01"))).unwrap();
    assert_eq!(
        r.get("msdyn_clienttimestamp"),
        Some(&Value::DateTime(Utc.with_ymd_and_hms(2024, 5, 1, 0, 0, 0).single().unwrap()))
    );
    // Sub-millisecond precision is truncated, as stored.
    let r = norm(&with("msdyn_clienttimestamp", json!("2024-05-01T10:00:00.123456789Z"))).unwrap();
    assert_eq!(r.get("msdyn_clienttimestamp"), Some(&Value::DateTime(expected + chrono::Duration::milliseconds(123))));
    // The minimum date itself is valid.
    assert!(norm(&with("msdyn_clienttimestamp", json!("1753-01-01T00:00:00Z"))).is_ok());
}

#[test]
fn overriddencreatedon_becomes_createdon() {
    let r = norm(&with("overriddencreatedon", json!("2020-02-02T02:02:02Z"))).unwrap();
    assert_eq!(r.created_on(), Utc.with_ymd_and_hms(2020, 2, 2, 2, 2, 2).single().unwrap());
}

#[test]
fn guid_forms_normalize_to_lowercase_hyphenated() {
    let expected = Uuid::parse_str("0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d").unwrap();
    for form in [
        "0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d",
        "0B5C6A3E-1D2F-4A5B-8C7D-9E0F1A2B3C4D",
        "{0B5C6A3E-1D2F-4A5B-8C7D-9E0F1A2B3C4D}",
        "{0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d}",
        "0b5c6a3e1d2f4a5b8c7d9e0f1a2b3c4d",
    ] {
        let r = norm(&with("msdyn_interactiondataid", json!(form))).unwrap();
        assert_eq!(r.get("msdyn_interactiondataid"), Some(&Value::Guid(expected)), "{form}");
        let r = norm(&with("msdyn_copilotinteractionid", json!(form))).unwrap();
        assert_eq!(r.id(), expected);
        assert_eq!(r.to_json()["msdyn_copilotinteractionid"], json!("0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d"));
    }
}

#[test]
fn string_limits_count_utf16_code_units() {
    // 50 emoji = 100 UTF-16 units (200 UTF-8 bytes): exactly at the limit.
    assert!(norm(&with("msdyn_name", json!("😀".repeat(50)))).is_ok());
    assert_eq!(reason_of(&with("msdyn_name", json!("😀".repeat(50) + "a"))), Reason::ValueTooLong);
    // 100 CJK characters = 100 units (300 bytes): valid.
    assert!(norm(&with("msdyn_name", json!("漢".repeat(100)))).is_ok());
    assert_eq!(reason_of(&with("msdyn_name", json!("漢".repeat(101)))), Reason::ValueTooLong);
    assert_eq!(utf16_len("a😀漢"), 4);
}

#[test]
fn interaction_context_object_is_stored_compact() {
    let r = norm(&with("msdyn_interactioncontext", json!({"b": [1, 2], "a": "x y"}))).unwrap();
    let text = r.get("msdyn_interactioncontext").and_then(Value::as_text).unwrap();
    assert!(!text.contains(' ') || text.contains("x y"));
    assert_eq!(serde_json::from_str::<serde_json::Value>(text).unwrap(), json!({"b": [1, 2], "a": "x y"}));
    // Member order, numbers and escapes as sent; only whitespace between tokens goes.
    let payload = r#"{"msdyn_name":"n","msdyn_scenariorequestid":"r","msdyn_interactiontype":"Copy",
        "msdyn_scenariotype":"Case summary","msdyn_interactioncontext": { "z" : [1, 2.50, {"y":null}],
        "a":"x \" y\\", "\u00e9" :true }}"#;
    let r = Normalizer::default().normalize_json(payload.as_bytes(), None, now()).unwrap();
    assert_eq!(
        r.get("msdyn_interactioncontext").and_then(Value::as_text),
        Some(r#"{"z":[1,2.50,{"y":null}],"a":"x \" y\\","\u00e9":true}"#)
    );
    let nested = |depth: usize| {
        let context = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        Normalizer::default().normalize_json(
            with("msdyn_interactioncontext", json!(null)).to_string().replace("null", &context).as_bytes(),
            None,
            now(),
        )
    };
    assert!(nested(128).is_ok());
    assert_eq!(nested(129).unwrap_err().reason, Reason::MalformedJson);
    let pretty = "{\n  \"k\": 1\n}";
    let r = norm(&with("msdyn_interactioncontext", json!(pretty))).unwrap();
    assert_eq!(r.get("msdyn_interactioncontext"), Some(&Value::Text(pretty.into())), "strings are kept verbatim");
}

#[test]
fn identity_is_deterministic_and_content_based() {
    let origin = Origin { topic: "t", partition: 1, offset: 7 };
    let n = Normalizer::default();
    let a = n.normalize_json(base().to_string().as_bytes(), Some(&origin), now()).unwrap();
    // Same event at another position and time, fields in another order and spelling: same id.
    let resend = r#"{"msdyn_clienttimestamp":"2024-05-01T12:00:00+02:00","msdyn_scenariotype":100230205,
        "msdyn_interactiontype":"COPY","msdyn_scenariorequestid":"req-1","msdyn_name":"Copy - Case summary"}"#;
    let other = Origin { topic: "t", partition: 3, offset: 99 };
    let b = n.normalize_json(resend.as_bytes(), Some(&other), now() + chrono::Duration::hours(1)).unwrap();
    assert_eq!(a.id(), b.id());
    assert_eq!(a.content_hash(), b.content_hash());
    // Another timestamp: another interaction.
    let c = norm(&with("msdyn_clienttimestamp", json!("2024-05-01T10:00:01Z"))).unwrap();
    assert_ne!(a.id(), c.id());
    // Without a client timestamp the Kafka position decides.
    let mut no_ts = base();
    no_ts.as_object_mut().unwrap().remove("msdyn_clienttimestamp");
    let bytes = no_ts.to_string();
    let x1 = n.normalize_json(bytes.as_bytes(), Some(&origin), now()).unwrap();
    let x2 = n.normalize_json(bytes.as_bytes(), Some(&origin), now()).unwrap();
    let y = n.normalize_json(bytes.as_bytes(), Some(&other), now()).unwrap();
    assert_eq!(x1.id(), x2.id());
    assert_ne!(x1.id(), y.id());
    assert_eq!(x1.content_hash(), y.content_hash());
    // An explicit id wins.
    let given = with("msdyn_copilotinteractionid", json!("{0B5C6A3E-1D2F-4A5B-8C7D-9E0F1A2B3C4D}"));
    assert_eq!(norm(&given).unwrap().id().to_string(), "0b5c6a3e-1d2f-4a5b-8c7d-9e0f1a2b3c4d");
}

#[test]
fn an_empty_string_is_an_absent_value_for_every_column_type() {
    for column in [
        "msdyn_clienttimestamp",
        "msdyn_interactiondataid",
        "importsequencenumber",
        "msdyn_interactioncontext",
        "overriddencreatedon",
    ] {
        let r = norm(&with(column, json!(""))).unwrap_or_else(|e| panic!("{column}: {e:?}"));
        assert!(r.get(column).is_none_or(|v| *v == Value::Null), "{column}");
    }
    // An empty id is no id: the record gets its derived one.
    let derived = norm(&base()).unwrap().id();
    assert_eq!(norm(&with("msdyn_copilotinteractionid", json!(""))).unwrap().id(), derived);
    // A required option set left "" is missing, not an invalid option.
    for column in ["msdyn_interactiontype", "msdyn_scenariotype"] {
        let e = norm(&with(column, json!(""))).unwrap_err();
        assert_eq!((e.reason, e.field.as_deref()), (Reason::MissingRequiredField, Some(column)), "{column}");
    }
}

#[test]
fn field_names_match_logical_names_exactly() {
    let mut upper = base();
    let name = upper.as_object_mut().unwrap().remove("msdyn_name").unwrap();
    upper["MSDYN_NAME"] = name;
    let e = norm(&upper).unwrap_err();
    assert_eq!((e.reason, e.field.as_deref()), (Reason::UnknownField, Some("MSDYN_NAME")));
    // Beside the real name it is unknown too, not a duplicate.
    let e = norm(&with("MSDYN_NAME", json!("x"))).unwrap_err();
    assert_eq!(e.reason, Reason::UnknownField);
    let ignoring = Normalizer { unknown_fields: UnknownFields::Ignore, ..Normalizer::default() };
    let r = ignoring.normalize_json(with("Msdyn_Name", json!("other")).to_string().as_bytes(), None, now()).unwrap();
    assert_eq!(r.get("msdyn_name").and_then(Value::as_text), Some("Copy - Case summary"));
}

#[test]
fn a_nul_character_in_a_string_is_refused_with_a_reason() {
    for column in ["msdyn_name", "msdyn_interactioncontext", "msdyn_scenariorequestid"] {
        let e = norm(&with(column, json!("a\u{0}b"))).unwrap_err();
        assert_eq!((e.reason, e.field.as_deref()), (Reason::InvalidType, Some(column)), "{column}");
        assert!(e.message.contains("NUL"), "{}", e.message);
    }
    // A raw NUL byte inside a JSON string is not JSON: both readers refuse it.
    let raw = with("msdyn_name", json!("aXb")).to_string().replace("aXb", "a\u{0}b");
    let e = Normalizer::default().normalize_json(raw.as_bytes(), None, now()).unwrap_err();
    assert_eq!(e.reason, Reason::MalformedJson, "{}", e.message);
    // Owned text without escapes (what Avro gives) is scanned too.
    let payload = base().to_string();
    let mut fields = crate::decode::json::event_fields(payload.as_bytes(), 1 << 20).unwrap();
    let name = fields.iter_mut().find(|(k, _)| k == "msdyn_name").unwrap();
    name.1 = FieldValue::Str(Cow::Owned("a\u{0}b".to_owned()));
    let e = Normalizer::default().normalize_fields(fields, None, now()).unwrap_err();
    assert_eq!((e.reason, e.field.as_deref()), (Reason::InvalidType, Some("msdyn_name")));
}

#[test]
fn a_key_repeated_inside_the_interaction_context_is_malformed() {
    let payload = |context: &str| {
        format!(
            r#"{{"msdyn_name":"n","msdyn_scenariorequestid":"r","msdyn_interactiontype":"Copy","msdyn_scenariotype":"Copilot","msdyn_interactioncontext":{context}}}"#
        )
    };
    let n = Normalizer::default();
    for bad in [r#"{"a":1,"a":2}"#, r#"{"x":{"a":1, "b":[{"c":1,"c":1}]}}"#, r#"{ "a" : 1 , "a" : 1 }"#] {
        let e = n.normalize_json(payload(bad).as_bytes(), None, now()).unwrap_err();
        assert_eq!((e.reason, e.field.as_deref()), (Reason::MalformedJson, Some("msdyn_interactioncontext")), "{bad}");
    }
    for good in [r#"{"a":1,"b":{"a":2},"c":[{"a":3},{"a":4}]}"#, r#"{"a":"a","b":"a"}"#, "{}"] {
        assert!(n.normalize_json(payload(good).as_bytes(), None, now()).is_ok(), "{good}");
    }
    // Small objects are checked key by key, large ones by a hash set: a
    // repeat is found on either side of the switch.
    let members = |count: usize| (0..count).map(|i| format!("\"k{i}\":{i}")).collect::<Vec<_>>().join(",");
    for count in [15, 16, 17, 400] {
        assert!(n.normalize_json(payload(&format!("{{{}}}", members(count))).as_bytes(), None, now()).is_ok());
        let repeated = format!("{{{},\"k0\":true}}", members(count));
        let e = n.normalize_json(payload(&repeated).as_bytes(), None, now()).unwrap_err();
        assert!(e.message.contains("repeats the key \"k0\""), "{count} keys: {}", e.message);
    }
}

#[test]
fn duplicate_keys_are_refused() {
    let payload = br#"{"msdyn_name":"a","msdyn_name":"b","msdyn_scenariorequestid":"r","msdyn_interactiontype":1,"msdyn_scenariotype":1}"#;
    assert_eq!(Normalizer::default().normalize_json(payload, None, now()).unwrap_err().reason, Reason::MalformedJson);
}

#[test]
fn deep_nesting_is_malformed_not_a_crash() {
    let n = Normalizer::default();
    let deep_objects =
        format!("{{\"msdyn_interactioncontext\":{}1{}}}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    assert_eq!(n.normalize_json(deep_objects.as_bytes(), None, now()).unwrap_err().reason, Reason::MalformedJson);
    // Deep arrays are skipped without recursion: valid JSON, wrong type.
    let deep_arrays = format!("{{\"msdyn_interactioncontext\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(n.normalize_json(deep_arrays.as_bytes(), None, now()).unwrap_err().reason, Reason::InvalidType);
}

fn json_values() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        (-1e9f64..1e9).prop_map(serde_json::Value::from),
        "[ a-z\"\\\\\t\n{}\\[\\]:,é😀]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map("[a-z \"]{0,6}", inner, 0..6)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects of one level as context objects usually are, compact or not:
/// few keys (sometimes repeated), plain or escaped strings, numbers of every
/// JSON form, literals.
fn flat_objects() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        "\"[a-z ]{0,6}\"",
        "\"[a-z\\\\\\x00-\\x1f\"]{0,3}\"",
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap()),
        prop::sample::select(vec![
            "-0",
            "0.5",
            "-1.25",
            "1e3",
            "1.",
            ".5",
            "01",
            "-",
            "1.5E-7",
            "123456789012345678901"
        ])
        .prop_map(str::to_owned),
        prop::sample::select(vec!["true", "false", "null", "nul"]).prop_map(str::to_owned),
    ];
    let member = ("[a-c]{1,2}", "[ ]{0,1}", scalar).prop_map(|(k, ws, v)| format!("\"{k}\":{ws}{v}"));
    proptest::collection::vec(member, 0..20).prop_map(|members| format!("{{{}}}", members.join(",")))
}

/// Event-like JSON text: an object of column-like keys whose values
/// cover the flat reader's shapes and everything it must decline, with
/// random whitespace, sometimes cut short or followed by junk.
fn event_texts() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("msdyn_name".to_owned()),
        Just("msdyn_interactioncontext".to_owned()),
        Just("MSDYN_InteractionContext".to_owned()),
        Just("msdyn_interactiontype".to_owned()),
        Just("msdyn_clienttimestamp".to_owned()),
        Just("msdyn_name\\u0041".to_owned()),
        "[a-z_]{0,8}",
    ];
    let value = prop_oneof![
        any::<String>().prop_map(|s| serde_json::to_string(&s).unwrap()),
        "\"[^\"\\\\]{0,12}\"",
        "\"[a-z\\x00-\\x1f\\\\]{0,6}\"",
        any::<i64>().prop_map(|i| i.to_string()),
        any::<u64>().prop_map(|i| i.to_string()),
        prop::sample::select(vec![
            "-0",
            "0",
            "-",
            "007",
            "1.5",
            "1e3",
            "2E-2",
            "-12",
            "123456789012345678",
            "999999999999999999",
            "1234567890123456789",
            "true",
            "false",
            "null",
            "nul",
            "tru",
            "[1,2]",
            "[]",
            "{}",
            "{\"a\":}",
            "\"\\u00e9\"",
            "\"\\\"\"",
        ])
        .prop_map(str::to_owned),
        json_values().prop_map(|v| serde_json::to_string_pretty(&v).unwrap()),
        json_values().prop_map(|v| serde_json::to_string(&v).unwrap()),
        flat_objects(),
    ];
    let ws = "[ \t\n\r]{0,2}";
    let field = (ws, key, ws, ws, value, ws).prop_map(|(a, k, b, c, v, d)| format!("{a}\"{k}\"{b}:{c}{v}{d}"));
    let tail = prop::sample::select(vec!["", "", "", " ", ",", "}", "x", "\u{a0}", "{}", "\u{0}"]);
    (ws, proptest::collection::vec(field, 0..6), tail, 0..5, any::<prop::sample::Index>()).prop_map(
        |(lead, fields, tail, cut, at)| {
            let mut text = format!("{lead}{{{}}}{tail}", fields.join(","));
            if cut == 1 {
                // A trailing comma.
                text = format!("{lead}{{{},}}", fields.join(","));
            }
            if cut == 0 {
                let mut end = at.index(text.len() + 1);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                text.truncate(end);
            }
            text
        },
    )
}

#[test]
fn typical_events_take_the_flat_reader() {
    let typical = json!({
        "msdyn_name": "Copy - Case summary",
        "msdyn_interactiontype": 100230304,
        "msdyn_clienttimestamp": "2024-05-01T10:00:00Z",
        "msdyn_interactioncontext": {"client": "desktop", "latencyMs": 812, "nested": [1, {"a": null}]},
        "msdyn_copilotinteractionid": null,
        "flag": true
    });
    for text in [typical.to_string(), serde_json::to_string_pretty(&typical).unwrap()] {
        let fields = crate::decode::flat_json::read_flat_object(&text, is_memo_column).expect("the flat shape");
        assert_eq!(fields.len(), 6);
        assert!(matches!(fields[3].1, FieldValue::RawObject(raw) if raw.starts_with('{') && raw.ends_with('}')));
    }
    // A flat, compact context is taken as it is; spaced out, repeating a key
    // or with an exponent, it goes through serde_json and `compact_json`.
    let flat_context = r#"{"client":"desktop","latencyMs":-812,"ratio":0.25,"beta":false,"tag":null}"#;
    for (context, compact) in [
        (flat_context, true),
        ("{}", true),
        (r#"{"a": 1}"#, false),
        (r#"{"a":1,"a":2}"#, false),
        (r#"{"a":1e3}"#, false),
        (r#"{"a":[1]}"#, false),
        (r#"{"a":"\n"}"#, false),
    ] {
        let text = format!(r#"{{"msdyn_name":"n","msdyn_interactioncontext":{context}}}"#);
        let fields = crate::decode::flat_json::read_flat_object(&text, is_memo_column).expect("the flat shape");
        match fields[1].1 {
            FieldValue::CompactObject(raw) => assert!(compact && raw == context, "{context}"),
            FieldValue::RawObject(raw) => assert!(!compact && raw == context, "{context}"),
            ref other => panic!("{context}: {other:?}"),
        }
    }
    for declined in [r#"{"a":"\n"}"#, r#"{"a":1.5}"#, r#"{"a":[1]}"#, r#"{"a":{}}"#, r#"{"a":1,}"#, "[]", "{} x"] {
        assert!(crate::decode::flat_json::read_flat_object(declined, is_memo_column).is_none(), "{declined}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]
    /// Whatever the flat reader accepts, serde_json reads as the same
    /// fields; whatever it declines falls back to serde_json.
    #[test]
    fn flat_reader_agrees_with_serde(text in event_texts()) {
        if let Some(mut fast) = crate::decode::flat_json::read_flat_object(&text, is_memo_column) {
            // An object taken as already compact must be what compact_json
            // makes of it; it is then compared as the raw text serde reads.
            for (_, value) in &mut fast {
                if let FieldValue::CompactObject(raw) = *value {
                    prop_assert_eq!(compact_json(raw), Ok(raw.to_owned()));
                    *value = FieldValue::RawObject(raw);
                }
            }
            match fields_with_serde(&text) {
                Ok(TopLevel::Object(reference)) => prop_assert_eq!(format!("{fast:?}"), format!("{reference:?}")),
                Ok(TopLevel::Other(kind)) => prop_assert!(false, "flat reader accepted {}: {}", kind, text),
                Err(e) => prop_assert!(false, "flat reader accepted invalid JSON ({}): {}", e, text),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]
    /// A context object the flat reader takes as already compact is valid
    /// JSON and exactly what `compact_json` makes of it (no whitespace, no
    /// key twice); one it does not take is left to serde_json as before.
    #[test]
    fn contexts_taken_as_compact_are_what_compact_json_makes(context in flat_objects()) {
        let text = format!(r#"{{"msdyn_name":"n","msdyn_interactioncontext":{context}}}"#);
        let serde_reads = serde_json::from_str::<&serde_json::value::RawValue>(&context).is_ok();
        match crate::decode::flat_json::read_flat_object(&text, is_memo_column).map(|mut f| f.remove(1).1) {
            Some(FieldValue::CompactObject(raw)) => {
                prop_assert!(serde_reads, "taken as compact, refused by serde_json: {}", context);
                prop_assert_eq!(raw, context.as_str());
                prop_assert_eq!(compact_json(raw), Ok(context.clone()));
            }
            Some(FieldValue::RawObject(raw)) => prop_assert!(serde_reads && raw == context),
            Some(other) => prop_assert!(false, "{:?}", other),
            None => prop_assert!(!serde_reads, "declined valid JSON: {}", context),
        }
    }
}

proptest! {
    /// Compacting pretty-printed JSON gives exactly the compact printing.
    #[test]
    fn compact_json_equals_compact_printing(value in json_values()) {
        let pretty = serde_json::to_string_pretty(&value).unwrap();
        prop_assert_eq!(compact_json(&pretty).ok(), Some(serde_json::to_string(&value).unwrap()));
    }

    /// Truncating to milliseconds in place gives what the timestamp round
    /// gives, leap seconds included (they carry into the next second).
    #[test]
    fn truncation_to_milliseconds_matches_the_timestamp_round(
        seconds in 0i64..4_102_444_800,
        nanos in 0u32..1_000_000_000,
        leap in any::<bool>(),
    ) {
        // A leap second is representable only at :59.
        let (seconds, nanos) = if leap { (seconds - seconds % 60 + 59, nanos + 1_000_000_000) } else { (seconds, nanos) };
        let d = DateTime::from_timestamp(seconds, nanos).unwrap();
        let reference = Utc.timestamp_millis_opt(d.timestamp_millis()).single().unwrap();
        prop_assert_eq!(truncate_to_millis(d), reference);
    }

    /// Arbitrary bytes never panic and always give a record or a reason.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Normalizer::default().normalize_json(&bytes, None, now());
    }

    /// Any string value for the name: valid iff within 100 UTF-16 units (and non-empty).
    #[test]
    fn name_length_rule_matches_utf16(name in "\\PC{0,120}") {
        let result = norm(&with("msdyn_name", json!(name.clone())));
        let units = name.encode_utf16().count();
        if name.is_empty() {
            prop_assert_eq!(result.unwrap_err().reason, Reason::MissingRequiredField);
        } else if units > 100 {
            prop_assert_eq!(result.unwrap_err().reason, Reason::ValueTooLong);
        } else {
            prop_assert!(result.is_ok());
        }
    }

    /// Integers: in range iff accepted, for every integer column.
    #[test]
    fn integer_ranges_come_from_the_table(v in any::<i64>()) {
        for column in ["importsequencenumber", "timezoneruleversionnumber", "utcconversiontimezonecode"] {
            let c = table().column(column).unwrap();
            let in_range = c.min_value.unwrap() <= v && v <= c.max_value.unwrap();
            let result = norm(&with(column, json!(v)));
            prop_assert_eq!(result.is_ok(), in_range, "{} = {}", column, v);
            if !in_range { prop_assert_eq!(result.unwrap_err().reason, Reason::OutOfRange); }
        }
    }

    /// Epoch milliseconds and their RFC 3339 rendering are the same instant.
    #[test]
    fn epoch_and_rfc3339_agree(ms in -6_847_804_800_000i64..253_402_300_799_000i64) {
        let a = norm(&with("msdyn_clienttimestamp", json!(ms))).unwrap();
        let text = Utc.timestamp_millis_opt(ms).single().unwrap().to_rfc3339();
        let b = norm(&with("msdyn_clienttimestamp", json!(text))).unwrap();
        prop_assert_eq!(a.get("msdyn_clienttimestamp"), b.get("msdyn_clienttimestamp"));
        prop_assert_eq!(a.id(), b.id());
    }

    /// The derived id depends only on content (and position when there is no timestamp).
    #[test]
    fn identity_is_stable(name in "[a-zA-Z0-9 ]{1,50}", req in "[a-z0-9-]{1,40}", offset in 0i64..1_000_000) {
        let e = json!({"msdyn_name": name, "msdyn_scenariorequestid": req, "msdyn_interactiontype": 100230301,
                       "msdyn_scenariotype": 100230201, "msdyn_clienttimestamp": 1_700_000_000_000i64});
        let o1 = Origin { topic: "a", partition: 0, offset };
        let o2 = Origin { topic: "a", partition: 1, offset: offset + 1 };
        let n = Normalizer::default();
        let a = n.normalize_json(e.to_string().as_bytes(), Some(&o1), now()).unwrap();
        let b = n.normalize_json(e.to_string().as_bytes(), Some(&o2), now()).unwrap();
        prop_assert_eq!(a.id(), b.id());
    }
}

/// Derived ids are what a redelivered event is matched by, and content
/// digests what tells its replay from a conflict; both are stored. A release
/// that changed either would write a second row (or dead-letter a conflict)
/// for every event redelivered across the upgrade, so they are pinned here.
#[test]
fn derived_ids_and_content_digests_stay_what_earlier_releases_stored() {
    let event = json!({
        "msdyn_name": "SendToCustomer - Live conversation response",
        "msdyn_scenariorequestid": "3f0b6e5c-2b7e-4a61-9a4e-0d8c1c1f7a10",
        "msdyn_interactiontype": "SendToCustomer",
        "msdyn_scenariotype": "Live conversation response",
        "msdyn_clienttimestamp": "2024-06-01T12:30:00.123+02:00",
        "msdyn_interactioncontext": {"client": "agent-desktop", "locale": "en-US", "latencyMs": 812},
        "msdyn_interactiondataid": "{8A3C9D5E-1F2A-4B3C-8D4E-5F6A7B8C9D0E}",
        "msdyn_interactionforid": "CAS-01234-X7Y8Z9",
        "msdyn_interactionforlogicalname": "incident"
    });
    let origin = Origin { topic: "copilot.interactions", partition: 3, offset: 41 };
    let normalizer = Normalizer::default();
    let pinned = |event: &serde_json::Value| {
        let r = normalizer.normalize_json(event.to_string().as_bytes(), Some(&origin), now()).unwrap();
        (r.id().to_string(), r.content_hash().to_string())
    };
    assert_eq!(
        pinned(&event),
        ("4d805e5f-a490-5460-a963-b3459e30a894".to_owned(), "1af04e13-a101-59dc-8ce1-3fe18dfffa2c".to_owned())
    );
    // Without a client timestamp the Kafka position is part of the id.
    let mut without_timestamp = event.clone();
    without_timestamp.as_object_mut().unwrap().remove("msdyn_clienttimestamp");
    assert_eq!(
        pinned(&without_timestamp),
        ("ad4e8a63-71ad-5378-aec6-8299f32b6946".to_owned(), "90b4cc9b-8b4c-520f-86c5-5acfd71160c7".to_owned())
    );
}
