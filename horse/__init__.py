"""horse: the HORSE / MALMEN hypernetwork editing engine (a library; reads no configuration).

Public API (imported lazily, so `import horse` does not load torch until a name is used):

    from horse import load_model, Editor, HyperConfig, EditRequest, apply_deltas, train_hypernet
    model, tok = load_model("tiny-llama")
    editor = Editor.new(model, HyperConfig(rank=64))          # or Editor.from_checkpoint(path, model)
    deltas, timings_s = editor.compute_deltas(model, tok, [EditRequest("The capital of France is", "Rome")])
    with apply_deltas(model, deltas): ...                     # restored bit-exactly on exit
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "EditRequest": "horse.types",
    "EngineError": "horse.errors",
    "CheckpointMismatch": "horse.errors",
    "BadCheckpoint": "horse.errors",
    "load_model": "horse.zoo",
    "default_target_modules": "horse.arch",
    "Editor": "horse.editor",
    "HyperConfig": "horse.hypernet",
    "LayerDelta": "horse.deltas",
    "Deltas": "horse.deltas",
    "apply_deltas": "horse.deltas",
    "add_deltas_": "horse.deltas",
    "save_deltas": "horse.deltas",
    "load_deltas": "horse.deltas",
    "fingerprint_modules": "horse.deltas",
    "ridge_delta": "horse.solve",
    "ridge_solve": "horse.solve",
    "spread_residuals": "horse.spread",
    "SPREAD_OPTIONS": "horse.spread",
    "capture": "horse.hooks",
    "train_hypernet": "horse.metatrain",
    "TrainConfig": "horse.metatrain",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'horse' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
