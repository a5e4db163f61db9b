"""Lifelong editing with the default configuration (routed serving): every held-out CounterFact record (edit split
+ validation) and the zsRE eval file, applied by the real daemon in nights of 100, measured every 2,000 edits.

    python benchmarks/lifelong_routed.py --out benchmarks/results/lifelong-routed/run1     # resumable
    python benchmarks/lifelong_routed.py --out ... --max-edits 4000                       # a shorter run

Each night is `daemon.cycle.run_batch` on a SQLite ledger with the defaults (scope = routed, the production gate,
batch_max_edits = 100). At each checkpoint, on the head served as `ask` serves it (base + routes):
retention teacher-forced / generated (a stable sample of the applied edits), the first night's edits, PS and NS
(CounterFact locality prompts of a sample of applied records) against the unedited model, canary agreement with
the unedited model, perplexity of the canary texts (all, and those that name an edited subject), the nights'
wall time against night 1, serving latency per token against the base model, bytes per edit, peak memory.
Rows go to `<out>/rows.jsonl` (one per checkpoint) and nights to `<out>/nights.jsonl`.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = [ROOT / "data/counterfact/counterfact-edit.json", ROOT / "data/counterfact/counterfact-val.json",
        ROOT / "data/zsre/zsre_mend_eval_portability_gpt4.json"]


def edit_stream(seed: int = 0):
    """Every record of DATA as (EditRequest, EditSpec), shuffled with `seed` (sources interleaved)."""
    from horse.data import read_records, requests_from_records
    from ledger.validate import validate_edit

    reqs = [r for p in DATA for r in requests_from_records(read_records(p), source=str(p))]
    random.Random(seed).shuffle(reqs)
    out = []
    for r in reqs:
        if not r.subject or r.subject not in r.prompt:
            continue
        try:
            spec = validate_edit({"subject": r.subject, "prompt": r.prompt, "target": r.target,
                                  "target_true": r.target_true, "paraphrases": list(r.rephrases[:1]),
                                  "source": f"{r.case_id}", "author": "lifelong"})
        except Exception:  # noqa: BLE001 - a record the ledger refuses is skipped (counted)
            continue
        out.append((r, spec))
    return out


def served(settings, store, tok):
    from daemon.materialise import head_id, links
    from daemon.night.routes import head_table

    with store.session(write=False) as s:
        head = head_id(s, settings.model)
        chain_links = links(s, head)
    return head, head_table(settings, chain_links, tok)


def checkpoint(settings, store, model, tok, stream, applied_ids, first_ids, canary, base, args) -> dict:
    from horse import metrics
    from horse.route import Router, named_in

    head, table = served(settings, store, tok)
    by_id = {int(e.id): e for e in store.get_edits(sorted(applied_ids))}
    reqs = {spec_key: r for r, spec_key in ((r, (r.prompt, r.target)) for r, _ in stream)}
    applied = [reqs[(e.rendered_prompt, e.target_new)] for e in by_id.values() if (e.rendered_prompt, e.target_new) in reqs]
    rng = random.Random(1)
    sample = rng.sample(applied, min(args.sample, len(applied)))
    firsts = [reqs[(e.rendered_prompt, e.target_new)] for i, e in by_id.items() if i in first_ids
              and (e.rendered_prompt, e.target_new) in reqs]
    texts = [f"{p} {a}." for p, a in canary]
    naming = [i for i, n in enumerate(named_in(texts, tok, table)) if n]
    with Router(model, table):
        s = metrics.request_scores(model, tok, sample, with_generation=True)
        f = metrics.request_scores(model, tok, firsts)
        nxt = metrics.next_token_ids(model, tok, [p for p, _ in canary])
        ppl = metrics.perplexity(model, tok, texts)
        ppl_named = metrics.perplexity(model, tok, [texts[i] for i in naming]) if naming else None
        t = time.perf_counter()
        metrics.greedy_continuations(model, tok, [p for p, _ in canary[:32]], max_new_tokens=16)
        routed_s = time.perf_counter() - t
    b = metrics.request_scores(model, tok, sample)
    t = time.perf_counter()
    metrics.greedy_continuations(model, tok, [p for p, _ in canary[:32]], max_new_tokens=16)
    base_s = time.perf_counter() - t
    every, first = metrics.summarise_scores(s), metrics.summarise_scores(f)
    unedited = metrics.summarise_scores(b)
    snaps = [store.get_snapshot(i) for i in range(1, (head or 0) + 1)]
    route_bytes = sum(x.bytes for x in snaps if x is not None and x.status == "published")
    return {"edits": len(applied_ids), "head": head, "subjects": len(table.routes),
            "retention_token": every["token_es"], "retention_gen": every["gen_es"], "ps": every["cf_ps"],
            "ns": every["cf_ns"], "ns_unedited": unedited["cf_ns"], "first_token": first["token_es"],
            "canary_agreement_with_base": float((nxt == base["next"]).float().mean()),
            "perplexity_ratio": ppl / base["ppl"], "perplexity_ratio_naming": (
                ppl_named / metrics.perplexity(model, tok, [texts[i] for i in naming])) if naming else None,
            "texts_naming_edited": len(naming), "latency_ratio": routed_s / base_s,
            "bytes_per_edit_files": route_bytes / max(len(applied_ids), 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lifelong-routed/run1")
    ap.add_argument("--max-edits", type=int, default=0, help="stop after this many claimed edits (0 = all)")
    ap.add_argument("--checkpoint-every", type=int, default=2000)
    ap.add_argument("--sample", type=int, default=500, help="applied edits measured at a checkpoint")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from daemon.cycle import run_batch
    from daemon.gate import load_canary
    from daemon.materialise import load_base
    from horse import metrics
    from ledger.config import load_settings
    from ledger.store import Store

    args.out.mkdir(parents=True, exist_ok=True)
    settings = load_settings(environ={}, db_url=f"sqlite:///{args.out / 'ledger.db'}", model="smollm2-135m",
                             data_dir=str(args.out), snapshot_dir=str(args.out / "snapshots"), log_json="false",
                             review="off")
    store = Store(settings.db_url)
    stream = edit_stream()
    if args.max_edits:
        stream = stream[:args.max_edits]
    if not sum(store.status_counts().values()):
        store.add_edits([spec for _, spec in stream], actor="lifelong")
    (args.out / "config.json").write_text(json.dumps({"n_stream": len(stream), "settings": {
        k: getattr(settings, k) for k in ("scope", "route_solve", "batch_max_edits", "gate_min_canary_agreement",
                                          "gate_min_retention", "gate_min_same_subject", "preserve_weight")}}, indent=2))
    model, tok = load_base(settings)
    rows_path, nights_path = args.out / "rows.jsonl", args.out / "nights.jsonl"
    done = {json.loads(x)["edits_claimed"] for x in rows_path.read_text().splitlines()} if rows_path.exists() else set()
    nights = [json.loads(x) for x in nights_path.read_text().splitlines()] if nights_path.exists() else []
    canary = [(json.loads(x)["prompt"], json.loads(x)["answer"]) for x in
              (ROOT / "daemon/assets/canary.jsonl").read_text().splitlines()]
    base = {"next": metrics.next_token_ids(model, tok, [p for p, _ in canary]),
            "ppl": metrics.perplexity(model, tok, [f"{p} {a}." for p, a in canary])}
    while True:
        claimed = sum(n["n_claimed"] for n in nights)
        boundary = claimed and claimed % args.checkpoint_every == 0 and claimed not in done
        if boundary or (claimed and claimed not in done and not store.status_counts().get("pending")):
            applied = {n_id for n in nights for n_id in n["applied"]}
            row = checkpoint(settings, store, model, tok, stream, applied, set(nights[0]["applied"]), canary, base, args)
            walls = [n["wall_s"] for n in nights]
            row.update(edits_claimed=claimed, night1_s=walls[0], night_last_s=statistics.median(walls[-5:]),
                       night_ratio=statistics.median(walls[-5:]) / walls[0],
                       rejected=sum(n["n_rejected"] for n in nights), failed=sum(n["n_failed"] for n in nights),
                       same_subject_mean=statistics.mean(x for n in nights for x in n["same_subject"]) if any(
                           n["same_subject"] for n in nights) else None)
            with rows_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            done.add(claimed)
            print(json.dumps(row), flush=True)
        if not store.status_counts().get("pending"):
            break
        t = time.perf_counter()
        r = run_batch(settings, store)
        night = {"night": len(nights) + 1, "status": r.status, "wall_s": time.perf_counter() - t,
                 "n_claimed": len(r.applied) + len(r.failed) + len(r.rejected) + len(r.returned),
                 "applied": r.applied, "n_failed": len(r.failed), "n_rejected": len(r.rejected),
                 "n_returned": len(r.returned), "timings": r.timings_s,
                 "same_subject": [v["same_subject"] for v in (r.metrics.get("subjects") or {}).values()]}
        nights.append(night)
        with nights_path.open("a") as fh:
            fh.write(json.dumps(night) + "\n")
        print(f"night {night['night']}: {r.status} {len(r.applied)} applied, {len(r.failed)} failed, "
              f"{len(r.rejected)} rejected, {len(r.returned)} returned, {night['wall_s']:.1f} s", flush=True)


if __name__ == "__main__":
    main()
