"""Weight deltas: the engine's output, their file format, and exact apply / remove on a model.

Owns `LayerDelta` (one module's change), `Deltas` (a dict keyed by HF module path), the safetensors file
format, applying deltas to a model and restoring it bit-exactly, and the base-model fingerprint.

A delta is always expressed as `delta_KV` (K = d_k module input, V = d_v module output), whatever the
module's weight layout (`horse.arch` maps it onto GPT-2 Conv1D in×out or nn.Linear out×in). It is stored
either dense (`dense_KV`) or factored as `delta_KV = keys_NKᵀ @ coef_NV` (N answer tokens), whichever is
smaller — the ridge solve's dual form gives the factored one for free. Deltas are always fp32; the model
may be bf16: W ← (W.float() + Δ).to(W.dtype). Removing a delta restores a saved copy of the original
tensor, never subtracts (subtracting in bf16 does not give the original back).

File format (safetensors, fp32, no pickle): tensors "<module path>::dense_KV" or "<module path>::keys_NK"
and "<module path>::coef_NV"; str metadata = the caller's keys plus reserved "horse.*" keys (format, layout,
layer list). Written atomically (temp file, fsync, rename, fsync dir).

Run the tests with `pytest tests/horse/test_deltas.py`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from horse.arch import delta_to_weight_layout, get_module, module_shape_KV
from horse.errors import EngineError, NonFiniteDelta

FORMAT = "horse-deltas/1"
LAYOUT = "delta_KV = keys_NK^T @ coef_NV or dense_KV; K = module input (d_k), V = module output (d_v)"
_RESERVED_PREFIX = "horse."
_SEP = "::"


class BadDeltaFile(EngineError):
    """The delta file cannot be read or fails validation; recompute the deltas or restore the file."""


@dataclass(frozen=True)
class LayerDelta:
    """The change of one module's weight, as K×V, dense or factored.

    Exactly one form is set: `dense_KV` (K×V), or `keys_NK` (N×K) with `coef_NV` (N×V) meaning
    delta_KV = keys_NKᵀ @ coef_NV. Tensors are fp32 (converted on construction).
    """

    dense_KV: torch.Tensor | None = None
    keys_NK: torch.Tensor | None = None
    coef_NV: torch.Tensor | None = None

    def __post_init__(self) -> None:
        factored = self.keys_NK is not None or self.coef_NV is not None
        if (self.dense_KV is None) == (not factored) or (factored and (self.keys_NK is None or self.coef_NV is None)):
            raise EngineError("a LayerDelta is either dense_KV, or keys_NK and coef_NV together")
        for field in ("dense_KV", "keys_NK", "coef_NV"):
            value = getattr(self, field)
            if value is not None:
                if value.dim() != 2:
                    raise EngineError(f"LayerDelta.{field} must be 2-D, got shape {tuple(value.shape)}")
                if value.dtype != torch.float32:
                    object.__setattr__(self, field, value.float())
        if factored and self.keys_NK.shape[0] != self.coef_NV.shape[0]:
            raise EngineError(
                f"keys_NK has {self.keys_NK.shape[0]} rows but coef_NV has {self.coef_NV.shape[0]}; they must match"
            )

    @classmethod
    def from_factors(cls, keys_NK: torch.Tensor, coef_NV: torch.Tensor) -> LayerDelta:
        """delta_KV = keys_NKᵀ @ coef_NV, kept factored when N·(K+V) < K·V, else densified."""
        n, k = keys_NK.shape
        v = coef_NV.shape[1]
        if n * (k + v) < k * v:
            return cls(keys_NK=keys_NK, coef_NV=coef_NV)
        return cls(dense_KV=keys_NK.float().t() @ coef_NV.float())

    @property
    def is_factored(self) -> bool:
        return self.dense_KV is None

    @property
    def shape_KV(self) -> tuple[int, int]:
        if self.dense_KV is not None:
            return int(self.dense_KV.shape[0]), int(self.dense_KV.shape[1])
        return int(self.keys_NK.shape[1]), int(self.coef_NV.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name."""
        if self.dense_KV is not None:
            return {"dense_KV": self.dense_KV}
        return {"keys_NK": self.keys_NK, "coef_NV": self.coef_NV}

    def to_dense(self) -> torch.Tensor:
        """delta_KV, K×V fp32."""
        if self.dense_KV is not None:
            return self.dense_KV
        return self.keys_NK.t() @ self.coef_NV

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors().values())

    def to(self, device: str | torch.device) -> LayerDelta:
        return LayerDelta(**{k: v.to(device) for k, v in self.tensors().items()})

    def frobenius_norm(self) -> float:
        """‖delta_KV‖_F, in float64; for the factored form via the N×N Grams, without densifying."""
        if self.dense_KV is not None:
            return float(torch.linalg.matrix_norm(self.dense_KV.double()))
        keys, coef = self.keys_NK.double(), self.coef_NV.double()
        # ‖KᵀC‖²_F = tr(Cᵀ K Kᵀ C) = Σ (K Kᵀ) ⊙ (C Cᵀ)
        return float(((keys @ keys.t()) * (coef @ coef.t())).sum().clamp_min(0.0).sqrt())


