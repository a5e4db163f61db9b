"""Checkpoint files of the hypernet: the hypernet itself and meta-training's optimizer state. No pickle.

- The hypernet: one safetensors file whose header metadata holds a JSON card (architecture, module names,
  shapes, rank, blocks, spread, variant, training data hash, base-model fingerprint; the normaliser state is in
  the tensors), plus the same card as a readable `<file>.json`. `Editor.save` / `Editor.from_checkpoint` call
  `write_checkpoint` / `load_checkpoint`; `read_checkpoint` gives the raw (tensors, card).
- The optimizer state of meta-training (`save_optimizer` / `load_optimizer`): Adam's state as safetensors, its
  hyper-parameters and the loop's progress as JSON in the header, at `optimizer_path(<hypernet file>)`.

Every file is written via `atomic_write` (temp file, fsync, rename).

Tests: `python -m pytest tests/horse/test_checkpoint.py tests/horse/test_metatrain.py -q`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from horse.arch import get_module, module_shape_KV
from horse.deltas import fingerprint_modules
from horse.errors import BadCheckpoint, CheckpointMismatch, EngineError
from horse.hypernet import HyperConfig, HyperNetSet

CARD_KEY = "horse_card"
FORMAT_VERSION = 1
_CARD_CORE_KEYS = frozenset({
    "format", "format_version", "config", "module_names", "shapes_KV", "rank", "n_blocks", "spread",
    "variant", "base_model_fingerprint", "normaliser",
})


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- the hypernet


def hypernet_card(config: HyperConfig, nets: HyperNetSet, shapes_KV: Sequence[tuple[int, int]], fingerprint: str,
                  metadata: Mapping, extra_metadata: Mapping | None = None) -> dict:
    """The JSON card saved with a hypernet: its core fields, then `metadata`, then `extra_metadata`."""
    card = {
        "format": "horse-hypernet",
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "module_names": list(config.module_names),
        "shapes_KV": [list(s) for s in shapes_KV],
        "rank": config.rank,
        "n_blocks": config.n_blocks,
        "spread": config.spread,
        "variant": config.variant,
        "base_model_fingerprint": fingerprint,
        "normaliser": {k: {"count": float(n.normaliser.count)} for k, n in nets.nets.items()},
    }
    card.update(metadata)
    card.update(extra_metadata or {})
    return card


def write_checkpoint(path: str | os.PathLike, nets: HyperNetSet, card: dict, *,
                     dtype: torch.dtype | None = None) -> Path:
    """Write the hypernets' state (safetensors, atomic) with `card` in its header, and the card as `<path>.json`.

    Args:
        path: the .safetensors file.
        nets: the hypernets.
        card: from `hypernet_card`.
        dtype: store floating parameters in this dtype (e.g. torch.bfloat16 to ship); normaliser
            buffers always stay float64.

    Returns:
        the path written.
    """
    path = Path(path)
    tensors = {}
    for k, v in nets.state_dict().items():
        v = v.detach().cpu()
        if dtype is not None and v.is_floating_point() and ".normaliser." not in k:
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    blob = safetensors_save(tensors, metadata={CARD_KEY: json.dumps(card)})
    atomic_write(path, blob)
    atomic_write(path.with_suffix(path.suffix + ".json"), (json.dumps(card, indent=2) + "\n").encode())
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, card) of a hypernet file, via safetensors only.

    Raises:
        BadCheckpoint: missing file, not safetensors, or no horse card.
    """
    path = Path(path)
    if not path.is_file():
        raise BadCheckpoint(f"hypernet file {path} does not exist; give the path of a .safetensors hypernet")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise BadCheckpoint(f"{path} is not a readable safetensors file ({exc}); re-download or retrain it") from exc
    if CARD_KEY not in meta:
        raise BadCheckpoint(f"{path} is a safetensors file without a horse hypernet card; give a hypernet file")
    try:
        card = json.loads(meta[CARD_KEY])
    except json.JSONDecodeError as exc:
        raise BadCheckpoint(f"{path}: the hypernet card is not valid JSON; retrain it") from exc
    if card.get("format") != "horse-hypernet":
        raise BadCheckpoint(f"{path} is not a horse hypernet (format {card.get('format')!r})")
    return tensors, card


