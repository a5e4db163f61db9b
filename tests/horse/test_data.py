"""horse/data.py: the three record formats, format detection, and errors that name the bad record."""
from __future__ import annotations

import json
import logging

import pytest

from horse.data import BadDataFile, detect_format, load_requests, requests_from_records
from horse.errors import EngineError

CF_FLAT = {
    "case_id": 2,
    "prompt": "Toko Yasuda, the",
    "target_new": "piano",
    "subject": "Toko Yasuda",
    "ground_truth": "guitar",
    "rephrase_prompt": "Toko Yasuda is incredible at",
    "locality_prompt": "John Lennon performs on the",
    "locality_ground_truth": "guitar",
}
ROME = {
    "case_id": 0,
    "requested_rewrite": {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "target_new": {"str": "English", "id": "Q1860"},
        "target_true": {"str": "French", "id": "Q150"},
        "subject": "Danielle Darrieux",
    },
    "paraphrase_prompts": ["Shayna does this and Yossel goes still. Danielle Darrieux is a native speaker of"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "Michel Rocard is a native speaker of"],
    "attribute_prompts": ["J.\u00a0R.\u00a0R. Tolkien is a native speaker of"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}


def write(tmp_path, records, name="f.json", lines=False):
    path = tmp_path / name
    if lines:
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return path


def test_counterfact_flat_edits_towards_target_new(tmp_path):
    (req,) = load_requests(write(tmp_path, [CF_FLAT]))
    assert req.target == "piano" and req.target_true == "guitar"  # never ground_truth as the target
    assert req.prompt == "Toko Yasuda, the" and req.subject == "Toko Yasuda"
    assert req.rephrases == ("Toko Yasuda is incredible at",)
    assert req.locality_prompt == "John Lennon performs on the" and req.locality_answer == "guitar"
    assert req.case_id == "2"


def test_rome_format(tmp_path):
    (req,) = load_requests(write(tmp_path, [ROME]))
    assert req.prompt == "The mother tongue of Danielle Darrieux is"
    assert req.target == "English" and req.target_true == "French"
    assert req.rephrases == tuple(ROME["paraphrase_prompts"])
    assert req.locality_prompt == "The mother tongue of Léon Blum is" and req.locality_answer == "French"


def test_zsre_format_keeps_the_reference_locality_prompt(tmp_path):
    (req,) = load_requests(write(tmp_path, [ZSRE], lines=True, name="z.jsonl"))
    assert req.prompt == ZSRE["src"] and req.target == "unmanned aircraft" and req.target_true == "uniform"
    assert req.rephrases == (ZSRE["rephrase"],)
    assert req.locality_prompt == "nq question: john goodman's character in the big lebowski?"
    assert req.locality_answer == "Walter Sobchak"
    assert req.case_id == "0"


def test_detect_format():
    assert detect_format(CF_FLAT) == "counterfact"
    assert detect_format(ROME) == "rome"
    assert detect_format(ZSRE) == "zsre"
    with pytest.raises(BadDataFile, match="neither"):
        detect_format({"question": "q", "answer": "a"})


def test_bad_record_is_named(tmp_path):
    broken = dict(CF_FLAT, case_id=77)
    del broken["target_new"]
    path = write(tmp_path, [CF_FLAT, broken])
    with pytest.raises(BadDataFile, match=r"record 1 \(case 77\).*target_new"):
        load_requests(path)
    assert issubclass(BadDataFile, EngineError)


def test_empty_target_is_skipped_or_refused(caplog):
    empty = dict(ZSRE, alt="")
    with caplog.at_level(logging.WARNING):
        reqs = requests_from_records([ZSRE, empty, ZSRE])
    assert len(reqs) == 2 and "skipped 1" in caplog.text
    with pytest.raises(BadDataFile, match="record 1"):
        requests_from_records([ZSRE, empty], skip_empty=False)


def test_unreadable_files(tmp_path):
    with pytest.raises(BadDataFile, match="cannot read"):
        load_requests(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[{not json")
    with pytest.raises(BadDataFile, match="not JSON"):
        load_requests(bad)
    empty = write(tmp_path, [], name="empty.json")
    with pytest.raises(BadDataFile, match="no records"):
        load_requests(empty)


def test_limit(tmp_path):
    assert len(load_requests(write(tmp_path, [CF_FLAT] * 5), limit=3)) == 3
