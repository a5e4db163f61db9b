"""Fine-tune-the-ledger (issue 6): the slow, strong baseline a nightly hypernet editor has to beat.

Every night, from the unedited base model, fine-tune the editor's target modules (the MLP output linears
of the last six blocks) on ALL applied edits: breadth-first (each epoch visits every edit once, in a
shuffled order, in mini-batches), a few epochs of Adam, with a locality term that keeps the next-token
distribution on fixed unrelated prompts close to the base model's. The unrelated prompts come from the
local corpus (`horse.covariance.corpus_texts`: training-split prompts), never from the gate's canary set.

    tuner = FineTuner.new(model, FinetuneConfig(epochs=5))
    deltas, timings = tuner.compute_deltas(model, tok, requests)   # dense K×V deltas; the model is unchanged

Loss of one step, B edits in the mini-batch and L locality prompts:

    mean_b NLL(answer tokens of edit b | prompt b) + locality_weight · mean_l KL(p_base(·|l) ‖ p_θ(·|l))
        + swap_weight · mean_b KLₖ(p_base(·|s_b) ‖ p_θ(·|s_b))

where s_b is edit b's prompt asked of another edit's subject ("The mother tongue of <other subject> is"): the
same relation, a subject the edit must leave alone (what CounterFact's neighbourhood score measures, built from
the edits being trained, never from evaluation data), and KLₖ the KL over the base model's `swap_top_k` most
likely next tokens (stored per edit, so memory stays small with thousands of edits).

An epoch in which every answer token of every edit was already the model's top choice (before the step that
saw it) ends training early. The daemon uses a FineTuner like a hypernet Editor (`compute_deltas`), but
because `from_base` is set it hands it every edit the head carries plus the night's, on the base weights,
and publishes the result as a snapshot whose parent is the base (see daemon/cycle.py).

Run the tests with `pytest tests/horse/test_finetune.py`.
"""
from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from horse.arch import default_target_modules, get_module, model_device, module_weight_KV
from horse.deltas import Deltas, LayerDelta, fingerprint_modules
from horse.errors import EngineError
from horse.tokens import IGNORE_INDEX, chunked, tokenize_prompts, tokenize_requests
from horse.types import EditRequest


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of fine-tune-the-ledger. Empty `module_names` = the MLP output linears of the last
    `n_last_layers` blocks (the modules HORSE edits)."""

    module_names: tuple[str, ...] = ()
    n_last_layers: int = 6
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    locality_weight: float = 1.0
    n_locality: int = 64        # fixed unrelated prompts, sampled once from the local corpus
    locality_batch: int = 16    # of them per step, in rotation
    swap_weight: float = 0.0    # subject-swapped prompts of the mini-batch's edits (0 = off)
    swap_top_k: int = 64        # base next-token probabilities kept per swapped prompt
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise EngineError(f"fine-tune settings need epochs ≥ 1, batch_size ≥ 1 and lr > 0; got epochs "
                              f"{self.epochs}, batch_size {self.batch_size}, lr {self.lr}")
        for name in ("locality_weight", "swap_weight"):
            if getattr(self, name) < 0:
                raise EngineError(f"{name} = {getattr(self, name)} is negative; give a value ≥ 0")


def answer_nll_B(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of each row's labelled (answer) tokens. B float."""
    mask_BT = labels_BT != IGNORE_INDEX
    logp_BTV = torch.log_softmax(logits_BTV.float(), dim=-1)
    nll_BT = -logp_BTV.gather(-1, labels_BT.clamp_min(0)[..., None])[..., 0] * mask_BT
    return nll_BT.sum(dim=1) / mask_BT.sum(dim=1).clamp_min(1)


