"""Reading snapshots back: list them, diff two of them, verify files and materialisation.

Owns `horse-ledger snapshots`, `diff` and `verify`'s logic (the CLI only formats). Nothing here writes.

    rows = snapshot_rows(store, "tiny-llama")
    report = verify(settings, store, snapshot_id=None)   # None = the head; report.ok
    d = diff(store, "tiny-llama", 3, 5)
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from daemon import snapshots
from daemon.errors import SnapshotCorrupt
from daemon.materialise import ChainLink, Materialised, chain, head_id, link_of, materialise, weights_digest
from ledger.config import Settings
from ledger.models import as_utc
from ledger.snapshot_reads import (carried_edits, edit_counts, model_snapshot_paths, model_snapshots, snapshot_edit_ids,
                                   snapshot_of)
from ledger.store import Store

# Numbers `diff` compares, with where they live in a snapshot's metrics.
DIFF_METRICS = {
    "efficacy_mean": ("efficacy_mean",),
    "canary_agreement": ("gate", "canary_agreement"),
    "protected_flip_share": ("gate", "protected_flip_share"),
    "retention": ("gate", "retention"),
    "retention_abs": ("gate", "retention_abs"),
    "cumulative_norm_max": ("cumulative_norm_max",),
    "bytes_per_edit": ("bytes_per_edit",),
    "chain_length": ("chain_length",),
}


def _get(d: dict[str, Any] | None, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def snapshot_rows(store: Store, base_model: str) -> list[dict[str, Any]]:
    """Every snapshot of a base model, oldest first, as JSON-able dicts (the head marked)."""
    with store.session(write=False) as s:
        head = head_id(s, base_model)
        snaps = model_snapshots(s, base_model)
        counts = edit_counts(s, [snap.id for snap in snaps])
        rows = []
        for snap in snaps:
            m = snap.metrics or {}
            rows.append({
                "id": snap.id, "parent_id": snap.parent_id, "batch_id": snap.batch_id, "kind": snap.kind,
                "status": snap.status, "is_head": snap.id == head,
                "created_at": as_utc(snap.created_at).isoformat().replace("+00:00", "Z"),
                "n_edits": counts.get(snap.id, 0), "bytes": snap.bytes, "sha256": snap.sha256, "path": snap.path,
                "efficacy_mean": m.get("efficacy_mean"),
                "canary_agreement": _get(m, ("gate", "canary_agreement")),
                "retention": _get(m, ("gate", "retention")),
                "protected_flip_share": _get(m, ("gate", "protected_flip_share")),
                "cumulative_norm_max": m.get("cumulative_norm_max"),
                "layer_norms": m.get("layer_norms", {}),
            })
    return rows


def diff(store: Store, base_model: str, a: int | None, b: int | None) -> dict[str, Any]:
    """Which edits differ between the models at snapshots a and b (None = base), and how the numbers moved."""
    with store.session(write=False) as s:
        sa, sb = snapshot_of(s, base_model, a), snapshot_of(s, base_model, b)
        ea, eb = carried_edits(s, a), carried_edits(s, b)
        ma, mb = (sa.metrics or {}) if sa else {}, (sb.metrics or {}) if sb else {}
        moved = {}
        for name, path in DIFF_METRICS.items():
            va, vb = _get(ma, path), _get(mb, path)
            delta = (vb - va) if isinstance(va, (int, float)) and isinstance(vb, (int, float)) else None
            moved[name] = {"a": va, "b": vb, "change": delta}
        norms_a, norms_b = ma.get("layer_norms", {}) or {}, mb.get("layer_norms", {}) or {}
        layer_norms = {n: {"a": norms_a.get(n, 0.0 if sa is None else None), "b": norms_b.get(n, 0.0 if sb is None else None)}
                       for n in sorted(set(norms_a) | set(norms_b))}
        return {"base_model": base_model, "a": a, "b": b,
                "chain_a": [c.id for c in chain(s, a)], "chain_b": [c.id for c in chain(s, b)],
                "only_in_a": sorted(ea - eb), "only_in_b": sorted(eb - ea), "in_both": len(ea & eb),
                "metrics": moved, "layer_norms": layer_norms}


@dataclass
class Check:
    snapshot_id: int | None
    name: str
    ok: bool
    detail: str = ""


@dataclass
class VerifyReport:
    base_model: str
    snapshot_id: int | None
    checks: list[Check] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, snapshot_id: int | None, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(snapshot_id, name, bool(ok), detail))
        return bool(ok)

    def to_dict(self) -> dict[str, Any]:
        return {"base_model": self.base_model, "snapshot_id": self.snapshot_id, "ok": self.ok,
                "checks": [asdict(c) for c in self.checks], "orphans": self.orphans}


def verify(settings: Settings, store: Store, snapshot_id: int | None = None, *, materialise_check: bool = True,
           use_head: bool = True) -> VerifyReport:
    """Check a snapshot and every snapshot under it: files (exist, size, sha256, parse, finite, metadata)
    and, unless `materialise_check=False`, that materialising the chain reproduces each snapshot's recorded
    weights digest bit for bit and that the weights are finite.

    Args:
        snapshot_id: the snapshot to check; None with use_head = the head (None with no head: nothing to check).
    """
    import torch

    base_model = settings.model
    with store.session(write=False) as s:
        if snapshot_id is None and use_head:
            snapshot_id = head_id(s, base_model)
        target = snapshot_of(s, base_model, snapshot_id)
        rows = chain(s, snapshot_id)
        info = {r.id: {"path": r.path, "sha256": r.sha256, "bytes": r.bytes, "parent_id": r.parent_id,
                       "metrics": dict(r.metrics or {}),
                       "edit_ids": snapshot_edit_ids(s, r.id)}
                for r in rows}
        referenced = model_snapshot_paths(s, base_model)
        chain_links = [link_of(r) for r in rows]
    del target
    report = VerifyReport(base_model=base_model, snapshot_id=snapshot_id)
    files_ok = True
    for link in chain_links:
        meta_row = info[link.id]
        try:
            path = snapshots.resolve(settings.snapshot_dir, link.path)
        except SnapshotCorrupt as exc:  # an absolute path, '..' or a symlink out: never read
            report.add(link.id, "path inside snapshot_dir", False, str(exc))
            files_ok = False
            continue
        if not report.add(link.id, "file exists", path.is_file(), str(path)):
            files_ok = False
            continue
        size = path.stat().st_size
        report.add(link.id, "size", size == meta_row["bytes"], f"{size} bytes, recorded {meta_row['bytes']}")
        digest = snapshots.hash_file(path)
        if not report.add(link.id, "sha256", digest == link.sha256, f"{digest[:16]}…, recorded {link.sha256[:16]}…"):
            files_ok = False
            continue
        if link.kind == "routed":
            files_ok &= _verify_routes_file(settings, report, link, meta_row)
            continue
        try:
            deltas, meta = snapshots.read_snapshot(settings.snapshot_dir, link.path)
        except SnapshotCorrupt as exc:
            report.add(link.id, "readable, finite", False, str(exc))
            files_ok = False
            continue
        finite = all(d.is_finite() for d in deltas.values())
        report.add(link.id, "readable, finite", finite, f"{len(deltas)} layers")
        parent = meta.get("parent_snapshot", "")
        expected_parent = "" if meta_row["parent_id"] is None else str(meta_row["parent_id"])
        report.add(link.id, "metadata: parent", parent == expected_parent, f"file {parent or 'base'}, row "
                   f"{expected_parent or 'base'}")
        report.add(link.id, "metadata: base model", meta.get("base_model") == base_model, meta.get("base_model", ""))
        try:
            file_edits = sorted(json.loads(meta.get("edit_ids", "[]")))
        except json.JSONDecodeError:
            file_edits = None
        report.add(link.id, "metadata: edits", file_edits == meta_row["edit_ids"],
                   f"{len(meta_row['edit_ids'])} edits")
    report.orphans = [str(p) for p in _orphans(settings, base_model, referenced)]

    if materialise_check and files_ok and chain_links and chain_links[0].kind == "routed":
        _verify_routed_chain(settings, report, chain_links, info)
    elif materialise_check and files_ok and chain_links:
        def check_step(link: ChainLink, m: Materialised) -> None:
            metrics = info[link.id]["metrics"]
            recorded, modules = metrics.get("weights_sha256"), metrics.get("weights_modules")
            if not recorded or not modules:
                report.add(link.id, "materialised weights digest", True, "no digest recorded (older snapshot)")
                return
            actual = weights_digest(m.model, modules)
            report.add(link.id, "materialised weights digest", actual == recorded,
                       f"{actual[:16]}…, recorded {recorded[:16]}…")

        try:
            m = materialise(settings, chain_links, after_each=check_step)
            finite = all(bool(torch.isfinite(p).all()) for p in m.model.parameters())
            report.add(snapshot_id, "materialised model finite", finite, f"chain {m.chain_ids}")
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            report.add(snapshot_id, "materialises", False, f"{type(exc).__name__}: {exc}")
    return report


def _verify_routes_file(settings: Settings, report: VerifyReport, link: ChainLink, meta_row: dict) -> bool:
    """A routed snapshot's file: readable routes whose factors match their digests and are finite, and
    metadata that agrees with the row."""
    from daemon.night.routes import read_routes
    from horse.route import RouteError, check_table, load_table

    try:
        table, _removed = read_routes(settings, link)
        check_table(table)
        _, meta = load_table(snapshots.resolve(settings.snapshot_dir, link.path), lazy=True)
    except (SnapshotCorrupt, RouteError) as exc:
        report.add(link.id, "readable, finite", False, str(exc))
        return False
    report.add(link.id, "readable, finite", True, f"{len(table.routes)} subjects")
    expected_parent = "" if meta_row["parent_id"] is None else str(meta_row["parent_id"])
    report.add(link.id, "metadata: parent", meta.get("parent_snapshot", "") == expected_parent,
               f"file {meta.get('parent_snapshot') or 'base'}, row {expected_parent or 'base'}")
    report.add(link.id, "metadata: base model", meta.get("base_model") == settings.model, meta.get("base_model", ""))
    file_edits = sorted({i for r in table.routes.values() for i in r.edit_ids})
    report.add(link.id, "metadata: edits", file_edits == meta_row["edit_ids"], f"{len(file_edits)} edits")
    return True


def _verify_routed_chain(settings: Settings, report: VerifyReport, chain_links: list[ChainLink], info: dict) -> None:
    """Folding the chain's routes reproduces each snapshot's recorded digest (`weights_sha256`)."""
    from daemon.night.routes import head_table
    from daemon.materialise import load_base
    from horse.route import table_digest

    _, tok = load_base(settings)
    for i, link in enumerate(chain_links):
        recorded = info[link.id]["metrics"].get("weights_sha256")
        try:
            actual = table_digest(head_table(settings, chain_links[:i + 1], tok))
        except Exception as exc:  # noqa: BLE001 - reported as a failed check
            report.add(link.id, "routes digest", False, f"{type(exc).__name__}: {exc}")
            return
        report.add(link.id, "routes digest", actual == recorded, f"{actual[:16]}…, recorded {str(recorded)[:16]}…")


def _orphans(settings: Settings, base_model: str, referenced: list[str]):
    directory = snapshots.model_dir(settings.snapshot_dir, base_model)
    if not directory.is_dir():
        return []
    keep = set()
    for p in referenced:
        try:
            keep |= {snapshots.resolve(settings.snapshot_dir, p).resolve(),
                     snapshots.normaliser_path(settings.snapshot_dir, p).resolve()}
        except SnapshotCorrupt:  # reported by the chain's checks; names nothing here
            continue
    return [p for p in sorted(directory.iterdir()) if p.is_file() and not p.is_symlink() and p.resolve() not in keep
            and snapshots.is_snapshot_file_name(p.name)]


def fmt_float(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)
