"""Benchmark data loaders: CounterFact and zsRE files → list[EditRequest].

Owns reading the three record formats the project meets, detected by content (not by file name):

- "counterfact": EasyEdit's flat CounterFact (`prompt`, `target_new`, `ground_truth`, `subject`,
  `rephrase_prompt`, `locality_prompt`, `locality_ground_truth`, `case_id`). The edit target is
  `target_new` — never `ground_truth` (the public HORSE loader edits towards `ground_truth`, the old answer,
  which inflates every score; see REFERENCE_RESULTS.md).
- "rome": ROME's `requested_rewrite` records (`prompt` with "{}" for the subject, `target_new.str`,
  `target_true.str`, `paraphrase_prompts`, `neighborhood_prompts`). Locality = the first neighbourhood
  prompt, whose answer is the true object.
- "zsre": MEND's zsRE (`src`, `rephrase`, `alt` → target, `answers[0]` → target_true, `loc`, `loc_ans`).
  The locality prompt is kept as the reference (MALMEN / HORSE) builds it: `loc + "?"`, with the
  "nq question: " prefix left in, so our LS numbers are comparable with theirs.

Files are a JSON list or JSON lines. Records whose target is empty (two zsRE train records have `alt` = "")
are skipped with a logged warning naming them (`skip_empty=False` makes them errors). A bad record raises EngineError naming the file, the record's index
(and case id when it has one) and the missing field.

Run the tests with `pytest tests/horse/test_data.py`.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from horse.errors import EngineError
from horse.types import EditRequest

log = logging.getLogger(__name__)

Format = Literal["counterfact", "rome", "zsre"]
FORMATS: tuple[Format, ...] = ("counterfact", "rome", "zsre")


class BadDataFile(EngineError):
    """The data file cannot be read as CounterFact or zsRE; check its format (see horse/data.py)."""


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The JSON objects of a file: a JSON list, or one object per line (JSON lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadDataFile(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise BadDataFile(f"{path} is not JSON or JSON lines ({exc}); give a CounterFact or zsRE file") from exc
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise BadDataFile(f"{path} must hold a list of JSON objects (one per fact)")
    return records


def detect_format(record: Mapping[str, Any]) -> Format:
    """Which of the three formats a record is in, from its keys."""
    if "requested_rewrite" in record:
        return "rome"
    if "src" in record and ("alt" in record or "ans" in record):
        return "zsre"
    if "prompt" in record and "target_new" in record:
        return "counterfact"
    raise BadDataFile(
        f"record with keys {sorted(record)[:8]} is neither CounterFact (prompt, target_new, …), "
        "ROME (requested_rewrite) nor zsRE (src, alt, …)"
    )


def _text(value: Any) -> str:
    """A string field, or the "str" of ROME-style {"str": …, "id": …} targets."""
    if isinstance(value, Mapping):
        value = value.get("str")
    if not isinstance(value, str):
        raise KeyError
    return value


def _texts(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    return tuple(v for v in value if isinstance(v, str) and v.strip())


def _first(value: Any) -> str | None:
    texts = _texts(value)
    return texts[0] if texts else None


def _case_id(record: Mapping[str, Any], index: int) -> str:
    cid = record.get("case_id", record.get("id"))
    return str(cid) if cid is not None else str(index)


def _render(prompt: str, subject: str) -> str:
    return prompt.replace("{}", subject) if "{}" in prompt else prompt


def request_from_record(record: Mapping[str, Any], fmt: Format, index: int = 0) -> EditRequest:
    """One record → EditRequest (raises KeyError on a missing field; `load_requests` names the record)."""
    if fmt == "counterfact":
        return EditRequest(
            prompt=_render(_text(record["prompt"]), record.get("subject", "")),
            target=_text(record["target_new"]).strip(),
            subject=record.get("subject", "") or "",
            target_true=_text(record["ground_truth"]).strip() if record.get("ground_truth") else None,
            rephrases=_texts(record.get("rephrase_prompt")),
            locality_prompt=_first(record.get("locality_prompt")),
            locality_answer=_first(record.get("locality_ground_truth")),
            case_id=_case_id(record, index),
        )
    if fmt == "rome":
        rw = record["requested_rewrite"]
        subject = _text(rw["subject"])
        target_true = _text(rw["target_true"]).strip()
        neighbours = _texts(record.get("neighborhood_prompts"))
        return EditRequest(
            prompt=_render(_text(rw["prompt"]), subject),
            target=_text(rw["target_new"]).strip(),
            subject=subject,
            target_true=target_true,
            rephrases=_texts(record.get("paraphrase_prompts")),
            locality_prompt=neighbours[0] if neighbours else None,
            locality_answer=target_true if neighbours else None,
            case_id=_case_id(record, index),
        )
    # zsRE, as MEND / MALMEN: target = alt, locality = loc + "?" (prefix kept) → loc_ans.
    target = record["alt"] if "alt" in record else record["ans"]
    answers = record.get("answers")
    loc = record.get("loc")
    return EditRequest(
        prompt=_text(record["src"]),
        target=_text(target).strip(),
        subject=record.get("subject", "") or "",
        target_true=_first(answers) if not isinstance(answers, str) else answers,
        rephrases=_texts(record.get("rephrase")),
        locality_prompt=(loc + "?") if isinstance(loc, str) and loc.strip() else None,
        locality_answer=_first(record.get("loc_ans")),
        case_id=_case_id(record, index),
    )


def requests_from_records(
    records: Sequence[Mapping[str, Any]],
    *,
    source: str = "<records>",
    fmt: Format | None = None,
    skip_empty: bool = True,
) -> list[EditRequest]:
    """Convert records (all in one format, detected from the first unless `fmt` is given).

    Records with an empty target are skipped (logged) when `skip_empty`, else refused.

    Raises:
        BadDataFile: naming `source`, the record index and case id, and what is wrong.
    """
    if not records:
        raise BadDataFile(f"{source} holds no records")
    fmt = fmt or detect_format(records[0])
    out = []
    skipped: list[str] = []
    for index, record in enumerate(records):
        where = f"{source} record {index} (case {_case_id(record, index)})"
        try:
            request = request_from_record(record, fmt, index)
        except KeyError as exc:
            field = exc.args[0] if exc.args else "a text field"
            raise BadDataFile(f"{where}: missing or non-text field {field!r} for the {fmt} format; fix or drop it") from exc
        except (TypeError, AttributeError) as exc:
            raise BadDataFile(f"{where}: malformed {fmt} record ({exc}); fix or drop it") from exc
        if not request.prompt.strip() or not request.target:
            if skip_empty and request.prompt.strip():
                skipped.append(request.case_id or str(index))
                continue
            raise BadDataFile(f"{where}: empty prompt or target; fix or drop it")
        out.append(request)
    if skipped:
        log.warning("%s: skipped %d record(s) with an empty target: %s", source, len(skipped), ", ".join(skipped[:10]))
    if not out:
        raise BadDataFile(f"{source} holds no usable records (all targets empty)")
    return out


def load_requests(
    path: str | os.PathLike[str],
    *,
    limit: int | None = None,
    fmt: Format | None = None,
    skip_empty: bool = True,
) -> list[EditRequest]:
    """Read a CounterFact (EasyEdit flat or ROME) or zsRE (MEND) file as EditRequests.

    Args:
        path: JSON list or JSON lines file.
        limit: keep only the first `limit` records.
        fmt: force a format instead of detecting it.
        skip_empty: skip (and log) records whose target is empty instead of refusing the file.

    Returns:
        One EditRequest per record, in file order.

    Raises:
        BadDataFile: unreadable file or a bad record (named).
    """
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    return requests_from_records(records, source=str(path), fmt=fmt, skip_empty=skip_empty)
