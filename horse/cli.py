"""`horse-ledger hypernet train|info`: meta-train a hypernet for a model, show a hypernet's card.

Owns the hypernet command line (issue 3, "Interfaces"); `eval` and `model` live in horse/evalcli.py and are
re-exported here because the root group loads them from `horse.cli` (docs/ARCHITECTURE.md):

    horse-ledger hypernet train --model tiny-llama --data data/counterfact/counterfact-train.json \\
        --out hypernet.safetensors [--variant horse|malmen] [--spread S] [--n-edits N] [--steps N] \\
        [--rank R] [--blocks B] [--lr LR] [--val-data FILE] [--device D] [--resume] [--seed S]
    horse-ledger hypernet info hypernet.safetensors

All inputs are options (no Settings). Errors are `horse.errors.EngineError`s, reported once by the root group.
Tests: `python -m pytest tests/horse/test_metatrain.py -q -k cli`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click

SPREADS = ("reference", "orthogonal", "chained", "gram-schmidt", "none")


def __getattr__(name: str) -> Any:
    # `eval` and `model` are owned by horse/evalcli.py; the root group looks them up here.
    if name in ("eval_cmd", "model"):
        from horse import evalcli

        return getattr(evalcli, name)
    raise AttributeError(f"module 'horse.cli' has no attribute {name!r}")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@click.group("hypernet")
def hypernet() -> None:
    """Meta-train and inspect HORSE / MALMEN hypernetworks."""


@hypernet.command("train")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="smollm2-135m, tiny-gpt2, tiny-llama or a local Hugging Face model dir.")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training split: CounterFact (EasyEdit flat or ROME) or zsRE (MEND) file.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Hypernet file to write (.safetensors; a .json card, .optim.safetensors and .log.jsonl go beside it).")
@click.option("--variant", type=click.Choice(("horse", "malmen")), default="horse", show_default=True,
              help="Locality loss: CE to the locality answer (horse) or KL to the pre-edit model (malmen).")
@click.option("--spread", type=click.Choice(SPREADS), default=None,
              help="Residual spread [default: reference for horse, none for malmen].")
@click.option("--n-edits", type=click.IntRange(min=1), default=100, show_default=True, help="Edits per meta-step.")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Meta-steps.")
@click.option("--rank", type=click.IntRange(min=1), default=1920, show_default=True, help="Hypernet block rank.")
@click.option("--blocks", type=click.IntRange(min=0), default=2, show_default=True, help="Residual blocks.")
@click.option("--lr", type=click.FloatRange(min=0), default=1e-5, show_default=True, help="Adam learning rate.")
@click.option("--eta-init", type=click.FloatRange(min=0), default=1e-5, show_default=True,
              help="Initial per-layer step η (1e-6 is the zsRE-style setting).")
@click.option("--lm-batch-size", type=click.IntRange(min=1), default=25, show_default=True,
              help="Requests per LM mini-batch.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N training records.")
@click.option("--val-data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Validation split for the validation loss and early stopping.")
@click.option("--val-every", type=click.IntRange(min=0), default=10, show_default=True,
              help="Evaluate on --val-data every N steps.")
@click.option("--val-edits", type=click.IntRange(min=1), default=100, show_default=True,
              help="Validation requests per evaluation.")
@click.option("--patience", type=click.IntRange(min=0), default=0, show_default=True,
              help="Stop after N evaluations without a better validation loss (0: never).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=50, show_default=True,
              help="Save the hypernet and optimizer every N steps.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop cleanly after the step that passes this many minutes (the best validation state is kept).")
@click.option("--loc-coef", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Weight of the locality loss against the generalisation loss.")
@click.option("--train-lambda/--fixed-lambda", default=False, show_default=True,
              help="Also train λ (the ridge regulariser, one per layer); the reference (MALMEN) keeps it fixed.")
@click.option("--max-nonfinite-steps", type=click.IntRange(min=0), default=10, show_default=True,
              help="Stop after N steps whose capture or gradient was NaN/Inf (each is skipped; 0: never stop).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(("float32", "bfloat16")), default="float32", show_default=True,
              help="Model weights dtype (the editor math is fp32).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Model cache (the converted SmolLM2).")
@click.option("--resume", is_flag=True, help="Continue from --out and its .optim.safetensors.")
@click.option("--seed", type=int, default=0, show_default=True, help="Data order and initialisation seed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train_cmd(model_name: str, data_path: Path, out_path: Path, variant: str, spread: str | None, n_edits: int,
              steps: int, rank: int, blocks: int, lr: float, eta_init: float, lm_batch_size: int, limit: int | None,
              val_data: Path | None, val_every: int, val_edits: int, patience: int, checkpoint_every: int,
              time_limit: float | None, loc_coef: float, train_lambda: bool, max_nonfinite_steps: int, device: str,
              dtype: str, cache_dir: Path | None, resume: bool, seed: int, quiet: bool) -> None:
    """Meta-train a hypernet on a training split and write it to --out."""
    import torch

    from horse.data import load_requests
    from horse.hypernet import HyperConfig
    from horse.metatrain import TrainConfig, train_hypernet
    from horse.zoo import load_model

    model, tok = load_model(model_name, device=device, dtype=getattr(torch, dtype), cache_dir=cache_dir,
                            progress=not quiet)
    train_requests = load_requests(data_path, limit=limit)
    val_requests = load_requests(val_data) if val_data else None
    hyper = HyperConfig(rank=rank, n_blocks=blocks, eta_init=eta_init, variant=variant,  # type: ignore[arg-type]
                        spread=spread or ("none" if variant == "malmen" else "reference"),  # type: ignore[arg-type]
                        loc_coef=loc_coef, seed=seed)
    train = TrainConfig(steps=steps, n_edits=n_edits, lr=lr, lm_batch_size=lm_batch_size,
                        checkpoint_every=checkpoint_every, val_every=val_every if val_requests else 0,
                        val_edits=val_edits, patience=patience, seed=seed, train_lambda=train_lambda,
                        max_nonfinite_steps=max_nonfinite_steps, time_limit_s=time_limit * 60 if time_limit else None)
    train_hypernet(model, tok, train_requests, hyper=hyper, train=train, out_path=out_path,
                   val_requests=val_requests, resume=resume, data_sha256=file_sha256(data_path),
                   progress=not quiet)
    click.echo(f"wrote {out_path} (card {out_path}.json)")


@hypernet.command("info")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the whole card as JSON.")
def info_cmd(path: Path, as_json: bool) -> None:
    """Show a hypernet file's card: base model, modules, shapes, settings, training."""
    from horse.editor import read_checkpoint

    tensors, card = read_checkpoint(path)
    if as_json:
        click.echo(json.dumps(card, indent=2))
        return
    n_params = sum(t.numel() for k, t in tensors.items() if ".normaliser." not in k)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    cfg = card.get("config", {})
    rows = [
        ("file", str(path)),
        ("variant / spread", f"{card.get('variant')} / {card.get('spread')}"),
        ("rank / blocks", f"{card.get('rank')} / {card.get('n_blocks')}"),
        ("eta init", str(cfg.get("eta_init"))),
        ("parameters", f"{n_params:,} ({', '.join(dtypes)})"),
        ("base model fingerprint", str(card.get("base_model_fingerprint"))),
        ("modules", ", ".join(card.get("module_names", []))),
        ("shapes K×V", ", ".join(f"{k}x{v}" for k, v in card.get("shapes_KV", []))),
        ("normaliser rows", ", ".join(f"{k}: {int(v['count'])}" for k, v in card.get("normaliser", {}).items())),
    ]
    training = card.get("training")
    if training:
        rows += [("trained steps", str(training.get("step"))), ("training data sha256", str(training.get("data_sha256")))]
    for key in sorted(set(card) - {"format", "format_version", "config", "module_names", "shapes_KV", "rank",
                                   "n_blocks", "spread", "variant", "base_model_fingerprint", "normaliser",
                                   "training"}):
        rows.append((key, json.dumps(card[key])))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