def answer_hits_B(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """True where every labelled token of the row is the top-1 prediction. B bool."""
    mask_BT = labels_BT != IGNORE_INDEX
    right_BT = (logits_BTV.argmax(dim=-1) == labels_BT) | ~mask_BT
    return right_BT.all(dim=1)


def kl_from_base_B(base_logp_BV: torch.Tensor, logits_BV: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_θ) of next-token distributions, per row. B float."""
    logp_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    return (base_logp_BV.exp() * (base_logp_BV - logp_BV)).sum(dim=-1)


def topk_kl_from_base_B(base_ids_BK: torch.Tensor, base_logp_BK: torch.Tensor, logits_BV: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_θ) over the base model's K most likely next tokens (their ids and log-probabilities), per
    row: Σₖ p_base(k)·(log p_base(k) − log p_θ(k)). B float; ≥ m·log m for the kept mass m = Σₖ p_base(k), so
    ≥ 0 when K covers the vocabulary (then it is the KL)."""
    logp_BK = torch.log_softmax(logits_BV.float(), dim=-1).gather(-1, base_ids_BK)
    return (base_logp_BK.exp() * (base_logp_BK - logp_BK)).sum(dim=-1)


def subject_swaps(requests: Sequence[EditRequest], seed: int) -> list[str | None]:
    """Per edit, its prompt asked of another edit's subject (None where none fits): the subject must appear in
    the prompt, the other subject differs from it, and the swapped prompt must not itself be an edited prompt
    (whose answer is meant to change). Deterministic for a given seed."""
    edited = {r.prompt for r in requests}
    subjects = sorted({r.subject for r in requests if r.subject})
    rng = random.Random(seed)
    out: list[str | None] = []
    for r in requests:
        swapped = None
        if r.subject and r.subject in r.prompt and len(subjects) > 1:
            for other in rng.sample(subjects, min(4, len(subjects))):
                prompt = r.prompt.replace(r.subject, other, 1)
                if other != r.subject and prompt not in edited:
                    swapped = prompt
                    break
        out.append(swapped)
    return out


def last_logits_BV(model: nn.Module, batch) -> torch.Tensor:
    """Next-token logits after each prompt's last real token (a PromptBatch). B×V."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return out[torch.arange(out.shape[0], device=out.device), batch.last_index_B]


def locality_prompts(n: int, seed: int) -> list[str]:
    """`n` fixed unrelated prompts from the local corpus (the same text the covariance statistics use)."""
    from horse.covariance import corpus_texts

    texts = sorted({t.strip() for t in corpus_texts() if t and t.strip()})
    return random.Random(seed).sample(texts, min(n, len(texts)))


class FineTuner:
    """Fine-tuning of the target modules on a set of edits, behind the editor interface (`compute_deltas`)."""

    from_base = True  # the daemon gives it every carried edit on the base weights (see module docstring)
    kind = "finetune"

    def __init__(self, config: FinetuneConfig, fingerprint: str) -> None:
        self.config = config
        self.fingerprint = fingerprint
        self.last_run: dict[str, float] = {}  # epochs, steps, train_hit (share of edits top-1 in the last epoch)

    @property
    def module_names(self) -> list[str]:
        return list(self.config.module_names)

    @classmethod
    def new(cls, model: nn.Module, config: FinetuneConfig | None = None) -> FineTuner:
        config = config or FinetuneConfig()
        names = list(config.module_names) or default_target_modules(model, config.n_last_layers)
        config = replace(config, module_names=tuple(names))
        return cls(config, fingerprint_modules(model, names))

    def card(self) -> dict:
        return {"method": self.kind, **asdict(self.config)}

    def compute_deltas(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                       ) -> tuple[Deltas, dict[str, float]]:
        """Fine-tune a copy of the target weights on `requests`; return their change (the model is restored).

        Returns:
            (dense fp32 K×V delta per target module; timings in seconds: locality, train, total). The
            epochs run and steps taken are in `last_run`.
        Raises:
            EngineError: no requests, or a module that cannot be trained (no weight).
        """
        if not requests:
            raise EngineError("no edits to fine-tune on; give at least one")
        cfg = self.config
        t0 = time.perf_counter()
        device = model_device(model)
        modules = [get_module(model, n) for n in self.module_names]
        originals = [m.weight.detach().clone() for m in modules]
        flags = {p: p.requires_grad for p in model.parameters()}
        timings: dict[str, float] = {}
        was_training, grad_was = model.training, torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(True)  # callers may hold no_grad (the daemon's measurements); restored below
            model.eval()  # dropout off; gradients still flow
            for p in model.parameters():
                p.requires_grad_(False)
            loc_batches = []
            base_logps = []
            if cfg.locality_weight > 0 and cfg.n_locality > 0:
                with torch.no_grad():
                    for chunk in chunked(locality_prompts(cfg.n_locality, cfg.seed), cfg.locality_batch):
                        pb = tokenize_prompts(tokenizer, list(chunk)).to(device)
                        loc_batches.append(pb)
                        base_logps.append(torch.log_softmax(last_logits_BV(model, pb).float(), dim=-1))
            swaps = self._swap_targets(model, tokenizer, requests, device)
            timings["locality"] = time.perf_counter() - t0
            params = [m.weight for m in modules]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=cfg.lr)
            order = list(range(len(requests)))
            rng = random.Random(cfg.seed)
            steps, epochs, hits = 0, 0, 0
            for _ in range(cfg.epochs):
                rng.shuffle(order)
                epochs += 1
                hits = 0
                for chunk in chunked(order, cfg.batch_size):
                    batch = tokenize_requests(tokenizer, [requests[i] for i in chunk]).to(device)
                    logits = model(**batch.model_inputs()).logits
                    loss = answer_nll_B(logits, batch.labels).mean()
                    hits += int(answer_hits_B(logits.detach(), batch.labels).sum())
                    if loc_batches:
                        j = steps % len(loc_batches)
                        loss = loss + cfg.locality_weight * kl_from_base_B(
                            base_logps[j], last_logits_BV(model, loc_batches[j])).mean()
                    swapped = [i for i in chunk if i in swaps]
                    if swapped:
                        pb = tokenize_prompts(tokenizer, [swaps[i][0] for i in swapped]).to(device)
                        ids_BK = torch.stack([swaps[i][1] for i in swapped]).to(device)
                        logp_BK = torch.stack([swaps[i][2] for i in swapped]).to(device)
                        loss = loss + cfg.swap_weight * topk_kl_from_base_B(
                            ids_BK, logp_BK, last_logits_BV(model, pb)).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                if hits == len(requests):
                    break
            timings["train"] = time.perf_counter() - t0 - timings["locality"]
            deltas = {}
            with torch.no_grad():
                for name, module, original in zip(self.module_names, modules, originals):
                    after_KV = module_weight_KV(module).detach().float().clone()
                    module.weight.copy_(original)
                    deltas[name] = LayerDelta(dense_KV=(after_KV - module_weight_KV(module).float()).cpu())
        finally:
            with torch.no_grad():
                for module, original in zip(modules, originals):
                    module.weight.copy_(original)
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)
            torch.set_grad_enabled(grad_was)
        timings["total"] = time.perf_counter() - t0
        self.last_run = {"epochs": epochs, "steps": steps, "train_hit": hits / len(requests), "swaps": len(swaps)}
        return deltas, timings

    def _swap_targets(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                      device) -> dict[int, tuple[str, torch.Tensor, torch.Tensor]]:
        """Edit index → (subject-swapped prompt, the base model's top-K next-token ids (K,), their log-probs
        (K,)); empty when `swap_weight` is 0. The model must be at the base weights."""
        cfg = self.config
        if cfg.swap_weight <= 0:
            return {}
        prompts = subject_swaps(requests, cfg.seed)
        index = [i for i, p in enumerate(prompts) if p is not None]
        out = {}
        with torch.no_grad():
            for chunk in chunked(index, cfg.batch_size):
                pb = tokenize_prompts(tokenizer, [prompts[i] for i in chunk]).to(device)
                logp_BV = torch.log_softmax(last_logits_BV(model, pb).float(), dim=-1)
                top_BK = logp_BV.topk(min(cfg.swap_top_k, logp_BV.shape[-1]), dim=-1)
                for row, i in enumerate(chunk):
                    out[i] = (prompts[i], top_BK.indices[row].cpu(), top_BK.values[row].cpu())
        return out