Deltas = dict[str, LayerDelta]


def frobenius_norms(deltas: Mapping[str, LayerDelta]) -> dict[str, float]:
    """‖delta_KV‖_F per module path."""
    return {name: d.frobenius_norm() for name, d in deltas.items()}


def sum_deltas(*many: Mapping[str, LayerDelta]) -> Deltas:
    """The sum of several Deltas, per module. Factored parts are concatenated (exact: [K1;K2]ᵀ[C1;C2] =
    K1ᵀC1 + K2ᵀC2) and re-chosen dense/factored by size; a dense part densifies the sum. Order-stable."""
    grouped: dict[str, list[LayerDelta]] = {}
    for deltas in many:
        for name, d in deltas.items():
            grouped.setdefault(name, []).append(d)
    out: Deltas = {}
    for name, parts in grouped.items():
        shapes = {p.shape_KV for p in parts}
        if len(shapes) != 1:
            raise EngineError(f"cannot add deltas of shapes {sorted(shapes)} for {name}; they belong to different models")
        if len(parts) == 1:
            out[name] = parts[0]
        elif all(p.is_factored for p in parts):
            out[name] = LayerDelta.from_factors(
                torch.cat([p.keys_NK for p in parts]), torch.cat([p.coef_NV for p in parts])
            )
        else:
            total = parts[0].to_dense().clone()
            for p in parts[1:]:
                total += p.to_dense().to(total.device)
            out[name] = LayerDelta(dense_KV=total)
    return out


def check_finite(deltas: Mapping[str, LayerDelta]) -> None:
    """Raise NonFiniteDelta naming the first module whose delta holds NaN or Inf."""
    for name, d in deltas.items():
        if not d.is_finite():
            raise NonFiniteDelta(f"the delta for {name} holds NaN or Inf; the batch is refused and nothing was written")


# --------------------------------------------------------------------------- files


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_deltas(path: str | os.PathLike[str], deltas: Mapping[str, LayerDelta], metadata: Mapping[str, str]) -> str:
    """Write `deltas` to a safetensors file atomically; return the file's sha256 (hex).

    Args:
        path: destination file (its directory must exist).
        deltas: module path → LayerDelta; fp32, finite.
        metadata: str → str (base model, snapshot id, …); keys starting with "horse." are reserved.

    Returns:
        sha256 hex digest of the bytes written.

    Raises:
        NonFiniteDelta: a delta holds NaN/Inf (nothing is written).
        EngineError: bad metadata.
    """
    check_finite(deltas)
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise EngineError(f"delta metadata must be str → str; got {key!r}: {type(value).__name__}")
        if key.startswith(_RESERVED_PREFIX):
            raise EngineError(f"metadata key {key!r} is reserved (prefix 'horse.'); rename it")
    tensors: dict[str, torch.Tensor] = {}
    for name, d in deltas.items():
        if _SEP in name:
            raise EngineError(f"module path {name!r} contains {_SEP!r}; it cannot be stored")
        for field, t in d.tensors().items():
            tensors[f"{name}{_SEP}{field}"] = t.detach().to("cpu", torch.float32).contiguous()
    meta = dict(metadata)
    meta["horse.format"] = FORMAT
    meta["horse.layout"] = LAYOUT
    meta["horse.layers"] = json.dumps(list(deltas))
    data = safetensors_save(tensors, metadata=meta)
    digest = hashlib.sha256(data).hexdigest()

    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return digest


