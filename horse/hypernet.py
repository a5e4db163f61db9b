"""The MALMEN/HORSE hypernetwork (paper steps 4–5): configuration, running normaliser, residual blocks.

Owns the learned part of the editor:
- `HyperConfig`: the editor's settings (rank, blocks, spread, loss variant, η init, target modules).
- `RunningNormaliser`: Welford mean / std of the inputs x = [k, g]; updated only when the caller asks.
- `HyperNet`: one network per distinct (d_k, d_v) shape, shared by the layers of that shape, with
  n_blocks residual blocks h = relu(y A B + b); h = scale[l] ⊙ h + shift[l]; y ← y + h (B = 0 at init, so the
  net starts as the identity), learned per-layer step η_l and ridge weight λ_l = exp(lamda_l).
- `HyperNetSet`: the nets of one editor, with the layer → (net, index) map.
- `layer_residuals`: r_i^l = −η_l ⟨k_i, k̃_i⟩ g̃_i computed in token chunks.

Dimension key: N answer tokens, K = d_k, V = d_v, D = K + V, R = rank.
Tests: `python -m pytest tests/horse/test_hypernet.py -q`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from horse.errors import EngineError, NonFiniteCapture
from horse.spread import Spread, check_spread

Variant = Literal["horse", "malmen"]
VARIANTS: tuple[str, ...] = get_args(Variant)


@dataclass(frozen=True)
class HyperConfig:
    """Settings of one editor (saved in its checkpoint).

    Attributes:
        rank: width R of each residual block (reference 1920; smaller for small models).
        n_blocks: number of residual blocks.
        eta_init: initial per-layer step η_l (1e-5; 1e-6 is the zsRE-style setting).
        lamda_init: initial log ridge weight, λ_l = exp(lamda_l) (0 → λ = 1).
        spread: the residual spread (HORSE "reference" by default; MALMEN uses "none").
        variant: the locality loss used in meta-training: "horse" (CE to the locality answer) or
            "malmen" (KL to the pre-edit model).
        module_names: the edited modules by HF path, ascending depth; () = the model's default targets.
        n_last_layers: how many last blocks the default targets cover.
        chunk_tokens: tokens per hypernet chunk (memory bound of the hypernet pass).
        loc_coef: weight of the locality loss in meta-training.
        seed: seed of the block initialisation.
    """

    rank: int = 1920
    n_blocks: int = 2
    eta_init: float = 1e-5
    lamda_init: float = 0.0
    spread: Spread = "reference"
    variant: Variant = "horse"
    module_names: tuple[str, ...] = field(default_factory=tuple)
    n_last_layers: int = 6
    chunk_tokens: int = 1024
    loc_coef: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_spread(self.spread)
        if self.variant not in VARIANTS:
            raise EngineError(f"unknown variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        if self.rank < 1 or self.n_blocks < 0 or self.chunk_tokens < 1:
            raise EngineError(
                f"rank ({self.rank}) and chunk_tokens ({self.chunk_tokens}) must be ≥ 1 and n_blocks "
                f"({self.n_blocks}) ≥ 0"
            )
        object.__setattr__(self, "module_names", tuple(self.module_names))

    def to_dict(self) -> dict:
        """JSON-safe dict (for checkpoint metadata)."""
        d = asdict(self)
        d["module_names"] = list(self.module_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HyperConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["module_names"] = tuple(known.get("module_names", ()))
        return cls(**known)


class RunningNormaliser(nn.Module):
    """Running mean and standard deviation of D-wide inputs (Welford / Chan merge, float64 buffers).

    It changes only when `update` is called: the editor calls it during meta-training, and when serving
    only if asked to (`Editor.update_normaliser`). Before any update it has no statistics and
    `stats_for(x)` falls back to the batch's own statistics (without storing them).
    """

    def __init__(self, size_D: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean_D", torch.zeros(size_D, dtype=torch.float64))
        self.register_buffer("m2_D", torch.zeros(size_D, dtype=torch.float64))

    @property
    def has_stats(self) -> bool:
        return float(self.count) >= 2

    @torch.no_grad()
    def update(self, x_ND: torch.Tensor) -> None:
        """Merge a batch of rows into the running statistics.

        Raises:
            NonFiniteCapture: a row holds NaN or Inf (one such row would poison the statistics for good).
        """
        x = x_ND.detach().to(torch.float64)
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteCapture(f"{int((~torch.isfinite(x)).any(-1).sum())} of {x.shape[0]} rows given to the "
                                   "hypernet's input normaliser are not finite; the normaliser was left unchanged")
        m = x.shape[0]
        if m == 0:
            return
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        n = self.count
        total = n + m
        delta = batch_mean - self.mean_D
        self.mean_D += delta * (m / total)
        self.m2_D += batch_m2 + delta.pow(2) * (n * m / total)
        self.count.fill_(float(total))

    @staticmethod
    def _mean_std(count: float, mean_D: torch.Tensor, m2_D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        std_D = (m2_D / max(count - 1.0, 1.0)).sqrt()
        return mean_D, std_D

    def stats_for(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean_D, std_D) to normalise with: the running ones, or x's own when there are none yet."""
        if self.has_stats:
            return self._mean_std(float(self.count), self.mean_D, self.m2_D)
        x = x_ND.detach().to(torch.float64)
        mean = x.mean(0)
        return self._mean_std(float(x.shape[0]), mean, ((x - mean) ** 2).sum(0))


