"""A throwaway PostgreSQL server on loopback for tests: `initdb` + `pg_ctl` in a temp folder.

    from helpers.postgres import postgres_url  # noqa: F401  (the fixture)

    def test_x(postgres_url): ...      # "postgresql+psycopg2://evomerge@127.0.0.1:PORT/postgres"

The server binaries come from the Debian `postgresql` package (`.ci/run` installs it where it is
missing). PostgreSQL refuses to run as root, so as root the cluster is owned by and run as the
`postgres` user (created by that package). Trust authentication, 127.0.0.1 only, and a socket
in the cluster folder: nothing outside the test can see it. Skips, naming the cause, when the
binaries, the driver or the user are missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url():
    """SQLAlchemy URL of a fresh PostgreSQL server, stopped and deleted after the session."""
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the `dev` extra) is not installed")
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries not found (apt-get install -y postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))  # /tmp: reachable by another user
    if os.geteuid() == 0:
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", _free_port()

    def run(*cmd: str) -> None:
        done = subprocess.run(
            [*as_user, *cmd], check=False, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}{log}")

    try:
        run(initdb, "-D", str(data), "-U", "evomerge", "--auth=trust", "--no-sync", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off"
        run(pg_ctl, "-D", str(data), "-o", options, "-l", str(folder / "server.log"), "-w", "start")
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield f"postgresql+psycopg2://evomerge@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
            timeout=60,
        )
        time.sleep(0.2)
        shutil.rmtree(folder, ignore_errors=True)
