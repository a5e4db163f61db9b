"""Locality of fine-tune-the-ledger (and of the hybrid's fine-tune folds): what its locality terms buy.

    python benchmarks/studies/finetune_locality.py                          # 500 val edits, the settings below
    python benchmarks/studies/finetune_locality.py --edits 300 --grid 1:0,1:1,1:3,3:0 --threads 1

Fine-tune-the-ledger keeps almost every edit and moves the edits' neighbours with them (NS 37–44 against 68.4
unedited in the lifelong runs): it learns "this relation → the new answer" as much as "this subject's relation →
the new answer". Two terms push back (`horse/finetune.py`): `locality_weight`, the KL to the base model on 64
fixed unrelated corpus prompts, and `swap_weight`, the KL (over the base's top 64 tokens) on each edit's prompt
asked of another edit's subject. On CounterFact **val** (tuning only), the base fine-tuned on the first
`--edits` edits with the config's epochs and lr, for each `locality:swap` pair of `--grid`: token ES of the edits,
paraphrase and neighbourhood token accuracy (`token_gs`, `token_ls`), NS (P(true) > P(new) on the
neighbourhood prompts), canary agreement with the base (first 100 canary prompts), perplexity ratio on the canary
texts, and the fine-tune's seconds. `--swap-partners neighbours` (an experiment, not the engine's behaviour) asks
each edit's prompt of a CounterFact **train** subject whose true answer is the edit's old answer (the subjects
CounterFact's neighbourhood prompts are made of; the canary's own records left out), falling back to another edit's
subject. One JSON line per setting, and all of them in
benchmarks/results/edit_quality/tuning/finetune_locality.json. Fine-tunes are cached in
~/.cache/horse-ledger/variants/.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
VAL = ROOT / "data" / "counterfact" / "counterfact-val.json"
CACHE = Path.home() / ".cache" / "horse-ledger" / "variants"
OUT = ROOT / "benchmarks" / "results" / "edit_quality" / "tuning" / "finetune_locality.json"
# in the cache names: 2 = fixed mini-batches replayed from the first trained block (2026-11-27); "" before;
# 3 = the canary's prompts never locality prompts (as the daemon does since 2026-11-27)
ENGINE_REVISION = "3"


def parse_grid(text: str) -> list[tuple[float, float]]:
    """"1:0,1:3" → [(1.0, 0.0), (1.0, 3.0)]: (locality_weight, swap_weight) pairs, each ≥ 0."""
    pairs = []
    for item in text.split(","):
        try:
            loc, swap = (float(x) for x in item.split(":"))
        except ValueError:
            sys.exit(f"--grid item {item!r}: give locality:swap weights, e.g. 1:0,1:3")
        if loc < 0 or swap < 0:
            sys.exit(f"--grid item {item!r}: weights must be ≥ 0")
        pairs.append((loc, swap))
    return pairs


def neighbour_swaps(train_path: Path, canary_path: Path):
    """A `subject_swaps` replacement: per edit, its prompt asked of a train subject with the same true answer."""
    import collections
    import random

    from horse.finetune import subject_swaps

    bank: dict[str, set[str]] = collections.defaultdict(set)
    for rec in train_outside_canary(train_path, canary_path):
        bank[rec["ground_truth"]].add(rec["subject"])

    def swaps(requests, seed):
        edited, rng = {r.prompt for r in requests}, random.Random(seed)
        out = subject_swaps(requests, seed)  # the fallback
        for i, r in enumerate(requests):
            others = sorted(bank.get(r.target_true or "", set()) - {r.subject})
            if not (r.subject and r.subject in r.prompt and others):
                continue
            for other in rng.sample(others, min(4, len(others))):
                prompt = r.prompt.replace(r.subject, other, 1)
                if prompt not in edited:
                    out[i] = prompt
                    break
        return out

    return swaps


def train_outside_canary(train_path: Path, canary_path: Path) -> list[dict]:
    """CounterFact train records, less those the canary's relation prompts were made of."""
    canary = {json.loads(line)["source"] for line in canary_path.read_text().splitlines() if line.strip()}
    return [rec for i, rec in enumerate(json.loads(train_path.read_text()))
            if not {f"counterfact-train:{i}", f"counterfact-train:{rec['case_id']}"} & canary]


