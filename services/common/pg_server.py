"""A throw-away local PostgreSQL server for tests and local clusters (``chiron chaos``): ``initdb`` into a fresh
temporary folder, ``pg_ctl start`` on a free loopback port, ``pg_ctl stop -m immediate`` and the folder removed.

Binaries: ``initdb``/``pg_ctl`` on PATH, else Debian's ``/usr/lib/postgresql/<version>/bin`` (newest first;
``.ci/run`` installs Debian's ``postgresql``). PostgreSQL refuses to run as root, so as root the server runs as the
``postgres`` user (``runuser``) in a folder of its own (pytest's 0700 ``tmp_path`` is closed to that user).
``fsync`` off by default (tests and chaos runs, not durability); ``fsync=True`` for honest durable numbers.

Raises FileNotFoundError when the binaries (or, as root, the ``postgres`` user) are missing, RuntimeError with
PostgreSQL's own message when the server does not start.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def pg_bin() -> str | None:
    """The folder of PostgreSQL's server binaries (``initdb``, ``pg_ctl``), or None."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))

    def version(path: str) -> int:
        v = path.split("/")[-2]
        return int(v) if v.isdigit() else 0
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    return None


class PostgresServer:
    """One local PostgreSQL cluster (module docstring). ``admin_url``: its ``postgres`` database; :meth:`url`,
    :meth:`create_database` / :meth:`drop_database` for one database per test; :meth:`pids`: the postmaster and
    its children (for freezing or killing a whole local cluster)."""

    def __init__(self, fsync: bool = False, max_connections: int = 200) -> None:
        self.bin = pg_bin()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in "
                                    "/usr/lib/postgresql/*/bin; install them (Debian: apt-get install postgresql)")
        self.fsync, self.max_connections = fsync, max_connections
        self.dir = tempfile.mkdtemp(prefix="chiron-pg-")
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            import pwd
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError as e:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise FileNotFoundError("running as root needs a 'postgres' user to run PostgreSQL as") from e
            os.chmod(self.dir, 0o755)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.run_as = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.data = os.path.join(self.dir, "data")
        self.admin_url = self.url("postgres")

    def _run(self, *args: str) -> None:
        subprocess.run([*self.run_as, *args], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> PostgresServer:
        """initdb and start; returns self."""
        durable = "" if self.fsync else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        try:
            self._run(os.path.join(self.bin, "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8",
                      "--no-sync")
            self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w",
                      "-t", "60", "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 {durable}"
                      f"-c max_connections={self.max_connections}", "start")
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"could not start PostgreSQL: {e.stderr or e.stdout}") from e
        return self

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name} TEMPLATE template0")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")

    def pids(self) -> list[int]:
        """The postmaster's pid and its children's (from ``/proc``; Linux), [] when it is not running."""
        try:
            main = int(Path(self.data, "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        kids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    if int(Path(d, "stat").read_text().rsplit(")", 1)[1].split()[1]) == main:
                        kids.append(int(d.name))
        return [main, *kids]

    def stop(self) -> None:
        """Stop at once (``-m immediate``) and remove the folder; never raises."""
        with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError):
            self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
