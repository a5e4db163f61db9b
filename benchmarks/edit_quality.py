"""Edit quality and speed of HORSE, MALMEN and MEMIT on SmolLM2-135M, side by side in one run (issue 5).

    python benchmarks/edit_quality.py                       # everything below, resumable
    python benchmarks/edit_quality.py --limit 300 --skip-memit-1000

Runs, each through `horse-ledger eval --json` in a child process (so peak memory is per method) and each
written to benchmarks/results/edit_quality/<run>.json as soon as it finishes (a rerun skips finished runs):
- one-shot batches: CounterFact edit split (never used for training or tuning) in batches of 100 and of
  1,000 edits, and zsRE eval in batches of 100, for unedited, MEMIT, MALMEN and HORSE (default spread);
- sequential: 10 batches of 100 CounterFact edits applied one after another on the same model; after each,
  the retention of every earlier edit (CounterFact ES on its prompt) and NS.
Then it writes results.md (the table for the README) and edit_quality.png (quality vs number of edits, and
retention / NS over the sequential batches). Peak memory is the child's max RSS (ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "edit_quality"
CF = ROOT / "data" / "counterfact" / "counterfact-edit.json"
ZSRE = ROOT / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.json"
HYPERNETS = ROOT / "horse" / "hypernets"


def run_eval(name: str, args: list[str]) -> dict:
    """Run one `horse-ledger eval --json` in a child, record wall time and its peak RSS; resumable."""
    path = OUT / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    started = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-m", "ledger", "eval", "--json", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(proc.stdout)
    report["wall_s"] = time.perf_counter() - started
    report["peak_rss_mib"] = max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    print(f"{name}: done in {report['wall_s']:.0f} s", flush=True)
    return report


def sequential(n_batches: int, n_edits: int, method: str, hypernet: Path | None) -> dict:
    """Apply n_batches of n_edits one after another; after each, retention of all earlier edits and NS."""
    path = OUT / f"sequential-{method}.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch

    from horse.data import load_requests
    from horse.deltas import add_deltas_
    from horse.editor import Editor
    from horse.metrics import request_scores, summarise_scores
    from horse.zoo import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m", progress=False)
    requests = load_requests(CF, limit=n_batches * n_edits)
    if method == "memit":
        from horse.memit import MemitConfig, memit_deltas
        from horse.zoo import default_cache_dir

        config = MemitConfig.for_model(model)

        def edit(reqs):
            return memit_deltas(model, tok, reqs, config, cache_dir=default_cache_dir())
    else:
        editor = Editor.from_checkpoint(hypernet, model)

        def edit(reqs):
            return editor.compute_deltas(model, tok, reqs)

    rows = []
    for i in range(n_batches):
        batch = requests[i * n_edits:(i + 1) * n_edits]
        started = time.perf_counter()
        deltas, _ = edit(batch)
        add_deltas_(model, deltas)  # the model now carries every batch so far
        seconds = time.perf_counter() - started
        seen = requests[:(i + 1) * n_edits]
        summary = summarise_scores(request_scores(model, tok, seen, batch_size=32))
        first = summarise_scores(request_scores(model, tok, requests[:n_edits], batch_size=32))
        rows.append({"batches": i + 1, "edits": len(seen), "retention_es": summary["cf_es"],
                     "first_batch_es": first["cf_es"], "ns": summary["cf_ns"], "ps": summary["cf_ps"],
                     "edit_s": seconds})
        print(f"sequential {method} {i + 1}/{n_batches}: {rows[-1]}", flush=True)
    result = {"method": method, "n_edits": n_edits, "rows": rows}
    path.write_text(json.dumps(result, indent=2))
    return result


def table(runs: dict[str, dict]) -> str:
    lines = ["| run | method | edits/batch | ES | PS | NS | Score | token ES / GS / LS | edit time / batch (median) | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        for state in (("unedited",) if r["method"] == "none" else ("edited",)):
            m = r[state]
            t = r.get("edit_time_s", {}).get("median")
            lines.append(
                f"| {name} | {r['method'] if state == 'edited' else 'unedited'} | {r['n_edits']} | "
                f"{100 * m['cf_es']:.1f} | {100 * m['cf_ps']:.1f} | {100 * m['cf_ns']:.1f} | {100 * m['cf_score']:.1f} | "
                f"{100 * m['token_es']:.1f} / {100 * m['token_gs']:.1f} / {100 * m['token_ls']:.1f} | "
                f"{'–' if t is None else f'{t:.1f} s'} | {r['peak_rss_mib']:.0f} MiB |")
    return "\n".join(lines)


def plot(runs: dict[str, dict], seqs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for method in ("horse", "malmen", "memit"):
        pts = sorted((r["n_edits"], 100 * r["edited"]["cf_score"]) for n, r in runs.items()
                     if r["method"] == method and n.startswith("cf-"))
        if pts:
            a.plot(*zip(*pts), marker="o", label=method)
    a.set(xscale="log", xlabel="edits per batch", ylabel="CounterFact Score (%)", title="one-shot batches")
    a.legend()
    for s in seqs:
        xs = [row["edits"] for row in s["rows"]]
        b.plot(xs, [100 * row["retention_es"] for row in s["rows"]], marker="o", label=f"{s['method']} retention ES")
        b.plot(xs, [100 * row["ns"] for row in s["rows"]], linestyle="--", label=f"{s['method']} NS")
    b.set(xlabel="accumulated edits", ylabel="%", title="sequential batches of 100")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=1000, help="CounterFact edit records for the batches of 100")
    p.add_argument("--zsre-limit", type=int, default=300)
    p.add_argument("--methods", default="none,horse,malmen,memit")
    p.add_argument("--skip-1000", action="store_true", help="skip the one batch of 1,000 edits")
    p.add_argument("--skip-memit-1000", action="store_true")
    p.add_argument("--sequential", default="horse,malmen", help="methods for the sequential run ('' = none)")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    methods = [m for m in args.methods.split(",") if m]
    runs: dict[str, dict] = {}
    for m in methods:
        hn = ["--hypernet", str(HYPERNETS / f"smollm2-135m-{m}.safetensors")] if m in ("horse", "malmen") else []
        meth = ["--method", m]
        runs[f"cf-100-{m}"] = run_eval(f"cf-100-{m}", ["--data", str(CF), "--limit", str(args.limit),
                                                       "--n-edits", "100", *meth, *hn])
        if m != "none" and not args.skip_1000 and not (m == "memit" and args.skip_memit_1000):
            runs[f"cf-1000-{m}"] = run_eval(f"cf-1000-{m}", ["--data", str(CF), "--limit", "1000",
                                                             "--n-edits", "1000", *meth, *hn])
        runs[f"zsre-100-{m}"] = run_eval(f"zsre-100-{m}", ["--data", str(ZSRE), "--limit", str(args.zsre_limit),
                                                           "--n-edits", "100", *meth, *hn])
    seqs = [sequential(10, 100, m, HYPERNETS / f"smollm2-135m-{m}.safetensors")
            for m in args.sequential.split(",") if m]
    header = (f"Measured {date.today()} on {platform.machine()} CPU ({os.cpu_count()} cores, no GPU), "
              f"`python benchmarks/edit_quality.py {' '.join(sys.argv[1:])}`.")
    seq_lines = ["", "| sequential | edits | retention ES | first batch ES | PS | NS |", "|---|---|---|---|---|---|"]
    for s in seqs:
        for row in s["rows"]:
            seq_lines.append(f"| {s['method']} | {row['edits']} | {100 * row['retention_es']:.1f} | "
                             f"{100 * row['first_batch_es']:.1f} | {100 * row['ps']:.1f} | {100 * row['ns']:.1f} |")
    (OUT / "results.md").write_text(header + "\n\n" + table(runs) + "\n" + "\n".join(seq_lines) + "\n")
    plot(runs, seqs, OUT / "edit_quality.png")
    print((OUT / "results.md").read_text())


if __name__ == "__main__":
    main()
