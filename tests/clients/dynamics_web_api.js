// DynamicsWebApi (npm dynamics-web-api), unmodified, against copilot-ingest's
// Web API over https (NODE_EXTRA_CA_CERTS names the server's CA).
//
// usage: node dynamics_web_api.js SERVER_URL WRITE_TOKEN RETENTION_TOKEN RUN_TAG INGESTED_ID
//
// Each step asserts what Dataverse would answer; the last line printed is a
// JSON summary the Rust test checks against the table itself.
"use strict";
const assert = require("node:assert/strict");
const { DynamicsWebApi } = require("dynamics-web-api");

const [serverUrl, writeToken, retentionToken, tag, ingestedId] = process.argv.slice(2);
const ES = "msdyn_copilotinteractions";
const T = "msdyn_copilotinteraction";
const client = (token) =>
  new DynamicsWebApi({ serverUrl, dataApi: { version: "9.2" }, onTokenRefresh: async () => token });
const api = client(writeToken);
const retention = client(retentionToken);

const record = (n, extra = {}) => ({
  msdyn_name: `${tag}-${n}`,
  msdyn_scenariorequestid: tag,
  msdyn_interactiontype: 100230305,
  msdyn_scenariotype: 100230204,
  msdyn_clienttimestamp: `2024-05-01T10:00:${String(n).padStart(2, "0")}Z`,
  ...extra,
});
const step = (name) => console.log(`step ${name}`);

