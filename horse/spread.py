"""Hierarchical residual spread across the edited layers (HORSE paper step 6) and its adjoint.

Owns the map from the per-layer residuals R^l (N×V, rows r_i^l = −η_l ⟨k_i, k̃_i⟩ g̃_i) to the residuals R̂^l
that the ridge solve fits. Layers are taken in the order given (ascending depth); layer 0 is never changed.
For l ≥ 1, with sg(·) a stop-gradient:

- "reference" (default, what the public HORSE code does):
      c^l = ⟨R^l, sg(R^{l−1})⟩_F / ‖R^{l−1}‖²_F,   R̂^l = R^l − c^l · G^{l−1}
  where G^{l−1} is the previous layer's captured output gradient, so R̂^l is not exactly orthogonal to R^{l−1}.
- "orthogonal": R̂^l = R^l − c^l · sg(R^{l−1}) (exactly orthogonal to the unprojected R^{l−1}).
- "chained":    the same against the previous *projected* residual sg(R̂^{l−1}).
- "gram-schmidt": project out every earlier projected residual sg(R̂^j), j < l, one after the other.
- "none": R̂^l = R^l (MALMEN).

Every previous-layer quantity enters through sg(·), so the gradient of R̂^l flows only into R^l; the
meta-gradient test builds its autograd reference from these same functions, so both sides stop there.

Dimension key: N answer tokens, V = d_v. Pure tensor functions; no state.
Tests: `python -m pytest tests/horse/test_spread.py -q`.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch

from horse.errors import EngineError

Spread = Literal["reference", "orthogonal", "chained", "gram-schmidt", "none"]
SPREAD_OPTIONS: tuple[str, ...] = get_args(Spread)


def check_spread(option: str) -> Spread:
    """Return `option` if it names a spread, else raise EngineError listing the options."""
    if option not in SPREAD_OPTIONS:
        raise EngineError(f"unknown spread {option!r}; choose one of {', '.join(SPREAD_OPTIONS)}")
    return option  # type: ignore[return-value]


def _coef(resid_NV: torch.Tensor, against_NV: torch.Tensor) -> torch.Tensor:
    """⟨R, U⟩_F / ‖U‖²_F with U treated as a constant (0 when U = 0)."""
    against_NV = against_NV.detach()
    norm_sq = (against_NV * against_NV).sum().clamp_min(torch.finfo(against_NV.dtype).tiny)
    return (resid_NV * against_NV).sum() / norm_sq


def spread_residuals(
    resids_NV: Sequence[torch.Tensor], grads_NV: Sequence[torch.Tensor], option: Spread = "reference"
) -> list[torch.Tensor]:
    """Apply the spread to one batch of residuals.

    Args:
        resids_NV: R^l per edited layer, ascending depth, each N×V (differentiable).
        grads_NV: G^l per layer (N×V captured output gradients, constants); only "reference" reads them.
        option: the spread (see the module docstring).

    Returns:
        R̂^l per layer, same shapes.

    Raises:
        EngineError: when neighbouring layers differ in shape (the spread needs the same N and V).
    """
    option = check_spread(option)
    if option == "none" or len(resids_NV) <= 1:
        return list(resids_NV)
    shapes = {tuple(r.shape) for r in resids_NV}
    if len(shapes) != 1:
        raise EngineError(
            f"spread {option!r} needs every edited layer to have the same residual shape, got {sorted(shapes)}; "
            "use --spread none or edit layers of one width"
        )
    out: list[torch.Tensor] = [resids_NV[0]]
    for layer in range(1, len(resids_NV)):
        resid = resids_NV[layer]
        if option == "reference":
            # HORSE reference: c^l against the previous *unprojected* residual, but it subtracts the previous
            # layer's raw gradient matrix G^{l-1}, not R^{l-1} (so the result is not exactly orthogonal).
            prev = resids_NV[layer - 1]
            out.append(resid - _coef(resid, prev) * grads_NV[layer - 1].to(resid.dtype).detach())
        elif option == "orthogonal":
            prev = resids_NV[layer - 1].detach()
            out.append(resid - _coef(resid, prev) * prev)
        elif option == "chained":
            prev = out[layer - 1].detach()
            out.append(resid - _coef(resid, prev) * prev)
        else:  # gram-schmidt: modified Gram-Schmidt against every earlier projected residual
            for earlier in out[:layer]:
                earlier = earlier.detach()
                resid = resid - _coef(resid, earlier) * earlier
            out.append(resid)
    return out


def spread_backward(
    resids_NV: Sequence[torch.Tensor],
    grads_NV: Sequence[torch.Tensor],
    grad_spread_NV: Sequence[torch.Tensor],
    option: Spread = "reference",
) -> list[torch.Tensor]:
    """Pull ∂L/∂R̂^l back to ∂L/∂R^l through the spread (the vector-Jacobian product).

    The spread is cheap (a few N×V inner products per layer), so it is recomputed on detached leaves and
    differentiated locally; no hypernet or LM graph is involved.

    Args:
        resids_NV: the unspread residuals R^l the forward pass used.
        grads_NV: the captured G^l.
        grad_spread_NV: ∂L/∂R̂^l per layer.
        option: the spread used in the forward pass.

    Returns:
        ∂L/∂R^l per layer.
    """
    option = check_spread(option)
    if option == "none":
        return [g for g in grad_spread_NV]
    with torch.enable_grad():
        leaves = [r.detach().requires_grad_(True) for r in resids_NV]
        spread = spread_residuals(leaves, [g.detach() for g in grads_NV], option)
        grads = torch.autograd.grad(spread, leaves, grad_outputs=list(grad_spread_NV), allow_unused=True)
    return [torch.zeros_like(r) if g is None else g for r, g in zip(leaves, grads)]
