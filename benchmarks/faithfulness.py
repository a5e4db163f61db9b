"""The faithfulness check (issue 5): our HORSE and MALMEN at the public code's settings, over several seeds,
against the public code's numbers (benchmarks/REFERENCE_RESULTS.md).

    python benchmarks/faithfulness.py                          # seeds 0,1,2 of both, CPU, resumable
    python benchmarks/faithfulness.py --seeds 0,1,2,3 --device cuda --jobs 4
    python benchmarks/faithfulness.py --report-only            # the table from what is finished

For each variant and seed it meta-trains a hypernet exactly as the reference did (100 meta-steps x 100
CounterFact-train edits, rank 1920, 2 blocks, eta 1e-5, Adam 1e-5, clip 1, LM mini-batch 25, the last six
MLP output linears) into <out>/hypernets/<variant>-s<seed>.safetensors (about 65 MB each in fp32; keep them
out of git, their training logs are kept beside), evaluates it on CounterFact edit-1k in 10 batches of 100
edits, each from the unedited model (`python -m horse.evalcli --json`, as benchmarks/edit_quality.py does),
and writes <out>/<variant>-s<seed>.json. A meta-step takes about 11 s on 2 CPU threads (about 20 s on one
thread with two trainings side by side), so one training is about 20 min on an idle CPU.

results.md has every seed, the mean and sample standard deviation over seeds, the reference's single run,
and for each metric whether the reference is within noise of our seeds: the reference is one unseeded run,
so it agrees when |ref - mean| <= 2 sd sqrt(1 + 1/n) for n seeds with sample sd `sd` (at least two seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_quality import CF, machine, run_child  # noqa: E402

TRAIN = ROOT / "data" / "counterfact" / "counterfact-train.json"
REFERENCE_SETTINGS = ["--n-edits", "100", "--steps", "100", "--rank", "1920", "--blocks", "2", "--lr", "1e-5",
                      "--eta-init", "1e-5", "--lm-batch-size", "25"]
METRICS = ("cf_es", "cf_ps", "cf_ns", "token_es", "token_gs", "token_ls")
# benchmarks/REFERENCE_RESULTS.md, "Edits towards target_new": the public code on SmolLM2, edit-1k, batches of 100
REFERENCE = {
    "horse": {"cf_es": 91.7, "cf_ps": 53.5, "cf_ns": 54.0, "token_es": 89.5, "token_gs": 27.8, "token_ls": 27.9},
    "malmen": {"cf_es": 99.1, "cf_ps": 58.6, "cf_ns": 43.3, "token_es": 78.2, "token_gs": 24.4, "token_ls": 9.4},
}


def seed_stats(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def within_noise(reference: float, values: list[float]) -> bool | None:
    """Whether one independent run `reference` agrees with our seeds `values`: |ref − mean| ≤ 2 sd·√(1 + 1/n)
    (the sd of a single run's difference from an n-seed mean). None with fewer than two seeds."""
    if len(values) < 2:
        return None
    mean, sd = seed_stats(values)
    return abs(reference - mean) <= 2 * sd * (1 + 1 / len(values)) ** 0.5


def table(runs: dict[str, dict[int, dict]]) -> str:
    """Markdown: per variant, one row per seed, mean +- sd, the reference, and the within-noise verdicts."""
    head = "| run | ES | PS | NS | token ES | token GS | token LS |"
    lines = [head, "|---" * 7 + "|"]
    for variant, by_seed in runs.items():
        pct = {s: {m: 100 * r["edited"][m] for m in METRICS} for s, r in sorted(by_seed.items())}
        for s, row in pct.items():
            lines.append(f"| {variant} seed {s} | " + " | ".join(f"{row[m]:.1f}" for m in METRICS) + " |")
        if not pct:
            continue
        stats = {m: seed_stats([row[m] for row in pct.values()]) for m in METRICS}
        lines.append(f"| **{variant} mean ± sd ({len(pct)} seed{'s' if len(pct) > 1 else ''})** | "
                     + " | ".join(f"{mu:.1f} ± {sd:.1f}" for mu, sd in stats.values()) + " |")
        ref = REFERENCE[variant]
        lines.append(f"| {variant}, public code (1 run) | " + " | ".join(f"{ref[m]:.1f}" for m in METRICS) + " |")
        verdicts = [within_noise(ref[m], [row[m] for row in pct.values()]) for m in METRICS]
        lines.append("| public code within noise? | " + " | ".join(
            "n/a (1 seed)" if v is None else ("yes" if v else "**no**") for v in verdicts) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default="horse,malmen")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--jobs", type=int, default=1, help="variant/seed pairs at a time")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faithfulness")
    p.add_argument("--report-only", action="store_true", help="write the table from finished runs; run nothing")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    hn_dir = args.out / "hypernets"
    hn_dir.mkdir(parents=True, exist_ok=True)
    if args.device == "cpu" and args.jobs > 1:  # children share the cores instead of each taking all of them
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    stamp = {"machine": machine(args.device), "date": str(date.today()), "jobs": args.jobs}

    def one(job: tuple[str, int]) -> tuple[str, int, dict | None]:
        variant, seed = job
        result = args.out / f"{variant}-s{seed}.json"
        if args.report_only:
            return variant, seed, json.loads(result.read_text()) if result.exists() else None
        hn = hn_dir / f"{variant}-s{seed}.safetensors"
        if not hn.is_file():
            cmd = [sys.executable, "-m", "horse.cli", "train", "--model", "smollm2-135m", "--data", str(TRAIN),
                   "--variant", variant, *REFERENCE_SETTINGS, "--seed", str(seed), "--device", args.device,
                   "--checkpoint-every", "50", "--quiet", "--out", str(hn)]
            print(f"training {variant} seed {seed}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
        evalcmd = [sys.executable, "-m", "horse.evalcli", "--json", "--model", "smollm2-135m", "--device",
                   args.device, "--data", str(CF), "--limit", "1000", "--n-edits", "100", "--method", variant,
                   "--hypernet", str(hn)]
        report = run_child(result, evalcmd, {**stamp, "seed": seed})
        return variant, seed, report

    jobs = [(v, s) for v in variants for s in seeds]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        done = list(pool.map(one, jobs))
    runs: dict[str, dict[int, dict]] = {v: {} for v in variants}
    for variant, seed, report in done:
        if report is not None:
            runs[variant][seed] = report
    where = sorted({f"{r.get('machine', '?')} on {r.get('date', '?')}" for by in runs.values() for r in by.values()})
    header = (f"Edits of CounterFact edit-1k in 10 batches of 100 on SmolLM2-135M, hypernets trained at the "
              f"reference settings (benchmarks/REFERENCE_RESULTS.md); measured on {'; '.join(where)}; "
              f"`python benchmarks/faithfulness.py {' '.join(sys.argv[1:])}`. Percentages.")
    (args.out / "results.md").write_text(header + "\n\n" + table(runs))
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
