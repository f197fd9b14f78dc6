"""A whole Chiron cluster on one machine (``chiron up``, ``chiron demo``).

Starts, in order, each as its own process waited on by readiness (port file, then gRPC health; etcd and the
gateway by HTTP): etcd, the queue, the router, the OpenAI-compatible gateway, and the scaler with the ``local``
provider, which starts the engine agents (simulated A100 engines by default, real vLLM with ``engine_args``).
Stopping goes the other way round: the gateway first (in-flight requests finish), the scaler (its provider
drains every engine; batch work returns to the queue), then router, queue and etcd.

Every service serves Prometheus metrics on a port of its own (the queue, router and scaler report theirs in
``WORK/NAME.metrics.port``; engines in their etcd record): :meth:`Cluster.metrics_endpoints` lists the URLs.

Security (off by default): ``ClusterConfig.tls`` writes a development CA into ``WORK/certs`` and turns on mutual
TLS on every gRPC hop; ``ClusterConfig.auth_token`` makes the router require that bearer token. Both reach every
part as ``CHIRON_*`` environment variables (:mod:`services.common.security`).

Supervision: every service gets fixed ports when the cluster starts, and :meth:`Cluster.supervise` restarts a
queue, router, gateway or scaler that exited on the SAME ports (clients reconnect within a second:
:mod:`services.common.failover`), with backoff up to 10 s between failed restarts. A dead scaler's engines
serve until the restarted scaler's first interactive engine does, then drain; :meth:`Cluster.stop` stops every
engine process of the cluster (found by its port file under ``WORK/engines``), so nothing outlives ``chiron up``.

The gateway listens on ``ClusterConfig.gateway_port`` (``chiron up``: 8000, as vLLM's server, so the README's
``curl`` works; 0, the default here, a free port for tests). A port in use fails before anything starts
(:class:`PortInUseError`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.etcd_server import EtcdServer
from services.common.security import reset_security_settings, write_dev_certificates
from services.engine.demo import stop_process, wait_healthy, wait_port_file

log = logging.getLogger("chiron.cluster")
SUPERVISED = ("queue", "router", "gateway", "scaler")  # restarted when they exit; in start order

@dataclass
class ClusterConfig:
    """``engine_args``: extra ``chiron engine`` arguments for every engine the scaler starts;
    ``scaler_args``: extra ``chiron scaler`` arguments (limits, intervals); ``gateway_args``: extra ``chiron gateway``
    arguments (e.g. ``--tokenizer MODEL_DIR`` for vLLM engines); ``work_dir``: logs, port files,
    the queue database and etcd's data (a temporary directory when None); ``tls``: mutual TLS between all parts
    with certificates made in ``WORK/certs``; ``auth_token``: the bearer token the router requires (None: none)."""

    engine_args: str = "--backend simulated"
    scaler_args: str = "--interactive 1:4 --mixed 0:2 --batch 0:2 --interval-s 2 --scale-down-delay-s 30"
    gateway_args: str = ""
    work_dir: str | None = None
    ready_timeout_s: float = 120.0
    tls: bool = False
    auth_token: str | None = None
    gateway_port: int = 0  # the gateway's HTTP port on 127.0.0.1 (0 = pick a free one; 'chiron up' asks for 8000)


class PortInUseError(RuntimeError):
    """The gateway's port is taken; the message (one line) names the port and how to choose another."""


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise :class:`PortInUseError` when ``host:port`` cannot be bound because something else holds it (port 0
    always passes). Bound as the gateway binds it (``SO_REUSEADDR``: connections of a server just stopped, in
    TIME_WAIT, do not count as in use)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)  # on Linux bind alone may share a port with a bound but not yet listening socket
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                why = "is in use" if e.errno == errno.EADDRINUSE else "needs privileges"
                raise PortInUseError(f"port {port} {why}; pass --gateway-port N (0 picks a free one)") from e
            raise


