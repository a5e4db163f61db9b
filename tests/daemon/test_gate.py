"""The gate's rules on hand-made measurements (no model): generated retention and its sample."""
from __future__ import annotations

import torch

from daemon.gate import Fact, Measurement, Probe, judge
from ledger.config import load_settings


def _measure(acc: list[float], gen: list[bool]) -> Measurement:
    return Measurement(canary_next_ids=torch.zeros(0, dtype=torch.long), protected_acc=torch.zeros(0),
                       protected_logprob=torch.zeros(0), retained_acc=torch.tensor(acc, dtype=torch.float),
                       retained_gen=torch.tensor(gen, dtype=torch.bool))


def test_generation_sample_is_evenly_spaced_over_the_retained_edits():
    facts = tuple(Fact(key=i, prompt=f"p{i}", answer="a") for i in range(10))
    assert [f.key for f in Probe((), retained=facts, generation_sample=4).generated] == [0, 2, 5, 7]
    assert len(Probe((), retained=facts, generation_sample=50).generated) == 10
    assert Probe((), retained=facts).generated == ()


def test_generated_retention_is_measured_and_can_be_required(tmp_path):
    facts = tuple(Fact(key=i, prompt=f"p{i}", answer="a") for i in range(4))
    probe = Probe((), retained=facts, generation_sample=4)
    head = _measure([1, 1, 1, 1], [True, True, True, False])
    cand = _measure([1, 1, 1, 1], [True, False, True, False])  # teacher forcing holds; generation lost edit 1
    record_only = judge(head, cand, probe, load_settings(environ={"HOME": str(tmp_path)}))
    assert record_only.passed and record_only.metrics["retention"] == 1.0
    assert abs(record_only.metrics["retention_generated"] - 2 / 3) < 1e-9
    assert record_only.metrics["retention_generated_abs"] == 0.5
    strict = judge(head, cand, probe, load_settings(environ={"HOME": str(tmp_path)}, gate_min_retention_generated=0.9))
    assert not strict.passed
    assert strict.reasons == ["generated retention 0.667 < 0.9: 1 earlier edits are no longer produced by greedy "
                              "decoding, ids [1]"]


def test_the_retention_sample_is_configured_and_fixed_per_head(db_url, tmp_path):
    from daemon.cycle import probe_for
    from ledger.store import Store

    facts = [Fact(key=i, prompt=f"p{i}", answer="a") for i in range(50)]
    settings = load_settings(environ={"HOME": str(tmp_path)}, gate_retention_sample=7)
    store = Store(db_url)
    probe = probe_for(settings, store, facts, seed=3)
    assert len(probe.retained) == 7 and probe.retained == probe_for(settings, store, facts, seed=3).retained
    assert len(probe_for(settings, store, facts, seed=3, sample=False).retained) == 50
    store.close()
