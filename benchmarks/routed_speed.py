"""Edit time of one night's batch: per-subject deltas from one batched capture (`horse.subjects`) against
today's joint solve (`Editor.compute_deltas`), on the same requests, alternating, medians of `--reps` runs.

    python benchmarks/routed_speed.py --data data/counterfact/counterfact-val.json --n 100 --reps 3

Target (issue: per-subject deltas): the routed night's edit time within 1.2× of the joint solve's.
Writes benchmarks/results/routed/speed-<n>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


from horse.route import subject_key
from horse.subjects import subject_factors

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routed_quality import setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="data/counterfact/counterfact-val.json")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hypernet", default="horse/hypernets/smollm2-135m-horse.safetensors")
    ap.add_argument("--out", default="benchmarks/results/routed")
    args = ap.parse_args()
    model, tok, reqs, ed = setup(args)
    groups: dict[str, list] = {}
    for r in reqs:
        groups.setdefault(subject_key(r.subject), []).append(r)
    runs: dict[str, list[float]] = {"joint": [], "alone": [], "joint-share": []}
    parts: dict[str, dict] = {}
    for _ in range(args.reps):
        for name in runs:
            t = time.perf_counter()
            if name == "joint":
                _, parts[name] = ed.compute_deltas(model, tok, reqs)
            else:
                _, parts[name] = subject_factors(ed, model, tok, list(groups.values()), solve=name)
            runs[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"n": len(reqs), "subjects": len(groups), "threads": args.threads, "reps": args.reps,
              "seconds": runs, "median_s": med, "parts_last": parts,
              "ratio_alone": med["alone"] / med["joint"], "ratio_joint_share": med["joint-share"] / med["joint"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"speed-{len(reqs)}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
