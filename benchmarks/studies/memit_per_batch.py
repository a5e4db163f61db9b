"""MEMIT's one-shot rows of `benchmarks/edit_quality.py`, one child process per batch of 100 (resumable batch by
batch: on a 2-core CPU one MEMIT batch of 100 takes ~10-15 min, mostly its z optimisation), merged into the run
JSON `edit_quality.py` writes (same fields; per-case means weighted by their counts), so that
`python benchmarks/edit_quality.py --report-only --out OUT` tables them beside the other methods' runs.

Each batch is edited from the unedited model, so the batches are independent and the merged numbers are those of
one `edit_quality.py` run over the same records. The subset studied with it (first 300 CounterFact edit-1k
records, first 100 zsRE eval records) and the other methods on the same records:

    python benchmarks/edit_quality.py --methods none,horse,malmen --sizes 100 --limit 300 --zsre-limit 100 \\
        --spreads '' --sequential '' --out benchmarks/results/edit_quality/first-300
    python benchmarks/studies/memit_per_batch.py --cf-limit 300 --zsre-limit 100 \\
        --out benchmarks/results/edit_quality/first-300
    python benchmarks/edit_quality.py --report-only --out benchmarks/results/edit_quality/first-300
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.edit_quality import CF, ZSRE, machine, run_child  # noqa: E402
from horse.metrics import harmonic_mean  # noqa: E402

BATCH = 100
CF_WEIGHTS = {"cf_es": "n_es", "cf_es_mag": "n_es", "cf_ps": "n_ps", "cf_ps_mag": "n_ps", "cf_ns": "n_ns",
              "cf_ns_mag": "n_ns"}


def merge_summary(parts: list[dict]) -> dict:
    """Per-batch summaries → one: means weighted by each metric's count, counts summed, Score recomputed."""
    out: dict[str, float] = {}
    for key in parts[0]:
        if key.startswith("n_") or key == "cf_score":
            continue
        weights = [p[CF_WEIGHTS.get(key, "n_requests")] for p in parts]
        out[key] = sum(p[key] * w for p, w in zip(parts, weights)) / sum(weights)
    for key in ("n_es", "n_ps", "n_ns", "n_requests"):
        out[key] = sum(p[key] for p in parts)
    out["cf_score"] = harmonic_mean([out["cf_es"], out["cf_ps"], out["cf_ns"]])
    return out


def merge(reports: list[dict], data: Path, n_records: int) -> dict:
    times = [t for r in reports for t in r["edit_time_s"]["per_batch"]]
    stages = sorted({k for r in reports for k in r["edit_time_s"]["stages_median"]})
    merged = {k: reports[0][k] for k in ("device", "dtype", "layers", "method", "model")}
    merged.update({
        "data": str(data), "n_requests": n_records, "n_edits": BATCH, "n_batches": len(reports),
        "unedited": merge_summary([r["unedited"] for r in reports]),
        "edited": merge_summary([r["edited"] for r in reports]),
        "edit_time_s": {"median": statistics.median(times), "total": sum(times), "per_batch": times,
                        "stages_median": {k: statistics.median(r["edit_time_s"]["stages_median"].get(k, 0.0)
                                                               for r in reports) for k in stages}},
        "delta_frobenius_sum_median": statistics.median(r["delta_frobenius_sum_median"] for r in reports),
        "method_info_per_batch": [m for r in reports for m in r["method_info_per_batch"]],
        "wall_s": sum(r["wall_s"] for r in reports), "peak_rss_mib": max(r["peak_rss_mib"] for r in reports),
        "machine": machine("cpu"), "date": str(date.today()), "jobs": 1,
        "run_as": "benchmarks/studies/memit_per_batch.py: one child per batch of 100, merged"})
    return merged


def run(name: str, data: Path, limit: int, out: Path, model: str) -> None:
    records = json.loads(data.read_text())[:limit]
    slices = out / "memit-batches"
    slices.mkdir(parents=True, exist_ok=True)
    reports = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(0, len(records) - len(records) % BATCH, BATCH):
            part = Path(tmp) / f"{name}.{i // BATCH:02d}.data.json"
            part.write_text(json.dumps(records[i:i + BATCH]))
            cmd = [sys.executable, "-m", "horse.evalcli", "--json", "--model", model, "--device", "cpu",
                   "--data", str(part), "--n-edits", str(BATCH), "--method", "memit"]
            reports.append(run_child(slices / f"{name}.{i // BATCH:02d}.json", cmd, {}))
    (out / f"{name}.json").write_text(json.dumps(merge(reports, data, len(reports) * BATCH), indent=2,
                                                 sort_keys=True))
    print(f"{name}: {len(reports)} batches merged", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/edit_quality/first-300")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cf-limit", type=int, default=300, help="first CounterFact edit-1k records (whole batches)")
    p.add_argument("--zsre-limit", type=int, default=100, help="first zsRE eval records (whole batches)")
    args = p.parse_args()
    run(f"cf-{BATCH}-memit", CF, args.cf_limit, args.out, args.model)
    run(f"zsre-{BATCH}-memit", ZSRE, args.zsre_limit, args.out, args.model)


if __name__ == "__main__":
    main()
