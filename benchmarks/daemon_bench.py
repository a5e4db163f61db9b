"""Daemon benchmark (issue 4): materialising the head vs a plain model load, one nightly batch end to end
split by stage, and snapshot bytes per edit. Not a timed test; it prints a table and writes JSON.

    python benchmarks/daemon_bench.py --model tiny-llama
    python benchmarks/daemon_bench.py --model smollm2-135m --edits 100 --snapshots 100 \
        --out benchmarks/results/daemon_smollm2.json

1. One nightly batch: `--edits` CounterFact edits (data/counterfact/counterfact-edit-1k.json) are added to a
   fresh SQLite ledger and `daemon.cycle.run_batch` runs them with the default gate (shipped canary sample).
   Timings by stage come from the batch itself. The hypernet is `--hypernet`, else the shipped one, else a
   fresh (untrained) editor for the model — the cost is the same, the efficacy is not (reported).
2. Materialisation: `--snapshots` snapshot files shaped like that batch's delta (same layers, same factored
   N) are written as one chain. Cold: base load + read + add every delta in order (no cache; what `verify`
   does). Head: what the daemon does each night — base load + the head's verified weights cache (written at
   publish). Both against a plain `load_model`, median of `--repeats`. Target ≤ 2×.
3. Bytes per edit of the real batch's snapshot file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from daemon import snapshots  # noqa: E402
from daemon.cycle import hypernet_path, run_batch  # noqa: E402
from daemon.errors import DaemonError  # noqa: E402
from daemon.materialise import ChainLink, load_base, materialise, weights_digest  # noqa: E402
from horse.deltas import LayerDelta  # noqa: E402
from ledger.config import load_settings  # noqa: E402
from ledger.models import Snapshot, utcnow  # noqa: E402
from ledger.store import Store, set_head  # noqa: E402
from ledger.validate import validate_edit  # noqa: E402


def edit_specs(n: int) -> list:
    from horse.data import load_requests

    specs = []
    for r in load_requests(ROOT / "data" / "counterfact" / "counterfact-edit-1k.json", limit=n):
        raw = {"subject": r.subject, "prompt": r.prompt, "target": r.target,
               "paraphrases": [" ".join(p.split()) for p in r.rephrases[:1] if p.strip()]}
        if r.target_true and r.target_true != r.target:
            raw["target_true"] = r.target_true
        try:
            specs.append(validate_edit(raw))
        except Exception:  # noqa: BLE001 - a record the ledger refuses (e.g. target == target_true) is skipped
            continue
    return specs


def ensure_hypernet(settings, work: Path) -> tuple[str, str]:
    try:
        return str(hypernet_path(settings)), "configured/shipped"
    except DaemonError:
        from horse.editor import Editor
        from horse.hypernet import HyperConfig

        model, _ = load_base(settings)
        path = work / "untrained-hypernet.safetensors"
        rank = 1920 if settings.model == "smollm2-135m" else 64
        Editor.new(model, HyperConfig(rank=rank)).save(path)
        return str(path), "untrained (no shipped hypernet for this model)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-llama")
    ap.add_argument("--hypernet", default="")
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--snapshots", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--min-canary", type=float, default=0.95, help="gate_min_canary_agreement")
    ap.add_argument("--min-efficacy", type=float, default=0.5,
                    help="gate_min_efficacy (0 exercises every stage even with an untrained hypernet)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-batch", type=int, default=0, metavar="N_TOKENS",
                    help="skip the batch; shape the synthetic snapshots as factored deltas of N_TOKENS rows")
    args = ap.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory(prefix="daemon-bench-") as tmp:
        work = Path(tmp)
        settings = load_settings(environ={}, db_url=f"sqlite:///{work / 'ledger.db'}", data_dir=str(work),
                                 model=args.model, hypernet=args.hypernet, device=args.device,
                                 cache_dir=str(Path.home() / ".cache" / "horse-ledger"), log_json="false")
        hn, hn_kind = ensure_hypernet(settings, work)
        settings = load_settings(environ={}, db_url=settings.db_url, data_dir=str(work), model=args.model,
                                 hypernet=hn, device=args.device, cache_dir=settings.cache_dir,
                                 batch_max_edits=args.edits, gate_min_efficacy=args.min_efficacy,
                                 gate_min_canary_agreement=args.min_canary)
        store = Store(settings.db_url)
        store.add_edits(edit_specs(args.edits), actor="bench")

        # 1. one nightly batch end to end
        t0 = time.perf_counter()
        result = run_batch(settings, store) if not args.skip_batch else None
        wall = time.perf_counter() - t0
        snap = store.get_snapshot(result.snapshot_id) if result and result.snapshot_id else None
        batch = {} if result is None else {"status": result.status, "wall_s": wall, "n_applied": len(result.applied),
                 "n_failed": len(result.failed), "n_rejected": len(result.rejected),
                 "stages_s": {k: round(v, 3) for k, v in result.timings_s.items()},
                 "efficacy_mean": result.metrics.get("efficacy_mean"),
                 "gate": {k: (result.metrics.get("gate") or {}).get(k)
                          for k in ("canary_agreement", "protected_flip_share", "retention")},
                 "snapshot_bytes": snap.bytes if snap else None,
                 "bytes_per_edit": (snap.bytes / max(1, len(result.applied))) if snap else None,
                 "hypernet": hn_kind, "gate_min_canary_agreement": args.min_canary}

        # 2. materialise base + N snapshots shaped like the batch's delta
        model, _ = load_base(settings)
        if snap is not None:
            deltas, _ = snapshots.read_snapshot(settings.snapshot_dir, snap.path)
            shapes = {n: (d.keys_NK.shape[0] if d.is_factored else None, d.shape_KV) for n, d in deltas.items()}
        else:
            from horse.arch import default_target_modules, get_module, module_shape_KV
            shapes = {n: (args.skip_batch or 3 * args.edits, module_shape_KV(get_module(model, n)))
                      for n in default_target_modules(model)}
        del model
        chain: list[ChainLink] = []
        parent = None
        for i in range(args.snapshots):
            gen = torch.Generator().manual_seed(i)
            d = {}
            for name, (n, (k, v)) in shapes.items():
                if n is None:
                    d[name] = LayerDelta(dense_KV=torch.randn(k, v, generator=gen) * 1e-4)
                else:
                    d[name] = LayerDelta(keys_NK=torch.randn(n, k, generator=gen) * 1e-2,
                                         coef_NV=torch.randn(n, v, generator=gen) * 1e-4)
            f = snapshots.write_snapshot(settings.snapshot_dir, "bench-chain", f"s{i:04d}", d,
                                         {"parent_snapshot": str(parent or "")})
            with store.session() as s:
                row = Snapshot(parent_id=parent, batch_id=None, base_model="bench-chain", path=f.rel_path,
                               sha256=f.sha256, bytes=f.bytes, created_at=utcnow(), metrics={})
                s.add(row)
                s.flush()
                parent = row.id
                set_head(s, "bench-chain", row.id, actor="bench")
            chain.append(ChainLink(parent, f.rel_path, f.sha256))
        chain_bytes = sum(snapshots.resolve(settings.snapshot_dir, c.path).stat().st_size for c in chain)

        # cold: base + every delta of the chain (what a fresh machine or `verify` does)
        from horse.arch import get_module
        t0 = time.perf_counter()
        m = materialise(settings, chain, use_cache=False)
        cold_s = time.perf_counter() - t0
        cold_split = m.timings_s
        touched = m.touched_modules()
        digest = weights_digest(m.model, touched)
        snapshots.write_weights_cache(settings.snapshot_dir, settings.model, chain[-1].id,
                                      {n: get_module(m.model, n).weight for n in touched})
        del m
        chain[-1] = ChainLink(chain[-1].id, chain[-1].path, chain[-1].sha256, digest, tuple(touched))

        loads, mats, parts = [], [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            load_base(settings)
            loads.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m = materialise(settings, chain)
            mats.append(time.perf_counter() - t0)
            parts.append(m.timings_s)
            del m
        mat = {"plain_load_s": statistics.median(loads), "materialise_s": statistics.median(mats),
               "ratio": statistics.median(mats) / statistics.median(loads), "n_snapshots": args.snapshots,
               "chain_bytes": chain_bytes, "cold_no_cache_s": cold_s,
               "cold_split_s": {k: round(v, 3) for k, v in cold_split.items()},
               "split_s": {k: round(statistics.median(p[k] for p in parts), 3) for k in parts[0]}}
        store.close()

    out = {"model": args.model, "device": args.device, "torch_threads": torch.get_num_threads(),
           "batch": batch, "materialise": mat}
    print(json.dumps(out, indent=2))
    if batch:
        print(f"\n{args.model}: batch of {args.edits} edits: {batch['status']}, {batch['n_applied']} applied, "
          f"{wall:.1f} s wall; snapshot {batch['snapshot_bytes']} bytes = {batch['bytes_per_edit'] or 0:,.0f} B/edit")
        print("  stages: " + ", ".join(f"{k} {v:.2f}s" for k, v in batch["stages_s"].items()))
    print(f"  materialise base + {args.snapshots} snapshots: {mat['materialise_s']:.2f} s vs plain load "
          f"{mat['plain_load_s']:.2f} s = {mat['ratio']:.2f}x (target <= 2x); split {mat['split_s']}")
    print(f"  without the weights cache (cold, every delta added): {mat['cold_no_cache_s']:.2f} s "
          f"= {mat['cold_no_cache_s'] / mat['plain_load_s']:.1f}x; split {mat['cold_split_s']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
