"""The one place that reads configuration: `Settings`, built once by `load_settings()`.

Precedence, lowest first: defaults < TOML file < `HORSE_LEDGER_*` environment variables < CLI flags.
The TOML file is `--config FILE`, else `$HORSE_LEDGER_CONFIG`, else
`$XDG_CONFIG_HOME/horse-ledger/config.toml` when it exists. Keys in the file are the field names below
(flat, or under a `[horse-ledger]` table); each field's env var is `HORSE_LEDGER_<FIELD>` except
`db_url`, which is `HORSE_LEDGER_DB`. Nothing else in the project reads `os.environ`.

Print every field with its unit and help: `python -m ledger.config`.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from ledger.config_checks import check_choices, check_values, masked_url
from ledger.config_checks import ENGINES, REVIEW_MODES, ROUTE_SOLVES, SCOPES, parse_blocks  # noqa: F401 - re-exported
from ledger.errors import ConfigError

APP_NAME = "horse-ledger"
ENV_PREFIX = "HORSE_LEDGER_"
ENV_CONFIG = "HORSE_LEDGER_CONFIG"
ENV_DB = "HORSE_LEDGER_DB"


def _opt(default: Any, unit: str, help: str, env: str | None = None) -> Any:
    return field(default=default, metadata={"unit": unit, "help": help, "env": env})


def _xdg(var: str, fallback: str, environ: Mapping[str, str]) -> Path:
    value = environ.get(var, "")
    return Path(value) if value else Path.home() / fallback


@dataclass(frozen=True)
class Settings:
    """Every knob of horse-ledger, with its unit. Build with `load_settings()`; never mutate."""

    # storage. Empty path defaults are filled from the XDG base directories by load_settings().
    db_url: str = _opt("", "SQLAlchemy URL",
                       "database; default sqlite:///$XDG_DATA_HOME/horse-ledger/ledger.db", env=ENV_DB)
    data_dir: str = _opt("", "path", "where the ledger keeps its files; default $XDG_DATA_HOME/horse-ledger")
    snapshot_dir: str = _opt("", "path", "weight-delta snapshot files; default <data_dir>/snapshots")
    cache_dir: str = _opt("", "path", "downloaded / converted models; default $XDG_CACHE_HOME/horse-ledger")
    file_mode_group: bool = _opt(False, "true|false", "files the ledger creates (SQLite database, snapshots, caches, "
                                 "measurements, exports, config from `init`): false = private to the user who runs "
                                 "it (files 0600, directories 0700); true = shared with the owner's group as well "
                                 "(0660 / 0770: give the service and its operators one group)")
    # engine
    model: str = _opt("smollm2-135m", "name or dir", "base model to edit (tiny-gpt2, tiny-llama, smollm2-135m, or a dir)")
    engine: str = _opt("hypernet", "hypernet|finetune|memit",
                       "how the daemon edits: hypernet = HORSE / MALMEN (the `hypernet` file); finetune = "
                       "fine-tune-the-ledger, every night from the base on all applied edits (the slow, strong "
                       "baseline); memit = MEMIT on the head (covariance from local text, cached)")
    hypernet: str = _opt("", "path", "hypernet checkpoint; empty = the one shipped for the model")
    finetune_epochs: int = _opt(5, "epochs", "engine = finetune: passes over all applied edits per night, at most")
    finetune_lr: float = _opt(3e-3, "Adam lr", "engine = finetune: learning rate of the target modules")
    finetune_locality_weight: float = _opt(1.0, "≥ 0", "engine = finetune: weight of the KL to the base model's "
                                           "next-token distribution on unrelated local prompts")
    finetune_swap_weight: float = _opt(1.0, "≥ 0", "engine = finetune (and fine-tune folds): weight of the KL to "
                                       "the base model on each edit's prompt asked of another edit's subject (the "
                                       "same relation of a subject the edit must leave alone); 0 = off")
    finetune_swap_resample: bool = _opt(False, "true|false", "engine = finetune (and fine-tune folds): a new partner "
                                        "subject per edit each epoch for the swap term (each edit is kept apart from "
                                        "more subjects over the epochs); false = one fixed partner per edit")
    finetune_locality_prompts: int = _opt(64, "prompts", "engine = finetune (and fine-tune folds): unrelated local "
                                          "prompts the locality term keeps (never the gate's canary prompts), 16 a "
                                          "step below 256, 32 from 256")
    finetune_blocks: str = _opt("", "FIRST-LAST", "engine = finetune (and fine-tune folds): the blocks whose MLP "
                                "output linears are fine-tuned, e.g. 3-8 (the mid blocks, where a fact sits at its "
                                "subject: far less damage to unrelated text, slower); empty = the last six, the "
                                "modules HORSE edits")
    finetune_warm_start: bool = _opt(True, "true|false", "fine-tune folds: start from the newest fine-tune fold's "
                                     "weights and train only the carried edits they do not recall, plus "
                                     "`finetune_rehearsal` recalled ones per such edit (the locality terms still "
                                     "compare with the base): a fold's cost follows the edits since the last fold, "
                                     "not the whole ledger; false = every fold fine-tunes all carried edits from "
                                     "the base")
    finetune_rehearsal: float = _opt(1.0, "≥ 0", "finetune_warm_start: recalled edits trained again per edit not "
                                     "recalled")
    finetune_warm_lr: float = _opt(1e-3, "Adam lr", "finetune_warm_start: learning rate of a fold that starts from "
                                   "the previous one (lower than finetune_lr: what it does not train drifts less)")
    finetune_preserve_weight: float = _opt(0.0, "≥ 0", "engine = finetune (and fine-tune folds): weight of the change "
                                           "of the fine-tuned layers' outputs on local text (tr(ΔᵀCΔ) relative to "
                                           "the layer's output, C: the second moments the preservation prior uses); "
                                           "0 = off; larger = less change to unrelated text, edits take less")
    device: str = _opt("cpu", "cpu|cuda:N|auto", "where the model runs; auto = cuda:0, or every GPU through "
                       "accelerate's device_map when there are several (models larger than one GPU), else cpu")
    dtype: str = _opt("float32", "float32|bfloat16", "weight dtype of the served model")
    preserve_weight: float = _opt(10000.0, "μ(1) ≥ 0", "preservation prior μ(N)·C in the hypernet's ridge solve, "
                                  "μ(N) = preserve_weight / N^preserve_exponent for a batch of N edits (C: second "
                                  "moments of the edited layers' inputs on local text); 0 = off. Keeps small batches "
                                  "(bisection) from moving unrelated prompts")
    preserve_exponent: float = _opt(2.0, "≥ 0", "how fast the preservation weight falls with the batch size")
    preserve_min: float = _opt(10.0, "≥ 0", "the least preservation weight μ for any batch size: μ(N) = max("
                               "preserve_weight / N^preserve_exponent, preserve_min); keeps a consolidation of many "
                               "nights (N in the thousands) from wrecking unrelated text")
    protect_earlier: float = _opt(0.0, "ν ≥ 0", "hypernet engines: weight ν of the prior ν·KₑᵀKₑ in each night's "
                                  "ridge solve on the keys of the edits the head already carries (the gate's retention "
                                  "sample of them, captured at the head; with hypernet_from_consolidation every edit "
                                  "of the newest fold, captured once at its weights and kept beside it), so that a "
                                  "night overwrites less of the earlier ones; 0 = off")
    hypernet_from_base: bool = _opt(True, "true|false", "hypernet engines: derive every night's snapshot from "
                                    "the base model by one edit of every applied edit plus the new ones (a "
                                    "consolidation each night, kind `consolidated`), solved from additive statistics "
                                    "cached beside the head, so a night captures only its own edits and the "
                                    "hypernet only ever edits the model it was trained on; false = each night edits "
                                    "the head (incremental: the hypernet then edits a model that carries its own "
                                    "earlier deltas, which it was not trained on)")
    hypernet_from_consolidation: bool = _opt(False, "true|false", "hypernet engines with hypernet_from_base = "
                                             "false: derive every night from the newest consolidated snapshot on the "
                                             "head's chain (the base before the first one) by one edit of every edit "
                                             "applied since it plus the new ones, so that nights never stack on each "
                                             "other's deltas; protect_earlier then protects that snapshot's edits. "
                                             "With consolidate_engine = finetune: fine-tune folds, each night one "
                                             "HORSE edit of the fold")
    running_normaliser: bool = _opt(False, "true|false", "hypernet engines: merge each night's inputs into the "
                                    "hypernet's input normaliser and carry the statistics to the next night (saved "
                                    "beside each snapshot); false = the frozen training-time statistics")
    # daemon: batches and claims
    batch_max_edits: int = _opt(100, "edits", "most edits the daemon claims into one batch")
    max_attempts: int = _opt(3, "attempts", "a failed edit is retried until it has been tried this often")
    claim_stale_after_s: int = _opt(3600, "s", "a claim with no heartbeat for this long goes back to pending")
    heartbeat_every_s: int = _opt(30, "s", "how often a running batch refreshes its claim")
    # daemon: schedule
    schedule_cron: str = _opt("0 2 * * *", "cron (5 fields, local time)", "when the nightly batch runs")
    misfire_grace_s: int = _opt(3600, "s", "a run missed by at most this much still starts")
    # gate: checks a new snapshot must pass before it is published
    gate_min_efficacy: float = _opt(0.5, "share 0..1", "per-edit token accuracy on its own prompt, at least")
    gate_min_canary_agreement: float = _opt(0.95, "share 0..1",
                                            "greedy next tokens on canary prompts that must not change")
    gate_max_protected_drop: float = _opt(0.0, "share 0..1", "share of protected facts allowed to flip")
    gate_min_retention: float = _opt(0.9, "share 0..1", "earlier applied edits that must still hold")
    gate_retention_sample: int = _opt(500, "edits", "earlier applied edits the gate measures each night (a fixed "
                                      "random sample when there are more, stable as the ledger grows: retention "
                                      "within about ±3 points at 95 %): bounds a night's cost as the ledger grows; "
                                      "`consolidate` and the benchmarks' checkpoints measure them all")
    gate_generation_sample: int = _opt(100, "edits", "retained edits (of the sample) also checked by greedy "
                                       "generation (what users see; slower than teacher forcing); 0 = off")
    gate_min_retention_generated: float = _opt(0.0, "share 0..1", "of the sampled earlier edits the head generates, "
                                               "the share the candidate must still generate; 0 = record only")
    gate_bisect_depth: int = _opt(4, "halvings", "how often a failing batch is split to find the bad edits")
    gate_canary_file: str = _opt("", "path", "canary prompts (JSONL); empty = the shipped sample")
    gate_max_delta_norm: float = _opt(0.0, "Frobenius norm", "largest allowed delta per layer; 0 = off")
    gate_prefix_cache: bool = _opt(True, "true|false", "keep what enters the edited blocks for the texts the gate "
                                   "measures every night (canary, protected facts, the retention sample), so that "
                                   "only the edited blocks run on them again (snapshots/<model>/prefix, a few MB)")
    scope: str = _opt("routed", "routed|subject|off", "routed = every edited subject has a delta of its own and a "
                      "text gets only the deltas of the subjects it names (elsewhere the model is the base model); "
                      "subject = one joint delta of all edits, acting only in texts that name some edited subject; "
                      "off = the joint delta acts on every text. The gate measures, `ask` serves and `export` writes "
                      "the model that way")
    route_solve: str = _opt("alone", "alone|joint-share", "scope = routed: how a subject's delta is solved from the "
                            "night's one batched capture — its edits alone, or its share of one joint solve")
    same_subject_prompts: int = _opt(8, "prompts", "scope = routed: prompts of other relations asked of each edited "
                                     "subject (daemon/assets/relations.jsonl) whose next token the gate compares")
    gate_min_same_subject: float = _opt(0.125, "share 0..1", "scope = routed: of those prompts, the share whose "
                                        "greedy next token must not change (other facts about an edited subject); "
                                        "0.125 of 8 prompts rejects an edit that changes every one of them")
    gate_subject_text_tokens: int = _opt(4, "tokens", "scope = routed: the head's greedy continuation of the first "
                                         "4 same-subject prompts, as long as this, is the text whose perplexity the "
                                         "gate compares (fluency where the subject is named); 0 = not measured")
    gate_max_subject_perplexity: float = _opt(0.0, "ratio", "scope = routed: that perplexity under the candidate "
                                              "at most this × the head's (always measured and recorded; an edit's "
                                              "intended ripple raises it as well as damage does); 0 = off")
    gate_max_measurements: int = _opt(200, "measurements", "scope = routed: gate measurements a night may spend "
                                      "finding the edits that do harm; an edit left undecided goes back to pending")
    # consolidation of snapshot chains
    consolidate_every_nights: int = _opt(0, "nights", "fold the chain into one snapshot this often; 0 = off")
    consolidate_max_chain: int = _opt(0, "snapshots", "fold when the chain is this long; 0 = off")
    consolidate_min_retention: float = _opt(0.0, "share 0..1",
                                            "fold when retention drops below this; 0 = off")
    consolidate_engine: str = _opt("", "''|hypernet|finetune|memit",
                                   "the engine a consolidation re-derives the head with; empty = `engine`. "
                                   "finetune with engine = hypernet and hypernet_from_base = false is the hybrid: "
                                   "cheap HORSE nights on the head, a fine-tune of the whole ledger from the base "
                                   "every consolidate_every_nights nights")
    # logging and monitoring
    log_json: str = _opt("auto", "auto|true|false", "JSON log lines; auto = when stderr is not a terminal")
    # review and trust policy (ledger/review.py)
    review: str = _opt("auto", "auto|on|off", "on = a new edit is `proposed` until someone other than its submitter "
                       "approves it (`horse-ledger review`); auto = on for PostgreSQL ledgers (several people, "
                       "identities the database enforces), off for the embedded SQLite one (one user: nobody else "
                       "could approve, and anyone who can write the file can write anything)")
    review_policy_name: str = _opt("trust-policy", "name", "who auto-approvals are recorded as: policy:<name>")
    review_auto_approve_identities: str = _opt("", "comma-separated identities", "submitters (OS users / "
                                               "PostgreSQL roles) whose edits the policy approves at submission")
    review_auto_approve_sources: str = _opt("", "comma-separated sources", "edit sources the policy approves at "
                                            "submission (exact, or a prefix ending in *); the source is text the "
                                            "submitter types: prefer identities where that matters")
    review_always_subjects: str = _opt("", "comma-separated subjects", "subjects (or aliases) that always need a "
                                       "person's review, even from a trusted identity or source (case-insensitive)")
    review_protected_subjects: bool = _opt(True, "true|false", "the protected facts' subjects always need a "
                                           "person's review too")
    review_max_edits_per_day: int = _opt(0, "edits / 24 h", "most new edits one identity may submit in any 24 "
                                         "hours; 0 = no limit")
    review_max_edits_per_night: int = _opt(0, "edits / batch", "most edits of one identity claimed into one "
                                           "nightly batch (the rest wait for the next night); 0 = no limit")
    metrics_textfile: str = _opt("", "path", "Prometheus text file rewritten after every night by `apply` and "
                                 "`daemon` (for node_exporter's textfile collector, e.g. /var/lib/node_exporter/"
                                 "textfile_collector/horse_ledger.prom); empty = off")

    @property
    def review_required(self) -> bool:
        """Whether new edits need review: `review`, with auto = on for a PostgreSQL ledger, off otherwise."""
        if self.review == "auto":
            return self.db_url.startswith("postgresql")
        return self.review == "on"

    @staticmethod
    def split_list(value: str) -> tuple[str, ...]:
        """A comma-separated setting as its stripped, non-empty items."""
        return tuple(item.strip() for item in value.split(",") if item.strip())

    @property
    def db_path(self) -> Path | None:
        """The SQLite file behind db_url, or None for a server database or an in-memory one."""
        prefix = "sqlite:///"
        if not self.db_url.startswith(prefix) or self.db_url in (prefix, prefix + ":memory:"):
            return None
        return Path(self.db_url[len(prefix):].split("?", 1)[0])

    def describe(self) -> list[dict[str, str]]:
        """Every field as {name, value, unit, env, help}, for `--help`-like listings."""
        rows = []
        for f in fields(self):
            value = masked_url(self.db_url) if f.name == "db_url" else str(getattr(self, f.name))
            rows.append({"name": f.name, "value": value, "unit": f.metadata["unit"],
                         "env": env_var(f.name), "help": f.metadata["help"]})
        return rows


def env_var(name: str) -> str:
    """The environment variable that sets field `name`."""
    f = {f.name: f for f in fields(Settings)}[name]
    return f.metadata["env"] or ENV_PREFIX + name.upper()


def _coerce(name: str, kind: type, raw: Any, origin: str) -> Any:
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            if str(raw).strip().lower() in ("1", "true", "yes", "on"):
                return True
            if str(raw).strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError(raw)
            return int(raw)
        if kind is float:
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
            raise ValueError(raw)
        return str(raw)
    except ValueError:
        raise ConfigError(f"{origin}: {name} = {raw!r} is not a valid {kind.__name__}; "
                          f"give a {kind.__name__} ({_unit(name)})") from None


def _unit(name: str) -> str:
    return {f.name: f for f in fields(Settings)}[name].metadata["unit"]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; create it or drop --config / {ENV_CONFIG}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start}); save it as UTF-8") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}; fix the file") from exc
    table = data.get(APP_NAME, data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [{APP_NAME}] must be a table; write the settings under "
                          f"[{APP_NAME}] or at the top level of the file")
    return table


def config_file(config_path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Path | None:
    """The TOML file load_settings reads: config_path, else $HORSE_LEDGER_CONFIG, else the XDG default when it
    exists, else None."""
    if config_path is not None:
        return Path(config_path)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    default = _xdg("XDG_CONFIG_HOME", ".config", environ) / APP_NAME / "config.toml"
    return default if default.is_file() else None


def setting_sources(config_path: str | os.PathLike[str] | None = None, db_url: str | None = None,
                    *, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Where each field's effective value comes from, as load_settings layers them: "default", "file PATH",
    "env VAR" or "option" (for `horse-ledger config`). Assumes load_settings accepted the same inputs."""
    env = os.environ if environ is None else environ
    sources = {f.name: "default" for f in fields(Settings)}
    path = config_file(config_path, env)
    if path is not None:
        for key in _read_toml(path):
            sources[key] = f"file {path}"
    for name in sources:
        if env.get(env_var(name), "") != "":
            sources[name] = f"env {env_var(name)}"
    if db_url is not None:
        sources["db_url"] = "option --db"
    return sources


