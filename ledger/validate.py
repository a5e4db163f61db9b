"""What an acceptable edit is: `EditSpec`, `validate_edit()`, and the JSONL / CSV readers for `add --from`.

Every check raises `InvalidEdit` naming where (`--subject`, `line 12`) and which field, before anything
is written. Text is stored verbatim (outer whitespace trimmed): SQL metacharacters and any script are fine;
control characters, bidi overrides, invisible-only text, over-long fields and empty fields are not
(`ledger.text`). An input file must be a regular file of at most MAX_INPUT_FILE_BYTES (64 MiB); a JSONL
object or a CSV header that names a field twice is refused (never last-one-wins).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import stat
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from ledger.errors import InvalidEdit, InvalidInputFile
from ledger.models import MAX_FIELD_CHARS
from ledger.text import text_problem

FIELDS = ("subject", "prompt", "target", "target_true", "paraphrases", "source", "author", "note", "aliases")
REQUIRED = ("subject", "prompt", "target")
TEXT_FIELDS = ("subject", "prompt", "target", "target_true", "source", "author", "note")
MAX_PARAPHRASES = 50
MAX_ALIASES = 50
MAX_INPUT_FILE_BYTES = 64 * 2**20  # `add --from`: larger files are refused before reading (split them)
CSV_PARAPHRASE_SEP = "|"  # CSV cells hold several paraphrases (or aliases) as a JSON array or separated by "|"


@dataclass(frozen=True)
class EditSpec:
    """A validated edit as submitted; `ledger.store.Store.add_edits` takes a list of these."""

    subject: str
    prompt: str
    target_new: str
    target_true: str | None = None
    paraphrases: tuple[str, ...] = field(default_factory=tuple)
    source: str | None = None
    author: str | None = None
    note: str | None = None
    # other names of the subject ("Messi" for "Lionel Messi"); not part of content_hash / key_hash: the
    # fact and its question stay the same whatever the subject is also called
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @cached_property
    def content_hash(self) -> str:
        """The same fact gives the same hash: subject, prompt, target_new, target_true (NFC, casefolded)."""
        return _sha256([self.subject, self.prompt, self.target_new, self.target_true])

    @cached_property
    def key_hash(self) -> str:
        """Edits with the same key are about the same question: subject and prompt."""
        return _sha256([self.subject, self.prompt])

    @property
    def rendered_prompt(self) -> str:
        return self.prompt.replace("{}", self.subject) if "{}" in self.prompt else self.prompt


def _sha256(parts: list[str | None]) -> str:
    # fields never hold control characters, so \x1f separates them unambiguously and \x00 marks None
    norm = "\x1f".join("\x00" if p is None else unicodedata.normalize("NFC", p).casefold() for p in parts)
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


def check_text(value: Any, name: str, *, where: str | None, required: bool) -> str | None:
    """One text field: a string, trimmed, non-empty if required, ≤ 2,000 chars, no control or bidi-override
    characters and not only invisible ones (`ledger.text.text_problem`)."""
    if value is None:
        if required:
            raise InvalidEdit(f"is missing; give a non-empty {name}", where=where, field=name)
        return None
    if not isinstance(value, str):
        raise InvalidEdit(f"must be text, not {type(value).__name__} {value!r}; give a string", where=where, field=name)
    text = value.strip()
    if not text:
        if required:
            raise InvalidEdit("is empty or only whitespace; give a non-empty value", where=where, field=name)
        return None
    if len(text) > MAX_FIELD_CHARS:
        raise InvalidEdit(f"is {len(text):,} characters long; the limit is {MAX_FIELD_CHARS:,}: shorten it",
                          where=where, field=name)
    problem = text_problem(text)
    if problem:
        raise InvalidEdit(f"{problem}; remove it (use plain text)", where=where, field=name)
    return text


def validate_edit(raw: Mapping[str, Any], *, where: str | None = None) -> EditSpec:
    """Check one edit given with the CLI field names (subject, prompt, target, target_true, paraphrases,
    source, author, note, aliases) and return it as an EditSpec.

    Raises:
        InvalidEdit: naming `where` and the field.
    """
    unknown = [k for k in raw if k not in FIELDS]
    if unknown:
        raise InvalidEdit(f"unknown field {unknown[0]!r}; use the fields {', '.join(FIELDS)}",
                          where=where, field=unknown[0])
    text = {name: check_text(raw.get(name), name, where=where, required=name in REQUIRED) for name in TEXT_FIELDS}
    subject, prompt, target = text["subject"], text["prompt"], text["target"]
    check_slots(prompt, subject, where=where)
    if text["target_true"] is not None and text["target_true"].casefold() == target.casefold():
        raise InvalidEdit(f"target {target!r} equals target_true; an edit must change the answer: give another target",
                          where=where, field="target")
    paraphrases = _check_paraphrases(raw.get("paraphrases"), where=where)
    aliases = check_aliases(raw.get("aliases"), subject, where=where)
    return EditSpec(subject=subject, prompt=prompt, target_new=target, target_true=text["target_true"],
                    paraphrases=paraphrases, source=text["source"], author=text["author"], note=text["note"],
                    aliases=aliases)


def check_slots(prompt: str, subject: str | None, *, where: str | None) -> None:
    """The prompt names its subject once: one '{}' slot, or (no slot) the subject written into it. A protected
    fact may have no subject; then its prompt has no slot.

    Raises:
        InvalidEdit: field 'prompt'.
    """
    n_slots = prompt.count("{}")
    if n_slots > 1:
        raise InvalidEdit(f"has {n_slots} '{{}}' slots; use one '{{}}' where the subject goes",
                          where=where, field="prompt")
    if n_slots == 1 and not subject:
        raise InvalidEdit("has a '{}' slot but no subject was given; pass --subject or write the subject "
                          "into the prompt", where=where, field="prompt")
    if n_slots == 0 and subject and subject not in prompt:
        raise InvalidEdit(f"{prompt!r} neither has a '{{}}' slot nor contains the subject {subject!r}; "
                          "write '{}' where the subject goes", where=where, field="prompt")


def validate_protected(*, prompt: Any, target: Any, subject: Any = None, note: Any = None,
                       where: str | None = None) -> dict[str, str | None]:
    """A protected fact checked by the rules of an edit (text, length, '{}' slot / subject in the prompt);
    the subject is optional ("Water boils at" → "100 °C"). Returns the trimmed fields by name.

    Raises:
        InvalidEdit: naming the field.
    """
    out = {"subject": check_text(subject, "subject", where=where, required=False),
           "prompt": check_text(prompt, "prompt", where=where, required=True),
           "target": check_text(target, "target", where=where, required=True),
           "note": check_text(note, "note", where=where, required=False)}
    check_slots(out["prompt"], out["subject"], where=where)
    return out


def _check_paraphrases(value: Any, *, where: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidEdit(f"must be a list of strings, not {type(value).__name__}; give a list of strings", where=where,
                          field="paraphrases")
    if len(value) > MAX_PARAPHRASES:
        raise InvalidEdit(f"has {len(value)} entries; the limit is {MAX_PARAPHRASES}: keep the best ones", where=where,
                          field="paraphrases")
    out = []
    for i, item in enumerate(value):
        out.append(check_text(item, f"paraphrases[{i}]", where=where, required=True))
    return tuple(dict.fromkeys(out))  # drop repeats, keep order


def check_aliases(value: Any, subject: str, *, where: str | None) -> tuple[str, ...]:
    """Other names of the subject: each checked like the subject (non-empty, no control characters,
    ≤ 2,000 characters); repeats and the subject itself are dropped, order kept.

    Raises:
        InvalidEdit: naming `where` and the field `aliases[i]`.
    """
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise InvalidEdit(f"must be a list of strings, not {type(value).__name__}; give a list of strings", where=where,
                          field="aliases")
    if len(value) > MAX_ALIASES:
        raise InvalidEdit(f"has {len(value)} entries; the limit is {MAX_ALIASES}: keep the best ones", where=where,
                          field="aliases")
    out = [check_text(item, f"aliases[{i}]", where=where, required=True) for i, item in enumerate(value)]
    return tuple(a for a in dict.fromkeys(out) if a != subject)


# ---------------------------------------------------------------------------------------------- files

def read_edit_file(path: str | Path) -> list[EditSpec]:
    """Read and validate every edit in a JSONL (.jsonl, .ndjson, .json) or CSV (.csv) file.

    All or nothing: the first problem raises, naming the line and the field, and no edit is returned.
    Raises:
        InvalidInputFile / InvalidEdit
    """
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".jsonl", ".ndjson", ".json", ".csv"):
        raise InvalidInputFile(f"{path}: cannot tell the format from the extension {ext or '(none)'!r}; "
                               "name the file .jsonl or .csv")
    data = _read_regular_file(path)
    text = _decode(data, path)
    try:
        rows = _jsonl_rows(text, path) if ext != ".csv" else _csv_rows(text, path)
    except RecursionError:  # JSON nested thousands deep: the decoder recurses once per level
        raise InvalidInputFile(f"{path.name}: JSON nested too deeply; write each edit as one object of text fields "
                               "(paraphrases, aliases: lists of strings)") from None
    return [validate_edit(raw, where=f"{path.name}: line {lineno}") for lineno, raw in rows]


def _read_regular_file(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_INPUT_FILE_BYTES; a FIFO, a device or a directory (also
    behind a symlink) is refused before it is opened, so `add --from` neither hangs nor fills memory."""
    try:
        info = path.stat()
    except OSError as exc:
        raise InvalidInputFile(f"{path} cannot be read: {exc.strerror}; check the path") from None
    if not stat.S_ISREG(info.st_mode):
        raise InvalidInputFile(f"{path} is not a regular file (a {_file_kind(info.st_mode)}); give a .jsonl or .csv "
                               "file saved on disk")
    if info.st_size > MAX_INPUT_FILE_BYTES:
        raise InvalidInputFile(f"{path} is {info.st_size:,} bytes; the limit is {MAX_INPUT_FILE_BYTES:,} "
                               f"({MAX_INPUT_FILE_BYTES // 2**20} MiB): split it into smaller files")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped for a FIFO since stat()
                raise InvalidInputFile(f"{path} is not a regular file; give a .jsonl or .csv file saved on disk")
            data = fh.read(MAX_INPUT_FILE_BYTES + 1)
    except OSError as exc:
        raise InvalidInputFile(f"{path} cannot be read: {exc.strerror}; check the path") from None
    if len(data) > MAX_INPUT_FILE_BYTES:
        raise InvalidInputFile(f"{path} grew past the limit of {MAX_INPUT_FILE_BYTES:,} bytes while it was read; "
                               "split it into smaller files")
    return data


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


