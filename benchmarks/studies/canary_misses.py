"""What the routed lifelong run's canary misses are: each canary prompt whose greedy next token the head changes,
sorted into an intended change (an edit of a subject it names contradicts the canary's answer: the edit's
`target_true` is that answer), a longer name (the edited subject's name sits inside a longer capitalised name,
e.g. "Nintendo 3DS" for "Nintendo"), or same-subject locality (another fact about an edited subject moved).

    python benchmarks/studies/canary_misses.py      # benchmarks/results/lifelong-routed/run1/canary-misses.json
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def kind(prompt: str, answer: str, subjects: set[str], edits: list) -> str:
    if any((e.target_true or "").strip().lower() == answer.strip().lower() for e in edits):
        return "intended"
    for s in subjects:
        for m in re.finditer(rf"(?<!\w){re.escape(s)}(?!\w)", prompt):
            before, after = prompt[:m.start()], prompt[m.end():]
            if re.match(r"\s+[A-Z0-9]", after) or re.search(r"[A-Z][\w.-]*\s+$", before):
                return "longer name"
    return "same-subject locality"


def main() -> None:
    import torch

    from daemon.materialise import load_base
    from horse import metrics
    from horse.route import Router, named_in
    from ledger.config import load_settings
    from ledger.store import Store
    from lifelong_routed import served

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", type=Path, default=ROOT / "benchmarks/results/lifelong-routed/run1")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = load_settings(environ={}, db_url=f"sqlite:///{args.run / 'ledger.db'}", model="smollm2-135m",
                             data_dir=str(args.run), snapshot_dir=str(args.run / "snapshots"), log_json="false",
                             review="off")
    store = Store(settings.db_url)
    model, tok = load_base(settings)
    head, table = served(settings, store, tok)
    canary = [json.loads(x) for x in (ROOT / "daemon/assets/canary.jsonl").read_text().splitlines()]
    prompts = [c["prompt"] for c in canary]
    base = metrics.next_token_ids(model, tok, prompts)
    with Router(model, table):
        routed = metrics.next_token_ids(model, tok, prompts)
    named = named_in(prompts, tok, table)
    misses = []
    for i, c in enumerate(canary):
        if int(base[i]) == int(routed[i]):
            continue
        subjects = {table.routes[k].names[0] for k in named[i]}
        edits = store.get_edits(sorted({int(x) for k in named[i] for x in table.routes[k].edit_ids}))
        misses.append({"prompt": c["prompt"], "answer": c["answer"], "subjects": sorted(subjects),
                       "edits": [f"{e.rendered_prompt} → {e.target_new} (was {e.target_true})" for e in edits],
                       "base": tok.decode([int(base[i])]), "routed": tok.decode([int(routed[i])]),
                       "kind": kind(c["prompt"], c["answer"], subjects, edits)})
    counts: dict[str, int] = {}
    for m in misses:
        counts[m["kind"]] = counts.get(m["kind"], 0) + 1
    out = {"head": head, "canary": len(canary), "naming_edited": sum(1 for n in named if n), "misses": len(misses),
           "by_kind": counts, "rows": misses}
    (args.run / "canary-misses.json").write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: out[k] for k in ("head", "canary", "naming_edited", "misses", "by_kind")}))


if __name__ == "__main__":
    main()
