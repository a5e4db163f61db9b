"""Routed edits: every edited subject carries a delta of its own, and a text gets only the deltas of the
subjects it names.

An applied fact edit is about its subject ("The mother tongue of Danielle Darrieux is → English"). Instead of
one joint delta of every edit, the ledger keeps one factored delta per subject (the rows of its edits' answer
tokens: Δ_s = keys_MKᵀ · coef_MV per edited module). `Router` hooks a causal LM so that, at each token
position, every edited module adds the deltas of the subjects named in the text up to that position:

    y_BTV = x_BTK · W_baseᵀ + b + Σ_{s named in row b up to t} (x_BTK · keys_sᵀ) · coef_s

A position with no subject named before it gets nothing added: the model there is bit-equal to the base model.
A subject is named when one of its token sequences (its name or an alias; each with and without a leading space)
occurs whole in the input ids, not inside a longer word ("Paul" is not found in "Pauline" nor "McPaul"). The
state is carried across the steps of a cached `generate()`; a subject completed by generated tokens switches on
from the tokens of that step (the cache of earlier steps is kept).

This file is self-contained on purpose (torch only): `horse-ledger export` copies it into the model directory
it writes, so that `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` serves exactly what
`horse-ledger ask` and the gate serve, without horse-ledger installed.

Dimension key: B batch, T positions, K module input, V module output, M factor rows (answer tokens of the
subjects' edits), S subjects, X vocabulary.
Tests: `python -m pytest tests/horse/test_route.py -q`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

ROUTES_FILE = "routes.safetensors"
FORMAT = "horse-routes/1"


class RouteError(ValueError):
    """A route table that does not fit the model or is malformed."""


# ---------------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Route:
    """One subject's delta: its names (the subject first, then aliases), the edits it carries, and per module
    its factors keys_MK (M×K) and coef_MV (M×V), the same M for every module. `factors` may be a
    `FileFactors` that reads them from a route file on first use; `sha256` is `route_digest` of them."""

    names: tuple[str, ...]
    edit_ids: tuple[int, ...]
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]
    n_rows: int = -1
    sha256: str = ""

    def __post_init__(self) -> None:
        if self.n_rows < 0:
            rows = next(iter(self.factors.values()))[0].shape[0] if self.factors else 0
            object.__setattr__(self, "n_rows", int(rows))
        if not self.sha256:
            object.__setattr__(self, "sha256", route_digest(self.factors))

    @property
    def subject(self) -> str:
        return self.names[0]

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + c.numel() * c.element_size() for k, c in self.factors.values())


def route_digest(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """sha256 of a route's factors (module names and fp32 bytes, in module order)."""
    h = hashlib.sha256()
    for module in sorted(factors):
        for t in factors[module]:
            h.update(module.encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


class FileFactors(Mapping):
    """A route's factors in a route file, read on first use (rows a:b of each module's stacked factors)."""

    def __init__(self, path: str, modules: Sequence[str], a: int, b: int) -> None:
        self.path, self.modules, self.a, self.b = str(path), list(modules), a, b
        self._loaded: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _load(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if self._loaded is None:
            from safetensors import safe_open

            with safe_open(self.path, framework="pt") as fh:
                self._loaded = {m: (fh.get_slice(f"{m}.keys_MK")[self.a:self.b],
                                    fh.get_slice(f"{m}.coef_MV")[self.a:self.b]) for m in self.modules}
        return self._loaded

    def __getitem__(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._load()[key]

    def __iter__(self):
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


def subject_key(name: str) -> str:
    """How routes are keyed: the subject with surrounding whitespace removed (case kept: the match is exact)."""
    return " ".join(name.split())


@dataclass
class RouteTable:
    """The routes a model serves, by subject key, and the token sequences that name them.

    `sequences` maps a token sequence to the subject keys it names (built by `index`, or read from a file).
    """

    routes: dict[str, Route] = field(default_factory=dict)
    sequences: dict[tuple[int, ...], tuple[str, ...]] = field(default_factory=dict)
    word_start_X: torch.Tensor | None = None   # bool [X]: the token's text starts with a letter or digit
    word_end_X: torch.Tensor | None = None     # bool [X]: it ends with one

    def __len__(self) -> int:
        return len(self.routes)

    @property
    def modules(self) -> list[str]:
        """The edited modules (cached for the routes it was computed on)."""
        cached = self.__dict__.get("_modules")
        if cached is None or cached[0] is not self.routes or cached[1] != len(self.routes):
            cached = (self.routes, len(self.routes), sorted({n for r in self.routes.values() for n in r.factors}))
            self.__dict__["_modules"] = cached
        return cached[2]

    def index(self, tok) -> RouteTable:
        """Fill `sequences` and the word-boundary sets from a tokenizer (every name, with and without a leading
        space). Returns self."""
        if self.word_start_X is None:
            texts = [tok.convert_tokens_to_string([t]) if t is not None else ""
                     for t in tok.convert_ids_to_tokens(list(range(len(tok))))]
            self.word_start_X = torch.tensor([t[:1].isalnum() for t in texts], dtype=torch.bool)
            self.word_end_X = torch.tensor([t[-1:].isalnum() for t in texts], dtype=torch.bool)
        seqs: dict[tuple[int, ...], set[str]] = {}
        for key, route in self.routes.items():
            for name in route.names:
                for text in (name, " " + name):
                    ids = tuple(tok(text, add_special_tokens=False)["input_ids"])
                    if ids:
                        seqs.setdefault(ids, set()).add(key)
        self.sequences = {s: tuple(sorted(k)) for s, k in seqs.items()}
        return self

    def with_routes(self, changed: Mapping[str, Route | None], tok=None) -> RouteTable:
        """A new table: this one with `changed` routes put in (None removes one). Indexed again with `tok`
        (needed when names change); shares the unchanged routes' tensors."""
        routes = dict(self.routes)
        for key, route in changed.items():
            if route is None:
                routes.pop(key, None)
            else:
                routes[key] = route
        table = RouteTable(routes, {}, self.word_start_X, self.word_end_X)
        if tok is not None:
            return table.index(tok)
        table.sequences = {s: keys for s, keys in self.sequences.items() if all(k in routes for k in keys)}
        return table

    def longest(self) -> int:
        """The most tokens of any name's sequence (cached for the sequences it was computed on)."""
        cached = self.__dict__.get("_longest")
        if cached is None or cached[0] is not self.sequences:
            cached = (self.sequences, max((len(s) for s in self.sequences), default=0))
            self.__dict__["_longest"] = cached
        return cached[1]


def table_digest(table: RouteTable) -> str:
    """sha256 of what a table serves: each route's names, edits and factor digest, in subject order. The
    snapshot records it (`weights_sha256`); `check_table` recomputes the factors' digests."""
    h = hashlib.sha256(FORMAT.encode())
    for key in sorted(table.routes):
        route = table.routes[key]
        h.update(json.dumps([key, list(route.names), list(route.edit_ids), route.sha256]).encode())
    return h.hexdigest()


def check_table(table: RouteTable) -> None:
    """Raise RouteError when a route's factors do not match their recorded digest or are not finite."""
    for key, route in table.routes.items():
        if route_digest(route.factors) != route.sha256:
            raise RouteError(f"the factors of {key!r} do not match their recorded sha256; the route file was "
                             "changed or damaged")
        if not all(bool(torch.isfinite(t).all()) for pair in route.factors.values() for t in pair):
            raise RouteError(f"the factors of {key!r} are not finite (NaN/Inf)")


# ---------------------------------------------------------------------------------------------- files

def table_tensors(table: RouteTable) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, str metadata) of a table for safetensors: per module the factors of every route stacked in
    subject order (`<module>.keys_MK`, `<module>.coef_MV`), the rows per route, and the word-boundary sets."""
    keys = sorted(table.routes)
    modules = table.modules
    tensors: dict[str, torch.Tensor] = {
        "rows_S": torch.tensor([table.routes[k].n_rows for k in keys], dtype=torch.int64)}
    for m in modules:
        for i, part in enumerate(("keys_MK", "coef_MV")):
            rows = [table.routes[k].factors[m][i].detach().cpu().contiguous() for k in keys]
            tensors[f"{m}.{part}"] = torch.cat(rows) if rows else torch.zeros(0)
    if table.word_start_X is not None:
        tensors["word_start_X"] = table.word_start_X.to(torch.uint8)
        tensors["word_end_X"] = table.word_end_X.to(torch.uint8)
    meta = {"format": FORMAT, "modules": json.dumps(modules),
            "routes": json.dumps([{"key": k, "names": list(table.routes[k].names), "sha256": table.routes[k].sha256,
                                   "edit_ids": list(table.routes[k].edit_ids)} for k in keys]),
            "sequences": json.dumps([[list(s), list(v)] for s, v in sorted(table.sequences.items())])}
    return tensors, meta


def table_from_tensors(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], *,
                       path: str | None = None) -> RouteTable:
    """The inverse of `table_tensors` (raises RouteError on a malformed file). With `path`, the factors are
    read from that file on first use (`tensors` then needs only rows_S and the word sets)."""
    try:
        if meta.get("format") != FORMAT:
            raise RouteError(f"not a route table (format {meta.get('format')!r}, expected {FORMAT!r})")
        modules = json.loads(meta["modules"])
        listed = json.loads(meta["routes"])
        rows_S = tensors["rows_S"].tolist()
        if len(rows_S) != len(listed):
            raise RouteError(f"{len(listed)} routes listed but rows for {len(rows_S)}")
        starts = [0]
        for n in rows_S:
            starts.append(starts[-1] + int(n))
        routes = {}
        for i, item in enumerate(listed):
            a, b = starts[i], starts[i + 1]
            if path is not None:
                factors: Mapping = FileFactors(path, modules, a, b)
            else:
                factors = {m: (tensors[f"{m}.keys_MK"][a:b], tensors[f"{m}.coef_MV"][a:b]) for m in modules}
            routes[item["key"]] = Route(tuple(item["names"]), tuple(int(e) for e in item["edit_ids"]), factors,
                                        n_rows=b - a, sha256=str(item.get("sha256", "")))
        seqs = {tuple(int(t) for t in s): tuple(v) for s, v in json.loads(meta.get("sequences", "[]"))}
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
        if isinstance(exc, RouteError):
            raise
        raise RouteError(f"malformed route table: {exc}") from exc
    ws, we = tensors.get("word_start_X"), tensors.get("word_end_X")
    return RouteTable(routes, seqs, None if ws is None else ws.bool(), None if we is None else we.bool())


def save_table(path, table: RouteTable, metadata: Mapping[str, str] | None = None) -> None:
    """Write a table (safetensors; `metadata` is added to the table's own str metadata)."""
    from safetensors.torch import save_file

    tensors, meta = table_tensors(table)
    save_file(tensors, str(path), metadata={**(metadata or {}), **meta})


def load_table(path, *, lazy: bool = False) -> tuple[RouteTable, dict[str, str]]:
    """Read a route table and its file's metadata; `lazy`: factors are read when a route is first served."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            names = [k for k in fh.keys() if not lazy or k in ("rows_S", "word_start_X", "word_end_X")]
            tensors = {k: fh.get_tensor(k) for k in names}
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise RouteError(f"cannot read the route table {path}: {exc}") from exc
    return table_from_tensors(tensors, meta, path=str(path) if lazy else None), dict(meta)


# ---------------------------------------------------------------------------------------------- matching

def named_subjects(row: Sequence[int], table: RouteTable, longest: int) -> dict[str, int]:
    """Subject key → the first position of its first whole-word occurrence in `row` (token ids)."""
    found: dict[str, int] = {}
    if not table.sequences:
        return found
    ws = table.word_start_X
    we = table.word_end_X
    n_vocab = 0 if ws is None else ws.shape[0]

    def is_start(tok: int) -> bool:
        return bool(ws[tok]) if 0 <= tok < n_vocab else False

    def is_end(tok: int) -> bool:
        return bool(we[tok]) if 0 <= tok < n_vocab else False

    for t in range(len(row)):
        for n in range(1, min(longest, len(row) - t) + 1):
            keys = table.sequences.get(tuple(row[t:t + n]))
            if keys is None:
                continue
            seq_end = t + n - 1
            if t > 0 and is_end(row[t - 1]) and is_start(row[t]):
                continue  # the word began earlier
            if seq_end + 1 < len(row) and is_end(row[seq_end]) and is_start(row[seq_end + 1]):
                continue  # the word goes on
            for key in keys:
                found.setdefault(key, t)
    return found


def starts_by_row(ids_BT: torch.Tensor, table: RouteTable) -> list[dict[str, int]]:
    """Per row, subject key → the position from which its delta applies."""
    longest = table.longest()
    return [named_subjects(row, table, longest) for row in ids_BT.detach().cpu().tolist()]


# ---------------------------------------------------------------------------------------------- serving

def _past_length(kwargs: Mapping) -> int:
    """How many positions a backbone call's KV cache already holds (0: a pass from the first token)."""
    for key in ("cache", "past_key_values"):  # the name changed across transformers versions
        past = kwargs.get(key)
        if past is not None and hasattr(past, "get_seq_length"):
            return int(past.get_seq_length())
    return 0


@dataclass
class _Pass:
    """What one backbone call needs in the module hooks: per module the active routes' stacked factors and the
    gate_BTM of their rows (1 where the row's subject is named at or before the position)."""

    keys_MK: dict[str, torch.Tensor]
    coef_MV: dict[str, torch.Tensor]
    gate_BTM: torch.Tensor
    any_BT: torch.Tensor


class Router:
    """Hooks that add, at each position, the deltas of the subjects named up to it (see the module docstring).

    Args:
        model: a transformers causal LM with the base weights (the router never changes a weight).
        table: the routes (indexed with the model's tokenizer); `router.table = ...` swaps them for the next
            passes (the gate's candidates).
    """

    def __init__(self, model: nn.Module, table: RouteTable) -> None:
        self.model = model
        self.table = table
        backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
        if not isinstance(backbone, nn.Module):
            raise RouteError(f"{type(model).__name__} has no backbone module to route; routed edits need a "
                             "transformers causal LM")
        if getattr(model, "_horse_router", None) is not None:
            raise RouteError("this model already has a router; remove it first")
        self._pass: _Pass | None = None
        self._last_stacked: tuple | None = None
        self._rows: list[dict[str, int]] | None = None      # per row: subject → start (absolute position)
        self._tail_BT: torch.Tensor | None = None           # last tokens, for a name cut by a step boundary
        self._offset = 0
        self._handles = [backbone.register_forward_pre_hook(self._on_backbone, with_kwargs=True),
                         backbone.register_forward_hook(self._after_backbone)]
        self._hooked: set[str] = set()
        model._horse_router = self
        try:
            self._hook_modules()
        except Exception:
            self.remove()
            raise

    def _hook_modules(self) -> None:
        for name in self.table.modules:
            if name in self._hooked:
                continue
            try:
                module = self.model.get_submodule(name)
            except AttributeError as exc:
                raise RouteError(f"the routes edit {name}, which this model does not have; they belong to "
                                 "another model") from exc
            self._handles.append(module.register_forward_hook(self._hook_for(name)))
            self._hooked.add(name)

    def set_table(self, table: RouteTable) -> None:
        self.table = table
        self._hook_modules()

    @contextlib.contextmanager
    def suspended(self) -> Iterator[None]:
        """While inside, the model is the base model (an engine solving new routes must see the base)."""
        table, self.table = self.table, RouteTable({}, {}, self.table.word_start_X, self.table.word_end_X)
        try:
            yield
        finally:
            self.table = table

    def _on_backbone(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            raise RouteError("a routed model needs input_ids (not inputs_embeds) to find the edited subjects")
        ids = ids.detach().cpu()
        past = _past_length(kwargs)
        B, T = ids.shape
        if past and self._rows is not None and len(self._rows) == B:
            joined = torch.cat([self._tail_BT, ids], dim=1)
            offset = past - self._tail_BT.shape[1]
            found = starts_by_row(joined, self.table)
            rows = []
            for b in range(B):
                row = dict(self._rows[b])
                for key, start in found[b].items():
                    row.setdefault(key, max(offset + start, past))  # earlier positions are cached as they were
                rows.append(row)
        else:
            joined, offset, past = ids, 0, 0
            rows = starts_by_row(ids, self.table)
        keep = max(self.table.longest() - 1, 0)
        self._tail_BT = joined[:, joined.shape[1] - keep:] if keep else joined[:, :0]
        self._rows = rows
        self._pass = self._prepare(rows, past, T)

    def _prepare(self, rows: list[dict[str, int]], past: int, T: int) -> _Pass | None:
        active = sorted({k for row in rows for k in row if k in self.table.routes})
        if not active:
            return None
        pos_T = torch.arange(past, past + T)
        gates = []
        for key in active:
            starts_B = torch.tensor([row.get(key, 1 << 62) for row in rows])
            on_BT = pos_T[None, :] >= starts_B[:, None]
            gates.append(on_BT[:, :, None].expand(-1, -1, self.table.routes[key].n_rows))
        gate_BTM = torch.cat(gates, dim=2)
        keys_MK, coef_MV = self._stacked(tuple(active))
        return _Pass(keys_MK, coef_MV, gate_BTM, gate_BTM.any(dim=2))

    def _stacked(self, active: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Per module, the active routes' factors stacked (the last set is kept: generation steps reuse it)."""
        last = self._last_stacked
        if last is not None and last[0] is self.table and last[1] == active:
            return last[2], last[3]
        keys_MK, coef_MV = {}, {}
        for m in self.table.modules:
            parts = [self.table.routes[k].factors.get(m) for k in active]
            if any(p is None for p in parts):
                raise RouteError(f"route tables must edit the same modules for every subject ({m} missing)")
            keys_MK[m] = torch.cat([p[0] for p in parts])
            coef_MV[m] = torch.cat([p[1] for p in parts])
        self._last_stacked = (self.table, active, keys_MK, coef_MV)
        return keys_MK, coef_MV

    def _after_backbone(self, *_args) -> None:
        self._pass = None

    def _hook_for(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            p = self._pass
            if p is None or name not in p.keys_MK:
                return output
            x_BTK = args[0]
            dev, dt = output.device, output.dtype
            keys_MK = p.keys_MK[name].to(dev, dt)
            coef_MV = p.coef_MV[name].to(dev, dt)
            gate_BTM = p.gate_BTM.to(dev, dt)
            delta_BTV = ((x_BTK.to(dt) @ keys_MK.T) * gate_BTM) @ coef_MV
            on = p.any_BT.to(dev)[..., None]
            return torch.where(on, output + delta_BTV, output)
        return hook

    def remove(self) -> None:
        """Take the hooks off (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()
        if getattr(self.model, "_horse_router", None) is self:
            self.model._horse_router = None
        self._pass = self._rows = self._tail_BT = None

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def named_in(texts: Iterable[str], tok, table: RouteTable) -> list[set[str]]:
    """Per text, the subject keys it names (as the router finds them)."""
    longest = table.longest()
    return [set(named_subjects(tok(t, add_special_tokens=False)["input_ids"], table, longest)) for t in texts]