def normalise(x_ND: torch.Tensor, mean_D: torch.Tensor, std_D: torch.Tensor) -> torch.Tensor:
    """(x − mean) / (std + eps), in x's dtype (as MALMEN's RunningMeanStd)."""
    eps = torch.finfo(x_ND.dtype).eps
    return (x_ND - mean_D.to(x_ND.dtype)) / (std_D.to(x_ND.dtype) + eps)


class HyperBlock(nn.Module):
    """h = relu(y A B + b); h = scale[l] ⊙ h + shift[l]; return y + h (B = 0: identity at init).

    The rectifier must pass the gradient at exactly 0 (`clamp(min=0)`, as the reference block does), not
    block it (`torch.relu`): at init B = 0 and b = 0 put every pre-activation at 0, so with relu's zero
    subgradient B, b and scale would never receive a gradient and the blocks would stay the identity forever.
    """

    def __init__(self, size_D: int, rank_R: int, n_layers: int, generator: torch.Generator) -> None:
        super().__init__()
        # unscaled N(0, 1) A and zero B, as the reference MALMEN block
        self.A_DR = nn.Parameter(torch.randn(size_D, rank_R, generator=generator))
        self.B_RD = nn.Parameter(torch.zeros(rank_R, size_D))
        self.bias_D = nn.Parameter(torch.zeros(size_D))
        self.scale_LD = nn.Parameter(torch.ones(n_layers, size_D))
        self.shift_LD = nn.Parameter(torch.zeros(n_layers, size_D))

    def forward(self, y_ND: torch.Tensor, layer: int) -> torch.Tensor:
        h_ND = (y_ND @ self.A_DR @ self.B_RD + self.bias_D).clamp(min=0)  # gradient 1 at 0: see the docstring
        h_ND = self.scale_LD[layer] * h_ND + self.shift_LD[layer]
        return y_ND + h_ND


