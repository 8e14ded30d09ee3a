"""Microsoft's Python SDK for Dataverse (PowerPlatform-Dataverse-Client),
unmodified, against copilot-ingest's Web API over https.

usage: python_sdk.py BASE_URL TOKEN READ_ONLY_TOKEN RUN_TAG
(REQUESTS_CA_BUNDLE names the CA of the server's certificate.)

Each step asserts what Dataverse would answer; the last line printed is a
JSON summary the Rust test checks against the table itself.
"""

import json
import sys
import uuid

from azure.core.credentials import AccessToken
from PowerPlatform.Dataverse import DataverseClient, col
from PowerPlatform.Dataverse.core.errors import HttpError

T = "msdyn_copilotinteraction"
base_url, token, read_token, tag = sys.argv[1:5]


class StaticToken:
    def __init__(self, value):
        self.value = value

    def get_token(self, *scopes, **kwargs):
        return AccessToken(self.value, 4102444800)


def record(n, **extra):
    r = {
        "msdyn_name": f"{tag}-{n}",
        "msdyn_scenariorequestid": tag,
        "msdyn_interactiontype": "ThumbsUp",  # a label: the SDK turns it into the value
        "msdyn_scenariotype": 100230204,
        "msdyn_clienttimestamp": f"2024-05-01T10:00:{n:02d}Z",
    }
    r.update(extra)
    return r


def step(name):
    print(f"step {name}", flush=True)


client = DataverseClient(base_url, StaticToken(token))
summary = {}

step("create")
first = client.records.create(T, record(0))
got = client.records.retrieve(T, first, select=["msdyn_name", "msdyn_interactiontype"])
assert got is not None and got["msdyn_name"] == f"{tag}-0", got
assert got["msdyn_interactiontype"] == 100230301, got
assert got.etag and got.etag.startswith('W/"'), got.etag

step("create-multiple")
many = client.records.create(T, [record(n) for n in range(1, 6)])
assert len(many) == 5 and len(set(many)) == 5, many

step("list-pages")
pages = list(
    client.records.list_pages(
        T,
        filter=f"msdyn_scenariorequestid eq '{tag}'",
        select=["msdyn_name"],
        orderby=["createdon desc"],
        page_size=2,
    )
)
rows = [r for page in pages for r in page]
assert len(pages) == 3, [len(p) for p in pages]
assert sorted(r["msdyn_name"] for r in rows) == sorted(f"{tag}-{n}" for n in range(6)), rows

step("builder")
built = (
    client.query.builder(T)
    .select("msdyn_name")
    .where((col("msdyn_scenariorequestid") == tag) & col("msdyn_name").contains("-1"))
    .execute()
)
assert [r["msdyn_name"] for r in built] == [f"{tag}-1"], list(built)
inlist = client.records.list(
    T, filter=col("msdyn_name").in_([f"{tag}-2", f"{tag}-3"]) & ~(col("msdyn_name") == f"{tag}-3"), select=["msdyn_name"]
)
assert [r["msdyn_name"] for r in inlist] == [f"{tag}-2"], list(inlist)

step("annotations")
annotated = client.records.retrieve(
    T, first, select=["msdyn_interactiontype"], include_annotations="OData.Community.Display.V1.FormattedValue"
)
assert annotated["msdyn_interactiontype@OData.Community.Display.V1.FormattedValue"] == "ThumbsUp", annotated.data

step("update")
before = client.records.retrieve(T, first, select=["versionnumber"])["versionnumber"]
client.records.update(T, first, {"msdyn_name": f"{tag}-0-updated"})
after = client.records.retrieve(T, first, select=["msdyn_name", "versionnumber"])
assert after["msdyn_name"] == f"{tag}-0-updated" and after["versionnumber"] > before, after.data

step("set-state")
client.records.update(T, many[0], {"statecode": 1, "statuscode": 2})
state = client.records.retrieve(T, many[0], select=["statecode", "statuscode"])
assert (state["statecode"], state["statuscode"]) == (1, 2), state.data

