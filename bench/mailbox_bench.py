"""Mailbox store throughput: messages appended and acked per second, beside plain SQLite.

Each tick commits one batch of new messages together with the acks of the
previous batch, as the kernel does per host tick; the "+reads" column also
reads each tick's new messages back through the delivery cursor
(``pending_all``), as the kernel does before pushing them to hosts. The baseline does the same
inserts and deletes with bare ``executemany`` on an unindexed table with the
same columns and pragmas (no dedup, no id index, no counters, no dedup memory),
so the ratio is the cost of our guarantees. Runs are interleaved and the best
of ``--repeat`` is kept, since the machine may be shared.

    python bench/mailbox_bench.py [--messages 200000] [--batch 100 1000]
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import tempfile
import time
from pathlib import Path

from llmos_kernel.mailbox import MailboxStore
from llmos_kernel.messages import Envelope, encode, new_message_id


def make_batches(total: int, batch: int, agents: int = 100) -> list[list[Envelope]]:
    rng = random.Random(0)
    payload = encode({"text": "x" * 48, "n": 1})
    envs = [
        Envelope(new_message_id(), rng.randrange(1, agents), rng.randrange(1, agents), "dict",
                 payload)
        for _ in range(total)
    ]
    return [envs[i:i + batch] for i in range(0, total, batch)]


def run_store(path: Path, batches: list[list[Envelope]], read: bool) -> float:
    with MailboxStore(path) as store:
        start = time.perf_counter()
        previous: list[str] = []
        cursor = 0
        for batch in batches:
            store.commit(sends=batch, acks=previous)
            if read:
                delivered = store.pending_all(after_seq=cursor, limit=len(batch))
                cursor = delivered[-1].seq
            previous = [e.id for e in batch]
        store.commit(acks=previous)
        return time.perf_counter() - start


def run_baseline(path: Path, batches: list[list[Envelope]]) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE m (seq INTEGER PRIMARY KEY, id TEXT, sender INTEGER, receiver "
               "INTEGER, type TEXT, payload BLOB, correlation_id TEXT, reply_to TEXT, deadline "
               "REAL, timestamp REAL, topic TEXT)")
    start = time.perf_counter()
    seq, previous = 1, []
    for batch in batches:
        rows = [(seq + i, *e.to_wire()) for i, e in enumerate(batch)]
        db.execute("BEGIN")
        db.executemany("INSERT INTO m VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        db.executemany("DELETE FROM m WHERE seq = ?", previous)
        db.execute("COMMIT")
        previous = [(r[0],) for r in rows]
        seq += len(rows)
    db.executemany("DELETE FROM m WHERE seq = ?", previous)
    elapsed = time.perf_counter() - start
    db.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--batch", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeat", type=int, default=3, help="best of N interleaved runs")
    args = parser.parse_args()
    print(f"{'batch':>6} {'baseline msg/s':>15} {'store msg/s':>12} {'ratio':>6} "
          f"{'store+reads msg/s':>18} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            batches = make_batches(args.messages, batch)
            times: dict[str, list[float]] = {"base": [], "ours": [], "reads": []}
            for i in range(args.repeat):
                times["base"].append(run_baseline(Path(tmp, f"base{batch}-{i}.db"), batches))
                times["ours"].append(run_store(Path(tmp, f"ours{batch}-{i}.db"), batches, False))
                times["reads"].append(run_store(Path(tmp, f"read{batch}-{i}.db"), batches, True))
            base, ours, reads = (args.messages / min(t) for t in times.values())
            print(f"{batch:>6} {base:>15,.0f} {ours:>12,.0f} {ours / base:>6.2f} "
                  f"{reads:>18,.0f} {reads / base:>6.2f}")


if __name__ == "__main__":
    main()
