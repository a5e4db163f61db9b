"""Each lifelong metric against accumulated edits, every run on one figure: the routed defaults
(benchmarks/lifelong_routed.py), the joint warm hybrid served scoped and unscoped (benchmarks/lifelong.py), and
fine-tune-the-ledger and one from-base HORSE solve (benchmarks/studies/from_base_endpoint.py).

    python benchmarks/lifelong_plot.py          # writes benchmarks/results/lifelong-routed/lifelong.png

The joint runs' canary is the earlier canary (half CounterFact-train locality prompts); the routed run's is the
current one (CounterFact validation locality prompts), so their canary panels compare shape, not level.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks/results"
HYBRID = RESULTS / "lifelong/horse-consolidate3-protect1-foldfinetune-fromfold-swap1-warm"
PANELS = (("retention_token", "retention teacher-forced (%)", 100), ("retention_gen", "retention generated (%)", 100),
          ("first_token", "first night's edits t.-f. (%)", 100), ("ns", "neighbourhood score NS (%)", 100),
          ("canary_agreement_with_base", "canary agreement with base", 1),
          ("perplexity_ratio", "perplexity × base (canary texts)", 1), ("night_s", "night wall time (s)", 1),
          ("bytes_per_edit_kb", "stored bytes per edit (kB)", 1))


def jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def runs() -> dict[str, list[dict]]:
    """Run name → points (dicts with `edits` and any of the PANELS' keys)."""
    routed = []
    for r in jsonl(RESULTS / "lifelong-routed/run1/rows.jsonl"):
        routed.append({**r, "night_s": r["night_last_s"],  # edits = applied (the x of every run)
                       "bytes_per_edit_kb": r["bytes_per_edit_files"] / 1e3})
    hybrid = [r for r in jsonl(HYBRID / "rows.jsonl") if "retention_token" in r]
    scoped = [json.loads(p.read_text()) for p in sorted((HYBRID / "measured").glob("night-*-scoped.json"))]
    night_s = {r["night"]: r["night_s"] for r in jsonl(HYBRID / "rows.jsonl")}
    scoped = [{**r, "night_s": night_s.get(r["night"])} for r in scoped]
    return {"routed (defaults)": routed,
            "routed, texts naming an edited subject": [
                {"edits": r["edits"], "perplexity_ratio": r["perplexity_ratio_naming"]} for r in routed
                if r.get("perplexity_ratio_naming") is not None],
            "joint warm hybrid, served scoped": scoped, "joint warm hybrid, unscoped": hybrid,
            "fine-tune-the-ledger (from base)": jsonl(RESULTS / "lifelong/endpoint-finetune/rows.jsonl"),
            "one HORSE solve from base": jsonl(RESULTS / "lifelong/endpoint-horse/rows.jsonl")}


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(17, 7.5))
    data = runs()
    for ax, (key, label, scale) in zip(axes.flat, PANELS):
        for i, (name, rows) in enumerate(data.items()):
            pts = [(r["edits"], scale * r[key]) for r in rows if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, color=f"C{i}", label=name,
                        linestyle="-" if len(pts) > 1 else "none")
        if key == "ns":
            base = [(r["edits"], 100 * r["ns_unedited"]) for r in data["routed (defaults)"]]
            if base:
                ax.plot(*zip(*base), color="grey", linestyle=":", label="unedited (routed run's sample)")
        if key == "perplexity_ratio":
            ax.set_yscale("log")
        if key in ("bytes_per_edit_kb", "night_s"):
            ax.set_ylim(bottom=0)
        ax.set(xlabel="accumulated (applied) edits", title=label)
        ax.grid(alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out = RESULTS / "lifelong-routed/lifelong.png"
    fig.savefig(out, dpi=100)
    print(out)


if __name__ == "__main__":
    main()
