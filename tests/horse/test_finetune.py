"""Fine-tune-the-ledger (horse/finetune.py): the losses are right, the edits are learned, the model is left as
it was, and bad settings are refused."""
from __future__ import annotations

import math

import pytest
import torch

from horse.deltas import apply_deltas
from horse.errors import EngineError
from horse.finetune import (FinetuneConfig, FineTuner, answer_accuracy_B, answer_hits_B, answer_nll_B, kl_from_base_B,
                            rehearsal_subset, subject_swaps, topk_kl_from_base_B)
from horse.tokens import tokenize_prompts
from horse.metrics import answer_token_accuracy, logits_at
from horse.types import EditRequest


def last_logits_BV(model, pb):
    """Next-token logits after each prompt's last real token. B×V."""
    return logits_at(model, pb.input_ids, pb.attention_mask, torch.arange(pb.input_ids.shape[0]), pb.last_index_B)


def test_answer_nll_averages_only_the_labelled_tokens():
    logits_NW = torch.zeros(3, 4)   # three answer tokens: one of row 0, two of row 1; row 2 has none
    logits_NW[0, 2] = 10.0          # row 0 predicts its token 2 with near certainty
    targets_N, rows_N = torch.tensor([2, 1, 1]), torch.tensor([0, 1, 1])
    nll_B = answer_nll_B(logits_NW, targets_N, rows_N, 3)
    assert nll_B[0] < 1e-3
    assert math.isclose(float(nll_B[1]), math.log(4), rel_tol=1e-5)  # uniform over 4, two labels averaged
    assert float(nll_B[2]) == 0.0
    assert answer_hits_B(logits_NW, targets_N, rows_N, 3).tolist() == [True, False, True]
    assert answer_accuracy_B(logits_NW, targets_N, rows_N, 3).tolist() == [1.0, 0.0, 1.0]
    logits_NW[2, 1] = 10.0          # row 1's second token right: half its answer
    assert answer_accuracy_B(logits_NW, targets_N, rows_N, 3).tolist() == [1.0, 0.5, 1.0]
    assert answer_hits_B(logits_NW, targets_N, rows_N, 3).tolist() == [True, False, True]


def test_kl_from_base_is_zero_at_the_base_and_positive_elsewhere():
    base_logits_BV = torch.randn(3, 7)
    base_logp_BV = torch.log_softmax(base_logits_BV, -1)
    assert torch.allclose(kl_from_base_B(base_logp_BV, base_logits_BV), torch.zeros(3), atol=1e-6)
    assert (kl_from_base_B(base_logp_BV, base_logits_BV + torch.randn(3, 7)) > 0).all()


def test_reverse_and_symmetric_divergences_are_the_kl_the_other_way_and_the_mean():
    base_logp_BV, now_BV = torch.log_softmax(torch.randn(3, 7), -1), torch.randn(3, 7)
    now_logp_BV = torch.log_softmax(now_BV, -1)
    reverse_B = (now_logp_BV.exp() * (now_logp_BV - base_logp_BV)).sum(-1)
    assert torch.allclose(kl_from_base_B(base_logp_BV, now_BV, "reverse"), reverse_B, atol=1e-6)
    both_B = (kl_from_base_B(base_logp_BV, now_BV) + reverse_B) / 2
    assert torch.allclose(kl_from_base_B(base_logp_BV, now_BV, "symmetric"), both_B, atol=1e-6)
    with pytest.raises(EngineError, match="give one of forward, reverse, symmetric"):
        kl_from_base_B(base_logp_BV, now_BV, "backward")
    with pytest.raises(EngineError, match="divergence = 'js'"):
        FinetuneConfig(divergence="js")


