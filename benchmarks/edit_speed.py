"""Wall time of one HORSE edit of N facts, split by stage, against the bare capture pass in the same run.

    python benchmarks/edit_speed.py                                   # smollm2-135m, N = 100 and 1000
    python benchmarks/edit_speed.py --model tiny-llama --n-edits 10 100 --repeats 2   # smoke run

For each N (the first N CounterFact records of data/counterfact/counterfact-edit.json) it times, after
`warmup` untimed runs, `repeats` runs of
- the edit: `Editor.compute_deltas` (capture / hypernet / spread / solve) + `apply_deltas` (apply),
- baseline "naive": forward with full logits, mean CE on the answer tokens, `loss.backward()` into every
  parameter (what the reference implementation's capture does),
- baseline "floor": forward, LM head at the answer positions only, backward stopped at the first edited
  layer, no hooks (the unavoidable part of the capture),
all in the same LM mini-batches, and prints medians and the ratio total / baseline (target ≤ 1.3).
The hypernet is untrained unless --hypernet is given (its timing does not depend on training).
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
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from horse.arch import get_module  # noqa: E402
from horse.data import load_requests  # noqa: E402
from horse.deltas import apply_deltas  # noqa: E402
from horse.editor import Editor, lm_batches  # noqa: E402
from horse.hooks import answer_ce, frozen_parameters  # noqa: E402
from horse.hypernet import HyperConfig  # noqa: E402
from horse.zoo import load_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_capture_s(model, batches, device) -> float:
    """Full logits + CE + loss.backward() over every parameter (reference-style)."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    try:
        for input_ids, attn, labels in batches:
            logits = model(input_ids=input_ids, attention_mask=attn).logits
            mask = labels != -100
            F.cross_entropy(logits[mask].float(), labels[mask]).backward()
        _sync(device)
        return time.perf_counter() - t0
    finally:
        model.zero_grad(set_to_none=True)
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def floor_capture_s(model, module_names, batches, device) -> float:
    """Answer-only LM head, backward to the first edited module's output only, no capture hooks."""
    first = get_module(model, module_names[0])
    holder = {}

    def hook(module, args, output):
        output = output.detach().requires_grad_(True)
        holder["out"] = output
        return output

    t0 = time.perf_counter()
    with frozen_parameters(model), torch.enable_grad():
        handle = first.register_forward_hook(hook)
        try:
            for input_ids, attn, labels in batches:
                loss = answer_ce(model, input_ids, attn, labels)
                torch.autograd.grad(loss, [holder["out"]])
        finally:
            handle.remove()
    _sync(device)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    if args.hypernet:
        editor = Editor.from_checkpoint(args.hypernet, model)
    else:
        editor = Editor.new(model, HyperConfig(rank=args.rank, n_blocks=args.blocks))
    all_requests = load_requests(args.data, limit=max(args.n_edits))
    results = {"model": args.model, "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "lm_batch_size": args.lm_batch_size, "rank": editor.config.rank, "n_blocks": editor.config.n_blocks,
               "repeats": args.repeats, "warmup": args.warmup, "runs": {}}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for n in args.n_edits:
        requests = all_requests[:n]
        batches = lm_batches(tok, [r.prompt for r in requests], [r.target for r in requests], args.lm_batch_size,
                             device)
        stages: dict[str, list[float]] = {}
        for rep in range(args.repeats + args.warmup):  # the first `warmup` runs are not timed
            deltas, timings = editor.compute_deltas(model, tok, requests, lm_batch_size=args.lm_batch_size)
            t0 = time.perf_counter()
            handle = apply_deltas(model, deltas)
            _sync(device)
            timings["apply"] = time.perf_counter() - t0
            handle.remove()
            timings["total"] = sum(timings[k] for k in ("capture", "hypernet", "spread", "solve", "apply"))
            timings["naive_capture"] = naive_capture_s(model, batches, device)
            timings["floor_capture"] = floor_capture_s(model, editor.module_names, batches, device)
            if rep >= args.warmup:
                for k, v in timings.items():
                    stages.setdefault(k, []).append(v)
        med = {k: statistics.median(v) for k, v in stages.items()}
        n_tokens = sum(int((b[2] != -100).sum()) for b in batches)
        med["ratio_total_vs_naive"] = med["total"] / med["naive_capture"]
        med["ratio_total_vs_floor"] = med["total"] / med["floor_capture"]
        results["runs"][str(n)] = {"n_tokens": n_tokens, "median_s": med}
        print(f"N={n} ({n_tokens} answer tokens), medians of {args.repeats} [s]: "
              + ", ".join(f"{k} {med[k]:.3f}" for k in ("capture", "hypernet", "spread", "solve", "apply", "total"))
              + f" | naive capture {med['naive_capture']:.3f} (×{med['ratio_total_vs_naive']:.2f})"
              + f" | floor capture {med['floor_capture']:.3f} (×{med['ratio_total_vs_floor']:.2f})", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=str(ROOT / "data/counterfact/counterfact-edit.json"))
    p.add_argument("--n-edits", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones")
    p.add_argument("--lm-batch-size", type=int, default=25)
    p.add_argument("--rank", type=int, default=1920)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--hypernet", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here")
    args = p.parse_args(argv)
    results = run(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
