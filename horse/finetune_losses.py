"""The loss terms of fine-tune-the-ledger (`horse.finetune`): pure tensor functions (logits are scored in fp32).

    answer_nll_B / answer_hits_B / answer_accuracy_B   the edits' answer tokens: NLL, all top-1, share top-1
    kl_from_base_B                                     the locality term: forward / reverse / symmetric KL to the
                                                       base model's next-token distribution (`DIVERGENCES`)
    topk_kl_from_base_B                                the swap term: KL over the base model's top-K next tokens
    output_change, moment_factor_KR                    the preservation term: tr(Δᵀ C Δ), and C's top-R factor

Dimension key: B rows (edits or prompts), N scored positions (answer tokens) of those rows, W the vocabulary
(written V in the KL terms' BV names, K there the kept top-K tokens); in output_change and moment_factor_KR,
K×V a layer's weight (K = d_k, V = d_v) and R the kept rank of C.
Tests: `python -m pytest tests/horse/test_finetune.py -q`.
"""
from __future__ import annotations

import torch

from horse.errors import EngineError


def answer_nll_B(logits_NW: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean negative log-likelihood of each row's answer tokens, from the logits at the N answer positions
    (row of each in `rows_N`). B float (B = n_rows; a row without answer tokens gets 0)."""
    nll_N = -torch.log_softmax(logits_NW.float(), dim=-1).gather(-1, targets_N[:, None])[:, 0]
    sum_B = torch.zeros(n_rows, dtype=nll_N.dtype, device=nll_N.device).index_add(0, rows_N, nll_N)
    count_B = torch.bincount(rows_N, minlength=n_rows).clamp_min(1)
    return sum_B / count_B


def answer_hits_B(logits_NW: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor, n_rows: int) -> torch.Tensor:
    """True where every answer token of the row is the top-1 prediction (accuracy 1). B bool."""
    return answer_accuracy_B(logits_NW, targets_N, rows_N, n_rows) == 1.0


def answer_accuracy_B(logits_NW: torch.Tensor, targets_N: torch.Tensor, rows_N: torch.Tensor,
                      n_rows: int) -> torch.Tensor:
    """Share of each row's answer tokens that are the top-1 prediction (teacher-forced answer-token accuracy,
    `horse.metrics.answer_token_accuracy`). B float (1.0 for a row without answer tokens)."""
    right_N = (logits_NW.argmax(dim=-1) == targets_N).float()
    count_B = torch.bincount(rows_N, minlength=n_rows).float()
    sum_B = torch.zeros(n_rows, device=right_N.device).index_add(0, rows_N, right_N)
    return torch.where(count_B > 0, sum_B / count_B.clamp_min(1), torch.ones_like(sum_B))


DIVERGENCES = ("forward", "reverse", "symmetric")


def kl_from_base_B(base_logp_BV: torch.Tensor, logits_BV: torch.Tensor, kind: str = "forward") -> torch.Tensor:
    """Divergence of next-token distributions from the base model's, per row. B float.

    kind: "forward" KL(p_base ‖ p_θ) (penalises losing what the base model predicts; raising a token the base
    model thinks unlikely costs only the mass it takes from the others), "reverse" KL(p_θ ‖ p_base) (penalises
    mass on tokens the base model thinks unlikely: an edit's target surfacing on unrelated prompts), or
    "symmetric", their mean."""
    if kind not in DIVERGENCES:
        raise EngineError(f"unknown divergence {kind!r}; give one of {', '.join(DIVERGENCES)}")
    logp_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    forward_B = (base_logp_BV.exp() * (base_logp_BV - logp_BV)).sum(dim=-1)
    if kind == "forward":
        return forward_B
    reverse_B = (logp_BV.exp() * (logp_BV - base_logp_BV)).sum(dim=-1)
    return reverse_B if kind == "reverse" else (forward_B + reverse_B) / 2


def topk_kl_from_base_B(base_ids_BK: torch.Tensor, base_logp_BK: torch.Tensor, logits_BV: torch.Tensor) -> torch.Tensor:
    """KL(p_base ‖ p_θ) over the base model's K most likely next tokens (their ids and log-probabilities), per
    row: Σₖ p_base(k)·(log p_base(k) − log p_θ(k)). B float; ≥ m·log m for the kept mass m = Σₖ p_base(k), so
    ≥ 0 when K covers the vocabulary (then it is the KL)."""
    logp_BK = torch.log_softmax(logits_BV.float(), dim=-1).gather(-1, base_ids_BK)
    return (base_logp_BK.exp() * (base_logp_BK - logp_BK)).sum(dim=-1)


def output_change(delta_KV: torch.Tensor, C_KK: torch.Tensor) -> torch.Tensor:
    """E‖Δᵀk‖² over inputs k with second moment C = E[k kᵀ]: tr(Δᵀ C Δ), the mean squared change of the layer's
    output on those inputs. Scalar (differentiable in Δ)."""
    return ((C_KK @ delta_KV) * delta_KV).sum()


def moment_factor_KR(C_KK: torch.Tensor, rank: int) -> torch.Tensor:
    """L (K×R) with L Lᵀ the best rank-R approximation of the symmetric PSD C (its top R eigenpairs; R = K when
    rank is 0 or ≥ K), so that ‖Lᵀ Δ‖² = tr(Δᵀ L Lᵀ Δ) ≤ tr(Δᵀ C Δ): the output change along C's R most used
    input directions, at R/K of the cost."""
    e_K, U_KK = torch.linalg.eigh(C_KK.double())
    r = C_KK.shape[0] if rank <= 0 else min(rank, C_KK.shape[0])
    return (U_KK[:, -r:] * e_K[-r:].clamp_min(0).sqrt()).to(C_KK.dtype)
