"""Materialising a snapshot: the base model plus every delta on the snapshot's chain, in order.

Owns the one definition of "the model at snapshot S": load the base model fresh, then
`horse.deltas.add_deltas_` each snapshot's deltas from the root of the chain to S. The result is
deterministic, so rolling back to S gives the bit-identical weights S was gated and published with; the
weights are never un-edited by subtraction. `weights_digest` (sha256 over the touched modules) is stored
with every snapshot and `horse-ledger verify` recomputes it.

Speed: adding a long chain of deltas costs far more than loading the model, so the materialised weights of
the touched modules of recent snapshots are kept as a derived cache (`daemon.snapshots.write_weights_cache`).
Materialising starts from the newest cached snapshot on the chain — only after checking that the cached
weights hash to that snapshot's recorded digest, so the result is bit-identical either way — and adds the
deltas after it. Deleting the cache never changes a result, only its speed.

    m = materialise(settings, session, snapshot_id)      # None = the unedited base
    m.model, m.tokenizer, m.chain_ids, m.layer_norms()

With the config's `scope = "subject"` the model at S is served scoped: `scoped(...)` puts horse/scope.py's hooks
on it for the subjects of the edits its chain carries (`chain_subjects`).
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy.orm import Session

from daemon import snapshots
from daemon.errors import SnapshotCorrupt
from ledger.config import Settings
from ledger.store import snapshot_chain_in
from ledger.models import Snapshot
from ledger.snapshot_reads import chain_subjects, head_id  # noqa: F401 - re-exported to the daemon


def resolve_device(device: str) -> str:
    """settings.device → a torch device string ("auto" = cuda:0 when CUDA is available, else cpu)."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


def resolve_device_map(device: str) -> str | None:
    """settings.device → accelerate's device_map: "auto" with several GPUs spreads the model over them."""
    return "auto" if device == "auto" and torch.cuda.device_count() > 1 else None


def resolve_dtype(dtype: str) -> torch.dtype:
    """settings.dtype → torch dtype."""
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        from daemon.errors import DaemonError
        raise DaemonError(f"dtype = {dtype!r} is not supported; use float32 or bfloat16") from None


def load_base(settings: Settings):
    """The unedited base model and its tokenizer, as configured."""
    from horse.zoo import load_model

    model, tokenizer = load_model(settings.model, device=resolve_device(settings.device),
                                  dtype=resolve_dtype(settings.dtype), cache_dir=settings.cache_dir or None,
                                  progress=False, device_map=resolve_device_map(settings.device))
    model.eval()
    return model, tokenizer


def chain(session: Session, snapshot_id: int | None) -> list[Snapshot]:
    """The snapshots from the root of the chain to `snapshot_id`, root first ([] for the base)."""
    return snapshot_chain_in(session, snapshot_id)


@dataclass(frozen=True)
class ChainLink:
    """What materialisation needs from a snapshot row (detached from any session)."""

    id: int
    path: str
    sha256: str
    weights_sha256: str | None = None   # digest of the materialised touched modules (snapshot metrics)
    weights_modules: tuple[str, ...] = ()
    kind: str = "incremental"           # "routed": a route file (daemon/night/routes.py), no weight deltas


@dataclass
class Materialised:
    """A model at a snapshot, with what is needed to measure how far it moved from the base."""

    model: Any
    tokenizer: Any
    snapshot_id: int | None
    chain_ids: list[int]
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)   # fp32 copies of touched modules
    timings_s: dict[str, float] = field(default_factory=dict)
    # `materialise(..., keep_after=k)`: exact copies (model dtype) of the tracked modules after the first k links
    start_weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def touched_modules(self) -> list[str]:
        return sorted(self.base_weights)

    def track(self, module_names: Sequence[str]) -> None:
        """Also keep base copies of these modules (before they are edited), for norms and digests."""
        from horse.arch import get_module

        for name in module_names:
            if name not in self.base_weights:
                if self.chain_ids:
                    raise AssertionError(f"{name} must be tracked before the first delta is added")
                self.base_weights[name] = get_module(self.model, name).weight.detach().float().cpu().clone()

    def reset_to_start(self) -> None:
        """Put the weights kept by `keep_after` back into every tracked module, the base's where none were kept
        (without `keep_after`: the base model; a module first touched after those links was at its base value
        there). Exact: they are copies."""
        from horse.arch import get_module

        with torch.no_grad():
            for name, weight in self.base_weights.items():
                module = get_module(self.model, name)
                module.weight.copy_(self.start_weights.get(name, weight).to(module.weight.device, module.weight.dtype))

    def layer_norms(self) -> dict[str, float]:
        """Per-layer Frobenius norm of the cumulative delta (current weights − base weights), fp32."""
        return layer_norms(self.model, self.base_weights)


