"""The daemon's `horse-ledger` commands, loaded lazily by `ledger.cli` (so `horse-ledger add` never imports torch).

    horse-ledger apply [--max N] [--dry-run] [--json]     one batch now (what the scheduler runs)
    horse-ledger daemon [--once]                           the nightly scheduler (systemd runs this)
    horse-ledger rollback SNAPSHOT|base [--requeue]        move the head back
    horse-ledger snapshots [--json]                        the snapshot history, head marked
    horse-ledger diff A B [--json]                         which edits differ, how the gate's numbers moved
    horse-ledger verify [SNAPSHOT] [--json]                hashes, NaN, materialisation; exit 1 on failure
    horse-ledger export SNAPSHOT --out DIR [--deltas-only|--merged] [--json]  a HF model dir (or deltas)
    horse-ledger ask "PROMPT" [--snapshot S]               greedy continuation and top next tokens
    horse-ledger init [PATH]                               a commented default config file

Every command takes its settings from `ctx.obj` (`ledger.cliapp.AppContext`): `--db`, `--config`, env vars.
`init` is daemon/init_cli.py's (re-exported here).
"""
from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from daemon.init_cli import default_config_text, init  # noqa: F401 - `horse-ledger init` (LAZY_COMMANDS)
from daemon.logs import configure_logging
from ledger.cliapp import AppContext, pass_app
from ledger.params import NEW_DIR, PROMPT, SNAPSHOT_REF, SNAPSHOT_REF_NO_HEAD


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False, indent=2, default=str))


def _logging(app: AppContext) -> None:
    """Log lines go to stderr: all of them under systemd or a pipe (JSON by `log_json`); on a terminal only
    warnings, unless --verbose / --debug, so that a command prints its result, not its stages."""
    from daemon.logs import is_json_mode

    quiet = sys.stderr.isatty() and not (app.verbose or app.debug or is_json_mode(app.settings.log_json))
    level = logging.DEBUG if app.debug else logging.WARNING if quiet else logging.INFO
    configure_logging(app.settings.log_json, level=level)


def _snapshot_ref(value: str | None, *, allow_head: bool = True) -> tuple[int | None, bool]:
    """"base" → (None, False); "head"/None → (None, True); "12" → (12, False)."""
    if value is None or (allow_head and value.strip().lower() == "head"):
        return None, True
    v = value.strip().lower()
    if v == "base":
        return None, False
    try:
        return int(v), False
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a snapshot id; give a number from `horse-ledger snapshots`, "
                                 f"`base`{' or `head`' if allow_head else ''}") from None


def _fmt(value: Any, digits: int = 3) -> str:
    from daemon.audit import fmt_float

    return fmt_float(value, digits)


def _parent_of(snapshot_id: int) -> str:
    """"parent 5", or "no parent: from the base" for a snapshot derived from the base (the row, not the old head)."""
    store = click.get_current_context().find_object(AppContext).store()
    parent = store.get_snapshot(snapshot_id).parent_id
    return "no parent: from the base" if parent is None else f"parent {parent}"


