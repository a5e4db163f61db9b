"""`horse-ledger init [PATH]`: write a short commented default config file (the recommended profile, the gate,
nights and storage). Loaded through `daemon.cli` (LAZY_COMMANDS)."""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import click

from ledger.cliapp import AppContext, pass_app


INIT_SECTIONS = (
    ("the recommended profile (the defaults: per-subject deltas served where their subject is named)",
     ("scope", "route_solve", "engine", "model", "hypernet", "preserve_weight", "preserve_exponent", "preserve_min")),
    ("the regression gate", ("gate_min_efficacy", "gate_min_canary_agreement", "gate_max_protected_drop",
                             "gate_min_retention", "gate_min_same_subject", "gate_max_measurements",
                             "gate_canary_file")),
    ("nights and storage", ("batch_max_edits", "schedule_cron", "review", "db_url", "snapshot_dir")),
)


def default_config_text(settings) -> str:
    """A short commented TOML config: the recommended profile first, then the gate, nights and storage. Every
    other setting keeps its default; docs/configuration.md (or `horse-ledger config --verbose`) lists them all."""
    from ledger.config import Settings, env_var, masked_url

    defaults = Settings()
    by_name = {f.name: f for f in fields(Settings)}
    lines = ["# horse-ledger configuration (TOML). Every key is optional; the value shown is the default.",
             "# Precedence: defaults < this file < HORSE_LEDGER_* environment variables < command-line flags.",
             "# Every other setting (expert knobs: the joint night, consolidation, fine-tuning, caches) is listed",
             "# with its help in docs/configuration.md; `horse-ledger config` prints the effective values.", ""]
    for title, names in INIT_SECTIONS:
        lines.append(f"# --- {title}")
        for name in names:
            meta = by_name[name].metadata
            lines.append(f"# {meta.get('help', '')} [{meta.get('unit', '')}; env {env_var(name)}]")
            value, here = getattr(defaults, name), getattr(settings, name, "")
            if name in ("db_url", "snapshot_dir") or (value == "" and here):
                lines.append(f"# {name} = {json.dumps(masked_url(here) if name == 'db_url' else here)}")
            else:
                lines.append(f"{name} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


@click.command()
@click.argument("path", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
@pass_app
def init(app: AppContext, path: Path | None, force: bool) -> None:
    """Write a commented default config file to PATH (default: ~/.config/horse-ledger/config.toml)."""
    from daemon.errors import DaemonError
    from ledger.files import write_file

    path = path or Path(click.get_app_dir("horse-ledger", force_posix=False)) / "config.toml"
    if path.exists() and not force:
        raise DaemonError(f"{path} already exists; edit it, or pass --force to overwrite it with the defaults")
    write_file(path, default_config_text(app.settings), is_group=False)  # 0600: a config may hold a db password
    click.echo(f"wrote {path}; edit it, then run `horse-ledger --config {path} apply --dry-run`")
