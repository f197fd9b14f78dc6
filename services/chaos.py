"""``chiron chaos``: faults injected into a replicated local cluster under load, and what each one cost.

**Cluster** (built from the services' entry points: ``chiron up`` runs one replica of each): one PostgreSQL
(:mod:`services.common.pg_server`), a three-member etcd (:class:`EtcdCluster`), two replicas each of ``chiron
queue`` (one database), ``router`` (each over both queues), ``gateway`` (each over both routers) and ``scaler``
(``--election``; its local provider starts simulated engines with a static batch size). Fixed ports; a
supervisor here restarts any replica that exits on the same port, as ``chiron up`` does.

**Load**: the Azure conversation trace streamed as ``/v1/completions`` through both gateways at ``load`` (0.8) ×
the interactive slots (Little's law), plus one OpenAI Batch API job per fault. The client acts as an OpenAI
client with two base URLs: a connection error or 5xx before the answer starts goes to the other gateway, a
503/429 waits its ``Retry-After`` (≤ 2 s), a stream cut after it started is retried from the start
(``interactive_restarted``; ``gateway_connections_cut`` when its gateway was the one killed).

**Faults** (:data:`FAULTS`, ``fault_interval_s`` apart): SIGKILL one replica of queue, router, gateway and
scaler (the leader), SIGKILL one engine, SIGSTOP the etcd leader for ``stall_s``, and SIGSTOP every process
of the cluster for ``stall_s`` (a host stall).

**Per fault**: ``interactive_failed`` (requests of the fault's slot never completed within
``request_deadline_s``), ``interactive_duplicated_tokens`` (tokens beyond ``max_tokens``, or a usage count
unlike the tokens streamed), ``batch_lost`` (lines of the slot's job without a 200 answer of all their tokens),
``batch_completed_twice`` (lines answered twice or with more tokens than asked), ``recovery_s``: from the end
of the fault (the SIGKILL, or the SIGCONT) until a request through every gateway has succeeded AND the scaler
replica holding the leadership has made a decision after the fault; ``replica_back_s``: until every replica and
etcd member answers its health check again. Targets (:func:`targets_met`): the four counts 0; ``recovery_s`` ≤
leader TTL + 5 s for the scaler, the etcd stop and the freeze, ≤ 5 s otherwise. ``duplicated_requests``
lists each try that streamed more tokens than asked, with the log lines that name its gateway request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from services.cluster import _engine_processes, _stop_pids, free_port
from services.common.etcd_server import EtcdServer, require_etcd_binary
from services.common.pg_server import PostgresServer

log = logging.getLogger("chiron.chaos")

FAULTS = ("queue", "router", "gateway", "scaler", "engine", "etcd-leader", "freeze")
SLOW_FAULTS = ("scaler", "etcd-leader", "freeze")  # recovery target: leader TTL + 5 s (others: 5 s)
QUICK_FAULTS = ("gateway", "router", "engine")
MODEL = "llama-3-8b"
SERVICES = ("queue", "router", "gateway", "scaler")
REPLICAS = ("a", "b")


@dataclass
class ChaosConfig:
    """``minutes``: when > 0, ``fault_interval_s`` is spread so the faults fill about that long; ``stall_s``: how
    long the etcd leader stays stopped and the cluster frozen [s]; ``load``: target fraction of the interactive
    slots in use; ``speedup``: the simulated engines' clock (and the trace's pace) speed-up."""

    faults: tuple[str, ...] = FAULTS
    minutes: float = 0.0
    fault_interval_s: float = 40.0
    stall_s: float = 30.0
    warmup_s: float = 10.0
    leader_ttl_s: int = 10
    interactive_engines: int = 2
    batch_size: int = 8  # each INTERACTIVE engine's static batch size [requests]
    load: float = 0.8
    speedup: float = 4.0
    max_output_tokens: int = 128
    batch_lines: int = 20  # lines of each fault's Batch API job
    batch_max_tokens: int = 32
    request_deadline_s: float = 180.0
    drain_timeout_s: float = 120.0
    ready_timeout_s: float = 120.0
    recovery_timeout_s: float = 90.0
    lease_timeout_s: float = 60.0
    work_dir: str | None = None
    seed: int = 0

    @classmethod
    def quick(cls, faults: tuple[str, ...] | None = None, **kw) -> ChaosConfig:
        """A short run: a few faults, 5-s stalls, small jobs, shorter gaps."""
        base = dict(faults=faults or QUICK_FAULTS, fault_interval_s=8.0, stall_s=5.0, warmup_s=3.0,
                    max_output_tokens=48, batch_lines=6, batch_max_tokens=16, drain_timeout_s=60.0, speedup=8.0,
                    load=0.5)
        return cls(**{**base, **kw})

    def recovery_target_s(self, fault: str) -> float:
        return self.leader_ttl_s + 5.0 if fault in SLOW_FAULTS else 5.0


# ------------------------------------------------------------------------------------------------------------
# PostgreSQL and a three-member etcd cluster
# ------------------------------------------------------------------------------------------------------------
class EtcdMember(EtcdServer):
    """One member of an :class:`EtcdCluster`: :class:`EtcdServer` with the whole cluster's ``--initial-cluster``."""

    def __init__(self, tmp_path: Path, name: str, binary: str) -> None:
        super().__init__(tmp_path, name=name, binary=binary)
        self.initial_cluster = ""
        self.token = ""

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def _command(self) -> list[str]:
        cmd = super()._command()
        cmd[cmd.index("--initial-cluster") + 1] = self.initial_cluster
        cmd[cmd.index("--initial-cluster-token") + 1] = self.token
        return cmd

    def member_id(self) -> str | None:
        return (self.status() or {}).get("header", {}).get("member_id")

    def status(self) -> dict | None:
        """etcd's Maintenance.Status through its JSON gateway (``leader``, ``header.member_id``), or None."""
        req = urllib.request.Request(f"{self.url}/v3/maintenance/status", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=1.0) as resp:
                return json.loads(resp.read())
        except (OSError, ValueError):
            return None