def _print_batch(result) -> None:
    r = result
    m = r.metrics or {}
    gate = m.get("gate") or {}
    if r.status == "empty":
        click.echo("nothing pending; no batch run")
        return
    if r.status == "abandoned":
        click.echo(f"batch {r.batch_id}: abandoned; {len(r.released)} edits back to pending")
        return
    what = {"dry-run": f"dry run on head {r.parent_snapshot_id or 'base'}: would publish {len(r.applied)} edits",
            "rejected": "nothing published (gate)", "failed": "nothing published (no edit took)"}.get(r.status) or \
        f"published snapshot {r.snapshot_id} ({_parent_of(r.snapshot_id)})"
    label = "batch" if r.batch_id is None else f"batch {r.batch_id}"
    click.echo(f"{label}: {what}: {len(r.applied)} applied, {len(r.failed)} failed, {len(r.rejected)} rejected")
    if gate:
        click.echo(f"  efficacy mean {_fmt(m.get('efficacy_mean'))} · canary agreement "
                   f"{_fmt(gate.get('canary_agreement'))} ({gate.get('canary_n')} prompts) · retention "
                   f"{_fmt(gate.get('retention'))} ({gate.get('retention_n')} earlier edits) · protected flipped "
                   f"{len(gate.get('protected_flipped') or [])}/{gate.get('protected_n')}")
    if m.get("prefix_cache"):
        pc = m["prefix_cache"]
        click.echo(f"  prefix cache: {pc['reused']} texts reused (only the edited blocks ran), {pc['captured']} captured")
    if r.snapshot_path:
        click.echo(f"  file {r.snapshot_path} ({r.snapshot_bytes:,} bytes, "
                   f"{r.snapshot_bytes // max(1, len(r.applied)):,} bytes/edit)")
    for i, reason in sorted(r.failed.items()):
        click.echo(f"  failed   {i}: {reason}")
    for i, reason in sorted(r.rejected.items()):
        click.echo(f"  rejected {i}: {reason}")
    for i, reason in sorted(r.returned.items()):
        click.echo(f"  returned {i}: {reason}")
    if m.get("gate_measurements") is not None:
        click.echo(f"  gate measurements {m['gate_measurements']} · subjects solved {len(m.get('subjects') or {})}")
    t = r.timings_s
    parts = [f"{k} {t[k]:.2f}" for k in ("load_model", "materialise", "measure_head", "edit", "edit_and_verify",
                                          "verify", "gate", "write", "commit") if k in t]
    if "total" in t:
        click.echo(f"  time {t['total']:.2f} s ({', '.join(parts)})")


EXIT_NOTHING_PUBLISHED = 3  # `apply`: the night ran and published nothing


@click.command()
@click.option("--max", "max_edits", type=click.IntRange(min=1), default=None,
              help="Claim at most N pending edits (default: batch_max_edits from the config).")
@click.option("--dry-run", is_flag=True, help="Claim and write nothing; show what the batch would do.")
@click.option("--json", "as_json", is_flag=True, help="Print the batch result as JSON.")
@pass_app
def apply(app: AppContext, max_edits: int | None, dry_run: bool, as_json: bool) -> None:
    """Run one batch now: claim pending edits, edit, check, publish a snapshot.

    Exit status: 0 when it published (or had nothing to do), 3 when the night ran but published nothing
    (every edit failed or was rejected: `OnFailure=` in deploy/ can alert), 1 on an error, 2 on a usage error."""
    from daemon.cycle import run_batch

    _logging(app)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop.set()  # abandon at the next stage boundary: claimed edits go back to pending

    previous = signal.signal(signal.SIGTERM, _on_signal)
    try:
        result = run_batch(app.settings, app.store(), max_edits=max_edits, dry_run=dry_run, stop=stop,
                           actor=f"apply:{app.actor}")
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not dry_run:
        from daemon.metrics_export import write_night_textfile

        write_night_textfile(app.settings, app.store(), result)
    if as_json:
        _echo_json(result.to_dict())
    else:
        _print_batch(result)
    if result.status in ("failed", "rejected"):
        raise SystemExit(EXIT_NOTHING_PUBLISHED)


@click.command()
@click.option("--once", is_flag=True, help="Run a single batch now and exit (no schedule).")
@pass_app
def daemon(app: AppContext, once: bool) -> None:
    """Run batches on the configured schedule (schedule_cron) until SIGTERM."""
    from daemon.cycle import run_batch
    from daemon.errors import ApplierBusy
    from daemon.metrics_export import write_night_textfile
    from daemon.scheduler import run_daemon
    from daemon.sdnotify import Notifier, describe_night

    _logging(app)
    log = logging.getLogger("daemon.cli")
    settings, store = app.settings, app.store()
    notifier = Notifier.from_environment()

    def after(result: Any) -> None:  # after each night: the metrics textfile, systemd's STATUS line
        write_night_textfile(settings, store, result)
        notifier.status(describe_night(result))

    def job(stop: threading.Event) -> Any:
        notifier.status("night running: starting")
        try:
            result = run_batch(settings, store, stop=stop,
                               on_stage=lambda stage: notifier.status(f"night running: {stage}"))
        except ApplierBusy as exc:
            log.warning("skipping this run: %s", exc)
            return None
        log.info("batch finished", extra={"status": result.status, "batch_id": result.batch_id,
                                          "snapshot_id": result.snapshot_id, "n_applied": len(result.applied),
                                          "n_failed": len(result.failed), "n_rejected": len(result.rejected)})
        return result

    if once:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        result = run_batch(settings, store, stop=stop)
        after(result)
        _print_batch(result)
        return
    run_daemon(settings, job, after=after, notifier=notifier)