def load_checkpoint(path: str | os.PathLike, model: nn.Module, *, force: bool = False
                    ) -> tuple[HyperConfig, HyperNetSet, str, list[tuple[int, int]], dict]:
    """A hypernet file checked against `model`: (config, nets on the CPU, the card's base-model fingerprint,
    shapes_KV, the card's extra metadata) — the arguments of `Editor(...)`.

    Raises:
        BadCheckpoint: the file is not a readable horse hypernet.
        CheckpointMismatch: the module names or shapes do not exist in `model`, or (unless `force`)
            the base-model fingerprint differs.
    """
    tensors, card = read_checkpoint(path)
    config = HyperConfig.from_dict(card["config"])
    names = list(card["module_names"])
    shapes = [tuple(s) for s in card["shapes_KV"]]
    for name, shape in zip(names, shapes):
        try:
            actual = module_shape_KV(get_module(model, name))
        except EngineError as exc:
            raise CheckpointMismatch(
                f"hypernet {path} edits module {name!r}, which this model ({type(model).__name__}) lacks; "
                "train a hypernet for this model (horse-ledger hypernet train)"
            ) from exc
        if tuple(actual) != tuple(shape):
            raise CheckpointMismatch(
                f"hypernet {path} expects {name} of shape (K, V) = {tuple(shape)}, the model has {actual}; "
                "train a hypernet for this model (horse-ledger hypernet train); --force does not override shapes"
            )
    fingerprint = fingerprint_modules(model, names)
    if fingerprint != card["base_model_fingerprint"] and not force:
        raise CheckpointMismatch(
            f"hypernet {path} was trained on another base model (fingerprint "
            f"{card['base_model_fingerprint'][:12]}…, this model {fingerprint[:12]}…); train one for this "
            "model, or pass --force (force=True) to use it anyway"
        )
    nets = HyperNetSet(config, names, shapes)
    own = nets.state_dict()
    if set(own) != set(tensors):
        raise BadCheckpoint(
            f"hypernet {path} has tensors {sorted(set(tensors) ^ set(own))[:4]} that do not match its card; "
            "the file is damaged or from another version: retrain it"
        )
    for k, v in own.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise BadCheckpoint(f"hypernet {path}: tensor {k} has shape {tuple(tensors[k].shape)}, "
                                f"expected {tuple(v.shape)}; retrain it")
    nets.load_state_dict({k: tensors[k].to(own[k].dtype) for k in own})
    metadata = {k: v for k, v in card.items() if k not in _CARD_CORE_KEYS}
    return config, nets, card["base_model_fingerprint"], shapes, metadata


# --------------------------------------------------------------------------- optimizer state files


def optimizer_path(out_path: Path) -> Path:
    """Where meta-training keeps the optimizer state of the hypernet file `out_path`."""
    return out_path.with_name(out_path.name + ".optim.safetensors")


def save_optimizer(path: Path, opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], progress: dict) -> None:
    """Adam state as safetensors ("<i>.exp_avg", "<i>.exp_avg_sq", "<i>.step") + JSON (hyper-params, progress)."""
    index = {id(p): i for i, p in enumerate(params)}
    tensors = {}
    for p, state in opt.state.items():
        i = index[id(p)]
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(float(value))
            tensors[f"{i}.{key}"] = t.detach().cpu().contiguous()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    meta = {"param_groups": json.dumps(groups), "progress": json.dumps(progress), "n_params": str(len(params))}
    atomic_write(path, safetensors_save(tensors, metadata=meta))


def load_optimizer(path: Path, opt: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> dict:
    """Restore what `save_optimizer` wrote into `opt`; returns the saved progress dict."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise BadCheckpoint(f"cannot read optimizer state {path} ({exc}); start without --resume") from exc
    if int(meta.get("n_params", -1)) != len(params):
        raise BadCheckpoint(f"optimizer state {path} is for another hypernet; start without --resume")
    for g, saved in zip(opt.param_groups, json.loads(meta["param_groups"])):
        g.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items()})
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        p = params[int(i)]
        opt.state[p][name] = t.to(p.device) if name != "step" else t
    return json.loads(meta["progress"])
