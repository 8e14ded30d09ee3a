"""A third-party Kafka client for the interop tests (confluent-kafka from PyPI).

produce BOOTSTRAP TOPIC PARTITIONS FILE [CA]  -- FILE: one JSON object per line,
    {"key": str, "value": base64}; message i goes to partition i % PARTITIONS.
count BOOTSTRAP TOPIC [CA]  -- prints {"messages": n, "sources": distinct
    (x-ingest-source-partition, x-ingest-source-offset) pairs} read from the start.
"""
import base64
import json
import sys
import time

from confluent_kafka import Consumer, Producer


def security(ca):
    return {"security.protocol": "SSL", "ssl.ca.location": ca} if ca else {}


def produce(bootstrap, topic, partitions, path, ca=None):
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, **security(ca)})
    failures = []

    def delivered(err, _msg):
        if err is not None:
            failures.append(str(err))

    with open(path) as f:
        for i, line in enumerate(f):
            m = json.loads(line)
            while True:
                try:
                    producer.produce(topic, key=m["key"].encode(), value=base64.b64decode(m["value"]),
                                     partition=i % int(partitions), on_delivery=delivered)
                    break
                except BufferError:
                    producer.poll(0.1)
            producer.poll(0)
    remaining = producer.flush(60)
    if remaining or failures:
        sys.exit(f"undelivered: {remaining}, failed: {failures[:3]}")


def count(bootstrap, topic, ca=None):
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"count-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, **security(ca)})
    consumer.subscribe([topic])
    messages, sources, quiet_since = 0, set(), None
    deadline = time.time() + 60
    while time.time() < deadline:
        m = consumer.poll(0.5)
        if m is None or m.error():
            if messages and quiet_since and time.time() - quiet_since > 3:
                break
            quiet_since = quiet_since or time.time()
            continue
        quiet_since = None
        messages += 1
        headers = dict(m.headers() or [])
        sources.add((headers.get("x-ingest-source-partition"), headers.get("x-ingest-source-offset")))
    consumer.close()
    print(json.dumps({"messages": messages, "sources": len(sources)}))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"produce": produce, "count": count}[command](*args)