def load_deltas(path: str | os.PathLike[str]) -> tuple[Deltas, dict[str, str]]:
    """Read and validate a delta file written by `save_deltas` (safetensors only, no pickle).

    Returns:
        (deltas in the saved layer order, the caller's metadata without the reserved "horse." keys).

    Raises:
        BadDeltaFile: unreadable file, wrong format, inconsistent shapes, non-fp32 or non-finite tensors.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = dict(fh.metadata() or {})
            raw = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise BadDeltaFile(f"cannot read delta file {path}: {exc}; recompute the deltas or restore the file") from exc
    if meta.get("horse.format") != FORMAT:
        raise BadDeltaFile(f"{path} is not a horse delta file (format {meta.get('horse.format')!r}, expected {FORMAT!r})")
    try:
        layers = json.loads(meta["horse.layers"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise BadDeltaFile(f"{path}: the layer list in its metadata is missing or corrupt") from exc
    deltas: Deltas = {}
    seen: set[str] = set()
    for name in layers:
        fields = {f: raw[f"{name}{_SEP}{f}"] for f in ("dense_KV", "keys_NK", "coef_NV") if f"{name}{_SEP}{f}" in raw}
        seen.update(f"{name}{_SEP}{f}" for f in fields)
        for field, t in fields.items():
            if t.dtype != torch.float32:
                raise BadDeltaFile(f"{path}: {name}::{field} is {t.dtype}, expected float32")
        try:
            delta = LayerDelta(**fields)
        except EngineError as exc:
            raise BadDeltaFile(f"{path}: layer {name}: {exc}") from exc
        if not delta.is_finite():
            raise BadDeltaFile(f"{path}: layer {name} holds NaN or Inf; the file is corrupt")
        deltas[name] = delta
    extra = set(raw) - seen
    if extra:
        raise BadDeltaFile(f"{path}: tensors {sorted(extra)[:3]} are not in its layer list; the file is corrupt")
    return deltas, {k: v for k, v in meta.items() if not k.startswith(_RESERVED_PREFIX)}


# --------------------------------------------------------------------------- applying to a model


def _checked_targets(model: nn.Module, deltas: Mapping[str, LayerDelta]) -> list[tuple[str, nn.Module, LayerDelta]]:
    """Resolve modules and check shapes and finiteness of every delta before any weight is written."""
    check_finite(deltas)
    targets = []
    for name, d in deltas.items():
        module = get_module(model, name)
        if module_shape_KV(module) != d.shape_KV:
            raise EngineError(
                f"delta for {name} is K×V={d.shape_KV} but the module is {module_shape_KV(module)}; "
                "the deltas were computed for another model"
            )
        targets.append((name, module, d))
    return targets


@torch.no_grad()
def _updated_weights(targets: list[tuple[str, nn.Module, LayerDelta]]) -> list[torch.Tensor]:
    """(W.float() + Δ in the module's layout).to(W.dtype) for every target, computed before any write."""
    out = []
    for name, module, d in targets:
        weight = module.weight
        delta = delta_to_weight_layout(module, d.to(weight.device).to_dense())
        updated = (weight.float() + delta).to(weight.dtype)
        if not bool(torch.isfinite(updated).all()):
            raise NonFiniteDelta(f"the edited weight of {name} overflows {weight.dtype}; the batch is refused")
        out.append(updated)
    return out


def add_deltas_(model: nn.Module, deltas: Mapping[str, LayerDelta]) -> None:
    """Materialise deltas into the weights in place: W ← (W.float() + Δ).to(W.dtype). Irreversible on its own;
    use `apply_deltas` to keep the originals. Every new weight is computed and checked before any is written,
    so a refused batch changes nothing."""
    targets = _checked_targets(model, deltas)
    updated = _updated_weights(targets)
    with torch.no_grad():
        for (_, module, _), new in zip(targets, updated):
            module.weight.copy_(new)


class AppliedDeltas:
    """Deltas applied to a model, with the original weights kept so `remove()` restores them bit-exactly.

    Use as a context manager (`with apply_deltas(model, deltas): ...`) or call `remove()` yourself.
    """

    def __init__(self, model: nn.Module, deltas: Mapping[str, LayerDelta]) -> None:
        self.model = model
        self.deltas: Deltas = dict(deltas)
        self._originals: dict[str, tuple[nn.Module, torch.Tensor]] = {}
        targets = _checked_targets(model, deltas)
        updated = _updated_weights(targets)
        with torch.no_grad():
            for (name, module, _), new in zip(targets, updated):
                self._originals[name] = (module, module.weight.detach().clone())
                module.weight.copy_(new)

    @property
    def is_applied(self) -> bool:
        return bool(self._originals)

    @property
    def module_names(self) -> list[str]:
        return list(self.deltas)

    @torch.no_grad()
    def remove(self) -> None:
        """Put the original weight tensors' values back (bit-identical). Idempotent."""
        for module, original in self._originals.values():
            module.weight.copy_(original)
        self._originals.clear()

    def __enter__(self) -> AppliedDeltas:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()


def apply_deltas(model: nn.Module, deltas: Mapping[str, LayerDelta]) -> AppliedDeltas:
    """Apply deltas to `model` (validated first, so a bad delta changes nothing) and return the handle that
    restores the originals (`.remove()` or leaving a `with` block)."""
    return AppliedDeltas(model, deltas)


def fingerprint_modules(model: nn.Module, module_names: Sequence[str] | Iterable[str]) -> str:
    """sha256 (hex) of the named modules' weights: names, K×V shapes and values rounded to bfloat16.

    The values are hashed after rounding to bf16 so that the same base model loaded in fp32 or in bf16
    gives the same fingerprint (a hypernet trained on one can serve the other); any real change of the
    base model changes the bf16 values.
    """
    h = hashlib.sha256()
    for name in module_names:
        module = get_module(model, name)
        k, v = module_shape_KV(module)
        h.update(f"{name}:{k}x{v};".encode())
        w = module.weight.detach().to("cpu", torch.bfloat16).contiguous()
        h.update(w.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
