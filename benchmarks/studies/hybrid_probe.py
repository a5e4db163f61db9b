"""Does a HORSE night work on a fine-tuned head? The question behind the hybrid (`consolidate_engine = finetune`).

    python benchmarks/studies/hybrid_probe.py                         # fold 500 val edits, a night of the next 100
    python benchmarks/studies/hybrid_probe.py --protect 0,1,10 --threads 1

The hybrid runs cheap HORSE nights on the head (`hypernet_from_base = false`) and folds the ledger every few
nights by fine-tuning the base on every carried edit (fine-tune-the-ledger as the consolidation engine). It only
pays if a HORSE night on the fine-tuned head (a) takes as on the base and (b) leaves the folded edits alone. On
CounterFact **val** (tuning only), with the config's defaults (shipped hypernet, μ floor, fine-tune epochs / lr /
locality weight), this script measures:

1. the night (`--night` edits after the fold's) edited by HORSE on the base: its token accuracy (efficacy);
2. the fold: the base fine-tuned on the first `--fold` val edits (cached in ~/.cache/horse-ledger/variants/):
   retention of them, and the night's edits before they are edited;
3. the night edited by HORSE on the folded head, for each `--protect` ν: the prior ν·KₑᵀKₑ on the folded
   edits' keys captured at the folded head (what `protect_earlier` does in the daemon, there on the gate's
   retention sample): efficacy of the night, retention of the fold.

Each line: token ES of each set (A = fold, B = night), NS, canary agreement with the base (first 100 canary
prompts) and perplexity ratio on the canary texts. Findings: README, "Fine-tune folds and HORSE nights".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
VAL = ROOT / "data" / "counterfact" / "counterfact-val.json"
CACHE = Path.home() / ".cache" / "horse-ledger" / "variants"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fold", type=int, default=500, help="val edits fine-tuned into the fold")
    p.add_argument("--night", type=int, default=100, help="val edits of the HORSE night after them")
    p.add_argument("--protect", default="0,1", help="ν values of the prior on the fold's keys")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        nus = [float(x) for x in args.protect.split(",")]
    except ValueError:
        sys.exit(f"--protect {args.protect!r}: give ν values separated by commas, e.g. 0,1,10")
    if args.fold < 1 or args.night < 1 or any(nu < 0 for nu in nus):
        sys.exit("--fold and --night must be ≥ 1 and every ν ≥ 0")
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file, save_file

    from benchmarks.canary import CanaryProbe
    from daemon.cycle import hypernet_path, load_editor
    from daemon.materialise import load_base
    from horse.data import load_requests
    from horse.deltas import LayerDelta, apply_deltas
    from horse.finetune import FinetuneConfig, FineTuner
    from horse.metrics import request_scores, summarise_scores
    from ledger.config import load_settings

    settings = load_settings(environ={})
    model, tok = load_base(settings)
    editor = load_editor(settings, hypernet_path(settings), model, tok)
    requests = load_requests(VAL)
    if len(requests) < args.fold + args.night:
        sys.exit(f"CounterFact val has {len(requests)} records, fewer than --fold + --night")
    fold, night = requests[:args.fold], requests[args.fold:args.fold + args.night]
    canary = CanaryProbe.on_base(model, tok, limit=100)

    def measure(tag: dict, sets: dict) -> None:
        row = dict(tag)
        for name, rs in sets.items():
            sc = summarise_scores(request_scores(model, tok, rs, batch_size=64))
            row[f"{name}_token_es"], row[f"{name}_ns"] = round(sc["token_es"], 4), round(sc["cf_ns"], 4)
        row["canary"] = round(canary.agreement(model, tok), 3)
        row["ppl_x"] = round(canary.perplexity_ratio(model, tok), 2)
        print(json.dumps(row), flush=True)

    t = time.perf_counter()
    deltas, _ = editor.compute_deltas(model, tok, night)
    with apply_deltas(model, deltas):
        measure({"step": "HORSE night on the base", "s": round(time.perf_counter() - t, 1)}, {"B": night})

    tuner_config = FinetuneConfig(epochs=settings.finetune_epochs, lr=settings.finetune_lr,
                                  locality_weight=settings.finetune_locality_weight)
    CACHE.mkdir(parents=True, exist_ok=True)
    cached = CACHE / (f"val-finetune-{args.fold}-e{tuner_config.epochs}-lr{tuner_config.lr:g}"
                      f"-loc{tuner_config.locality_weight:g}-{editor.fingerprint[:12]}.safetensors")
    t = time.perf_counter()
    if cached.exists():
        folded = {k: LayerDelta(dense_KV=v) for k, v in load_file(str(cached)).items()}
    else:
        folded, _ = FineTuner.new(model, tuner_config).compute_deltas(model, tok, fold)
        save_file({k: v.to_dense().contiguous() for k, v in folded.items()}, str(cached))
    with apply_deltas(model, folded):
        measure({"step": "fold (fine-tune)", "s": round(time.perf_counter() - t, 1), "cached": cached.name},
                {"A": fold, "B": night})
        keys = editor.requests_second_moments(model, tok, fold)
        for nu in nus:
            editor.set_protected_keys(keys, nu)
            t = time.perf_counter()
            deltas, _ = editor.compute_deltas(model, tok, night)
            with apply_deltas(model, deltas):
                measure({"step": "HORSE night on the fold", "protect": nu, "s": round(time.perf_counter() - t, 1)},
                        {"A": fold, "B": night})


if __name__ == "__main__":
    main()
