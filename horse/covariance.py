"""Second-moment statistics C = E[k kᵀ] of the edited modules' inputs, for MEMIT's closed form.

Owns: the local text corpus MEMIT's statistics are estimated from, the streaming estimator (one forward
pass over packed text, hooks on every requested module), the shrinkage, and the safetensors cache.

MEMIT (Meng et al. 2023, eq. 14) regularises its batch update with C₀ = K₀K₀ᵀ, the second moment of the
keys of the facts the model already knows, estimated in the paper from 100k Wikipedia samples. Nothing can
be downloaded here, so C is estimated from local text instead: the CounterFact *train* prompts, their
rephrases and locality prompts, and the zsRE *train* questions (src, rephrase, loc) from the repo's
`data/` dir. Never the val or edit splits. Texts are shuffled with a fixed seed, joined with newlines and
packed into fixed-length token windows (long contexts look more like Wikipedia than 10-token prompts and
keep the attention-sink position rare), then the first N tokens are used.

C is *uncentred* (as MEMIT's `layer_stats` with `mom2`): C_KK = (1/N) Σ_t k_t k_tᵀ, accumulated in float64,
stored fp32. The cache key covers the model fingerprint, the layer, the corpus hash (sha256 of the token
ids actually used) and N; shrinkage is applied after loading (`shrink_KK`), so it can change without a
recompute.

Dimension key: N tokens, K = d_k (module input width).

Run the tests with `pytest tests/horse/test_memit.py`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from horse.arch import get_module, module_shape_KV
from horse.errors import CovarianceNotCached, EngineError
from horse.progress import Progress, log_stage

log = logging.getLogger("horse.covariance")

CORPUS_NAME = "counterfact-train(prompt,rephrase,locality)+zsre-train(src,rephrase,loc)"
CORPUS_SEED = 0
WINDOW_TOKENS = 128
_CACHE_VERSION = "1"


class CorpusTooSmall(EngineError):
    """The covariance corpus has fewer tokens than MEMIT's statistics need; add text or lower N."""


# --------------------------------------------------------------------------- pure math


def second_moment_KK(keys_NK: torch.Tensor) -> torch.Tensor:
    """Uncentred second moment (1/N) Σ_n k_n k_nᵀ of a block of keys, in float64.

    Args:
        keys_NK: N keys of width K.

    Returns:
        C_KK, symmetric positive semi-definite, float64.
    """
    keys = keys_NK.double()
    return keys.T @ keys / max(keys.shape[0], 1)


