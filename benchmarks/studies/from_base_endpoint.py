"""The head that `hypernet_from_base` publishes after N accumulated edits, measured without running N/100 nights.

    python benchmarks/studies/from_base_endpoint.py                                  # HORSE, 1,000 … 8,000 edits
    python benchmarks/studies/from_base_endpoint.py --method malmen --points 1000,2000,4000
    python benchmarks/studies/from_base_endpoint.py --points 1000 --sample 1000      # check against lifelong.py
    python benchmarks/studies/from_base_endpoint.py --points 8000 --preserve-min 100 # a stronger prior at 8,000
    python benchmarks/studies/from_base_endpoint.py --method finetune --points 8000 --threads 1   # fine-tune-the-ledger

With `hypernet_from_base` every night is one hypernet edit of every applied edit on the base weights, solved
from additive statistics (`horse.sums`). When every edit is applied (lifelong.py sets every gate bar to 0), the
head after night n is therefore a function of the first 100·n edits alone: the solve of their summed
statistics with μ(N) of the config. This script captures the CounterFact edit split's statistics one night
(100 edits, LM mini-batches of 25, as the daemon does) at a time on the base model, adds them up, and at each
point of `--points` solves and measures what lifelong.py's checkpoints measure: retention teacher-forced, by
probability and generated, the same for the first night's edits, NS, canary agreement with the base model (200
prompts), perplexity on the canary texts, the largest layer delta norm. Above `--sample` edits, retention is
measured on an evenly spaced sample (the first night's 100 are always measured whole).

What it leaves out, next to the daemon: the gate (its bars are 0 in lifelong.py, so it would publish every
night anyway), the snapshot files and the ledger. It is the capacity of one from-base solve, not the
pipeline's cost; lifelong.py gives that.

`--method finetune` is fine-tune-the-ledger (`engine = "finetune"`, the config's fine-tune settings): its night n
is one fine-tune of the first 100·n edits from the base, so its head at N edits, and the cost of its night there
(`finetune_s`, the engine's own time), are one fine-tune of N edits. It is also what a hybrid's fold from the
base costs at N. Output: benchmarks/results/lifelong/endpoint-<method>/rows.jsonl
(one row per point, appended as measured: a rerun skips measured points) and run.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "counterfact" / "counterfact-edit.json"
NIGHT = 100  # edits per night, as in lifelong.py


def evenly_spaced(items: list, k: int) -> list:
    """k items spread evenly over `items` (all of them when k ≥ len)."""
    if k >= len(items):
        return list(items)
    return [items[(i * len(items)) // k] for i in range(k)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("horse", "malmen", "finetune"), default="horse")
    p.add_argument("--points", default="1000,2000,4000,8000", help="accumulated edits at which to measure")
    p.add_argument("--sample", type=int, default=1000, help="retained edits measured at each point (at most)")
    p.add_argument("--preserve-min", type=float, default=None, help="config preserve_min (default: the config's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lifelong")
    args = p.parse_args()
    try:
        points = sorted({int(x) for x in args.points.split(",")})
    except ValueError:
        sys.exit(f"--points {args.points!r}: give edit counts separated by commas, e.g. 1000,2000,4000")
    if not points or points[0] < NIGHT or any(x % NIGHT for x in points):
        sys.exit(f"--points must be multiples of {NIGHT} edits (one night), e.g. 1000,2000,4000")
    torch.set_num_threads(args.threads)

    from tqdm.auto import tqdm

    from daemon.cycle import load_editor, load_engine
    from daemon.materialise import load_base
    from horse.cli import file_sha256
    from horse.data import load_requests
    from benchmarks.canary import CanaryProbe
    from ledger.config import load_settings

    finetune = args.method == "finetune"
    hypernet = ROOT / "horse" / "hypernets" / f"smollm2-135m-{'horse' if finetune else args.method}.safetensors"
    settings = load_settings(environ={}, model="smollm2-135m", hypernet=str(hypernet), hypernet_from_base=True,
                             device=args.device, **({"engine": "finetune"} if finetune else {}),
                             **({"preserve_min": args.preserve_min} if args.preserve_min is not None else {}))
    out = args.out / f"endpoint-{args.method}{f'-pmin{args.preserve_min:g}' if args.preserve_min is not None else ''}"
    out.mkdir(parents=True, exist_ok=True)
    info = {"method": args.method, "sample": args.sample, "edits_per_night": NIGHT, **(
        {"finetune": {k: v for k, v in settings.__dict__.items() if k.startswith("finetune_")}} if finetune else
        {"hypernet_sha256": file_sha256(hypernet), "preserve_weight": settings.preserve_weight,
         "preserve_exponent": settings.preserve_exponent, "preserve_min": settings.preserve_min})}
    run_info = out / "run.json"
    if run_info.exists():
        earlier = json.loads(run_info.read_text())
        if any(earlier.get(k) != v for k, v in info.items()):
            sys.exit(f"{out} was measured with other settings ({run_info}); give another --out or delete it")
    else:
        machine = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else \
            f"{platform.machine()} CPU ({os.cpu_count()} cores)"
        run_info.write_text(json.dumps({**info, "started": time.strftime("%Y-%m-%d"), "threads": args.threads,
                                        "machine": machine, "command": " ".join(sys.argv)}, indent=2))
    rows_path = out / "rows.jsonl"
    done = {json.loads(line)["edits"] for line in rows_path.read_text().splitlines()} if rows_path.exists() else set()
    todo = [x for x in points if x not in done]
    if not todo:
        print(f"every point is measured already: {rows_path}")
        return

    model, tok = load_base(settings)
    editor = load_engine(settings, model, tok)[0] if finetune else load_editor(settings, hypernet, model, tok)
    requests = load_requests(DATA, limit=todo[-1])
    if len(requests) < todo[-1]:
        sys.exit(f"the edit split has {len(requests)} records, fewer than {todo[-1]}")
    canary = CanaryProbe.on_base(model, tok)

    def measure(n: int, deltas, extra: dict) -> None:
        row = {**measure_point(model, tok, requests, canary, n, deltas, args.sample, args.eval_batch_size), **extra}
        with rows_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))

    if finetune:
        for n in todo:
            t = time.perf_counter()
            deltas, _ = editor.compute_deltas(model, tok, requests[:n])
            measure(n, deltas, {"finetune_s": round(time.perf_counter() - t, 1), **editor.last_run})
        return

    sums, captured_s = None, 0.0
    for night in tqdm(range(todo[-1] // NIGHT), desc="capture", unit="night"):
        t = time.perf_counter()
        part = editor.edit_sums(model, tok, requests[night * NIGHT:(night + 1) * NIGHT])
        captured_s += time.perf_counter() - t
        sums = part if sums is None else sums + part
        n = (night + 1) * NIGHT
        if n not in todo:
            continue
        t = time.perf_counter()
        deltas = editor.deltas_from_sums(sums)
        measure(n, deltas, {"mu": editor.preserve_mu(n), "capture_s_so_far": round(captured_s, 1),
                            "solve_s": round(time.perf_counter() - t, 2)})


def measure_point(model, tok, requests: list, canary, n: int, deltas, sample: int, batch_size: int) -> dict:
    """What lifelong.py's checkpoints measure, of the base model plus `deltas` after the first n edits (retention on
    `sample` of them evenly spaced, the first night's in full)."""
    from horse.deltas import apply_deltas, frobenius_norms
    from horse.metrics import request_scores, summarise_scores

    retained = evenly_spaced(requests[:n], sample)
    with apply_deltas(model, deltas):
        every = summarise_scores(request_scores(model, tok, retained, batch_size=batch_size, with_generation=True))
        first = summarise_scores(request_scores(model, tok, requests[:NIGHT], batch_size=batch_size,
                                                with_generation=True))
        agree, ppl_ratio = canary.agreement(model, tok), canary.perplexity_ratio(model, tok)
    return {"edits": n, "measured": len(retained), "retention_token": every["token_es"],
            "retention_prob": every["cf_es"], "retention_gen": every["gen_es"], "first_token": first["token_es"],
            "first_prob": first["cf_es"], "first_gen": first["gen_es"], "ps": every["cf_ps"], "ns": every["cf_ns"],
            "canary_agreement_with_base": agree, "perplexity_ratio": ppl_ratio,
            "norm_max": max(frobenius_norms(deltas).values())}


if __name__ == "__main__":
    main()