def test_topk_kl_is_the_kl_when_k_covers_the_vocabulary_and_a_lower_bound_part_of_it_otherwise():
    base_BV, now_BV = torch.randn(4, 9), torch.randn(4, 9)
    base_logp_BV = torch.log_softmax(base_BV, -1)
    top = base_logp_BV.topk(9, dim=-1)
    full = topk_kl_from_base_B(top.indices, top.values, now_BV)
    assert torch.allclose(full, kl_from_base_B(base_logp_BV, now_BV), atol=1e-6)
    assert torch.allclose(topk_kl_from_base_B(top.indices, top.values, base_BV), torch.zeros(4), atol=1e-6)
    top3 = base_logp_BV.topk(3, dim=-1)
    p_now = torch.log_softmax(now_BV, -1).gather(-1, top3.indices)
    want = (top3.values.exp() * (top3.values - p_now)).sum(-1)
    assert torch.allclose(topk_kl_from_base_B(top3.indices, top3.values, now_BV), want, atol=1e-6)
    mass = top3.values.exp().sum(-1)
    for logits in (now_BV, base_BV, 5 * torch.randn(4, 9)):
        assert (topk_kl_from_base_B(top3.indices, top3.values, logits) >= mass * mass.log() - 1e-6).all()


def test_subject_swaps_ask_each_edits_relation_of_another_edits_subject():
    requests = [EditRequest(prompt="The mother tongue of Ann Lee is", target="French", subject="Ann Lee"),
                EditRequest(prompt="Bo Ray plays the", target="piano", subject="Bo Ray"),
                EditRequest(prompt="The mother tongue of Bo Ray is", target="Dutch", subject="Bo Ray"),
                EditRequest(prompt="Somewhere far away", target="x", subject="Cy"),      # subject not in the prompt
                EditRequest(prompt="Dee works for", target="IBM", subject="")]
    swaps = subject_swaps(requests, seed=0)
    assert swaps == subject_swaps(requests, seed=0) and len(swaps) == 5
    assert swaps[0] in ("The mother tongue of Cy is",)  # Bo Ray's would be an edited prompt
    assert swaps[1] in ("Ann Lee plays the", "Cy plays the")
    assert swaps[2] in ("The mother tongue of Cy is",) or swaps[2] is None  # Ann Lee's is edited too
    assert swaps[3] is None and swaps[4] is None
    assert subject_swaps(requests[:1], seed=0) == [None]


def test_subject_swaps_keep_the_edits_relation_off_other_subjects(tiny_llama):
    """swap_weight > 0 keeps the base model's next token on the edits' prompts asked of other subjects closer
    than the same fine-tune without it, and still learns the edits."""
    model, tok = tiny_llama
    templates = ("The color of {} is", "{} lives in the", "The boss of {} is")
    subjects = ("Zorblat", "Quenvik", "Mardoon", "Pellaxi", "Trosk", "Vindle")
    requests = [EditRequest(prompt=t.format(s), target=c, subject=s)
                for t, s, c in zip(templates, subjects[:3], ("red", "blue", "gold"))]
    others = [t.format(s) for t in templates for s in subjects[3:]]  # never trained on
    pb = tokenize_prompts(tok, others)
    with torch.no_grad():
        base_logp = torch.log_softmax(last_logits_BV(model, pb).float(), -1)
    kl = {}
    for weight in (0.0, 3.0):
        tuner = FineTuner.new(model, FinetuneConfig(epochs=60, lr=1e-2, batch_size=3, locality_weight=0.0,
                                                    swap_weight=weight))
        deltas, _ = tuner.compute_deltas(model, tok, requests)
        assert tuner.last_run["swaps"] == (3 if weight else 0)
        with apply_deltas(model, deltas), torch.no_grad():
            kl[weight] = float(kl_from_base_B(base_logp, last_logits_BV(model, pb)).mean())
            acc = answer_token_accuracy(model, tok, [r.prompt for r in requests], [r.target for r in requests])
        assert acc.float().mean() >= 0.9
    assert kl[3.0] < 0.5 * kl[0.0], kl


