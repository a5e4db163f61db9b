"""Every engine the joint night loads answers `daemon.engines.JointEngine`'s members itself (no `hasattr` probing in
the night): built on a real tiny model, each has every attribute and method, and the flags the night branches on
are plain booleans with the values each engine supports."""
from __future__ import annotations

import inspect

import pytest

from daemon.engines import JointEngine
from horse.editor import Editor
from horse.finetune import FinetuneConfig, FineTuner
from horse.memit import MemitEditor
from horse.zoo import build_tiny_model

FLAGS = ("from_base", "sums_supported", "protects_keys", "carries_normaliser")


def protocol_members() -> set[str]:
    members = set(JointEngine.__annotations__)
    members |= {n for n, v in vars(JointEngine).items() if not n.startswith("_") and (callable(v) or
                                                                                      isinstance(v, property))}
    return members


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    model, tok = build_tiny_model("tiny-llama")
    return {"hypernet": Editor.new(model), "finetune": FineTuner.new(model, FinetuneConfig()),
            "memit": MemitEditor(model, cache_dir=tmp_path_factory.mktemp("memit-cache"))}


def test_protocol_lists_what_the_night_uses():
    assert {"kind", "fingerprint", "module_names", "compute_deltas", "card", *FLAGS} <= protocol_members()


@pytest.mark.parametrize("kind", ["hypernet", "finetune", "memit"])
def test_each_engine_has_every_member(engines, kind):
    engine = engines[kind]
    for name in protocol_members():
        assert hasattr(engine, name), f"{type(engine).__name__} lacks JointEngine.{name}"
    assert engine.kind == kind
    for flag in FLAGS:
        assert isinstance(getattr(engine, flag), bool), flag
    params = [p for p in inspect.signature(engine.compute_deltas).parameters.values() if p.default is p.empty]
    assert len(params) == 3, "compute_deltas(model, tokenizer, requests)"


def test_flags_match_what_each_engine_supports(engines):
    hyper, tuner, memit = engines["hypernet"], engines["finetune"], engines["memit"]
    assert (hyper.protects_keys, hyper.carries_normaliser, hyper.from_base) == (True, True, False)
    assert tuner.from_base and not (tuner.protects_keys or tuner.carries_normaliser or tuner.sums_supported)
    assert not (memit.from_base or memit.protects_keys or memit.carries_normaliser or memit.sums_supported)
    hyper.from_base = True  # `hypernet_from_base` (config) sets it per night
    assert hyper.from_base is True
