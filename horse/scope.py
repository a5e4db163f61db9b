"""Scoped edits: the edited modules act as the base model except where the text is about an edited subject.

A weight delta moves every input that passes through its modules, so thousands of accumulated edits move the
model's answers about everything else too (NS, the canary, perplexity). A fact edit is about its subject:
"The mother tongue of Danielle Darrieux is → English" has nothing to say about a text that never names her.
`Scope` hooks the edited modules of a model that carries deltas (the head, a candidate) so that each token
position sees the current weights only from the first token of an edited subject in the text on, and the base
weights everywhere else:

    index = SubjectIndex.build(tok, ["Danielle Darrieux", ...])          # the subjects of the applied edits
    with Scope(model, base_weights, index):       # module name → its base weight (Materialised.base_weights)
        ...                                                               # forward passes, generate()

Where the scope is on, the module's output is the edited one; where it is off, `x @ W_baseᵀ + b`, bit-equal
to the base model's module. A subject occurs when one of its token sequences (with and without a leading
space) appears in the input ids; once on, a row stays on for the rest of the sequence (the text is about
the subject from there). The mask is computed from the ids the model's backbone receives, and carried across
the steps of a cached `generate()` (a subject completed by generated tokens switches the scope on from the
tokens of that step: the cache of the earlier ones is kept).

This is a scope classifier in the spirit of SERAC/GRACE, exact on surface forms: an alias or pronoun that
never names the subject does not switch it on. Dimension key: B batch, T positions.
Tests: `python -m pytest tests/horse/test_scope.py -q`.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType

import torch
from torch import nn

from horse.arch import get_module, weight_layout
from horse.errors import EngineError
from horse.route import _past_length  # one reading of the KV cache's length (route.py is self-contained)


@dataclass(frozen=True)
class SubjectIndex:
    """The token sequences of the scoped subjects, by their last token (for the scan)."""

    by_last: Mapping[int, tuple[tuple[int, ...], ...]] = field(default_factory=dict)
    longest: int = 0
    subjects: frozenset[str] = frozenset()
    # token ids whose text starts / ends with a letter or digit: a match must not run on into a longer word
    word_start: frozenset[int] = frozenset()
    word_end: frozenset[int] = frozenset()

    @classmethod
    def build(cls, tok, subjects: Iterable[str]) -> SubjectIndex:
        """Index `subjects` (blank ones are skipped) in both spellings a tokenizer gives a word: at the start of
        a text and after a space."""
        texts = tok.convert_ids_to_tokens(list(range(len(tok))))
        decoded = [tok.convert_tokens_to_string([t]) if t is not None else "" for t in texts]
        starts = frozenset(i for i, t in enumerate(decoded) if t[:1].isalnum())
        ends = frozenset(i for i, t in enumerate(decoded) if t[-1:].isalnum())
        return cls(word_start=starts, word_end=ends).extended(tok, subjects)

    def extended(self, tok, subjects: Iterable[str]) -> SubjectIndex:
        """This index plus `subjects` (same tokenizer)."""
        names = self.subjects | frozenset(s.strip() for s in subjects if s and s.strip())
        if names == self.subjects:
            return self
        by_last: dict[int, set[tuple[int, ...]]] = {k: set(v) for k, v in self.by_last.items()}
        for name in names - self.subjects:
            for text in (name, " " + name):
                ids = tuple(tok(text, add_special_tokens=False)["input_ids"])
                if ids:
                    by_last.setdefault(ids[-1], set()).add(ids)
        frozen = {k: tuple(sorted(v, key=len, reverse=True)) for k, v in by_last.items()}
        longest = max((len(s) for seqs in frozen.values() for s in seqs), default=0)
        return SubjectIndex(by_last=frozen, longest=longest, subjects=names, word_start=self.word_start,
                            word_end=self.word_end)

    def __len__(self) -> int:
        return len(self.subjects)


def subject_starts_BT(ids_BT: torch.Tensor, index: SubjectIndex) -> torch.Tensor:
    """B×T bool: True where a scoped subject's token sequence starts (an occurrence found whole in the row, not
    inside a longer word: "Paul" is not found in "Pauline" nor "McPaul"; a match at the row's end counts, the
    next token is not known yet)."""
    starts = torch.zeros(ids_BT.shape, dtype=torch.bool)
    rows = ids_BT.detach().cpu().tolist()
    for b, row in enumerate(rows):
        for t, token in enumerate(row):
            if t + 1 < len(row) and row[t + 1] in index.word_start and token in index.word_end:
                continue  # the word goes on
            for seq in index.by_last.get(token, ()):
                n = len(seq)
                if n <= t + 1 and tuple(row[t + 1 - n:t + 1]) == seq and not (
                        t >= n and row[t - n] in index.word_end and seq[0] in index.word_start):
                    starts[b, t + 1 - n] = True
                    break
    return starts


def scope_mask_BT(ids_BT: torch.Tensor, index: SubjectIndex, active_B: torch.Tensor | None = None) -> torch.Tensor:
    """B×T bool: True from the first token of the first scoped subject in the row on (or everywhere in the rows
    `active_B` already switched on earlier in the sequence)."""
    mask = subject_starts_BT(ids_BT, index).cummax(dim=1).values if ids_BT.shape[1] else torch.zeros(
        ids_BT.shape, dtype=torch.bool)
    if active_B is not None:
        mask |= active_B.cpu()[:, None]
    return mask


def _base_output(module: nn.Module, x: torch.Tensor, base_weight: torch.Tensor) -> torch.Tensor:
    """The module's output with `base_weight` (in the module's stored layout) in place of its weight."""
    bias = getattr(module, "bias", None)
    if weight_layout(module) == "out_in":
        return nn.functional.linear(x, base_weight, bias)
    y = x @ base_weight  # Conv1D: weight is (in, out)
    return y + bias if bias is not None else y


_ACTIVE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → its Scope, for `masking`


@contextlib.contextmanager
def masking(model: nn.Module, ids_BT: torch.Tensor) -> Iterator[None]:
    """For passes that run the edited blocks without the backbone's own forward (a replay from cached block
    inputs, horse/prefix.py): the scope mask of `ids_BT` while inside; a no-op on a model without a scope."""
    scope = _ACTIVE.get(model)
    if scope is None:
        yield
        return
    scope._mask_BT = scope_mask_BT(ids_BT, scope.index)
    try:
        yield
    finally:
        scope._mask_BT = None


class Scope:
    """Hooks that give each token position the edited weights only inside the scope of `index`.

    Args:
        model: a causal LM whose modules `base_weights` names may carry deltas (now or later: the hook reads the
            module's weight at every call, so candidates added in place are scoped too).
        base_weights: module name → its base weight (any dtype/device; the stored layout of the module).
        index: the scoped subjects; `scope.index = ...` changes them for the next passes.
    """

    def __init__(self, model: nn.Module, base_weights: Mapping[str, torch.Tensor], index: SubjectIndex) -> None:
        self.model = model
        self.index = index
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if not isinstance(backbone, nn.Module):
            raise EngineError(f"{type(model).__name__} has no backbone module to scope; scoped edits need a "
                              "transformers causal LM")
        if model in _ACTIVE:
            raise EngineError("this model already has a scope; remove it first")
        self._mask_BT: torch.Tensor | None = None
        self._active_B: torch.Tensor | None = None   # rows on at the end of the last pass (cached generation)
        self._tail_BT: torch.Tensor | None = None    # their last tokens, for a subject cut by the step boundary
        self._handles = [backbone.register_forward_pre_hook(self._on_backbone, with_kwargs=True),
                         backbone.register_forward_hook(self._after_backbone)]
        _ACTIVE[model] = self
        self._bases: dict[str, torch.Tensor] = {}
        for name, base in base_weights.items():
            module = get_module(model, name)
            if tuple(base.shape) != tuple(module.weight.shape):
                self.remove()
                raise EngineError(f"base weight for {name} is {tuple(base.shape)} but the module's is "
                                  f"{tuple(module.weight.shape)}; it belongs to another model")
            self._bases[name] = base.detach().to(module.weight.device, module.weight.dtype)
            self._handles.append(module.register_forward_hook(self._hook_for(name)))

    def _on_backbone(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise EngineError("a scoped model needs input_ids (not inputs_embeds) to find the edited subjects")
        past_len = _past_length(kwargs)
        ids = ids.detach().cpu()
        if past_len and self._active_B is not None and self._active_B.shape[0] == ids.shape[0]:
            joined = torch.cat([self._tail_BT, ids], dim=1)
            mask = scope_mask_BT(joined, self.index, self._active_B)[:, -ids.shape[1]:]
        else:
            joined, mask = ids, scope_mask_BT(ids, self.index)
        keep = max(self.index.longest - 1, 0)
        self._tail_BT = joined[:, joined.shape[1] - keep:] if keep else joined[:, :0]
        self._active_B = mask[:, -1] if mask.shape[1] else torch.zeros(ids.shape[0], dtype=torch.bool)
        self._mask_BT = mask

    def _after_backbone(self, *_args) -> None:
        self._mask_BT = None

    def _hook_for(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            mask = self._mask_BT
            if mask is None:
                raise EngineError(f"{name} ran outside a pass of the scoped model's backbone (a replay from "
                                  "cached block inputs?); scoped models run whole")
            if bool(mask.all()):
                return output
            x = args[0]
            base = _base_output(module, x, self._bases[name])
            if not bool(mask.any()):
                return base
            on = mask.to(output.device).reshape(*mask.shape, *([1] * (output.dim() - 2)))
            return torch.where(on, output, base)
        return hook

    def remove(self) -> None:
        """Take the hooks off (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]
        self._mask_BT = self._active_B = self._tail_BT = None

    def __enter__(self) -> Scope:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()


SCOPE_FILE, SCOPE_BASE_FILE = "scope.json", "scope-base.safetensors"


def write_scope(out_dir, kind: str, subjects: Iterable[str], base_weights: Mapping[str, torch.Tensor]) -> dict:
    """Write what serving an exported model dir scoped needs: `scope.json` (kind, subjects, modules) and the base
    weights of the edited modules (`scope-base.safetensors`). Returns the scope.json content."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    info = {"kind": kind, "subjects": sorted(set(subjects)), "modules": sorted(base_weights),
            "serve": "horse.scope.scope_export(model, tokenizer, DIR): edits act only from an edited subject on"}
    save_file({n: w.detach().cpu().contiguous() for n, w in base_weights.items()}, str(out / SCOPE_BASE_FILE))
    (out / SCOPE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return {k: v for k, v in info.items() if k != "subjects"} | {"subjects": len(info["subjects"])}


def scope_export(model: nn.Module, tok, out_dir) -> Scope:
    """Put the scope an export dir (`horse-ledger export` with scope = subject) records on `model`, loaded from that
    dir; returns the Scope (`.remove()` to serve unscoped)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    out = Path(out_dir)
    try:
        info = json.loads((out / SCOPE_FILE).read_text())
        base = load_file(str(out / SCOPE_BASE_FILE))
    except (OSError, ValueError) as exc:
        raise EngineError(f"{out} holds no readable scope ({SCOPE_FILE}, {SCOPE_BASE_FILE}): {exc}; export it "
                          "again with scope = subject") from exc
    if info.get("kind") != "subject" or sorted(base) != sorted(info.get("modules", [])):
        raise EngineError(f"{out / SCOPE_FILE} does not match {SCOPE_BASE_FILE}; export the snapshot again")
    return Scope(model, base, SubjectIndex.build(tok, info.get("subjects", [])))