@click.command()
@click.argument("snapshot", type=SNAPSHOT_REF_NO_HEAD)
@click.option("--requeue", is_flag=True, help="Put the rolled-back edits back to pending, to be applied again.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def rollback(app: AppContext, snapshot: str, requeue: bool, as_json: bool) -> None:
    """Move the head back to SNAPSHOT (an id, or `base`); later snapshots and their edits are rolled back."""
    from daemon.rollback import rollback as do_rollback

    target, _ = _snapshot_ref(snapshot, allow_head=False)
    _logging(app)
    result = do_rollback(app.settings, app.store(), target, requeue=requeue, actor=app.actor)
    if as_json:
        _echo_json(result.to_dict())
        return
    to = "base" if result.to_snapshot is None else f"snapshot {result.to_snapshot}"
    if result.from_snapshot == result.to_snapshot:
        click.echo(f"head of {result.base_model} is already {to}; nothing to do")
        return
    click.echo(f"head of {result.base_model}: {result.from_snapshot or 'base'} → {to}")
    click.echo(f"  rolled back snapshots {result.rolled_back_snapshots or '-'}; "
               f"{len(result.rolled_back_edits)} edits {'requeued (pending)' if requeue else 'rolled_back'}")
    if result.restored_edits:
        click.echo(f"  applied again (the edits that had replaced them were rolled back): {result.restored_edits}")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the snapshots as JSON.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Also draw canary agreement, retention, NS, perplexity and delta norms against snapshots and "
                   "edits carried into FILE (.png, .svg or .pdf).")
@pass_app
def snapshots(app: AppContext, as_json: bool, plot_file: Path | None) -> None:
    """List the snapshots of the configured model, oldest first; `*` marks the head."""
    from daemon.audit import snapshot_rows

    if plot_file is not None:
        from daemon.plots import plot_snapshots
        from ledger.queries import snapshot_series

        plot_snapshots(snapshot_series(app.store(), app.settings.model), plot_file, title=app.settings.model)
        click.echo(f"plotted to {plot_file}", err=True)
    rows = snapshot_rows(app.store(), app.settings.model)
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo(f"no snapshots of {app.settings.model} yet; the head is the base model")
        return
    headers = ["", "id", "parent", "batch", "status", "edits", "bytes", "efficacy", "canary", "retention",
               "norm max", "created"]
    table = [["*" if r["is_head"] else "", r["id"], r["parent_id"] or "base", r["batch_id"] or "-", r["status"],
              r["n_edits"], f"{r['bytes']:,}", _fmt(r["efficacy_mean"]), _fmt(r["canary_agreement"]),
              _fmt(r["retention"]), _fmt(r["cumulative_norm_max"], 4), r["created_at"][:19].replace("T", " ")]
             for r in rows]
    cells = [[str(c) for c in row] for row in table]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if not any(r["is_head"] for r in rows):
        click.echo("(head: the base model)")