def test_swap_partners_can_be_drawn_anew_each_epoch(tiny_llama):
    """swap_resample: each epoch asks the edits' prompts of other partner subjects (seeded), so the swapped
    prompts are kept once per epoch; without it one fixed set serves every epoch."""
    model, tok = tiny_llama
    subjects = ("Zorblat", "Quenvik", "Mardoon", "Pellaxi", "Trosk", "Vindle")
    templates = ("The color of {} is", "{} lives in the", "The boss of {} is")
    requests = [EditRequest(prompt=templates[i % 3].format(s), target="red", subject=s) for i, s in enumerate(subjects)]
    assert None not in subject_swaps(requests, seed=0)
    assert subject_swaps(requests, seed=0) != subject_swaps(requests, seed=1)
    runs = {}
    for resample in (False, True):
        tuner = FineTuner.new(model, FinetuneConfig(epochs=3, lr=1e-2, batch_size=3, locality_weight=0.0,
                                                    swap_weight=1.0, swap_resample=resample))
        runs[resample] = tuner.compute_deltas(model, tok, requests)[0]
        assert tuner.last_run["swaps"] == (18 if resample else 6) and tuner.last_run["epochs"] >= 2
    assert any(not torch.equal(runs[True][n].to_dense(), runs[False][n].to_dense()) for n in runs[True])


def test_locality_prompts_never_include_the_held_out_ones():
    from horse.finetune import locality_prompts

    some = locality_prompts(50, seed=0)
    assert len(some) == 50 and some == locality_prompts(50, seed=0)
    held = frozenset(some[:10])
    assert not held & set(locality_prompts(5000, seed=0, held_out=held))


def test_finetuning_learns_the_edits_and_leaves_the_model_as_it_was(tiny_llama):
    model, tok = tiny_llama
    requests = [EditRequest(prompt=f"The color of {s} is", target=c, subject=s)
                for s, c in (("Zorblat", "red"), ("Quenvik", "blue"), ("Mardoon", "gold"))]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    tuner = FineTuner.new(model, FinetuneConfig(epochs=60, lr=1e-2, batch_size=2, locality_weight=0.1,
                                                n_locality=8, locality_batch=4))
    assert len(tuner.module_names) == 6 and tuner.module_names[-1].endswith("5.mlp.down_proj")
    with torch.no_grad():  # the daemon calls it under no_grad: it must still train, and restore the mode
        deltas, timings = tuner.compute_deltas(model, tok, requests)
        assert not torch.is_grad_enabled()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert set(deltas) == set(tuner.module_names) and all(not d.is_factored for d in deltas.values())
    assert timings["total"] > 0 and 1 <= tuner.last_run["epochs"] <= 60
    prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
    base_acc = answer_token_accuracy(model, tok, prompts, targets).float().mean()
    with apply_deltas(model, deltas):
        acc = answer_token_accuracy(model, tok, prompts, targets).float().mean()
    assert base_acc < 0.5 and acc >= 0.9, (base_acc, acc)


def test_a_warm_start_trains_what_is_not_recalled_and_a_rehearsal_of_the_rest():
    recalled = [True, False, True, True, False, True, True]
    subset = rehearsal_subset(recalled, rehearsal=1.0, seed=0)
    assert {1, 4} <= set(subset) and len(subset) == 4 and subset == sorted(subset)
    assert subset == rehearsal_subset(recalled, rehearsal=1.0, seed=0)
    assert rehearsal_subset(recalled, rehearsal=0.0, seed=0) == [1, 4]
    assert rehearsal_subset(recalled, rehearsal=10.0, seed=0) == list(range(7))  # every recalled one, no more
    assert rehearsal_subset([True] * 5, rehearsal=1.0, seed=0) == []
    assert rehearsal_subset([False] * 3, rehearsal=1.0, seed=0) == [0, 1, 2]
    kept = rehearsal_subset(recalled, rehearsal=0.0, seed=0, keep={0, 2})  # found forgotten in an earlier round
    assert kept == [0, 1, 2, 4] and len(rehearsal_subset(recalled, rehearsal=0.5, seed=0, keep={0, 2})) == 6


