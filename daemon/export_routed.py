"""Exporting a routed head (scope = routed): the model the gate judged, loadable without horse-ledger.

`horse-ledger export` of a routed chain writes one of three things (`export.export` dispatches here):

- routed (default): a transformers model dir. `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`
  loads the base weights and attaches the head's routes (`routes.safetensors`), so each text gets only the deltas
  of the subjects it names, as `horse-ledger ask` serves. The modelling file (`modeling_horse_routed.py`) is
  `horse/route.py` verbatim plus the part of `horse/route_load.py` below its marker: the same code as ask and the
  gate, needing torch, safetensors and transformers only. `config.json` keeps the base `model_type`, so a load
  WITHOUT trust_remote_code gives the unedited base model, never the unscoped merge.
- merged (`--merged`): the unscoped merge (every route's delta added to the weights, on every text) and the
  canary agreement it loses, measured here, for the CLI's warning.
- deltas-only: `routes.safetensors` + `horse-ledger.json` + a README.md: `horse.route_load.attach(model, DIR)`.

Every form is written in a staging dir next to `--out` and moved into place at the end; on any failure nothing
is left behind (not even the parents of `--out` this export created).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from daemon.errors import DaemonError, SnapshotCorrupt
from ledger.config import Settings

MODELING_FILE = "modeling_horse_routed.py"
CLASS_NAME = "HorseRoutedForCausalLM"
MANIFEST_FILE = "horse-ledger.json"
MARKER = "# ---- appended to horse/route.py by `horse-ledger export` below this line ----"

BUNDLE_README = """# Routed edits of {base_model} (horse-ledger snapshot {snapshot})

`routes.safetensors` holds {n} subjects' deltas (table digest `{digest}`). Serve them on the unedited base model:
each text gets only the deltas of the edited subjects it names; every other text is the base model, bit for bit.

With horse-ledger installed:

```python
from horse.route_load import attach
router = attach(model, "{dirname}")   # model: the base model, e.g. AutoModelForCausalLM.from_pretrained(...)
```

Without it, the same few lines, using a copy of horse-ledger's `horse/route.py` (torch + safetensors only):

```python
from route import Router, check_table, load_table, table_digest
table, _ = load_table("{dirname}/routes.safetensors")
assert table_digest(table) == "{digest}"   # the digest horse-ledger.json records
check_table(table)                          # factor digests, NaN/Inf
router = Router(model, table)               # router.remove() gives the base model back
```
"""


def modeling_source(base_class: str) -> str:
    """The exported modelling file: horse/route.py, the loader part of horse/route_load.py, the class line."""
    from horse import route, route_load

    tail = Path(route_load.__file__).read_text(encoding="utf-8").split(MARKER, 1)
    if len(tail) != 2:
        raise DaemonError(f"{route_load.__file__} lacks its export marker; reinstall horse-ledger")
    return (Path(route.__file__).read_text(encoding="utf-8").rstrip() + "\n\n\n" + MARKER + tail[1].rstrip()
            + f"\n\n\n{CLASS_NAME} = routed_model_class({base_class!r})\n")


def export_routed(settings: Settings, snapshot_id: int | None, info: list[dict[str, Any]], chain_links, out: Path,
                  *, deltas_only: bool = False, merged: bool = False, force: bool = False) -> dict[str, Any]:
    """Write a routed head to `out` (see the module docstring). Returns the manifest written.

    Raises:
        DaemonError: `out` is not empty (without `force`), or the served routes do not match the ledger's
            digests or are not finite (the message names `horse-ledger verify`).
    """
    from daemon.night.routes import served_table
    from daemon.materialise import load_base
    from horse.route import RouteError, check_table, table_digest

    if deltas_only and merged:
        raise DaemonError("--merged and --deltas-only exclude each other; pick one")
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise DaemonError(f"{out} exists and is not an empty directory; choose a new directory or pass --force")
    model, tok = load_base(settings)
    table = served_table(settings, chain_links, tok)
    digest = table_digest(table)
    try:
        check_table(table)
    except RouteError as exc:
        ref = snapshot_id if snapshot_id is not None else ""
        raise SnapshotCorrupt(f"snapshot {snapshot_id}: {exc}; run `horse-ledger verify {ref}`".rstrip()) from None
    manifest: dict[str, Any] = {
        "format": "horse-ledger/export/1", "serving": "merged" if merged else "routed",
        "contents": "deltas-only" if deltas_only else "model", "base_model": settings.model,
        "snapshot_id": snapshot_id,
        "chain": [{k: row[k] for k in ("id", "parent_id", "kind", "sha256", "edit_ids")} for row in info],
        "edit_ids": sorted({e for row in info for e in row["edit_ids"]}), "weights_sha256": digest,
        "subjects": len(table), "routes_file": None if merged else "routes.safetensors"}
    with _staging(out) as stage:
        if merged:
            manifest.update(_write_merged(settings, model, tok, table, stage))
        else:
            _write_routes(stage, table, snapshot_id, settings.model, digest)
            if deltas_only:
                manifest["load"] = "horse.route_load.attach(model, DIR) (see README.md)"
                (stage / "README.md").write_text(BUNDLE_README.format(
                    base_model=settings.model, snapshot=snapshot_id if snapshot_id is not None else "base",
                    n=len(table), digest=digest, dirname=out.name))
            else:
                manifest.update(_write_model_dir(model, tok, stage))
        (stage / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def describe(manifest: dict[str, Any], deltas_only: bool) -> str:
    """What an export wrote, for the CLI's one line."""
    if manifest.get("serving") == "merged":
        return "UNSCOPED merged model dir"
    if manifest.get("serving") != "routed":
        return "delta files + manifest.json" if deltas_only else "Hugging Face model dir"
    what = ("routes.safetensors + README.md: horse.route_load.attach(model, DIR)" if deltas_only else
            "routed model dir: AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)")
    return f"{what}; {manifest['subjects']} subjects, table {manifest['weights_sha256'][:12]}"


