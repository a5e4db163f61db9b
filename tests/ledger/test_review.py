"""Review, trust policy and quotas (issue 29): two real identities on each backend, the daemon's claims, events.

SQLite: two OS users (created with useradd when absent; root needed) share one group-writable database.
PostgreSQL: two login roles under deploy/postgres-roles.sql.
"""
from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

import migrations
from ledger.cli import cli
from ledger.models import Edit, Event
from ledger.review import Intake, QuotaExceeded, SelfApproval, TrustPolicy, approve, reject
from ledger.store import Store

REPO = Path(__file__).resolve().parents[2]
ROLES_SQL = REPO / "deploy" / "postgres-roles.sql"
GROUP, ALICE, BOB = "hlreview", "hlalice", "hlbob"


def _add(n: int, subject: str | None = None) -> list[str]:
    return ["add", "--subject", subject or f"Subject {n}", "--prompt", "{} speaks", "--target", f"Lang {n}"]


def _events(store: Store, edit_id: int) -> list[tuple[str, str]]:
    return [(e.kind, e.actor) for e in store.events(edit_id=edit_id, limit=None, oldest_first=True)]


# --------------------------------------------------------------------------- in-process, both backends

def test_review_flow_records_every_transition(store, edit_factory):
    on = Intake(identity="alice", review=True)
    a, b, c = (r.id for r in store.add_edits([edit_factory(), edit_factory(), edit_factory()], actor="cli:alice",
                                             intake=on))
    assert {e.status for e in store.get_edits([a, b, c])} == {"proposed"}
    assert store.claim_batch(10, base_model="m") is None  # the daemon never claims a proposed edit
    with pytest.raises(SelfApproval, match="alice submitted edit .* cannot approve it"):
        approve(store, [a, b], identity="alice")
    assert store.get_edit(a).status == "proposed"  # all or nothing
    approve(store, [a], identity="bob", reason="checked the source")
    reject(store, [b], identity="bob", reason="wrong")
    store.cancel(c, actor="cli:alice")
    ea, eb = store.get_edit(a), store.get_edit(b)
    assert (ea.status, ea.review, ea.reviewed_by, ea.submitted_by) == ("pending", "approved", "bob", "alice")
    assert (eb.status, eb.review, eb.reviewed_by) == ("rejected", "rejected", "bob")
    assert _events(store, a) == [("edit.created", "cli:alice"), ("edit.pending", "bob")]
    assert _events(store, b)[-1] == ("edit.rejected", "bob") and store.events(edit_id=b)[0].reason == "wrong"
    assert _events(store, c)[-1] == ("edit.cancelled", "cli:alice")
    claimed = store.claim_batch(10, base_model="m")
    assert [e.id for e in claimed.edits] == [a]


def test_approval_supersedes_the_older_pending_edit(store, edit_factory):
    (old,) = store.add_edits([edit_factory(subject="X")], actor="t", intake=Intake(identity="alice"))
    (new,) = store.add_edits([edit_factory(subject="X", target="German")], actor="t",
                             intake=Intake(identity="alice", review=True))
    assert new.superseded_id is None and store.get_edit(old.id).status == "pending"  # not before approval
    approve(store, [new.id], identity="bob")
    assert store.get_edit(old.id).status == "superseded" and store.get_edit(new.id).supersedes_id == old.id


def test_policy_quota_and_reserved_subjects(store, edit_factory):
    store.add_protected(prompt="{} is in", target="Paris", subject="Eiffel Tower", actor="t")
    policy = TrustPolicy(name="bots", identities=frozenset({"bot"}), sources=("https://wiki.example/*",),
                         always_subjects=frozenset({"lionel messi"}), max_edits_per_day=3)
    bot = Intake(identity="bot", review=True, policy=policy)
    results = store.add_edits([edit_factory(), edit_factory(subject="Messi", aliases=["Lionel Messi"]),
                               edit_factory(subject="Eiffel Tower")], actor="cli:bot", intake=bot)
    assert [r.status for r in results] == ["pending", "proposed", "proposed"]
    auto = store.get_edit(results[0].id)
    assert (auto.review, auto.reviewed_by) == ("approved", "policy:bots")
    assert ("review.approved", "policy:bots") in _events(store, auto.id)
    with pytest.raises(QuotaExceeded, match="bot submitted 3 edits in the last 24 hours and the limit is 3"):
        store.add_edits([edit_factory()], actor="cli:bot", intake=bot)
    human = Intake(identity="carol", review=True, policy=policy)
    (by_source,) = store.add_edits([edit_factory(source="https://wiki.example/a")], actor="c", intake=human)
    assert by_source.status == "pending"
    assert store.add_edits([edit_factory(source="https://evil.example/")], actor="c", intake=human)[0].status == \
        "proposed"


