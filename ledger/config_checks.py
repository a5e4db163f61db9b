"""The allowed values of every setting, checked when `ledger.config.load_settings` builds Settings (not at 02:00).

    check_values({"batch_max_edits": 0})   # ConfigError: batch_max_edits = 0 is out of range; give ≥ 1 (edits)

One table per kind of rule: integer ranges, shares in [0, 1], non-negative or positive floats (never NaN or
infinite), enums, the device, the cron expression, and a cross-check of the claim intervals; then
`check_choices`: the engines, scope, route solve and review mode, and the fine-tune and review limits. Each message
names the field, the value and what is allowed. `ledger.config` is still the only reader of files and environment.
"""
from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Mapping

from ledger.errors import ConfigError

MAX_INT = 2**31 - 1  # every integer setting is compared with INTEGER columns or counts rows

INT_AT_LEAST = {  # name → least value (all ≤ MAX_INT)
    "batch_max_edits": 1, "max_attempts": 1, "claim_stale_after_s": 1, "heartbeat_every_s": 1,
    "finetune_epochs": 1, "gate_retention_sample": 1, "finetune_locality_prompts": 1,
    "misfire_grace_s": 0, "gate_generation_sample": 0, "gate_bisect_depth": 0, "consolidate_every_nights": 0,
    "consolidate_max_chain": 0, "same_subject_prompts": 0, "gate_max_measurements": 1, "gate_subject_text_tokens": 0,
}
SHARES = ("gate_min_efficacy", "gate_min_canary_agreement", "gate_max_protected_drop", "gate_min_retention",
          "gate_min_retention_generated", "consolidate_min_retention", "gate_min_same_subject")
FLOAT_AT_LEAST_0 = ("preserve_weight", "preserve_exponent", "preserve_min", "protect_earlier",
                    "finetune_locality_weight", "finetune_swap_weight", "finetune_rehearsal",
                    "finetune_preserve_weight", "gate_max_delta_norm", "gate_max_subject_perplexity")
FLOAT_ABOVE_0 = ("finetune_lr", "finetune_warm_lr")
ENUMS = {"dtype": ("float32", "bfloat16", "fp32", "bf16", "float16"), "log_json": ("auto", "true", "false")}
DEVICE = re.compile(r"^(cpu|auto|cuda|cuda:\d{1,3}|mps)$")
ENGINES = ("hypernet", "finetune", "memit")
SCOPES = ("off", "subject", "routed")
ROUTE_SOLVES = ("alone", "joint-share")
REVIEW_MODES = ("auto", "on", "off")


def check_values(values: Mapping[str, Any]) -> None:
    """Check the settings given so far (field name → coerced value); absent fields keep their defaults.

    Raises:
        ConfigError: the first value outside what its field allows.
    """
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} = {value} is not a finite number; give a number (see `python -m ledger.config`)")
    for name, low in INT_AT_LEAST.items():
        if name in values and not low <= values[name] <= MAX_INT:
            raise ConfigError(f"{name} = {values[name]} is out of range; give a whole number from {low} to {MAX_INT:,}")
    for name in SHARES:
        if name in values and not 0.0 <= values[name] <= 1.0:
            raise ConfigError(f"{name} = {values[name]} is out of range; give a share from 0 to 1")
    for name in FLOAT_AT_LEAST_0:
        if name in values and values[name] < 0:
            raise ConfigError(f"{name} = {values[name]} is negative; give a value ≥ 0")
    bar = values.get("gate_max_subject_perplexity", 0.0)
    if 0 < bar < 1:
        raise ConfigError(f"gate_max_subject_perplexity = {bar} would reject every edit; give 0 (off) or a ratio ≥ 1")
    for name in FLOAT_ABOVE_0:
        if name in values and values[name] <= 0:
            raise ConfigError(f"{name} = {values[name]} must be > 0; give a positive learning rate")
    for name, allowed in ENUMS.items():
        if name in values and str(values[name]).lower() not in allowed:
            raise ConfigError(f"{name} = {values[name]!r} is not known; give one of {', '.join(allowed)}")
    if "device" in values and not DEVICE.match(str(values["device"])):
        raise ConfigError(f"device = {values['device']!r} is not known; give cpu, auto, cuda, cuda:N (N a GPU "
                          "number, e.g. cuda:0) or mps")
    if "schedule_cron" in values:
        check_cron(values["schedule_cron"])
    stale = values.get("claim_stale_after_s", 3600)
    beat = values.get("heartbeat_every_s", 30)
    if beat >= stale:
        raise ConfigError(f"heartbeat_every_s = {beat} is not below claim_stale_after_s = {stale}: a running batch's "
                          "claim would go stale between heartbeats; give a heartbeat shorter than the stale limit")


