"""`horse-ledger eval` and `horse-ledger model …`: measure edits on a benchmark file; prepare the embedded model.

Owns the evaluation command line (issue 5, "The eval command"):

    horse-ledger model prepare [--cache-dir DIR]
    horse-ledger eval --data data/counterfact/counterfact-edit-1k.json --n-edits 100 \\
        [--method horse|malmen|memit|none] [--hypernet FILE] [--model smollm2-135m] [--limit N] [--json]

The eval edits the file's facts in batches of N. Every batch starts from the unedited model: its deltas are
computed, applied, the batch is scored, and the deltas are removed (bit-exact restore) before the next batch.
It prints the metrics of the unedited and the edited model (CounterFact ES / PS / NS / Score by
probability, token ES / GS / LS, optionally greedy-generation ES / PS) and the edit time per batch.
All inputs are options; nothing reads configuration (the root group wires these lazily, see
docs/ARCHITECTURE.md). Run the tests with `pytest tests/horse/test_evalcli.py`.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import click

from horse.errors import EngineError

METHODS = ("horse", "malmen", "memit", "none")
HYPERNET_DIR = Path(__file__).resolve().parent / "hypernets"
DTYPES = ("float32", "bfloat16")
# stage timings the methods report (seconds); any other numbers they return are method statistics
TIMING_STAGES = ("capture", "hypernet", "spread", "solve", "covariance", "z", "keys", "total")

# (label, key, is a fraction shown in %)
_ROWS = (
    ("CF ES (P new > P true)", "cf_es", True),
    ("CF PS (rephrase)", "cf_ps", True),
    ("CF NS (locality)", "cf_ns", True),
    ("CF Score (harmonic)", "cf_score", True),
    ("CF ES magnitude", "cf_es_mag", True),
    ("CF PS magnitude", "cf_ps_mag", True),
    ("CF NS magnitude", "cf_ns_mag", True),
    ("token ES", "token_es", True),
    ("token GS", "token_gs", True),
    ("token LS", "token_ls", True),
    ("gen ES (greedy)", "gen_es", True),
    ("gen PS (greedy)", "gen_ps", True),
)


def default_hypernet(model_name: str, method: str) -> Path:
    """The shipped hypernet for a model and method: horse/hypernets/<model>-<method>.safetensors."""
    return HYPERNET_DIR / f"{Path(model_name).name}-{method}.safetensors"


@click.group("model")
def model() -> None:
    """Manage the engine's models (the embedded SmolLM2-135M)."""


@model.command("prepare")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache root (default: $XDG_CACHE_HOME/horse-ledger); the model goes to <cache-dir>/models/.")
def prepare(cache_dir: Path | None) -> None:
    """Convert the embedded SmolLM2-135M GGUF to an fp32 model dir once (~20 s); later loads take < 1 s."""
    from horse.zoo import prepare_smollm2, smollm2_dir

    already = (smollm2_dir(cache_dir) / "config.json").is_file()
    started = time.perf_counter()
    path = prepare_smollm2(cache_dir, progress=True)
    if already:
        click.echo(f"smollm2-135m is already prepared at {path}")
    else:
        click.echo(f"smollm2-135m ready at {path} ({time.perf_counter() - started:.1f} s)")


