"""The routed night (scope = routed) end to end on tiny-llama with the test hypernet, through the real CLI, on
both backends: per-subject routes published, served by `ask`, a later night re-solving only its subjects, exact
rollback, and a gate that rejects only the edit that does harm."""
from __future__ import annotations

import json

from daemon.materialise import links
from daemon.night.routes import head_table, read_routes
from ledger.store import Store
from tests.daemon.conftest import (COLORS, PARAPHRASE, PROMPT, SUBJECTS, add_facts, apply_json, fact,
                                   write_config)


def _table(settings, store, snapshot_id, tok):
    with store.session(write=False) as s:
        return head_table(settings, links(s, snapshot_id), tok)


def test_a_routed_night_publishes_serves_and_rolls_back_exactly(db_url, daemon_settings, cli_runner, tmp_path):
    from horse.route import table_digest
    from horse.zoo import load_model

    settings = daemon_settings(db_url, scope="routed")
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(i) for i in range(4)])
    first = apply_json(cli_runner, cfg)
    assert first["status"] == "published", first
    s1, taught = first["snapshot_id"], first["applied"]
    assert len(taught) >= 3 and first["metrics"]["serving"] == "routed"
    snap = store.get_snapshot(s1)
    assert snap.kind == "routed" and snap.metrics["routes"]["n_subjects"] == len(taught)
    _, tok = load_model("tiny-llama", progress=False)
    table1 = _table(settings, store, s1, tok)
    assert table_digest(table1) == snap.metrics["weights_sha256"]
    assert sorted(k for k in table1.routes) == sorted(e.subject for e in store.get_edits(taught))

    # ask: the taught fact where its subject is named; the base model's outputs, exactly, where none is
    subject = store.get_edits(taught)[0].subject
    i = SUBJECTS.index(subject)
    asked = json.loads(cli_runner(cfg, "ask", PROMPT.format(subject) + " ", "--json", "--max-new-tokens", "3").stdout)
    assert asked["scope"] == "routed" and asked["subjects"] == [subject]
    assert asked["top_tokens"][0]["token"] == COLORS[i][0], asked
    other = "The home of Alpha is"
    routed = json.loads(cli_runner(cfg, "ask", other, "--json").stdout)
    base = json.loads(cli_runner(cfg, "ask", other, "--snapshot", "base", "--json").stdout)
    assert routed["in_scope"] is False and routed["top_tokens"] == base["top_tokens"]
    assert routed["continuation"] == base["continuation"]

    # a second night adds a fact about one subject: only that subject is solved again (its earlier edit carried
    # in its delta), the other routes stay as they were, bit for bit
    add_facts(cli_runner, cfg, tmp_path, "night2", [{**fact(i), "prompt": PARAPHRASE, "paraphrases": []}])
    second = apply_json(cli_runner, cfg)
    assert second["status"] == "published", second
    s2 = second["snapshot_id"]
    with store.session(write=False) as s:
        routes2, _ = read_routes(settings, links(s, s2)[-1])
    assert list(routes2.routes) == [subject]
    table2 = _table(settings, store, s2, tok)
    assert set(table2.routes) == set(table1.routes)
    for key in table1.routes:
        if key != subject:
            assert table2.routes[key].sha256 == table1.routes[key].sha256
    old = [e for e in store.get_edits(taught) if e.subject == subject][0]
    assert set(table2.routes[subject].edit_ids) == {old.id, *second["applied"]}
    assert table2.routes[subject].sha256 != table1.routes[subject].sha256
    assert cli_runner(cfg, "verify").stdout.strip().endswith("OK")

    # rollback to night 1: the table is night 1's, bit for bit; night 2's edit is rolled back
    cli_runner(cfg, "rollback", str(s1))
    assert table_digest(_table(settings, store, s1, tok)) == snap.metrics["weights_sha256"]
    assert store.get_edits(second["applied"])[0].status == "rolled_back"
    assert store.get_edits([old.id])[0].status == "applied"
    store.close()


def test_only_the_edit_that_flips_a_protected_fact_is_rejected(db_url, daemon_settings, cli_runner, tmp_path):
    settings = daemon_settings(db_url, scope="routed")
    cfg = write_config(tmp_path / "config.toml", settings)
    store = Store(db_url)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0)])
    assert apply_json(cli_runner, cfg)["status"] == "published"
    # the taught fact is protected; a later edit that rewrites it is the only one rejected
    cli_runner(cfg, "protect", "add", "--subject", SUBJECTS[0], "--prompt", PROMPT, "--target", COLORS[0])
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(0, color=COLORS[3])] + [fact(i) for i in (4, 5, 6)])
    result = apply_json(cli_runner, cfg)
    assert result["status"] == "published", result
    bad = max(int(k) for k in result["rejected"]) if result["rejected"] else None
    assert list(result["rejected"]) == [str(bad)] and bad == 2, result["rejected"]
    assert "protected facts flipped" in result["rejected"][str(bad)]
    assert sorted(result["applied"] + [int(k) for k in result["failed"]]) == [3, 4, 5]
    assert store.get_edits([1])[0].status == "applied"
    store.close()


