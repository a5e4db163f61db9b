"""MEMIT's settings: `MemitConfig` and the hyper-parameters per architecture it is filled from.

`MemitConfig.for_model(model, **overrides)` is the one entry point: it looks the model's architecture up in
`MEMIT_HPARAMS` (`arch_hparams`), fills the edited layers and the z-optimisation and λ values from that row, then
applies the overrides. The rows, with the reference code's names (kmeng01/memit `hparams/MEMIT/*.json`):

| row | layers (of n) | v_lr | v_num_grad_steps | clamp_norm_factor | v_weight_decay | kl_factor | mom2_update_weight |
|---|---|---|---|---|---|---|---|
| smollm2-135m (measured) | 3–8 (30) | 0.5 | 25 | 4 | 1e-3 | 0.0625 | 15000 |
| gpt2 (the reference's gpt2-xl) | 13–17 (48) | 0.5 | 20 | 0.75 | 0.5 | 0.0625 | 20000 |
| gptj (the reference's gpt-j-6B) | 3–8 (28) | 0.5 | 25 | 0.75 | 0.5 | 0.0625 | 15000 |
| generic | 5 from ~12 % depth | 0.5 | 25 | 4 | 1e-3 | 0.0625 | 15000 |

The reference's `v_loss_layer` is the last block in every row (47 for GPT-2 XL, 27 for GPT-J): the z loss is
read at the model's output, which is what `horse.memit_z` does for every row (`ArchHparams.v_loss_layer`). A
GPT-2 or GPT-J of another depth gets its family's values with the layer window at the same relative depth. The
SmolLM2-135M layers come from `benchmarks/studies/memit_layers.py` (50 CounterFact val cases, one batch, λ =
15000; ES / PS / NS / Score by probability, unedited 36 / 42 / 70 / 45.5: layers 3–8 74 / 74 / 70 / 72.6,
6–11 52 / 50 / 70 / 56.1, 12–17 62 / 56 / 72 / 62.7, 24–29 36 / 42 / 70 / 45.5; file
`benchmarks/results/memit_layers.json`); its other values, and the generic row's, are the Llama values public
MEMIT ports use (EasyEdit's `hparams/MEMIT/llama*.yaml`).

Run the tests with `pytest tests/horse/test_memit_config.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from horse.arch import default_target_modules, num_layers
from horse.errors import EngineError

# the window the layer sweep picked for SmolLM2-135M (the `smollm2-135m` row's layers, as module paths)
SMOLLM2_135M_LAYERS: tuple[str, ...] = tuple(f"model.layers.{i}.mlp.down_proj" for i in range(3, 9))


@dataclass(frozen=True)
class ArchHparams:
    """One row of MEMIT's per-architecture table (the reference's names in brackets).

    Attributes:
        name: the row's key in `MEMIT_HPARAMS`.
        source: where the numbers come from.
        layers: block indices to edit (`layers`) for a model `n_layers` deep; () → 5 blocks from ~12 % depth.
        n_layers: the depth `layers` were chosen for; another depth gets the window at the same relative depth.
        lr, max_steps, clamp_norm_factor, v_weight_decay, kl_factor, mom2_update_weight: as `MemitConfig`.
    """

    name: str
    source: str
    layers: tuple[int, ...]
    n_layers: int
    lr: float = 0.5
    max_steps: int = 25
    clamp_norm_factor: float = 4.0
    v_weight_decay: float = 1e-3
    kl_factor: float = 0.0625
    mom2_update_weight: float = 15000.0

    def block_indices(self, n: int) -> tuple[int, ...]:
        """The blocks to edit in a model n blocks deep: `layers` at the row's own depth, else the same window
        moved to the same relative depth (at most n/2 wide); the generic row: min(5, n/2) from ~12 % depth."""
        if self.layers and n == self.n_layers:
            return self.layers
        width = max(1, min(len(self.layers) or 5, n // 2))
        start = round(self.layers[0] * n / self.n_layers) if self.layers else round(0.12 * n)
        start = min(n - width, max(0, start))
        return tuple(range(start, start + width))

    @staticmethod
    def v_loss_layer(n: int) -> int:
        """The block whose output the z loss reads (`v_loss_layer`): the last, in every row and in the reference."""
        return n - 1

    def config_values(self, model: nn.Module) -> dict[str, object]:
        """The `MemitConfig` fields this row sets for `model`."""
        every = default_target_modules(model, n_last=num_layers(model))
        return {"layers": tuple(every[i] for i in self.block_indices(len(every))), "lr": self.lr,
                "max_steps": self.max_steps, "clamp_norm_factor": self.clamp_norm_factor,
                "v_weight_decay": self.v_weight_decay, "kl_factor": self.kl_factor,
                "mom2_update_weight": self.mom2_update_weight}


_REFERENCE = "kmeng01/memit hparams/MEMIT/"
MEMIT_HPARAMS: dict[str, ArchHparams] = {
    "smollm2-135m": ArchHparams("smollm2-135m", "measured: benchmarks/studies/memit_layers.py (layers); Llama "
                                "values of public MEMIT ports (the rest)", layers=tuple(range(3, 9)), n_layers=30),
    "gpt2": ArchHparams("gpt2", _REFERENCE + "gpt2-xl.json", layers=tuple(range(13, 18)), n_layers=48, lr=0.5,
                        max_steps=20, clamp_norm_factor=0.75, v_weight_decay=0.5, mom2_update_weight=20000.0),
    "gptj": ArchHparams("gptj", _REFERENCE + "EleutherAI_gpt-j-6B.json", layers=tuple(range(3, 9)), n_layers=28,
                        lr=0.5, max_steps=25, clamp_norm_factor=0.75, v_weight_decay=0.5,
                        mom2_update_weight=15000.0),
    "generic": ArchHparams("generic", "Llama values of public MEMIT ports; layers from ~12 % depth (MEMIT's own "
                           "choices: 3–8 of 28 for GPT-J, 13–17 of 48 for GPT-2 XL)", layers=(), n_layers=0),
}


def _is_smollm2_135m(model: nn.Module) -> bool:
    c = getattr(model, "config", None)
    return (getattr(c, "model_type", None) == "llama" and getattr(c, "num_hidden_layers", None) == 30
            and getattr(c, "hidden_size", None) == 576 and getattr(c, "intermediate_size", None) == 1536
            and getattr(c, "vocab_size", None) == 49152)


def arch_key(model: nn.Module) -> str:
    """The model's row in `MEMIT_HPARAMS`: "smollm2-135m", "gpt2" (any GPT-2), "gptj", else "generic"."""
    if _is_smollm2_135m(model):
        return "smollm2-135m"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type if model_type in ("gpt2", "gptj") else "generic"


