"""The block inputs of texts measured night after night, kept so that only the edited blocks run again.

Every engine here edits modules of the last blocks. Every model state the daemon measures in a night (the head,
each candidate) and on later nights (as long as the blocks below stay as they are) therefore computes the same
hidden state where those blocks start, for the same tokens. The gate measures the same texts every night (the
canary prompts, protected facts, a stable sample of the retained edits), so a `PrefixCache` keeps, per token
sequence, what entered block `start`, and a pass over a right-padded batch runs the blocks below only for the
rows it has not seen; the others run from `start` (horse/replay.py) with the model's current weights:

    cache = PrefixCache.for_model(model, editor.module_names)          # None: the head cannot be replayed
    logits_NW = metrics.logits_at(model, ids_BT, mask_BT, rows_N, cols_N, prefix=cache)

A cache is valid for weights whose blocks below `start` (and embeddings, final norm, head) hash to its
`fingerprint` (`prefix_fingerprint`); its owner keeps it only while that holds (the daemon changes only the
edited modules between fingerprinting the head and measuring its candidates) and keeps it on disk by fingerprint.
Causal attention and right padding make a row's block input independent of the rest of its batch (up to float
rounding), so rows from different batches can be put together.

Dimension key: B batch, T positions, H hidden width, n a row's real tokens.
Tests: `python -m pytest tests/horse/test_prefix.py -q`.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from horse.errors import EngineError
from horse.replay import BlockInput, block_path, capture_block_input, first_block, outside_blocks, replayable


def prefix_fingerprint(model: nn.Module, start: tuple[str, int]) -> str:
    """sha256 over the names, dtypes, shapes and values of every parameter and buffer of `model` outside the
    blocks from `start` on: equal fingerprints give equal block inputs."""
    digest = hashlib.sha256(f"{start}".encode())
    seen: set[int] = set()  # tied weights (embedding = head) are hashed once, under their first name
    for name, t in sorted(outside_blocks(model, start).items()):
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def row_key(ids_n: torch.Tensor) -> str:
    """The cache key of one row: a hash of its real token ids."""
    return hashlib.sha256(ids_n.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:32]


def right_padded(attention_mask_BT: torch.Tensor) -> bool:
    """True when every row's real tokens come first (ones, then zeros)."""
    n_B = attention_mask_BT.sum(dim=1)
    positions_BT = torch.arange(attention_mask_BT.shape[1], device=attention_mask_BT.device)[None, :]
    return bool(((positions_BT < n_B[:, None]).to(attention_mask_BT.dtype) == attention_mask_BT).all())


@dataclass
class PrefixCache:
    """Block-`start` inputs ([n, H] per row key) of a model whose prefix hashes to `fingerprint`."""

    start: tuple[str, int]
    fingerprint: str
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)  # keys looked up or captured since loading
    hits: int = 0
    captured: int = 0

    @classmethod
    def for_model(cls, model: nn.Module, module_names: Sequence[str],
                  kept: Mapping[str, torch.Tensor] | None = None, kept_fingerprint: str | None = None
                  ) -> PrefixCache | None:
        """A cache for `model` as it is now, starting at the lowest block of `module_names`; with the rows
        `kept` (a `to_tensors` result) when they were kept for the same fingerprint. None when the model's
        head cannot be replayed (`replay.replayable`), its blocks are not all of one type, or some weights are
        offloaded (meta tensors)."""
        layer_types = getattr(getattr(model, "config", None), "layer_types", None) or ()
        if not replayable(model) or len(set(layer_types)) > 1:
            return None  # (blocks of different types get different masks: `block_input` takes block 0's)
        if any(p.is_meta for p in model.parameters()):
            return None  # weights offloaded by accelerate: nothing to fingerprint
        start = first_block(module_names)
        cache = cls(start, prefix_fingerprint(model, start))
        if kept is not None and kept_fingerprint == cache.fingerprint:
            cache.rows = dict(kept)
        return cache

    def covers(self, module_names: Sequence[str]) -> bool:
        """True when changing these modules leaves every block input at `start` as it is (all of them in blocks
        from `start` on); a delta elsewhere (a lower block, the head) needs full passes."""
        blocks_path, index = self.start
        try:
            return all((p := block_path(n))[0] == blocks_path and p[1] >= index for n in module_names)
        except EngineError:
            return False

    def block_input(self, model: nn.Module, input_ids_BT: torch.Tensor,
                    attention_mask_BT: torch.Tensor) -> BlockInput | None:
        """What entered block `start` in a forward pass over this batch: cached rows from the cache, the others
        captured now (and kept). None when the batch is not right-padded (its rows' inputs would depend on
        their padding)."""
        if not right_padded(attention_mask_BT):
            return None
        n_B = attention_mask_BT.sum(dim=1).tolist()
        keys = [row_key(input_ids_BT[b, :n]) for b, n in enumerate(n_B)]
        missing = [b for b, k in enumerate(keys) if k not in self.rows]
        if missing:
            width = max(n_B[b] for b in missing)
            got = capture_block_input(model, self.start, input_ids_BT[missing, :width],
                                      attention_mask_BT[missing, :width])
            for i, b in enumerate(missing):
                self.rows[keys[b]] = got.hidden_BTH[i, : n_B[b]].detach().cpu().clone()
            self.captured += len(missing)
        self.hits += len(keys) - len(missing)
        self.used.update(keys)
        # the blocks' other arguments (positions, rotary embeddings, mask) are the same for every block: take them
        # where the first block starts, which runs only the embeddings
        blocks_path, _ = self.start
        shape = capture_block_input(model, (blocks_path, 0), input_ids_BT, attention_mask_BT)
        hidden_BTH = torch.zeros_like(shape.hidden_BTH)
        for b, (key, n) in enumerate(zip(keys, n_B)):
            hidden_BTH[b, :n] = self.rows[key].to(hidden_BTH.device, hidden_BTH.dtype)
        return BlockInput(hidden_BTH, shape.args, shape.kwargs)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The rows to keep (those used since loading), for safetensors."""
        return {k: self.rows[k].contiguous() for k in self.used if k in self.rows}
