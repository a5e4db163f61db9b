"""MEMIT layer sweep on SmolLM2-135M: which window of MLP layers to edit (issue 5).

Edits the first `--n-cases` CounterFact *val* cases (never the edit split) as one batch with MEMIT for each
candidate window of layers, and reports CounterFact ES / PS / NS / Score by probability (`horse.metrics`)
and the edit time. The covariance statistics of all candidate layers are estimated once, in one pass, and
cached. Results go to `benchmarks/results/memit_layers.json` (resumable: windows already there are
skipped) and a markdown table on stdout. The best window by Score is what `horse.memit.SMOLLM2_135M_LAYERS`
holds.

    python benchmarks/studies/memit_layers.py --threads 1           # ~50 cases, 4 windows, 3–11 min each on CPU

Result (2026-11-25, 2-core AMD EPYC shared with other jobs, 1 thread; covariance of the 21 layers 379 s,
N = 30 720 tokens):

| layers | ES % | PS % | NS % | Score % | edit s (50 edits) |
|---|---|---|---|---|---|
| unedited | 36.0 | 42.0 | 70.0 | 45.5 |  |
| 24-29 | 36.0 | 42.0 | 70.0 | 45.5 | 174 |
| 12-17 | 62.0 | 56.0 | 72.0 | 62.7 | 455 |
| 6-11 | 52.0 | 50.0 | 70.0 | 56.1 | 617 |
| 3-8 | 74.0 | 74.0 | 70.0 | 72.6 | 675 |

Chosen: layers 3–8 (`horse.memit.SMOLLM2_135M_LAYERS`).
    python benchmarks/studies/memit_layers.py --windows 3-8 12-17 --n-cases 20
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from horse.covariance import layer_second_moments
from horse.data import load_requests
from horse.deltas import apply_deltas
from horse.memit import MemitConfig, memit_deltas
from horse.metrics import evaluate
from horse.zoo import default_cache_dir, load_model

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WINDOWS = ("24-29", "12-17", "6-11", "3-8")


def _layers(window: str) -> tuple[str, ...]:
    first, last = (int(x) for x in window.split("-"))
    return tuple(f"model.layers.{i}.mlp.down_proj" for i in range(first, last + 1))


def _row(name: str, m: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    t = m.get("edit_s")
    return (f"| {name} | {pct(m['cf_es'])} | {pct(m['cf_ps'])} | {pct(m['cf_ns'])} | {pct(m['cf_score'])} | "
            f"{'' if t is None else f'{t:.0f}'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT / "data/counterfact/counterfact-val.json"))
    ap.add_argument("--n-cases", type=int, default=50)
    ap.add_argument("--windows", nargs="+", default=list(DEFAULT_WINDOWS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/memit_layers.json"))
    ap.add_argument("--cache-dir", default=str(default_cache_dir()))
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default; 1 is far faster on a CPU shared with other jobs)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"windows": {}}
    model, tok = load_model("smollm2-135m", cache_dir=args.cache_dir)
    requests = load_requests(args.data, limit=args.n_cases)
    base = MemitConfig.for_model(model)
    all_layers = sorted({n for w in args.windows for n in _layers(w)}, key=lambda n: int(n.split(".")[2]))

    t0 = time.perf_counter()
    d_k = model.config.intermediate_size
    _, cov_info = layer_second_moments(model, tok, all_layers, cache_dir=args.cache_dir,
                                       n_tokens=base.cov_tokens_per_dim * d_k)
    print(f"covariance of {len(all_layers)} layers: {time.perf_counter() - t0:.0f} s, N = {cov_info.n_tokens}")

    if "unedited" not in results:
        results["unedited"] = evaluate(model, tok, requests, with_generation=False)
    for window in args.windows:
        if window in results["windows"]:
            continue
        config = replace(base, layers=_layers(window))
        started = time.perf_counter()
        deltas, info = memit_deltas(model, tok, requests, config, cache_dir=args.cache_dir)
        edit_s = time.perf_counter() - started
        with apply_deltas(model, deltas):
            metrics = evaluate(model, tok, requests, with_generation=False)
        results["windows"][window] = {**metrics, "edit_s": edit_s,
                                      "info": {k: v for k, v in info.items() if not isinstance(v, list)}}
        print(_row(window, results["windows"][window]), flush=True)
        results["meta"] = {
            "model": "smollm2-135m", "data": Path(args.data).name, "n_cases": len(requests),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, CPU",
            "config": {k: v for k, v in vars(base).items() if k != "layers"},
            "cov_corpus": cov_info.corpus, "cov_n_tokens": cov_info.n_tokens,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str))
    best = max(results["windows"], key=lambda w: results["windows"][w]["cf_score"])
    results["best"] = best
    out.write_text(json.dumps(results, indent=2, default=str))
    print("\n| layers | ES % | PS % | NS % | Score % | edit s |\n|---|---|---|---|---|---|")
    print(_row("unedited", results["unedited"]))
    for window, m in results["windows"].items():
        print(_row(window, m))
    print(f"\nbest by Score: layers {best}")


if __name__ == "__main__":
    main()
