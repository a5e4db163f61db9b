"""`horse-ledger export` of a routed head (daemon/export_routed.py) on tiny-llama, through the real CLI: the
exported dir loaded with trust_remote_code in a process WITHOUT horse-ledger serves exactly what `ask` serves
(logits and greedy generations on 200 batched, padded prompts, in and out of scope); a plain load is the base
model; `--deltas-only` + `attach` answers as `ask`; `--merged` warns with its canary agreement; bad input
writes nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from daemon.materialise import links
from ledger.store import Store
from tests.daemon.conftest import PARAPHRASE, PROMPT, SUBJECTS, fact, write_config

SQLITE = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
TEMPLATES = [PROMPT, PARAPHRASE, "I met {} yesterday and", "Tell me about {}.", "Where does {} live?",
             "{}", "A story: {} and Alpha went home. The color of {} is", "{}x is not {} but"]
OTHERS = ["Alpha", "Zorblatx", "Pauline", "the river", "Omega Quenvik"]  # untaught, a longer word, a taught name last


def prompts_200() -> list[str]:
    names = SUBJECTS + OTHERS
    out = [t.format(*[n] * t.count("{}")) for t in TEMPLATES for n in names]
    out += [f"{n} {m}" for n in names for m in names if n != m]
    return out[:200]


def routed_head(db_url, daemon_settings, cli_runner, tmp_path: Path, n_facts: int = 4):
    """(settings, config path, store, snapshot id, taught edit ids) of a ledger with one routed night."""
    settings = daemon_settings(db_url, scope="routed")
    cfg = write_config(tmp_path / "config.toml", settings)
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(fact(i)) + "\n" for i in range(n_facts)))
    cli_runner(cfg, "add", "--from", str(path))
    night = json.loads(cli_runner(cfg, "apply", "--json").stdout)
    assert night["status"] == "published" and night["applied"], night
    return settings, cfg, Store(db_url), night["snapshot_id"], night["applied"]


def served(settings, store, snapshot_id):
    """The model `ask` serves: the base with the head's checked table routed."""
    from daemon.export import served_table
    from daemon.materialise import load_base
    from horse.route import Router

    model, tok = load_base(settings)
    with store.session(write=False) as s:
        table = served_table(settings, links(s, snapshot_id), tok)
    return model, tok, Router(model, table), table


# Run with `python -I` from an empty cwd: horse-ledger's editable-install finder is taken off first.
ISOLATED = r"""
import sys
sys.path[:] = [p for p in sys.path if "__editable__" not in p]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in type(f).__module__]
sys.path_importer_cache.clear()
for name in ("horse", "ledger", "daemon"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable: the check would not be isolated")
import json, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

out, prompts = sys.argv[1], json.loads(open(sys.argv[2]).read())
model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(out, padding_side="left")
assert type(model).__name__ == "HorseRoutedForCausalLM" and model._horse_router is not None
assert not any(m.split(".")[0] in ("horse", "ledger", "daemon") for m in sys.modules), "horse-ledger was imported"
res = {}
with torch.no_grad():
    for i in range(0, len(prompts), 25):
        enc = tok(prompts[i:i + 25], return_tensors="pt", padding=True)
        res[f"logits{i}"] = model(**enc).logits
        res[f"gen{i}"] = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
save_file({k: v.contiguous() for k, v in res.items()}, sys.argv[3])
print("isolated ok")
"""


def run_isolated(export_dir: Path, prompts: list[str], tmp_path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    cwd = tmp_path / "empty-cwd"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HORSE_LEDGER_", "PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-I", "-c", ISOLATED, str(export_dir), str(tmp_path / "prompts.json"),
                           str(tmp_path / "isolated.safetensors")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "isolated ok" in proc.stdout, proc.stderr[-3000:]
    return load_file(tmp_path / "isolated.safetensors")


@SQLITE
def test_the_export_serves_what_ask_serves_without_horse_ledger(db_url, daemon_settings, cli_runner, tmp_path):
    from transformers import AutoModelForCausalLM

    from horse.route import named_in

    settings, cfg, store, head, taught = routed_head(db_url, daemon_settings, cli_runner, tmp_path)
    out = tmp_path / "export"
    manifest = json.loads(cli_runner(cfg, "export", "head", "--out", str(out), "--json").stdout)
    snap = store.get_snapshot(head)
    assert manifest["serving"] == "routed" and manifest["snapshot_id"] == head
    assert manifest["weights_sha256"] == snap.metrics["weights_sha256"]
    assert manifest["subjects"] == len(taught) and manifest["edit_ids"] == sorted(taught)
    assert json.loads((out / "horse-ledger.json").read_text()) == manifest
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_horse_routed.HorseRoutedForCausalLM"}
    source = (out / "modeling_horse_routed.py").read_text()
    assert source.startswith(Path("horse/route.py").read_text().rstrip()) and "import horse" not in source

    prompts = prompts_200()
    isolated = run_isolated(out, prompts, tmp_path)

    model, tok, router, table = served(settings, store, head)
    tok.padding_side = "left"
    plain = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code: the base model
    assert type(plain).__name__ == "LlamaForCausalLM" and getattr(plain, "_horse_router", None) is None
    in_scope = worst = 0.0
    with torch.no_grad():
        for i in range(0, len(prompts), 25):
            enc = tok(prompts[i:i + 25], return_tensors="pt", padding=True)
            mask = enc["attention_mask"].bool()
            want = model(**enc).logits
            got = isolated[f"logits{i}"]
            worst = max(worst, float((got - want).abs()[mask].max()))
            gen = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            assert torch.equal(gen, isolated[f"gen{i}"]), prompts[i:i + 25]
            with router.suspended():
                base = model(**enc).logits
            changed = ((want - base).abs().amax(-1) > 0) & mask
            in_scope += float(changed.any(-1).sum())
            assert torch.equal(plain(**enc).logits[mask], base[mask])  # bit for bit: the base model
    named = sum(bool(s) for s in named_in(prompts, tok, table))
    print(f"max |logit diff| export vs served: {worst:.3g}; prompts naming a subject: {named}/200, "
          f"changed by routes: {int(in_scope)}")
    assert worst <= 1e-5
    assert 40 <= named <= 160 and in_scope == named  # both kinds of prompt, and only those naming a subject change
    router.remove()
    store.close()


def test_deltas_only_with_attach_answers_as_ask(db_url, daemon_settings, cli_runner, tmp_path):
    from daemon.materialise import load_base
    from horse.route import RouteError
    from horse.route_load import attach

    settings, cfg, store, head, _ = routed_head(db_url, daemon_settings, cli_runner, tmp_path, n_facts=3)
    out = tmp_path / "bundle"
    manifest = json.loads(cli_runner(cfg, "export", str(head), "--out", str(out), "--deltas-only", "--json").stdout)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "horse-ledger.json", "routes.safetensors"]
    assert manifest["contents"] == "deltas-only"
    assert manifest["weights_sha256"] == store.get_snapshot(head).metrics["weights_sha256"]
    readme = (out / "README.md").read_text()
    assert "attach(model" in readme and manifest["weights_sha256"] in readme
    model, tok = load_base(settings)
    with attach(model, out):
        for prompt in [PROMPT.format(SUBJECTS[0]), PARAPHRASE.format(SUBJECTS[1]), "The home of Alpha is"]:
            asked = json.loads(cli_runner(cfg, "ask", prompt, "--json", "--max-new-tokens", "4").stdout)
            enc = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                probs = torch.softmax(model(**enc).logits[0, -1].float(), -1)
                gen = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            top = torch.topk(probs, 5)
            assert [t["id"] for t in asked["top_tokens"]] == top.indices.tolist()
            assert [t["prob"] for t in asked["top_tokens"]] == pytest.approx(top.values.tolist(), abs=1e-6)
            assert asked["continuation"] == tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    with pytest.raises(RouteError, match="do not match the digest"):
        attach(model, out, expected_digest="0" * 64)
    store.close()