def _resolve_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _edit_function(method: str, model_obj: Any, tok: Any, model_name: str, hypernet: Path | None, force: bool,
                   cache_dir: Path | None, preserve_weight: float = 0.0, preserve_exponent: float = 2.0,
                   running_normaliser: bool = False, preserve_min: float = 0.0) -> tuple[Any, dict[str, str]]:
    """A function requests → (deltas, timings_s) for the method, and a description for the report."""
    if method in ("horse", "malmen"):
        from horse.editor import Editor

        path = hypernet or default_hypernet(model_name, method)
        if not path.is_file():
            raise EngineError(
                f"no hypernet at {path} for model {model_name!r} and method {method}; train one with "
                f"`horse-ledger hypernet train --model {model_name} --variant {method} --out FILE` and pass --hypernet FILE"
            )
        editor = Editor.from_checkpoint(path, model_obj, force=force)
        editor.update_normaliser = running_normaliser
        variant = getattr(editor.config, "variant", method)
        info = {"hypernet": str(path), "variant": str(variant), "spread": str(getattr(editor.config, "spread", "")),
                "normaliser": "running" if running_normaliser else "frozen"}
        if preserve_weight:
            from horse.covariance import preservation_moments
            from horse.zoo import default_cache_dir

            moments, cov = preservation_moments(model_obj, tok, editor.module_names,
                                                cache_dir=cache_dir or default_cache_dir())
            editor.set_preservation(moments, preserve_weight, preserve_exponent, preserve_min)
            info.update(preserve_weight=str(preserve_weight), preserve_exponent=str(preserve_exponent),
                        preserve_min=str(preserve_min),
                        preserve_corpus=f"{cov.corpus}, N = {cov.n_tokens}")
        if variant != method:
            click.echo(f"note: hypernet {path.name} was trained as {variant!r}, evaluated under --method {method}", err=True)
        return (lambda m, tok, reqs: editor.compute_deltas(m, tok, reqs)), info
    if method == "memit":
        try:
            from horse.memit import MemitConfig, memit_deltas
        except ImportError as exc:
            raise EngineError("MEMIT is not available yet in this version (horse.memit missing); use --method horse") from exc
        from horse.covariance import model_fingerprint
        from horse.zoo import default_cache_dir

        config = MemitConfig.for_model(model_obj)
        fingerprint = model_fingerprint(model_obj)  # the base's: its covariance is computed and cached on it
        cache = cache_dir or default_cache_dir()

        def run(m: Any, tok: Any, reqs: Any) -> tuple[Any, dict[str, Any]]:
            return memit_deltas(m, tok, reqs, config, cache_dir=cache, fingerprint=fingerprint)

        return run, {"layers": ",".join(config.layers)}
    raise EngineError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _fmt(value: float, pct: bool) -> str:
    if value != value:  # nan
        return "–"
    return f"{100 * value:6.1f}" if pct else f"{value:.4f}"


@click.command("eval")
@click.option("--data", "data_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CounterFact (EasyEdit flat or ROME) or zsRE (MEND) file, JSON or JSON lines.")
@click.option("--method", type=click.Choice(METHODS), default="horse", show_default=True,
              help="Editing method; 'none' only scores the unedited model.")
