"""Two ways to make one large from-base HORSE solve keep more edits, tried on CounterFact val (tuning only).

    python benchmarks/studies/from_base_variants.py refine --passes 3 --mu 10 --mode plain --scale 0.5
    python benchmarks/studies/from_base_variants.py refine --passes 3 --mu 10 --mode anchored
    python benchmarks/studies/from_base_variants.py relation-prior --facts 2000 --mu-rel 0,10,100,1000
    python benchmarks/studies/from_base_variants.py more-layers --first-layer 18 --eta-scale 1,0.7,0.5
    python benchmarks/studies/from_base_variants.py preserve --edits 1900 --mus 10,30,100,300

Both start from the statistics (`horse.sums`) of the first `--edits` val records captured on the base model
(cached under ~/.cache/horse-ledger/variants/) and the solve with a fixed preservation weight μ:

- refine: after the solve Δ, run the hypernet again on base + Δ for the same edits (a second capture) and add
  a correction: "plain" solves the new residuals alone, times `--scale`; "anchored" solves the whole ridge
  problem again with the prior on the total, Δ ← (K'ᵀK' + λI + P)⁻¹ K'ᵀ(R̂' + K'Δ).
- relation-prior: add μ_rel·C_rel to the prior, C_rel the second moment of the edited layers' keys at the
  answer positions of CounterFact *train* facts with their true answers (records behind the canary left out),
  so the solve keeps the relation templates' outputs on other subjects.
- more-layers: edit layers `--first-layer`..29 with the shipped hypernet, the new layers' per-layer parameters
  (block scale / shift, η, λ) copied from its first layer's, every η scaled by each of `--eta-scale`. Each
  layer's solve is its own, so added layers add change on top of the six; the scale shares it out.
- preserve: the plain solve at each fixed μ of `--mus` (how the best preservation floor moves with N).

`--edits` takes one count or several (`2000,4000,8000`): the statistics are captured 100 edits at a time (one
night, as the daemon does) and summed, each point's sums cached, and the variant runs at every point. `--split
train` takes the edits from CounterFact train instead of val (10,000 records, the canary's records left out) to
go beyond val's 1,919; the shipped hypernets were meta-trained on train, so its absolute figures flatter them
(compare variants at the same point, not train against val).

Each line printed: token ES / ES / PS / NS on every (edits/eval)-th edit, perplexity ratio and canary
agreement (first 100 canary prompts). Findings: benchmarks/results/edit_quality/tuning/README.md.
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
TRAIN = ROOT / "data" / "counterfact" / "counterfact-train.json"
CACHE = Path.home() / ".cache" / "horse-ledger" / "variants"


def extended_editor(editor, model, tok, settings, first_layer: int):
    """`editor` over layers first_layer..29: the new layers get its first layer's per-layer parameters, the
    shared blocks and normaliser are its own; the same preservation prior on every layer."""
    from dataclasses import replace

    from horse.covariance import preservation_moments
    from horse.deltas import fingerprint_modules
    from horse.editor import Editor
    from horse.hypernet import HyperNetSet

    first_old = int(editor.module_names[0].split(".")[2])
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(first_layer, first_old)] + editor.module_names
    shapes = [editor.shapes_KV[0]] * len(names)
    config = replace(editor.config, module_names=tuple(names))
    nets = HyperNetSet(config, names, shapes)
    old, extra = editor.nets.state_dict(), len(names) - len(editor.module_names)
    state = {k: old[k].clone() if old[k].shape == v.shape else torch.cat([old[k][:1].expand(extra, *v.shape[1:]), old[k]])
             for k, v in nets.state_dict().items()}  # per-layer tensors are [L, ...]
    nets.load_state_dict(state)
    wider = Editor(config, nets, fingerprint_modules(model, names), shapes)
    moments, _ = preservation_moments(model, tok, names, cache_dir=settings.cache_dir)
    return wider.set_preservation(moments, settings.preserve_weight, settings.preserve_exponent, settings.preserve_min)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=("refine", "relation-prior", "more-layers", "preserve"))
    p.add_argument("--edits", default="1000", help="edit count(s), e.g. 1000 or 2000,4000,8000")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--eval", type=int, default=300)
    p.add_argument("--mu", type=float, default=10.0, help="the preservation weight μ (fixed)")
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--mode", choices=("plain", "anchored"), default="plain")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--facts", type=int, default=2000, help="train facts behind C_rel")
    p.add_argument("--mu-rel", default="0,100,1000")
    p.add_argument("--mus", default="10,30,100,300", help="preserve: the fixed μ values")
    p.add_argument("--first-layer", type=int, default=18)
    p.add_argument("--eta-scale", default="1,0.7,0.5")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    try:
        points = sorted({int(x) for x in args.edits.split(",")})
    except ValueError:
        sys.exit(f"--edits {args.edits!r}: give edit counts separated by commas, e.g. 2000,4000,8000")
    if not points or points[0] < 1:
        sys.exit("--edits must be positive edit counts, e.g. 1000 or 2000,4000,8000")
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file, save_file

    from daemon.cycle import hypernet_path, load_editor
    from daemon.materialise import load_base
    from horse.data import load_requests, requests_from_records
    from horse.deltas import LayerDelta, apply_deltas, sum_deltas
    from benchmarks.canary import CanaryProbe, canary_rows
    from horse.metrics import request_scores, summarise_scores
    from horse.sums import EditSums, solve_sums, spread_rhs
    from horse.types import EditRequest
    from ledger.config import load_settings

    settings = load_settings(environ={})
    model, tok = load_base(settings)
    editor = load_editor(settings, hypernet_path(settings), model, tok)
    if args.variant == "more-layers":
        editor = extended_editor(editor, model, tok, settings, args.first_layer)
    editor.preserve_weight, editor.preserve_exponent, editor.preserve_floor = args.mu, 0.0, args.mu
    every_canary = canary_rows()
    canary_cases = {int(r["source"].split(":")[1]) for r in every_canary if r["source"].startswith("counterfact-train:")}
    canary_prompts = {r["prompt"] for r in every_canary}

    def not_canary(r: dict) -> bool:
        return (r["case_id"] not in canary_cases and r["prompt"] not in canary_prompts
                and r["locality_prompt"] not in canary_prompts)

    if args.split == "train":
        records = [r for r in json.loads(TRAIN.read_text()) if not_canary(r)]
        pool = requests_from_records(records, source=str(TRAIN))
    else:
        pool = load_requests(VAL)
    if len(pool) < points[-1]:
        sys.exit(f"CounterFact {args.split} has {len(pool)} usable records, fewer than {points[-1]}")
    canary = CanaryProbe.on_base(model, tok, limit=100)

    def measure(tag: dict, deltas) -> None:
        with apply_deltas(model, deltas):
            sc = summarise_scores(request_scores(model, tok, evaluated, batch_size=64))
            ppl, agree = canary.perplexity_ratio(model, tok), canary.agreement(model, tok)
        print(json.dumps({**tag, "token_es": round(sc["token_es"], 4), "es": round(sc["cf_es"], 4),
                          "ps": round(sc["cf_ps"], 4), "ns": round(sc["cf_ns"], 4), "ppl_x": round(ppl, 2),
                          "canary": round(agree, 3)}), flush=True)

    CACHE.mkdir(parents=True, exist_ok=True)
    tag = f"{len(editor.module_names)}-{editor.fingerprint[:12]}"
    sums_at, sums = {}, None
    for n in points:
        cached = CACHE / f"{args.split}-sums-{n}-{tag}.safetensors"
        if cached.exists():
            sums_at[n] = EditSums.from_tensors(load_file(str(cached)))
            continue
        done = max((m for m in sums_at if m < n), default=0)  # go on from the largest point below n
        sums = sums_at.get(done)
        t = time.perf_counter()
        for start in range(done, n, 100):
            part = editor.edit_sums(model, tok, pool[start:min(start + 100, n)])
            sums = part if sums is None else sums + part
        save_file(sums.to_tensors(), str(cached))
        sums_at[n] = sums
        print(json.dumps({"captured": n, "split": args.split, "s": round(time.perf_counter() - t)}), flush=True)
    for n in points:
        requests, sums = pool[:n], sums_at[n]
        evaluated = requests[::max(1, n // args.eval)][:args.eval]
        if args.variant == "refine":
            total = editor.deltas_from_sums(sums)
            measure({"edits": n, "pass": 1, "mu": args.mu}, total)
            for p_ in range(2, args.passes + 1):
                with apply_deltas(model, total):
                    again = editor.edit_sums(model, tok, requests)
                step = {}
                for name, kk, rhs, lam in zip(editor.module_names, again.kk_KK, spread_rhs(again, editor.config.spread),
                                              editor.lams()):
                    prior = editor.prior_KK(name, again.n_edits)
                    if args.mode == "anchored":  # the whole solve again, targets K'Δ + R̂'; the step is the difference
                        current = total[name].to_dense().double()
                        new = solve_sums(kk, rhs.double() + kk.double() @ current, lam, prior)
                        step[name] = LayerDelta(dense_KV=(args.scale * (new - current)).float())
                    else:
                        step[name] = LayerDelta(dense_KV=(args.scale * solve_sums(kk, rhs, lam, prior)).float())
                total = sum_deltas(total, step)
                measure({"edits": n, "pass": p_, "mu": args.mu, "mode": args.mode, "scale": args.scale}, total)
            continue

        if args.variant == "preserve":
            for mu in (float(x) for x in args.mus.split(",")):
                editor.preserve_weight, editor.preserve_exponent, editor.preserve_floor = mu, 0.0, mu
                measure({"edits": n, "mu": mu}, editor.deltas_from_sums(sums))
            continue

        if args.variant == "more-layers":  # every η × a: KᵀR scales by a, ⟨R^l, R^{l−1}⟩ and ‖R^{l−1}‖² by a², KᵀG not
            for a in (float(x) for x in args.eta_scale.split(",")):
                scaled = EditSums(sums.n_edits, sums.n_tokens, sums.kk_KK, tuple(a * x for x in sums.kr_KV), sums.kg_KV,
                                  a * a * sums.rr_L, a * a * sums.pp_L)
                measure({"edits": n, "mu": args.mu, "layers": f"{args.first_layer}-29", "eta_scale": a},
                        editor.deltas_from_sums(scaled))
            continue

        train = [r for r in json.loads(TRAIN.read_text()) if not_canary(r)][-args.facts:]
        facts = [EditRequest(prompt=r["prompt"], target=r["ground_truth"]) for r in train]
        t, kk_sum, n_tokens = time.perf_counter(), {name: 0.0 for name in editor.module_names}, 0
        for start in range(0, len(facts), 200):
            captured = editor.capture(model, tok, facts[start:start + 200])
            for name in editor.module_names:
                keys = captured.keys_NK[name].double()
                kk_sum[name] = kk_sum[name] + keys.T @ keys
            n_tokens += captured.keys_NK[editor.module_names[0]].shape[0]
        c_rel = {name: kk_sum[name] / n_tokens for name in editor.module_names}
        print(json.dumps({"c_rel_facts": len(facts), "tokens": n_tokens, "s": round(time.perf_counter() - t)}), flush=True)
        generic = dict(editor.preserve_KK)
        for mu_rel in (float(x) for x in args.mu_rel.split(",")):
            editor.preserve_KK = {name: generic[name] + (mu_rel / args.mu) * c_rel[name].to(generic[name])
                                  for name in editor.module_names}
            measure({"edits": n, "mu": args.mu, "mu_rel": mu_rel}, editor.deltas_from_sums(sums))
        editor.preserve_KK = generic

if __name__ == "__main__":
    main()