def layer_norms(model, base_weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Frobenius norm of (W − W_base) per module (layout-independent), as floats."""
    from horse.arch import get_module

    return {name: float(torch.linalg.norm(get_module(model, name).weight.detach().float().cpu() - base))
            for name, base in sorted(base_weights.items())}


def weights_digest(model, module_names: Sequence[str]) -> str:
    """sha256 over the current weights of `module_names` (name, dtype, shape, raw bytes), in name order."""
    from horse.arch import get_module

    digest = hashlib.sha256()
    for name in sorted(module_names):
        weight = get_module(model, name).weight.detach().contiguous().cpu()
        digest.update(f"{name}|{weight.dtype}|{tuple(weight.shape)}|".encode())
        digest.update(weight.view(torch.uint8).numpy().tobytes() if weight.numel() else b"")
    return digest.hexdigest()


def scope_index(settings: Settings, tokenizer, subjects: Iterable[str]):
    """The subjects' index (horse/scope.py) when the config's `scope` is "subject" (or "routed": a joint chain
    published before routing is served scoped by subject); None when it is "off"."""
    if settings.scope == "off":
        return None
    from horse.scope import SubjectIndex

    return SubjectIndex.build(tokenizer, subjects)


def scoped(model, tokenizer, base_weights: dict[str, torch.Tensor], index, more_subjects: Iterable[str] = ()):
    """While inside: `model`'s deltas (its weights − `base_weights`) act only in the scope of `index` plus
    `more_subjects` (horse/scope.py); nothing changes when `index` is None (scope = off)."""
    if index is None:
        return contextlib.nullcontext()
    from horse.scope import Scope

    return Scope(model, base_weights, index.extended(tokenizer, more_subjects))


def links(session: Session, snapshot_id: int | None) -> list[ChainLink]:
    """The chain of `snapshot_id` as detached links, root first."""
    return [link_of(s) for s in chain(session, snapshot_id)]


def link_of(snap: Snapshot) -> ChainLink:
    m = snap.metrics or {}
    return ChainLink(snap.id, snap.path, snap.sha256, m.get("weights_sha256"), tuple(m.get("weights_modules") or ()),
                     snap.kind)


def materialise(settings: Settings, chain_links: Sequence[ChainLink], *, track: Sequence[str] = (),
                model_and_tokenizer: tuple[Any, Any] | None = None,
                after_each: Callable[[ChainLink, Materialised], None] | None = None,
                use_cache: bool = True, keep_after: int | None = None) -> Materialised:
    """Load the base model and add the deltas of `chain_links` in order.

    Args:
        chain_links: from `links(session, snapshot_id)`, root first.
        track: modules to keep base copies of even when the chain does not touch them (the editor's).
        model_and_tokenizer: a freshly loaded, unedited base model to reuse instead of loading one.
        after_each: called after each snapshot's deltas are added (verify checks every step's digest).
        use_cache: start from the newest verified weights cache on the chain (verify turns it off).
        keep_after: keep exact copies of the tracked modules once the first `keep_after` links are added
            (`Materialised.start_weights`, `reset_to_start`): nights derived from a consolidated snapshot.
    Raises:
        SnapshotCorrupt: a file is missing, altered (sha256) or holds NaN/Inf.
    """
    from horse.deltas import add_deltas_

    t0 = time.perf_counter()
    model, tokenizer = model_and_tokenizer or load_base(settings)
    t_load = time.perf_counter() - t0
    m = Materialised(model=model, tokenizer=tokenizer, snapshot_id=chain_links[-1].id if chain_links else None,
                     chain_ids=[])
    m.track(track)
    t_read = t_add = 0.0
    start = 0
    t1 = time.perf_counter()
    if use_cache and after_each is None:  # a cache past the links to keep would skip them
        start = _start_from_cache(settings, chain_links if keep_after is None else chain_links[:keep_after], m)
    t_cache = time.perf_counter() - t1
    from horse.arch import get_module

    def keep() -> None:
        m.start_weights = {n: get_module(model, n).weight.detach().clone() for n in m.base_weights}

    if keep_after is not None and start == keep_after:
        keep()
    for i, link in enumerate(chain_links[start:], start=start):
        if link.kind == "routed":  # routes change no weight (daemon/night/routes.py serves them)
            m.chain_ids.append(link.id)
            continue
        t1 = time.perf_counter()
        deltas, _meta = snapshots.read_snapshot(settings.snapshot_dir, link.path, sha256=link.sha256)
        t2 = time.perf_counter()
        bad = [name for name, d in deltas.items() if not d.is_finite()]
        if bad:
            raise SnapshotCorrupt(f"snapshot {link.id} holds NaN/Inf in {bad[:3]}; roll back past it")
        new = [n for n in deltas if n not in m.base_weights]
        if new:
            for name in new:  # first touched by this snapshot: the chain so far left it at its base value
                m.base_weights[name] = get_module(model, name).weight.detach().float().cpu().clone()
        with torch.no_grad():
            add_deltas_(model, deltas)
        m.chain_ids.append(link.id)
        t_read += t2 - t1
        t_add += time.perf_counter() - t2
        if after_each is not None:
            after_each(link, m)
        if keep_after is not None and i + 1 == keep_after:
            keep()
    m.timings_s = {"load": t_load, "cache": t_cache, "read": t_read, "add": t_add,
                   "total": time.perf_counter() - t0, "from_cache": float(start)}
    return m


def _start_from_cache(settings: Settings, chain_links: Sequence[ChainLink], m: Materialised) -> int:
    """Load the newest valid weights cache on the chain into m.model; return how many links it covers."""
    from horse.arch import get_module

    for i in range(len(chain_links) - 1, -1, -1):
        link = chain_links[i]
        if not link.weights_sha256 or not link.weights_modules:
            continue
        weights = snapshots.read_weights_cache(settings.snapshot_dir, settings.model, link.id)
        if weights is None or set(weights) != set(link.weights_modules):
            continue
        saved = {}
        with torch.no_grad():
            for name, w in weights.items():
                param = get_module(m.model, name).weight
                if tuple(param.shape) != tuple(w.shape) or param.dtype != w.dtype:
                    break
                if name not in m.base_weights:
                    m.base_weights[name] = param.detach().float().cpu().clone()
                saved[name] = param.detach().clone()
                param.copy_(w.to(param.device))
            else:
                if weights_digest(m.model, link.weights_modules) == link.weights_sha256:
                    m.chain_ids.extend(c.id for c in chain_links[:i + 1])
                    return i + 1
        with torch.no_grad():  # a stale or damaged cache: put the base weights back, ignore it
            for name, original in saved.items():
                get_module(m.model, name).weight.copy_(original)
    return 0