def test_an_alias_routes_to_its_subject(db_url, daemon_settings, cli_runner, tmp_path):
    settings = daemon_settings(db_url, scope="routed")
    cfg = write_config(tmp_path / "config.toml", settings)
    add_facts(cli_runner, cfg, tmp_path, "night1", [{**fact(0), "aliases": ["Zorbie"]}])
    assert apply_json(cli_runner, cfg)["status"] == "published"
    by_alias = json.loads(cli_runner(cfg, "ask", PROMPT.format("Zorbie") + " ", "--json").stdout)
    by_name = json.loads(cli_runner(cfg, "ask", PROMPT.format(SUBJECTS[0]) + " ", "--json").stdout)
    base = json.loads(cli_runner(cfg, "ask", PROMPT.format("Zorbie") + " ", "--snapshot", "base", "--json").stdout)
    assert by_alias["subjects"] == by_name["subjects"] == [SUBJECTS[0]]
    assert by_alias["top_tokens"][0]["token"] == COLORS[0][0] != base["top_tokens"][0]["token"]


def test_an_edit_that_moves_other_facts_about_its_subject_is_rejected(db_url, daemon_settings, cli_runner, tmp_path):
    # the tiny model's edits move every prompt that names their subject: with the bar at 1.0 none may change
    settings = daemon_settings(db_url, scope="routed", gate_min_same_subject=1.0, same_subject_prompts=4)
    cfg = write_config(tmp_path / "config.toml", settings)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0)])
    result = apply_json(cli_runner, cfg)
    assert result["status"] == "rejected" and list(result["rejected"]) == ["1"], result
    assert "same-subject agreement" in result["rejected"]["1"]


def test_fluency_of_text_naming_the_subject_is_measured_and_gated(db_url, daemon_settings, cli_runner, tmp_path):
    # measured with the bar off: every subject has a perplexity ratio of the head's continuations of its prompts
    settings = daemon_settings(db_url, scope="routed", same_subject_prompts=4, gate_subject_text_tokens=6)
    cfg = write_config(tmp_path / "config.toml", settings)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0)])
    result = apply_json(cli_runner, cfg)
    assert result["status"] == "published", result
    measured = result["metrics"]["subjects"]
    assert all(v["subject_texts"] > 0 and v["subject_perplexity"] > 0 for v in measured.values()), measured
    # a bar just above 1: the tiny model's edit raises the perplexity of text naming its subject, so it is rejected
    strict = daemon_settings(db_url, scope="routed", same_subject_prompts=4, gate_subject_text_tokens=6,
                             gate_max_subject_perplexity=1.0 + 1e-6)
    cfg2 = write_config(tmp_path / "strict.toml", strict)
    add_facts(cli_runner, cfg2, tmp_path, "night2", [fact(1)])
    result = apply_json(cli_runner, cfg2)
    assert result["status"] == "rejected" and list(result["rejected"]) == ["2"], result
    assert "perplexity of text naming the subject" in result["rejected"]["2"]


def test_a_guilty_edit_is_split_from_its_subjects_innocent_one(db_url, daemon_settings, cli_runner, tmp_path):
    settings = daemon_settings(db_url, scope="routed")
    cfg = write_config(tmp_path / "config.toml", settings)
    add_facts(cli_runner, cfg, tmp_path, "night1", [fact(0)])
    assert apply_json(cli_runner, cfg)["status"] == "published"
    cli_runner(cfg, "protect", "add", "--subject", SUBJECTS[0], "--prompt", PROMPT, "--target", COLORS[0])
    # two new edits of one subject: one rewrites the protected fact's prompt; the other sets the same new colour
    # through another prompt, which leaves the protected prompt to the earlier edit it is solved with
    add_facts(cli_runner, cfg, tmp_path, "night2", [fact(0, color=COLORS[3]),
                                                    {**fact(0, color=COLORS[3]), "prompt": PARAPHRASE,
                                                     "paraphrases": []}])
    result = apply_json(cli_runner, cfg)
    # the subject fails with both; each is then tried alone on top of the earlier edit: the conflict is rejected
    # as measured alone, and every edit ends the night in exactly one place (the tiny model moves every prompt
    # that names the subject, so whether the other passes alone is not fixed here)
    assert "2" in result["rejected"] and "alone" in result["rejected"]["2"], result
    ends = [set(result["applied"]), {int(k) for k in result["rejected"]}, {int(k) for k in result["returned"]},
            {int(k) for k in result["failed"]}]
    assert sorted(i for end in ends for i in end) == [2, 3], result
    assert all("alone" in reason or "together" in reason for reason in result["rejected"].values()), result
