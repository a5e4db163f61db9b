"""Where to put the routed gate's fluency bar (`gate_max_subject_perplexity`): the perplexity ratio (candidate /
head) of text naming an edited subject, measured per subject on one default night of CounterFact validation facts
with the bar off (the same night also gives the same-subject agreement's distribution).

    python benchmarks/studies/subject_fluency.py --n 200     # benchmarks/results/studies/subject-fluency-200.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def quantiles(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"n": len(xs), "median": statistics.median(xs), "p90": pick(0.9), "p95": pick(0.95), "p99": pick(0.99),
            "max": xs[-1]}


def main() -> None:
    import torch

    from night_default import one_night

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/studies")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        night = one_night(Path(tmp), args.n, gate_max_subject_perplexity=0.0, keep_metrics=True)
    subjects = night.pop("subjects")
    ratios = [v["subject_perplexity"] for v in subjects.values() if v.get("subject_texts")]
    same = [v["same_subject"] for v in subjects.values() if v.get("same_subject_n")]
    result = {"n": args.n, "night": night, "subject_perplexity": quantiles(ratios), "same_subject": quantiles(same),
              "per_subject": subjects}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"subject-fluency-{args.n}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("subject_perplexity", "same_subject")}, indent=2))


if __name__ == "__main__":
    main()
