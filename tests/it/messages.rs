//! The table's messages beyond retention, through the real control topic, on
//! SQLite and PostgreSQL: Update, UpdateMultiple, SetState,
//! IsValidStateTransition, Delete, BulkDelete and RetrieveMultiple. Every
//! refusal is checked to leave the row as it was.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value as Json, json};

use crate::common::*;
use crate::control::{ControlClient, ControlService, count, events, query_i64, query_text, sink_urls};

const ENTITY: &str = "msdyn_copilotinteraction";

fn code(reply: &Json) -> (Option<&str>, Option<&str>) {
    (reply["status"].as_str(), reply["error"]["code"].as_str())
}

async fn retrieve(client: &ControlClient, id: &str) -> Json {
    let r = client.call("Retrieve", json!({"Target": id})).await;
    r["response"]["Entity"].clone()
}

/// Every record id, in id order, as text.
async fn ids(url: &str) -> Vec<String> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        let conn = rusqlite::Connection::open(path).unwrap();
        let mut stmt =
            conn.prepare("SELECT msdyn_copilotinteractionid FROM msdyn_copilotinteraction ORDER BY 1").unwrap();
        stmt.query_map([], |r| r.get(0)).unwrap().collect::<Result<_, _>>().unwrap()
    } else {
        let client = copilot_ingest::backend::postgres::connect(url).await.unwrap();
        let rows = client
            .query("SELECT msdyn_copilotinteractionid::text FROM msdyn_copilotinteraction ORDER BY 1", &[])
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_set_state_and_delete_change_only_what_they_may_on_both_sinks() {
    let (urls, _db, _dir) = sink_urls().await;
    for url in urls {
        let kafka = TestKafka::new(1);
        let config = kafka.config_with_sink(&url);
        let workload = events(31, 0, 6);
        let pipeline = RunningPipeline::start(config.clone());
        kafka.produce(&workload.messages).await;
        pipeline.wait_handled(6, Duration::from_secs(60)).await;
        pipeline.stop().await;
        let control = ControlService::start(config.clone()).await;
        let client = ControlClient::new(&kafka);
        let all = ids(&url).await;
        let [a, b, c, d, e, f] = <[String; 6]>::try_from(all.clone()).unwrap();

        // Update: validated and normalized as ingestion; version and modifiedon move.
        let before = retrieve(&client, &a).await;
        let r = client
            .call(
                "Update",
                json!({"Target": {"msdyn_copilotinteractionid": a, "msdyn_name": "renamed",
                                               "msdyn_interactiontype": "ThumbsDown"}}),
            )
            .await;
        assert_eq!(r["status"], "Succeeded", "{url}: {r}");
        let after = retrieve(&client, &a).await;
        assert_eq!(after["msdyn_name"], "renamed");
        assert_eq!(after["msdyn_interactiontype@OData.Community.Display.V1.FormattedValue"], "ThumbsDown");
        assert!(after["versionnumber"].as_i64() > before["versionnumber"].as_i64(), "{url}: {after}");
        assert!(before["modifiedon"].is_null() && after["modifiedon"].is_string(), "{url}: {after}");
        assert_eq!(after["createdon"], before["createdon"], "createdon never changes");

        // Refusals leave the record as it was.
        for (target, expected) in [
            (json!({"msdyn_copilotinteractionid": a, "msdyn_interactiontype": "NoSuchType"}), "invalid_option"),
            (json!({"msdyn_copilotinteractionid": a, "importsequencenumber": 5}), "not_valid_for_update"),
            (json!({"msdyn_copilotinteractionid": a, "statecode": 1}), "not_valid_for_update"),
            (json!({"msdyn_copilotinteractionid": a, "MSDYN_NAME": "x"}), "unknown_field"),
            (json!({"msdyn_copilotinteractionid": a, "msdyn_name": ""}), "missing_required_field"),
        ] {
            let r = client.call("Update", json!({"Target": target})).await;
            assert_eq!(code(&r), (Some("Failed"), Some(expected)), "{url}: {target} → {r}");
        }
        let stale = after["versionnumber"].as_i64().unwrap() - 1;
        let r = client
            .call(
                "Update",
                json!({"Target": {"msdyn_copilotinteractionid": a, "msdyn_name": "stale"},
                       "ConcurrencyBehavior": "IfRowVersionMatches", "RowVersion": stale}),
            )
            .await;
        assert_eq!(code(&r), (Some("Failed"), Some("0x80060882")), "{url}: {r}");
        assert_eq!(retrieve(&client, &a).await, after, "{url}: refused updates change nothing");
        let current = after["versionnumber"].as_i64().unwrap();
        let r = client
            .call(
                "Update",
                json!({"Target": {"msdyn_copilotinteractionid": a, "msdyn_name": "fresh"},
                       "ConcurrencyBehavior": "IfRowVersionMatches", "RowVersion": current}),
            )
            .await;
        assert_eq!(r["status"], "Succeeded", "{url}: {r}");

        // UpdateMultiple is all or nothing.
        let missing = uuid::Uuid::new_v4().to_string();
        let r = client
            .call(
                "UpdateMultiple",
                json!({"Targets": [{"msdyn_copilotinteractionid": b, "msdyn_name": "b2"},
                                   {"msdyn_copilotinteractionid": missing, "msdyn_name": "nobody"}]}),
            )
            .await;
        assert_eq!(code(&r), (Some("Failed"), Some("0x80040217")), "{url}: {r}");
        assert_ne!(retrieve(&client, &b).await["msdyn_name"], "b2", "{url}: nothing of a failed UpdateMultiple");
        let r = client
            .call(
                "UpdateMultiple",
                json!({"Targets": [{"msdyn_copilotinteractionid": b, "msdyn_name": "b2"},
                                   {"msdyn_copilotinteractionid": c, "msdyn_name": "c2"}]}),
            )
            .await;
        assert_eq!(r["status"], "Succeeded", "{url}: {r}");
        assert_eq!(
            (retrieve(&client, &b).await["msdyn_name"].clone(), retrieve(&client, &c).await["msdyn_name"].clone()),
            (json!("b2"), json!("c2"))
        );

        // SetState: the table's pairs only; IsValidStateTransition changes nothing.
        let r =
            client.call("IsValidStateTransition", json!({"Entity": b, "NewState": "Inactive", "NewStatus": 2})).await;
        assert_eq!(r["response"]["IsValid"], true, "{url}: {r}");
        let r = client.call("IsValidStateTransition", json!({"Entity": b, "NewState": "Active", "NewStatus": 2})).await;
        assert_eq!(r["response"]["IsValid"], false, "{url}: {r}");
        assert_eq!(retrieve(&client, &b).await["statecode"], 0);
        let r = client.call("SetState", json!({"EntityMoniker": b, "State": 0, "Status": 2})).await;
        assert_eq!(code(&r), (Some("Failed"), Some("0x80040203")), "{url}: {r}");
        let r = client.call("SetState", json!({"EntityMoniker": b, "State": 1, "Status": -1})).await;
        assert_eq!(r["status"], "Succeeded", "{url}: {r}");
        let inactive = retrieve(&client, &b).await;
        assert_eq!((inactive["statecode"].clone(), inactive["statuscode"].clone()), (json!(1), json!(2)), "{url}");

        // Retained records are read-only.
        assert_eq!(client.call("Retain", json!({"Target": c})).await["status"], "Succeeded");
        let kept = retrieve(&client, &c).await;
        let r = client.call("Update", json!({"Target": {"msdyn_copilotinteractionid": c, "msdyn_name": "no"}})).await;
        assert_eq!(code(&r), (Some("Failed"), Some("RecordRetained")), "{url}: {r}");
        let r = client.call("SetState", json!({"EntityMoniker": c, "State": 1, "Status": 2})).await;
        assert_eq!(code(&r), (Some("Failed"), Some("RecordRetained")), "{url}: {r}");
        assert_eq!(retrieve(&client, &c).await, kept, "{url}: a retained record is unchanged");

        // Delete: tombstoned; a second delete is not found; BulkDelete by criteria.
        assert_eq!(client.call("Delete", json!({"Target": d})).await["status"], "Succeeded");
        let again = client.call("Delete", json!({"Target": d})).await;
        assert_eq!(code(&again), (Some("Failed"), Some("0x80040217")), "{url}: {again}");
        let retrieve_deleted = client.call("Retrieve", json!({"Target": d})).await;
        assert_eq!(code(&retrieve_deleted), (Some("Failed"), Some("0x80040217")));
        let fetch = format!(
            "<fetch><entity name='{ENTITY}'><filter><condition attribute='msdyn_copilotinteractionid' operator='in'><value>{e}</value><value>{f}</value></condition></filter></entity></fetch>"
        );
        let r = client.call("BulkDelete", json!({"EntityName": ENTITY, "FetchXml": fetch})).await;
        assert_eq!((r["status"].as_str(), count(&r)), (Some("Succeeded"), 2), "{url}: {r}");
        assert_eq!(query_i64(&url, "SELECT count(*) FROM msdyn_copilotinteraction").await, 3);
        control.stop().await;

        // A replay of the whole topic by a fresh consumer group: the deleted ids
        // stay deleted, and the updated records keep their updates.
        let mut replay = config.clone();
        replay.kafka.group_id = unique("replay");
        let pipeline = RunningPipeline::start(replay);
        pipeline.wait_handled(6, Duration::from_secs(60)).await;
        let metrics = std::sync::Arc::clone(&pipeline.metrics);
        pipeline.stop().await;
        assert_eq!(ids(&url).await, vec![a.clone(), b.clone(), c.clone()], "{url}: deleted ids are never re-created");
        let skipped = metrics.records_skipped_total.with_label_values(&["deleted_replay"]).get();
        assert_eq!(skipped, 3, "{url}: the three deleted ids were skipped as deleted replays");
        let names: HashSet<String> = [&a, &b, &c]
            .iter()
            .map(|id| format!("SELECT count(*) FROM msdyn_copilotinteraction WHERE msdyn_copilotinteractionid = '{id}' AND msdyn_name IN ('fresh', 'b2', 'c2')"))
            .collect();
        for sql in names {
            assert_eq!(query_i64(&url, &sql).await, 1, "{url}: a replay never undoes an update");
        }
    }
}

/// RetrieveMultiple pages through 12,000 records while ingestion adds more:
/// every record present at the start is returned exactly once. With a small
/// producer message size, pages are cut to fit (fewer rows than asked,
/// MoreRecords true).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieve_multiple_pages_without_gaps_or_repeats_while_ingesting() {
    let (urls, _db, _dir) = sink_urls().await;
    for url in urls {
        let kafka = TestKafka::new(2);
        let mut config = kafka.config_with_sink(&url);
        config.kafka.options.insert("message.max.bytes".into(), copilot_ingest::config::Secret::new("400000"));
        let first = events(41, 0, 12_000);
        let pipeline = RunningPipeline::start(config.clone());
        kafka.produce(&first.messages).await;
        pipeline.wait_handled(12_000, Duration::from_secs(180)).await;
        let before: HashSet<String> = ids(&url).await.into_iter().collect();
        assert_eq!(before.len(), 12_000);
        let control = ControlService::start(config.clone()).await;
        let client = ControlClient::new(&kafka);

        let query = |cookie: Option<(&str, i64)>| {
            let paging = match cookie {
                Some((c, page)) => format!(
                    " page='{page}' paging-cookie='{}'",
                    c.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
                ),
                None => String::new(),
            };
            format!(
                "<fetch count='5000' returntotalrecordcount='true'{paging}><entity name='{ENTITY}'><attribute name='msdyn_name'/><order attribute='createdon'/></entity></fetch>"
            )
        };
        let more = events(42, 0, 3000);
        let mut seen: Vec<String> = Vec::new();
        let mut cookie: Option<String> = None;
        let mut page = 1;
        let mut cut_short = false;
        loop {
            let r =
                client.call("RetrieveMultiple", json!({"Query": query(cookie.as_deref().map(|c| (c, page)))})).await;
            assert_eq!(r["status"], "Succeeded", "{url}: {r}");
            let collection = &r["response"]["EntityCollection"];
            let entities = collection["Entities"].as_array().unwrap();
            assert!(serde_json::to_vec(&r).unwrap().len() < 400_000, "a reply fits the message size");
            cut_short |= collection["MoreRecords"] == true && entities.len() < 5000;
            if page == 1 {
                assert!(collection["TotalRecordCount"].as_i64().unwrap() >= 12_000);
                // Ingestion goes on while the client pages.
                kafka.produce(&more.messages).await;
            }
            seen.extend(entities.iter().map(|e| e["msdyn_copilotinteractionid"].as_str().unwrap().to_owned()));
            if collection["MoreRecords"] != true {
                break;
            }
            cookie = collection["PagingCookie"].as_str().map(str::to_owned);
            page += 1;
            assert!(page < 500, "paging ends");
        }
        assert!(cut_short, "{url}: pages were cut to fit the message size");
        let unique: HashSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "{url}: no record repeated");
        assert!(before.iter().all(|id| unique.contains(id)), "{url}: no record present at the start missed");
        control.stop().await;
        pipeline.stop().await;
    }
}