@click.command()
@click.argument("a", type=SNAPSHOT_REF)
@click.argument("b", type=SNAPSHOT_REF)
@click.option("--json", "as_json", is_flag=True, help="Print the diff as JSON.")
@pass_app
def diff(app: AppContext, a: str, b: str, as_json: bool) -> None:
    """Compare the models at snapshots A and B (ids, `base` or `head`): edits and gate measurements."""
    from daemon.audit import diff as do_diff
    from daemon.export import resolve_snapshot

    store = app.store()
    ra, ha = _snapshot_ref(a)
    rb, hb = _snapshot_ref(b)
    ra = resolve_snapshot(app.settings, store, ra, use_head=ha)
    rb = resolve_snapshot(app.settings, store, rb, use_head=hb)
    d = do_diff(store, app.settings.model, ra, rb)
    if as_json:
        _echo_json(d)
        return
    name = lambda x: "base" if x is None else f"snapshot {x}"  # noqa: E731
    click.echo(f"{name(ra)} → {name(rb)} ({app.settings.model})")
    click.echo(f"  chain A {d['chain_a'] or 'base'}, chain B {d['chain_b'] or 'base'}; {d['in_both']} edits in both")
    click.echo(f"  only in A: {len(d['only_in_a'])} edits {d['only_in_a'][:20]}")
    click.echo(f"  only in B: {len(d['only_in_b'])} edits {d['only_in_b'][:20]}")
    for key, v in d["metrics"].items():
        if v["a"] is None and v["b"] is None:
            continue
        change = "" if v["change"] is None else f"  ({v['change']:+.4g})"
        click.echo(f"  {key:22} {_fmt(v['a'], 4):>10} → {_fmt(v['b'], 4):<10}{change}")