class EtcdCluster:
    """Three (``n``) etcd members on loopback, one ``--initial-cluster``; ``endpoints``: ``a:1,b:2,c:3``."""

    def __init__(self, work: Path, n: int = 3) -> None:
        binary = require_etcd_binary()
        self.members = [EtcdMember(work / f"etcd{i}", f"etcd{i}", binary) for i in range(n)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.initial_cluster, m.token = initial, f"chiron-chaos-{self.members[0].client_port}"

    @property
    def endpoints(self) -> str:
        return ",".join(m.endpoint for m in self.members)

    async def start(self, timeout_s: float = 60.0) -> None:
        """Start every member at once (each waits for a quorum to report healthy)."""
        await asyncio.gather(*(asyncio.to_thread(m.start, timeout_s) for m in self.members))

    def healthy(self) -> bool:
        return all(m.healthy() for m in self.members)

    def leader(self) -> EtcdMember | None:
        for m in self.members:
            s = m.status()
            if s and str(s.get("leader")) == str(s.get("header", {}).get("member_id")):
                return m
        return None

    def pids(self) -> list[int]:
        return [m.proc.pid for m in self.members if m.proc is not None and m.proc.poll() is None]

    def stop(self) -> None:
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(m.proc.pid, signal.SIGCONT)
            m.stop()


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in parents.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


# ------------------------------------------------------------------------------------------------------------
# The replicated cluster
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Part:
    name: str  # e.g. "router-a"
    args: list[str]
    port: int
    proc: subprocess.Popen | None = None
    restarts: int = 0


class ChaosCluster:
    """PostgreSQL, etcd ×3, and two replicas of queue, router, gateway, scaler on fixed ports, supervised."""

    def __init__(self, cfg: ChaosConfig, work: Path, say=lambda _m: None) -> None:
        self.cfg, self.work, self.say = cfg, work, say
        self.pg = PostgresServer()
        self.etcd = EtcdCluster(work)
        self.parts: dict[str, _Part] = {}
        self._supervisor: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.paused = False  # the freeze: no restarts while everything is stopped

    def addresses(self, service: str) -> list[str]:
        return [f"127.0.0.1:{self.parts[f'{service}-{r}'].port}" for r in REPLICAS]

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://{a}" for a in self.addresses("gateway")]

    async def start(self) -> None:
        cfg, work = self.cfg, self.work
        await asyncio.gather(asyncio.to_thread(self.pg.start), self.etcd.start(cfg.ready_timeout_s))
        self.say(f"PostgreSQL on 127.0.0.1:{self.pg.port}; etcd cluster {self.etcd.endpoints}")
        ports = {f"{s}-{r}": free_port() for s in SERVICES for r in REPLICAS}
        q = {r: f"127.0.0.1:{ports[f'queue-{r}']}" for r in REPLICAS}
        rt = {r: f"127.0.0.1:{ports[f'router-{r}']}" for r in REPLICAS}
        etcd = self.etcd.endpoints
        engine_args = (f"--backend simulated --speedup {cfg.speedup:g} --static-batch-size {cfg.batch_size} "
                       f"--queue {q['a']},{q['b']}")
        n = cfg.interactive_engines
        args = {}
        for r, other in (("a", "b"), ("b", "a")):
            args[f"queue-{r}"] = ["queue", "--db", self.pg.admin_url, "--lease-timeout-s", f"{cfg.lease_timeout_s:g}"]
            args[f"router-{r}"] = ["router", "--etcd", etcd, "--queue", f"{q[r]},{q[other]}"]  # fails over
            args[f"gateway-{r}"] = ["gateway", "--router", f"{rt[r]},{rt[other]}"]
            args[f"scaler-{r}"] = ["scaler", "--etcd", etcd, "--queue", q[r], "--provider", "local", "--election",
                                   "--leader-ttl-s", str(cfg.leader_ttl_s), "--work-dir", str(work / "engines"),
                                   "--engine-args", engine_args, "--interactive", f"{n}:{n}", "--mixed", "0:0",
                                   "--batch", "1:1", "--interval-s", "1", "--scale-down-delay-s", "30",
                                   "--model-load-time-s", "5"]
        self.parts = {name: _Part(name, args[name], ports[name]) for name in args}
        # The queue first (the schema is made once), then the rest at once.
        await self._start_parts(["queue-a"])
        await self._start_parts(["queue-b", "router-a", "router-b"])
        await self._start_parts(["gateway-a", "gateway-b", "scaler-a"])
        await self._start_parts(["scaler-b"])
        self.say("queue, router, gateway, scaler: two replicas each, serving")
        await self.wait_engines(n, timeout_s=cfg.ready_timeout_s)
        self.say(f"{n} interactive engine(s) and a batch engine serving")
        self._supervisor = asyncio.create_task(self._supervise())

    def _spawn(self, part: _Part) -> None:
        cmd = [sys.executable, "-m", "services.cli", *part.args, "--port", str(part.port)]
        with (self.work / f"{part.name}.log").open("a") as logf:
            part.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)

    async def _start_parts(self, names: list[str]) -> None:
        for name in names:
            self._spawn(self.parts[name])
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        for name in names:
            while not await self.part_healthy(name):
                p = self.parts[name].proc
                if p.poll() is not None:
                    tail = (self.work / f"{name}.log").read_text()[-2000:]
                    raise RuntimeError(f"{name} exited with {p.returncode} during start-up:\n{tail}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} not serving within {self.cfg.ready_timeout_s:g} s; see "
                                       f"{self.work / (name + '.log')}")
                await asyncio.sleep(0.1)

    async def part_healthy(self, name: str) -> bool:
        part = self.parts[name]
        if name.startswith("gateway"):
            try:
                async with httpx.AsyncClient(timeout=2.0) as c:
                    return (await c.get(f"http://127.0.0.1:{part.port}/livez")).status_code == 200
            except httpx.HTTPError:
                return False
        return await _grpc_serving(f"127.0.0.1:{part.port}", "")

    async def _supervise(self) -> None:
        retry_at: dict[str, float] = {}
        while True:
            await asyncio.sleep(0.1)
            if self.paused:
                continue
            for part in self.parts.values():
                if part.proc is None or part.proc.poll() is None or time.monotonic() < retry_at.get(part.name, 0):
                    continue
                self.say(f"{part.name} exited ({part.proc.returncode}); restarting it on port {part.port}")
                self._spawn(part)
                part.restarts += 1
                retry_at[part.name] = time.monotonic() + 0.5

    def service_pids(self) -> list[int]:
        pids = []
        for p in self.parts.values():
            if p.proc is not None and p.proc.poll() is None:
                pids += [p.proc.pid, *_children(p.proc.pid)]
        return pids

    def all_pids(self) -> list[int]:
        """Every process of the cluster: PostgreSQL, etcd, services and their children, every engine."""
        return sorted({*self.pg.pids(), *self.etcd.pids(), *self.service_pids(),
                       *_engine_processes(self.work / "engines")})

    async def members(self) -> dict:
        from services.common.membership import MembershipWatcher

        async with MembershipWatcher(self.etcd.endpoints) as w:
            return w.snapshot()

    async def wait_engines(self, n: int, timeout_s: float) -> None:
        from services.common.membership import MembershipWatcher

        async with MembershipWatcher(self.etcd.endpoints) as w:
            await w.wait_for(lambda m: sum(i.role == "interactive" and i.state == "serving" for i in m.values()) >= n
                             and any(i.role == "batch" and i.state == "serving" for i in m.values()), timeout_s=timeout_s)

    async def leader_scaler(self) -> str | None:
        """The scaler replica acting as leader now (KEDA health SERVING), or None."""
        for r in REPLICAS:
            if await _grpc_serving(f"127.0.0.1:{self.parts[f'scaler-{r}'].port}", "externalscaler.ExternalScaler"):
                return f"scaler-{r}"
        return None

    def retire_engines_later(self, old: dict[int, str]) -> None:
        """A killed scaler's engines serve until the new leader's own interactive engine serves, then drain."""
        async def retire() -> None:
            from services.common.membership import MembershipWatcher

            ids = set(old.values())
            try:
                async with MembershipWatcher(self.etcd.endpoints) as w:
                    await w.wait_for(lambda m: sum(i.role == "interactive" and i.state == "serving" and iid not in ids
                                                   for iid, i in m.items()) >= self.cfg.interactive_engines,
                                     timeout_s=120)
            except Exception as e:  # noqa: BLE001 - keep the old engines serving
                self.say(f"the old scaler's engines keep serving ({type(e).__name__})")
                return
            self.say(f"draining {len(old)} engine(s) of the killed scaler")
            await asyncio.to_thread(_stop_pids, list(old), 30.0)

        task = asyncio.create_task(retire())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in (self._supervisor, *self._tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        _signal(self.all_pids(), signal.SIGCONT)  # nothing left stopped by a fault
        for name in ("gateway-a", "gateway-b", "scaler-a", "scaler-b"):
            p = self.parts.get(name)
            if p is not None and p.proc is not None:
                _signal([p.proc.pid], signal.SIGTERM)
        for name in ("gateway-a", "gateway-b", "scaler-a", "scaler-b"):
            p = self.parts.get(name)
            if p is not None and p.proc is not None:
                await asyncio.to_thread(_wait_or_kill, p.proc, 20.0)
        left = _engine_processes(self.work / "engines")
        if left:
            await asyncio.to_thread(_stop_pids, list(left), 15.0)
        for p in self.parts.values():
            if p.proc is not None and p.proc.poll() is None:
                p.proc.terminate()
        for p in self.parts.values():
            if p.proc is not None:
                await asyncio.to_thread(_wait_or_kill, p.proc, 10.0)
        await asyncio.to_thread(self.etcd.stop)
        await asyncio.to_thread(self.pg.stop)


def _wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def _grpc_serving(target: str, service: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        async with grpc.aio.insecure_channel(target) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
    except (grpc.aio.AioRpcError, OSError):
        return False


async def _fresh_decision(target: str, after_wall: float) -> bool:
    """Whether the scaler at ``target`` answers GetDecision with a decision made after ``after_wall`` (epoch s)."""
    import grpc

    from chiron.v1 import scaler_pb2, scaler_pb2_grpc

    try:
        async with grpc.aio.insecure_channel(target) as ch:
            d = (await scaler_pb2_grpc.GlobalScalerStub(ch).GetDecision(scaler_pb2.GetDecisionRequest(), timeout=1.0)).decision
            return d.time.seconds + d.time.nanos / 1e9 > after_wall
    except grpc.aio.AioRpcError:
        return False


# ------------------------------------------------------------------------------------------------------------
# The load: interactive requests and Batch API jobs through both gateways
# ------------------------------------------------------------------------------------------------------------
@dataclass
class _Req:
    rid: int
    prompt: list[int]
    max_tokens: int
    start: float
    slot: int  # index of the fault slot it started in (-1: warm-up)
    done: bool = False
    end: float = 0.0
    attempts: int = 0
    restarted: int = 0  # streams cut after they started, retried from the start
    cut_at: list[tuple[str, float]] = field(default_factory=list)  # (gateway URL, monotonic time) of each cut
    duplicated: int = 0
    duplicated_ids: list[str] = field(default_factory=list)  # the gateway's X-Request-Id of each try that had them
    error: str = ""
    at: str | None = None  # gateway URL of the try in progress


class _StreamCut(Exception):
    pass


class LoadGenerator:
    """Streams interactive requests through the gateways as an OpenAI client with two base URLs (module docs)."""

    def __init__(self, cfg: ChaosConfig, urls: list[str], slots: int) -> None:
        self.cfg, self.urls, self.slots = cfg, urls, slots
        self.reqs: list[_Req] = []
        self.slot = -1
        self.mean_s = 1.0  # mean wall time of a completed request [s], learnt
        self._tasks: set[asyncio.Task] = set()
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_deadline_s, connect=2.0),
                                         limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))
        self._stop = asyncio.Event()
        self._rng = random.Random(cfg.seed)

    def in_flight_at(self, url: str) -> int:
        return sum(1 for r in self.reqs if not r.done and r.at == url)

    async def run(self) -> None:
        from services.common.traces import load_azure_trace

        trace = load_azure_trace("azure-conv")
        gaps = [max(0.0, float(b - a)) for a, b in zip(trace.arrival_s[:-1], trace.arrival_s[1:], strict=True)]
        mean_gap = sum(gaps) / len(gaps)
        i = 0
        while not self._stop.is_set():
            k = i % len(gaps)
            out = max(1, min(self.cfg.max_output_tokens, int(trace.output_tokens[k])))
            prompt = [self._rng.randrange(3, 32000) for _ in range(max(1, min(512, int(trace.prompt_tokens[k]))))]
            r = _Req(i, prompt, out, time.monotonic(), self.slot)
            self.reqs.append(r)
            t = asyncio.create_task(self._one(r))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
            # Little's law: rate = load × slots / mean request time; the trace's gaps keep their shape.
            rate = self.cfg.load * self.slots / max(0.05, self.mean_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(5.0, gaps[k] / mean_gap / rate))
            i += 1

    async def _one(self, r: _Req) -> None:
        deadline = r.start + self.cfg.request_deadline_s
        idx = r.rid % len(self.urls)
        while time.monotonic() < deadline:
            url = self.urls[idx % len(self.urls)]
            r.attempts += 1
            r.at = url
            try:
                delay = await self._attempt(r, url)
            except _StreamCut as e:
                r.restarted += 1
                r.cut_at.append((url, time.monotonic()))
                r.error = str(e)
                delay = 0.05
                idx += 1
            except (httpx.TransportError, httpx.HTTPStatusError) as e:
                r.error = f"{type(e).__name__}: {e}"
                delay = 0.05
                idx += 1
            else:
                if delay is None:
                    r.done, r.end = True, time.monotonic()
                    self.mean_s = 0.95 * self.mean_s + 0.05 * (r.end - r.start) if r.rid > 0 else r.end - r.start
                    return
                idx += 1
            await asyncio.sleep(delay)
        r.at = None

    async def _attempt(self, r: _Req, url: str) -> float | None:
        """One try: None when complete; a delay before the next try (refusal); raises on a cut stream."""
        body = {"model": MODEL, "prompt": r.prompt, "max_tokens": r.max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        async with self._client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                if resp.status_code in (429, 503):
                    with contextlib.suppress(ValueError):
                        return min(2.0, float(resp.headers.get("retry-after", "0.2")))
                    return 0.2
                if resp.status_code >= 500:
                    return 0.1
                raise httpx.HTTPStatusError(f"{resp.status_code}: {resp.text[:200]}", request=resp.request, response=resp)
            chunks, usage, finished, done = 0, None, None, False
            try:
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        raise _StreamCut(f"error event: {ev['error'].get('message', '')[:200]}")
                    if ev.get("usage"):
                        usage = ev["usage"]
                    for ch in ev.get("choices", []):
                        if ch.get("text"):
                            chunks += 1
                        if ch.get("finish_reason"):
                            finished = ch["finish_reason"]
            except httpx.TransportError as e:
                raise _StreamCut(f"connection cut: {type(e).__name__}") from e
            if not done or usage is None:
                raise _StreamCut("stream ended without [DONE]")
            got = int(usage.get("completion_tokens", 0))
            if got > r.max_tokens:
                r.duplicated += got - r.max_tokens
                r.duplicated_ids.append(resp.headers.get("x-request-id", "?"))
            if got < r.max_tokens or finished != "length":
                raise _StreamCut(f"{got}/{r.max_tokens} tokens, finish {finished}")
            return None

    async def stop(self, drain_timeout_s: float) -> None:
        self._stop.set()
        deadline = time.monotonic() + drain_timeout_s
        while self._tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()


class BatchJob:
    """One OpenAI Batch API job through the gateways: upload, create, poll, read the output (each call failed over)."""

    def __init__(self, cfg: ChaosConfig, urls: list[str], slot: int) -> None:
        self.cfg, self.urls, self.slot = cfg, urls, slot
        self.batch_id: str | None = None
        self.status = ""
        self.counts: dict = {}
        self.lost = 0
        self.twice = 0
        self.error = ""

    async def _call(self, client: httpx.AsyncClient, method: str, path: str, deadline: float, **kw) -> httpx.Response:
        i = self.slot
        while True:
            url = self.urls[i % len(self.urls)]
            try:
                resp = await client.request(method, url + path, **kw)
                if resp.status_code < 500 and resp.status_code != 429:
                    resp.raise_for_status()
                    return resp
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path}: no gateway answered")
            i += 1
            await asyncio.sleep(0.2)

    async def submit(self) -> None:
        rng = random.Random(self.cfg.seed * 1000 + self.slot)
        lines = [json.dumps({"custom_id": f"s{self.slot}-{k}", "method": "POST", "url": "/v1/completions",
                             "body": {"model": MODEL, "prompt": [rng.randrange(3, 32000) for _ in range(32)],
                                      "max_tokens": self.cfg.batch_max_tokens}}) for k in range(self.cfg.batch_lines)]
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(timeout=10.0) as c:
            f = (await self._call(c, "POST", "/v1/files", deadline, data={"purpose": "batch"},
                                  files={"file": ("chaos.jsonl", "\n".join(lines).encode())})).json()
            b = (await self._call(c, "POST", "/v1/batches", deadline, json={
                "input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "1h"})).json()
        self.batch_id = b["id"]

    async def finish(self, deadline: float) -> None:
        """Wait for the job to end (until ``deadline``, monotonic) and count lost and twice-completed lines."""
        n = self.cfg.batch_lines
        if self.batch_id is None:
            self.lost = n
            return
        async with httpx.AsyncClient(timeout=10.0) as c:
            try:
                while True:
                    b = (await self._call(c, "GET", f"/v1/batches/{self.batch_id}", deadline + 30)).json()
                    self.status, self.counts = b.get("status", ""), b.get("request_counts") or {}
                    if self.status in ("completed", "failed", "expired", "cancelled") or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.5)
                seen: dict[str, int] = {}
                good: set[str] = set()
                if b.get("output_file_id"):
                    text = (await self._call(c, "GET", f"/v1/files/{b['output_file_id']}/content", deadline + 30)).text
                    for line in text.splitlines():
                        if not line.strip():
                            continue
                        o = json.loads(line)
                        cid = o.get("custom_id", "")
                        seen[cid] = seen.get(cid, 0) + 1
                        resp = o.get("response") or {}
                        toks = ((resp.get("body") or {}).get("usage") or {}).get("completion_tokens", 0)
                        if resp.get("status_code") == 200 and toks == self.cfg.batch_max_tokens:
                            good.add(cid)
                        elif resp.get("status_code") == 200 and toks > self.cfg.batch_max_tokens:
                            self.twice += 1
                self.twice += sum(v - 1 for v in seen.values() if v > 1)
                self.twice += max(0, int(self.counts.get("completed", 0)) - n)
                self.lost = n - len(good)
            except (TimeoutError, httpx.HTTPError, ValueError) as e:
                self.error = f"{type(e).__name__}: {e}"
                self.lost = n


# ------------------------------------------------------------------------------------------------------------
# Faults and recovery
# ------------------------------------------------------------------------------------------------------------
async def _probe_gateway(client: httpx.AsyncClient, url: str) -> bool:
    try:
        resp = await client.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [11, 12, 13], "max_tokens": 2},
                                 timeout=3.0)
        return resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 2
    except (httpx.HTTPError, ValueError, KeyError):
        return False


