"""Event log throughput: signed, hash-chained appends with synchronous=FULL.

Baseline, in the same run: a bare SQLite insert of the same payload bytes into a table with the
same pragmas (WAL, synchronous=FULL), one commit per row, no hashing or signing. The ratio shows
what the chain and the signature cost on top of the durable write itself.

    .venv/bin/python -m benchmarks.bench_eventlog [--events N] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

from benchmarks._common import write_result
from hearthnet.eventlog import EventLog
from hearthnet.identity import NodeIdentity

PAYLOAD = {"round_id": "01JCZ0000000000000000000000", "participant": "hn" + "a" * 58, "n": 42}


def baseline_appends(path: Path, n: int) -> float:
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE t (seq INTEGER PRIMARY KEY, payload BLOB)")
    data = repr(PAYLOAD).encode()
    start = time.perf_counter()
    for i in range(n):
        with db:
            db.execute("INSERT INTO t VALUES (?, ?)", (i, data))
    elapsed = time.perf_counter() - start
    db.close()
    return elapsed


async def eventlog_appends(path: Path, n: int, identity: NodeIdentity) -> tuple[float, float, int]:
    log = EventLog(path, identity)
    start = time.perf_counter()
    for i in range(n):
        await log.append("bench.append", {**PAYLOAD, "i": i})
    append_s = time.perf_counter() - start
    # Grow to 10k events (bulk, timing not counted) for the verify measurement.
    while log.head_seq < 10_000:
        await log.append("bench.fill", PAYLOAD)
    start = time.perf_counter()
    result = await log.verify()
    verify_s = time.perf_counter() - start
    assert result.ok
    await log.close()
    return append_s, verify_s, result.checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_s = baseline_appends(Path(tmp) / "base.db", args.events)
        append_s, verify_s, checked = asyncio.run(
            eventlog_appends(Path(tmp) / "events.db", args.events, NodeIdentity.generate())
        )
    write_result(
        "eventlog",
        {
            "events": args.events,
            "append_events_per_s": round(args.events / append_s, 1),
            "baseline_sqlite_inserts_per_s": round(args.events / base_s, 1),
            "append_vs_baseline_ratio": round(base_s / append_s, 3),
            "verify_events": checked,
            "verify_s_per_10k_events": round(verify_s * 10_000 / checked, 4),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
