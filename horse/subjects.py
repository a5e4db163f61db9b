"""Per-subject deltas from one batched capture: each subject's edits solved as if alone.

The night hands over its subjects' edits as groups (one group per subject: its applied edits still served plus
the night's new ones). One capture pass runs over all of them in LM mini-batches; each answer token's gradient
is rescaled from its mini-batch's mean CE to its group's (what capturing the group alone gives), the hypernet's
residuals are computed for every row at once (with frozen input statistics each row is its own), and the spread
and the preserving ridge solve run per group on its rows, with the prior μ(N)·C of the group's N edits (one
Cholesky factor per distinct N and module). Each group becomes factors (left_MK, coef_MV) per module:
Δ_s = left_MKᵀ · coef_MV, served by `horse.route.Router` only in texts that name the subject.

Dimension key: N answer tokens (all groups), M a group's tokens, K = d_k, V = d_v.
Tests: `python -m pytest tests/horse/test_subjects.py -q`.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

from horse.arch import model_device
from horse.editor import Editor, eval_mode, lm_batches
from horse.errors import EngineError
from horse.hooks import Captured, capture_batch
from horse.solve import factored_solve, prior_adjoint, prior_cholesky
from horse.spread import spread_residuals
from horse.types import EditRequest

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (left_MK, coef_MV)


def group_scale_N(tokens_per_request: Sequence[int], group_of_request: Sequence[int],
                  batch_of_request: Sequence[int]) -> torch.Tensor:
    """Per answer token: the factor that turns its mini-batch-mean-CE gradient into its group's
    (N_minibatch / N_group)."""
    n_batch: dict[int, int] = {}
    n_group: dict[int, int] = {}
    for n, g, b in zip(tokens_per_request, group_of_request, batch_of_request):
        n_batch[b] = n_batch.get(b, 0) + n
        n_group[g] = n_group.get(g, 0) + n
    scale = [n_batch[b] / n_group[g] for n, g, b in zip(tokens_per_request, group_of_request, batch_of_request)
             for _ in range(n)]
    return torch.tensor(scale, dtype=torch.float64)


def capture_groups(editor: Editor, model: nn.Module, tok, groups: Sequence[Sequence[EditRequest]],
                   lm_batch_size: int = 25, rescale: bool = True) -> tuple[Captured, list[torch.Tensor]]:
    """One capture over every group's requests. Returns (captured, with group-scaled gradients when `rescale`,
    per group the indices of its rows)."""
    requests = [r for g in groups for r in g]
    if not requests:
        raise EngineError("no requests to edit; give at least one group with an EditRequest")
    group_of = [i for i, g in enumerate(groups) for _ in g]
    batches = lm_batches(tok, [r.prompt for r in requests], [r.target for r in requests], lm_batch_size,
                         model_device(model))
    keys: dict[str, list[torch.Tensor]] = {n: [] for n in editor.module_names}
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in editor.module_names}
    tokens, batch_of, losses = [], [], []
    with eval_mode(model):
        for b, (input_ids, attention_mask, labels) in enumerate(batches):
            k, g, loss = capture_batch(model, editor.module_names, input_ids, attention_mask, labels)
            losses.append(loss)
            per_row = (labels != -100).sum(dim=1).tolist()
            tokens += per_row
            batch_of += [b] * len(per_row)
            for n in editor.module_names:
                keys[n].append(k[n])
                grads[n].append(g[n])
    scale_N = group_scale_N(tokens, group_of, batch_of) if rescale else torch.ones(sum(tokens), dtype=torch.float64)
    captured = Captured({n: torch.cat(v) for n, v in keys.items()},
                        {n: torch.cat(v) * scale_N[:, None].to(v[0]) for n, v in grads.items()}, losses)
    owner_N = torch.tensor([g for g, n in zip(group_of, tokens) for _ in range(n)])
    return captured, [torch.nonzero(owner_N == i).flatten() for i in range(len(groups))]


class PriorFactors:
    """Cholesky factors of λ_l I + μ(N)·C_l, per module and N (a night's groups have a few distinct sizes)."""

    def __init__(self, editor: Editor) -> None:
        self.editor = editor
        self.lams = dict(zip(editor.module_names, editor.lams()))
        self._chol: dict[tuple[str, float], torch.Tensor] = {}

    def __call__(self, module: str, n_edits: int, d_k: int) -> torch.Tensor:
        mu = self.editor.preserve_mu(n_edits)
        key = (module, mu)
        if key not in self._chol:
            prior = None if self.editor.preserve_KK is None else mu * self.editor.preserve_KK[module]
            self._chol[key] = prior_cholesky(prior, self.lams[module], d_k, self.editor.device)
        return self._chol[key]


SOLVES = ("alone", "joint-share")


def _adjoints(editor: Editor, captured: Captured, rows: Sequence[torch.Tensor], n_edits: Sequence[int],
              chol: PriorFactors) -> dict[str, list[torch.Tensor]]:
    """Per module, per group: A⁻¹Kᵀ of its rows, computed in one solve for all groups sharing a prior."""
    by_n: dict[int, list[int]] = {}
    for g, n in enumerate(n_edits):
        by_n.setdefault(n, []).append(g)
    out: dict[str, list[torch.Tensor]] = {m: [torch.empty(0)] * len(rows) for m in editor.module_names}
    for m in editor.module_names:
        keys_NK = captured.keys_NK[m].to(editor.device)
        for n, gs in by_n.items():
            idx = torch.cat([rows[g] for g in gs]).to(editor.device)
            adj_KN = prior_adjoint(keys_NK[idx], chol(m, n, keys_NK.shape[1]))
            start = 0
            for g in gs:
                out[m][g] = adj_KN[:, start:start + rows[g].numel()]
                start += rows[g].numel()
    return out


def subject_factors(editor: Editor, model: nn.Module, tok, groups: Sequence[Sequence[EditRequest]], *,
                    solve: str = "alone", lm_batch_size: int = 25) -> tuple[list[Factors], dict[str, float]]:
    """Factors of each group's delta from one batched capture.

    Args:
        editor: a HORSE/MALMEN editor with its preservation prior set (`set_preservation`).
        groups: per subject, its requests (at least one each).
        solve: "alone": each group's spread and solve on its own rows, as if it were the only edit batch;
            "joint-share": one joint spread and solve of every row (today's batch edit), each group taking its
            own rows of the factored solution (its share of the joint delta).

    Returns:
        (per group {module: (left_MK, coef_MV)} on the CPU in fp32, timings in seconds: capture, hypernet,
        spread_solve).
    """
    if any(not g for g in groups):
        raise EngineError("every subject group needs at least one edit")
    if solve not in SOLVES:
        raise EngineError(f"unknown solve {solve!r}; give one of {', '.join(SOLVES)}")
    t0 = time.perf_counter()
    captured, rows = capture_groups(editor, model, tok, groups, lm_batch_size, rescale=solve == "alone")
    if solve == "joint-share":
        return _joint_share(editor, captured, rows, t0, time.perf_counter(), sum(len(g) for g in groups))
    t1 = time.perf_counter()
    with torch.no_grad():
        stats = editor.normaliser_stats(captured, update=False)
        resids = editor.residuals(captured, stats)
        t2 = time.perf_counter()
        chol = PriorFactors(editor)
        adjoint = _adjoints(editor, captured, rows, [len(g) for g in groups], chol)
        out: list[Factors] = []
        for g, idx in enumerate(rows):
            idx_d = idx.to(editor.device)
            grads = [captured.grads_NV[n].to(editor.device)[idx_d] for n in editor.module_names]
            spread = spread_residuals([r[idx_d] for r in resids], grads, editor.config.spread)
            factors: Factors = {}
            for n, r_MV in zip(editor.module_names, spread):
                keys_MK = captured.keys_NK[n].to(editor.device)[idx_d]
                left, coef = factored_solve(keys_MK, r_MV, adj_KN=adjoint[n][g])
                factors[n] = (left.cpu(), coef.cpu())
            out.append(factors)
    t3 = time.perf_counter()
    return out, {"capture": t1 - t0, "hypernet": t2 - t1, "spread_solve": t3 - t2}


def _joint_share(editor: Editor, captured: Captured, rows: Sequence[torch.Tensor], t0: float,
                 t1: float, n_edits: int) -> tuple[list[Factors], dict[str, float]]:
    """Each group's rows of one joint factored solve of every row (the prior's N: every request)."""
    with torch.no_grad():
        stats = editor.normaliser_stats(captured, update=False)
        resids = editor.residuals(captured, stats)
        t2 = time.perf_counter()
        grads = [captured.grads_NV[n].to(editor.device) for n in editor.module_names]
        spread = spread_residuals(resids, grads, editor.config.spread)
        chol = PriorFactors(editor)
        total = sum(int(i.numel()) for i in rows)
        joint = {}
        for n, r_NV in zip(editor.module_names, spread):
            keys_NK = captured.keys_NK[n].to(editor.device)
            joint[n] = factored_solve(keys_NK, r_NV, chol(n, max(n_edits, 1), keys_NK.shape[1]))
        assert total == next(iter(joint.values()))[0].shape[0]
        out = [{n: (left[idx].cpu(), coef[idx].cpu()) for n, (left, coef) in joint.items()} for idx in rows]
    return out, {"capture": t1 - t0, "hypernet": t2 - t1, "spread_solve": time.perf_counter() - t2}
