"""MEMIT's context templates, sampled from the base model once and cached (the reference's `get_context_templates`).

MEMIT writes each fact under its plain prompt ("{}") and under five prefixes the model wrote itself: one
continuation of each of "The", "Therefore", "Because", "I", "You", 10 tokens long, sampled top-k 5; braces are
replaced by spaces and ". {}" appended, so a template reads "The first time I saw the film was. {}". The
reference samples them once per run and keeps them for every batch; the keys average over them
(`compute_ks`: 0.5 · (plain + mean of the five)) and the z loss averages over all six.

Here the sampling is seeded (`SEED`: the same templates on every run and every night), runs on the base model
(never an edited head: a missing cache with an edited head is refused, `TemplatesNotCached`, as the covariance
statistics are), and the result is cached as JSON (no pickle; mode 0600) in `<cache_dir>/memit-templates/`,
beside `memit-cov/`, keyed like it by the base model's fingerprint, plus the tokenizer's vocabulary and the
sampling settings. A cached file is checked when it is read; a malformed one is sampled again on the base (or
refused, with what to do, when the model given is not the base).

Differences from the reference: a fixed seed (the reference draws from the global RNG); the 10 tokens are the
text's own tokens (a BOS the tokenizer prepends is not counted), and a text that decodes and re-encodes longer
(NFKD, a split multi-byte character) is cut back to 10 tokens.

    templates, info = context_templates(model, tok, cache_dir=cache, fingerprint=base_fingerprint)

Run the tests with `pytest tests/horse/test_memit_templates.py`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from horse.covariance import model_fingerprint
from horse.errors import EngineError

log = logging.getLogger("horse.memit_templates")

PROMPTS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
MAX_TOKENS = 10
TOP_K = 5
SEED = 0
_CACHE_VERSION = "1"


class TemplatesNotCached(EngineError):
    """MEMIT's context templates for the base model are not cached (or the cached file is malformed) and the model
    given is not the base; sample them on the base model first (MemitEditor(base, tokenizer=tok, ...))."""


@dataclass(frozen=True)
class TemplatesInfo:
    """Where the templates came from (recorded in MEMIT's results)."""

    path: Path
    cached: bool

    def as_dict(self) -> dict[str, object]:
        return {"templates_cache": str(self.path), "templates_cached": float(self.cached)}


# --------------------------------------------------------------------------- sampling


def _bos(tok) -> list[int]:
    """The BOS id the tokenizer prepends to a text, if any (the same rule as the covariance corpus)."""
    return [tok.bos_token_id] if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else []


def _n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def as_template(tok, ids: list[int], max_tokens: int) -> str:
    """The reference's template of a sampled text: NFKD, "\\n\\n" → " ", braces → spaces, then ". {}"; the text cut
    back until it encodes to at most `max_tokens` tokens."""
    ids = list(ids)
    while True:
        text = tok.decode(ids, skip_special_tokens=True)
        text = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("{", " ").replace("}", " ")
        if _n_tokens(tok, text) <= max_tokens or not ids:
            return text + ". {}"
        ids = ids[:-1]


@torch.no_grad()
def sample_templates(model: nn.Module, tok, *, prompts: Sequence[str] = PROMPTS, max_tokens: int = MAX_TOKENS,
                     top_k: int = TOP_K, seed: int = SEED) -> tuple[str, ...]:
    """("{}", one sampled template per prompt): each prompt continued to `max_tokens` tokens, top-k sampling with
    a CPU generator seeded with `seed` (deterministic for given logits), without a KV cache (10 short passes).

    Args:
        model: the causal LM to sample from (the base model; left in the mode it was in).
        tok: its tokenizer.
        prompts: the first words (the reference's five).
        max_tokens: tokens of each sampled text, the prompt's included.
        top_k: candidates per step.
        seed: the generator's seed.
    """
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    templates = ["{}"]
    try:
        for prompt in prompts:
            ids = tok(prompt, add_special_tokens=False)["input_ids"][:max_tokens]
            while len(ids) < max_tokens:
                inputs = torch.tensor([_bos(tok) + ids], dtype=torch.long, device=device)
                logits = model(input_ids=inputs, use_cache=False).logits[0, -1].float().cpu()
                top = torch.topk(torch.softmax(logits, dim=-1), top_k)
                pick = torch.multinomial(top.values / top.values.sum(), 1, generator=generator)
                ids.append(int(top.indices[pick]))
            templates.append(as_template(tok, ids, max_tokens))
    finally:
        model.train(was_training)
    return tuple(templates)


# --------------------------------------------------------------------------- cache


def tokenizer_digest(tok) -> str:
    """sha256 of the tokenizer's vocabulary and its BOS rule (what the sampled ids mean)."""
    vocab = sorted(tok.get_vocab().items())
    return hashlib.sha256(json.dumps([vocab, _bos(tok)], ensure_ascii=True).encode()).hexdigest()


def _spec(fingerprint: str, tok_digest: str, prompts: Sequence[str], max_tokens: int, top_k: int,
          seed: int) -> dict[str, object]:
    return {"version": _CACHE_VERSION, "model_fingerprint": fingerprint, "tokenizer_sha256": tok_digest,
            "prompts": list(prompts), "max_tokens": max_tokens, "top_k": top_k, "seed": seed}


def cache_path(cache_dir: str | os.PathLike[str], spec: dict[str, object]) -> Path:
    """`<cache_dir>/memit-templates/<sha256(spec)[:24]>.json`, spec = version, base fingerprint, tokenizer,
    prompts, length, top-k, seed."""
    key = json.dumps(spec, sort_keys=True, ensure_ascii=True)
    return Path(cache_dir) / "memit-templates" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def check_templates(templates: object, tok, n_prompts: int, max_tokens: int) -> tuple[str, ...]:
    """The templates if they are what `sample_templates` writes, else EngineError saying what is wrong:
    "{}" first, then `n_prompts` strings "<text>. {}" with no other brace and ≤ `max_tokens` tokens of text."""
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise EngineError("templates is not a list of strings")
    if len(templates) != n_prompts + 1 or templates[0] != "{}":
        raise EngineError(f"expected '{{}}' and {n_prompts} sampled templates, got {len(templates)} entries "
                          f"starting {templates[:1]!r}")
    for t in templates[1:]:
        text = t[:-len(". {}")]
        if not t.endswith(". {}") or "{" in text or "}" in text:
            raise EngineError(f"template {t!r} is not '<text>. {{}}' with no other brace")
        if _n_tokens(tok, text) > max_tokens:
            raise EngineError(f"template {t!r} is longer than {max_tokens} tokens")
    return tuple(templates)


def _read(path: Path, spec: dict[str, object], tok) -> tuple[str, ...]:
    """The cached templates; EngineError with the reason when the file is malformed or for another spec."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise EngineError(f"cannot be read as JSON ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise EngineError("is not a JSON object")
    wrong = [k for k, v in spec.items() if data.get(k) != v]
    if wrong:
        raise EngineError(f"was written for other settings ({', '.join(wrong)})")
    return check_templates(data.get("templates"), tok, len(spec["prompts"]), int(spec["max_tokens"]))  # type: ignore


def _write_private(path: Path, text: str) -> None:
    """Write atomically, the file 0600 and a new directory 0700 whatever the umask."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def context_templates(model: nn.Module, tok, *, cache_dir: str | os.PathLike[str], fingerprint: str | None = None,
                      prompts: Sequence[str] = PROMPTS, max_tokens: int = MAX_TOKENS, top_k: int = TOP_K,
                      seed: int = SEED) -> tuple[tuple[str, ...], TemplatesInfo]:
    """MEMIT's context templates for the base model `fingerprint` names: from the cache, or sampled and cached.

    Args:
        model: the causal LM (the base, or an edited head once the base's templates are cached).
        tok: its tokenizer.
        cache_dir: directory of the caches (a `memit-templates/` subdir is used).
        fingerprint: the base model's fingerprint (default: `model_fingerprint(model)`); templates missing from
            the cache are then sampled only if `model` is that base.
        prompts, max_tokens, top_k, seed: the sampling (`sample_templates`).

    Returns:
        (("{}", five sampled templates), TemplatesInfo).

    Raises:
        TemplatesNotCached: the templates are missing or malformed and `model` is not the base `fingerprint` names.
    """
    fp = fingerprint or model_fingerprint(model)
    spec = _spec(fp, tokenizer_digest(tok), prompts, max_tokens, top_k, seed)
    path = cache_path(cache_dir, spec)
    problem = "is not cached"
    if path.is_file():
        try:
            return _read(path, spec, tok), TemplatesInfo(path, cached=True)
        except EngineError as exc:
            problem = f"is malformed: {path} {exc}"
            log.warning("MEMIT context templates %s; sampling them again on the base model", problem)
    if fingerprint is not None and model_fingerprint(model) != fingerprint:
        raise TemplatesNotCached(f"MEMIT's context templates for base model {fingerprint[:12]}… {problem}, and this "
                                 "model is not that base (an edited head); sample them on the base first "
                                 "(MemitEditor(base, tokenizer=tok, ...) or MemitEditor.warm_caches(base, tok)), "
                                 "then edit the head")
    templates = sample_templates(model, tok, prompts=prompts, max_tokens=max_tokens, top_k=top_k, seed=seed)
    check_templates(list(templates), tok, len(prompts), max_tokens)
    _write_private(path, json.dumps({**spec, "templates": list(templates)}, indent=1, ensure_ascii=False) + "\n")
    log.info("MEMIT context templates sampled on the base model and cached at %s: %s", path, list(templates))
    return templates, TemplatesInfo(path, cached=False)