step("update-multiple")
client.records.update(T, many[1:3], {"msdyn_name": f"{tag}-bulk"})
bulk = client.records.list(T, filter=f"msdyn_name eq '{tag}-bulk'", select=["msdyn_name"])
assert len(bulk) == 2, list(bulk)

step("upsert")
upserted = str(uuid.uuid4())
client.records.upsert(T, [{"alternate_key": {"msdyn_copilotinteractionid": upserted}, "record": record(40)}])
client.records.upsert(
    T, [{"alternate_key": {"msdyn_copilotinteractionid": upserted}, "record": {"msdyn_name": f"{tag}-upserted"}}]
)
assert client.records.retrieve(T, upserted, select=["msdyn_name"])["msdyn_name"] == f"{tag}-upserted"

step("fetchxml")
fetch = (
    f"<fetch count='2'><entity name='{T}'><attribute name='msdyn_name'/>"
    f"<filter><condition attribute='msdyn_scenariorequestid' operator='eq' value='{tag}'/></filter>"
    f"<order attribute='createdon'/></entity></fetch>"
)
fetched_pages = list(client.query.fetchxml(fetch).execute_pages())
fetched = [r["msdyn_copilotinteractionid"] for page in fetched_pages for r in page]
assert len(fetched) == 7 and len(set(fetched)) == 7, fetched
assert len(fetched_pages) == 4, [len(p) for p in fetched_pages]

step("batch")
batch = client.batch.new()
batch.records.retrieve(T, first, select=["msdyn_name"])
with batch.changeset() as changeset:
    changeset.records.update(T, many[3], {"msdyn_name": f"{tag}-in-changeset"})
result = batch.execute()
assert not result.failed, [(r.status_code, r.error_message) for r in result.failed]
assert client.records.retrieve(T, many[3], select=["msdyn_name"])["msdyn_name"] == f"{tag}-in-changeset"
# A change set whose second part cannot succeed applies nothing.
failing = client.batch.new()
with failing.changeset() as changeset:
    changeset.records.update(T, many[3], {"msdyn_name": f"{tag}-rolled-back"})
    changeset.records.update(T, str(uuid.uuid4()), {"msdyn_name": "nobody"})
result = failing.execute()
assert result.failed and result.failed[0].status_code == 404, [(r.status_code, r.error_message) for r in result.responses]
assert client.records.retrieve(T, many[3], select=["msdyn_name"])["msdyn_name"] == f"{tag}-in-changeset", "nothing applied"

step("errors")
try:
    client.records.create(T, record(50, msdyn_name="x" * 5000))
    raise AssertionError("a name over its maximum length was accepted")
except HttpError as e:
    assert e.status_code == 400 and e.details.get("service_error_code") == "0x80044331", (e.status_code, e.details)
try:
    client.records.update(T, str(uuid.uuid4()), {"msdyn_name": "nobody"})
    raise AssertionError("an update of a missing record succeeded")
except HttpError as e:
    assert e.status_code == 404, e.status_code

step("delete")
client.records.delete(T, many[4])
assert client.records.retrieve(T, many[4]) is None

step("read-only-token")
reader = DataverseClient(base_url, StaticToken(read_token))
assert reader.records.retrieve(T, first, select=["msdyn_name"]) is not None
try:
    reader.records.update(T, first, {"msdyn_name": "not allowed"})
    raise AssertionError("a read-only token updated a record")
except HttpError as e:
    assert e.status_code == 403, e.status_code
assert client.records.retrieve(T, first, select=["msdyn_name"])["msdyn_name"] == f"{tag}-0-updated", "a refused write changed nothing"

step("ingested")
# Rows the Kafka pipeline writes while this pages: none missing, none twice.
ingested = [
    r["msdyn_copilotinteractionid"]
    for page in client.records.list_pages(
        T, filter="msdyn_scenariorequestid ne null", select=["msdyn_copilotinteractionid"], page_size=500
    )
    for r in page
]
summary["paged_ids"] = len(ingested)
summary["paged_distinct"] = len(set(ingested))
summary["first"] = first
summary["deleted"] = many[4]
summary["upserted"] = upserted
print(json.dumps(summary), flush=True)