@click.option("--hypernet", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Hypernet checkpoint (default: horse/hypernets/<model>-<method>.safetensors).")
@click.option("--model", "model_name", default="smollm2-135m", show_default=True,
              help="smollm2-135m, tiny-gpt2, tiny-llama or a local Hugging Face model dir.")
@click.option("--n-edits", type=click.IntRange(min=1), default=100, show_default=True,
              help="Facts edited together in one batch.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N records.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="Model weights dtype.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache root for the converted model and MEMIT statistics (default: $XDG_CACHE_HOME/horse-ledger).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Prompts per forward pass when scoring.")
@click.option("--generation/--no-generation", default=False, show_default=True,
              help="Also score greedy generation (slower).")
@click.option("--force", is_flag=True, help="Use a hypernet trained on another base-model fingerprint.")
@click.option("--preserve-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="horse/malmen: serve with the preservation prior μ(N)·C in the ridge solve, "
                   "μ(N) = weight / N^exponent for a batch of N edits (0: off; the daemon's default is 10000).")
@click.option("--preserve-exponent", type=click.FloatRange(min=0), default=2.0, show_default=True,
              help="horse/malmen: how fast the preservation weight falls with the batch size (0: fixed μ).")
@click.option("--preserve-min", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="horse/malmen: the least μ for any batch size (the daemon's default is 1).")
@click.option("--running-normaliser", is_flag=True,
              help="horse/malmen: merge every batch into the hypernet's input normaliser (default: frozen).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def eval_cmd(data_path: Path, method: str, hypernet: Path | None, model_name: str, n_edits: int, limit: int | None,
             device: str, dtype: str, cache_dir: Path | None, batch_size: int, generation: bool, force: bool,
             preserve_weight: float, preserve_exponent: float, preserve_min: float, running_normaliser: bool,
             as_json: bool) -> None:
    """Edit the facts of a benchmark file in batches and print unedited vs edited metrics and edit time."""
    import torch
    from tqdm.auto import tqdm

    from horse.data import load_requests
    from horse.deltas import apply_deltas, frobenius_norms
    from horse.metrics import concat_scores, request_scores, summarise_scores
    from horse.tokens import chunked
    from horse.zoo import load_model

    requests = load_requests(data_path, limit=limit)
    model_obj, tok = load_model(model_name, device=device, dtype=_resolve_dtype(dtype), cache_dir=cache_dir,
                                progress=not as_json)
    quiet = as_json

    def scores(reqs: Any) -> dict[str, torch.Tensor]:
        return request_scores(model_obj, tok, reqs, batch_size=batch_size, with_generation=generation)

    batches = list(chunked(requests, n_edits))
    report: dict[str, Any] = {
        "data": str(data_path), "model": model_name, "method": method, "device": device, "dtype": dtype,
        "n_requests": len(requests), "n_edits": n_edits, "n_batches": len(batches),
    }
    unedited_parts, edited_parts, times_s, stages, norms = [], [], [], [], []
    edit = None
    if method != "none":
        edit, info = _edit_function(method, model_obj, tok, model_name, hypernet, force, cache_dir,
                                    preserve_weight, preserve_exponent, running_normaliser, preserve_min)
        report.update(info)
    for batch in tqdm(batches, desc=f"eval {method}", unit="batch", disable=quiet):
        unedited_parts.append(scores(batch))
        if edit is None:
            continue
        started = time.perf_counter()
        deltas, info = edit(model_obj, tok, list(batch))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times_s.append(time.perf_counter() - started)
        stages.append({k: float(v) for k, v in info.items() if k in TIMING_STAGES})
        method_info = {k: v for k, v in info.items() if k not in TIMING_STAGES}
        if method_info:  # e.g. MEMIT's covariance corpus and N: recorded with the results
            report.setdefault("method_info_per_batch", []).append(method_info)
        norms.append(sum(frobenius_norms(deltas).values()))
        with apply_deltas(model_obj, deltas):
            edited_parts.append(scores(batch))

    report["unedited"] = summarise_scores(concat_scores(unedited_parts))
    if edit is not None:
        report["edited"] = summarise_scores(concat_scores(edited_parts))
        stage_names = sorted({k for s in stages for k in s})
        report["edit_time_s"] = {
            "median": statistics.median(times_s),
            "total": sum(times_s),
            "per_batch": times_s,
            "stages_median": {k: statistics.median([s.get(k, 0.0) for s in stages]) for k in stage_names},
        }
        report["delta_frobenius_sum_median"] = statistics.median(norms)
    if device.startswith("cuda"):
        report["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20

    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True, default=float))
        return
    _print_report(report)


def _print_report(report: dict[str, Any]) -> None:
    head = (f"{report['method']} on {report['model']} ({report['device']}, {report['dtype']}): "
            f"{report['n_requests']} facts from {report['data']} in {report['n_batches']} batch(es) of "
            f"≤ {report['n_edits']}")
    click.echo(head)
    if "hypernet" in report:
        click.echo(f"hypernet: {report['hypernet']} (variant {report['variant']}, spread {report['spread']})")
    if "layers" in report:
        click.echo(f"MEMIT layers: {report['layers']}")
    info = (report.get("method_info_per_batch") or [{}])[0]
    if "cov_corpus" in info:
        click.echo(f"MEMIT covariance: {info['cov_corpus']}, N = {info.get('cov_n_tokens')} tokens, "
                   f"shrinkage {info.get('cov_shrinkage')}")
    edited = report.get("edited")
    click.echo(f"{'metric (%)':<26}{'unedited':>10}{'edited':>10}" if edited else f"{'metric (%)':<26}{'unedited':>10}")
    for label, key, pct in _ROWS:
        if key not in report["unedited"]:
            continue
        line = f"{label:<26}{_fmt(report['unedited'][key], pct):>10}"
        if edited:
            line += f"{_fmt(edited[key], pct):>10}"
        click.echo(line)
    if edited:
        t = report["edit_time_s"]
        parts = ", ".join(f"{k} {v:.2f}" for k, v in t["stages_median"].items() if k != "total")
        click.echo(f"edit time per batch: median {t['median']:.2f} s, total {t['total']:.1f} s ({parts})")


if __name__ == "__main__":  # `python -m horse.evalcli …`: the eval command without the ledger's dependencies
    eval_cmd(prog_name="horse-ledger eval")