def merged_warning(manifest: dict[str, Any], out: Path) -> str:
    return (f"{out} holds the UNSCOPED merge: every edit acts on every text. Its canary agreement with the base "
            f"model is {manifest['canary_agreement_unscoped']:.3f} on {manifest['canary_n']} prompts (served "
            f"routed: {manifest['canary_agreement_routed']:.3f}). Export without --merged for the model the gate "
            "judged.")


def _write_routes(stage: Path, table, snapshot_id: int | None, base_model: str, digest: str) -> None:
    """routes.safetensors (the table, indexed), read back and checked against the digest."""
    from horse.route import ROUTES_FILE, load_table, save_table, table_digest

    path = stage / ROUTES_FILE
    save_table(path, table, {"base_model": base_model, "snapshot_id": str(snapshot_id), "table_sha256": digest})
    if table_digest(load_table(path)[0]) != digest:
        raise DaemonError(f"the written {path.name} does not read back as the head's routes; check the disk and "
                          "export again")


def _write_model_dir(model, tok, stage: Path) -> dict[str, Any]:
    """Base weights, tokenizer, modelling file and the auto_map that registers it."""
    base_class = type(model).__name__
    model.save_pretrained(stage, safe_serialization=True)
    tok.save_pretrained(stage)
    (stage / MODELING_FILE).write_text(modeling_source(base_class), encoding="utf-8")
    config_path = stage / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{CLASS_NAME}"}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {"modeling_file": MODELING_FILE, "class": CLASS_NAME, "base_class": base_class,
            "load": "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) serves the routes; without "
                    "trust_remote_code it loads the unedited base model"}


@torch.no_grad()
def _write_merged(settings: Settings, model, tok, table, stage: Path) -> dict[str, Any]:
    """The unscoped merge and the canary agreement it keeps (greedy next tokens vs the base), and the routed
    model's agreement for comparison."""
    from daemon.gate import load_canary
    from horse.deltas import LayerDelta, add_deltas_
    from horse.metrics import next_token_ids
    from horse.route import Router

    prompts = list(load_canary(settings.gate_canary_file or None))
    base_ids = next_token_ids(model, tok, prompts)
    with Router(model, table):
        routed_ids = next_token_ids(model, tok, prompts)
    deltas = {}
    for m in table.modules:
        parts = [r.factors[m] for r in table.routes.values()]
        deltas[m] = LayerDelta(dense_KV=sum(k.float().T @ c.float() for k, c in parts))
    try:
        add_deltas_(model, deltas)
    except Exception as exc:  # NonFiniteDelta, EngineError (shape): nothing was written to the model
        raise DaemonError(f"the merged weights cannot be built: {exc}; export without --merged") from exc
    merged_ids = next_token_ids(model, tok, prompts)
    model.save_pretrained(stage, safe_serialization=True)
    tok.save_pretrained(stage)
    n = len(prompts)
    return {"canary_n": n,
            "canary_agreement_unscoped": float((merged_ids == base_ids).float().mean()) if n else 1.0,
            "canary_agreement_routed": float((routed_ids == base_ids).float().mean()) if n else 1.0,
            "load": "AutoModelForCausalLM.from_pretrained(DIR): every edit acts on every text (unscoped)"}


class _staging:
    """A staging dir next to `out`, moved into place on success; on failure it is removed, and so are the
    parents of `out` it created."""

    def __init__(self, out: Path) -> None:
        self.out = out.absolute()
        self.created: list[Path] = []
        self.stage: Path | None = None

    def __enter__(self) -> Path:
        missing = []
        parent = self.out.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        self.created = missing[::-1]
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        except OSError as exc:
            self._clean()
            raise DaemonError(f"cannot create {self.out}: {exc.strerror or exc}; give a directory you can "
                              "write") from None
        return self.stage

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self._commit()
                return
            except OSError as err:
                self._clean()
                raise DaemonError(f"cannot write {self.out}: {err.strerror or err}; nothing was exported") from None
        self._clean()

    def _commit(self) -> None:
        if not self.out.exists():
            os.replace(self.stage, self.out)
            return
        for item in self.stage.iterdir():  # --force into an existing dir
            target = self.out / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(item, target)
        self.stage.rmdir()

    def _clean(self) -> None:
        if self.stage is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
        for path in reversed(self.created):  # deepest first
            try:
                path.rmdir()
            except FileNotFoundError:
                continue
            except OSError:
                break
