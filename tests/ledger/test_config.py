"""ledger/config.py: defaults < TOML < env < flags, XDG paths, units and help on every field, clear errors."""
from __future__ import annotations

from dataclasses import FrozenInstanceError, fields

import pytest

from ledger.config import Settings, env_var, load_settings
from ledger.errors import ConfigError


def test_defaults_follow_xdg(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    s = load_settings(environ=env)
    assert s.db_url == f"sqlite:///{tmp_path}/data/horse-ledger/ledger.db"
    assert s.db_path == tmp_path / "data" / "horse-ledger" / "ledger.db"
    assert s.snapshot_dir == str(tmp_path / "data" / "horse-ledger" / "snapshots")
    assert s.cache_dir == str(tmp_path / "cache" / "horse-ledger")
    assert (s.model, s.device, s.dtype, s.batch_max_edits, s.max_attempts) == ("smollm2-135m", "cpu", "float32", 100, 3)
    assert (s.claim_stale_after_s, s.heartbeat_every_s, s.schedule_cron, s.misfire_grace_s) == (3600, 30, "0 2 * * *", 3600)
    assert (s.gate_min_efficacy, s.gate_min_canary_agreement, s.gate_max_protected_drop, s.gate_min_retention,
            s.gate_bisect_depth, s.gate_max_delta_norm) == (0.5, 0.95, 0.0, 0.9, 4, 0.0)
    assert (s.consolidate_every_nights, s.consolidate_max_chain, s.consolidate_min_retention, s.log_json) == (0, 0, 0.0, "auto")


def test_precedence_toml_env_flags(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('batch_max_edits = 10\nmodel = "tiny-gpt2"\ngate_min_retention = 0.8\n'
                   'db_url = "sqlite:///from-toml.db"\n')
    env = {"HOME": str(tmp_path), "HORSE_LEDGER_CONFIG": str(cfg), "HORSE_LEDGER_BATCH_MAX_EDITS": "20",
           "HORSE_LEDGER_DB": "sqlite:///from-env.db"}
    s = load_settings(environ=env)
    assert (s.batch_max_edits, s.model, s.gate_min_retention, s.db_url) == (20, "tiny-gpt2", 0.8, "sqlite:///from-env.db")
    s = load_settings(db_url="sqlite:///from-flag.db", environ=env, batch_max_edits=5)
    assert (s.db_url, s.batch_max_edits) == ("sqlite:///from-flag.db", 5)
    # the XDG default file is read when it exists; a [horse-ledger] table works too
    xdg = tmp_path / "xdg"
    (xdg / "horse-ledger").mkdir(parents=True)
    (xdg / "horse-ledger" / "config.toml").write_text('[horse-ledger]\ndevice = "cuda:0"\n')
    assert load_settings(environ={"XDG_CONFIG_HOME": str(xdg), "HOME": str(tmp_path)}).device == "cuda:0"


@pytest.mark.parametrize(("content", "message"), [
    ("batch_max_edits = 'lots'", "batch_max_edits = 'lots' is not a valid int"),
    ("batch_max_edit = 3", "unknown key 'batch_max_edit'"),
    ("model = [1, 2]", "is not a valid str"),
    ("model = ", "cannot be read"),
    ("preserve_weight = -1.0", "preserve_weight = -1.0 is negative"),
    ("preserve_exponent = -2.0", "preserve_exponent = -2.0 is negative"),
    ("engine = 'rome'", "engine = 'rome' is not known; give one of hypernet, finetune, memit"),
    ("scope = 'everything'", "scope = 'everything' is not known; give one of off, subject"),
    ("finetune_epochs = 0", "finetune_epochs = 0 is out of range; give a whole number from 1"),
    ("finetune_warm_lr = 0.0", "finetune_warm_lr = 0.0 must be > 0"),
    ("finetune_locality_weight = -1.0", "finetune_locality_weight = -1.0 is negative"),
    ("finetune_rehearsal = -0.5", "finetune_rehearsal = -0.5 is negative"),
    ("finetune_preserve_weight = -1.0", "finetune_preserve_weight = -1.0 is negative"),
    ("running_normaliser = true", "running_normaliser acts on nights that edit the head"),
    ("gate_retention_sample = 0", "gate_retention_sample = 0 is out of range; give a whole number from 1"),
    ("finetune_blocks = '8-3'", "finetune_blocks = '8-3': give FIRST-LAST block numbers, FIRST ≤ LAST"),
    ("finetune_blocks = 'mid'", "finetune_blocks = 'mid': give FIRST-LAST"),
    ("finetune_locality_prompts = 0", "finetune_locality_prompts = 0 is out of range; give a whole number from 1"),
    ("protect_earlier = 1.0", "Set hypernet_from_base = false, or drop protect_earlier"),
    ("consolidate_engine = 'rome'", "consolidate_engine = 'rome' is not known; give one of hypernet, finetune, "
                                    "memit \\(or leave it empty"),
    ("consolidate_engine = 'finetune'", "would be undone the next night.*Set hypernet_from_base = false"),
    ("hypernet_from_consolidation = true", "both set.*Set hypernet_from_base = false"),
    ("hypernet_from_consolidation = true\nengine = 'finetune'", "acts on hypernet nights, not engine = 'finetune'"),
    ("hypernet_from_consolidation = true\nhypernet_from_base = false\nrunning_normaliser = true",
     "Drop running_normaliser, or set hypernet_from_consolidation = false"),
])
def test_bad_config_file(tmp_path, content, message):
    cfg = tmp_path / "c.toml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(cfg, environ={"HOME": str(tmp_path)})


def test_bad_env_value_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="environment variable HORSE_LEDGER_GATE_MIN_EFFICACY"):
        load_settings(environ={"HOME": str(tmp_path), "HORSE_LEDGER_GATE_MIN_EFFICACY": "high"})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={"HOME": str(tmp_path)})


def test_every_field_has_unit_help_and_env_and_settings_are_frozen(tmp_path):
    s = load_settings(environ={"HOME": str(tmp_path)})
    for f in fields(Settings):
        assert f.metadata["unit"] and f.metadata["help"], f.name
    assert env_var("db_url") == "HORSE_LEDGER_DB" and env_var("max_attempts") == "HORSE_LEDGER_MAX_ATTEMPTS"
    assert {row["name"] for row in s.describe()} == {f.name for f in fields(Settings)}
    with pytest.raises(FrozenInstanceError):
        s.model = "x"  # type: ignore[misc]


def test_only_config_reads_the_environment():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "ledger"
    offenders = [p.name for p in root.glob("*.py") if p.name != "config.py" and "os.environ" in p.read_text()]
    assert offenders == []