@SQLITE
def test_merged_is_explicit_and_warns_with_its_canary_agreement(db_url, daemon_settings, cli_runner, tmp_path):
    from transformers import AutoModelForCausalLM

    settings, cfg, store, head, _ = routed_head(db_url, daemon_settings, cli_runner, tmp_path)
    out = tmp_path / "merged"
    result = cli_runner(cfg, "export", "head", "--out", str(out), "--merged", "--json")
    manifest = json.loads(result.stdout)
    assert manifest["serving"] == "merged" and "auto_map" not in json.loads((out / "config.json").read_text())
    agree = manifest["canary_agreement_unscoped"]
    assert 0.0 <= agree <= 1.0 and manifest["canary_n"] == 10 and manifest["canary_agreement_routed"] == 1.0
    assert "UNSCOPED" in result.stderr and f"{agree:.3f}" in result.stderr
    print(f"merged export: canary agreement unscoped {agree:.3f}, routed {manifest['canary_agreement_routed']:.3f}")
    merged = AutoModelForCausalLM.from_pretrained(out)
    model, _, router, table = served(settings, store, head)
    router.remove()
    m = table.modules[0]
    delta_VK = sum(r.factors[m][0].float().T @ r.factors[m][1].float() for r in table.routes.values()).T
    got = merged.get_submodule(m).weight - model.get_submodule(m).weight
    assert torch.allclose(got, delta_VK, atol=1e-6) and float(delta_VK.abs().max()) > 0
    bad = cli_runner(cfg, "export", "head", "--out", str(tmp_path / "x"), "--merged", "--deltas-only", expect=2)
    assert "pick one" in bad.output and not (tmp_path / "x").exists()
    store.close()


@SQLITE
def test_bad_input_writes_nothing(db_url, daemon_settings, cli_runner, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from sqlalchemy import update

    from daemon.snapshots import hash_file
    from ledger.models import Snapshot

    settings, cfg, store, head, _ = routed_head(db_url, daemon_settings, cli_runner, tmp_path, n_facts=2)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    r = cli_runner(cfg, "export", "head", "--out", str(full), expect=1)
    assert "exists and is not empty" in r.output and sorted(p.name for p in full.iterdir()) == ["keep.txt"]

    out = tmp_path / "deep" / "er" / "out"
    r = cli_runner(cfg, "export", "99", "--out", str(out), expect=1)
    assert "no snapshot 99" in r.output and not (tmp_path / "deep").exists()
    r = cli_runner(cfg, "export", "head", "--out", "/proc/horse-ledger-export", expect=2)
    assert "give a directory you can write" in r.output

    snap = store.get_snapshot(head)
    path = Path(settings.snapshot_dir) / snap.path
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))   # altered: sha256 no longer matches
    r = cli_runner(cfg, "export", "head", "--out", str(out), expect=1)
    assert "horse-ledger verify" in r.output and not (tmp_path / "deep").exists()
    assert "Traceback" not in r.output

    # NaN factors whose file hash the ledger recorded (a damaged night): the factor digests catch it
    path.write_bytes(good)
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    key = next(k for k in tensors if k.endswith(".coef_MV"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    with store.session() as s:
        s.execute(update(Snapshot).where(Snapshot.id == head).values(sha256=hash_file(path)))
    r = cli_runner(cfg, "export", "head", "--out", str(out), expect=1)
    assert "horse-ledger verify" in r.output and "do not match" in r.output and not (tmp_path / "deep").exists()
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob("deep*"))
    store.close()

