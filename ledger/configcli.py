"""`horse-ledger config`: the effective configuration, where each value comes from, secrets masked.

    horse-ledger config              # name, value, source (default | file PATH | env VAR | option --db)
    horse-ledger config --verbose    # also each setting's unit and what it does
    horse-ledger --db postgresql+psycopg://u:pw@h/db config --json

Passwords in the database URL (and any setting named like a password, secret or token) print as `***`.
Loaded lazily by ledger.cli (LAZY_COMMANDS); reads settings only through ledger.config.
"""
from __future__ import annotations

import json
import re
from typing import Any

import click

from ledger.cli import AppContext
from ledger.config import setting_sources

MASK = "***"
_SECRET_NAME = re.compile(r"password|secret|token|api_key", re.IGNORECASE)
_URL_QUERY_SECRET = re.compile(r"((?:password|passwd|sslpassword|secret|token)=)[^&]*", re.IGNORECASE)


def mask(name: str, value: Any) -> str:
    """The value of setting `name` as it may be shown: a URL's password and secret-named settings masked."""
    text = str(value)
    if _SECRET_NAME.search(name):
        return MASK if text else ""
    if "://" in text:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            url = make_url(text)
            if url.password is not None:
                text = url.render_as_string(hide_password=True)
        except (ArgumentError, ValueError):
            text = re.sub(r"(://[^/:@]*:)[^@/]*@", rf"\1{MASK}@", text)
        text = _URL_QUERY_SECRET.sub(rf"\1{MASK}", text)
    return text


def config_rows(app: AppContext, root_params: dict[str, Any]) -> list[dict[str, str]]:
    """Every setting as {name, value (masked), source, unit, env, help}."""
    sources = setting_sources(root_params.get("config_path"), root_params.get("db_url"))
    rows = []
    for row in app.settings.describe():
        source = sources[row["name"]]
        if source == "default" and row["name"] in ("db_url", "data_dir", "snapshot_dir", "cache_dir"):
            source = "default (XDG directories)"
        rows.append({**row, "value": mask(row["name"], row["value"]), "source": source})
    return rows


@click.command()
@click.option("--verbose", "-v", is_flag=True, help="Also show each setting's unit and what it does.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def config(app: AppContext, verbose: bool, as_json: bool) -> None:
    """Show the effective configuration: every setting, its value and where it comes from."""
    rows = config_rows(app, click.get_current_context().find_root().params)
    if as_json:
        click.echo(json.dumps(rows, ensure_ascii=False, indent=2))
        return
    name_w = max(len(r["name"]) for r in rows)
    value_w = min(48, max(len(r["value"]) or 2 for r in rows))
    for r in rows:
        value = r["value"] if r["value"] != "" else '""'
        click.echo(f"{r['name']:<{name_w}}  {value:<{value_w}}  {r['source']}".rstrip())
        if verbose:
            click.echo(f"{'':<{name_w}}    [{r['unit']}; env {r['env']}] {r['help']}")
