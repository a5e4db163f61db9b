"""Loading exported routes onto a transformers model: `attach` for a deltas-only bundle, and the model class that
`horse-ledger export` writes into a model directory.

    router = attach(model, "bundle/")          # the base model + the bundle's routes, as `horse-ledger ask` serves
    router.remove()                            # the base model again

Everything below the marker line is appended verbatim to a copy of `horse/route.py` to make the exported
`modeling_horse_routed.py` (`daemon/export_routed.py` writes it, then one line that names the class:
`HorseRoutedForCausalLM = routed_model_class("LlamaForCausalLM")`). So that part may use only route.py's names,
the standard library, torch, safetensors and transformers — never horse-ledger.
Tests: `python -m pytest tests/daemon/test_export_routed.py -q`.
"""
from __future__ import annotations

from horse.route import ROUTES_FILE, RouteError, Router, check_table, load_table, table_digest

# ---- appended to horse/route.py by `horse-ledger export` below this line ----
import json  # noqa: E402 (below route.py's source in the exported file)
import os  # noqa: E402

MANIFEST_FILE = "horse-ledger.json"


def attach(model, path, *, expected_digest: str | None = None) -> Router:
    """Serve exported routes on `model` (the unedited base model they were exported from): at each position the
    deltas of the subjects named in the text up to it; elsewhere the model is the base model, bit for bit.

    Args:
        model: a transformers causal LM with the base weights.
        path: a directory written by `horse-ledger export` (its `routes.safetensors`, checked against the digest
            its `horse-ledger.json` records), or a route file.
        expected_digest: the table digest to require (default: the manifest's `weights_sha256`, when there is one).
    Returns:
        The `Router` (`router.remove()` takes the routes off).
    Raises:
        RouteError: the file is unreadable, does not match the digest, holds NaN/Inf or does not fit the model.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        manifest = os.path.join(path, MANIFEST_FILE)
        if expected_digest is None and os.path.isfile(manifest):
            with open(manifest, encoding="utf-8") as fh:
                expected_digest = json.load(fh).get("weights_sha256")
        path = os.path.join(path, ROUTES_FILE)
    table, _ = load_table(path)
    if expected_digest is not None and table_digest(table) != expected_digest:
        raise RouteError(f"the routes in {path} do not match the digest the manifest records ({expected_digest}); "
                         "the file was changed or damaged: export the snapshot again")
    check_table(table)
    return Router(model, table)


def routed_model_class(base_name: str) -> type:
    """The exported model class: the transformers class `base_name` (e.g. "LlamaForCausalLM") whose
    `from_pretrained` also attaches the directory's routes (see `attach`)."""
    import transformers

    base = getattr(transformers, base_name, None)
    if base is None:
        raise RouteError(f"transformers {transformers.__version__} has no class {base_name}; install the version "
                         "the model was exported with")

    class HorseRoutedForCausalLM(base):
        """A `{base}` that serves the routes in its directory (`routes.safetensors`)."""

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            from transformers.utils import cached_file

            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            hub = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
                   if kwargs.get(k) is not None}
            routes = cached_file(pretrained_model_name_or_path, ROUTES_FILE, **hub)
            with open(cached_file(pretrained_model_name_or_path, MANIFEST_FILE, **hub), encoding="utf-8") as fh:
                manifest = json.load(fh)
            if not manifest.get("weights_sha256"):
                raise RouteError(f"{MANIFEST_FILE} records no weights_sha256; export the snapshot again")
            attach(model, routes, expected_digest=manifest["weights_sha256"])
            return model

    HorseRoutedForCausalLM.__doc__ = HorseRoutedForCausalLM.__doc__.format(base=base_name)
    return HorseRoutedForCausalLM