def test_night_cap_per_identity(db_url, edit_factory):
    with Store(db_url, night_cap_per_identity=2) as store:
        for who in ("alice", "alice", "alice", "bob", None):
            store.add_edits([edit_factory()], actor="t", intake=Intake(identity=who or "x"))
        with store.session() as s:  # an edit from before review: no submitter, not capped
            s.execute(text("UPDATE edits SET submitted_by = NULL WHERE id = 5"))
        first = store.claim_batch(10, base_model="m")
        assert [e.id for e in first.edits] == [1, 2, 4, 5]
        assert [e.id for e in store.claim_batch(10, base_model="m").edits] == [3]


def test_cli_shows_review_state_and_filters_log_by_actor(run_cli, store, monkeypatch):
    monkeypatch.setenv("HORSE_LEDGER_REVIEW", "on")
    r = run_cli(*_add(1))
    assert r.exit_code == 0 and "1 edit awaits review" in r.stderr
    assert "REVIEW" in run_cli("list").stdout and "awaiting review" in run_cli("list").stdout
    assert json.loads(run_cli("list", "--status", "proposed", "--json").stdout)[0]["status"] == "proposed"
    shown = run_cli("show", "1").stdout
    assert "submitted_by" in shown and "awaiting review" in shown
    status = json.loads(run_cli("status", "--json").stdout)
    assert status["review"] == {"required": True, "awaiting": 1} and status["counts"]["proposed"] == 1
    assert "review: on, 1 awaiting" in run_cli("status").stdout
    listed = run_cli("review", "list")
    assert "Subject 1" in listed.stdout
    bad = run_cli("review", "approve", "1")
    assert bad.exit_code == 1 and "cannot approve it; another reviewer" in bad.stderr
    approve(store, [1], identity="someone-else")
    assert "approved by someone-else" in run_cli("show", "1").stdout
    assert [e["kind"] for e in json.loads(run_cli("log", "--actor", "someone-else", "--json").stdout)] == \
        ["edit.pending"]
    assert run_cli("review", "reject", "1", "--reason", "x").exit_code == 1  # no longer proposed
    assert run_cli("review", "reject", "1").exit_code == 2  # --reason is required


def test_migration_0003_up_and_down_with_a_proposed_edit(empty_db_url, edit_factory):
    store = Store(empty_db_url)
    (r,) = store.add_edits([edit_factory()], actor="t", intake=Intake(identity="alice", review=True))
    with store.engine.begin() as conn:
        migrations.downgrade(conn, "0002")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT status FROM edits")).scalar() == "cancelled"  # never claimable
        kinds = conn.execute(text("SELECT kind, actor FROM events WHERE edit_id = :i ORDER BY id"), {"i": r.id}).all()
        assert [tuple(k) for k in kinds][-1] == ("edit.cancelled", "migration:0003")
        with pytest.raises(DBAPIError):  # the old CHECK is back
            conn.execute(text("UPDATE edits SET status = 'proposed'"))
    assert store.upgrade() == migrations.head_revision()
    store.add_edits([edit_factory()], actor="t", intake=Intake(identity="alice", review=True))
    store.close()


# ------------------------------------------------------------------------- two OS users on SQLite

def _ensure_users() -> None:
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        if os.environ.get("CI", "").lower() == "true":  # .ci/run runs as root on Debian: never hide it there
            pytest.fail("CI=true but not root or no useradd: the two-user review test cannot run")
        pytest.skip("creating two OS users needs root and useradd")
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", GROUP], check=True)
    for user in (ALICE, BOB):
        try:
            pwd.getpwnam(user)
        except KeyError:
            subprocess.run(["useradd", "--no-create-home", "--gid", GROUP, "--shell", "/usr/sbin/nologin", user],
                           check=True)


