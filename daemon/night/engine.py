"""The engine a routed night uses, behind one Protocol: it turns groups of edit requests (one group per subject)
into one delta each, factored, from one batched capture.

    engine = load_subject_engine(settings, model, tokenizer)
    factors, timings = engine.subject_factors(model, tokenizer, groups)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from daemon.errors import DaemonError
from ledger.config import Settings
from ledger.store import EditRecord


class SubjectEngine(Protocol):
    """What a routed night needs from an engine."""

    fingerprint: str            # of the engine's file or settings (recorded on snapshots)
    base_fingerprint: str       # of the base weights it edits

    @property
    def module_names(self) -> list[str]: ...

    def subject_factors(self, model: Any, tokenizer: Any, groups: Sequence[Sequence[Any]]
                        ) -> tuple[list[dict[str, tuple[Any, Any]]], dict[str, float]]: ...


@dataclass
class HypernetSubjects:
    """HORSE / MALMEN (`horse.editor.Editor` with its preservation prior) solving each subject's group."""

    editor: Any
    fingerprint: str
    solve: str

    @property
    def base_fingerprint(self) -> str:
        return self.editor.fingerprint

    @property
    def module_names(self) -> list[str]:
        return self.editor.module_names

    def subject_factors(self, model, tokenizer, groups):
        from horse.subjects import subject_factors

        return subject_factors(self.editor, model, tokenizer, groups, solve=self.solve)


def load_subject_engine(settings: Settings, model, tokenizer) -> SubjectEngine:
    """The configured engine for routed nights (refuses engines that cannot solve per subject)."""
    from daemon.batch import file_fingerprint, hypernet_path, load_editor

    if settings.engine != "hypernet":
        raise DaemonError(f"scope = routed needs engine = hypernet (HORSE or MALMEN); engine = {settings.engine!r} "
                          "edits one joint delta — set scope = subject (or off) to use it")
    path = hypernet_path(settings)
    editor = load_editor(settings, path, model, tokenizer)
    return HypernetSubjects(editor, file_fingerprint(path), settings.route_solve)


def to_request(edit: EditRecord):
    """The engine's EditRequest for a ledger edit."""
    from horse.types import EditRequest

    return EditRequest(prompt=edit.rendered_prompt, target=edit.target_new, subject=edit.subject,
                       target_true=edit.target_true, rephrases=tuple(edit.paraphrases), case_id=str(edit.id))