def check_choices(values: Mapping[str, Any]) -> None:
    """After `check_values`: the engines, scope, route solve and review mode are known ones, and the fine-tune,
    retention-sample, preservation and review-limit settings are in range (absent fields keep their defaults).

    Raises:
        ConfigError: the first value outside what its field allows.
    """
    for name, empty_ok in (("engine", False), ("consolidate_engine", True)):
        value = values.get(name, "" if empty_ok else "hypernet")
        if value not in ENGINES and not (empty_ok and value == ""):
            raise ConfigError(f"{name} = {value!r} is not known; give one of {', '.join(ENGINES)}"
                              + (" (or leave it empty: the same as engine)" if empty_ok else ""))
    if values.get("scope", "routed") not in SCOPES:
        raise ConfigError(f"scope = {values['scope']!r} is not known; give one of {', '.join(SCOPES)}")
    if values.get("route_solve", "alone") not in ROUTE_SOLVES:
        raise ConfigError(f"route_solve = {values['route_solve']!r} is not known; give one of {', '.join(ROUTE_SOLVES)}")
    if values.get("gate_retention_sample", 1) < 1:
        raise ConfigError(f"gate_retention_sample = {values['gate_retention_sample']} must be ≥ 1 (edits measured)")
    lrs = (values.get("finetune_lr", 1.0), values.get("finetune_warm_lr", 1.0))
    if values.get("finetune_epochs", 1) < 1 or min(lrs) <= 0:
        raise ConfigError("finetune_epochs must be ≥ 1 and finetune_lr, finetune_warm_lr > 0; fix them in the config")
    parse_blocks(values.get("finetune_blocks", ""))
    if values.get("finetune_locality_prompts", 1) < 1:
        raise ConfigError(f"finetune_locality_prompts = {values['finetune_locality_prompts']} must be ≥ 1; give a "
                          "number of prompts (64 by default), or finetune_locality_weight = 0 to drop the term")
    for name in ("preserve_weight", "preserve_exponent", "preserve_min", "protect_earlier", "finetune_locality_weight",
                 "finetune_swap_weight", "finetune_rehearsal", "finetune_preserve_weight"):
        if values.get(name, 0.0) < 0:
            raise ConfigError(f"{name} = {values[name]} is negative; give a value ≥ 0")
    if values.get("review", "auto") not in REVIEW_MODES:
        raise ConfigError(f"review = {values['review']!r} is not known; give one of {', '.join(REVIEW_MODES)}")
    for name in ("review_max_edits_per_day", "review_max_edits_per_night"):
        if values.get(name, 0) < 0:
            raise ConfigError(f"{name} = {values[name]} is negative; give a number of edits, or 0 for no limit")


def check_cron(expression: str) -> None:
    """A standard 5-field crontab line (minute hour day month weekday) that fires at least once.

    Raises:
        ConfigError: malformed, out of range, or a date that never comes (e.g. "0 2 31 2 *").
    """
    hint = "give 5 fields, minute hour day month weekday (e.g. \"0 2 * * *\" for 02:00 every day)"
    if len(str(expression).split()) != 5:
        raise ConfigError(f"schedule_cron = {expression!r} has {len(str(expression).split())} fields; {hint}")
    try:
        from apscheduler.triggers.cron import CronTrigger
    except ImportError:  # the scheduler's own parser is the reference; without it, the field count must do
        return
    try:
        trigger = CronTrigger.from_crontab(expression, timezone="UTC")
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"schedule_cron = {expression!r} is not a valid cron expression ({exc}); {hint}") from None
    from datetime import timezone

    if trigger.get_next_fire_time(None, datetime.now(timezone.utc)) is None:
        raise ConfigError(f"schedule_cron = {expression!r} never fires; {hint}")


def masked_url(url: str) -> str:
    """`url` with any password replaced by *** (user:secret@host, ?password=secret): for printing and logs."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^/?#@:]*:)[^/?#]*@", r"\1***@", url)
    return re.sub(r"([?&](?:password|passwd|pwd)=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


def parse_blocks(text: str) -> tuple[int, int] | None:
    """`finetune_blocks`: "3-8" → (3, 8); "" → None (the last six).

    Raises:
        ConfigError: anything but FIRST-LAST with 0 ≤ FIRST ≤ LAST.
    """
    if not text:
        return None
    first, _, last = text.partition("-")
    if not (first.strip().isdigit() and last.strip().isdigit()) or int(first) > int(last):
        raise ConfigError(f"finetune_blocks = {text!r}: give FIRST-LAST block numbers, FIRST ≤ LAST (e.g. \"3-8\"), "
                          "or leave it empty for the last six")
    return int(first), int(last)