def arch_hparams(model: nn.Module) -> ArchHparams:
    """MEMIT's hyper-parameters for this model's architecture (`arch_key`)."""
    return MEMIT_HPARAMS[arch_key(model)]


def default_layers(model: nn.Module) -> tuple[str, ...]:
    """MEMIT's edited layers for this model: its row's window (`arch_hparams`), as module paths."""
    return arch_hparams(model).config_values(model)["layers"]  # type: ignore[return-value]


@dataclass(frozen=True)
class MemitConfig:
    """MEMIT hyperparameters (the reference code's names in brackets). Build with `MemitConfig.for_model`.

    Attributes:
        layers: HF paths of the MLP output modules to edit, ascending (`layers`); () → `default_layers`.
        lr: Adam learning rate of δ (`v_lr`).
        max_steps: optimisation steps of δ (`v_num_grad_steps`).
        kl_factor: weight of the KL term on `kl_template` (`kl_factor`).
        clamp_norm_factor: ‖δ‖ ≤ factor · ‖h^L‖ (`clamp_norm_factor`).
        v_weight_decay: weight of ‖δ‖ / ‖h^L‖² (`v_weight_decay`).
        early_stop_loss: a fact's δ stops once its loss is below this (the reference's 5e-2).
        mom2_update_weight: λ of eq. 14 (`mom2_update_weight`).
        context_templates: prefixes "…{}" applied to the prompt, "{}" first; None → the reference's: "{}" and
            five texts sampled from the base model, cached (`horse.memit_templates`).
        kl_template: the essence prompt of the KL term (`"{} is a"`).
        cov_tokens_per_dim: N = this × d_k tokens of corpus text for C (issue: ≥ 10).
        cov_shrinkage: α of `shrink_KK` applied to C.
        lm_batch_size: sequences per forward pass.
        prefix_cache_mib: memory for the keys and values of the tokens before each lookup (`horse.memit_z`:
            the z steps then run only the rest of each sequence); 0 turns it off.
    """

    layers: tuple[str, ...] = ()
    lr: float = 0.5
    max_steps: int = 25
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    v_weight_decay: float = 1e-3
    early_stop_loss: float = 5e-2
    mom2_update_weight: float = 15000.0
    context_templates: tuple[str, ...] | None = None
    kl_template: str = "{} is a"
    cov_tokens_per_dim: int = 20
    cov_shrinkage: float = 1e-2
    lm_batch_size: int = 64
    prefix_cache_mib: int = 2048

    @classmethod
    def for_model(cls, model: nn.Module, **overrides: object) -> MemitConfig:
        """This model's row of `MEMIT_HPARAMS` (layers, z optimisation, λ), then `overrides` on top."""
        values = arch_hparams(model).config_values(model)
        config = cls(**{**values, **overrides})  # type: ignore[arg-type]
        return config if config.layers else replace(config, layers=values["layers"])  # type: ignore[arg-type]

    def templates(self) -> tuple[str, ...]:
        """The context templates, once resolved (`memit_deltas` resolves None to the sampled ones)."""
        if self.context_templates is None:
            raise EngineError("MemitConfig.context_templates is None (sampled from the base model): resolve them "
                              "with horse.memit_templates.context_templates(base, tok, cache_dir=...) and pass "
                              "replace(config, context_templates=...), or call memit_deltas, which does")
        return self.context_templates
