"""One night of 100 CounterFact validation facts with the default configuration (routed) against the same night
with the old defaults (one joint delta served unscoped, bisection), each on a fresh SQLite ledger with the
quickstart's protected fact ("The capital of France is → Paris") and its conflicting edit.

    python benchmarks/night_default.py --n 100          # writes benchmarks/results/night/default-100.json

Reports per run: published / failed / rejected / returned, canary agreement on the gate's (new) canary, the
protected fact kept, wall time by stage and the number of gate measurements.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_night(work: Path, n: int, keep_metrics: bool = False, **overrides) -> dict:
    from daemon.cycle import run_batch
    from ledger.config import load_settings
    from ledger.store import Store
    from ledger.errors import LedgerError
    from ledger.validate import validate_edit

    settings = load_settings(environ={}, db_url=f"sqlite:///{work / 'ledger.db'}", model="smollm2-135m",
                             data_dir=str(work), snapshot_dir=str(work / "snapshots"), log_json="false",
                             review="off", batch_max_edits=n + 1, **overrides)
    store = Store(settings.db_url)
    store.add_protected(prompt="The capital of {} is", subject="France", target="Paris", actor="bench")
    records = json.loads((ROOT / "data/counterfact/counterfact-val.json").read_text())
    specs = [validate_edit({"subject": "France", "prompt": "The capital of {} is", "target": "Lyon",
                            "target_true": "Paris"})]
    for r in records:
        if len(specs) > n:
            break
        if r["subject"] not in r["prompt"]:
            continue
        try:
            specs.append(validate_edit({"subject": r["subject"], "prompt": r["prompt"], "target": r["target_new"],
                                        "target_true": r.get("ground_truth"),
                                        "paraphrases": [r["rephrase_prompt"]] if r.get("rephrase_prompt") else []}))
        except LedgerError:  # a record the ledger refuses (e.g. a newline in a paraphrase) is skipped
            continue
    store.add_edits(specs, actor="bench")
    t = time.perf_counter()
    r = run_batch(settings, store)
    wall = time.perf_counter() - t
    gate = (r.metrics or {}).get("gate") or {}
    conflict_rejected = 1 in r.rejected
    return {"scope": settings.scope, "status": r.status, "claimed": len(specs), "published": len(r.applied),
            "failed": len(r.failed), "rejected": len(r.rejected), "returned": len(r.returned),
            "conflict_rejected": conflict_rejected, "innocent_rejected": len(r.rejected) - int(conflict_rejected),
            "canary_agreement": gate.get("canary_agreement"), "protected_flipped": gate.get("protected_flipped"),
            "gate_measurements": (r.metrics or {}).get("gate_measurements",
                                                      len((r.metrics or {}).get("bisect") or [])),
            "wall_s": round(wall, 2), "timings_s": r.timings_s, "rejected_reasons": {str(k): v for k, v in r.rejected.items()},
            "failed_reasons": {str(k): v for k, v in r.failed.items()},
            **({"subjects": (r.metrics or {}).get("subjects") or {}} if keep_metrics else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/night")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    result = {"n": args.n, "threads": args.threads}
    for name, overrides in (("default (routed)", {}), ("old defaults (joint, unscoped)", {"scope": "off"})):
        with tempfile.TemporaryDirectory() as tmp:
            result[name] = one_night(Path(tmp), args.n, **overrides)
        print(name, json.dumps(result[name]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"default-{args.n}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
