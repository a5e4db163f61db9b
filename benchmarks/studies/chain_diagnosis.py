"""Why HORSE applied night after night on its own deltas breaks down (issue 6; README, "Every night from the base").

    python benchmarks/studies/chain_diagnosis.py            # SmolLM2-135M, the shipped HORSE hypernet, CounterFact val

Edits three batches A, B, C of `--n-edits` CounterFact val records one after another (each on the model that
carries the earlier ones: `Editor.compute_deltas`, then `add_deltas_`, no preservation prior) and prints, for
B on the base and on base + A, and for C on base + A + B, per edited layer: the mean norm of the keys, of the
captured output gradients, of the residuals before and after the spread, and the delta's Frobenius norm; then
the token accuracy of each batch after its edit and of A after B.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--hypernet", type=Path, default=ROOT / "horse" / "hypernets" / "smollm2-135m-horse.safetensors")
    p.add_argument("--data", type=Path, default=ROOT / "data" / "counterfact" / "counterfact-val.json")
    p.add_argument("--n-edits", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from horse.data import load_requests
    from horse.deltas import add_deltas_, frobenius_norms
    from horse.editor import Editor, solutions_to_deltas
    from horse.metrics import request_scores, summarise_scores
    from horse.zoo import load_model

    model, tok = load_model(args.model, progress=False)
    editor = Editor.from_checkpoint(args.hypernet, model)
    reqs = load_requests(args.data, limit=3 * args.n_edits)
    a, b, c = (reqs[i * args.n_edits:(i + 1) * args.n_edits] for i in range(3))

    def token_es(batch) -> float:
        return summarise_scores(request_scores(model, tok, batch, batch_size=32))["token_es"]

    def deltas_of(tag: str, batch):
        captured = editor.capture(model, tok, batch)
        pred = editor.predict(captured, n_edits=len(batch))
        deltas = solutions_to_deltas(editor.module_names, pred.solutions)
        norms = frobenius_norms(deltas)
        for i, name in enumerate(editor.module_names):
            mean = lambda t: float(t.norm(dim=1).mean())  # noqa: E731
            print(f"{tag:12} {name}: |k| {mean(captured.keys_NK[name]):8.2f}  |g| {mean(captured.grads_NV[name]):.3e}  "
                  f"|R| {mean(pred.resids_NV[i]):.3e}  |R^| {mean(pred.spread_NV[i]):.3e}  |dW| {norms[name]:9.2f}",
                  flush=True)
        return deltas

    deltas_of("B @ base", b)
    add_deltas_(model, deltas_of("A @ base", a))
    print(f"A after A: token accuracy {token_es(a):.3f}", flush=True)
    add_deltas_(model, deltas_of("B @ base+A", b))
    print(f"B after A, B: {token_es(b):.3f}; A after A, B: {token_es(a):.3f}", flush=True)
    add_deltas_(model, deltas_of("C @ base+AB", c))
    print(f"C after A, B, C: {token_es(c):.3f}", flush=True)


if __name__ == "__main__":
    main()
