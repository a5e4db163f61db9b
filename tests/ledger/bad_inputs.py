"""The table of bad inputs for tests/ledger/test_bad_inputs_table.py: (id, argv, exit code, message fragment).

`{d}` in an argument is the folder of prepared files (`prepare_files`); `{cfg:NAME}` is `--config <d>/NAME`
with the config file written from CONFIGS. Every fragment includes the part of the message that says what to
do. Exit 2: a usage error found while parsing (nothing opened); exit 1: a domain error (the ledger refused).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

HUGE = "99999999999999999999"
GOOD = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target": "English"}
RANGE_ID = "is out of range; give an edit id from 1 to 2,147,483,647"
NOT_NUMBER = "is not a whole number; give"
SNAP_RANGE = "is out of range; give a snapshot id from `horse-ledger snapshots`"
SNAP_WORD = "is not a snapshot id; give a snapshot id from `horse-ledger snapshots`"


def _ids() -> list[tuple]:
    bad_numbers = [(HUGE, RANGE_ID), ("2147483648", RANGE_ID), ("9223372036854775808", RANGE_ID), ("0", RANGE_ID),
                   ("abc", NOT_NUMBER), ("1.5", NOT_NUMBER), ("", NOT_NUMBER), ("1e3", NOT_NUMBER)]
    cases = []
    for value, msg in bad_numbers:
        cases.append((f"show-{value or 'empty'}", ["show", value], 2, msg))
        cases.append((f"cancel-{value or 'empty'}", ["cancel", value], 2, msg))
        cases.append((f"log-edit-{value or 'empty'}", ["log", "--edit", value], 2, msg))
    for value, msg in bad_numbers[:6]:
        cases.append((f"log-batch-{value}", ["log", "--batch", value], 2, msg.replace("an edit id", "a batch id")))
        cases.append((f"protect-remove-{value}", ["protect", "remove", value], 2,
                      msg.replace("an edit id", "a protected fact id")))
    for value, msg in [(HUGE, "out of range; give a count from 1"), ("0", "out of range; give a count from 1"),
                       ("-1", "out of range; give a count from 1"), ("2147483648", "out of range; give a count"),
                       ("many", "is not a whole number; give a count")]:
        cases.append((f"list-limit-{value}", ["list", "--limit", value], 2, msg))
        cases.append((f"log-limit-{value}", ["log", "--limit", value], 2, msg))
    cases += [("show-negative", ["show", "-1"], 2, "No such option"),
              ("cancel-missing", ["cancel"], 2, "Missing argument 'ID'")]
    return cases


def _snapshots() -> list[tuple]:
    cases = []
    for value, msg in [(HUGE, SNAP_RANGE), ("2147483648", SNAP_RANGE), ("0", SNAP_RANGE), ("abc", SNAP_WORD),
                       ("1.0", SNAP_WORD), ("", SNAP_WORD)]:
        cases += [(f"rollback-{value or 'empty'}", ["rollback", value], 2, msg),
                  (f"diff-a-{value or 'empty'}", ["diff", value, "base"], 2, msg),
                  (f"diff-b-{value or 'empty'}", ["diff", "base", value], 2, msg),
                  (f"export-{value or 'empty'}", ["export", value, "--out", "{d}/out"], 2, msg),
                  (f"ask-snapshot-{value or 'empty'}", ["ask", "--snapshot", value, "hello"], 2, msg),
                  (f"verify-{value or 'empty'}", ["verify", value], 2, msg)]
    cases += [("rollback-head", ["rollback", "head"], 2, "give a snapshot id from `horse-ledger snapshots`, `base`"),
              ("rollback-missing", ["rollback"], 2, "Missing argument 'SNAPSHOT'")]
    return cases


def _ask_and_export() -> list[tuple]:
    msg_text = "remove it (use plain text)"
    return [
        ("ask-empty", ["ask", ""], 2, "is empty; give the text to continue"),
        ("ask-spaces", ["ask", "   "], 2, "is empty; give the text to continue"),
        ("ask-tab-newline", ["ask", "\t\n"], 2, "is empty; give the text to continue"),
        ("ask-nul", ["ask", "a\x00b"], 2, f"contains the control character U+0000; {msg_text}"),
        ("ask-escape", ["ask", "\x1b[31mred"], 2, f"contains the control character U+001B; {msg_text}"),
        ("ask-bidi", ["ask", "Paris \u202e is"], 2, f"contains the bidi control U+202E"),
        ("ask-invisible", ["ask", "\u200b\u200b"], 2, "has only invisible characters"),
        ("ask-too-long", ["ask", "x" * 2001], 2, "the limit is 2,000"),
        ("export-out-file", ["export", "head", "--out", "{d}/plain.txt"], 2, "is not a directory; give a new or empty"),
        ("export-out-under-file", ["export", "head", "--out", "{d}/plain.txt/sub"], 2, "is a file; give another directory"),
        ("export-out-proc", ["export", "head", "--out", "/proc/horse-ledger-export"], 2, "give a directory you can write"),
        ("export-out-empty", ["export", "head", "--out", ""], 2, "is empty; give the directory to write"),
        ("export-out-missing", ["export", "head"], 2, "Missing option '--out'"),
    ]


def _flags(**fields: str) -> list[str]:
    args = ["add"]
    for k, v in {**GOOD, **fields}.items():
        args += [f"--{k.replace('_', '-')}", v]
    return args


def _add_flags() -> list[tuple]:
    fix = "remove it (use plain text)"
    cases = []
    for field in ("subject", "prompt", "target", "target_true", "note", "source", "author"):
        bidi = "\u202e" if field != "prompt" else "The mother tongue of {} \u202eis"
        value = f"x{bidi}y" if field != "prompt" else bidi
        cases.append((f"add-bidi-{field}", _flags(**{field: value}), 1, f"contains the bidi control U+202E"))
        cases.append((f"add-control-{field}", _flags(**{field: GOOD.get(field, "x") + "\x07"}), 1,
                      f"contains the control character U+0007; {fix}"))
    for field, value in [("subject", "\u200b"), ("target", "\u2060\ufeff"), ("target_true", "\u3164"),
                         ("note", "\u200d\u200c")]:
        cases.append((f"add-invisible-{field}", _flags(**{field: value}), 1, "has only invisible characters"))
    cases += [
        ("add-bidi-isolate", _flags(target="A\u2067B"), 1, "contains the bidi control U+2067"),
        ("add-bidi-embedding", _flags(subject="Danielle \u202aDarrieux"), 1, "contains the bidi control U+202A"),
        ("add-line-separator", _flags(target="A\u2028B"), 1, "contains the control character U+2028"),
        ("add-alias-bidi", _flags() + ["--alias", "Dani\u202ee"], 1, "field 'aliases[0]': contains the bidi control"),
        ("add-alias-invisible", _flags() + ["--alias", "\u200b"], 1, "field 'aliases[0]': has only invisible"),
        ("add-alias-control", _flags() + ["--alias", "a\x1bb"], 1, "field 'aliases[0]': contains the control"),
        ("add-paraphrase-bidi", _flags() + ["--paraphrase", "Danielle \u202e"], 1, "paraphrases[0]"),
        ("add-empty-subject", _flags(subject=""), 1, "is empty or only whitespace; give a non-empty value"),
        ("add-space-target", _flags(target="  "), 1, "is empty or only whitespace; give a non-empty value"),
        ("add-two-slots", _flags(prompt="{} and {}"), 1, "use one '{}' where the subject goes"),
        ("add-no-slot", _flags(prompt="Her tongue is"), 1, "write '{}' where the subject goes"),
        ("add-same-target", _flags(target_true="english"), 1, "an edit must change the answer"),
        ("add-long-target", _flags(target="x" * 2001), 1, "the limit is 2,000"),
        ("add-missing-target", ["add", "--subject", "A", "--prompt", "{} is"], 2, "missing --target (or give --from"),
        ("add-from-and-flag", ["add", "--from", "{d}/good.jsonl", "--subject", "A"], 2, "put those fields in the file"),
        ("add-from-missing", ["add", "--from", "{d}/nope.jsonl"], 2, "does not exist"),
        ("add-from-dir", ["add", "--from", "{d}"], 2, "is a directory"),
    ]
    return cases


def _files() -> list[tuple]:
    written = "(nothing from"
    cases = [
        ("file-fifo", "fifo.jsonl", "is not a regular file (a named pipe); give a .jsonl or .csv file"),
        ("file-dev-zero", "zero.jsonl", "is not a regular file (a character device)"),
        ("file-dev-null", "null.csv", "is not a regular file (a character device)"),
        ("file-oversize", "huge.jsonl", "the limit is 67,108,864 (64 MiB): split it into smaller files"),
        ("file-deep-json", "deep.jsonl", "JSON nested too deeply; write each edit as one object"),
        ("file-deep-csv-cell", "deep.csv", "JSON nested too deeply"),
        ("file-dup-key", "dupkey.jsonl", "field 'target' is given twice in one object; keep one"),
        ("file-dup-key-later", "dupkey2.jsonl", "line 2: field 'subject' is given twice"),
        ("file-dup-header", "duphead.csv", "column 'target' appears twice in the header; keep one"),
        ("file-dup-header-spaced", "duphead2.csv", "column 'prompt' appears twice in the header; keep one"),
        ("file-malformed", "malformed.jsonl", "malformed JSON"),
        ("file-array", "array.jsonl", "a JSON list, not an object"),
        ("file-number", "number.jsonl", "a JSON int, not an object"),
        ("file-unknown-field", "unknown.jsonl", "unknown field 'targte'; use the fields"),
        ("file-extension", "facts.txt", "name the file .jsonl or .csv"),
        ("file-no-extension", "facts", "name the file .jsonl or .csv"),
        ("file-latin1", "latin1.jsonl", "not valid UTF-8 (byte 0xfc at column 15); save the file as UTF-8"),
        ("file-csv-more-cells", "more.csv", "more cells than header columns; quote cells that contain commas"),
        ("file-csv-fewer-cells", "fewer.csv", "fewer cells than header columns"),
        ("file-csv-missing-col", "missing.csv", "missing column(s) prompt; give a header with"),
        ("file-csv-unknown-col", "colour.csv", "unknown column 'colour'; use the columns"),
        ("file-bidi", "bidi.jsonl", "contains the bidi control U+202E"),
        ("file-invisible-csv", "invisible.csv", "has only invisible characters"),
        ("file-empty-target", "emptytarget.jsonl", "is empty or only whitespace; give a non-empty value"),
        ("file-paraphrases-dict", "paradict.jsonl", "must be a list of strings, not dict"),
        ("file-too-many-paraphrases", "para51.jsonl", "has 51 entries; the limit is 50"),
        ("file-aliases-number", "aliasnum.jsonl", "must be a list of strings, not int"),
        ("file-alias-bidi", "aliasbidi.jsonl", "field 'aliases[0]': contains the bidi control"),
        ("file-null-subject", "nullsubject.jsonl", "field 'subject': is missing; give a non-empty subject"),
        ("file-number-target", "numtarget.jsonl", "must be text, not int 3"),
        ("file-object-target", "objtarget.jsonl", "must be text, not dict"),
        ("file-control-paraphrase", "paractl.jsonl", "paraphrases[0]': contains the control character U+0007"),
        ("file-csv-bad-para-json", "badpara.csv", "malformed JSON"),
        ("file-two-slots", "twoslots.csv", "use one '{}' where the subject goes"),
        ("file-bom-invalid", "bom.jsonl", "not valid UTF-8"),
    ]
    return [(cid, ["add", "--from", f"{{d}}/{name}"], 1, f"{msg}") for cid, name, msg in cases] + [("file-symlink-fifo", ["add", "--from", "{d}/link-to-fifo.jsonl"], 1,
                          "is not a regular file (a named pipe)")]


def _protect() -> list[tuple]:
    return [
        ("protect-no-slot", ["protect", "add", "--subject", "France", "--prompt", "hello", "--target", "x"], 1,
         "neither has a '{}' slot nor contains the subject 'France'; write '{}' where the subject goes"),
        ("protect-two-slots", ["protect", "add", "--subject", "F", "--prompt", "{} {}", "--target", "x"], 1,
         "use one '{}' where the subject goes"),
        ("protect-slot-no-subject", ["protect", "add", "--prompt", "The capital of {} is", "--target", "x"], 1,
         "pass --subject or write the subject into the prompt"),
        ("protect-bidi-prompt", ["protect", "add", "--prompt", "Water \u202eboils at", "--target", "100"], 1,
         "contains the bidi control U+202E"),
        ("protect-invisible-target", ["protect", "add", "--prompt", "Water boils at", "--target", "\u200b"], 1,
         "has only invisible characters"),
        ("protect-empty-prompt", ["protect", "add", "--prompt", " ", "--target", "x"], 1, "give a non-empty value"),
        ("protect-control-note", ["protect", "add", "--prompt", "Water boils at", "--target", "100", "--note",
                                  "a\x00"], 1, "contains the control character U+0000"),
        ("protect-long-target", ["protect", "add", "--prompt", "Water boils at", "--target", "9" * 2001], 1,
         "the limit is 2,000"),
        ("protect-bidi-subject", ["protect", "add", "--subject", "Fr\u2066ance", "--prompt", "{} is", "--target", "x"],
         1, "contains the bidi control U+2066"),
        ("protect-missing-target", ["protect", "add", "--prompt", "Water boils at"], 2, "Missing option '--target'"),
    ]


def _misc() -> list[tuple]:
    hint = "give head or one of"
    return [
        ("db-revision-unknown", ["db", "upgrade", "--revision", "nope"], 2, f"is not a revision of this schema"),
        ("db-revision-empty", ["db", "upgrade", "--revision", ""], 2, hint),
        ("db-revision-path", ["db", "upgrade", "--revision", "../../etc"], 2, hint),
        ("db-revision-future", ["db", "upgrade", "--revision", "9999"], 2, hint),
        ("list-status-bogus", ["list", "--status", "done"], 2, "is not one of"),
        ("list-since-bad", ["list", "--since", "yesterday"], 2, "does not match the formats"),
        ("log-since-bad", ["log", "--since", "2024-13-45"], 2, "does not match the formats"),
        ("unknown-command", ["frobnicate"], 2, "No such command"),
        ("unknown-option", ["list", "--colour"], 2, "No such option"),
    ]


CONFIGS = {  # name → (TOML text or bytes, message fragment)
    "latin1.toml": (b'model = "caf\xe9"\n', "is not UTF-8 text (byte 0xe9 at offset 12); save it as UTF-8"),
    "batch0.toml": ("batch_max_edits = 0\n", "batch_max_edits = 0 is out of range; give a whole number from 1"),
    "batchneg.toml": ("batch_max_edits = -5\n", "batch_max_edits = -5 is out of range"),
    "batchhuge.toml": ("batch_max_edits = 99999999999\n", "batch_max_edits = 99999999999 is out of range"),
    "attempts0.toml": ("max_attempts = 0\n", "max_attempts = 0 is out of range; give a whole number from 1"),
    "stale0.toml": ("claim_stale_after_s = 0\n", "claim_stale_after_s = 0 is out of range"),
    "heartbeat.toml": ("heartbeat_every_s = 4000\n", "heartbeat_every_s = 4000 is not below claim_stale_after_s"),
    "misfire.toml": ("misfire_grace_s = -1\n", "misfire_grace_s = -1 is out of range; give a whole number from 0"),
    "efficacy-nan.toml": ("gate_min_efficacy = nan\n", "gate_min_efficacy = nan is not a finite number"),
    "efficacy-big.toml": ("gate_min_efficacy = 1.5\n", "gate_min_efficacy = 1.5 is out of range; give a share from 0 to 1"),
    "canary-neg.toml": ("gate_min_canary_agreement = -0.1\n", "is out of range; give a share from 0 to 1"),
    "retention-inf.toml": ("gate_min_retention = inf\n", "gate_min_retention = inf is not a finite number"),
    "protected-2.toml": ("gate_max_protected_drop = 2.0\n", "gate_max_protected_drop = 2.0 is out of range"),
    "norm-neg.toml": ("gate_max_delta_norm = -1.0\n", "gate_max_delta_norm = -1.0 is negative; give a value ≥ 0"),
    "preserve-nan.toml": ("preserve_weight = nan\n", "preserve_weight = nan is not a finite number"),
    "lr0.toml": ("finetune_lr = 0.0\n", "finetune_lr = 0.0 must be > 0"),
    "device-gpu.toml": ('device = "gpu"\n', "device = 'gpu' is not known; give cpu, auto, cuda, cuda:N"),
    "device-cudax.toml": ('device = "cuda:x"\n', "device = 'cuda:x' is not known"),
    "dtype.toml": ('dtype = "int8"\n', "dtype = 'int8' is not known; give one of float32"),
    "logjson.toml": ('log_json = "maybe"\n', "log_json = 'maybe' is not known; give one of auto, true, false"),
    "cron4.toml": ('schedule_cron = "0 2 * *"\n', "has 4 fields; give 5 fields, minute hour day month weekday"),
    "cron61.toml": ('schedule_cron = "61 2 * * *"\n', "is not a valid cron expression"),
    "cron-never.toml": ('schedule_cron = "0 2 31 2 *"\n', "never fires; give 5 fields"),
    "cron-daily.toml": ('schedule_cron = "@daily"\n', "has 1 fields; give 5 fields"),
    "cron-step0.toml": ('schedule_cron = "*/0 * * * *"\n', "is not a valid cron expression"),
    "engine.toml": ('engine = "rome"\n', "engine = 'rome' is not known; give one of hypernet"),
    "scope.toml": ('scope = "everything"\n', "scope = 'everything' is not known; give one of off, subject"),
    "unknown-key.toml": ("batch_max_edit = 3\n", "unknown key 'batch_max_edit'; use one of the known keys"),
    "wrong-type.toml": ('batch_max_edits = "lots"\n', "is not a valid int; give a int"),
    "syntax.toml": ("model = \n", "cannot be read"),
    "table.toml": ('horse-ledger = "x"\n', "must be a table"),
    "bisect.toml": ("gate_bisect_depth = -2\n", "gate_bisect_depth = -2 is out of range"),
    "sample0.toml": ("gate_retention_sample = 0\n", "gate_retention_sample = 0 is out of range; give a whole number from 1"),
}
ENV_CASES = [  # (id, env, fragment)
    ("env-batch-abc", {"HORSE_LEDGER_BATCH_MAX_EDITS": "abc"}, "is not a valid int; give a int"),
    ("env-retention-nan", {"HORSE_LEDGER_GATE_MIN_RETENTION": "nan"}, "gate_min_retention = nan is not a finite"),
    ("env-device", {"HORSE_LEDGER_DEVICE": "tpu"}, "device = 'tpu' is not known"),
    ("env-cron", {"HORSE_LEDGER_SCHEDULE_CRON": "every night"}, "has 2 fields; give 5 fields"),
    ("env-group-mode", {"HORSE_LEDGER_FILE_MODE_GROUP": "sometimes"}, "is not a valid bool"),
    ("env-config-missing", {"HORSE_LEDGER_CONFIG": "/nonexistent/horse.toml"}, "does not exist; create it or drop"),
]


def _configs() -> list[tuple]:
    cases = [(f"config-{name}", ["--config", f"{{d}}/{name}", "status"], 1, msg) for name, (_, msg) in CONFIGS.items()]
    cases += [("config-apply-bad", ["--config", "{d}/batch0.toml", "apply", "--dry-run"], 1, "batch_max_edits = 0")]
    return cases


def all_cases() -> list[tuple]:
    """Every case as (id, argv, exit code, fragment, env)."""
    plain = _ids() + _snapshots() + _ask_and_export() + _add_flags() + _files() + _protect() + _misc() + _configs()
    return [(*c, None) for c in plain] + [(cid, ["status"], 1, msg, env) for cid, env, msg in ENV_CASES]


def _jsonl(*records: object) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n"


def prepare_files(d: Path) -> None:
    """Write every file the cases name into `d`."""
    good = json.dumps(GOOD)
    texts = {
        "good.jsonl": _jsonl(GOOD), "plain.txt": "not a directory\n",
        "deep.jsonl": '{"subject": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        "deep.csv": 'subject,prompt,target,paraphrases\nA,{} x,B,"' + "[" * 50_000 + "]" * 50_000 + '"\n',
        "dupkey.jsonl": '{"subject": "A", "prompt": "{} x", "target": "B", "target": "C"}\n',
        "dupkey2.jsonl": good + '\n{"subject": "A", "subject": "B", "prompt": "{} x", "target": "C"}\n',
        "duphead.csv": "subject,prompt,target,target\nA,{} x,B,C\n",
        "duphead2.csv": "subject,prompt, prompt ,target\nA,{} x,{} y,B\n",
        "malformed.jsonl": good + '\n{"subject": "B", "prompt": \n',
        "array.jsonl": '["a", "b"]\n', "number.jsonl": "3\n",
        "unknown.jsonl": _jsonl({**GOOD, "targte": "x"}), "facts.txt": _jsonl(GOOD), "facts": _jsonl(GOOD),
        "more.csv": "subject,prompt,target\nParis,{} is in,Italy,extra\n",
        "fewer.csv": "subject,prompt,target,note\nParis,{} is in\n",
        "missing.csv": "subject,target\nParis,Italy\n",
        "colour.csv": "subject,prompt,target,colour\nParis,{} is in,Italy,red\n",
        "bidi.jsonl": _jsonl({**GOOD, "target": "Eng\u202elish"}),
        "invisible.csv": "subject,prompt,target\n\u200b,{} is in,Italy\n",
        "emptytarget.jsonl": _jsonl({**GOOD, "target": " "}),
        "paradict.jsonl": _jsonl({**GOOD, "paraphrases": {"a": 1}}),
        "para51.jsonl": _jsonl({**GOOD, "paraphrases": [f"p {i}" for i in range(51)]}),
        "aliasnum.jsonl": _jsonl({**GOOD, "aliases": 3}),
        "aliasbidi.jsonl": _jsonl({**GOOD, "aliases": ["Dani\u202ee"]}),
        "nullsubject.jsonl": _jsonl({**GOOD, "subject": None}),
        "numtarget.jsonl": _jsonl({**GOOD, "target": 3}),
        "objtarget.jsonl": _jsonl({**GOOD, "target": {"x": 1}}),
        "paractl.jsonl": _jsonl({**GOOD, "paraphrases": ["bell\u0007"]}),
        "badpara.csv": 'subject,prompt,target,paraphrases\nA,{} x,B,"[1, "\n',
        "twoslots.csv": "subject,prompt,target\nA,{} and {},B\n",
    }
    for name, text in texts.items():
        (d / name).write_text(text, encoding="utf-8")
    (d / "latin1.jsonl").write_bytes(_jsonl(GOOD).encode() + b'{"subject": "Z\xfcrich", "prompt": "{}", "target": "X"}\n')
    (d / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"subject": "\xff"}\n')
    os.mkfifo(d / "fifo.jsonl")
    os.symlink(d / "fifo.jsonl", d / "link-to-fifo.jsonl")
    os.symlink("/dev/zero", d / "zero.jsonl")
    os.symlink("/dev/null", d / "null.csv")
    with open(d / "huge.jsonl", "wb") as fh:  # sparse: the size check must refuse it without reading
        fh.truncate(64 * 2**20 + 1)
    for name, (content, _) in CONFIGS.items():
        path = d / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
