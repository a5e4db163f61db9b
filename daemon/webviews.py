"""The pages of `horse-ledger serve`: one function per view, each returning the data it shows.

Owns what each page shows and how its query string is read. A view returns a `View` (a template name and a
JSON-able dict); daemon/web.py renders the dict with the template for `/PATH`, or as JSON for `/api/PATH`,
so the JSON endpoints always carry what the pages show. Views only read (ledger.queries, Store queries).

    /                     counts per status, heads, the newest nights
    /edits?status=&subject=&source=&author=&since=&until=&q=&page=&per_page=
    /edits/ID             one edit and its whole history
    /snapshots?model=     the snapshot chain, every night's gate measurements and the edits it refused
    /nights/ID            one night
    /protected            protected facts
    /charts?model=&x=snapshot|edits
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlencode

from daemon.charts import X_AXES, charts, line_svg
from ledger.config import Settings
from ledger.models import EDIT_STATUSES
from ledger.queries import (EditQuery, base_models, chain_lengths, get_night, list_nights, search_edits,
                            snapshot_series)
from ledger.store import Store

Query = Mapping[str, Sequence[str]]
DATE_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S")


PRIVATE_KEYS = frozenset({"token", "claim_token"})  # the daemon's claim tokens: not for readers


def _public(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in PRIVATE_KEYS}


class BadRequest(Exception):
    """A query-string value the view cannot use; the message names it and says what to give instead."""


@dataclass(frozen=True)
class View:
    template: str
    data: dict[str, Any]


def _one(query: Query, name: str, default: str = "") -> str:
    values = query.get(name) or []
    return values[-1].strip() if values else default


def _int(query: Query, name: str, default: int, lo: int, hi: int) -> int:
    raw = _one(query, name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} = {raw!r} is not a whole number; give e.g. ?{name}={default}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"{name} = {value} is out of range; give {lo}..{hi}")
    return value


def _date(query: Query, name: str) -> datetime | None:
    raw = _one(query, name)
    if not raw:
        return None
    for fmt in DATE_FORMATS:
        try:
            return datetime.strptime(raw, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
    raise BadRequest(f"{name} = {raw!r} is not a date; give YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)")


def _model(settings: Settings, store: Store, query: Query) -> tuple[str, list[str]]:
    models = base_models(store)
    model = _one(query, "model") or settings.model
    return model, sorted(set(models) | {settings.model})


def overview(settings: Settings, store: Store, query: Query) -> View:
    counts = store.status_counts()
    lengths = chain_lengths(store)
    heads = [{"base_model": m, "snapshot_id": sid, "chain_length": lengths.get(m, 0)}
             for m, sid in store.heads().items()]
    nights = [_public(n.to_dict()) for n in list_nights(store, limit=10)]
    return View("overview.html", {"counts": counts, "total": sum(counts.values()), "heads": heads,
                                  "nights": nights, "model": settings.model})


def edit_query(query: Query) -> EditQuery:
    """The edit list's filters from a query string (status repeatable)."""
    statuses = tuple(s.strip() for s in query.get("status", []) if s.strip())
    unknown = [s for s in statuses if s not in EDIT_STATUSES]
    if unknown:
        raise BadRequest(f"status = {unknown[0]!r} is not an edit status; give one of {', '.join(EDIT_STATUSES)}")
    return EditQuery(status=statuses, subject=_one(query, "subject"), source=_one(query, "source"),
                     author=_one(query, "author"), text=_one(query, "q"), since=_date(query, "since"),
                     until=_date(query, "until"), page=_int(query, "page", 1, 1, 10**9),
                     per_page=_int(query, "per_page", 50, 1, 200))


def edits(settings: Settings, store: Store, query: Query) -> View:
    q = edit_query(query)
    page = search_edits(store, q)
    filters = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(q).items()}
    for key in ("since", "until"):
        filters[key] = _one(query, key)
    keep = [(k, v) for k in ("q", "subject", "source", "author", "since", "until", "per_page", "status")
            for v in query.get(k, []) if v.strip()]
    listed = page.to_dict()
    listed["edits"] = [_public(e) for e in listed["edits"]]
    return View("edits.html", {"filters": filters, "statuses": list(EDIT_STATUSES), **listed,
                               "_pager_query": urlencode(keep) + ("&" if keep else "")})


def edit(settings: Settings, store: Store, query: Query, edit_id: int) -> View:
    record = store.get_edit(edit_id)
    history = store.events(edit_id=edit_id, limit=None, oldest_first=True)
    return View("edit.html", {"edit": _public(record.to_dict()), "events": [e.to_dict() for e in history]})


def snapshots(settings: Settings, store: Store, query: Query) -> View:
    model, models = _model(settings, store, query)
    rows = snapshot_series(store, model)
    head = store.heads().get(model)
    by_id = {r["id"]: r for r in rows}
    chain, current = [], head
    while current is not None and current in by_id and current not in chain:
        chain.append(current)
        current = by_id[current]["parent_id"] if by_id[current]["kind"] != "consolidated" else None
    nights = [_public(n.to_dict())
              for n in list_nights(store, limit=_int(query, "nights", 30, 1, 1000), base_model=model)]
    return View("snapshots.html", {"model": model, "models": models, "head": head, "chain": chain[::-1],
                                   "snapshots": rows, "nights": nights})


def night(settings: Settings, store: Store, query: Query, batch_id: int) -> View:
    return View("night.html", {"night": _public(get_night(store, batch_id).to_dict())})


def protected(settings: Settings, store: Store, query: Query) -> View:
    return View("protected.html", {"protected": [f.to_dict() for f in store.list_protected()]})


def chart_page(settings: Settings, store: Store, query: Query) -> View:
    model, models = _model(settings, store, query)
    x_axis = _one(query, "x", "snapshot")
    if x_axis not in X_AXES:
        raise BadRequest(f"x = {x_axis!r} is not an axis; give x=snapshot or x=edits")
    drawn = charts(snapshot_series(store, model))
    data = {"model": model, "models": models, "x": x_axis, "charts": [c.to_dict() for c in drawn]}
    return View("charts.html", {**data, "_svg": [line_svg(c.points(x_axis), title=c.title,
                                                          x_label=X_AXES[x_axis][1]) for c in drawn]})


ROUTES: list[tuple[str, Callable[..., View]]] = [
    ("", overview), ("edits", edits), ("edits/<id>", edit), ("snapshots", snapshots), ("nights/<id>", night),
    ("protected", protected), ("charts", chart_page),
]


def resolve(path: str) -> tuple[Callable[..., View], tuple[int, ...]] | None:
    """The view for a path without its leading "/" or "api/" (e.g. "edits/12"), and its id argument."""
    parts = [p for p in path.strip("/").split("/") if p]
    for pattern, view in ROUTES:
        want = [p for p in pattern.split("/") if p]
        if len(want) != len(parts):
            continue
        args: list[int] = []
        for w, got in zip(want, parts):
            if w == "<id>":
                if not got.isdigit() or len(got) > 18:
                    break
                args.append(int(got))
            elif w != got:
                break
        else:
            return view, tuple(args)
    return None