FIXED_PORTS = range(20000, 32000)  # below Linux's ephemeral range (32768-60999), as Nomad's dynamic ports
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, for a service that keeps it across restarts. Taken from
    :data:`FIXED_PORTS`, outside the kernel's ephemeral range: a port bound with 0 or an outgoing connection's
    source port cannot take it between this pick and the service's bind (seen in CI with a port from that range:
    the scaler's bind failed). Never the same port twice in one process. Raises OSError when none is free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in random.sample(FIXED_PORTS, 200):
        if port in _handed_out:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise OSError(f"no free port among 200 tried in {FIXED_PORTS.start}-{FIXED_PORTS.stop - 1}")


def vllm_engine_args(model: str | Path, dummy_weights: bool = False) -> str:
    """The ``chiron engine`` arguments of the vLLM engines a local cluster starts on ``model`` (a model directory).

    The model's own weights and dtype, unless ``dummy_weights`` asks for random weights
    (``--load-format dummy``) or the directory was written by ``chiron tiny-model`` (no weights: random ones, in
    float32, the fastest dtype on CPU)."""
    from services.engine.vllm_backend import is_tiny_model

    args = ["--backend", "vllm", "--model", str(model)]
    tiny = is_tiny_model(model)
    if dummy_weights or tiny:
        args += ["--load-format", "dummy"]
    if tiny:
        args += ["--dtype", "float32"]
    return shlex.join(args)


