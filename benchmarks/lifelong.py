"""Thousands of accumulated edits through the real pipeline (issue 6): nightly batches, snapshots, gate.

    python benchmarks/lifelong.py --nights 80                        # HORSE, 8,000 edits (resumable)
    python benchmarks/lifelong.py --nights 20 --consolidate-every 10 # HORSE + consolidation every 10 nights
    python benchmarks/lifelong.py --nights 20 --consolidate-every 5 --consolidate-engine finetune  # the hybrid
    python benchmarks/lifelong.py --nights 20 --protect-earlier 1    # HORSE, earlier edits' keys protected
    python benchmarks/lifelong.py --nights 80 --consolidate-every 3 --consolidate-engine finetune --protect-earlier 1 \
        --from-fold          # the hybrid: each night from the newest fold, each fold from the previous one (warm)
    python benchmarks/lifelong.py --nights 20 --consolidate-every 3 --consolidate-engine finetune --protect-earlier 1 \
        --from-fold --no-fold-warm                                   # ... each fold from the base
    python benchmarks/lifelong.py --nights 80 --from-base             # HORSE, every night one edit from the base
    python benchmarks/lifelong.py --method malmen --nights 20
    python benchmarks/lifelong.py --method finetune --nights 10 --checkpoint-every 5   # fine-tune-the-ledger
    python benchmarks/lifelong.py --method memit --nights 5

Each night adds the next `--edits-per-night` CounterFact edit-split records to a SQLite ledger in
benchmarks/results/lifelong/<run>/ and runs one `daemon.cycle.run_batch` on SmolLM2-135M with the shipped
hypernet, or the configured engine (`--method finetune`: every night from the base on all applied edits;
`--method memit`: MEMIT on the head) (the gate measures but does not stop anything here: canary, retention and efficacy bars 0, no
bisection, so every night publishes and the numbers show what the editor itself does; the consolidation
policy is the config's `consolidate_every_nights`, its engine `consolidate_engine` (`--consolidate-engine
finetune`: HORSE nights on the head, each fold a fine-tune of the whole ledger from the base; `--from-fold`: the
config's `hypernet_from_consolidation`, each night one HORSE edit of every edit since the newest fold, on its
weights); `--from-base`: the config's `hypernet_from_base`, every night one hypernet edit of all applied edits on
the base weights). Every `--checkpoint-every` nights it materialises the
head and measures over ALL accumulated edits: retention teacher-forced (mean answer-token accuracy), by
probability (P(new) > P(true)) and generated (greedy decoding produces the target), the same for the first
night's edits, NS on the locality prompts, canary agreement with the base model (greedy next token, 200
prompts; also per source, `canary_by_source`: 100 CounterFact relation prompts, 100 zsRE questions), perplexity on a fixed text (the canary prompts with their answers), the cumulative delta norm,
and the night's wall time (`--measure-aside`: in a second process, while the nights go on). Rows go to rows.jsonl
as they are measured (a rerun resumes); rows.json,
results.md (every run's checkpoints) and lifelong.png are rewritten at the end, or by `--report-only`.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT / "data" / "counterfact" / "counterfact-edit.json"
CANARY = ROOT / "daemon" / "assets" / "canary-train.jsonl"
log = logging.getLogger("lifelong")


def measure(settings, store, requests, first, canary, base_next, ppl_texts, batch_size: int = 32,
            head: int | None = None, canary_groups: list[str] | None = None, scoped: bool = False) -> dict:
    """Checkpoint measures of snapshot `head` (default: the ledger's head now) over `requests`; `canary_groups`:
    each canary prompt's source, for the agreement per source; `scoped`: served with the deltas scoped to the
    subjects of `requests` (horse/scope.py)."""
    from daemon.materialise import head_id, links, materialise
    from horse.metrics import agreement_by_group, next_token_ids, perplexity, request_scores, summarise_scores

    with store.session(write=False) as s:
        head = head_id(s, settings.model) if head is None else head
        chain_links = links(s, head)
        snap = store.get_snapshot(head) if head is not None else None
    m = materialise(settings, chain_links)
    model, tok = m.model, m.tokenizer
    if scoped:
        from horse.scope import Scope, SubjectIndex

        Scope(model, m.base_weights, SubjectIndex.build(tok, [r.subject for r in requests]))
    scores = request_scores(model, tok, requests, batch_size=batch_size, with_generation=True)
    every, firsts = summarise_scores(scores), summarise_scores({k: v[:first] for k, v in scores.items()})
    next_now = next_token_ids(model, tok, canary)
    agree = float((next_now == base_next).float().mean())
    return {
        "edits": len(requests), "head": head, "chain_length": len(chain_links),
        "retention_token": every["token_es"], "retention_prob": every["cf_es"], "retention_gen": every["gen_es"],
        "first_token": firsts["token_es"], "first_prob": firsts["cf_es"], "first_gen": firsts["gen_es"],
        "ps": every["cf_ps"], "ns": every["cf_ns"], "canary_agreement_with_base": agree,
        **({"canary_by_source": agreement_by_group(next_now, base_next, canary_groups)} if canary_groups else {}),
        "perplexity": perplexity(model, tok, ppl_texts),
        "cumulative_norm_max": (snap.metrics or {}).get("cumulative_norm_max") if snap else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("horse", "malmen", "finetune", "memit"), default="horse")
    p.add_argument("--nights", type=int, default=80)
    p.add_argument("--edits-per-night", type=int, default=100)
    p.add_argument("--consolidate-every", type=int, default=0, help="consolidate_every_nights (0: never)")
    p.add_argument("--consolidate-engine", choices=("", "finetune", "memit"), default="",
                   help="config consolidate_engine: what a fold re-derives the head with (finetune: the hybrid)")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="measure over all accumulated edits every this many nights and after the last (0: never; "
                        "timing runs)")
    p.add_argument("--running-normaliser", action="store_true",
                   help="carry the hypernet's input statistics from night to night (config running_normaliser)")
    p.add_argument("--protect-earlier", type=float, default=0.0,
                   help="config protect_earlier: ν of the prior on the carried edits' keys in each night's solve")
    p.add_argument("--from-base", action="store_true",
                   help="config hypernet_from_base: every night one edit of all applied edits from the base")
    p.add_argument("--from-fold", action="store_true",
                   help="config hypernet_from_consolidation: every night one edit of all edits since the newest "
                        "consolidated snapshot, on its weights")
    p.add_argument("--finetune-swap", type=float, default=None,
                   help="config finetune_swap_weight: the subject-swap locality term of fine-tunes (folds, finetune); "
                        "default: the config's (runs from before it existed: 0)")
    p.add_argument("--preserve-min", type=float, default=None, help="config preserve_min (default: the config's)")
    p.add_argument("--finetune-blocks", default="",
                   help="config finetune_blocks for fine-tune folds / fine-tune-the-ledger, e.g. 3-8 (default: last six)")
    p.add_argument("--finetune-resample", action="store_true", help="config finetune_swap_resample = true")
    p.add_argument("--fold-warm", action=argparse.BooleanOptionalAction, default=None,
                   help="config finetune_warm_start: each fine-tune fold starts from the newest fold and trains "
                        "what it does not recall, plus a rehearsal (default: the config's, true; runs recorded "
                        "without it: --no-fold-warm)")
    p.add_argument("--finetune-locality-prompts", type=int, default=None,
                   help="config finetune_locality_prompts (default: the config's 64)")
    p.add_argument("--finetune-preserve", type=float, default=None,
                   help="config finetune_preserve_weight: the preservation term of fine-tunes (folds, finetune); "
                        "default: the config's (runs from before it existed: 0)")
    p.add_argument("--gate-generation-sample", type=int, default=None,
                   help="config gate_generation_sample (default: the config's)")
    p.add_argument("--gate-sample", type=int, default=None,
                   help="config gate_retention_sample (default: the config's); the checkpoints measure every edit")
    p.add_argument("--device", default="cpu", help="config device (cpu, cuda:0)")
    p.add_argument("--eval-batch-size", type=int, default=32, help="prompts per batch of the checkpoints' measures")
    p.add_argument("--deadline-min", type=float, default=0.0,
                   help="start no night after this many minutes; measure the last night and stop (0: none)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lifelong")
    p.add_argument("--report-only", action="store_true", help="only rewrite results.md and lifelong.png")
    p.add_argument("--measure-aside", action="store_true",
                   help="measure each checkpoint in a second process (one more core) while the nights go on; the "
                        "numbers go to measured/night-N.json and join the rows in the report")
    p.add_argument("--measure-night", type=int, default=0, help=argparse.SUPPRESS)  # --measure-aside's process
    p.add_argument("--measure-head", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--scoped", action="store_true",
                   help="config scope = subject: the gate and the checkpoints measure the head served with its deltas "
                        "scoped to the edited subjects (horse/scope.py); the nights' deltas are the same")
    p.add_argument("--measure-now", action="store_true",
                   help="measure the head after the last finished night (an interrupted run) and store it on that row")
    args = p.parse_args()
    if args.report_only:
        report(args.out)
        return
    torch.set_num_threads(args.threads)
    handler = logging.StreamHandler(sys.stderr)  # checkpoints and the engine's progress (fine-tunes, covariance)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("lifelong", "horse"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)

    from tqdm.auto import tqdm

    from horse.progress import is_terminal, log_stage

    from daemon.cycle import run_batch
    from horse.cli import file_sha256
    from horse.data import load_requests
    from horse.metrics import next_token_ids, perplexity
    from horse.zoo import load_model
    from ledger.config import Settings, load_settings
    from ledger.store import Store
    from ledger.validate import EditSpec

    swap = Settings().finetune_swap_weight if args.finetune_swap is None else args.finetune_swap
    uses_finetune = args.method == "finetune" or args.consolidate_engine == "finetune"
    swap = swap if uses_finetune else 0.0
    preserve = Settings().finetune_preserve_weight if args.finetune_preserve is None else args.finetune_preserve
    preserve = preserve if uses_finetune else 0.0
    warm = Settings().finetune_warm_start if args.fold_warm is None else args.fold_warm
    fold_engine = args.consolidate_engine or ("finetune" if args.method == "finetune" else "")
    warm = bool(warm and args.consolidate_every and fold_engine == "finetune")  # only fine-tune folds start warm
    run = (f"{args.method}{'-consolidate' + str(args.consolidate_every) if args.consolidate_every else ''}"
           f"{'-running' if args.running_normaliser else ''}"
           f"{f'-protect{args.protect_earlier:g}' if args.protect_earlier else ''}"
           f"{'-fold' + args.consolidate_engine if args.consolidate_engine else ''}"
           f"{'-frombase' if args.from_base else ''}{'-fromfold' if args.from_fold else ''}"
           f"{f'-swap{swap:g}' if swap else ''}"
           f"{f'-blocks{args.finetune_blocks}' if args.finetune_blocks and uses_finetune else ''}"
           f"{'-resample' if args.finetune_resample and uses_finetune else ''}"
           f"{'-warm' if warm else ''}"
           # other settings: --out (run.json refuses a mix)
           f"{f'-loc{args.finetune_locality_prompts}' if args.finetune_locality_prompts and uses_finetune else ''}"
           f"{f'-pres{preserve:g}' if preserve else ''}")
    out = args.out / run
    out.mkdir(parents=True, exist_ok=True)
    db = f"sqlite:///{out / 'ledger.db'}"  # Store upgrades the schema on open
    engine = {"finetune": "finetune", "memit": "memit"}.get(args.method, "hypernet")
    hypernet = ROOT / "horse" / "hypernets" / f"smollm2-135m-{args.method}.safetensors"
    settings = load_settings(environ={}, db_url=db, model="smollm2-135m", data_dir=str(out),
                             snapshot_dir=str(out / "snapshots"), engine=engine,
                             hypernet=str(hypernet) if engine == "hypernet" else "",
                             gate_min_canary_agreement=0.0, gate_min_efficacy=0.0, gate_min_retention=0.0,
                             gate_max_protected_drop=1.0, gate_bisect_depth=0, batch_max_edits=args.edits_per_night,
                             consolidate_every_nights=args.consolidate_every, log_json="false",
                             consolidate_engine=args.consolidate_engine,
                             running_normaliser=args.running_normaliser, protect_earlier=args.protect_earlier,
                             hypernet_from_base=args.from_base, hypernet_from_consolidation=args.from_fold,
                             finetune_swap_weight=swap, scope="subject" if args.scoped else "off",
                             device=args.device,
                             **({"gate_retention_sample": args.gate_sample} if args.gate_sample else {}),
                             **({"gate_generation_sample": args.gate_generation_sample}
                                if args.gate_generation_sample is not None else {}),
                             **({"finetune_blocks": args.finetune_blocks} if args.finetune_blocks else {}),
                             **({"finetune_swap_resample": True} if args.finetune_resample else {}),
                             finetune_warm_start=warm,
                             **({"finetune_locality_prompts": args.finetune_locality_prompts}
                                if args.finetune_locality_prompts else {}),
                             finetune_preserve_weight=preserve,
                             **({"preserve_min": args.preserve_min} if args.preserve_min is not None else {}))
    store = Store(db)
    run_info = out / "run.json"  # what the run's nights were made with; a resumed run must not change it
    info = {"method": args.method, "consolidate_every": args.consolidate_every,
            "running_normaliser": args.running_normaliser, "edits_per_night": args.edits_per_night,
            **({"protect_earlier": args.protect_earlier} if args.protect_earlier else {}),
            **({"from_base": True} if args.from_base else {}),
            **({"from_fold": True} if args.from_fold else {}),
            **({"finetune_swap_weight": swap} if swap else {}),
            **({"consolidate_engine": args.consolidate_engine} if args.consolidate_engine else {}),
            **({"gate_retention_sample": args.gate_sample} if args.gate_sample else {}),
            **({"gate_generation_sample": args.gate_generation_sample}
               if args.gate_generation_sample is not None else {}),
            **({"finetune_blocks": args.finetune_blocks} if args.finetune_blocks else {}),
            **({"finetune_swap_resample": True} if args.finetune_resample else {}),
            **({"finetune_warm_start": True} if warm else {}),
            **({"finetune_locality_prompts": args.finetune_locality_prompts} if args.finetune_locality_prompts else {}),
            **({"finetune_preserve_weight": preserve} if preserve else {}),
            **({"preserve_min": settings.preserve_min} if engine == "hypernet" else {}),
            "hypernet": hypernet.name if engine == "hypernet" else None,
            "hypernet_sha256": file_sha256(hypernet) if engine == "hypernet" else None}
    if run_info.exists():
        earlier = json.loads(run_info.read_text())
        changed = {k for k in set(info) | set(earlier) - {"started", "threads", "machine", "device"}
                   if earlier.get(k) != info.get(k)}
        if changed:
            sys.exit(f"{out} was run with other settings ({', '.join(sorted(changed))} differ: {run_info}); "
                     "give another --out or delete that run's folder to start afresh")
    else:
        gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
        run_info.write_text(json.dumps({**info, "started": time.strftime("%Y-%m-%d"), "threads": args.threads,
                                        "machine": gpu or f"{platform.machine()} CPU ({os.cpu_count()} cores)"},
                                       indent=2))
    records = json.loads(DATA.read_text())
    requests = load_requests(DATA, limit=args.nights * args.edits_per_night)
    canary_rows = [json.loads(line) for line in CANARY.read_text().splitlines()]
    canary = [r["prompt"] for r in canary_rows]
    canary_groups = [r["source"].split(":")[0] for r in canary_rows]  # CounterFact relation prompts, zsRE questions
    ppl_texts = [f"{r['prompt']} {r['answer']}." for r in canary_rows]
    base, tok = load_model("smollm2-135m", device=args.device, progress=False)
    base_next = next_token_ids(base, tok, canary)
    base_row = {"night": 0, "edits": 0, "perplexity": perplexity(base, tok, ppl_texts)}
    del base

    rows_path = out / "rows.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()] if rows_path.exists() else []
    done_nights = max((r["night"] for r in rows), default=0)  # a night is done once its row is written
    def checkpoint(row: dict, head: int | None = None) -> None:
        """Measure snapshot `head` (default: the head now) over every edit up to `row`'s night; store it on the row."""
        n_edits, t_measure = row["night"] * args.edits_per_night, time.perf_counter()
        log_stage(log, f"checkpoint of night {row['night']}: measuring", edits=n_edits, head=head)
        row.update(measure(settings, store, requests[:row["night"] * args.edits_per_night], args.edits_per_night,
                           canary, base_next, ppl_texts, args.eval_batch_size, head=head,
                           canary_groups=canary_groups, scoped=args.scoped))
        row["perplexity_ratio"] = row["perplexity"] / base_row["perplexity"]
        log_stage(log, f"checkpoint of night {row['night']}: measured", edits=n_edits,
                  seconds=round(time.perf_counter() - t_measure, 1))

    if args.measure_night:  # the process --measure-aside started: one checkpoint of a given snapshot, then exit
        row = {"night": args.measure_night}
        (out / "measured").mkdir(exist_ok=True)
        part = out / "measured" / f"night-{args.measure_night}{'-scoped' if args.scoped else ''}.json"
        running = part.with_suffix(".pid")  # a resumed run leaves a measurement still going on alone
        running.write_text(str(os.getpid()))
        try:
            checkpoint(row, head=args.measure_head)
            part.with_suffix(".tmp").write_text(json.dumps(row))
            part.with_suffix(".tmp").replace(part)
        finally:
            running.unlink(missing_ok=True)
        return
    aside: list = []  # the measuring processes started by --measure-aside

    def measure_aside(row: dict) -> None:
        """Start a process that measures the snapshot `row`'s night published (`head_snapshot`), one at a time:
        wait for the last."""
        import subprocess

        for proc in aside:
            proc.wait()
        argv = [a for a in sys.argv[1:] if a not in ("--measure-aside", "--measure-now")]
        aside.append(subprocess.Popen([sys.executable, __file__, *argv, "--measure-night", str(row["night"]),
                                       "--measure-head", str(row["head_snapshot"])]))

    def head_now() -> int | None:
        from daemon.materialise import head_id

        with store.session(write=False) as s:
            return head_id(s, settings.model)

    def measure_last() -> bool:
        """Measure the last finished night when it has no measurements yet (an interrupted run); rewrite rows."""
        if not rows or "retention_token" in rows[-1]:
            return False
        checkpoint(rows[-1])
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return True

    if args.measure_now and measure_last():
        print(json.dumps(rows[-1]))
        report(args.out)
        return
    if args.measure_aside:  # checkpoints a stopped run left unmeasured (unless their process goes on without it)
        for r in with_measured(out, rows):
            if "head_snapshot" in r and "retention_token" not in r and not measuring(out, r["night"]):
                measure_aside(r)
    bar = tqdm(range(done_nights, args.nights), desc=run, unit="night", initial=done_nights, total=args.nights,
               disable=not is_terminal())  # off the terminal, the nights' log lines say how far it got
    t_start = time.perf_counter()
    for night in bar:
        if args.deadline_min and time.perf_counter() - t_start > 60 * args.deadline_min:
            bar.write(f"deadline of {args.deadline_min} min reached after night {night}; measuring it and stopping")
            measure_last()
            break
        chunk = records[night * args.edits_per_night:(night + 1) * args.edits_per_night]
        done = night_done_before(store, night + 1, [f"counterfact-edit:{r['case_id']}" for r in chunk])
        if done is not None:  # a run stopped after this night's batch, before its row (e.g. during its fold)
            rows.append(done)
            with rows_path.open("a") as f:
                f.write(json.dumps(done) + "\n")
            bar.write(f"night {night + 1} was applied by batch {done['batch']} of an earlier run; its row is "
                      "recovered from the ledger (no fold timings)")
            continue
        store.add_edits([EditSpec(subject=r["subject"], prompt=r["prompt"], target_new=r["target_new"],
                                  target_true=r["ground_truth"], paraphrases=(r["rephrase_prompt"],),
                                  source=f"counterfact-edit:{r['case_id']}", author="lifelong")
                         for r in chunk], actor="benchmark")
        started = time.perf_counter()
        result = run_batch(settings, store, actor="benchmark")
        wall = time.perf_counter() - started
        log_stage(log, f"night {night + 1} of {args.nights}: {result.status}", applied=len(result.applied),
                  seconds=round(wall, 1))
        row = {"night": night + 1, "status": result.status, "applied": len(result.applied), "night_s": wall,
               "threads": args.threads,
               "efficacy": (result.metrics or {}).get("efficacy_mean"),  # the night's edits on the new head
               "consolidation_s": (result.consolidation or {}).get("timings_s", {}).get("total"),
               **({"fold_trained": result.consolidation["trained"]}
                  if (result.consolidation or {}).get("trained") is not None else {}),
               **({"fold_engine_s": result.consolidation["engine_timings_s"]}
                  if (result.consolidation or {}).get("engine_timings_s") else {}),
               **({"fold_s": result.consolidation["timings_s"]}  # measure_head, edit, gate, protect_keys, ...
                  if (result.consolidation or {}).get("timings_s") else {})}
        checkpoint_night = args.checkpoint_every > 0 and ((night + 1) % args.checkpoint_every == 0
                                                          or night + 1 == args.nights)
        if checkpoint_night and args.measure_aside:
            row["head_snapshot"] = head_now()  # what the measuring process measures, even after a restart
        rows.append(row)
        with rows_path.open("a") as f:  # the night is done: a run stopped while measuring it resumes after it
            f.write(json.dumps(row) + "\n")
        if checkpoint_night and args.measure_aside:
            measure_aside(row)
        elif checkpoint_night:
            measure_last()  # (`--measure-now` measures such a night later)
            bar.write(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}))
    for proc in aside:
        proc.wait()
    (out / "rows.json").write_text(json.dumps({"run": run, "base": base_row, "rows": with_measured(out, rows)},
                                              indent=2))
    report(args.out)


