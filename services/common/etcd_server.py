"""A real, single-member etcd server on free loopback ports with its own data directory: what the tests,
the benchmarks and a local cluster (``chiron up``) run membership on.

Readiness is etcd's own ``GET /health`` answering ``{"health":"true"}`` (it needs an elected leader and a
served read), polled — never a fixed sleep. The binary comes from ``$CHIRON_ETCD_BIN``, ``PATH`` or
``/usr/bin/etcd`` (Debian: ``apt-get install etcd-server``, etcd 3.4); :class:`EtcdNotFound` when there
is none (``tests/conftest.py`` turns that into a skip, or a failure in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class EtcdNotFound(RuntimeError):
    """No etcd binary on this machine."""


def find_etcd_binary() -> str | None:
    """Path of the etcd binary, or None."""
    for candidate in (os.environ.get("CHIRON_ETCD_BIN"), shutil.which("etcd"), "/usr/bin/etcd"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def require_etcd_binary() -> str:
    """The etcd binary. Raises :class:`EtcdNotFound` with the install command when there is none."""
    binary = find_etcd_binary()
    if binary is None:
        raise EtcdNotFound("etcd binary not found: install it (apt-get install -y etcd-server) or set CHIRON_ETCD_BIN")
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """One etcd process. ``start()`` / ``stop()`` / ``kill()`` / ``restart()``; ``endpoint`` is ``127.0.0.1:port``.

    Ports and data directory are chosen once, so :meth:`restart` brings back the same member with the same
    data (keys, leases, revisions). ``tmp_path``: directory for the data dir and ``etcd.log`` (created if
    missing). Raises :class:`EtcdNotFound` when there is no etcd binary.
    """

    def __init__(self, tmp_path: Path, *, name: str = "chiron-test", binary: str | None = None) -> None:
        self.binary = binary or require_etcd_binary()
        self.name = name
        self.data_dir = Path(tmp_path) / "etcd-data"
        self.log_path = Path(tmp_path) / "etcd.log"
        self.client_port = _free_port()
        self.peer_port = _free_port()
        while self.peer_port == self.client_port:
            self.peer_port = _free_port()
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def endpoint(self) -> str:
        """``127.0.0.1:<client port>`` (what :mod:`services.common.membership` takes)."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _command(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [
            self.binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.url,
            "--advertise-client-urls", self.url,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"chiron-test-{self.client_port}",
            # Faster leader election on start/restart; the minimum lease TTL stays 2 s (1.5 election timeouts).
            "--heartbeat-interval", "50",
            "--election-timeout", "500",
            "--logger", "zap",
            "--log-outputs", "stderr",
            "--log-level", "warn",
        ]

    def start(self, timeout_s: float = 30.0) -> None:
        """Start etcd and wait until ``/health`` is true; raises RuntimeError (with the log's tail) on failure."""
        if self.running:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        self._log = open(self.log_path, "ab")  # kept open for the life of the process
        self.proc = subprocess.Popen(self._command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd not healthy within {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def healthy(self) -> bool:
        """One ``GET /health`` probe: True when etcd reports ``"health": "true"``."""
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1.0) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s`` [s]; waits for the process to exit. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout_s)
        self._close_log()

    def kill(self) -> None:
        """SIGKILL (a crash); waits for the process to exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10.0)
        self._close_log()

    def restart(self, timeout_s: float = 30.0) -> None:
        """Stop and start again on the same ports and data dir; returns when healthy."""
        self.stop()
        self.start(timeout_s)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no etcd log)"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