def _decode(data: bytes, path: Path) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise InvalidInputFile(f"{path.name}: line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at "
                               f"column {col}); save the file as UTF-8") from None
    return text.removeprefix("\ufeff")


def _jsonl_rows(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        obj = _loads(line, f"{path.name}: line {lineno}")
        if not isinstance(obj, dict):
            raise InvalidInputFile(f"{path.name}: line {lineno}: a JSON {type(obj).__name__}, not an object; "
                                   "write one JSON object per line, with the fields " + ", ".join(FIELDS))
        rows.append((lineno, obj))
    return iter(rows)


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _loads(text: str, where: str) -> Any:
    """One JSON value; a key given twice in one object is refused (never last-one-wins)."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise InvalidInputFile(f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); "
                               "fix it: each line must be one JSON object") from None
    except _DuplicateKey as exc:
        raise InvalidInputFile(f"{where}: field {exc.args[0]!r} is given twice in one object; keep one") from None


def _csv_rows(text: str, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise InvalidInputFile(f"{path.name}: line 1: bad CSV header ({exc})") from None
    header = [h.strip() for h in header]
    reader.fieldnames = header
    twice = [h for i, h in enumerate(header) if h in header[:i]]
    if twice:
        raise InvalidInputFile(f"{path.name}: line 1: column {twice[0]!r} appears twice in the header; keep one")
    missing = [f for f in REQUIRED if f not in header]
    if missing:
        raise InvalidInputFile(f"{path.name}: line 1: missing column(s) {', '.join(missing)}; give a header with "
                               f"{', '.join(REQUIRED)} (optional: {', '.join(FIELDS[3:])})")
    unknown = [h for h in header if h not in FIELDS]
    if unknown:
        raise InvalidInputFile(f"{path.name}: line 1: unknown column {unknown[0]!r}; use the columns "
                               f"{', '.join(FIELDS)}")
    rows = []
    try:
        for record in reader:
            lineno = reader.line_num
            if None in record:
                raise InvalidInputFile(f"{path.name}: line {lineno}: more cells than header columns; "
                                       "quote cells that contain commas")
            if any(v is None for v in record.values()):
                raise InvalidInputFile(f"{path.name}: line {lineno}: fewer cells than header columns; give "
                                       "every column a cell (an empty one is fine)")
            raw: dict[str, Any] = {k: (v if v.strip() else None) for k, v in record.items()}
            for name in ("paraphrases", "aliases"):
                if raw.get(name) is not None:
                    raw[name] = _csv_list(raw[name], name, path, lineno)
            rows.append((lineno, raw))
    except csv.Error as exc:
        raise InvalidInputFile(f"{path.name}: line {reader.line_num}: bad CSV ({exc})") from None
    return iter(rows)


def _csv_list(cell: str, name: str, path: Path, lineno: int) -> list[Any]:
    """A CSV cell holding several values: a JSON array, or the values separated by "|"."""
    if cell.lstrip().startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError as exc:
            raise InvalidInputFile(f"{path.name}: line {lineno}: field {name!r}: malformed JSON array "
                                   f"({exc.msg}); write a JSON array of strings, or separate the values with "
                                   f"{CSV_PARAPHRASE_SEP!r}") from None
        return value if isinstance(value, list) else [value]
    return [p for p in cell.split(CSV_PARAPHRASE_SEP)]
