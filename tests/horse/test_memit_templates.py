"""Tests of horse/memit_templates.py: MEMIT's context templates, sampled from the base model once and cached.

Tiny random models (byte-level tokenizer, so a sampled text is a few random bytes) check what the reference's
`get_context_templates` promises: "{}" and five templates "<text>. {}" of ≤ 10 tokens starting with "The",
"Therefore", "Because", "I", "You", braces removed; sampled once (seeded), cached as a private JSON file and
identical on reload; sampled on the base even when the daemon edits a head; a malformed cache re-sampled on the
base or refused on a head.

Run: `pytest tests/horse/test_memit_templates.py -q`.
"""
from __future__ import annotations

import json
import stat

import pytest
import torch

from horse.covariance import model_fingerprint
from horse.memit import MemitConfig, MemitEditor, memit_deltas
from horse.memit_templates import (
    MAX_TOKENS,
    PROMPTS,
    TemplatesNotCached,
    as_template,
    context_templates,
    sample_templates,
)
from horse.types import EditRequest

REQUESTS = [
    EditRequest("The capital of France is", "Rome", subject="France"),
    EditRequest("Danielle Darrieux speaks", "English", subject="Danielle Darrieux"),
]


def _small(model, **overrides) -> MemitConfig:
    return MemitConfig.for_model(model, **{"cov_tokens_per_dim": 10, "max_steps": 2, **overrides})


def _edit_head_(model) -> None:
    """Turn the model into an 'edited head': every MLP output weight moved a lot, in place."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "c_proj" in name or "down_proj" in name:
                p.add_(torch.randn(p.shape, generator=g) * 2.0)


def test_templates_are_five_short_sampled_texts_after_the_plain_prompt(tiny_model, tmp_path):
    model, tok = tiny_model
    templates, info = context_templates(model, tok, cache_dir=tmp_path)
    assert templates[0] == "{}" and len(templates) == 1 + len(PROMPTS) == 6 and not info.cached
    for prompt, template in zip(PROMPTS, templates[1:]):
        text = template[:-len(". {}")]
        assert template.endswith(". {}") and text.startswith(prompt)
        assert "{" not in text and "}" not in text
        assert len(tok(text, add_special_tokens=False)["input_ids"]) <= MAX_TOKENS
        assert template.format("X") == text + ". X"


def test_sampled_once_cached_private_and_identical_on_reload(tiny_model, tmp_path, monkeypatch):
    model, tok = tiny_model
    templates, info = context_templates(model, tok, cache_dir=tmp_path)
    files = list((tmp_path / "memit-templates").glob("*.json"))
    assert files == [info.path]
    assert stat.S_IMODE(info.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(info.path.parent.stat().st_mode) == 0o700
    data = json.loads(info.path.read_text())
    assert data["templates"] == list(templates) and data["model_fingerprint"] == model_fingerprint(model)

    def no_sampling(*args, **kwargs):
        raise AssertionError("the templates were sampled again instead of read from the cache")

    monkeypatch.setattr("horse.memit_templates.sample_templates", no_sampling)
    again, info2 = context_templates(model, tok, cache_dir=tmp_path)
    assert again == templates and info2.cached and info2.path == info.path


def test_sampling_is_deterministic_and_seeded(tiny_llama):
    model, tok = tiny_llama
    first = sample_templates(model, tok)
    assert sample_templates(model, tok) == first
    assert sample_templates(model, tok, seed=1) != first


def test_template_text_drops_braces_and_is_cut_to_max_tokens(tiny_llama):
    _, tok = tiny_llama
    ids = tok("The {a}\n\nb", add_special_tokens=False)["input_ids"]
    assert as_template(tok, ids, 20) == "The  a  b. {}"
    long_ids = tok("Therefore this is far too long", add_special_tokens=False)["input_ids"]
    assert as_template(tok, long_ids, 10) == "Therefore . {}"  # byte-level: 10 tokens are 10 bytes
    # a split multi-byte character decodes to U+FFFD, which re-encodes longer: cut back until it fits
    e_acute = tok("é", add_special_tokens=False)["input_ids"]
    broken = tok("I", add_special_tokens=False)["input_ids"] + e_acute[:1] * 9
    text = as_template(tok, broken, 10)[:-4]
    assert text.startswith("I\ufffd") and len(tok(text, add_special_tokens=False)["input_ids"]) <= 10


def test_sampled_on_the_base_even_when_a_head_is_edited(tiny_model, tmp_path):
    """The daemon's editor is built on the base, then edits heads: the templates are the base's, always."""
    model, tok = tiny_model
    base_templates = sample_templates(model, tok)
    base_fp = model_fingerprint(model)
    editor = MemitEditor(model, cache_dir=tmp_path, config=_small(model), tokenizer=tok)
    assert editor.config.context_templates == base_templates
    assert editor.card()["context_templates"] == list(base_templates)
    _edit_head_(model)
    assert sample_templates(model, tok) != base_templates  # the head would sample other texts
    editor.compute_deltas(model, tok, REQUESTS)
    assert editor.last_run["context_templates"] == list(base_templates)
    # memit_deltas on the head with the base's fingerprint reads the base's cache, never samples the head
    _, info = memit_deltas(model, tok, REQUESTS, _small(model), cache_dir=tmp_path, fingerprint=base_fp)
    assert info["context_templates"] == list(base_templates) and info["templates_cached"] == 1.0
    # and with nothing cached, a head is refused rather than sampled under the base's key
    with pytest.raises(TemplatesNotCached, match="sample them on the base first"):
        context_templates(model, tok, cache_dir=tmp_path / "empty", fingerprint=base_fp)
    assert not (tmp_path / "empty").exists()


MALFORMED = {
    "not JSON": lambda d: "{not json",
    "a list": lambda d: json.dumps([d["templates"]]),
    "four templates": lambda d: json.dumps({**d, "templates": d["templates"][:5]}),
    "plain prompt missing": lambda d: json.dumps({**d, "templates": ["x. {}"] + d["templates"][1:]}),
    "a stray brace": lambda d: json.dumps({**d, "templates": d["templates"][:5] + ["The {x}. {}"]}),
    "too long": lambda d: json.dumps({**d, "templates": d["templates"][:5] + ["You " + "word " * 20 + ". {}"]}),
    "other seed": lambda d: json.dumps({**d, "seed": 7}),
    "not strings": lambda d: json.dumps({**d, "templates": ["{}", 1, 2, 3, 4, 5]}),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_cache_is_sampled_again_on_the_base_or_refused_on_a_head(kind, tiny_llama, tmp_path):
    model, tok = tiny_llama
    templates, info = context_templates(model, tok, cache_dir=tmp_path)
    good = json.loads(info.path.read_text())
    info.path.write_text(MALFORMED[kind](good))
    base_fp = model_fingerprint(model)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _edit_head_(model)
    with pytest.raises(TemplatesNotCached, match="malformed"):
        context_templates(model, tok, cache_dir=tmp_path, fingerprint=base_fp)
    model.load_state_dict(saved)
    again, info2 = context_templates(model, tok, cache_dir=tmp_path, fingerprint=base_fp)
    assert again == templates and not info2.cached
    assert json.loads(info.path.read_text()) == good


def test_an_explicit_override_is_used_and_nothing_is_sampled(tiny_llama, tmp_path):
    model, tok = tiny_llama
    override = ("{}", "Hello there. {}")
    _, info = memit_deltas(model, tok, REQUESTS, _small(model, context_templates=override), cache_dir=tmp_path)
    assert info["context_templates"] == list(override) and "templates_cached" not in info
    assert not (tmp_path / "memit-templates").exists()