@pytest.fixture
def shared_sqlite() -> object:
    """A group-shared ledger both users may write, and run(user, *args, **env) -> CompletedProcess."""
    _ensure_users()
    root = Path(tempfile.mkdtemp(prefix="hl-review-"))
    gid = grp.getgrnam(GROUP).gr_gid
    os.chown(root, 0, gid)
    os.chmod(root, 0o2770)
    url = f"sqlite:///{root / 'ledger.db'}"
    Store(url).close()
    for path in root.iterdir():
        os.chown(path, 0, gid)
        os.chmod(path, 0o660)

    def run(user: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        environ = {"PATH": os.environ.get("PATH", ""), "HOME": str(root), "XDG_CONFIG_HOME": str(root),
                   "XDG_DATA_HOME": str(root), "HORSE_LEDGER_REVIEW": "on", "PYTHONPATH": str(REPO), **env}
        return subprocess.run([sys.executable, str(REPO / "tests" / "ledger" / "as_user.py"), user, "--db", url,
                               *args], capture_output=True, text=True, env=environ, cwd=root, timeout=60)

    run.url = url
    yield run
    shutil.rmtree(root, ignore_errors=True)


def test_two_os_users_on_sqlite(shared_sqlite):
    run = shared_sqlite
    added = run(ALICE, *_add(1), "--json")
    assert added.returncode == 0, added.stderr
    edit = json.loads(added.stdout)
    assert (edit["status"], edit["submitted_by"]) == ("proposed", ALICE)
    own = run(ALICE, "review", "approve", str(edit["id"]))
    assert own.returncode == 1 and f"{ALICE} submitted edit {edit['id']} and cannot approve it" in own.stderr
    ok = run(BOB, "review", "approve", str(edit["id"]), "--reason", "checked")
    assert ok.returncode == 0, ok.stderr
    # the policy trusts bob: his edit is approved at submission, recorded as by the policy
    trusted = run(BOB, *_add(2), "--json", HORSE_LEDGER_REVIEW_AUTO_APPROVE_IDENTITIES=BOB,
                  HORSE_LEDGER_REVIEW_POLICY_NAME="ops")
    assert json.loads(trusted.stdout)["reviewed_by"] == "policy:ops"
    # alice's quota: 2 per day, she has 1
    assert run(ALICE, *_add(3), HORSE_LEDGER_REVIEW_MAX_EDITS_PER_DAY="2").returncode == 0
    refused = run(ALICE, *_add(4), HORSE_LEDGER_REVIEW_MAX_EDITS_PER_DAY="2")
    assert refused.returncode == 1 and "limit is 2" in refused.stderr
    log = json.loads(run(BOB, "log", "--actor", BOB, "--json").stdout)
    assert ("edit.pending", BOB) in [(e["kind"], e["actor"]) for e in log]
    with Store(run.url) as store:
        assert [(e.status, e.submitted_by, e.reviewed_by) for e in store.list_edits(oldest_first=True)] == [
            ("pending", ALICE, BOB), ("pending", BOB, "policy:ops"), ("proposed", ALICE, None)]
        assert ("review.approved", "policy:ops") in _events(store, 2)
        claimed = store.claim_batch(10, base_model="m")
        assert [e.id for e in claimed.edits] == [1, 2]  # never the proposed edit 3


# ------------------------------------------------------------------------ two roles on PostgreSQL

@pytest.fixture
def pg_roles(request, backend, db_url):
    if backend != "postgresql":
        pytest.skip("roles are PostgreSQL's")
    admin = create_engine(db_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.connection.driver_connection.execute(ROLES_SQL.read_text())  # no parameters: % stays literal
        for role, group in ((ALICE, "horse_submitters"), (BOB, "horse_reviewers")):
            if conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role}).first() is None:
                conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
            conn.exec_driver_sql(f"GRANT {group} TO {role}")
    admin.dispose()
    return {r: make_url(db_url).set(username=r).render_as_string(hide_password=False) for r in (ALICE, BOB)}


def _cli(url: str, *args: str):
    return CliRunner().invoke(cli, ["--db", url, *args], catch_exceptions=False)


def test_two_roles_on_postgresql(pg_roles, db_url, monkeypatch):
    monkeypatch.setenv("HORSE_LEDGER_REVIEW", "auto")  # the default: on for PostgreSQL
    alice, bob = pg_roles[ALICE], pg_roles[BOB]
    r = _cli(alice, *_add(1), "--json")  # review is on by default for PostgreSQL
    assert r.exit_code == 0, r.stderr
    edit = json.loads(r.stdout)
    assert (edit["status"], edit["submitted_by"]) == ("proposed", ALICE)
    own = _cli(alice, "review", "approve", "1")
    assert own.exit_code == 1 and "cannot approve" in own.stderr
    engine = create_engine(alice)
    with engine.connect() as conn:  # the database itself refuses what the submitter role may not do
        for sql in ("UPDATE edits SET status = 'pending' WHERE id = 1",
                    "UPDATE edits SET status = 'cancelled' WHERE id = 1",
                    "INSERT INTO edits (subject, prompt, target_new, paraphrases, submitted_at, content_hash, "
                    "key_hash, status, updated_at) VALUES ('x', '{} y', 'z', '[]', now(), 'h', 'k', 'pending', now())"):
            with pytest.raises(DBAPIError, match="permission denied|may only submit proposed"):
                conn.execute(text(sql))
            conn.rollback()
    engine.dispose()
    ok = _cli(bob, "review", "approve", "1")
    assert ok.exit_code == 0, ok.stderr
    with Store(db_url) as store:  # the superuser as the daemon: claims the approved edit only
        second = json.loads(_cli(alice, *_add(2), "--json").stdout)["id"]  # not 2: the refused INSERT took it
        e1 = store.get_edit(1)
        assert (e1.status, e1.reviewed_by, e1.submitted_by) == ("pending", BOB, ALICE)
        assert ("edit.pending", BOB) in _events(store, 1)
        assert [e.id for e in store.claim_batch(10, base_model="m").edits] == [1]
        assert store.get_edit(second).status == "proposed"
