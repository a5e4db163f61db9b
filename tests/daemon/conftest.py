"""Fixtures of the daemon tests: a hypernet meta-trained in the test (once per session), settings and a CLI.

The tiny built-in model (`tiny-llama`, random weights, width 64) knows nothing, so the tests teach it
facts first and protect what it learned. Its next-token distribution is almost flat, so any edit changes
the greedy token of unrelated prompts: the canary check is off (0) except where a test is about it.

    daemon_settings(db_url, **overrides) -> Settings       run_daemon_cli(cfg, *args) -> click Result
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = ["Zorblat", "Quenvik", "Mardoon", "Tessaly", "Brunhav", "Kolvane", "Ostrigo", "Pellaru",
            "Venhuck", "Drasmo", "Ilvenor", "Saptura"]
COLORS = ["red", "blue", "gold", "jade", "pink", "gray", "teal", "navy"]
PROMPT = "The color of {} is"
PARAPHRASE = "{} has the color"


def fact(i: int, color: str | None = None) -> dict[str, object]:
    """The i-th synthetic fact, as `horse-ledger add --from` JSONL fields."""
    s = SUBJECTS[i]
    return {"subject": s, "prompt": PROMPT, "target": color or COLORS[i % len(COLORS)],
            "paraphrases": [PARAPHRASE.format(s)]}


@pytest.fixture(scope="session")
def hypernet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A HORSE hypernet for tiny-llama, meta-trained here on the synthetic facts (≈10 s on 2 cores).

    Small ridge weight (λ = e⁻⁸) and η = 1 so that edits take on the tiny model: after training, a batch of 4
    training facts reaches token accuracy ≈ 1.0 on its prompts (it would be ≈ 0.3 with the defaults).
    The locality loss is MALMEN's KL: with HORSE's CE towards the locality answer ("far", on prompts shaped
    like the edit prompts) the residual blocks, which learn, make every edit of this synthetic data say "far".
    """
    import torch

    from horse.hypernet import HyperConfig
    from horse.metatrain import TrainConfig, train_hypernet
    from horse.types import EditRequest
    from horse.zoo import load_model

    torch.manual_seed(0)
    model, tok = load_model("tiny-llama", progress=False)
    requests = []
    for i, s in enumerate(SUBJECTS):
        for color in {COLORS[i % len(COLORS)], COLORS[(i + 3) % len(COLORS)]}:  # also the harmful rewrites
            requests.append(EditRequest(prompt=PROMPT.format(s), target=color, subject=s,
                                        rephrases=(PARAPHRASE.format(s),),
                                        locality_prompt=f"The home of {SUBJECTS[(i + 5) % len(SUBJECTS)]}x is",
                                        locality_answer="far"))
    path = tmp_path_factory.mktemp("hypernet") / "tiny-llama-hypernet.safetensors"
    train_hypernet(model, tok, requests, hyper=HyperConfig(rank=32, eta_init=1.0, lamda_init=-8.0, variant="malmen"),
                   train=TrainConfig(steps=80, n_edits=4, lr=1e-2, lm_batch_size=4, checkpoint_every=0, seed=0),
                   out_path=path, progress=False)
    return path


@pytest.fixture(scope="session")
def canary_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("canary") / "canary.jsonl"
    prompts = [f"The home of {w} is" for w in ("Alpha", "Beta", "Gamma", "Delta", "Omega", "Sigma")]
    prompts += ["Once upon a time", "The weather today is", "My favourite food is", "In the year 1990"]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


BASE_SETTINGS = {"model": "tiny-llama", "preserve_weight": 0.0, "gate_min_efficacy": 0.5, "gate_min_canary_agreement": 0.0,
                 "gate_max_protected_drop": 0.0, "gate_min_retention": 0.0, "gate_bisect_depth": 2,
                 "heartbeat_every_s": 1, "batch_max_edits": 100,
                 "gate_min_same_subject": 0.0,  # the tiny model moves every prompt that names the subject
                 "review": "off",  # review (ledger/review.py) is tested in tests/ledger/test_review.py
                 "scope": "off"}  # the joint night (daemon/cycle.py); routed nights: tests/daemon/test_routed_night.py


@pytest.fixture
def daemon_settings(tmp_path: Path, hypernet_file: Path, canary_file: Path) -> Callable[..., object]:
    """daemon_settings(db_url, **overrides) -> Settings on tiny-llama with the test hypernet and canary."""
    from ledger.config import load_settings

    def make(db_url: str, **overrides: object):
        values = {**BASE_SETTINGS, "data_dir": str(tmp_path / "data"), "snapshot_dir": str(tmp_path / "snapshots"),
                  "cache_dir": str(tmp_path / "cache"), "hypernet": str(hypernet_file),
                  "gate_canary_file": str(canary_file), **overrides}
        return load_settings(environ={}, db_url=db_url, **values)

    return make


def write_config(path: Path, settings) -> Path:
    """A TOML file holding every field of `settings` (subprocesses and the CLI read it)."""
    from dataclasses import fields

    lines = [f"{f.name} = {json.dumps(getattr(settings, f.name))}" for f in fields(settings)]
    path.write_text("\n".join(lines) + "\n")
    return path


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HORSE_LEDGER_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    return env


HORSE_LEDGER = [sys.executable, "-m", "ledger"]


@pytest.fixture
def cli_runner() -> Callable[..., object]:
    """cli_runner(config_path, *args) -> click Result of `horse-ledger --config CFG *args` (in process)."""
    from click.testing import CliRunner

    from ledger.cli import cli

    def run(config: Path, *args: str, expect: int | None = 0):
        result = CliRunner().invoke(cli, ["--config", str(config), *args], catch_exceptions=False)
        if expect is not None:
            assert result.exit_code == expect, f"exit {result.exit_code}: {result.output}"
        return result

    return run


def add_facts(cli_runner, cfg: Path, tmp_path: Path, name: str, facts: list[dict]) -> None:
    """`horse-ledger add --from` a JSONL file of `facts`."""
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(f) + "\n" for f in facts))
    cli_runner(cfg, "add", "--from", str(path))


def apply_json(cli_runner, cfg: Path) -> dict:
    """`apply --json`; its exit status is 3 exactly when the night ran and published nothing."""
    result = cli_runner(cfg, "apply", "--json", expect=None)
    data = json.loads(result.stdout)
    assert result.exit_code == (3 if data["status"] in ("failed", "rejected") else 0), (result.exit_code, data)
    return data
