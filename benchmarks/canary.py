"""The canary probe the benchmarks share: the shipped canary prompts' greedy next tokens and the perplexity of
the prompts with their answers, measured once on the unedited model and compared on an edited one.

    probe = CanaryProbe.on_base(model, tok)          # before editing
    probe.agreement(model, tok), probe.perplexity_ratio(model, tok)   # with the deltas applied
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

CANARY = Path(__file__).resolve().parents[1] / "daemon" / "assets" / "canary-train.jsonl"


def canary_rows() -> list[dict]:
    """The shipped canary records: prompt, answer, source (the CounterFact train record it came from)."""
    return [json.loads(line) for line in CANARY.read_text().splitlines()]


@dataclass(frozen=True)
class CanaryProbe:
    """prompts (C), texts = "prompt answer." (C), the base model's next token per prompt (C) and perplexity."""

    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    base_next: torch.Tensor
    base_perplexity: float

    @classmethod
    def on_base(cls, model, tok, limit: int | None = None) -> CanaryProbe:
        from horse.metrics import next_token_ids, perplexity

        rows = canary_rows()[:limit]
        prompts, texts = tuple(r["prompt"] for r in rows), tuple(f"{r['prompt']} {r['answer']}." for r in rows)
        return cls(prompts, texts, next_token_ids(model, tok, list(prompts)), perplexity(model, tok, list(texts)))

    def agreement(self, model, tok) -> float:
        """Share of prompts whose greedy next token is the base model's."""
        from horse.metrics import next_token_ids

        return float((next_token_ids(model, tok, list(self.prompts)) == self.base_next).float().mean())

    def perplexity_ratio(self, model, tok) -> float:
        """Perplexity of the texts on `model` over the base model's."""
        from horse.metrics import perplexity

        return perplexity(model, tok, list(self.texts)) / self.base_perplexity