@torch.no_grad()
def relation_moments(model, tok, modules, prompts, *, batch_size: int = 64, shrinkage: float = 1e-2) -> dict:
    """Shrunk second moments C = E[k kᵀ] (K×K, float64) of each module's input at the last token of `prompts`
    (relation prompts of other subjects: where the model states their answer), for `FineTuner.set_preservation`."""
    from horse.covariance import second_moment_KK, shrink_KK
    from horse.hooks import record_keys
    from horse.tokens import tokenize_prompts

    keys: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    for start in range(0, len(prompts), batch_size):
        pb = tokenize_prompts(tok, prompts[start:start + batch_size])
        last_BT = torch.zeros_like(pb.attention_mask, dtype=torch.bool)
        last_BT[torch.arange(last_BT.shape[0]), pb.last_index_B] = True
        with record_keys(model, modules, last_BT, keep_outputs=False) as captured:
            model(input_ids=pb.input_ids, attention_mask=pb.attention_mask, use_cache=False)
        for name in modules:
            keys[name] += captured[name].keys_NK
    return {name: shrink_KK(second_moment_KK(torch.cat(keys[name])), shrinkage) for name in modules}


def layer_modules(model, layers: str) -> tuple[str, ...]:
    """"3-8" → the MLP output linears of blocks 3..8; "" → () (the engine's default, the last six)."""
    from horse.arch import block_mlp_out_modules
    from horse.errors import EngineError
    from ledger.config import ConfigError, parse_blocks

    try:
        blocks = parse_blocks(layers)
        return tuple(block_mlp_out_modules(model, *blocks)) if blocks else ()
    except (ConfigError, EngineError) as exc:
        sys.exit(f"--layers: {exc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--edits", type=int, default=500, help="val edits fine-tuned in")
    p.add_argument("--grid", default="1:0,1:1,1:3,3:0", help="locality:swap weight pairs, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--swap-partners", choices=("ledger", "neighbours"), default="ledger",
                   help="whose subjects the swapped prompts ask about (see above)")
    p.add_argument("--layers", default="",
                   help="trained blocks as FIRST-LAST, e.g. 3-8 (an experiment; default: the last six, the engine's)")
    p.add_argument("--swap-resample", action="store_true", help="a new swap partner per edit each epoch")
    p.add_argument("--n-locality", type=int, default=None,
                   help="locality prompts (default: the config's 64)")
    p.add_argument("--locality-batch", type=int, default=None, help="locality prompts per step (default 16)")
    p.add_argument("--divergence", choices=("forward", "reverse", "symmetric"), default="forward",
                   help="of the locality term (FinetuneConfig.divergence)")
    p.add_argument("--preserve", type=float, default=0.0,
                   help="FinetuneConfig.preserve_weight (the layers' output change on corpus inputs; 0 = off)")
    p.add_argument("--preserve-on", choices=("corpus", "relations"), default="corpus",
                   help="whose inputs --preserve keeps: the local corpus (the engine's) or the last token of 4,000 "
                        "CounterFact train relation prompts of other subjects (canary records left out; an experiment)")
    p.add_argument("--preserve-rank", type=int, default=256,
                   help="FinetuneConfig.preserve_rank: the moments' top directions the term keeps (0 = all)")
    p.add_argument("--lr", type=float, default=None, help="Adam lr (default: the config's finetune_lr)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the config's finetune_epochs)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    grid = parse_grid(args.grid)
    if args.edits < 2:
        sys.exit("--edits must be ≥ 2")
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file, save_file

    from benchmarks.canary import CanaryProbe
    from daemon.materialise import load_base
    from horse.data import load_requests
    from horse.deltas import LayerDelta, apply_deltas
    import horse.finetune
    from horse.finetune import FinetuneConfig, FineTuner
    from horse.metrics import request_scores, summarise_scores
    from ledger.config import load_settings

    if args.swap_partners == "neighbours":
        horse.finetune.subject_swaps = neighbour_swaps(ROOT / "data" / "counterfact" / "counterfact-train.json",
                                                       ROOT / "daemon" / "assets" / "canary-train.jsonl")
    settings = load_settings(environ={})
    model, tok = load_base(settings)
    requests = load_requests(VAL)[:args.edits]
    canary = CanaryProbe.on_base(model, tok, limit=100)

    def measure() -> dict:
        sc = summarise_scores(request_scores(model, tok, requests, batch_size=64))
        row = {k: round(sc[k], 4) for k in ("token_es", "token_gs", "token_ls", "cf_es", "cf_ns")}
        row["canary"] = round(canary.agreement(model, tok), 3)
        row["ppl_x"] = round(canary.perplexity_ratio(model, tok), 3)
        return row

    CACHE.mkdir(parents=True, exist_ok=True)
    unedited = CACHE / f"val-unedited{ENGINE_REVISION}-{args.edits}.json"  # the same for every setting
    if not unedited.exists():
        unedited.write_text(json.dumps(measure()))
    rows = [{"setting": "unedited", **json.loads(unedited.read_text())}]
    print(json.dumps(rows[0]), flush=True)
    modules = layer_modules(model, args.layers)
    pool = {"n_locality": args.n_locality, "locality_batch": args.locality_batch or 16} if args.n_locality else {}
    canary_prompts = [json.loads(line)["prompt"]
                      for line in (ROOT / "daemon" / "assets" / "canary-train.jsonl").read_text().splitlines()]
    epochs = args.epochs or settings.finetune_epochs
    lr = args.lr or settings.finetune_lr
    for loc, swap in grid:
        config = FinetuneConfig(module_names=modules, epochs=epochs, lr=lr, locality_weight=loc, swap_weight=swap,
                                swap_resample=args.swap_resample, divergence=args.divergence, preserve_weight=args.preserve,
                                preserve_rank=args.preserve_rank, **pool)
        tuner = FineTuner.new(model, config, held_out=canary_prompts)  # as the daemon does
        if args.preserve and args.preserve_on == "relations":
            train = train_outside_canary(ROOT / "data" / "counterfact" / "counterfact-train.json",
                                         ROOT / "daemon" / "assets" / "canary-train.jsonl")
            tuner.set_preservation(relation_moments(model, tok, tuner.module_names,
                                                    [r["prompt"] for r in train[:4000]]))
        elif args.preserve:
            from horse.covariance import preservation_moments

            tuner.set_preservation(preservation_moments(model, tok, tuner.module_names,
                                                        cache_dir=settings.cache_dir)[0])
        partners = "-neighbours" if args.swap_partners == "neighbours" else ""
        where = ((f"-L{args.layers}" if args.layers else "") + ("-resample" if args.swap_resample else "")
                 + (f"-pool{args.n_locality}x{pool['locality_batch']}" if pool else "")
                 + (f"-{args.divergence}" if args.divergence != "forward" else "")
                 + (f"-preserve{args.preserve:g}-r{args.preserve_rank}" if args.preserve else "")
                 + ("-on-relations" if args.preserve and args.preserve_on == "relations" else ""))
        cached = CACHE / (f"val-finetune{ENGINE_REVISION}{partners}{where}-{args.edits}-e{config.epochs}"
                          f"-lr{config.lr:g}-loc{loc:g}-swap{swap:g}-{tuner.fingerprint[:12]}.safetensors")
        t = time.perf_counter()
        if cached.exists():
            deltas = {k: LayerDelta(dense_KV=v) for k, v in load_file(str(cached)).items()}
            seconds = json.loads(cached.with_suffix(".json").read_text())["seconds"]
        else:
            deltas, _ = tuner.compute_deltas(model, tok, requests)
            seconds = round(time.perf_counter() - t, 1)
            save_file({k: v.to_dense().contiguous() for k, v in deltas.items()}, str(cached))
            cached.with_suffix(".json").write_text(json.dumps({"seconds": seconds, **tuner.last_run}))
        with apply_deltas(model, deltas):
            row = {"setting": f"locality {loc:g}, swap {swap:g}" + (", neighbour subjects" if partners else "")
                   + (f", blocks {args.layers}" if args.layers else "")
                   + (", partners resampled each epoch" if args.swap_resample else "")
                   + (f", {args.n_locality} locality prompts, {pool['locality_batch']} a step" if pool else "")
                   + (f", {args.divergence} KL on the locality prompts" if args.divergence != "forward" else "")
                   + (f", preserve {args.preserve:g} (rank {args.preserve_rank or 'all'})" if args.preserve else "")
                   + (" on relation prompts" if args.preserve and args.preserve_on == "relations" else ""),
                   "locality_weight": loc, "swap_weight": swap, "layers": args.layers or "last 6",
                   "lr": lr, "epochs": epochs,
                   "finetune_s": seconds, **measure()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"edits": args.edits, "data": "counterfact-val", "epochs": epochs,
                                    "lr": lr, "threads": args.threads,
                                    "swap_partners": args.swap_partners, "host": platform.node(),
                                    "torch": torch.__version__, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