def shrink_KK(cov_KK: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Linear shrinkage towards a scaled identity: (1 − α) C + α (tr C / K) I.

    Keeps C well conditioned when N is only ~10–40 × K (the Ledoit–Wolf target, with a fixed α).

    Args:
        cov_KK: second moment C, K × K.
        shrinkage: α in [0, 1].

    Returns:
        The shrunk K × K matrix, same dtype.
    """
    if not 0.0 <= shrinkage <= 1.0:
        raise EngineError(f"covariance shrinkage must be in [0, 1], got {shrinkage}")
    k = cov_KK.shape[0]
    scale = torch.diagonal(cov_KK).sum() / k
    eye = torch.eye(k, dtype=cov_KK.dtype, device=cov_KK.device)
    return (1.0 - shrinkage) * cov_KK + shrinkage * scale * eye


# --------------------------------------------------------------------------- corpus


def default_data_dir() -> Path:
    """The repo's vendored `data/` dir (CounterFact and zsRE samples with their SOURCE.md)."""
    return Path(__file__).resolve().parent.parent / "data"


def corpus_texts(data_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Training-split texts for the statistics: CounterFact train prompts + rephrases + locality prompts,
    zsRE train src + rephrase + loc questions. Order: file order (shuffling happens in `corpus_token_ids`).

    Raises:
        CorpusTooSmall: when neither file exists.
    """
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    texts: list[str] = []
    cf = root / "counterfact" / "counterfact-train.json"
    zs = root / "zsre" / "zsre_mend_train-1k.json"
    if cf.is_file():
        for rec in json.loads(cf.read_text()):
            texts += [rec.get("prompt"), rec.get("rephrase_prompt"), rec.get("locality_prompt")]
    if zs.is_file():
        for rec in json.loads(zs.read_text()):
            texts += [rec.get("src"), rec.get("rephrase"), rec.get("loc")]
    texts = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise CorpusTooSmall(f"no covariance corpus under {root}: expected counterfact/counterfact-train.json "
                             "and zsre/zsre_mend_train-1k.json; pass data_dir")
    return texts


def corpus_token_ids(tok, texts: Sequence[str], n_tokens: int, *, seed: int = CORPUS_SEED,
                     window: int = WINDOW_TOKENS) -> torch.Tensor:
    """Pack the shuffled texts into windows of token ids; exactly the first ⌈N / window⌉ windows.

    Args:
        tok: the model's tokenizer.
        texts: corpus texts.
        n_tokens: N, the number of tokens wanted (rounded up to whole windows).
        seed: shuffle seed (fixed: the corpus must be reproducible for the cache key).
        window: tokens per packed sequence (a BOS is prepended when the tokenizer uses one).

    Returns:
        ids_BT (int64), B windows of T = window tokens.

    Raises:
        CorpusTooSmall: when the texts hold fewer than n_tokens tokens.
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    bos = tok.bos_token_id if getattr(tok, "add_bos_token", False) and tok.bos_token_id is not None else None
    body = window - (1 if bos is not None else 0)
    n_windows = -(-n_tokens // window)
    need = n_windows * body
    ids: list[int] = []
    step = 512
    for start in range(0, len(order), step):  # tokenise lazily: only as much text as needed
        chunk = "\n".join(texts[i] for i in order[start:start + step]) + "\n"
        ids += tok(chunk, add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise CorpusTooSmall(f"the covariance corpus has {len(ids)} tokens, fewer than the N = {need} asked; "
                             "lower cov_tokens_per_dim or add text")
    ids_BT = torch.tensor(ids[:need], dtype=torch.long).view(n_windows, body)
    if bos is not None:
        ids_BT = torch.cat([torch.full((n_windows, 1), bos, dtype=torch.long), ids_BT], dim=1)
    return ids_BT


def corpus_hash(ids_BT: torch.Tensor) -> str:
    """sha256 of the exact token ids used (covers texts, shuffle, tokenizer and packing)."""
    return hashlib.sha256(ids_BT.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------------- estimation


class _StopForward(Exception):
    """Raised by a hook once the deepest needed module has run: the rest of the forward is not needed."""


@contextmanager
def _input_hooks(model: nn.Module, names: Sequence[str], sums: dict[str, torch.Tensor],
                 stop_at: str) -> Iterator[None]:
    """Accumulate Σ k kᵀ (float64) of each module's input over all tokens; stop after `stop_at`."""
    handles = []

    def make(name: str):
        def hook(module, args):
            keys_NK = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] += keys_NK.T @ keys_NK
            if name == stop_at:
                raise _StopForward

        return hook

    try:
        for name in names:
            handles.append(get_module(model, name).register_forward_pre_hook(make(name)))
        yield
    finally:
        for h in handles:
            h.remove()


def _layer_index(name: str) -> int:
    nums = [int(p) for p in name.split(".") if p.isdigit()]
    return nums[-1] if nums else 0


@torch.no_grad()
def estimate_second_moments(model: nn.Module, names: Sequence[str], ids_BT: torch.Tensor,
                            *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """C_KK = (1/N) Σ k kᵀ of the inputs of each named module, over all tokens of `ids_BT`.

    One forward pass per batch of windows with hooks on every module; the forward stops after the deepest
    module (later layers are not needed).

    Args:
        model: the causal LM (its current weights are what is measured).
        names: HF module paths.
        ids_BT: packed token windows (no padding).
        batch_size: windows per forward.

    Returns:
        {name: C_KK float32}.
    """
    device = next(model.parameters()).device
    widths = {n: module_shape_KV(get_module(model, n))[0] for n in names}
    sums = {n: torch.zeros(k, k, dtype=torch.float64, device=device) for n, k in widths.items()}
    deepest = max(names, key=_layer_index)
    n_total = 0
    with _input_hooks(model, names, sums, stop_at=deepest), \
            Progress(f"covariance of {len(names)} layers", int(ids_BT.numel()), unit="tok", logger=log) as progress:
        for start in range(0, ids_BT.shape[0], batch_size):
            ids = ids_BT[start:start + batch_size].to(device)
            n_total += ids.numel()
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            progress.set(n_total)
    return {n: (s / n_total).float().cpu() for n, s in sums.items()}


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True)
class CovarianceInfo:
    """What the statistics were estimated from (recorded in MEMIT's results)."""

    corpus: str
    corpus_sha256: str
    n_tokens: int
    window_tokens: int
    cached_layers: tuple[str, ...]
    computed_layers: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        return {
            "cov_corpus": self.corpus, "cov_corpus_sha256": self.corpus_sha256, "cov_n_tokens": self.n_tokens,
            "cov_window_tokens": self.window_tokens,
            "cov_cached_layers": list(self.cached_layers), "cov_computed_layers": list(self.computed_layers),
        }


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of the model's current weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike[str], fingerprint: str, layer: str, corpus_sha256: str,
               n_tokens: int) -> Path:
    """`<cache_dir>/memit-cov/<sha256(version, fingerprint, layer, corpus, N)[:24]>.safetensors`."""
    key = "|".join([_CACHE_VERSION, fingerprint, layer, corpus_sha256, str(n_tokens)])
    return Path(cache_dir) / "memit-cov" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _save_atomic(path: Path, cov_KK: torch.Tensor, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"cov_KK": cov_KK.contiguous()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load(path: Path) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("cov_KK")


def layer_second_moments(model: nn.Module, tok, layers: Sequence[str], *, cache_dir: str | os.PathLike[str],
                         n_tokens: int, fingerprint: str | None = None, texts: Sequence[str] | None = None,
                         corpus: str = CORPUS_NAME, batch_size: int = 8,
                         ) -> tuple[dict[str, torch.Tensor], CovarianceInfo]:
    """Raw (unshrunk) second moments of each layer's input, from the cache or estimated and cached.

    Args:
        model: the causal LM.
        tok: its tokenizer.
        layers: HF module paths.
        cache_dir: directory of the safetensors cache (a `memit-cov/` subdir is used).
        n_tokens: N, tokens of corpus text to average over.
        fingerprint: model fingerprint for the cache key (default: `model_fingerprint(model)`). Pass the base
            model's fingerprint to reuse its statistics on an already edited model, as MEMIT does; statistics
            missing from the cache are then computed only if `model` is that base (its weights hash to it).
        texts: corpus texts (default: `corpus_texts()`); `corpus` names them in the info.
        batch_size: windows per forward.

    Returns:
        ({layer: C_KK float32}, CovarianceInfo).

    Raises:
        CovarianceNotCached: a layer's statistics are missing and `model` is not the model `fingerprint` names
            (they would be computed on an edited head and stored under the base's key).
    """
    texts = corpus_texts() if texts is None else texts
    ids_BT = corpus_token_ids(tok, texts, n_tokens)
    digest = corpus_hash(ids_BT)
    fp = fingerprint or model_fingerprint(model)
    out: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for layer in layers:
        path = cache_path(cache_dir, fp, layer, digest, ids_BT.numel())
        if path.is_file():
            out[layer] = _load(path)
        else:
            missing.append(layer)
    log_stage(log, "covariance: cache", cached=len(layers) - len(missing), to_compute=len(missing),
              tokens=int(ids_BT.numel()))
    if missing and fingerprint is not None and model_fingerprint(model) != fingerprint:
        raise CovarianceNotCached(f"the covariance statistics of {len(missing)} layer(s) are not cached for base model "
                                  f"{fingerprint[:12]}…, and this model is not that base (an edited head); compute "
                                  "them on the base first (MemitEditor(base, tokenizer=tok, ...) or "
                                  "MemitEditor.warm_caches(base, tok)), then edit the head")
    if missing:
        fresh = estimate_second_moments(model, missing, ids_BT, batch_size=batch_size)
        for layer, cov in fresh.items():
            meta = {"layer": layer, "model_fingerprint": fp, "corpus": corpus, "corpus_sha256": digest,
                    "n_tokens": str(ids_BT.numel()), "window_tokens": str(ids_BT.shape[1]),
                    "statistic": "uncentred second moment E[k k^T] of the module input"}
            _save_atomic(cache_path(cache_dir, fp, layer, digest, ids_BT.numel()), cov, meta)
            out[layer] = cov
    info = CovarianceInfo(corpus=corpus, corpus_sha256=digest, n_tokens=int(ids_BT.numel()),
                          window_tokens=int(ids_BT.shape[1]),
                          cached_layers=tuple(n for n in layers if n not in missing),
                          computed_layers=tuple(missing))
    return out, info


def preservation_moments(model: nn.Module, tok, layers: Sequence[str], *, cache_dir: str | os.PathLike[str],
                         tokens_per_dim: int = 20, shrinkage: float = 1e-2,
                         ) -> tuple[dict[str, torch.Tensor], CovarianceInfo]:
    """The shrunk second moments C_l (K×K, float64) that `Editor.set_preservation` takes, cached like MEMIT's.

    N = tokens_per_dim × the widest d_k tokens of the local corpus; the same statistics, cache and shrinkage
    as MEMIT (`layer_second_moments`, `shrink_KK`), for the hypernet's own edited layers.
    """
    d_k = max(module_shape_KV(get_module(model, name))[0] for name in layers)
    raw, info = layer_second_moments(model, tok, layers, cache_dir=cache_dir, n_tokens=tokens_per_dim * d_k)
    return {name: shrink_KK(raw[name].double(), shrinkage) for name in layers}, info