async def measure_recovery(cluster: ChaosCluster, t_end: float, wall_end: float,
                           timeout_s: float) -> tuple[float | None, float | None]:
    """``(recovery_s, replica_back_s)`` after a fault that ended at ``t_end`` (monotonic; ``wall_end`` epoch); None
    for one not reached within ``timeout_s``. See the module docstring."""
    urls = cluster.gateway_urls
    ok: dict[str, float] = {}
    leader_at = back_at = None
    async with httpx.AsyncClient() as client:
        while time.monotonic() - t_end < timeout_s and (len(ok) < len(urls) or leader_at is None or back_at is None):
            now = time.monotonic()
            pending = [u for u in urls if u not in ok]
            results = await asyncio.gather(*(_probe_gateway(client, u) for u in pending))
            for u, good in zip(pending, results, strict=True):
                if good:
                    ok[u] = time.monotonic()
            if leader_at is None:
                lead = await cluster.leader_scaler()
                if lead and await _fresh_decision(f"127.0.0.1:{cluster.parts[lead].port}", wall_end):
                    leader_at = time.monotonic()
            if back_at is None:
                parts = await asyncio.gather(*(cluster.part_healthy(n) for n in cluster.parts))
                if all(parts) and await asyncio.to_thread(cluster.etcd.healthy):
                    back_at = time.monotonic()
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - now)))
    rec = max([*ok.values(), leader_at]) - t_end if len(ok) == len(urls) and leader_at is not None else None
    return rec, (back_at - t_end if back_at is not None else None)


