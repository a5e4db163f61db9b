"""Speed of fine-tune-the-ledger (and of the hybrid's folds): the replayed trained blocks against full passes.

    python benchmarks/studies/finetune_speed.py                       # 100 val edits, 3 repeats, 1 thread
    python benchmarks/studies/finetune_speed.py --edits 300 --repeats 5 --threads 2

`horse.finetune.FineTuner` captures the input of the first trained block once per fixed forward of the
training and runs only the trained blocks and the LM head at the scored positions on every step
(`horse/replay.py`). Its fallback, for models the replay does not reproduce, runs the whole model on every step.
This script times both on the same edits (CounterFact **val**, SmolLM2-135M, the config's fine-tune settings),
alternating them so that both see the same load on a shared machine, and reports the median seconds of each and
their ratio; the two deltas are compared too (largest difference relative to the largest delta entry: the
replay is an optimisation, not another method). JSON to benchmarks/results/edit_quality/speed/finetune_replay.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
VAL = ROOT / "data" / "counterfact" / "counterfact-val.json"
OUT = ROOT / "benchmarks" / "results" / "edit_quality" / "speed" / "finetune_replay.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    if args.edits < 1 or args.repeats < 1:
        sys.exit("--edits and --repeats must be ≥ 1")
    torch.set_num_threads(args.threads)

    import horse.finetune as finetune
    from daemon.materialise import load_base
    from horse.data import load_requests
    from ledger.config import load_settings

    settings = load_settings(environ={})
    model, tok = load_base(settings)
    requests = load_requests(VAL)[:args.edits]
    config = finetune.FinetuneConfig(epochs=settings.finetune_epochs, lr=settings.finetune_lr,
                                     locality_weight=settings.finetune_locality_weight,
                                     swap_weight=settings.finetune_swap_weight)
    replayable = finetune.replayable
    seconds: dict[str, list[float]] = {"replay": [], "full": []}
    deltas: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for mode in ("replay", "full"):
            finetune.replayable = replayable if mode == "replay" else (lambda model: False)
            try:
                tuner = finetune.FineTuner.new(model, config)
                t = time.perf_counter()
                deltas[mode], timings = tuner.compute_deltas(model, tok, requests)
                seconds[mode].append(time.perf_counter() - t)
            finally:
                finetune.replayable = replayable
            print(json.dumps({"repeat": repeat, "mode": mode, "seconds": round(seconds[mode][-1], 2),
                              **{k: round(v, 2) for k, v in timings.items()}, **tuner.last_run}), flush=True)
    rel = max(float((deltas["replay"][n].dense_KV - deltas["full"][n].dense_KV).abs().max()
                    / deltas["full"][n].dense_KV.abs().max()) for n in deltas["full"])
    med = {m: statistics.median(s) for m, s in seconds.items()}
    result = {"edits": args.edits, "repeats": args.repeats, "threads": args.threads, "data": "counterfact-val",
              "finetune": {"epochs": config.epochs, "lr": config.lr, "locality_weight": config.locality_weight,
                           "swap_weight": config.swap_weight},
              "seconds": {m: [round(x, 2) for x in s] for m, s in seconds.items()},
              "median_s": {m: round(v, 2) for m, v in med.items()},
              "full_over_replay": round(med["full"] / med["replay"], 2),
              "max_rel_delta_difference": rel, "host": platform.node(), "machine": platform.machine(),
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "full_over_replay", "max_rel_delta_difference")}))


if __name__ == "__main__":
    main()
