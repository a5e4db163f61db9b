"""The gate's rules on hand-made measurements (no model): generated retention and its sample."""
from __future__ import annotations

import torch

from daemon.gate import Fact, Measurement, Probe, judge
from ledger.config import load_settings


def _measure(acc: list[float], gen: list[bool]) -> Measurement:
    return Measurement(canary_next_ids=torch.zeros(0, dtype=torch.long), protected_acc=torch.zeros(0),
                       protected_logprob=torch.zeros(0), retained_acc=torch.tensor(acc, dtype=torch.float),
                       retained_gen=torch.tensor(gen, dtype=torch.bool))


def test_generation_sample_is_a_stable_sample_of_the_retained_edits():
    facts = tuple(Fact(key=i, prompt=f"p{i}", answer="a") for i in range(10))
    four = Probe((), retained=facts, generation_sample=4).generated
    assert len(four) == 4 and list(four) == sorted(four, key=lambda f: f.key) and set(four) <= set(facts)
    assert four == Probe((), retained=facts, generation_sample=4).generated
    grown = Probe((), retained=facts + tuple(Fact(key=i, prompt=f"p{i}", answer="a") for i in range(10, 20)),
                  generation_sample=4).generated
    assert {f.key for f in grown} <= {f.key for f in four} | set(range(10, 20))
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


def test_the_retention_sample_is_configured_and_stable_as_the_ledger_grows(db_url, tmp_path):
    from daemon.cycle import probe_for
    from ledger.store import Store

    facts = [Fact(key=i, prompt=f"p{i}", answer="a") for i in range(50)]
    settings = load_settings(environ={"HOME": str(tmp_path)}, gate_retention_sample=7)
    store = Store(db_url)
    probe = probe_for(settings, store, facts)
    assert len(probe.retained) == 7 and probe.retained == probe_for(settings, store, facts).retained
    assert [f.key for f in probe.retained] == sorted(f.key for f in probe.retained)
    assert len(probe_for(settings, store, facts, sample=False).retained) == 50
    # a night later, ten more edits: a sampled edit leaves only for a newcomer
    grown = probe_for(settings, store, facts + [Fact(key=i, prompt=f"p{i}", answer="a") for i in range(50, 60)])
    assert {f.key for f in grown.retained} <= {f.key for f in probe.retained} | set(range(50, 60))
    store.close()


def test_measure_reuses_known_values_and_measures_the_rest():
    """On a real tiny model: measurements kept from the same state (through their safetensors form) fill the
    probe, only what they lack is measured, and the result equals a full measurement."""
    from daemon.gate import Known, measure
    from horse.zoo import load_model

    model, tok = load_model("tiny-llama", progress=False)
    facts = tuple(Fact(key=i, prompt=f"The capital of country {i} is", answer=f"city {i}") for i in range(6))
    protected = (Fact(key=100, prompt="Water freezes at", answer="zero degrees"),)
    probe = Probe(("Hello, my name is", "The sky is"), protected=protected, retained=facts[:4], generation_sample=2)
    full = measure(model, tok, probe)
    assert full.reused == 0
    kept = Known.from_tensors(Known().add(probe, full).to_tensors())
    later = Probe(probe.canary_prompts, protected=protected, retained=facts[2:], generation_sample=2)
    again = measure(model, tok, later, known=kept)
    fresh = measure(model, tok, later)
    # canary 2 + protected accuracy and log-prob 2 + retained edits 2 and 3 + edit 2's generation (the sample
    # is edits 0, 2 then 2, 4) = 7 kept values; edits 4 and 5 and edit 4's generation measured
    assert again.reused == 7
    for name in ("canary_next_ids", "protected_acc", "protected_logprob", "retained_acc", "retained_gen"):
        assert torch.allclose(getattr(again, name).float(), getattr(fresh, name).float(), atol=1e-5), name
    # a value kept for another state is what is used: the reuse is the caller's promise, so tamper to see it
    kept.acc = {k: 0.25 for k in kept.acc}
    assert measure(model, tok, later, known=kept).retained_acc[:2].tolist() == [0.25, 0.25]