async def inject(cluster: ChaosCluster, load: LoadGenerator, fault: str, stall_s: float, say) -> dict:
    """Inject ``fault``; returns ``{t_end, wall_end, detail, cut_gateway}`` once the fault ended (signal sent, or
    SIGCONT after the stall)."""
    info: dict = {"detail": "", "cut_gateway": None}
    if fault in ("queue", "router", "gateway", "scaler"):
        name = f"{fault}-a"
        if fault == "scaler":
            name = await cluster.leader_scaler() or "scaler-a"
            old = _engine_processes(cluster.work / "engines")
        part = cluster.parts[name]
        if fault == "gateway":
            info["cut_gateway"] = f"http://127.0.0.1:{part.port}"
            info["in_flight"] = load.in_flight_at(info["cut_gateway"])
        _signal([part.proc.pid, *_children(part.proc.pid)] if fault == "gateway" else [part.proc.pid], signal.SIGKILL)
        info["detail"] = f"SIGKILL {name} (pid {part.proc.pid})"
        if fault == "scaler":
            cluster.retire_engines_later(old)
    elif fault == "engine":
        members = await cluster.members()
        procs = _engine_processes(cluster.work / "engines")
        inter = [pid for pid, iid in procs.items() if iid in members and members[iid].role == "interactive"]
        if not inter:
            raise RuntimeError("no interactive engine process to kill")
        pid = inter[0]
        _signal([pid], signal.SIGKILL)
        info["detail"] = f"SIGKILL engine {procs[pid]} (pid {pid})"
    elif fault == "etcd-leader":
        lead = await asyncio.to_thread(cluster.etcd.leader)
        if lead is None:
            raise RuntimeError("no etcd leader found")
        _signal([lead.proc.pid], signal.SIGSTOP)
        say(f"  etcd leader {lead.name} stopped for {stall_s:g} s")
        await asyncio.sleep(stall_s)
        _signal([lead.proc.pid], signal.SIGCONT)
        info["detail"] = f"SIGSTOP {lead.name} (etcd leader) {stall_s:g} s"
    elif fault == "freeze":
        cluster.paused = True
        pids = cluster.all_pids()
        _signal(pids, signal.SIGSTOP)
        say(f"  {len(pids)} processes frozen for {stall_s:g} s")
        try:
            await asyncio.sleep(stall_s)
        finally:
            _signal(pids, signal.SIGCONT)
            cluster.paused = False
        info["detail"] = f"SIGSTOP {len(pids)} processes {stall_s:g} s"
    else:
        raise ValueError(f"unknown fault {fault!r}; choose from {', '.join(FAULTS)}")
    info["t_end"], info["wall_end"] = time.monotonic(), time.time()
    return info


