"""Run `horse-ledger ARGS…` as another OS user: python tests/ledger/as_user.py USER ARGS…

Started as root. The interpreter lives under /root (mode 0700), which other users cannot read, so everything
the command needs is imported first; then the process drops to USER for good (real and effective uid and
gid, supplementary groups = USER's), with umask 007 so the group-shared SQLite files stay group-writable.
What the ledger sees is an ordinary process of USER (ledger.review.os_user reads the effective uid).
"""
from __future__ import annotations

import contextlib
import io
import os
import pwd
import sqlite3  # noqa: F401
import sys

import sqlalchemy.dialects.sqlite.pysqlite  # noqa: F401 - loaded lazily by create_engine otherwise

import ledger.cli
import ledger.review
import ledger.review_cli  # noqa: F401
import ledger.store  # noqa: F401
import ledger.validate  # noqa: F401
import migrations

migrations.head_revision()  # reads the scripts now, while /root is readable


def main() -> None:
    user, args = sys.argv[1], sys.argv[2:]
    os.umask(0o007)
    # a read-only command first, as root: whatever the CLI imports on its way is loaded before the drop
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        ledger.cli.main(args[:2] + ["status"])
    pw = pwd.getpwnam(user)
    os.setgroups(os.getgrouplist(user, pw.pw_gid))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    assert ledger.review.os_user() == user
    ledger.cli.main(args)


if __name__ == "__main__":
    main()
