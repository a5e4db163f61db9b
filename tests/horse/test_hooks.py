"""Capture of K and G at the answer tokens equals a manual computation; hooks are always removed."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from horse.arch import default_target_modules, get_module
from horse.hooks import answer_logits, capture, capture_batch, record_keys
from horse.tokens import tokenize_pairs
from horse.zoo import load_model

PROMPTS = ["The capital of France is", "Danielle Darrieux speaks", "Toko Yasuda plays the"]
ANSWERS = ["Paris", "English", "guitar"]


@pytest.fixture(scope="module", params=["tiny-gpt2", "tiny-llama"])
def model_tok(request):
    return load_model(request.param)


def _manual(model, names, batch):
    """Full logits, CE on answer tokens, .retain_grad() on module outputs, plain backward."""
    outs, ins = {}, {}

    def hook(name):
        def fn(module, args, output):
            ins[name] = args[0].detach()
            output.retain_grad()
            outs[name] = output
        return fn

    handles = [get_module(model, n).register_forward_hook(hook(n)) for n in names]
    try:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = batch.labels != -100
        loss = F.cross_entropy(logits[mask], batch.labels[mask])
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    model.zero_grad(set_to_none=True)
    return {n: ins[n][mask] for n in names}, {n: outs[n].grad[mask] for n in names}, float(loss.detach())


def test_capture_equals_manual(model_tok) -> None:
    model, tok = model_tok
    names = default_target_modules(model)
    batch = tokenize_pairs(tok, PROMPTS, ANSWERS)
    keys, grads, loss = capture_batch(model, names, batch.input_ids, batch.attention_mask, batch.labels)
    mk, mg, mloss = _manual(model, names, batch)
    assert loss == pytest.approx(mloss, rel=1e-5)
    n = batch.n_tokens
    for name in names:
        assert keys[name].shape == (n, mk[name].shape[1]) and keys[name].dtype == torch.float32
        torch.testing.assert_close(keys[name], mk[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[name], mg[name], rtol=1e-4, atol=1e-8)
    # nothing left behind: no hooks, no parameter grads, flags restored
    for name in names:
        assert not get_module(model, name)._forward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_capture_minibatches_concatenate(model_tok) -> None:
    model, tok = model_tok
    names = default_target_modules(model)
    batches = [tokenize_pairs(tok, PROMPTS[:2], ANSWERS[:2]), tokenize_pairs(tok, PROMPTS[2:], ANSWERS[2:])]
    cap = capture(model, names, [(b.input_ids, b.attention_mask, b.labels) for b in batches])
    assert cap.n_tokens == sum(b.n_tokens for b in batches)
    k0, g0, _ = capture_batch(model, names, batches[1].input_ids, batches[1].attention_mask, batches[1].labels)
    tail = batches[1].n_tokens
    torch.testing.assert_close(cap.grads_NV[names[-1]][-tail:], g0[names[-1]])
    assert len(cap.loss_per_batch) == 2


def test_answer_logits_equal_full_logits(model_tok) -> None:
    model, tok = model_tok
    batch = tokenize_pairs(tok, PROMPTS, ANSWERS)
    mask = batch.labels != -100
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]
        gathered = answer_logits(model, batch.input_ids, batch.attention_mask, mask)
    torch.testing.assert_close(gathered, full, rtol=1e-5, atol=1e-5)


def test_hooks_removed_on_error(model_tok) -> None:
    model, _ = model_tok
    names = default_target_modules(model)
    with pytest.raises(RuntimeError):
        with record_keys(model, names, torch.ones(1, 1, dtype=torch.bool), keep_outputs=False):
            raise RuntimeError("boom")
    assert all(not get_module(model, n)._forward_hooks for n in names)


def test_bf16_model_captures_fp32(model_tok) -> None:
    model, tok = model_tok
    names = default_target_modules(model)
    batch = tokenize_pairs(tok, PROMPTS, ANSWERS)
    k32, g32, _ = capture_batch(model, names, batch.input_ids, batch.attention_mask, batch.labels)
    bf, _ = load_model(model.config.name_or_path, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    k16, g16, _ = capture_batch(bf, names, batch.input_ids, batch.attention_mask, batch.labels)
    for name in names:
        assert k16[name].dtype == torch.float32 and g16[name].dtype == torch.float32
        rel = (k16[name] - k32[name]).norm() / k32[name].norm()
        assert rel < 0.05