/// Retrieve reads one record, live or retained, as Dataverse's Entity:
/// asked columns by logical name, option sets with their labels; an unknown
/// id fails with Dataverse's not-found code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieve_returns_one_record_with_formatted_values_on_both_sinks() {
    let (urls, _db, _dir) = sink_urls().await;
    let t = copilot_ingest::table::table();
    for url in urls {
        let kafka = TestKafka::new(1);
        let config = kafka.config_with_sink(&url);
        let pipeline = RunningPipeline::start(config.clone());
        kafka.produce(&events(11, 2, 1).messages).await;
        pipeline.wait_handled(3, Duration::from_secs(60)).await;
        let control = ControlService::start(config).await;
        let client = ControlClient::new(&kafka);
        let id = query_text(
            &url,
            "SELECT msdyn_copilotinteractionid FROM msdyn_copilotinteraction ORDER BY msdyn_name LIMIT 1",
        )
        .await;

        let r =
            client.call("Retrieve", json!({"Target": id, "ColumnSet": ["msdyn_name", "msdyn_interactiontype"]})).await;
        assert_eq!(r["status"], "Succeeded", "{url}: {r}");
        let entity = r["response"]["Entity"].as_object().unwrap();
        assert_eq!(entity["msdyn_copilotinteractionid"], id.as_str(), "{url}: the id is always returned");
        assert_eq!(entity["msdyn_name"], "event 11-0");
        let value = entity["msdyn_interactiontype"].as_i64().unwrap() as i32;
        let label = &t.column("msdyn_interactiontype").unwrap().option(value).unwrap().label;
        assert_eq!(entity["msdyn_interactiontype@OData.Community.Display.V1.FormattedValue"], label.as_str());
        assert_eq!(entity.len(), 4, "{url}: only the asked columns: {entity:?}");

        // All columns, and a retained record is still readable.
        let retained = client.call("Retain", json!({"Target": id})).await;
        assert_eq!(retained["status"], "Succeeded");
        let all = client.call("Retrieve", json!({"Target": id})).await;
        let entity = all["response"]["Entity"].as_object().unwrap();
        assert_eq!(entity["statecode"], 0, "{url}: {entity:?}");
        assert_eq!(entity["statecode@OData.Community.Display.V1.FormattedValue"], "Active");
        assert!(entity["versionnumber"].as_i64().unwrap() > 0);
        assert!(entity["createdon"].as_str().unwrap().starts_with("2020-01-01T00:00:00"), "{entity:?}");
        assert_eq!(entity["msdyn_scenariorequestid"], "req-0");

        let missing = client.call("Retrieve", json!({"Target": uuid::Uuid::new_v4().to_string()})).await;
        assert_eq!(
            (missing["status"].as_str(), missing["error"]["code"].as_str()),
            (Some("Failed"), Some("0x80040217")),
            "{missing}"
        );
        let bad = client.call("Retrieve", json!({"Target": id, "ColumnSet": ["msdyn_name", "nope"]})).await;
        assert_eq!(
            (bad["status"].as_str(), bad["error"]["code"].as_str()),
            (Some("Rejected"), Some("InvalidParameters"))
        );
        control.stop().await;
        pipeline.stop().await;
    }
}