def targets_met(report: dict) -> list[str]:
    """The targets a report misses (empty: all met)."""
    missed = []
    for row in report["faults"]:
        for k in ("interactive_failed", "interactive_duplicated_tokens", "batch_lost", "batch_completed_twice"):
            if row[k]:
                missed.append(f"{row['fault']}: {k} = {row[k]}")
        if row["recovery_s"] is None or row["recovery_s"] > row["recovery_target_s"]:
            missed.append(f"{row['fault']}: recovery_s = {row['recovery_s']} > {row['recovery_target_s']:g}")
    return missed


async def run_chaos(cfg: ChaosConfig, say=lambda _m: None, progress=lambda _done, _total, _what: None) -> dict:
    """Start the cluster, load it, inject ``cfg.faults`` in turn, return the report (module docstring); stops
    everything before returning or raising."""
    for f in cfg.faults:
        if f not in FAULTS:
            raise ValueError(f"unknown fault {f!r}; choose from {', '.join(FAULTS)}")
    interval = cfg.fault_interval_s
    if cfg.minutes > 0:
        interval = max(interval, cfg.minutes * 60 / max(1, len(cfg.faults)))
    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="chiron-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    cluster = ChaosCluster(cfg, work, say)
    load: LoadGenerator | None = None
    rows: list[dict] = []
    jobs: list[BatchJob] = []
    try:
        await cluster.start()
        say(f"cluster up in {time.monotonic() - t0:.1f} s (logs in {work})")
        load = LoadGenerator(cfg, cluster.gateway_urls, cfg.interactive_engines * cfg.batch_size)
        load_task = asyncio.create_task(load.run())
        await asyncio.sleep(cfg.warmup_s)  # load shape only; correctness waits on readiness below
        for i, fault in enumerate(cfg.faults):
            progress(i, len(cfg.faults), fault)
            slot_start = time.monotonic()
            load.slot = i
            job = BatchJob(cfg, cluster.gateway_urls, i)
            jobs.append(job)
            try:
                await job.submit()
            except (TimeoutError, httpx.HTTPError, KeyError, ValueError) as e:
                job.error = f"submit: {type(e).__name__}: {e}"
            say(f"fault {i + 1}/{len(cfg.faults)}: {fault} (load {load.mean_s:.2f} s/request, batch job {job.batch_id})")
            info = await inject(cluster, load, fault, cfg.stall_s, say)
            rec, back = await measure_recovery(cluster, info["t_end"], info["wall_end"], cfg.recovery_timeout_s)
            say(f"  {info['detail']}: recovery {_s(rec)}, every replica back {_s(back)}")
            rows.append({"fault": fault, "detail": info["detail"], "recovery_s": _r(rec), "replica_back_s": _r(back),
                         "recovery_target_s": cfg.recovery_target_s(fault), "cut_gateway": info["cut_gateway"],
                         "t_fault": info["t_end"], "in_flight": info.get("in_flight")})
            rest = interval - (time.monotonic() - slot_start)
            if rest > 0:  # the slot's load runs its full length, the last one's too
                await asyncio.sleep(rest)
        progress(len(cfg.faults), len(cfg.faults), "draining")
        load.slot = len(cfg.faults)
        say("faults done; waiting for in-flight requests and batch jobs")
        await load.stop(cfg.drain_timeout_s)
        load_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load_task
        deadline = time.monotonic() + cfg.drain_timeout_s
        await asyncio.gather(*(j.finish(deadline) for j in jobs))
    finally:
        if load is not None and not load._client.is_closed:
            await load.stop(0)
        say("stopping the cluster")
        await cluster.stop()
    return _report(cfg, rows, jobs, load, cluster, time.monotonic() - t0, work)


