"""The preservation prior μ·C of the hypernet's ridge solve (`Editor.set_preservation`) on SmolLM2-135M.

    python benchmarks/studies/preserve_weight.py                 # both parts, CPU, ~25 min
    python benchmarks/studies/preserve_weight.py --small-only    # part 2 only, ~2 min
    python benchmarks/studies/preserve_weight.py --large-only    # part 3 only, ~15 min

1. Batches of 100 CounterFact *validation* edits (tuning data, never the edit split): for each μ,
   `python -m horse.evalcli --json --data data/counterfact/counterfact-val.json --limit 300 --n-edits 100
   --method horse --preserve-weight μ`, written to benchmarks/results/preserve_weight/val-<μ>.json.
2. Small batches, what the daemon's bisection produces: 1 and 3 well-known facts edited from the base model;
   for each μ, agreement of the greedy next token with the base model on the 200 shipped canary prompts,
   token accuracy of the targets, and whether two protected facts survive. Written to small-batches.json.
3. One batch of 1,000 CounterFact validation edits from the base model, what a consolidation of ten nights
   computes: for a constant μ (exponent 0), token ES of the batch, agreement with the base model's greedy next
   token on the canary prompts, and perplexity on the canary prompts with their answers (the lifelong
   benchmark's fixed text), as a ratio to the base model's. Written to large-batch.json.
The shipped default (`preserve_weight` in the config) is chosen from these numbers; see the README.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "preserve_weight"
WEIGHTS = (0, 10, 30, 100, 300, 1000, 10000)
FACTS = [("Toyota is headquartered in the country of", "Germany"),
         ("The mother tongue of Danielle Darrieux is", "English"),
         ("Lionel Messi plays the sport of", "basketball")]
PROTECTED = [("The capital of France is", "Paris"), ("The capital of Japan is", "Tokyo")]


def val_sweep() -> None:
    for mu in WEIGHTS:
        path = OUT / f"val-{mu}.json"
        if path.exists():
            continue
        proc = subprocess.run([sys.executable, "-m", "horse.evalcli", "--json", "--data",
                               str(ROOT / "data/counterfact/counterfact-val.json"), "--limit", "300", "--n-edits", "100",
                               "--method", "horse", "--preserve-weight", str(mu), "--preserve-exponent", "0"], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        path.write_text(proc.stdout)
        print(f"val μ={mu}: done", flush=True)


def small_batches() -> list[dict]:
    from horse.covariance import preservation_moments
    from horse.deltas import apply_deltas
    from horse.editor import Editor
    from horse.metrics import score_answers
    from horse.tokens import tokenize_prompts
    from horse.types import EditRequest
    from horse.zoo import default_cache_dir, load_model

    model, tok = load_model("smollm2-135m", progress=False)
    editor = Editor.from_checkpoint(ROOT / "horse/hypernets/smollm2-135m-horse.safetensors", model)
    moments, _ = preservation_moments(model, tok, editor.module_names, cache_dir=default_cache_dir())
    canary = [json.loads(line)["prompt"] for line in open(ROOT / "daemon/assets/canary-train.jsonl")]

    def next_ids() -> torch.Tensor:
        out = []
        for i in range(0, len(canary), 50):
            b = tokenize_prompts(tok, canary[i:i + 50])
            with torch.no_grad():
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            last = b.attention_mask.sum(1) - 1
            out.append(logits[torch.arange(len(last)), last].argmax(-1))
        return torch.cat(out)

    base = next_ids()
    reqs = [EditRequest(prompt=p, target=t) for p, t in FACTS]
    rows = []
    for n in (1, 3):
        for mu in WEIGHTS:
            editor.set_preservation(moments, mu)
            deltas, _ = editor.compute_deltas(model, tok, reqs[:n])
            with apply_deltas(model, deltas):
                agreement = float((next_ids() == base).float().mean())
                _, acc = score_answers(model, tok, [r.prompt for r in reqs[:n]], [r.target for r in reqs[:n]])
                _, kept = score_answers(model, tok, [p for p, _ in PROTECTED], [a for _, a in PROTECTED])
            rows.append({"n_edits": n, "mu": mu, "canary_agreement": agreement, "target_token_acc": acc.tolist(),
                         "protected_token_acc": kept.tolist(),
                         "max_layer_delta_norm": max(float(d.to_dense().norm()) for d in deltas.values())})
            print(rows[-1], flush=True)
    return rows


LARGE_WEIGHTS = (0, 1, 10, 100, 1000)


def large_batch(n_edits: int = 1000) -> list[dict]:
    from horse.covariance import preservation_moments
    from horse.data import load_requests
    from horse.deltas import apply_deltas
    from horse.editor import Editor
    from horse.metrics import answer_token_accuracy, next_token_ids, perplexity
    from horse.zoo import default_cache_dir, load_model

    model, tok = load_model("smollm2-135m", progress=False)
    editor = Editor.from_checkpoint(ROOT / "horse/hypernets/smollm2-135m-horse.safetensors", model)
    moments, _ = preservation_moments(model, tok, editor.module_names, cache_dir=default_cache_dir())
    rows_canary = [json.loads(line) for line in open(ROOT / "daemon/assets/canary-train.jsonl")]
    canary = [r["prompt"] for r in rows_canary]
    texts = [f"{r['prompt']} {r['answer']}." for r in rows_canary]
    reqs = load_requests(ROOT / "data/counterfact/counterfact-val.json", limit=n_edits)
    base_next, base_ppl = next_token_ids(model, tok, canary), perplexity(model, tok, texts)
    rows = []
    for mu in LARGE_WEIGHTS:
        editor.set_preservation(moments, mu, 0.0)
        deltas, _ = editor.compute_deltas(model, tok, reqs)
        with apply_deltas(model, deltas):
            acc = answer_token_accuracy(model, tok, [r.prompt for r in reqs], [r.target for r in reqs]).float()
            rows.append({"n_edits": len(reqs), "mu": mu, "token_es": float((acc >= 0.5).float().mean()),
                         "token_acc": float(acc.mean()),
                         "canary_agreement": float((next_token_ids(model, tok, canary) == base_next).float().mean()),
                         "perplexity_ratio": perplexity(model, tok, texts) / base_ppl,
                         "max_layer_delta_norm": max(d.frobenius_norm() for d in deltas.values())})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small-only", action="store_true")
    p.add_argument("--large-only", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    if args.large_only:
        (OUT / "large-batch.json").write_text(json.dumps(large_batch(), indent=2))
        return
    if not args.small_only:
        val_sweep()
    (OUT / "small-batches.json").write_text(json.dumps(small_batches(), indent=2))
    print(f"{'μ':>6} {'ES':>6} {'PS':>6} {'NS':>6} {'Score':>6} {'tokES':>6}   (CounterFact val, batches of 100)")
    for mu in WEIGHTS:
        path = OUT / f"val-{mu}.json"
        if path.exists():
            e = json.loads(path.read_text())["edited"]
            print(f"{mu:>6} " + " ".join(f"{100 * e[k]:6.1f}" for k in ("cf_es", "cf_ps", "cf_ns", "cf_score", "token_es")))


if __name__ == "__main__":
    main()