@dataclass(frozen=True)
class ServiceManager:
    """What systemd hands a service in its environment (not settings: the service manager sets them)."""

    notify_socket: str = ""  # $NOTIFY_SOCKET: where sd_notify datagrams go; empty = not under Type=notify
    watchdog_usec: int = 0  # $WATCHDOG_USEC: WatchdogSec= in µs; 0 = no watchdog
    watchdog_pid: int = 0  # $WATCHDOG_PID: the process the watchdog is for; 0 = any


def service_manager(environ: Mapping[str, str] | None = None) -> ServiceManager:
    """The systemd notification socket and watchdog interval of this process (daemon/sdnotify.py uses them)."""
    env = os.environ if environ is None else environ

    def number(var: str) -> int:
        raw = env.get(var, "").strip()
        return int(raw) if raw.isdigit() else 0

    return ServiceManager(env.get("NOTIFY_SOCKET", ""), number("WATCHDOG_USEC"), number("WATCHDOG_PID"))


def load_settings(config_path: str | os.PathLike[str] | None = None, db_url: str | None = None,
                  *, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the Settings: defaults < TOML file < HORSE_LEDGER_* env vars < arguments.

    Args:
        config_path: the TOML file (the `--config` flag); None = $HORSE_LEDGER_CONFIG or the XDG default.
        db_url: the `--db` flag; None = keep the lower layers' value.
        environ: the environment to read (tests pass a dict); None = os.environ.
        **overrides: other CLI flags, by field name; None values are ignored.
    Returns:
        A frozen Settings with every path default filled in.
    Raises:
        ConfigError: unreadable file, unknown key, or a value of the wrong type.
    """
    env = os.environ if environ is None else environ
    by_name = {f.name: f for f in fields(Settings)}
    kinds = {f.name: {"int": int, "float": float, "str": str, "bool": bool}[f.type] for f in fields(Settings)}
    values: dict[str, Any] = {}

    path = config_file(config_path, env)
    if path is not None:
        for key, raw in _read_toml(path).items():
            if key not in by_name:
                raise ConfigError(f"config file {path}: unknown key {key!r}; use one of the known keys: "
                                  f"{', '.join(by_name)}")
            values[key] = _coerce(key, kinds[key], raw, f"config file {path}")

    for name in by_name:
        var = env_var(name)
        if env.get(var, "") != "":
            values[name] = _coerce(name, kinds[name], env[var], f"environment variable {var}")

    for name, raw in {"db_url": db_url, **overrides}.items():
        if name not in by_name:
            raise TypeError(f"load_settings() got an unknown field {name!r}")
        if raw is not None:
            values[name] = _coerce(name, kinds[name], raw, f"option for {name}")

    data_dir = Path(values.get("data_dir") or _xdg("XDG_DATA_HOME", ".local/share", env) / APP_NAME)
    values["data_dir"] = str(data_dir)
    values.setdefault("db_url", "")
    if not values["db_url"]:
        values["db_url"] = f"sqlite:///{data_dir / 'ledger.db'}"
    if not values.get("snapshot_dir"):
        values["snapshot_dir"] = str(data_dir / "snapshots")
    if not values.get("cache_dir"):
        values["cache_dir"] = str(_xdg("XDG_CACHE_HOME", ".cache", env) / APP_NAME)
    check_values(values)  # ranges, NaN, enums, device, cron: ledger/config_checks.py
    check_choices(values)  # engines, scopes, review modes, fine-tune settings: ledger/config_checks.py
    settings = dataclasses.replace(Settings(), **values)
    if settings.hypernet_from_consolidation:
        if settings.engine != "hypernet":
            raise ConfigError(f"hypernet_from_consolidation acts on hypernet nights, not engine = {settings.engine!r}. "
                              "Set engine = 'hypernet', or hypernet_from_consolidation = false")
        if settings.hypernet_from_base:
            raise ConfigError("hypernet_from_consolidation and hypernet_from_base both set: a night derives either "
                              "from the base or from the newest consolidated snapshot. Set hypernet_from_base = false "
                              "(nights from the newest fold), or hypernet_from_consolidation = false")
        if settings.running_normaliser:
            raise ConfigError("running_normaliser carries statistics from night to night on the head; with "
                              "hypernet_from_consolidation every night is one edit from the newest consolidated "
                              "snapshot. Drop running_normaliser, or set hypernet_from_consolidation = false")
    if settings.hypernet_from_base and settings.engine == "hypernet":
        for name in ("running_normaliser", "protect_earlier"):
            if getattr(settings, name):
                raise ConfigError(f"{name} acts on nights that edit the head; with hypernet_from_base = true every "
                                  f"night is one edit from the base. Set hypernet_from_base = false, or drop {name}")
        if settings.consolidate_engine not in ("", settings.engine):
            raise ConfigError(f"consolidate_engine = {settings.consolidate_engine!r} would be undone the next night: "
                              "with hypernet_from_base = true every night re-derives the head from the base with "
                              "the hypernet. Set hypernet_from_base = false (HORSE nights on the head), or leave "
                              "consolidate_engine empty")
    if settings.scope == "routed" and settings.engine != "hypernet":
        raise ConfigError(f"scope = 'routed' (the default) needs engine = 'hypernet'; engine = {settings.engine!r} "
                          "edits one joint delta: set scope = 'subject' (or 'off') with it")
    return settings


if __name__ == "__main__":  # python -m ledger.config: print the effective settings (the password masked)
    import sys

    try:
        described = load_settings().describe()
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    for row in described:
        print(f"{row['name']:28} = {row['value']!s:40} [{row['unit']}] {row['env']}: {row['help']}")