class HyperNet(nn.Module):
    """The hypernet shared by the edited layers of one (K, V) shape."""

    def __init__(
        self, d_k: int, d_v: int, *, rank: int, n_blocks: int, n_layers: int, eta_init: float,
        lamda_init: float = 0.0, seed: int = 0,
    ) -> None:
        super().__init__()
        self.d_k, self.d_v = d_k, d_v
        gen = torch.Generator().manual_seed(seed)
        self.normaliser = RunningNormaliser(d_k + d_v)
        self.blocks = nn.ModuleList(HyperBlock(d_k + d_v, rank, n_layers, gen) for _ in range(n_blocks))
        self.eta_L = nn.Parameter(torch.full((n_layers,), float(eta_init)))
        self.lamda_L = nn.Parameter(torch.full((n_layers,), float(lamda_init)))

    def forward(
        self, keys_NK: torch.Tensor, grads_NV: torch.Tensor, layer: int,
        stats: tuple[torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k̃, g̃) = net(normalise([k, g])) for one layer (index within this net).

        Args:
            keys_NK, grads_NV: captured keys and output gradients (any float dtype; cast to the net's).
            layer: the layer's index in this net's per-layer tables.
            stats: (mean_D, std_D) of the normaliser to use.
        """
        dtype = self.eta_L.dtype
        y_ND = normalise(torch.cat([keys_NK.to(dtype), grads_NV.to(dtype)], dim=-1), *stats)
        for block in self.blocks:
            y_ND = block(y_ND, layer)
        return y_ND.split([self.d_k, self.d_v], dim=-1)

    def residuals(
        self, keys_NK: torch.Tensor, grads_NV: torch.Tensor, layer: int,
        stats: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """R (N×V): r_i = −η_l ⟨k_i, k̃_i⟩ g̃_i (paper step 5)."""
        ktil_NK, gtil_NV = self(keys_NK, grads_NV, layer, stats)
        coeff_N1 = -self.eta_L[layer] * (keys_NK.to(ktil_NK.dtype) * ktil_NK).sum(-1, keepdim=True)
        return coeff_N1 * gtil_NV

    def lam(self, layer: int) -> torch.Tensor:
        """λ_l = exp(lamda_l)."""
        return self.lamda_L[layer].exp()


def shape_key(d_k: int, d_v: int) -> str:
    """Name of the net for one (K, V) shape, e.g. "1536x576"."""
    return f"{d_k}x{d_v}"


class HyperNetSet(nn.Module):
    """All hypernets of one editor and the map from edited module to (net, per-layer index)."""

    def __init__(self, config: HyperConfig, module_names: Sequence[str], shapes_KV: Sequence[tuple[int, int]]) -> None:
        super().__init__()
        if len(module_names) != len(shapes_KV) or not module_names:
            raise EngineError("the editor needs at least one target module and one shape per module")
        self.module_names = list(module_names)
        self.shapes_KV = [tuple(int(x) for x in s) for s in shapes_KV]
        self.slots: dict[str, tuple[str, int]] = {}
        counts: dict[str, int] = {}
        for name, (d_k, d_v) in zip(self.module_names, self.shapes_KV):
            key = shape_key(d_k, d_v)
            self.slots[name] = (key, counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        self.nets = nn.ModuleDict()
        for i, key in enumerate(counts):
            d_k, d_v = (int(x) for x in key.split("x"))
            self.nets[key] = HyperNet(
                d_k, d_v, rank=config.rank, n_blocks=config.n_blocks, n_layers=counts[key],
                eta_init=config.eta_init, lamda_init=config.lamda_init, seed=config.seed + i,
            )

    def net_for(self, module_name: str) -> tuple[HyperNet, int]:
        key, idx = self.slots[module_name]
        return self.nets[key], idx  # type: ignore[return-value]


def layer_residuals(
    net: HyperNet, layer: int, keys_NK: torch.Tensor, grads_NV: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor], chunk_tokens: int,
) -> torch.Tensor:
    """R^l (N×V) computed `chunk_tokens` rows at a time (keeps the block activations small)."""
    parts = [
        net.residuals(keys_NK[s : s + chunk_tokens], grads_NV[s : s + chunk_tokens], layer, stats)
        for s in range(0, keys_NK.shape[0], chunk_tokens)
    ]
    if not parts:
        return torch.zeros(0, net.d_v, dtype=net.eta_L.dtype, device=keys_NK.device)
    return torch.cat(parts, dim=0)
