"""Getting a model out: export a snapshot as a plain Hugging Face model dir or as its delta files, and ask it.

Owns `horse-ledger export` and `horse-ledger ask`. The exported model dir is what
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads with no horse-ledger installed; a
`horse-ledger.json` next to it says which snapshot, chain and edits it holds. `--deltas-only` copies the
chain's delta files in order with a `manifest.json` that says how to apply them. With the config's
`scope = "subject"` the dir also holds `scope.json` (the edited subjects) and `scope-base.safetensors` (the base
weights of the edited modules): plain transformers serves the edits on every text; `horse.scope.scope_export(model,
tokenizer, DIR)` puts the scope on, as the gate measured it. A routed chain (scope = routed) is exported by
`daemon.export_routed`: a dir that serves the routes under `trust_remote_code=True` and is the base model
without it. `ask` serves the configured scope.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from daemon import snapshots
from daemon.errors import DaemonError
from daemon.materialise import chain, chain_subjects, head_id, links, load_base, materialise, scope_index, scoped
from daemon.night.routes import is_routed, served_table
from ledger.config import Settings
from ledger.snapshot_reads import snapshot_edit_ids, snapshot_of
from ledger.store import Store

APPLY_RULE = ("apply the files in `chain` order to the base model's weights: for each layer, W <- (W.float() + "
              "delta).to(W.dtype), where delta_KV = dense_KV, or keys_NK^T @ coef_NV (K = module input, V = module "
              "output); for nn.Linear weights (out x in) add delta_KV^T, for GPT-2 Conv1D (in x out) add delta_KV")


def _chain_info(settings: Settings, store: Store, snapshot_id: int | None) -> tuple[int | None, list[dict[str, Any]]]:
    with store.session(write=False) as s:
        snapshot_of(s, settings.model, snapshot_id)
        rows = chain(s, snapshot_id)
        out = [{"id": r.id, "parent_id": r.parent_id, "kind": r.kind, "status": r.status, "path": r.path,
                "sha256": r.sha256, "bytes": r.bytes,
                "edit_ids": snapshot_edit_ids(s, r.id),
                "metrics": {k: (r.metrics or {}).get(k) for k in ("weights_sha256", "base_fingerprint",
                                                                   "hypernet_fingerprint")}}
               for r in rows]
    return snapshot_id, out


def resolve_snapshot(settings: Settings, store: Store, ref: int | None, *, use_head: bool) -> int | None:
    if ref is None and use_head:
        with store.session(write=False) as s:
            return head_id(s, settings.model)
    return ref


def export(settings: Settings, store: Store, snapshot_id: int | None, out: Path, *, deltas_only: bool = False,
           force: bool = False, merged: bool = False) -> dict[str, Any]:
    """Write the model at `snapshot_id` (None = base) to `out`. Returns the manifest written. A routed chain
    (or the base with scope = routed) is exported by `daemon.export_routed` (`merged`: the unscoped merge)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise DaemonError(f"{out} exists and is not empty; choose a new directory or pass --force")
    snapshot_id, info = _chain_info(settings, store, snapshot_id)
    chain_links = links_for(store, snapshot_id)
    if is_routed(chain_links) or (not chain_links and settings.scope == "routed"):
        from daemon.export_routed import export_routed

        return export_routed(settings, snapshot_id, info, chain_links, out, deltas_only=deltas_only, merged=merged,
                             force=force)
    if merged:
        what = "the base" if snapshot_id is None else f"snapshot {snapshot_id}"
        raise DaemonError(f"--merged is for routed snapshots; {what} holds weight deltas, which `export` writes "
                          "merged already: drop --merged")
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"format": "horse-ledger/export/1", "base_model": settings.model,
                                "snapshot_id": snapshot_id, "chain": [], "edit_ids": sorted(
                                    {e for row in info for e in row["edit_ids"]})}
    if deltas_only:
        for i, row in enumerate(info):
            src = snapshots.resolve(settings.snapshot_dir, row["path"])
            digest = snapshots.hash_file(src)
            if digest != row["sha256"]:
                raise DaemonError(f"snapshot {row['id']}'s file {src} does not match its recorded sha256; run "
                                  f"`horse-ledger verify {row['id']}`")
            name = f"{i:03d}-snapshot-{row['id']}.safetensors"
            shutil.copyfile(src, out / name)
            manifest["chain"].append({**{k: row[k] for k in ("id", "parent_id", "kind", "sha256", "bytes",
                                                              "edit_ids")}, "file": name,
                                      "base_fingerprint": row["metrics"]["base_fingerprint"]})
        manifest["apply"] = APPLY_RULE
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest
    m = materialise(settings, chain_links)
    m.model.save_pretrained(out, safe_serialization=True)
    m.tokenizer.save_pretrained(out)
    manifest["chain"] = [{k: row[k] for k in ("id", "parent_id", "kind", "sha256", "edit_ids")} for row in info]
    manifest["weights_sha256"] = info[-1]["metrics"]["weights_sha256"] if info else None
    if settings.scope != "off":
        from horse.scope import write_scope

        with store.session(write=False) as s:
            subjects = chain_subjects(s, m.chain_ids)
        # a joint chain under scope = routed (written before routing) is served scoped by subject, as `ask` does
        manifest["scope"] = write_scope(out, "subject", subjects, m.base_weights)
    (out / "horse-ledger.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def links_for(store: Store, snapshot_id: int | None):
    with store.session(write=False) as s:
        return links(s, snapshot_id)


@torch.no_grad()
def ask(settings: Settings, store: Store, prompt: str, snapshot_id: int | None, *, max_new_tokens: int = 20,
        top_k: int = 5) -> dict[str, Any]:
    """Greedy continuation of `prompt` and the top next tokens, on the model at `snapshot_id` (None = base)."""
    chain_links = links_for(store, snapshot_id)
    if is_routed(chain_links) or (not chain_links and settings.scope == "routed"):
        return ask_routed(settings, chain_links, prompt, snapshot_id, max_new_tokens=max_new_tokens, top_k=top_k)
    m = materialise(settings, chain_links)
    model, tok = m.model, m.tokenizer
    with store.session(write=False) as s:
        index = scope_index(settings, tok, chain_subjects(s, m.chain_ids))
    device = next(model.parameters()).device
    enc = tok(prompt, return_tensors="pt").to(device)
    with scoped(model, tok, m.base_weights, index):
        logits = model(**enc).logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, k=min(top_k, probs.numel()))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    continuation = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    in_scope = None
    if index is not None and m.chain_ids:  # the base carries no edits: no scope to be in
        from horse.scope import scope_mask_BT

        in_scope = bool(scope_mask_BT(enc["input_ids"].cpu(), index).any())
    return {"base_model": settings.model, "snapshot_id": snapshot_id, "prompt": prompt,
            "continuation": continuation, "scope": settings.scope, "in_scope": in_scope,
            "top_tokens": [{"token": tok.decode([int(i)]), "id": int(i), "prob": float(p)}
                           for p, i in zip(top.values.tolist(), top.indices.tolist())]}


@torch.no_grad()
def ask_routed(settings: Settings, chain_links, prompt: str, snapshot_id: int | None, *, max_new_tokens: int,
               top_k: int) -> dict[str, Any]:
    """`ask` on a routed head: the base model with the routes of the subjects the prompt names."""
    from horse.route import Router, named_in

    model, tok = load_base(settings)
    table = served_table(settings, chain_links, tok)
    device = next(model.parameters()).device
    enc = tok(prompt, return_tensors="pt").to(device)
    with Router(model, table):
        probs = torch.softmax(model(**enc).logits[0, -1].float(), dim=-1)
        top = torch.topk(probs, k=min(top_k, probs.numel()))
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    named = sorted(named_in([prompt], tok, table)[0])
    return {"base_model": settings.model, "snapshot_id": snapshot_id, "prompt": prompt,
            "continuation": tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True),
            "scope": "routed", "in_scope": bool(named) if chain_links else None, "subjects": named,
            "top_tokens": [{"token": tok.decode([int(i)]), "id": int(i), "prob": float(p)}
                           for p, i in zip(top.values.tolist(), top.indices.tolist())]}
