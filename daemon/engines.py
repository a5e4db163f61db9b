"""The engine a night or a fold edits with (`load_engine`: HORSE hypernet, MEMIT or fine-tune, by `settings.engine`),
and the protected-key moments a fold keeps beside itself for the nights that derive from it. Shared by the joint
night (daemon/joint_*.py) and consolidation (daemon/consolidate.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from daemon import gate, snapshots
from daemon.batch import file_fingerprint, hypernet_path, load_editor, to_request
from ledger.config import Settings
from ledger.records import EditRecord

log = logging.getLogger("daemon.cycle")

PROTECT_CHUNK = 100  # earlier edits captured per pass for `protect_earlier`


class JointEngine(Protocol):
    """What the joint night and consolidation need from an engine (`horse.editor.Editor`, `horse.memit.MemitEditor`,
    `horse.finetune.FineTuner`). The flags say which optional steps the night may run; an engine answers them
    rather than being probed with `hasattr`."""

    kind: str                   # "hypernet", "memit" or "finetune"
    fingerprint: str            # of the base weights it edits
    from_base: bool             # given every edit the head carries, on the base weights, each night
    sums_supported: bool        # `edit_sums` / `deltas_from_sums` reproduce `compute_deltas` of the union
    protects_keys: bool         # `set_protected_keys` keeps earlier edits' outputs (`protect_earlier`)
    carries_normaliser: bool    # `normaliser_state` / `load_normaliser_state` (`running_normaliser`)
    last_run: Mapping[str, Any] | None  # what the last `compute_deltas` reports beyond its timings

    @property
    def module_names(self) -> list[str]: ...

    def compute_deltas(self, model: Any, tokenizer: Any, requests: Sequence[Any]
                       ) -> tuple[dict[str, Any], dict[str, float]]: ...

    def card(self) -> dict: ...


def load_engine(settings: Settings, model, tokenizer) -> tuple[JointEngine, str]:
    """The configured engine (`settings.engine`) built on the unedited base `model`, and its fingerprint
    (sha256 of the hypernet file, or of the engine's settings): (editor, fingerprint).

    Every engine has `module_names`, `fingerprint` (of the base weights it edits), `from_base` and
    `compute_deltas(model, tokenizer, requests) -> (deltas, timings)`. An engine with `from_base` set
    (fine-tune-the-ledger) is given every edit the head carries, on the base weights (see `JointNight`).
    """
    if settings.engine == "finetune":
        from horse.arch import block_mlp_out_modules
        from horse.finetune import FinetuneConfig, FineTuner
        from ledger.config import parse_blocks

        blocks = parse_blocks(settings.finetune_blocks)
        n_loc = settings.finetune_locality_prompts
        editor = FineTuner.new(model, FinetuneConfig(
            module_names=tuple(block_mlp_out_modules(model, *blocks)) if blocks else (),
            epochs=settings.finetune_epochs, lr=settings.finetune_lr,
            locality_weight=settings.finetune_locality_weight, n_locality=n_loc,
            locality_batch=16 if n_loc < 256 else 32,
            swap_weight=settings.finetune_swap_weight, swap_resample=settings.finetune_swap_resample,
            rehearsal=settings.finetune_rehearsal, warm_lr=settings.finetune_warm_lr,
            preserve_weight=settings.finetune_preserve_weight),
            held_out=gate.load_canary(settings.gate_canary_file or None))
        if settings.finetune_preserve_weight:  # the corpus moments of the tuned layers' inputs, cached
            from horse.covariance import preservation_moments

            editor.set_preservation(preservation_moments(model, tokenizer, editor.module_names,
                                                         cache_dir=settings.cache_dir)[0])
    elif settings.engine == "memit":
        from horse.memit import MemitEditor

        editor = MemitEditor(model, cache_dir=settings.cache_dir, tokenizer=tokenizer)
    else:
        path = hypernet_path(settings)
        return load_editor(settings, path, model, tokenizer), file_fingerprint(path)
    card = json.dumps(editor.card(), sort_keys=True).encode()
    return editor, hashlib.sha256(card).hexdigest()


def fold_moments_meta(settings: Settings, editor, fold_id: int) -> dict[str, str]:
    """What the protected-key moments kept beside a fold were captured for (checked before they are used)."""
    return {"base_fingerprint": editor.fingerprint, "dtype": settings.dtype, "start": f"snapshot {fold_id}",
            "modules": ",".join(editor.module_names)}


def keep_fold_moments(settings: Settings, editor, model, tokenizer, fold_id: int, edits: Sequence[EditRecord],
                      moments: dict | None = None) -> dict:
    """KₑᵀKₑ per edited module of `edits`, captured on `model` as it is (the fold's weights) unless `moments` (the
    same, replayed by the fold's fine-tune) are given, and kept beside the fold for the nights that derive from it
    (`protect_earlier` with `hypernet_from_consolidation`). Returns them."""
    import torch

    if moments is None:
        moments = editor.requests_second_moments(model, tokenizer, [to_request(e) for e in edits],
                                                 chunk_edits=PROTECT_CHUNK)
    try:  # derived data: without it the next night captures them again
        snapshots.write_derived_cache(settings.snapshot_dir, settings.model, fold_id,
                                      {**moments, "edit_ids": torch.tensor(sorted(e.id for e in edits),
                                                                           dtype=torch.int64)},
                                      fold_moments_meta(settings, editor, fold_id), folder=snapshots.PROTECT_DIR)
    except OSError:
        log.warning("could not keep the protected key moments of snapshot %d", fold_id, exc_info=True)
    return moments