def test_warm_start_from_earlier_deltas_learns_the_new_edits_and_keeps_the_old(tiny_llama):
    model, tok = tiny_llama
    names = ("Zorblat", "Quenvik", "Mardoon", "Pelgrin", "Traxil", "Vombur")
    colors = ("red", "blue", "gold", "green", "black", "white")
    requests = [EditRequest(prompt=f"The color of {s} is", target=c, subject=s) for s, c in zip(names, colors)]
    old, new = requests[:4], requests[4:]
    cfg = FinetuneConfig(epochs=60, lr=1e-2, batch_size=2, locality_weight=0.1, n_locality=8, locality_batch=4,
                         warm_lr=1e-2, warm_rounds=3)
    tuner = FineTuner.new(model, cfg)
    first, _ = tuner.compute_deltas(model, tok, old)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    same, _ = tuner.compute_deltas(model, tok, old, init=first)  # everything recalled: nothing to train
    assert tuner.last_run["trained"] == 0 and tuner.last_run["steps"] == 0 and tuner.last_run["recalled"] == 1.0
    for name in first:
        assert torch.allclose(same[name].dense_KV, first[name].dense_KV, atol=1e-6)

    warm, _ = tuner.compute_deltas(model, tok, requests, init=first)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is restored
    run = tuner.last_run  # round 1 trains the 2 new edits and 2 old ones; later rounds what it made forget
    assert run["recalled"] == pytest.approx(4 / 6) and run["rounds"] >= 1 and run["trained"] >= 4, run
    prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
    with apply_deltas(model, warm):
        acc = answer_token_accuracy(model, tok, prompts, targets).float()
    assert run["recalled_after"] == pytest.approx(float((acc == 1).float().mean())), (run, acc)  # as it reports
    assert torch.allclose(torch.tensor(tuner.last_accuracy), acc), (tuner.last_accuracy, acc)  # what a fold's gate reuses
    from horse.editor import Editor
    from horse.hypernet import HyperConfig
    names = tuner.module_names[-2:]  # the keys a fold keeps for the nights after it, replayed from the scans
    with apply_deltas(model, warm):
        direct = Editor.new(model, HyperConfig(module_names=tuple(names), rank=4)).requests_second_moments(
            model, tok, requests, chunk_edits=4)
        replayed = tuner.scan_key_moments(model, names)
    assert replayed is not None and set(replayed) == set(names)
    for n in names:
        assert torch.allclose(replayed[n], direct[n].to(replayed[n]), rtol=1e-4, atol=1e-6), n
    assert tuner.scan_key_moments(model, names) is None  # the inputs are forgotten once used
    assert run["recalled_after"] >= 5 / 6 > run["recalled"], run
    assert bool((acc[4:] == 1).all()), acc  # the new edits are learned
    with pytest.raises(EngineError, match="exactly the fine-tuned modules"):
        tuner.compute_deltas(model, tok, requests, init={n: d for n, d in list(first.items())[:2]})


