"""`horse-ledger protect`: facts every new snapshot must keep (the gate checks them): add, list, remove.

    horse-ledger protect add --prompt "The capital of France is" --target Paris
    horse-ledger protect list [--json]          horse-ledger protect remove ID

Registered on the root group by `ledger.cli`.
"""
from __future__ import annotations

import click

from ledger.cliapp import AppContext, clip, echo_json, pass_app, table
from ledger.params import PROTECTED_ID


@click.group()
def protect() -> None:
    """Protected facts: facts every new snapshot must keep (the gate checks them)."""


@protect.command("add")
@click.option("--prompt", required=True, help="The prompt, with {} for the subject or containing it.")
@click.option("--target", required=True, help="The answer that must keep holding.")
@click.option("--subject", help="The subject (fills {} in the prompt).")
@click.option("--note", help="Why it is protected.")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@pass_app
def protect_add(app: AppContext, prompt: str, target: str, subject: str | None, note: str | None,
                as_json: bool) -> None:
    """Protect a fact; prints its id."""
    record = app.store().add_protected(prompt=prompt, target=target, subject=subject, note=note, actor=app.actor)
    if as_json:
        echo_json(record.to_dict())
    else:
        click.echo(record.id)


@protect.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def protect_list(app: AppContext, as_json: bool) -> None:
    """List protected facts."""
    facts = app.store().list_protected()
    if as_json:
        echo_json([f.to_dict() for f in facts])
        return
    if not facts:
        click.echo("no protected facts", err=True)
        return
    table(["ID", "PROMPT", "TARGET", "NOTE"],
           [(f.id, clip(f.rendered_prompt, 50), clip(f.target, 24), clip(f.note, 30)) for f in facts])


@protect.command("remove")
@click.argument("protected_id", metavar="ID", type=PROTECTED_ID)
@pass_app
def protect_remove(app: AppContext, protected_id: int) -> None:
    """Stop protecting a fact."""
    app.store().remove_protected(protected_id, actor=app.actor)
    click.echo(f"protected fact {protected_id} removed")
