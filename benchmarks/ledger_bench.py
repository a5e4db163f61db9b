"""Ledger benchmark on fixed, generated inputs (not a test). Run from the repo root:

    python benchmarks/ledger_bench.py                      # SQLite: 100,000-fact add --from, 1,000,000-row queries
    python benchmarks/ledger_bench.py --facts 10000 --rows 100000            # quicker
    python benchmarks/ledger_bench.py --pg postgresql+psycopg://postgres@127.0.0.1:5432/bench   # also on PostgreSQL

Targets (issue 2): `add --from` of 100,000 JSONL facts on SQLite < 30 s (a real `horse-ledger` process,
fresh database, migrations included); `list --status pending --limit 50` and `claim_batch(1000)` with
1,000,000 rows in `edits` < 0.2 s each (median of --repeats runs). Results are printed and written as
JSON to benchmarks/results/ledger_bench.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import secrets
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from click.testing import CliRunner  # noqa: E402

from ledger.cli import cli  # noqa: E402
from ledger.store import Store  # noqa: E402

STATUS_MIX = [("applied", 0.80), ("pending", 0.10), ("superseded", 0.04), ("rolled_back", 0.02),
              ("cancelled", 0.02), ("failed", 0.02)]


def write_facts(path: Path, n: int) -> None:
    rng = random.Random(0)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n):
            fh.write(json.dumps({"subject": f"Person {i}", "prompt": "The mother tongue of {} is",
                                 "target": rng.choice(["English", "French", "German", "Italian", "Japanese"]),
                                 "paraphrases": [f"Person {i} grew up speaking"], "source": "benchmark"}) + "\n")


def bench_add_from(tmp: Path, n: int) -> float:
    facts = tmp / "facts.jsonl"
    write_facts(facts, n)
    db = tmp / "add.db"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ledger", "--db", f"sqlite:///{db}", "add", "--from", str(facts)],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"add --from failed: {proc.stderr}")
    print(f"  {proc.stdout.strip()}")
    return elapsed


def _rows(n: int, start: int):
    rng = random.Random(1)
    statuses = [s for s, _ in STATUS_MIX]
    weights = [w for _, w in STATUS_MIX]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    for i in range(start, start + n):
        yield (i, f"Person {i}", "The mother tongue of {} is", "English", None, "[]", "bench", None, None, now,
               secrets.token_hex(32), secrets.token_hex(32), rng.choices(statuses, weights)[0], now, 0)


COLUMNS = ("id, subject, prompt, target_new, target_true, paraphrases, source, author, note, submitted_at, "
           "content_hash, key_hash, status, updated_at, attempts")


def fill_sqlite(path: Path, n: int) -> None:
    Store(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    marks = ", ".join("?" * 15)
    conn.executemany(f"INSERT INTO edits ({COLUMNS}) VALUES ({marks})", _rows(n, 1))
    conn.commit()
    conn.execute("ANALYZE")
    conn.close()


def fill_postgres(url: str, n: int) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    Store(url).close()
    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database) as conn:
        with conn.cursor() as cur:
            cur.execute("TRUNCATE edits, events, batches RESTART IDENTITY CASCADE")
            with cur.copy(f"COPY edits ({COLUMNS}) FROM STDIN") as copy:
                for row in _rows(n, 1):
                    copy.write_row(row)
            cur.execute("SELECT setval(pg_get_serial_sequence('edits', 'id'), %s)", (n,))
            cur.execute("ANALYZE edits")


def median_times(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_queries(url: str, repeats: int) -> dict[str, float]:
    runner = CliRunner()
    store = Store(url)
    out = {}

    def cli_list() -> None:
        r = runner.invoke(cli, ["--db", url, "list", "--status", "pending", "--limit", "50"])
        assert r.exit_code == 0 and r.stdout.count("\n") == 51, r.output

    cli_list()  # warm the page cache once
    out["list_cli_s"] = median_times(cli_list, repeats)
    out["list_store_s"] = median_times(lambda: store.list_edits(status="pending", limit=50), repeats)

    def claim() -> None:
        batch = store.claim_batch(1000, base_model="bench")
        assert batch is not None and len(batch.edits) == 1000

    out["claim_batch_1000_s"] = median_times(claim, repeats)
    store.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--facts", type=int, default=100_000, help="facts in the add --from file")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows in edits for the query timings")
    ap.add_argument("--repeats", type=int, default=5, help="runs per query timing (median reported)")
    ap.add_argument("--pg", metavar="URL", help="also time the queries on this (emptied!) PostgreSQL database")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "ledger_bench.json")
    args = ap.parse_args()

    results: dict[str, object] = {"machine": f"{platform.machine()}, {platform.processor() or '?'}, "
                                             f"{__import__('os').cpu_count()} CPUs, Python {platform.python_version()}",
                                  "facts": args.facts, "rows": args.rows, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="ledger-bench-") as tmp:
        tmp_path = Path(tmp)
        print(f"add --from {args.facts:,} JSONL facts (SQLite, fresh file, one process) ...")
        results["sqlite_add_from_s"] = round(bench_add_from(tmp_path, args.facts), 2)
        print(f"  {results['sqlite_add_from_s']} s  (target < 30 s)")

        print(f"filling SQLite with {args.rows:,} edits ...")
        t0 = time.perf_counter()
        fill_sqlite(tmp_path / "big.db", args.rows)
        print(f"  filled in {time.perf_counter() - t0:.1f} s")
        q = bench_queries(f"sqlite:///{tmp_path / 'big.db'}", args.repeats)
        results["sqlite"] = {k: round(v, 4) for k, v in q.items()}
        print(f"  sqlite: {results['sqlite']}  (target < 0.2 s each)")

        if args.pg:
            print(f"filling PostgreSQL with {args.rows:,} edits ...")
            fill_postgres(args.pg, args.rows)
            q = bench_queries(args.pg, args.repeats)
            results["postgresql"] = {k: round(v, 4) for k, v in q.items()}
            print(f"  postgresql: {results['postgresql']}  (target < 0.2 s each)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
