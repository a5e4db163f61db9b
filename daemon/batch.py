"""What every night shares, routed (daemon/night/) or joint (daemon/cycle.py): the stage names, the result a
night returns, the heartbeat of its claim, the gate's probe and the measurements kept beside a snapshot, and the
hypernet a night loads.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from daemon import gate, snapshots
from daemon.errors import DaemonError
from ledger.config import Settings
from ledger.store import EditRecord, Store

log = logging.getLogger("daemon.batch")

ACTOR = "daemon"
# Stage names passed to `on_stage`, in order. Before "mid-write" a stop request abandons the batch.
STAGES = ("locked", "claimed", "materialised", "editing", "edited", "gated", "mid-write", "written", "published")
_ABANDONABLE = frozenset(STAGES[:STAGES.index("mid-write")])
SHIPPED_HYPERNETS = Path(__file__).resolve().parent.parent / "horse" / "hypernets"


class BatchAbandoned(Exception):
    """Raised inside the batch when a stop was requested at a stage boundary before the write."""


class NoHypernet(DaemonError):
    """No hypernet is configured or shipped for this model; train one (`horse-ledger hypernet train`) and set
    `hypernet` in the config."""


@dataclass
class BatchResult:
    """What one batch did. `status`: empty | published | rejected | failed | abandoned | dry-run."""

    status: str
    batch_id: int | None = None
    snapshot_id: int | None = None
    parent_snapshot_id: int | None = None
    applied: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    snapshot_path: str | None = None
    snapshot_bytes: int | None = None
    consolidation: dict[str, Any] | None = None  # when the policy folded the chain after this batch
    returned: dict[int, str] = field(default_factory=dict)  # undecided by the gate: back to pending (routed)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["failed"] = {str(k): v for k, v in self.failed.items()}
        out["rejected"] = {str(k): v for k, v in self.rejected.items()}
        out["returned"] = {str(k): v for k, v in self.returned.items()}
        return out


def hypernet_path(settings: Settings) -> Path:
    """The hypernet checkpoint to use: `settings.hypernet`, else the one shipped for the model."""
    from daemon.locks import model_slug

    if settings.hypernet:
        path = Path(settings.hypernet).expanduser()
        if not path.is_file():
            raise NoHypernet(f"hypernet {path} does not exist; fix `hypernet` in the config or train one with "
                             f"`horse-ledger hypernet train --model {settings.model} --out {path}`")
        return path
    # horse ships `horse/hypernets/<model>-<method>.safetensors` (see horse.evalcli.default_hypernet)
    candidates = [SHIPPED_HYPERNETS / f"{Path(settings.model).name}-horse.safetensors",
                  SHIPPED_HYPERNETS / f"{model_slug(settings.model)}.safetensors"]
    shipped = candidates[0]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise NoHypernet(f"no hypernet is configured and none is shipped for {settings.model} ({shipped}); train one "
                     f"with `horse-ledger hypernet train --model {settings.model} --out FILE` and set "
                     f"`hypernet = \"FILE\"` in the config")


def probe_for(settings: Settings, store: Store, retained: Sequence[gate.Fact], *, sample: bool = True) -> gate.Probe:
    """The gate's prompts: the canary set, every protected fact, and the retained edits (sampled, or all)."""
    return gate.Probe(
        canary_prompts=gate.load_canary(settings.gate_canary_file or None),
        protected=tuple(gate.Fact(key=p.id, prompt=p.rendered_prompt, answer=p.target) for p in store.list_protected()),
        retained=(gate.sample_retained(retained, limit=settings.gate_retention_sample) if sample
                  else tuple(retained)),
        generation_sample=settings.gate_generation_sample)


def _measured_meta(settings: Settings, snapshot_sha256: str | None = None) -> dict[str, str]:
    """What a kept gate measurement depends on besides the weights (the snapshot, when given): the model, its
    dtype and device, the scope it was served with."""
    from daemon.materialise import resolve_device

    meta = {"model": settings.model, "dtype": settings.dtype, "device": str(resolve_device(settings.device)).split(":")[0],
            "scope": settings.scope}
    return meta if snapshot_sha256 is None else {"snapshot_sha256": snapshot_sha256, **meta}


