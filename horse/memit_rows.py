"""MEMIT's token layout and forward hooks: the padded sequences of a batch of facts under the context templates,
with the subject's last token (where MEMIT reads its keys and writes δ) and the answer tokens of each.

A fact's prompt is formatted into each context template ("{}" and prefixes such as "The first time I saw it. {}");
the subject is looked up inside the prompt's own span, never in the prefix (a sampled prefix may name it too).
Answers follow `horse.tokens.encode_pair` exactly, so MEMIT scores the same tokens as the evaluation.

Dimension key: S sequences, T positions, N answer tokens.
Run the tests with `pytest tests/horse/test_memit.py`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from horse.errors import EngineError
from horse.tokens import encode_pair
from horse.types import EditRequest


class MissingSubject(EngineError):
    """MEMIT needs the subject of every request (its keys sit at the subject's last token); give one."""


def subject_last_index(tok, text: str, subject: str, begin: int = 0) -> int | None:
    """Index of the subject's last token in tok(text.rstrip()) (with its special tokens), or None.

    The subject is searched from character `begin` on (where the prompt starts inside its template)."""
    text = text.rstrip()
    start = text.find(subject, begin)
    if start < 0:
        start = text.lower().find(subject.lower(), begin)
    if start < 0:
        return None
    end = start + len(subject)
    if getattr(tok, "is_fast", False):
        offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
        last = None
        for i, (a, b) in enumerate(offsets):
            if b > a and a < end:
                last = i
        return last
    # slow tokenizers: MEMIT's own rule, the length of the tokenised prefix ending with the subject
    return len(tok(text[:end])["input_ids"]) - 1


@dataclass
class Rows:
    """Padded sequences of one mini-batch of facts.

    fact_S: which fact (index into the batch) each sequence belongs to; template_S: template index
    (−1 for the KL sequence); lookup_S: subject's last token; answer (row, position, id) triples.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    fact_S: torch.Tensor
    template_S: torch.Tensor
    lookup_S: torch.Tensor
    ans_row_N: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    ans_pos_N: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    ans_id_N: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def to(self, device: torch.device) -> Rows:
        return Rows(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.fact_S, self.template_S,
                                              self.lookup_S, self.ans_row_N, self.ans_pos_N, self.ans_id_N)))


def pad(rows: list[list[int]], fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (with `fill`) and the attention mask of token rows."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def pad_id(tok) -> int:
    """The tokenizer's pad id, else its eos id, else 0."""
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return int(pad) if pad is not None else 0


def lookup_index(tok, text: str, subject: str, request: EditRequest, begin: int = 0) -> int:
    """`subject_last_index`, or MissingSubject when the subject is not in the text from `begin` on."""
    idx = subject_last_index(tok, text, subject, begin)
    if idx is None:
        raise MissingSubject(f"subject {subject!r} does not occur in {text!r} (request {request.case_id}); "
                             "MEMIT needs the subject inside the prompt")
    return idx


def build_rows(tok, requests: Sequence[EditRequest], templates: Sequence[str], kl_template: str | None,
               *, with_answers: bool) -> Rows:
    """Sequences for a mini-batch: each fact under each template (+ answer tokens when `with_answers`),
    then (when `kl_template`) its KL prompt. Answers follow `horse.tokens.encode_pair` exactly."""
    seqs: list[list[int]] = []
    fact, tmpl, lookup = [], [], []
    ans_row, ans_pos, ans_id = [], [], []
    for b, req in enumerate(requests):
        for t, template in enumerate(templates):
            text = template.format(req.prompt)
            if with_answers:
                ids, labels = encode_pair(tok, text, req.target)
                for pos, lab in enumerate(labels):
                    if lab != -100:
                        ans_row.append(len(seqs))
                        ans_pos.append(pos)
                        ans_id.append(lab)
            else:
                ids = tok(text.rstrip())["input_ids"]
            lookup.append(lookup_index(tok, text, req.subject, req, template.index("{}")))
            fact.append(b)
            tmpl.append(t)
            seqs.append(ids)
        if kl_template is not None:
            text = kl_template.format(req.subject)
            lookup.append(lookup_index(tok, text, req.subject, req))
            seqs.append(tok(text.rstrip())["input_ids"])
            fact.append(b)
            tmpl.append(-1)
    ids, mask = pad(seqs, pad_id(tok))
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Rows(ids, mask, as_long(fact), as_long(tmpl), as_long(lookup), as_long(ans_row), as_long(ans_pos),
                as_long(ans_id))


class StopForward(Exception):
    """Raised by a hook once everything needed from a forward pass is recorded."""


@contextmanager
def hooks(pairs: Sequence[tuple[nn.Module, str, object]]) -> Iterator[None]:
    """Register (module, kind, fn) hooks, kind in {"pre", "pre_kw", "fwd"}; all removed on exit."""
    handles = []
    try:
        for module, kind, fn in pairs:
            if kind == "pre":
                handles.append(module.register_forward_pre_hook(fn))
            elif kind == "pre_kw":
                handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()
