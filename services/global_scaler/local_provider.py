"""The ``local`` instance provider: ``chiron engine`` processes on this machine.

Scaling up starts ``chiron engine --role ROLE --etcd ENDPOINT ...`` subprocesses on free ports; each
registers itself in etcd once it serves (the scaler sees it through membership, not through this
provider). A process that exits during start-up is restarted with exponential backoff up to
``start_attempts`` times, then reported (:attr:`LocalProvider.errors`, and :class:`ProviderError` from the
next :meth:`set_count`). One that exits after it served is no longer counted (a warning says so): the
scaler's next decision starts a replacement if the role still needs one. Scaling down drains: the newest
instance gets SIGTERM, its agent stops taking new requests (UNAVAILABLE), lets running ones finish (up to the
agent's grace period), deregisters and exits; SIGKILL only after ``drain_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from services.global_scaler.providers import ROLES, InstanceCounts, InstanceProvider, ProviderError

log = logging.getLogger("chiron.scaler.local")


@dataclass
class _Instance:
    instance_id: str
    role: str
    proc: subprocess.Popen
    port_file: Path
    attempts: int = 1
    ready: bool = False
    draining: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)


class LocalProvider(InstanceProvider):
    """Runs engine agents as local processes (see the module docstring).

    ``engine_args``: extra ``chiron engine`` arguments (e.g. ``["--backend", "simulated", "--speedup", "10"]``);
    ``etcd``: the endpoint the agents register at ("host:port"); ``work_dir``: port files and logs;
    ``ready_timeout_s``: how long a start may take before it counts as failed [s].
    """

    name = "local"

    def __init__(self, engine_args: list[str], etcd: str, work_dir: str | Path, *, ready_timeout_s: float = 60.0,
                 drain_timeout_s: float = 60.0, start_attempts: int = 3, backoff_s: float = 0.5) -> None:
        self.engine_args = list(engine_args)
        self.etcd = etcd
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.ready_timeout_s = ready_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.start_attempts = start_attempts
        self.backoff_s = backoff_s
        self._instances: dict[str, list[_Instance]] = {r: [] for r in ROLES}
        self._draining: list[_Instance] = []
        self.errors: list[str] = []  # start failures since the last set_count (reported there)

    # ---- process management ------------------------------------------------------------------
    def _spawn(self, role: str, instance_id: str) -> tuple[subprocess.Popen, Path]:
        port_file = self.work_dir / f"{instance_id}.port"
        port_file.write_text("")
        cmd = [sys.executable, "-m", "services.cli", "engine", "--port", "0", "--port-file", str(port_file),
               "--role", role, "--instance-id", instance_id, "--etcd", self.etcd, *self.engine_args]
        logf = (self.work_dir / f"{instance_id}.log").open("a")
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                start_new_session=True)
        logf.close()
        return proc, port_file

    async def _watch_start(self, inst: _Instance) -> None:
        """Wait for the port file (the agent writes it once serving); restart with backoff if it dies."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        while True:
            if inst.port_file.exists() and inst.port_file.read_text().strip():
                inst.ready = True
                log.info("instance %s (%s) is serving", inst.instance_id, inst.role)
                return
            died = inst.proc.poll() is not None
            if died or loop.time() > deadline:
                if not died:
                    inst.proc.kill()
                    inst.proc.wait()
                why = (f"exited with status {inst.proc.returncode}" if died else
                       f"not serving after {self.ready_timeout_s:g} s")
                if inst.attempts >= self.start_attempts:
                    msg = (f"instance {inst.instance_id} ({inst.role}) failed to start {inst.attempts} times: {why}; "
                           f"see {self.work_dir / (inst.instance_id + '.log')}")
                    log.error(msg)
                    self.errors.append(msg)
                    with contextlib.suppress(ValueError):
                        self._instances[inst.role].remove(inst)
                    return
                delay = self.backoff_s * 2 ** (inst.attempts - 1)
                log.warning("instance %s %s; restarting in %.1f s (attempt %d of %d)", inst.instance_id, why, delay,
                            inst.attempts + 1, self.start_attempts)
                await asyncio.sleep(delay)
                inst.attempts += 1
                inst.proc, inst.port_file = self._spawn(inst.role, inst.instance_id)
                deadline = loop.time() + self.ready_timeout_s
                continue
            await asyncio.sleep(0.05)

    async def _drain(self, inst: _Instance) -> None:
        inst.draining = True
        if inst.proc.poll() is None:
            inst.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        while inst.proc.poll() is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if inst.proc.poll() is None:
            log.warning("instance %s did not drain within %g s: killing it", inst.instance_id, self.drain_timeout_s)
            inst.proc.kill()
            inst.proc.wait()
        with contextlib.suppress(ValueError):
            self._draining.remove(inst)
        log.info("instance %s (%s) drained and stopped (status %s)", inst.instance_id, inst.role, inst.proc.returncode)

    def _forget_exited(self, role: str) -> None:
        """Drop instances of ``role`` that exited after they served (crashed or killed): neither running nor
        starting, so not counted; the scaler starts a replacement if the role still needs one."""
        for inst in [i for i in self._instances[role] if i.ready and i.proc.poll() is not None]:
            self._instances[role].remove(inst)
            log.warning("instance %s (%s) exited with status %s after serving; no longer counted", inst.instance_id,
                        inst.role, inst.proc.returncode)

    # ---- InstanceProvider ----------------------------------------------------------------------
    async def set_count(self, role: str, count: int, reason: str = "") -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; roles are {ROLES}")
        if count < 0:
            raise ValueError(f"count must be >= 0 (got {count})")
        errors, self.errors = self.errors, []
        self._forget_exited(role)
        live = self._instances[role]
        while len(live) < count:
            iid = f"local-{role}-{uuid.uuid4().hex[:8]}"
            proc, pf = self._spawn(role, iid)
            inst = _Instance(iid, role, proc, pf)
            inst.task = asyncio.create_task(self._watch_start(inst), name=f"start-{iid}")
            live.append(inst)
            log.info("starting instance %s (%s)%s", iid, role, f": {reason}" if reason else "")
        while len(live) > count:
            # Newest first: a starting instance holds no work yet; then the most recently started one.
            inst = next((i for i in reversed(live) if not i.ready), live[-1])
            live.remove(inst)
            if inst.task is not None:
                inst.task.cancel()
            self._draining.append(inst)
            inst.task = asyncio.create_task(self._drain(inst), name=f"drain-{inst.instance_id}")
            log.info("draining instance %s (%s)%s", inst.instance_id, role, f": {reason}" if reason else "")
        if errors:
            raise ProviderError("; ".join(errors))

    async def counts(self, role: str) -> InstanceCounts:
        self._forget_exited(role)
        live = self._instances[role]
        running = sum(1 for i in live if i.ready and i.proc.poll() is None)
        return InstanceCounts(running=running, pending=len(live) - running)

    def instance_ids(self, role: str) -> list[str]:
        return [i.instance_id for i in self._instances[role]]

    async def close(self) -> None:
        """Drain every instance this provider started and wait for them to stop."""
        for role in ROLES:
            for inst in list(self._instances[role]):
                if inst.task is not None:
                    inst.task.cancel()
                self._instances[role].remove(inst)
                self._draining.append(inst)
                inst.task = asyncio.create_task(self._drain(inst))
        tasks = [i.task for i in list(self._draining) if i.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