def keep_measurements(settings: Settings, base_model: str, snapshot_id: int, snapshot_sha256: str,
                      known: gate.Known) -> None:
    """Keep what the gate measured on a snapshot's weights beside it: the next night's head is that snapshot,
    and measures only what the kept values lack (derived data: losing it costs the next night a measurement)."""
    try:
        snapshots.write_derived_cache(settings.snapshot_dir, base_model, snapshot_id, known.to_tensors(),
                                      _measured_meta(settings, snapshot_sha256), folder=snapshots.MEASURED_DIR)
    except OSError:
        log.warning("could not keep the gate measurements of snapshot %d", snapshot_id, exc_info=True)


def kept_measurements(settings: Settings, base_model: str, snapshot_id: int | None,
                      snapshot_sha256: str) -> gate.Known | None:
    """The measurements `keep_measurements` kept for this snapshot, model, dtype and device, or None."""
    if snapshot_id is None:
        return None
    kept = snapshots.read_derived_cache(settings.snapshot_dir, base_model, snapshot_id, folder=snapshots.MEASURED_DIR)
    if kept is None or any(kept[1].get(k) != v for k, v in _measured_meta(settings, snapshot_sha256).items()):
        return None
    try:
        return gate.Known.from_tensors(kept[0])
    except (KeyError, ValueError, RuntimeError):
        return None


def load_editor(settings: Settings, path: Path, model, tokenizer):
    """The configured hypernet editor for the unedited base `model`, with its preservation prior and
    `hypernet_from_base` (config)."""
    from horse.editor import Editor

    editor = Editor.from_checkpoint(path, model)
    editor.from_base = settings.hypernet_from_base
    if settings.preserve_weight:  # statistics of the base model's inputs, cached after the first night
        from horse.covariance import preservation_moments

        moments, _ = preservation_moments(model, tokenizer, editor.module_names, cache_dir=settings.cache_dir)
        editor.set_preservation(moments, settings.preserve_weight, settings.preserve_exponent, settings.preserve_min)
    return editor


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = snapshots.hash_file(path)
    return _FILE_DIGESTS[key]


class Heartbeat:
    """Refreshes the batch's claim every `every_s` seconds from a background thread while the batch runs."""

    def __init__(self, store: Store, token: str, every_s: float) -> None:
        self.store, self.token, self.every_s = store, token, max(0.05, float(every_s))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="horse-ledger-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.store.heartbeat(self.token)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the stale sweep is the backstop
                log.warning("heartbeat failed; retrying", exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def to_request(edit: EditRecord):
    """The engine's EditRequest for a ledger edit."""
    from horse.types import EditRequest

    return EditRequest(prompt=edit.rendered_prompt, target=edit.target_new, subject=edit.subject,
                       target_true=edit.target_true, rephrases=tuple(edit.paraphrases), case_id=str(edit.id))


def to_fact(edit: EditRecord) -> gate.Fact:
    return gate.Fact(key=edit.id, prompt=edit.rendered_prompt, answer=edit.target_new,
                     paraphrases=tuple(edit.paraphrases))


def enter_stage(name: str, t0: float, on_stage: Callable[[str], None] | None,
                stop: threading.Event | None) -> None:
    """A night reaches stage `name`: log it, call the test hook, and abandon (BatchAbandoned) when a stop was
    requested before the write."""
    assert name in STAGES, name
    log.info("stage %s", name, extra={"stage": name, "elapsed_s": round(time.perf_counter() - t0, 3)})
    if on_stage is not None:
        on_stage(name)
    if stop is not None and stop.is_set() and name in _ABANDONABLE:
        raise BatchAbandoned(f"stop requested at stage {name}")


def add_time(timings: dict[str, float], key: str, start: float) -> float:
    """Add the seconds since `start` to timings[key]; returns now (the next stage's start)."""
    now = time.perf_counter()
    timings[key] = timings.get(key, 0.0) + (now - start)
    return now