def night_done_before(store, night: int, sources: list[str]) -> dict | None:
    """The row of a night whose edits (by source) an earlier, interrupted run already took in one batch that
    finished, rebuilt from that batch (its status, size and wall time; the fold after it, if any, is not in it);
    None when the ledger does not hold them all (the night is still to run)."""
    from sqlalchemy import func, select

    from ledger.models import Batch, Edit

    with store.session(write=False) as s:
        held = s.execute(select(Edit.batch_id, func.count()).where(Edit.source.in_(sources))
                         .group_by(Edit.batch_id)).all()
        if sum(n for _, n in held) < len(sources) or len(held) != 1 or held[0][0] is None:
            return None
        b = s.get(Batch, held[0][0])
        if b is None or b.finished_at is None:
            return None
        return {"night": night, "status": b.status, "applied": b.n_edits,
                "night_s": (b.finished_at - b.started_at).total_seconds(),
                "efficacy": (b.metrics or {}).get("efficacy_mean"), "consolidation_s": None,
                "recovered": True, "batch": b.id}


def measuring(run_dir: Path, night: int) -> bool:
    """Whether a --measure-aside process for `night` is still running (its pid file names a live process that
    measures that night)."""
    try:
        pid = int((run_dir / "measured" / f"night-{night}.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return False
    return b"--measure-night" in cmdline and cmdline[cmdline.index(b"--measure-night") + 1] == str(night).encode()


def load_runs(root: Path) -> list[tuple[str, list[dict]]]:
    """(run name, rows) for every run directory under `root`, from rows.jsonl (complete or interrupted); the
    folders of from_base_endpoint.py (rows without nights) are not this script's runs."""
    runs = []
    for path in sorted(root.glob("*/rows.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows and all("night" in r for r in rows):
            runs.append((path.parent.name, with_measured(path.parent, rows)))
            scoped = with_measured(path.parent, rows, scoped=True)
            if any("retention_token" in r for r in scoped):  # the same snapshots served scoped (--scoped)
                runs.append((path.parent.name + " (scoped)", scoped))
    return runs


def with_measured(run_dir: Path, rows: list[dict], *, scoped: bool = False) -> list[dict]:
    """The rows with the checkpoints measured aside (`measured/night-N.json`) joined to their nights; `scoped`:
    only the nights measured served scoped (`measured/night-N-scoped.json`), with those measurements."""
    aside = {}
    for path in sorted((run_dir / "measured").glob("night-*.json")):
        if path.stem.endswith("-scoped") == scoped:
            part = json.loads(path.read_text())
            aside[part["night"]] = part
    if scoped:  # every night's row (the table's first night time), measured only where served scoped
        return [{**{k: v for k, v in r.items() if k != "retention_token"}, **aside.get(r["night"], {})}
                for r in rows] if aside else []
    return [{**r, **aside.get(r["night"], {})} for r in rows]


def table(root: Path) -> str:
    """The checkpoints of every run as one markdown table (written to results.md)."""
    head = ("| run | edits | retention t.-f. / prob. / generated | first night t.-f. / gen. | NS | canary = base "
            "| perplexity × | norm max | night s: first → this |\n|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for name, rows in load_runs(root):
        run_json = root / name.removesuffix(" (scoped)") / "run.json"
        started = json.loads(run_json.read_text()).get("threads") if run_json.exists() else None
        threads = lambda r: r.get("threads", started)  # noqa: E731 - rows before 2026-11-27 ran as the run started
        first_s = rows[0]["night_s"] if rows else float("nan")
        for r in rows:
            if "retention_token" not in r:
                continue
            pct = lambda k: f"{100 * r[k]:.1f}"  # noqa: E731
            lines.append(f"| {name} | {r['edits']:,} | {pct('retention_token')} / {pct('retention_prob')} / "
                         f"{pct('retention_gen')} | {pct('first_token')} / {pct('first_gen')} | {pct('ns')} | "
                         f"{r['canary_agreement_with_base']:.2f} | {r['perplexity_ratio']:.2f} | "
                         f"{r['cumulative_norm_max']:.1f} | {first_s:.0f} → {r['night_s']:.0f}"
                         f"{f' ({threads(rows[0])} → {threads(r)} threads)' if threads(r) != threads(rows[0]) else ''} |")
    return head + "\n".join(lines) + "\n"


def report(root: Path) -> None:
    (root / "results.md").write_text(table(root))
    plot(root)


def plot(root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in load_runs(root):
        pts = [r for r in rows if "retention_token" in r]
        xs = [r["edits"] for r in pts]
        a.plot(xs, [100 * r["retention_token"] for r in pts], marker="o", label=f"{name} teacher-forced")
        a.plot(xs, [100 * r["retention_gen"] for r in pts], linestyle="--", label=f"{name} generated")
        b.plot(xs, [100 * r["ns"] for r in pts], marker="o", label=f"{name} NS")
        b.plot(xs, [100 * r["canary_agreement_with_base"] for r in pts], linestyle=":", label=f"{name} canary")
    a.set(xlabel="accumulated edits", ylabel="retention (%)", title="retention of all accumulated edits")
    b.set(xlabel="accumulated edits", ylabel="%", title="neighbourhood and canary")
    a.legend(fontsize=6)
    b.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(root / "lifelong.png", dpi=110)


if __name__ == "__main__":
    main()
