"""Plain data types shared by the whole engine.

`EditRequest` is what the engine edits: a rendered prompt (the subject already in it) and the new answer.
The ledger turns its stored edits into these; the data loaders turn CounterFact / zsRE records into these.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model.

    Attributes:
        prompt: the rendered prompt, e.g. "The mother tongue of Danielle Darrieux is".
        target: the new answer without a leading space, e.g. "English".
        subject: the subject as it appears in the prompt (MEMIT needs it; the hypernet does not).
        target_true: the answer being replaced, when known (probability metrics compare against it).
        rephrases: paraphrases of the prompt that should give the same new answer.
        locality_prompt / locality_answer: an unrelated prompt and its answer, which must not change.
        case_id: where the request came from (a ledger edit id, a CounterFact case id).
    """

    prompt: str
    target: str
    subject: str = ""
    target_true: str | None = None
    rephrases: tuple[str, ...] = field(default_factory=tuple)
    locality_prompt: str | None = None
    locality_answer: str | None = None
    case_id: str | None = None