def _s(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.2f} s"


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _duplicated_requests(load: LoadGenerator, work: Path) -> list[dict]:
    """Each try that streamed more tokens than asked: its gateway request id and the services' log lines that
    name it (what to read first when that target is missed)."""
    ids = [i for r in load.reqs for i in r.duplicated_ids]
    if not ids:
        return []
    lines = []  # every service's log, read once
    for f in sorted(work.glob("*.log")):
        with contextlib.suppress(OSError):
            lines += [f"{f.name}: {ln}" for ln in f.read_text(errors="replace").splitlines()]
    return [{"gateway_request_id": rid, "log": [ln for ln in lines if rid in ln][:20]} for rid in ids]


def _report(cfg: ChaosConfig, rows: list[dict], jobs: list[BatchJob], load: LoadGenerator, cluster: ChaosCluster,
            wall_s: float, work: Path) -> dict:
    for i, row in enumerate(rows):
        reqs = [r for r in load.reqs if r.slot == i]
        row["interactive_requests"] = len(reqs)
        row["interactive_failed"] = sum(not r.done for r in reqs)
        row["interactive_duplicated_tokens"] = sum(r.duplicated for r in reqs)
        row["interactive_restarted"] = sum(r.restarted > 0 for r in reqs)
        row["batch_requests"] = cfg.batch_lines
        row["batch_lost"] = jobs[i].lost
        row["batch_completed_twice"] = jobs[i].twice
        row["batch_status"] = jobs[i].status or jobs[i].error
        cut, t_fault, in_flight = row.pop("cut_gateway"), row.pop("t_fault"), row.pop("in_flight")
        if cut is not None:
            row["gateway_requests_in_flight"] = in_flight  # requests whose try was at the gateway when killed
            # streams the killed gateway held: cut within seconds of the SIGKILL
            row["gateway_connections_cut"] = sum(1 for r in load.reqs for u, t in r.cut_at
                                                 if u == cut and t_fault - 1 <= t <= t_fault + 10)
    other = [r for r in load.reqs if not 0 <= r.slot < len(rows)]
    keys = ("interactive_requests", "interactive_failed", "interactive_duplicated_tokens", "interactive_restarted",
            "batch_requests", "batch_lost", "batch_completed_twice", "gateway_connections_cut")
    totals = {k: sum(row.get(k, 0) for row in rows) for k in keys}
    totals["interactive_requests"] += len(other)
    totals["interactive_failed"] += sum(not r.done for r in other)
    totals["interactive_duplicated_tokens"] += sum(r.duplicated for r in other)
    totals["interactive_restarted"] += sum(r.restarted > 0 for r in other)
    report = {"faults": rows, "totals": totals,
              "config": {k: v for k, v in asdict(cfg).items() if k != "work_dir"},
              "restarts": {n: p.restarts for n, p in cluster.parts.items()},
              "mean_request_s": round(load.mean_s, 3), "wall_seconds": round(wall_s, 1), "work_dir": str(work),
              "recovery_s_definition": "from the fault's end (SIGKILL sent; SIGCONT of a stop or freeze) until a "
                                       "request through every gateway succeeded and the scaler leader made a decision"}
    report["duplicated_requests"] = _duplicated_requests(load, work)
    report["targets_missed"] = targets_met(report)
    report["targets_met"] = not report["targets_missed"]
    return report