@hypernet.command("pack")
@click.argument("src", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("dst", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dtype", type=click.Choice(("bfloat16", "float16", "float32")), default="bfloat16",
              show_default=True, help="Store the hypernet's weights in this dtype (normaliser stays float64).")
@click.option("--card", "card_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A JSON object merged into the card (e.g. the command that made it and measured metrics).")
def pack_cmd(src: Path, dst: Path, dtype: str, card_path: Path | None) -> None:
    """Write a smaller copy of a trained hypernet to ship (cast weights, add card fields)."""
    from safetensors.torch import save as safetensors_save

    import torch

    from horse.editor import CARD_KEY, atomic_write, read_checkpoint
    from horse.errors import EngineError

    tensors, card = read_checkpoint(src)
    if card_path is not None:
        try:
            extra = json.loads(card_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EngineError(f"{card_path}: not a JSON object ({exc}); fix the file and run again") from exc
        if not isinstance(extra, dict):
            raise EngineError(f"{card_path}: the card must be a JSON object, not {type(extra).__name__}")
        card.update(extra)
    target = getattr(torch, dtype)
    out = {k: (v.to(target) if v.is_floating_point() and ".normaliser." not in k else v).contiguous()
           for k, v in tensors.items()}
    atomic_write(dst, safetensors_save(out, metadata={CARD_KEY: json.dumps(card)}))
    atomic_write(dst.with_suffix(dst.suffix + ".json"), (json.dumps(card, indent=2) + "\n").encode())
    click.echo(f"wrote {dst} ({dst.stat().st_size / 2**20:.1f} MiB, {dtype})")


if __name__ == "__main__":  # `python -m horse.cli train …`: the hypernet commands without the ledger's dependencies
    hypernet(prog_name="horse-ledger hypernet")