@dataclass
class Cluster:
    work: Path
    etcd: EtcdServer
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    gateway_url: str | None = None  # base URL of the OpenAI-compatible API (http[s]://host:port)
    gateway_port: int = 0  # its HTTP port, fixed at start
    args: dict[str, list[str]] = field(default_factory=dict)  # each supervised part's chiron arguments
    restarts: dict[str, int] = field(default_factory=dict)  # by part: restarts since the cluster started
    config: ClusterConfig | None = None
    on_progress: object = None  # callable(str) for supervision messages, or None
    _supervisor: asyncio.Task | None = None
    _retiring: set = field(default_factory=set)  # tasks draining a dead scaler's engines

    def endpoint(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def live(self) -> list[str]:
        """The parts running now, in stop order (gateway, scaler, router, queue; etcd last)."""
        names = [n for n in ("gateway", "scaler", "router", "queue")
                 if n in self.procs and self.procs[n].poll() is None]
        return [*names, *(["etcd"] if self.etcd.running else [])]

    def _say(self, msg: str) -> None:
        log.info("%s", msg)
        if callable(self.on_progress):
            self.on_progress(msg)

    def supervise(self) -> None:
        """Start the supervision task (idempotent); :meth:`stop` ends it. See the module docstring."""
        if self._supervisor is None or self._supervisor.done():
            self._supervisor = asyncio.create_task(self._supervise(), name="cluster-supervisor")

    async def _supervise(self, interval_s: float = 0.1) -> None:
        retry_at: dict[str, float] = {}
        failures: dict[str, int] = {}
        while True:
            await asyncio.sleep(interval_s)
            for name in SUPERVISED:
                proc = self.procs.get(name)
                if proc is None or name not in self.args or proc.poll() is None:
                    continue
                now = time.monotonic()
                if now < retry_at.get(name, 0.0):
                    continue
                if failures.get(name, 0) == 0:
                    self._say(f"{name} exited with status {proc.returncode}; restarting it on {self._address(name)}")
                old_engines = _engine_processes(self.work / "engines") if name == "scaler" else {}
                try:
                    await _start_part(self, name, self.config or ClusterConfig())
                except (RuntimeError, TimeoutError, OSError) as e:
                    failures[name] = failures.get(name, 0) + 1
                    delay = min(10.0, 0.5 * 2 ** (failures[name] - 1))
                    retry_at[name] = time.monotonic() + delay
                    log.warning("restarting %s failed (%s); trying again in %.1f s", name, e, delay)
                    continue
                failures[name] = 0
                self.restarts[name] = self.restarts.get(name, 0) + 1
                self._say(f"{name} restarted and serving on {self._address(name)}")
                if old_engines:
                    task = asyncio.create_task(self._retire_engines(old_engines))
                    self._retiring.add(task)
                    task.add_done_callback(self._retiring.discard)

    async def stop_supervision(self) -> None:
        """End the supervision task (nothing is restarted any more) and any draining of a dead scaler's engines."""
        for task in (self._supervisor, *self._retiring):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _address(self, name: str) -> str:
        return self.gateway_url if name == "gateway" and self.gateway_url else self.endpoint(name)

    async def _retire_engines(self, old: dict[int, str]) -> None:
        """A dead scaler's engines serve until the restarted scaler has an interactive engine of its own serving
        (at most the ready timeout), then drain (SIGTERM)."""
        from services.common.membership import MembershipWatcher

        timeout_s = self.config.ready_timeout_s if self.config else 120.0
        ids = set(old.values())
        with contextlib.suppress(Exception):
            async with MembershipWatcher(self.etcd.endpoint) as watcher:
                await watcher.wait_for(lambda m: any(i.role == "interactive" and i.state == "serving" and iid not in ids
                                                     for iid, i in m.items()), timeout_s=timeout_s)
        self._say(f"draining {len(old)} engine(s) of the scaler that exited: {', '.join(sorted(ids))}")
        await asyncio.to_thread(_stop_pids, list(old), 30.0)

    def endpoints(self) -> dict[str, str]:
        return {"etcd": self.etcd.endpoint, **{n: self.endpoint(n) for n in self.ports},
                **({"gateway (OpenAI API)": f"{self.gateway_url}/v1"} if self.gateway_url else {})}

    async def metrics_endpoints(self) -> dict[str, str]:
        """The /metrics URL of every service: queue, router, scaler, and each engine registered in etcd now (by
        instance id, from its ``metrics_address`` label). Raises MembershipError when etcd cannot be read."""
        from services.common.membership import MembershipWatcher

        urls = {n: f"http://127.0.0.1:{p}/metrics" for n, p in self.metrics_ports.items()}
        async with MembershipWatcher(self.etcd.endpoint) as watcher:
            members = watcher.snapshot()
        for iid, m in sorted(members.items()):
            if "metrics_address" in m.labels:
                urls[iid] = f"http://{m.labels['metrics_address']}/metrics"
        return urls

    async def stop(self, grace_s: float = 60.0) -> None:
        """Supervision ends; gateway first (in-flight HTTP requests finish), scaler (it drains the engines it
        started), any engine process of this cluster still running (e.g. a dead scaler's), then router, queue,
        etcd."""
        await self.stop_supervision()
        for name in ("gateway", "scaler", "router", "queue"):
            p = self.procs.get(name)
            if p is not None:
                await asyncio.to_thread(stop_process, p, grace_s)
            if name == "scaler":
                left = _engine_processes(self.work / "engines")
                if left:
                    await asyncio.to_thread(_stop_pids, list(left), grace_s)
        await asyncio.to_thread(self.etcd.stop)


def _engine_processes(engines_dir: Path) -> dict[int, str]:
    """Running ``chiron engine`` processes whose port file is in ``engines_dir`` (the local provider's work
    directory of this cluster), by pid → instance id. Read from /proc (Linux); empty elsewhere."""
    found: dict[int, str] = {}
    prefix = str(engines_dir) + os.sep
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return found
    for d in proc_dir.iterdir():
        if not d.name.isdigit():
            continue
        try:
            args = [a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if "engine" not in args or "--port-file" not in args:
            continue
        i = args.index("--port-file")
        if i + 1 < len(args) and args[i + 1].startswith(prefix):
            iid = args[args.index("--instance-id") + 1] if "--instance-id" in args[:-1] else "?"
            found[int(d.name)] = iid
    return found


def _stop_pids(pids: list[int], grace_s: float) -> None:
    """SIGTERM each process (an engine drains), SIGKILL those still running after ``grace_s``."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _running(p)]
        if alive:
            time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped by its parent, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def spawn_chiron(work: Path, name: str, args: list[str], port: int = 0) -> tuple[subprocess.Popen, Path]:
    """``chiron ARGS --port PORT --port-file WORK/NAME.port`` (PORT 0: a free one) as a subprocess logging to
    ``WORK/NAME.log``, in its own session. Returns the process and its port file (the service writes its port
    there once serving)."""
    port_file = work / f"{name}.port"
    port_file.write_text("")
    cmd = [sys.executable, "-m", "services.cli", *args, "--port", str(port), "--port-file", str(port_file)]
    proc = subprocess.Popen(cmd, stdout=(work / f"{name}.log").open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, port_file


async def start_cluster(cfg: ClusterConfig, on_progress=None) -> Cluster:
    """Start everything and wait until it serves. Raises RuntimeError (a part exited, with its log's path),
    TimeoutError, or :class:`~services.common.etcd_server.EtcdNotFound` (no etcd binary: the message says how
    to install it), :class:`PortInUseError` (``cfg.gateway_port`` is taken; raised before anything starts). On
    failure, whatever was started is stopped again."""
    check_port_free(cfg.gateway_port)
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="chiron-cluster-"))
    work.mkdir(parents=True, exist_ok=True)
    say = on_progress or (lambda _msg: None)
    _export_security(cfg, work)
    etcd = EtcdServer(work / "etcd")
    await asyncio.to_thread(etcd.start)
    cluster = Cluster(work, etcd, config=cfg, on_progress=on_progress)
    say(f"etcd serving on {etcd.endpoint}")
    # Fixed ports, picked once: a part restarted by the supervisor serves where its clients dial it.
    for name in ("queue", "router", "scaler"):
        cluster.ports[name] = free_port()
        cluster.metrics_ports[name] = free_port()
    cluster.gateway_port = cfg.gateway_port or free_port()  # the gateway's /metrics is on this port too
    queue = cluster.endpoint("queue")
    engine_args = f"{cfg.engine_args} --queue {queue} --metrics-port 0"
    cluster.args = {
        "queue": ["queue", "--db", str(work / "queue.db")],
        "router": ["router", "--etcd", etcd.endpoint, "--queue", queue],
        "gateway": ["gateway", "--router", cluster.endpoint("router"), *shlex.split(cfg.gateway_args)],
        "scaler": ["scaler", "--etcd", etcd.endpoint, "--queue", queue, "--provider", "local",
                   "--work-dir", str(work / "engines"), "--engine-args", engine_args, *shlex.split(cfg.scaler_args)],
    }
    try:
        for name in SUPERVISED:
            await _start_part(cluster, name, cfg)
            say(f"gateway serving the OpenAI API on {cluster.gateway_url}/v1" if name == "gateway" else
                f"{name} serving on {cluster.endpoint(name)}")
        await _wait_for_engines(cluster, cfg)
        say("the scaler's first engine instances are registered and serving")
    except BaseException:
        await cluster.stop(grace_s=10)
        raise
    cluster.supervise()
    return cluster


def _export_security(cfg: ClusterConfig, work: Path) -> None:
    """Put ``cfg``'s TLS and token settings into this process's environment (inherited by every part)."""
    env: dict[str, str] = {}
    if cfg.tls:
        certs = write_dev_certificates(work.resolve() / "certs")
        env |= {"CHIRON_TLS_CERT": str(certs["server"]), "CHIRON_TLS_KEY": str(certs["server_key"]),
                "CHIRON_TLS_CA": str(certs["ca"])}
    if cfg.auth_token:
        env |= {"CHIRON_AUTH_TOKENS": cfg.auth_token, "CHIRON_TOKEN": cfg.auth_token}
    if env:
        os.environ.update(env)
        reset_security_settings()


async def _wait_for_engines(cluster: Cluster, cfg: ClusterConfig) -> None:
    """Until at least one INTERACTIVE instance serves (the scaler starts its minimum at once)."""
    from services.common.membership import MembershipWatcher

    watcher = MembershipWatcher(cluster.etcd.endpoint)
    await watcher.start()
    try:
        await watcher.wait_for(lambda m: any(i.role == "interactive" and i.state == "serving" for i in m.values()),
                               timeout_s=cfg.ready_timeout_s)
    except TimeoutError as e:
        raise RuntimeError(f"no engine instance registered within {cfg.ready_timeout_s:g} s; see "
                           f"{cluster.work / 'scaler.log'} and {cluster.work / 'engines'}") from e
    finally:
        await watcher.stop()


def _start_failed(cluster: Cluster, name: str, e: Exception) -> RuntimeError:
    """The error for a part that did not start: the cause and the end of its log."""
    tail = ""
    with contextlib.suppress(OSError):
        tail = (cluster.work / f"{name}.log").read_text()[-2000:]
    return RuntimeError(f"{name} failed to start: {e}\n--- {cluster.work / (name + '.log')} ---\n{tail}")


async def _start_part(cluster: Cluster, name: str, cfg: ClusterConfig) -> None:
    """Start (or restart) part ``name`` with its arguments on its fixed ports and wait until it serves."""
    if name == "gateway":
        await _start_gateway(cluster, cfg)
        return
    metrics_pf = cluster.work / f"{name}.metrics.port"
    metrics_pf.write_text("")
    proc, pf = spawn_chiron(cluster.work, name, [*cluster.args[name], "--metrics-port", str(cluster.metrics_ports[name]),
                                                 "--metrics-port-file", str(metrics_pf)], port=cluster.ports[name])
    cluster.procs[name] = proc
    try:
        port = await wait_port_file(pf, proc, timeout_s=cfg.ready_timeout_s)
        await wait_healthy(f"127.0.0.1:{port}", timeout_s=cfg.ready_timeout_s, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        raise _start_failed(cluster, name, e) from e


async def wait_http_ready(base_url: str, timeout_s: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    """Poll ``GET base_url/health`` until it answers 200 (HTTPS verified with ``CHIRON_TLS_CA`` when set). Raises
    TimeoutError, or RuntimeError when ``proc`` exits first."""
    import ssl
    import time

    import httpx

    from services.common.security import security_settings

    s = security_settings()
    verify: ssl.SSLContext | bool = True
    if s.tls_ca is not None:
        verify = ssl.create_default_context(cafile=str(s.tls_ca))
        verify.check_hostname = s.tls_server_name is None  # certificates named for another host: CA check only
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(verify=verify, timeout=2.0) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with status {proc.returncode} before {base_url} answered")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{base_url}/health")).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url}/health did not answer within {timeout_s:.0f} s")
            await asyncio.sleep(0.1)


async def _start_gateway(cluster: Cluster, cfg: ClusterConfig) -> None:
    """``chiron gateway`` over the router, waited on by its HTTP /health; HTTPS when TLS is configured."""
    from services.common.security import security_settings

    name = "gateway"
    proc, pf = spawn_chiron(cluster.work, name, cluster.args[name], port=cluster.gateway_port)
    cluster.procs[name] = proc
    scheme = "https" if security_settings().tls_enabled else "http"
    try:
        port = await wait_port_file(pf, proc, timeout_s=cfg.ready_timeout_s)
        await wait_http_ready(f"{scheme}://127.0.0.1:{port}", timeout_s=cfg.ready_timeout_s, proc=proc)
    except (RuntimeError, TimeoutError) as e:
        raise _start_failed(cluster, name, e) from e
    cluster.gateway_url = f"{scheme}://127.0.0.1:{port}"
    if scheme == "http":  # its /metrics is on its own port (Cluster.metrics_endpoints lists plain-HTTP endpoints)
        cluster.metrics_ports[name] = port
    else:
        cluster.metrics_ports.pop(name, None)
