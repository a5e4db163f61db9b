"""Edit quality and speed of HORSE, MALMEN and MEMIT on SmolLM2-135M, side by side in one run (issue 5).

    python benchmarks/edit_quality.py                                  # everything below, CPU, resumable
    python benchmarks/edit_quality.py --device cuda --jobs 6           # on a GPU, six runs at a time
    python benchmarks/edit_quality.py --model tiny-llama --hypernet-dir DIR --limit 20 --sizes 10 \\
        --zsre-limit 10 --seq-batches 2 --seq-edits 5                   # smoke run

Runs, each in a child process (`python -m horse.evalcli --json`, so peak memory is per run) and each written
to <out>/<run>.json as soon as it finishes (a rerun skips finished runs):
- one-shot batches: the CounterFact edit-1k records (a subset of the edit split, never used for training or
  tuning; the set ../REFERENCE_RESULTS.md was measured on) in batches of 100 and of 1,000 edits, and zsRE
  eval in the same batch sizes (the first --zsre-limit records, at least one whole batch), for unedited,
  MEMIT, MALMEN and HORSE (default spread); HORSE with the other spreads on the same CounterFact batches
  where a hypernet trained with that spread exists (<hypernet-dir>/<model>-horse-<spread>.safetensors);
- sequential: 10 batches of 100 CounterFact edits applied one after another on the same model; after each,
  the retention of every earlier edit (CounterFact ES on its prompt), of the first batch, PS and NS.
Then it writes results.md (the table for the README) and edit_quality.png (quality vs number of edits, and
retention / NS over the sequential batches). Peak memory is the child's max RSS (and peak CUDA memory on a
GPU). With --jobs > 1 the runs share the machine, so their edit times are upper bounds; time methods
against each other with --jobs 1 (or benchmarks/edit_speed.py).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CF = ROOT / "data" / "counterfact" / "counterfact-edit-1k.json"
ZSRE = ROOT / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.json"
SPREADS = ("reference", "orthogonal", "chained", "gram-schmidt", "none")


def run_child(path: Path, cmd: list[str], stamp: dict) -> dict:
    """Run one child that prints a JSON report; add wall time and its own peak RSS; write it to `path`."""
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{path.stem} failed (exit {proc.returncode}):\n{err.read()[-3000:]}")
        report = json.loads(out.read())
    report["wall_s"] = time.perf_counter() - started
    report["peak_rss_mib"] = usage.ru_maxrss / 1024
    report.update(stamp)  # machine, date, runs at a time: the table's header says where each number comes from
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    print(f"{path.stem}: done in {report['wall_s']:.0f} s", flush=True)
    return report


def sequential(model_name: str, method: str, hypernet: Path | None, n_batches: int, n_edits: int,
               device: str, protect: float = 0.0, running: bool = False) -> dict:
    """Apply n_batches of n_edits one after another; after each, retention of all earlier edits (probability
    and token ES), the first and the newest batch's, PS and NS.

    protect > 0 (horse / malmen): each batch is solved with the prior ν·KₑᵀKₑ on the keys of every earlier
    batch (`Editor.set_protected_keys`), so that it overwrites less of them. running: the hypernet's input
    normaliser merges every batch (the daemon's `running_normaliser`)."""
    import torch

    from horse.data import load_requests
    from horse.deltas import add_deltas_
    from horse.metrics import request_scores, summarise_scores
    from horse.zoo import load_model

    torch.manual_seed(0)
    model, tok = load_model(model_name, device=device, progress=False)
    requests = load_requests(CF, limit=n_batches * n_edits)
    if method == "memit":
        from horse.covariance import model_fingerprint
        from horse.memit import MemitConfig, memit_deltas
        from horse.zoo import default_cache_dir

        config = MemitConfig.for_model(model)
        base = model_fingerprint(model)  # later batches edit the head: statistics and templates stay the base's

        def edit(reqs):
            return memit_deltas(model, tok, reqs, config, cache_dir=default_cache_dir(), fingerprint=base)
    else:
        from horse.editor import Editor

        from horse.editor import solutions_to_deltas

        editor = Editor.from_checkpoint(hypernet, model)
        editor.update_normaliser = running
        earlier_KK: dict = {}

        def edit(reqs):
            if not protect:
                return editor.compute_deltas(model, tok, reqs)
            editor.set_protected_keys(earlier_KK or None, protect)
            captured = editor.capture(model, tok, reqs)
            prediction = editor.predict(captured, n_edits=len(reqs))
            for name, kk in editor.keys_second_moments(captured).items():
                earlier_KK[name] = earlier_KK[name] + kk if name in earlier_KK else kk
            return solutions_to_deltas(editor.module_names, prediction.solutions), {}

    rows = []
    for i in range(n_batches):
        batch = requests[i * n_edits:(i + 1) * n_edits]
        started = time.perf_counter()
        deltas, _ = edit(batch)
        add_deltas_(model, deltas)  # the model now carries every batch so far
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        seen = requests[:(i + 1) * n_edits]
        scores = request_scores(model, tok, seen, batch_size=32)
        summary, newest = summarise_scores(scores), summarise_scores({k: v[-n_edits:] for k, v in scores.items()})
        first = summarise_scores({k: v[:n_edits] for k, v in scores.items()})
        rows.append({"batches": i + 1, "edits": len(seen), "retention_es": summary["cf_es"],
                     "first_batch_es": first["cf_es"], "ns": summary["cf_ns"], "ps": summary["cf_ps"],
                     "retention_token_es": summary["token_es"], "first_batch_token_es": first["token_es"],
                     "newest_batch_token_es": newest["token_es"], "edit_s": seconds})
        print(f"sequential {method} {i + 1}/{n_batches}: {rows[-1]}", file=sys.stderr, flush=True)
    return {"method": method, "model": model_name, "device": device, "n_edits": n_edits, "rows": rows,
            **({"protect_weight": protect} if protect else {}), **({"running_normaliser": True} if running else {})}


def table(runs: dict[str, dict]) -> str:
    lines = ["| run | method | edits/batch | ES | PS | NS | Score | token ES / GS / LS | edit time / batch (median) | peak RSS | peak CUDA |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        state = "unedited" if r["method"] == "none" else "edited"
        m = r[state]
        t = r.get("edit_time_s", {}).get("median")
        label = r["method"] if state == "edited" else "unedited"
        if r.get("spread") and r["method"] == "horse":
            label += f" ({r['spread']})"
        cuda = f"{r['peak_cuda_mib']:.0f} MiB" if "peak_cuda_mib" in r else "–"
        lines.append(
            f"| {name} | {label} | {r['n_edits']} | "
            f"{100 * m['cf_es']:.1f} | {100 * m['cf_ps']:.1f} | {100 * m['cf_ns']:.1f} | {100 * m['cf_score']:.1f} | "
            f"{100 * m['token_es']:.1f} / {100 * m['token_gs']:.1f} / {100 * m['token_ls']:.1f} | "
            f"{'–' if t is None else f'{t:.2f} s'} | {r['peak_rss_mib']:.0f} MiB | {cuda} |")
    return "\n".join(lines)


def seq_label(run: dict) -> str:
    """A sequential run's name in the table and the plot: the method, and ν when earlier keys were protected."""
    return (run["method"] + (f" (protect ν={run['protect_weight']:g})" if run.get("protect_weight") else "")
            + (" (running normaliser)" if run.get("running_normaliser") else ""))


def plot(runs: dict[str, dict], seqs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in ("horse", "malmen", "memit"):
        pts = sorted((r["n_edits"], 100 * r["edited"]["cf_score"]) for n, r in runs.items()
                     if n.startswith("cf-") and n.endswith(f"-{method}"))
        if pts:
            a.plot(*zip(*pts), marker="o", label=method)
    spreads = sorted({r["spread"] for n, r in runs.items() if n.startswith("cf-") and n.count("-") > 2
                      and r["method"] == "horse"})
    for spread in spreads:  # HORSE with another spread: thin lines under the default's
        pts = sorted((r["n_edits"], 100 * r["edited"]["cf_score"]) for n, r in runs.items()
                     if n.startswith("cf-") and r["method"] == "horse" and r.get("spread") == spread)
        a.plot(*zip(*pts), marker=".", linewidth=0.8, linestyle="-.", label=f"horse ({spread})")
    base = [r for n, r in runs.items() if n.startswith("cf-") and r["method"] == "none"]
    if base:
        a.axhline(100 * base[0]["unedited"]["cf_score"], color="grey", linestyle=":", label="unedited")
    a.set(xscale="log", xlabel="edits per batch", ylabel="CounterFact Score (%)", title="one-shot batches")
    a.legend(fontsize=7)
    for s in seqs:
        xs = [row["edits"] for row in s["rows"]]
        b.plot(xs, [100 * row["retention_es"] for row in s["rows"]], marker="o", label=f"{seq_label(s)} retention ES")
        b.plot(xs, [100 * row["ns"] for row in s["rows"]], linestyle="--", label=f"{seq_label(s)} NS")
    b.set(xlabel="accumulated edits", ylabel="%", title="sequential batches")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(torch.device(device))} GPU ({os.cpu_count()} CPU cores)"
    return f"{platform.machine()} CPU ({os.cpu_count()} cores, no GPU)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (child processes)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "edit_quality")
    p.add_argument("--hypernet-dir", type=Path, default=ROOT / "horse" / "hypernets")
    p.add_argument("--limit", type=int, default=1000, help="CounterFact edit-1k records for the one-shot batches")
    p.add_argument("--sizes", default="100,1000", help="edits per one-shot batch")
    p.add_argument("--zsre-limit", type=int, default=300)
    p.add_argument("--methods", default="none,horse,malmen,memit")
    p.add_argument("--spreads", default="orthogonal,chained,gram-schmidt,none",
                   help="other HORSE spreads, run where <model>-horse-<spread>.safetensors exists")
    p.add_argument("--skip-memit", default="", help="sizes MEMIT skips (e.g. 1000: too slow on a CPU)")
    p.add_argument("--sequential", default="horse,malmen", help="methods for the sequential run ('' = none)")
    p.add_argument("--seq-batches", type=int, default=10)
    p.add_argument("--seq-edits", type=int, default=100)
    p.add_argument("--protect", type=float, default=0.0,
                   help="sequential horse/malmen: also run each with the prior ν·KₑᵀKₑ on earlier batches' keys "
                        "(run sequential-<method>-protect<ν>)")
    p.add_argument("--running-normaliser", action="store_true",
                   help="sequential horse/malmen: also run each with the input normaliser merging every batch "
                        "(run sequential-<method>-running)")
    p.add_argument("--only", default=None, help="run only the runs whose names match this glob (e.g. 'cf-100-*')")
    p.add_argument("--report-only", action="store_true", help="write the table from finished runs; run nothing")
    p.add_argument("--sequential-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    def hypernet(method: str, spread: str | None = None) -> Path:
        return args.hypernet_dir / f"{args.model}-{method}{'-' + spread if spread else ''}.safetensors"

    if args.sequential_child:  # one sequential run, in this child process
        m = args.sequential_child
        print(json.dumps(sequential(args.model, m, hypernet(m) if m != "memit" else None, args.seq_batches,
                                    args.seq_edits, args.device, args.protect, args.running_normaliser)))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--device", args.device]
    evalcmd = [sys.executable, "-m", "horse.evalcli", "--json", *common]
    jobs: dict[str, list[str]] = {}
    sizes = [int(s) for s in args.sizes.split(",") if s]
    skip_memit = {int(s) for s in args.skip_memit.split(",") if s}
    for m in [m for m in args.methods.split(",") if m]:
        if m == "horse":  # the other spreads, each with its own hypernet, with or without the default one
            for spread in [s for s in args.spreads.split(",") if s]:
                for n in sizes if hypernet("horse", spread).is_file() else []:
                    jobs[f"cf-{n}-horse-{spread}"] = [
                        *evalcmd, "--data", str(CF), "--limit", str(args.limit), "--n-edits", str(n),
                        "--method", "horse", "--hypernet", str(hypernet("horse", spread))]
        hn = ["--hypernet", str(hypernet(m))] if m in ("horse", "malmen") else []
        if hn and not hypernet(m).is_file():
            print(f"skipping {m}: no hypernet at {hypernet(m)}", file=sys.stderr)
            continue
        for n in sizes[:1] if m == "none" else sizes:
            if not (m == "memit" and n in skip_memit):
                jobs[f"cf-{n}-{m}"] = [*evalcmd, "--data", str(CF), "--limit", str(args.limit), "--n-edits", str(n), "--method", m, *hn]
        for n in sizes[:1] if m == "none" else sizes:  # at least one whole batch of n zsRE records
            if not (m == "memit" and n in skip_memit):
                jobs[f"zsre-{n}-{m}"] = [*evalcmd, "--data", str(ZSRE), "--limit", str(max(args.zsre_limit, n)),
                                         "--n-edits", str(n), "--method", m, *hn]
    seq_methods = [m for m in args.sequential.split(",") if m and (m == "memit" or hypernet(m).is_file())]
    for m in seq_methods:
        child = [sys.executable, str(Path(__file__).resolve()), "--sequential-child", m, *common, "--hypernet-dir",
                 str(args.hypernet_dir), "--seq-batches", str(args.seq_batches), "--seq-edits", str(args.seq_edits)]
        jobs[f"sequential-{m}"] = child
        if args.protect and m != "memit":
            jobs[f"sequential-{m}-protect{args.protect:g}"] = [*child, "--protect", str(args.protect)]
        if args.running_normaliser and m != "memit":
            jobs[f"sequential-{m}-running"] = [*child, "--running-normaliser"]

    if args.report_only:  # every finished run in --out, whatever made it
        jobs = {f.stem: [] for f in sorted(args.out.glob("*.json"), key=lambda f: (f.stem.startswith("sequential-"),
                                                                                   f.stem.split("-")[0], f.stem))}
    if args.only:
        jobs = {n: c for n, c in jobs.items() if fnmatch.fnmatch(n, args.only)}
    failures: list[str] = []
    stamp = {} if args.report_only else {"machine": machine(args.device), "date": str(date.today()), "jobs": args.jobs}

    def run(name: str) -> tuple[str, dict | None]:
        if args.report_only:
            path = args.out / f"{name}.json"
            return name, json.loads(path.read_text()) if path.exists() else None
        try:
            return name, run_child(args.out / f"{name}.json", jobs[name], stamp)
        except (RuntimeError, json.JSONDecodeError) as exc:
            failures.append(f"{name}: {exc}")
            print(f"{name}: FAILED {exc}", file=sys.stderr, flush=True)
            return name, None

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = dict(pool.map(run, jobs))
    runs = {n: r for n, r in done.items() if r is not None and not n.startswith("sequential-")}
    seqs = [r for n, r in done.items() if r is not None and n.startswith("sequential-")]

    if args.report_only:
        where = sorted({f"{r.get('machine', 'an unrecorded machine')} on {r.get('date', '?')}, {r.get('jobs', '?')} run(s) at a time"
                        for r in done.values() if r is not None})
        header = (f"Measured on {'; '.join(where)} (with several runs at a time, edit times are upper bounds); "
                  f"table written by `python benchmarks/edit_quality.py {' '.join(sys.argv[1:])}`.")
    else:
        header = (f"Measured {date.today()} on {machine(args.device)}, "
                  f"`python benchmarks/edit_quality.py {' '.join(sys.argv[1:])}`"
                  + (f" ({args.jobs} runs at a time: edit times are upper bounds)." if args.jobs > 1 else "."))
    seq_lines = ["", "| sequential | edits | retention ES | first batch ES | PS | NS | token ES: all / first / newest "
                 "batch | edit s |", "|---|---|---|---|---|---|---|---|"]
    for s in seqs:
        for row in s["rows"]:
            tokens = " / ".join(f"{100 * row[k]:.1f}" if k in row else "–" for k in
                                ("retention_token_es", "first_batch_token_es", "newest_batch_token_es"))
            seq_lines.append(f"| {seq_label(s)} | {row['edits']} | {100 * row['retention_es']:.1f} | "
                             f"{100 * row['first_batch_es']:.1f} | {100 * row['ps']:.1f} | {100 * row['ns']:.1f} | "
                             f"{tokens} | {row['edit_s']:.2f} |")
    (args.out / "results.md").write_text(header + "\n\n" + table(runs) + "\n" + "\n".join(seq_lines) + "\n")
    try:
        plot(runs, seqs, args.out / "edit_quality.png")
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
    print((args.out / "results.md").read_text())
    if failures:
        raise SystemExit(f"{len(failures)} run(s) failed: " + "; ".join(f.splitlines()[0] for f in failures))


if __name__ == "__main__":
    main()
