"""Engine errors. Each message says what happened and what to do next."""
from __future__ import annotations


class EngineError(Exception):
    """The editing engine refused the request."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class CheckpointMismatch(EngineError):
    """The hypernet checkpoint was trained for another model; train one for this model or pass --force."""


class BadCheckpoint(EngineError):
    """The hypernet checkpoint cannot be read; re-download or retrain it."""


class ModelNotFound(EngineError):
    """The model cannot be found; give a built-in name (tiny-gpt2, tiny-llama, smollm2-135m) or a model dir."""


class NonFiniteDelta(EngineError):
    """A weight delta holds NaN or Inf; the batch is refused and nothing was written."""


class NonFiniteCapture(EngineError):
    """A captured key or output gradient holds NaN or Inf; it was kept out of the hypernet's normaliser. Check the
    model's weights (`horse-ledger verify`) and the request's text."""


class CovarianceNotCached(EngineError):
    """MEMIT's covariance statistics for the base model are not cached and the model given is not the base; compute
    them on the base model first."""
