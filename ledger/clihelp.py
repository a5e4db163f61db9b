"""The root `horse-ledger --help`: every command with its one-line help, in groups, without importing torch.

Owns COMMAND_GROUPS (which section a command is listed in) and LAZY_HELP (the one-line help of the commands
`ledger.cli` loads lazily from horse/ or daemon/, so that `--help` needs no engine import;
tests/ledger/test_clihelp.py checks that each line is the command's own). A lazy command of ledger/ without a
line here is imported for its help. A command in no group is listed under "Other commands".
"""
from __future__ import annotations

from typing import Any

import click

COMMAND_GROUPS: dict[str, tuple[str, ...]] = {
    "Ledger (submit and audit edits)": ("add", "list", "show", "log", "status", "cancel", "review", "protect",
                                        "db", "config", "init"),
    "Nights (apply edits, snapshots, monitoring)": ("apply", "daemon", "snapshots", "diff", "verify",
                                                    "rollback", "consolidate", "serve"),
    "Model (use the edited model)": ("ask", "export", "model"),
    "Research (hypernetworks, benchmarks)": ("hypernet", "eval"),
}

LAZY_HELP: dict[str, str] = {
    "hypernet": "Meta-train and inspect HORSE / MALMEN hypernetworks.",
    "eval": "Edit the facts of a benchmark file in batches and print unedited vs edited metrics and edit time.",
    "model": "Manage the engine's models (the embedded SmolLM2-135M).",
    "apply": "Run one batch now: claim pending edits, edit, check, publish a snapshot.",
    "rollback": "Move the head back to SNAPSHOT (an id, or `base`); later snapshots and their edits are rolled "
                "back.",
    "snapshots": "List the snapshots of the configured model, oldest first; `*` marks the head.",
    "diff": "Compare the models at snapshots A and B (ids, `base` or `head`): edits and gate measurements.",
    "verify": "Check SNAPSHOT (default: the head) and its chain: files, hashes, NaN, bit-exact materialisation.",
    "export": ("Export SNAPSHOT (an id, `head` or `base`) as a Hugging Face model dir (or its delta files); a routed "
               "head loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` as `ask` serves it."),
    "ask": "Ask the model at a snapshot: greedy continuation of PROMPT and the most likely next tokens.",
    "daemon": "Run batches on the configured schedule (schedule_cron) until SIGTERM.",
    "init": "Write a commented default config file to PATH (default: ~/.config/horse-ledger/config.toml).",
    "consolidate": "Fold the head's chain into one snapshot re-derived from the base by one edit of all its edits.",
    "serve": "Serve a read-only web view of the ledger, its JSON API and /metrics.",
    "config": "Show the effective configuration: every setting, its value and where it comes from.",
}


def short_help(group: click.Group, ctx: click.Context, name: str) -> str | None:
    """The one-line help of `name` (its first sentence, whole: the help formatter wraps it): its own when
    loaded (or defined in the group), else LAZY_HELP's. None for a hidden command."""
    cmd = group.commands.get(name)
    if cmd is not None:
        return None if cmd.hidden else cmd.get_short_help_str(1000)
    text = LAZY_HELP.get(name)
    if text is None:
        cmd = group.get_command(ctx, name)
        return cmd.get_short_help_str(1000) if cmd is not None and not cmd.hidden else None
    return text


def format_grouped_commands(group: click.Group, ctx: click.Context, formatter: click.HelpFormatter) -> None:
    """Write the root group's command list in COMMAND_GROUPS sections (click's format_commands)."""
    names = group.list_commands(ctx)
    placed: set[str] = set()
    sections: list[tuple[str, list[tuple[str, str]]]] = []
    for title, members in COMMAND_GROUPS.items():
        rows = _rows(group, ctx, [n for n in members if n in names])
        placed.update(members)
        if rows:
            sections.append((title, rows))
    rest = _rows(group, ctx, [n for n in names if n not in placed])
    if rest:
        sections.append(("Other commands", rest))
    for title, rows in sections:
        with formatter.section(title):
            formatter.write_dl(rows)


def _rows(group: click.Group, ctx: click.Context, names: list[str]) -> list[tuple[str, Any]]:
    rows = []
    for name in names:
        text = short_help(group, ctx, name)
        if text is not None:
            rows.append((name, text))
    return rows