@click.command()
@click.argument("snapshot", required=False, type=SNAPSHOT_REF)
@click.option("--no-materialise", is_flag=True, help="Check files only (skip loading the model).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@pass_app
def verify(app: AppContext, snapshot: str | None, no_materialise: bool, as_json: bool) -> None:
    """Check SNAPSHOT (default: the head) and its chain: files, hashes, NaN, bit-exact materialisation."""
    from daemon.audit import verify as do_verify

    ref, use_head = _snapshot_ref(snapshot)
    report = do_verify(app.settings, app.store(), ref, materialise_check=not no_materialise, use_head=use_head)
    if as_json:
        _echo_json(report.to_dict())
    else:
        target = "base" if report.snapshot_id is None else f"snapshot {report.snapshot_id}"
        if not report.checks:
            click.echo(f"{app.settings.model}: {target}: nothing to verify")
        for c in report.checks:
            click.echo(f"  {'ok  ' if c.ok else 'FAIL'}  [{c.snapshot_id if c.snapshot_id is not None else 'base'}] "
                       f"{c.name}: {c.detail}")
        for o in report.orphans:
            click.echo(f"  note  orphan file (no snapshot names it; the next batch removes it): {o}")
        click.echo(f"{target}: {'OK' if report.ok else 'FAILED'}")
    if not report.ok:
        raise SystemExit(1)


@click.command()
@click.argument("snapshot", type=SNAPSHOT_REF)
@click.option("--out", "out_dir", type=NEW_DIR, required=True,
              help="Directory to write (must be new or empty unless --force).")
@click.option("--deltas-only", is_flag=True, help="Write the delta files (routed: the routes) and a manifest only.")
@click.option("--merged", is_flag=True, help="Routed: write the UNSCOPED merge (every edit on every text); warns.")
@click.option("--force", is_flag=True, help="Write into a non-empty directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest written as JSON.")
@pass_app
def export(app: AppContext, snapshot: str, out_dir: Path, deltas_only: bool, merged: bool, force: bool,
           as_json: bool) -> None:
    """Export SNAPSHOT (an id, `head` or `base`) as a Hugging Face model dir (or its delta files); a routed head
    loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` as `ask` serves it."""
    from daemon.export import export as do_export, resolve_snapshot
    from daemon.export_routed import describe, merged_warning

    if merged and deltas_only:
        raise click.BadParameter("--merged writes a model and --deltas-only none; pick one", param_hint="'--merged'")
    ref, use_head = _snapshot_ref(snapshot)
    ref = resolve_snapshot(app.settings, app.store(), ref, use_head=use_head)
    manifest = do_export(app.settings, app.store(), ref, out_dir, deltas_only=deltas_only, force=force, merged=merged)
    if manifest.get("serving") == "merged":
        click.echo(click.style("warning: ", fg="yellow", bold=True) + merged_warning(manifest, out_dir), err=True)
    if as_json:
        return _echo_json(manifest)
    click.echo(f"exported {'base' if ref is None else f'snapshot {ref}'} of {app.settings.model} to {out_dir} "
               f"({describe(manifest, deltas_only)}; chain {[c['id'] for c in manifest['chain']] or 'base'}, "
               f"{len(manifest['edit_ids'])} edits)")


@click.command()
@click.argument("prompt", type=PROMPT)
@click.option("--snapshot", "snapshot", default=None, type=SNAPSHOT_REF, help="Snapshot id, `head` (default) or `base`.")
@click.option("--max-new-tokens", type=click.IntRange(1, 512), default=20, show_default=True)
@click.option("--top", "top_k", type=click.IntRange(1, 50), default=5, show_default=True,
              help="How many most likely next tokens to show.")
@click.option("--json", "as_json", is_flag=True, help="Print the answer as JSON.")
@pass_app
def ask(app: AppContext, prompt: str, snapshot: str | None, max_new_tokens: int, top_k: int, as_json: bool) -> None:
    """Ask the model at a snapshot: greedy continuation of PROMPT and the most likely next tokens."""
    from daemon.export import ask as do_ask, resolve_snapshot

    ref, use_head = _snapshot_ref(snapshot)
    ref = resolve_snapshot(app.settings, app.store(), ref, use_head=use_head)
    out = do_ask(app.settings, app.store(), prompt, ref, max_new_tokens=max_new_tokens, top_k=top_k)
    if as_json:
        _echo_json(out)
        return
    scope = "" if out["in_scope"] is None else \
        f", scope: {'an edited subject is named' if out['in_scope'] else 'no edited subject named: the base answers'}"
    click.echo(f"[{app.settings.model} @ {'base' if ref is None else f'snapshot {ref}'}{scope}]")
    click.echo(f"{prompt}{click.style(out['continuation'], bold=True)}")
    click.echo("next token: " + ", ".join(f"{t['token']!r} {t['prob']:.3f}" for t in out["top_tokens"]))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def consolidate(app: AppContext, as_json: bool) -> None:
    """Fold the head's chain into one snapshot re-derived from the base by one edit of all its edits."""
    from daemon.consolidate import consolidate as run

    _logging(app)
    result = run(app.settings, app.store(), actor=f"consolidate:{app.actor}", reason="by hand")
    if as_json:
        _echo_json(result.to_dict())
        return
    if result.status == "nothing":
        click.echo(f"nothing to consolidate: the head of {app.settings.model} is "
                   f"{'base' if result.from_snapshot is None else f'snapshot {result.from_snapshot}'} "
                   f"({result.chain_length} snapshot(s) on its chain)")
        return
    g = result.gate
    measured = (f"canary agreement {g.get('canary_agreement', float('nan')):.3f} · retention "
                f"{g.get('retention', float('nan')):.3f} of {result.n_edits} edits · protected flipped "
                f"{len(g.get('protected_flipped') or [])}")
    if g.get("retention_abs") is not None and result.head.get("retention_abs") is not None:
        from daemon.gate import HOLD_MIN_ACCURACY

        measured += (f"\n  edits it carries that hold (answer-token accuracy ≥ {HOLD_MIN_ACCURACY:g}): "
                     f"{g['retention_abs']:.3f}, on the head it replaces {result.head['retention_abs']:.3f}")
    if result.status == "rejected":
        click.echo(f"consolidation rejected by the gate ({'; '.join(result.gate_reasons)}); the head stays "
                   f"snapshot {result.from_snapshot}\n  {measured}")
        raise SystemExit(1)
    warm = (f"\n  started from fold {result.warm_from}: trained {result.trained} of the edits (those it did not "
            "recall, and a rehearsal)") if result.warm_from is not None else ""
    click.echo(f"consolidated snapshot {result.from_snapshot} (chain of {result.chain_length}) into snapshot "
               f"{result.snapshot_id} (parent base, {result.n_edits} edits, {result.bytes:,} bytes){warm}\n  {measured}\n"
               f"  time {result.timings_s.get('total', 0):.2f} s "
               f"({', '.join(f'{k} {v:.2f}' for k, v in result.timings_s.items() if k != 'total')})")
