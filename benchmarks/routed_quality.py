"""Per-subject deltas, served routed: edit quality of solving each subject's edits alone vs taking each subject's
share of a joint solve (issue: per-subject deltas, item 1), against the joint solve served unscoped.

    python benchmarks/routed_quality.py --data data/counterfact/counterfact-edit-1k.json --n 200
    python benchmarks/routed_quality.py --data data/zsre/zsre-eval.json --n 200

Edits are grouped by subject (CounterFact has one edit per subject; same-subject records are grouped), captured in
one batch per `--batch` edits, and served by `horse.route.Router`: ES / PS on each edit's prompt and paraphrases,
NS on its locality prompt (which gets the deltas of whatever edited subjects it names). Writes
benchmarks/results/routed/quality-<data>-<n>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from horse.covariance import preservation_moments
from horse.data import read_records, requests_from_records
from horse.deltas import apply_deltas
from horse.editor import Editor
from horse.metrics import request_scores
from horse.route import Route, RouteTable, Router, subject_key
from horse.subjects import subject_factors
from horse.zoo import default_cache_dir, load_model


def mean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return round(float(x.mean()) * 100, 1) if x.numel() else float("nan")


def routed_scores(model, tok, reqs, groups, factors) -> dict[str, float]:
    table = RouteTable({subject_key(g[0].subject): Route((g[0].subject,), tuple(range(len(g))), f)
                        for g, f in zip(groups, factors)}).index(tok)
    with Router(model, table):
        s = request_scores(model, tok, reqs)
    return {"es": mean(s["es_win"]), "ps": mean(s["ps_win"]), "ns": mean(s["ns_win"])}


def setup(args):
    """SmolLM2, the first `args.n` requests of `args.data`, and the hypernet with the serving prior (1e4/N², min 10)."""
    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m", progress=False)
    model.eval()
    reqs = requests_from_records(read_records(args.data), source=args.data)[:args.n]
    ed = Editor.from_checkpoint(args.hypernet, model)
    moments, _ = preservation_moments(model, tok, ed.module_names, cache_dir=default_cache_dir())
    ed.set_preservation(moments, 1e4, 2.0, 10.0)
    return model, tok, reqs, ed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hypernet", default="horse/hypernets/smollm2-135m-horse.safetensors")
    ap.add_argument("--out", default="benchmarks/results/routed")
    args = ap.parse_args()
    model, tok, reqs, ed = setup(args)
    result: dict = {"data": args.data, "n": len(reqs), "batch": args.batch, "hypernet": args.hypernet}
    base = request_scores(model, tok, reqs)
    result["unedited"] = {"es": mean(base["es_win"]), "ps": mean(base["ps_win"]), "ns": mean(base["ns_win"])}
    joint = {k: [] for k in ("es_win", "ps_win", "ns_win")}
    scores: dict[str, list[dict]] = {"alone": [], "joint-share": []}
    seconds: dict[str, float] = {"joint": 0.0, "alone": 0.0, "joint-share": 0.0}
    for start in range(0, len(reqs), args.batch):
        chunk = reqs[start:start + args.batch]
        t = time.perf_counter()
        deltas, _ = ed.compute_deltas(model, tok, chunk)
        seconds["joint"] += time.perf_counter() - t
        with apply_deltas(model, deltas):
            s = request_scores(model, tok, chunk)
        for k in joint:
            joint[k].append(s[k])
        by_subject: dict[str, list] = {}
        for r in chunk:
            by_subject.setdefault(subject_key(r.subject), []).append(r)
        groups = list(by_subject.values())
        for solve in scores:
            t = time.perf_counter()
            factors, _ = subject_factors(ed, model, tok, groups, solve=solve)
            seconds[solve] += time.perf_counter() - t
            scores[solve].append((len(chunk), routed_scores(model, tok, chunk, groups, factors)))
        print(f"{start + len(chunk)} edits: {seconds}", flush=True)
    result["joint_unscoped"] = {k[:2]: mean(torch.cat(v)) for k, v in joint.items()}
    for solve, parts in scores.items():
        n = sum(p[0] for p in parts)
        result[f"routed_{solve}"] = {k: round(sum(p[0] * p[1][k] for p in parts) / n, 1) for k in ("es", "ps", "ns")}
    result["edit_seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    result["threads"] = args.threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"quality-{Path(args.data).stem}-{len(reqs)}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