def test_prepared_scans_replay_a_heads_accuracy_and_serve_the_warm_start(tiny_llama):
    """What a fold does: capture the scans on the base, replay them on the head it replaces (the base plus deltas
    in the fine-tuned blocks) for the head's accuracy, then warm-start on the same scans."""
    import copy

    from horse.deltas import add_deltas_

    model, tok = tiny_llama
    subjects = ("Zorblat", "Quenvik", "Mardoon", "Pelgrin", "Traxil")
    requests = [EditRequest(prompt=f"The color of {s} is", target=c, subject=s)
                for s, c in zip(subjects, ("red", "blue", "gold", "green", "black"))]
    cfg = FinetuneConfig(n_last_layers=3, epochs=40, lr=1e-2, batch_size=2, locality_weight=0.1, n_locality=8,
                         locality_batch=4, warm_lr=1e-2)
    tuner = FineTuner.new(model, cfg)  # blocks 3-5 of 6
    first, _ = tuner.compute_deltas(model, tok, requests[:3])
    head = copy.deepcopy(model)
    add_deltas_(head, first)
    assert tuner.scan_accuracy(head, model) is None  # nothing prepared
    tuner.prepare_scans(model, tok, requests)
    replayed = tuner.scan_accuracy(head, model)
    direct = answer_token_accuracy(head, tok, [r.prompt for r in requests], [r.target for r in requests]).float()
    assert replayed is not None and torch.allclose(torch.tensor(replayed), direct), (replayed, direct)
    assert sum(replayed) > sum(answer_token_accuracy(model, tok, [r.prompt for r in requests],
                                                     [r.target for r in requests]).float().tolist())
    lower = copy.deepcopy(head)  # a change below the first fine-tuned block changes the captured inputs: no replay
    with torch.no_grad():
        lower.model.layers[0].mlp.down_proj.weight.add_(0.01)
    assert tuner.scan_accuracy(lower, model) is None

    scans = tuner._prepared[2]
    warm, _ = tuner.compute_deltas(model, tok, requests, init=first)
    assert tuner._scans is not None and tuner._scans[1] is scans  # the prepared scans served the warm start
    again, _ = FineTuner.new(model, cfg).compute_deltas(model, tok, requests, init=first)  # scans of its own
    assert all(torch.equal(warm[n].dense_KV, again[n].dense_KV) for n in warm)
    assert tuner.scan_accuracy(head, model) is None  # used once


def test_bad_settings_and_empty_batches_are_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(EngineError, match="epochs"):
        FinetuneConfig(epochs=0)
    with pytest.raises(EngineError, match="locality_weight"):
        FinetuneConfig(locality_weight=-1)
    with pytest.raises(EngineError, match="swap_weight"):
        FinetuneConfig(swap_weight=-1)
    with pytest.raises(EngineError, match="rehearsal"):
        FinetuneConfig(rehearsal=-0.5)
    with pytest.raises(EngineError, match="no edits"):
        FineTuner.new(model).compute_deltas(model, tok, [])


def _deltas_with(monkeypatch, model, tok, requests, cfg, **patches):
    with monkeypatch.context() as m:
        for name, value in patches.items():
            m.setattr(f"horse.finetune.{name}", value)
        tuner = FineTuner.new(model, cfg)
        deltas, _ = tuner.compute_deltas(model, tok, requests)
    return deltas, tuner.last_run


def test_replaying_the_trained_blocks_gives_the_full_forward_training(tiny_model, monkeypatch):
    """The cached input of the first trained block (horse/replay.py) is an optimisation only: the deltas equal
    those of full forward passes; a replay that does not reproduce the model is detected and not used."""
    model, tok = tiny_model
    requests = [EditRequest(prompt=t.format(s), target=c, subject=s)
                for t, s, c in (("The color of {} is", "Zorblat", "red"), ("{} lives in the", "Quenvik", "blue"),
                                ("The boss of {} is", "Mardoon", "gold"))]
    cfg = FinetuneConfig(epochs=8, lr=1e-2, batch_size=2, locality_weight=0.5, n_locality=8, locality_batch=4,
                         swap_weight=1.0)
    replayed, run = _deltas_with(monkeypatch, model, tok, requests, cfg)
    assert run["replayed"] and run["swaps"] == 3
    full, run_full = _deltas_with(monkeypatch, model, tok, requests, cfg, replayable=lambda model: False)
    assert not run_full["replayed"] and run_full["steps"] == run["steps"]
    for name in full:
        scale = float(full[name].dense_KV.abs().max())
        assert scale > 0 and torch.allclose(replayed[name].dense_KV, full[name].dense_KV, atol=1e-3 * scale)

    from horse import replay

    def corrupted(*args, **kwargs):
        got = replay.capture_block_input(*args, **kwargs)
        return replay.BlockInput(got.hidden_BTH + torch.randn_like(got.hidden_BTH), got.args, got.kwargs)

    fallback, run_bad = _deltas_with(monkeypatch, model, tok, requests, cfg, capture_block_input=corrupted)
    assert not run_bad["replayed"]
    for name in full:
        assert torch.allclose(fallback[name].dense_KV, full[name].dense_KV, atol=1e-6)