async function main() {
  const summary = {};

  step("create");
  const first = await api.create({ collection: ES, data: record(0, { msdyn_name: `${tag}-0 é ✓` }) });
  assert.match(first, /^[0-9a-f-]{36}$/);
  const got = await api.retrieve({ collection: ES, key: first, select: ["msdyn_name", "createdon"] });
  assert.equal(got.msdyn_name, `${tag}-0 é ✓`);
  assert.ok(got.createdon instanceof Date, "datetimes are to the second, so they revive as dates");
  assert.match(got["@odata.etag"], /^W\/"\d+"$/);
  const represented = await api.create({
    collection: ES,
    data: record(1),
    returnRepresentation: true,
    select: ["msdyn_name"],
  });
  assert.equal(represented.msdyn_name, `${tag}-1`);

  step("create-multiple");
  const created = await api.callAction({
    collection: ES,
    actionName: "Microsoft.Dynamics.CRM.CreateMultiple",
    action: { Targets: [2, 3, 4, 5].map((n) => ({ ...record(n), "@odata.type": `Microsoft.Dynamics.CRM.${T}` })) },
  });
  assert.equal(created.Ids.length, 4);

  step("retrieve-all");
  const filter = `msdyn_scenariorequestid eq '${tag}'`;
  const page = await api.retrieveMultiple({ collection: ES, select: ["msdyn_name"], filter, maxPageSize: 4 });
  assert.equal(page.value.length, 4);
  assert.ok(page.oDataNextLink.startsWith(`${serverUrl}/api/data/v9.2/`), page.oDataNextLink);
  const all = await api.retrieveAll({ collection: ES, select: ["msdyn_name"], filter, maxPageSize: 4 });
  assert.equal(all.value.length, 6);
  const counted = await api.retrieveMultiple({ collection: ES, filter, count: true, top: 1 });
  assert.equal(counted.oDataCount, 6);
  const folded = await api.retrieveMultiple({ collection: ES, select: ["msdyn_name"], filter: `msdyn_name eq '${tag.toUpperCase()}-1'` });
  assert.equal(folded.value.length, 1, "string comparison ignores case, as in Dataverse");
  const total = await api.count({ collection: ES });
  assert.ok(typeof total === "number" && total >= 6, `count ${total}`);

  step("fetch-all");
  const fetchXml =
    `<fetch count="2"><entity name="${T}"><attribute name="msdyn_name"/>` +
    `<filter><condition attribute="msdyn_scenariorequestid" operator="eq" value="${tag}"/></filter></entity></fetch>`;
  const fetched = await api.fetchAll({ collection: ES, fetchXml });
  assert.equal(fetched.value.length, 6);
  assert.equal(new Set(fetched.value.map((r) => r.msdyn_copilotinteractionid)).size, 6);

  step("long-query-batch");
  // Over 2,000 characters: DynamicsWebApi sends it inside a $batch by itself.
  const names = Array.from({ length: 120 }, (_, i) => `'${tag}-${i}'`).join(",");
  const long = await api.retrieveMultiple({
    collection: ES,
    select: ["msdyn_name"],
    filter: `Microsoft.Dynamics.CRM.In(PropertyName='msdyn_name',PropertyValues=[${names.replaceAll("'", '"')}])`,
  });
  assert.equal(long.value.length, 5); // -0 was renamed with accents; 1..5 match

  step("update");
  assert.equal(await api.update({ collection: ES, key: first, data: { msdyn_name: `${tag}-0-updated` } }), true);
  const stale = await api.update({
    collection: ES,
    key: first,
    data: { msdyn_name: "stale" },
    ifmatch: got["@odata.etag"],
  });
  assert.equal(stale, false, "a stale ETag is refused (412)");
  await assert.rejects(api.update({ collection: ES, key: "6a3c5a8e-0000-4000-8000-000000000000", data: { msdyn_name: "x" } }), (e) => e.status === 404);

  step("upsert");
  const again = await api.upsert({ collection: ES, key: first, data: { msdyn_name: "x" }, ifnonematch: "*" });
  assert.equal(again, null, "If-None-Match: * on an existing record is refused (412)");

  step("set-state");
  await api.update({ collection: ES, key: created.Ids[0], data: { statecode: 1, statuscode: 2 } });
  const valid = await api.callFunction({
    name: "IsValidStateTransition",
    parameters: { Entity: { "@odata.id": `${ES}(${created.Ids[0]})` }, NewState: "Active", NewStatus: 1 },
  });
  assert.equal(valid.IsValid, true);

  step("batch");
  api.startBatch();
  api.create({ collection: ES, data: record(30) });
  api.retrieveMultiple({ collection: ES, select: ["msdyn_name"], filter: `msdyn_name eq '${tag}-1'` });
  const [batchCreated, batchRead] = await api.executeBatch();
  assert.match(batchCreated, /^[0-9a-f-]{36}$/);
  assert.equal(batchRead.value.length, 1);

  step("retention");
  await assert.rejects(
    api.callAction({ collection: ES, key: created.Ids[1], actionName: "Microsoft.Dynamics.CRM.Retain", action: {} }),
    (e) => e.status === 403,
    "retaining needs the retention role",
  );
  await retention.callAction({ collection: ES, key: created.Ids[1], actionName: "Microsoft.Dynamics.CRM.Retain", action: {} });
  await assert.rejects(
    api.update({ collection: ES, key: created.Ids[1], data: { msdyn_name: "changed" } }),
    (e) => e.status === 400 && /RecordRetained/.test(e.message),
    "a retained record is read-only",
  );
  const retained = await api.fetch({
    collection: ES,
    fetchXml: `<fetch datasource="retained"><entity name="${T}"><attribute name="msdyn_name"/></entity></fetch>`,
  });
  assert.deepEqual(retained.value.map((r) => r.msdyn_copilotinteractionid), [created.Ids[1]]);
  const validated = await api.callAction({
    actionName: "ValidateRetentionConfig",
    action: { EntityName: T, FetchXml: fetchXml },
  });
  assert.ok(validated, "ValidateRetentionConfig answers");

  step("retention-policies");
  const RC = "retentionconfigs";
  const policy = {
    uniquename: `${tag}-policy`,
    criteria: `<fetch><entity name="${T}"><filter><condition attribute="createdon" operator="olderthan-x-days" value="365"/></filter></entity></fetch>`,
    starttime: "2030-01-01T00:00:00Z",
    recurrence: "FREQ=DAILY;INTERVAL=1",
  };
  await assert.rejects(api.create({ collection: RC, data: policy }), (e) => e.status === 403, "policies need the retention role");
  const policyId = await retention.create({ collection: RC, data: policy });
  assert.match(policyId, /^[0-9a-f-]{36}$/);
  await assert.rejects(retention.create({ collection: RC, data: policy }), (e) => e.status === 412, "a uniquename is unique");
  const listed = await api.retrieveMultiple({ collection: RC, filter: `uniquename eq '${tag}-policy'` });
  assert.equal(listed.value.length, 1);
  assert.equal(listed.value[0].statuscode, 1);
  assert.equal(listed.value[0].nextrun, "2030-01-01T00:00:00.000Z");
  assert.equal(await retention.update({ collection: RC, key: policyId, data: { statuscode: 2 } }), true);
  const paused = await api.retrieve({ collection: RC, key: policyId });
  assert.equal(paused.statuscode, 2, "paused");
  const operations = await api.retrieveMultiple({ collection: "retentionoperations" });
  assert.ok(operations.value.some((o) => o.operationtype === "Retain" && o.statuscode === 5), "the Retain above is an operation");
  assert.equal(await retention.deleteRecord({ collection: RC, key: policyId }), true);
  await assert.rejects(api.retrieve({ collection: RC, key: policyId }), (e) => e.status === 404);
  summary.policy = policyId;

  step("delete");
  assert.equal(await api.deleteRecord({ collection: ES, key: created.Ids[2] }), true);
  await assert.rejects(api.retrieve({ collection: ES, key: created.Ids[2] }), (e) => e.status === 404 && e.code === "0x80040217");
  // A record that came from Kafka: deleted here, it must stay deleted when the topic is replayed.
  assert.equal(await api.deleteRecord({ collection: ES, key: ingestedId }), true);

  step("errors");
  await assert.rejects(
    api.create({ collection: ES, data: record(40, { msdyn_interactiontype: 1 }) }),
    (e) => e.status === 400 && e.code === "0x8004431A",
  );
  await assert.rejects(
    client("not-a-token").retrieveMultiple({ collection: ES, top: 1 }),
    (e) => e.status === 401,
  );

  summary.first = first;
  summary.retained = created.Ids[1];
  summary.deleted = created.Ids[2];
  console.log(JSON.stringify(summary));
}

main().catch((e) => {
  console.error("FAILED:", e && (e.stack || JSON.stringify(e)));
  process.exit(1);
});
