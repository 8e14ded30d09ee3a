#!/usr/bin/env python3
"""Bytes SQLite writes to its WAL per inserted row, by commit size, page size
and id key type, for a table shaped like the product's: a random 36-character
text id (or its 16 bytes as a BLOB) as the primary key, a B-tree on an
in-order creation time, and ~420 bytes of other columns.

usage: python3 scripts/sqlite_wal_bytes.py [ROWS_BEFORE] [ROWS_MEASURED]

Every commit rewrites, whole, each page it touched; rows with random ids land
on pages all over the id index, so a commit much smaller than the index writes
about one index page per row. The WAL is never checkpointed here, so its size
counts every frame written. Page counts do not depend on the machine's speed:
the figures are the same on a busy machine and an idle one.
"""
import os
import sqlite3
import sys
import tempfile
import uuid


def wal_bytes_per_row(directory, page_size, key, commit_rows, rows_before, rows_measured):
    path = os.path.join(directory, f"wal_{page_size}_{key}_{commit_rows}.db")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA page_size={page_size}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("PRAGMA cache_size=-131072")
    key_type = "TEXT" if key == "text" else "BLOB"
    db.execute(f"CREATE TABLE t (id {key_type} PRIMARY KEY NOT NULL, createdon TEXT, body TEXT)")
    db.execute("CREATE INDEX t_createdon ON t (createdon)")
    body = "x" * 420
    sequence = 0

    def rows(count):
        nonlocal sequence
        for _ in range(count):
            sequence += 1
            id_ = uuid.uuid4()
            yield (str(id_) if key == "text" else id_.bytes, f"2026-12-03T18:{sequence:012d}", body)

    def insert(count):
        db.execute("BEGIN")
        db.executemany("INSERT INTO t VALUES (?, ?, ?)", rows(count))
        db.execute("COMMIT")

    if rows_before:
        insert(rows_before)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    for _ in range(rows_measured // commit_rows):
        insert(commit_rows)
    frames = os.path.getsize(path + "-wal") // (page_size + 24)
    db.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return frames * page_size / rows_measured


def main():
    rows_before = int(sys.argv[1]) if len(sys.argv) > 1 else 500_000
    rows_measured = int(sys.argv[2]) if len(sys.argv) > 2 else 128_000
    print(f"{rows_before} rows in the table, then {rows_measured} more in commits of:")
    print("| commit rows | page size | id key | WAL bytes per row |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        for commit_rows in (1_000, 4_000, 32_000):
            for page_size in (4096, 2048):
                for key in ("text", "blob"):
                    per_row = wal_bytes_per_row(directory, page_size, key, commit_rows, rows_before, rows_measured)
                    print(f"| {commit_rows} | {page_size} | {key} | {per_row:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