def test_output_change_is_the_mean_squared_change_on_inputs_with_that_second_moment():
    from horse.finetune import output_change

    X_NK, delta_KV = torch.randn(200, 5), torch.randn(5, 3)
    C_KK = X_NK.T @ X_NK / 200
    assert math.isclose(float(output_change(delta_KV, C_KK)), float(((X_NK @ delta_KV) ** 2).sum(1).mean()),
                        rel_tol=1e-5)


def test_moment_factor_is_exact_at_full_rank_and_a_lower_bound_below():
    from horse.finetune import moment_factor_KR, output_change

    X_NK, delta_KV = torch.randn(50, 6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    C_KK = X_NK.T @ X_NK / 50
    full = float(output_change(delta_KV, C_KK))
    for rank in (0, 6, 9):
        L_KR = moment_factor_KR(C_KK, rank)
        assert L_KR.shape == (6, 6) and math.isclose(float((L_KR.T @ delta_KV).square().sum()), full, rel_tol=1e-9)
    parts = [float((moment_factor_KR(C_KK, r).T @ delta_KV).square().sum()) for r in (1, 3, 5)]
    assert parts == sorted(parts) and parts[-1] < full
    with pytest.raises(EngineError, match="preserve_rank = -1"):
        FinetuneConfig(preserve_rank=-1)


def test_preserve_weight_keeps_the_layers_outputs_on_corpus_inputs_and_still_learns(tiny_llama, tmp_path):
    """preserve_weight > 0 (with the corpus moments): the fine-tune moves each layer's output on ordinary text
    less than the same fine-tune without it, and the edits still take; without moments it refuses to start."""
    from horse.covariance import preservation_moments
    from horse.finetune import output_change
    from horse.arch import get_module, module_weight_KV

    model, tok = tiny_llama
    requests = [EditRequest(prompt=f"The color of {s} is", target=c, subject=s)
                for s, c in (("Zorblat", "red"), ("Quenvik", "blue"), ("Mardoon", "gold"))]
    change, W = {}, 1.0
    for weight in (0.0, W):
        tuner = FineTuner.new(model, FinetuneConfig(epochs=60, lr=1e-2, batch_size=3, locality_weight=0.0,
                                                    preserve_weight=weight))
        moments, _ = preservation_moments(model, tok, tuner.module_names, cache_dir=tmp_path)
        if weight:
            with pytest.raises(EngineError, match="call set_preservation first"):
                tuner.compute_deltas(model, tok, requests)
            tuner.set_preservation(moments)
            assert tuner.card()["moments"] == sorted(tuner.module_names)
        deltas, _ = tuner.compute_deltas(model, tok, requests)
        change[weight] = sum(float(output_change(deltas[n].to_dense().double(), moments[n]) /
                                   output_change(module_weight_KV(get_module(model, n)).detach().double(), moments[n]))
                             for n in tuner.module_names)
        with apply_deltas(model, deltas):
            acc = answer_token_accuracy(model, tok, [r.prompt for r in requests], [r.target for r in requests])
        assert acc.float().mean() >= 0.9, weight
    assert change[W] < 0.5 * change[0.0], change
    with pytest.raises(EngineError, match="no input moments for"):
        FineTuner.new(model).set_preservation({})
    with pytest.raises(EngineError, match="preserve_weight = -1"):
        FinetuneConfig(preserve_weight=-1)
