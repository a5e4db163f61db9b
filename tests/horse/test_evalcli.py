"""horse/evalcli.py: the eval command on a tiny model end to end, and its refusals."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from horse.evalcli import default_hypernet, eval_cmd, model as model_group

RECORDS = [
    {"case_id": i, "prompt": f"Item {i} is made in", "target_new": "Rome", "subject": f"Item {i}",
     "ground_truth": "Oslo", "rephrase_prompt": f"Item {i} comes from", "locality_prompt": "Bread is made in",
     "locality_ground_truth": "Paris"}
    for i in range(5)
]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(RECORDS))
    return path


def test_eval_none_scores_the_unedited_model(data_file):
    result = CliRunner().invoke(eval_cmd, ["--data", str(data_file), "--model", "tiny-llama", "--method", "none",
                                           "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["n_requests"] == 5 and "edited" not in report
    assert 0.0 <= report["unedited"]["cf_es"] <= 1.0 and report["unedited"]["n_es"] == 5


def test_eval_horse_edits_in_batches_and_restores(data_file, tmp_path):
    from horse.editor import Editor
    from horse.hypernet import HyperConfig
    from horse.zoo import load_model

    model, _ = load_model("tiny-llama")
    ckpt = Editor.new(model, HyperConfig(rank=8, n_blocks=1, eta_init=1.0)).save(tmp_path / "h.safetensors")
    args = ["--data", str(data_file), "--model", "tiny-llama", "--hypernet", str(ckpt), "--n-edits", "2",
            "--json", "--generation"]
    result = CliRunner().invoke(eval_cmd, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["n_batches"] == 3 and len(report["edit_time_s"]["per_batch"]) == 3
    assert report["edited"]["n_requests"] == 5
    assert "gen_es" in report["edited"] and "capture" in report["edit_time_s"]["stages_median"]
    assert report["delta_frobenius_sum_median"] > 0
    # the edited scores differ from the unedited ones (the deltas were applied) …
    assert report["edited"]["cf_es_mag"] != report["unedited"]["cf_es_mag"]
    # … and the table form prints both columns
    table = CliRunner().invoke(eval_cmd, args[:-2])
    assert table.exit_code == 0, table.output
    assert "unedited" in table.output and "edited" in table.output and "edit time per batch" in table.output


def test_missing_hypernet_is_a_clear_engine_error(data_file):
    from horse.errors import EngineError

    result = CliRunner().invoke(eval_cmd, ["--data", str(data_file), "--model", "tiny-gpt2", "--method", "malmen"])
    assert isinstance(result.exception, EngineError)
    assert "hypernet train" in str(result.exception)
    assert default_hypernet("tiny-gpt2", "malmen").name == "tiny-gpt2-malmen.safetensors"


def test_eval_memit_records_its_covariance_corpus(data_file, tmp_path):
    args = ["--data", str(data_file), "--model", "tiny-llama", "--method", "memit", "--limit", "2",
            "--cache-dir", str(tmp_path / "cache"), "--json"]
    result = CliRunner().invoke(eval_cmd, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["method_info_per_batch"][0]["cov_n_tokens"] > 0
    assert set(report["edit_time_s"]["stages_median"]) <= {"covariance", "z", "keys", "solve", "total"}


def test_bad_method_is_a_usage_error(data_file):
    result = CliRunner().invoke(eval_cmd, ["--data", str(data_file), "--method", "rome"])
    assert result.exit_code == 2


def test_model_group_lists_prepare():
    result = CliRunner().invoke(model_group, ["--help"])
    assert result.exit_code == 0 and "prepare" in result.output
