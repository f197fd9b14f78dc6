"""A LOCAL STAND-IN for Nomad — not Nomad: its HTTP API for the endpoints Chiron's scaler uses
(:class:`NomadApiStandIn`), and optionally a raw_exec-like client running every allocation as a local process
(:class:`LocalExecutor`) with a Consul-like catalog of the services they register (:class:`ServiceCatalog`).
``chiron deploy rehearse`` runs Chiron's five job files on it; ``tests/test_nomad.py`` uses the API alone.

The API (read against Nomad's ``nomad/job_endpoint.go`` ``Job.Scale`` and ``command/agent/job_endpoint.go``): jobs
registered from real job files (:func:`services.deploy.jobspec.render_job_file`, ``-var`` overrides);
``POST /v1/job/<id>/scale`` with Nomad's status codes and error texts (unknown job or group, a negative count, a
count outside the scaling min/max), placing ``pending`` allocations or stopping the highest-indexed ones;
``GET /v1/job/<id>``, ``DELETE /v1/job/<id>``, ``GET /v1/job/<id>/allocations``; ``?namespace=``;
``X-Nomad-Token`` when ``required_token`` is set (403); plain-text errors. Faults on demand:
:meth:`~NomadApiStandIn.fail_next` (N answers of a status, 429 with ``Retry-After``) and
:meth:`~NomadApiStandIn.drop_next` (N connections closed unanswered). Without an executor an allocation turns
``running`` after ``start_delay_s`` (or at :meth:`~NomadApiStandIn.tick`).

The executor, per allocation (Nomad's runtime environment, developer.hashicorp.com/nomad/docs/runtime/environment):
ports (static, or free in 20000–32000) with ``NOMAD_IP_/PORT_/ADDR_<label>`` (127.0.0.1: one local node); the
allocation and task directories (``NOMAD_ALLOC_DIR``, ``NOMAD_TASK_DIR``, ``NOMAD_SECRETS_DIR``; logs under
``alloc/logs``); ``NOMAD_ALLOC_ID`` and the other job/group/task names; the task's ``env``; ``template`` blocks
rendered by :mod:`services.deploy.gotemplate`, a ``service`` look-up blocking until a healthy instance registers
(as consul-template does; ``template_timeout_s`` fails it), ``env = true`` ones read into the environment; the
command's ``${...}`` runtime references filled from it (an unresolved one fails the allocation), then ``command``
+ ``args`` started exactly so in a new session. Services join the catalog once their ``grpc``/``http``/``tcp``
check passes. Stopping (job-specification/task#kill_timeout): deregister, ``shutdown_delay``, ``kill_signal``
(default SIGINT), SIGKILL to the process group ``kill_timeout`` (default 5 s) later.

Not modelled: evaluations and the scheduler (placement always succeeds; no devices: no ``NVIDIA_VISIBLE_DEVICES``),
deployments, blocking queries, registration through the API, ACL beyond one token, restarts and rescheduling (an
exited task fails its allocation), template re-rendering, Vault, Nomad variables, every other endpoint (404)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from services.deploy.gotemplate import Context, ServiceNotReady, TemplateError, parse_env_file, render
from services.deploy.jobspec import (
    CheckSpec,
    GroupSpec,
    JobSpec,
    interpolate_runtime,
    load_job_spec,
    render_job_file,
    variable_defaults,
)

__all__ = ["Allocation", "GroupState", "JobState", "LocalExecutor", "NomadApiStandIn", "RecordedRequest",
           "ServiceCatalog", "load_job_spec", "resolve", "variable_defaults"]

_VAR_REF = re.compile(r"^\$\{var\.([A-Za-z0-9_]+)\}$")


def resolve(value: Any, variables: Mapping[str, Any]) -> Any:
    """A value that is exactly ``${var.name}`` becomes the variable's default; anything else is returned as is."""
    if isinstance(value, str):
        m = _VAR_REF.match(value)
        if m and m.group(1) in variables:
            return variables[m.group(1)]
    return value


@dataclass
class GroupState:
    name: str
    count: int
    scaling: tuple[int, int, bool] | None  # (min, max, enabled)


@dataclass
class Allocation:
    id: str
    job_id: str
    namespace: str
    group: str
    index: int
    created: float
    client_status: str = "pending"
    desired_status: str = "run"
    stop_requested: float | None = None
    cause: str = "job register"  # what placed it: "job register" | "job scale"
    stop_cause: str = ""  # what stopped it: "job scale" | "job stop"
    managed: bool = False  # its client status follows a LocalExecutor's process, not the delays

    def stub(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "EvalID": "",
            "Name": f"{self.job_id}.{self.group}[{self.index}]",
            "Namespace": self.namespace,
            "NodeID": "standin-node",
            "JobID": self.job_id,
            "TaskGroup": self.group,
            "DesiredStatus": self.desired_status,
            "DesiredDescription": "alloc not needed due to job update" if self.desired_status == "stop" else "",
            "ClientStatus": self.client_status,
            "CreateTime": int(self.created * 1e9),
        }


@dataclass
class JobState:
    id: str
    namespace: str
    groups: dict[str, GroupState]
    allocs: list[Allocation] = field(default_factory=list)
    version: int = 0
    modify_index: int = 1


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


class _Reply(Exception):
    def __init__(self, status: int, body: Any, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status)
        self.status, self.body, self.headers = status, body, dict(headers or {})


class NomadApiStandIn:
    """LOCAL HTTP STAND-IN for Nomad's HTTP API on 127.0.0.1 (a free port), for tests. Not Nomad: see the module
    docstring for what it models and what it does not.

    Use as a context manager, or :meth:`start` / :meth:`stop`. ``address`` is the base URL to give the provider.
    """

    def __init__(self, *, start_delay_s: float | None = None, stop_delay_s: float | None = 0.0,
                 required_token: str | None = None, executor: LocalExecutor | None = None) -> None:
        self.executor = executor
        self.scale_log: list[dict[str, Any]] = []  # accepted scale requests: t (monotonic s), group, count, message
        self.start_delay_s = start_delay_s
        self.stop_delay_s = stop_delay_s
        self.required_token = required_token
        self.requests: list[RecordedRequest] = []
        self.scale_requests: list[dict[str, Any]] = []
        self._jobs: dict[tuple[str, str], JobState] = {}
        self._lock = threading.Lock()
        self._faults: list[tuple[str, int, str, dict[str, str]]] = []  # ("fail", status, message, headers) | ("drop", ...)
        self._index = 10
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> NomadApiStandIn:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stall

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                standin._handle(self)

            def do_POST(self) -> None:  # noqa: N802
                standin._handle(self)

            def do_PUT(self) -> None:  # noqa: N802
                standin._handle(self)

            def do_DELETE(self) -> None:  # noqa: N802
                standin._handle(self)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="nomad-api-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> NomadApiStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "stand-in not started"
        return self._server.server_address[1]

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ set-up and control

    def register_job_file(self, path: str | Path, *, namespace: str = "default",
                          variables: Mapping[str, Any] | None = None) -> list[str]:
        """Register every job of a Nomad job file (groups, counts, scaling blocks), rendered with ``variables``
        (``-var`` overrides, :func:`services.deploy.jobspec.render_job_file`), and place the initial allocations
        (``nomad job run``). With an executor the allocations run as processes. Returns the job ids. Raises
        :class:`services.deploy.jobspec.JobFileError`."""
        return [self.register_job_spec(job, namespace=namespace) for job in render_job_file(path, variables)]

    def register_job_spec(self, job: JobSpec, *, namespace: str = "default") -> str:
        """Register a rendered job (see :meth:`register_job_file`). Returns its id."""
        if self.executor is not None:
            self.executor.add_job(job)
        self.register_job(job.id, {g.name: GroupState(g.name, g.count, g.scaling) for g in job.groups.values()},
                          namespace=namespace)
        return job.id

    def stop_job(self, job_id: str, *, namespace: str = "default") -> None:
        """``nomad job stop``: every allocation of the job is stopped (its groups' counts stay)."""
        with self._lock:
            job = self._jobs.get((namespace, job_id))
            if job is None:
                raise KeyError(job_id)
            self._stop_job(job)

    def register_job(self, job_id: str, groups: Mapping[str, GroupState], *, namespace: str = "default") -> None:
        """Register (or replace: the old job's allocations are stopped first) a job and place its allocations."""
        with self._lock:
            old = self._jobs.get((namespace, job_id))
            if old is not None:
                self._stop_job(old)
            state = JobState(job_id, namespace, dict(groups))
            self._jobs[(namespace, job_id)] = state
            for g in state.groups.values():
                self._reconcile(state, g)

    def fail_next(self, n: int, status: int = 500, message: str = "rpc error: No cluster leader",
                  retry_after_s: float | None = None) -> None:
        """The next ``n`` requests answer ``status`` with ``message`` (and ``Retry-After`` when given)."""
        headers = {"Retry-After": f"{retry_after_s:g}"} if retry_after_s is not None else {}
        with self._lock:
            self._faults.extend([("fail", status, message, headers)] * n)

    def drop_next(self, n: int) -> None:
        """The next ``n`` requests get their connection closed without an answer."""
        with self._lock:
            self._faults.extend([("drop", 0, "", {})] * n)

    def tick(self) -> None:
        """Finish every transition now: pending → running, stopping → complete."""
        with self._lock:
            self._advance(force=True)

    def allocations(self, job_id: str = "chiron-engine", group: str | None = None, *,
                    namespace: str = "default") -> list[dict[str, Any]]:
        """The job's allocation stubs (all client statuses), optionally of one group."""
        with self._lock:
            self._advance()
            job = self._jobs.get((namespace, job_id))
            return [a.stub() for a in (job.allocs if job else []) if group is None or a.group == group]

    def group_count(self, job_id: str, group: str, *, namespace: str = "default") -> int:
        with self._lock:
            return self._jobs[(namespace, job_id)].groups[group].count

    def scaling(self, job_id: str, group: str, *, namespace: str = "default") -> tuple[int, int, bool] | None:
        with self._lock:
            return self._jobs[(namespace, job_id)].groups[group].scaling

    # ------------------------------------------------------------------ model

    def _next_index(self) -> int:
        self._index += 1
        return self._index

    def _reconcile(self, job: JobState, group: GroupState, cause: str = "job register") -> None:
        """Place or stop allocations so the group has ``count`` allocations Nomad wants running."""
        now = time.monotonic()
        live = [a for a in job.allocs if a.group == group.name and a.desired_status == "run"]
        if len(live) < group.count:
            used = {a.index for a in live}
            free = (i for i in range(10**6) if i not in used)
            for _ in range(group.count - len(live)):
                a = Allocation(str(uuid.uuid4()), job.id, job.namespace, group.name, next(free), now, cause=cause,
                               managed=self.executor is not None)
                job.allocs.append(a)
                if self.executor is not None:
                    self.executor.place(a)
        elif len(live) > group.count:
            for a in sorted(live, key=lambda a: a.index, reverse=True)[: len(live) - group.count]:
                self._stop_alloc(a, cause, now)
        self._advance()

    def _stop_alloc(self, a: Allocation, cause: str, now: float) -> None:
        a.desired_status, a.stop_requested, a.stop_cause = "stop", now, cause
        if self.executor is not None and a.managed:
            self.executor.stop(a)

    def _stop_job(self, job: JobState) -> None:
        now = time.monotonic()
        for a in job.allocs:
            if a.desired_status == "run":
                self._stop_alloc(a, "job stop", now)
        self._advance()

    def _advance(self, force: bool = False) -> None:
        now = time.monotonic()
        for job in self._jobs.values():
            for a in job.allocs:
                if a.managed:
                    continue  # its process decides
                if a.desired_status == "run" and a.client_status == "pending":
                    if force or (self.start_delay_s is not None and now - a.created >= self.start_delay_s):
                        a.client_status = "running"
                elif a.desired_status == "stop" and a.client_status in ("pending", "running"):
                    if force or (self.stop_delay_s is not None and now - (a.stop_requested or now) >= self.stop_delay_s):
                        a.client_status = "complete"

    # ------------------------------------------------------------------ HTTP

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        query = parse_qs(url.query)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        with self._lock:
            self.requests.append(RecordedRequest(h.command, url.path, query, dict(h.headers.items()), body))
            fault = self._faults.pop(0) if self._faults else None
        if fault is not None and fault[0] == "drop":
            h.close_connection = True
            return
        try:
            if fault is not None:
                raise _Reply(fault[1], fault[2], fault[3])
            if self.required_token is not None and h.headers.get("X-Nomad-Token") != self.required_token:
                raise _Reply(403, "Permission denied")
            reply = self._route(h.command, unquote(url.path), query, body)
            status, payload, headers = 200, reply, {}
        except _Reply as r:
            status, payload, headers = r.status, r.body, r.headers
        if isinstance(payload, str):  # Nomad writes errors as plain text
            data, ctype = payload.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = json.dumps(payload).encode(), "application/json"
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-Nomad-Index", str(self._index))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def _route(self, method: str, path: str, query: Mapping[str, list[str]], body: Any) -> Any:
        namespace = (query.get("namespace") or ["default"])[0]
        m = re.fullmatch(r"/v1/job/([^/]+)(/allocations|/scale)?", path)
        if not m:
            raise _Reply(404, "Invalid URL")
        job_id, sub = m.group(1), m.group(2) or ""
        with self._lock:
            self._advance()
            job = self._jobs.get((namespace, job_id))
            if sub == "/allocations":
                if method != "GET":
                    raise _Reply(405, "Invalid method")
                return [a.stub() for a in job.allocs] if job else []
            if sub == "/scale":
                if method not in ("PUT", "POST"):
                    raise _Reply(405, "Invalid method")  # (GET /scale, the scale status, is not modelled)
                return self._scale(job_id, job, body)
            if method == "DELETE":  # nomad job stop
                if job is None:
                    raise _Reply(404, "job not found")
                self._stop_job(job)
                index = self._next_index()
                return {"EvalID": str(uuid.uuid4()), "EvalCreateIndex": index, "JobModifyIndex": index}
            if method != "GET":
                raise _Reply(405, "Invalid method")
            if job is None:
                raise _Reply(404, "job not found")
            return self._job_json(job)

    def _scale(self, job_id: str, job: JobState | None, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _Reply(400, "Request decoding failed: expected a JSON object")
        if job is None:
            raise _Reply(404, f'job "{job_id}" not found')
        group_name = (body.get("Target") or {}).get("Group", "")
        count = body.get("Count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
            raise _Reply(400, "Request decoding failed: Count must be an integer")
        if count is not None and count < 0:
            raise _Reply(400, "1 error occurred:\n\t* scaling action count can't be negative\n\n")
        group = job.groups.get(group_name)
        if group is None:
            raise _Reply(400, f'task group "{group_name}" specified for scaling does not exist in job')
        self.scale_requests.append(body)
        index = self._next_index()
        if count is not None:
            if group.scaling is not None:
                lo, hi, _ = group.scaling
                if count < lo:
                    raise _Reply(400, f"group count was less than scaling policy minimum: {count} < {lo}")
                if hi < count:
                    raise _Reply(400, f"group count was greater than scaling policy maximum: {count} > {hi}")
            group.count = count
            job.version += 1
            job.modify_index = index
            self.scale_log.append({"t": time.monotonic(), "job": job.id, "group": group.name, "count": count,
                                   "message": str(body.get("Message", ""))})
            self._reconcile(job, group, cause="job scale")
        return {"EvalID": str(uuid.uuid4()), "EvalCreateIndex": index, "JobModifyIndex": job.modify_index,
                "Index": index, "Warnings": "", "LastIndex": index, "RequestTime": 1000}

    def _job_json(self, job: JobState) -> dict[str, Any]:
        groups = []
        for g in job.groups.values():
            scaling = None
            if g.scaling is not None:
                scaling = {"Min": g.scaling[0], "Max": g.scaling[1], "Enabled": g.scaling[2], "Type": "horizontal",
                           "Target": {"Namespace": job.namespace, "Job": job.id, "Group": g.name}}
            groups.append({"Name": g.name, "Count": g.count, "Scaling": scaling})
        return {"ID": job.id, "Name": job.id, "Namespace": job.namespace, "Type": "service", "Status": "running",
                "Stop": False, "Version": job.version, "JobModifyIndex": job.modify_index, "TaskGroups": groups}


# ---------------------------------------------------------------------------------------------------- executor

_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
_DYNAMIC_PORTS = (20000, 32000)  # Nomad's default dynamic port range (client min_dynamic_port / max_dynamic_port)
_HEALTH_POLL_S = 0.2


@dataclass
class ServiceInstance:
    """One registered instance of a Consul service (what a template's ``service`` look-up lists)."""

    name: str
    alloc_id: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)

    def as_template_value(self) -> dict[str, Any]:
        return {"Name": self.name, "ID": f"_nomad-task-{self.alloc_id}-{self.name}", "Address": self.address,
                "Port": self.port, "Tags": list(self.tags)}


class ServiceCatalog:
    """A Consul stand-in: the service instances whose checks passed, by name. Thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._instances: list[ServiceInstance] = []

    def register(self, inst: ServiceInstance) -> None:
        with self._cond:
            self._instances.append(inst)
            self._cond.notify_all()

    def deregister(self, alloc_id: str) -> None:
        with self._cond:
            self._instances = [i for i in self._instances if i.alloc_id != alloc_id]
            self._cond.notify_all()

    def instances(self, name: str) -> list[ServiceInstance]:
        with self._cond:
            return [i for i in self._instances if i.name == name]

    def lookup(self, name: str) -> list[dict[str, Any]]:
        """``service "name"`` for a template: the instances, or :class:`ServiceNotReady` when there are none."""
        found = self.instances(name)
        if not found:
            raise ServiceNotReady(name)
        return [i.as_template_value() for i in found]

    def wait_changed(self, timeout_s: float) -> None:
        """Block until a registration changes or ``timeout_s`` [s] passes."""
        with self._cond:
            self._cond.wait(timeout_s)


def _free_port() -> int:
    lo, hi = _DYNAMIC_PORTS
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


def _check_passes(check: CheckSpec, address: str, port: int, channels: dict[str, Any]) -> bool:
    """Run one service check once (Consul's semantics for the three types Chiron's job files use)."""
    try:
        if check.type == "grpc":
            import grpc
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            target = f"{address}:{port}"
            if target not in channels:
                channels[target] = grpc.insecure_channel(target)
            resp = health_pb2_grpc.HealthStub(channels[target]).Check(
                health_pb2.HealthCheckRequest(service=check.grpc_service), timeout=check.timeout_s)
            return resp.status == health_pb2.HealthCheckResponse.SERVING
        if check.type == "http":
            import httpx

            r = httpx.get(f"{check.protocol}://{address}:{port}{check.path}", timeout=check.timeout_s, verify=False)
            return 200 <= r.status_code < 300
        with socket.create_connection((address, port), timeout=check.timeout_s):
            return True
    except Exception:  # a failing check is just not passing (yet)
        return False


@dataclass
class AllocationRecord:
    """What the executor did with one allocation: ``command_line`` as started (None: never started),
    ``started_at`` / ``stopped_at`` (monotonic s), ``exit_code``, ``error`` (why it failed), ``log_dir``."""

    alloc_id: str
    job: str
    group: str
    task: str
    cause: str
    command_line: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    started_at: float | None = None
    healthy_at: float | None = None
    stop_requested_at: float | None = None
    stop_cause: str = ""
    stopped_at: float | None = None
    exit_code: int | None = None
    killed: bool = False
    error: str = ""
    log_dir: str = ""


CommandCheck = Callable[[JobSpec, GroupSpec, str, list[str]], str | None]


class LocalExecutor:
    """Runs the allocations a :class:`NomadApiStandIn` places as local processes (see the module docstring), one
    thread per allocation. ``work_dir``: where allocation directories go; ``catalog``: the services they register;
    ``check_command(job, group, task, argv)``: called on every rendered command line before it starts, returns why
    it must not start (or None); ``identity_token``: ``NOMAD_TOKEN`` of tasks with ``identity { env = true }``;
    ``template_timeout_s``: how long a template may wait for a service [s]. Call :meth:`shutdown` at the end."""

    def __init__(self, work_dir: str | Path, catalog: ServiceCatalog | None = None, *,
                 check_command: CommandCheck | None = None, identity_token: str = "",
                 template_timeout_s: float = 120.0, extra_env: Mapping[str, str] | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = catalog or ServiceCatalog()
        self.check_command = check_command
        self.identity_token = identity_token
        self.template_timeout_s = template_timeout_s
        self.extra_env = dict(extra_env or {})
        self.jobs: dict[str, JobSpec] = {}
        self.records: dict[str, AllocationRecord] = {}
        self._lock = threading.Lock()
        self._threads: dict[str, threading.Thread] = {}
        self._stop_events: dict[str, threading.Event] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    def add_job(self, job: JobSpec) -> None:
        self.jobs[job.id] = job

    # ------------------------------------------------------------------ called by the stand-in (under its lock)

    def place(self, alloc: Allocation) -> None:
        group = self.jobs[alloc.job_id].groups[alloc.group]
        task = group.tasks[0].name if group.tasks else ""
        rec = AllocationRecord(alloc.id, alloc.job_id, alloc.group, task, alloc.cause)
        stop = threading.Event()
        t = threading.Thread(target=self._run, args=(alloc, rec, stop), name=f"alloc-{alloc.id[:8]}", daemon=True)
        with self._lock:
            self.records[alloc.id] = rec
            self._stop_events[alloc.id] = stop
            self._threads[alloc.id] = t
        t.start()

    def stop(self, alloc: Allocation) -> None:
        with self._lock:
            rec, ev = self.records.get(alloc.id), self._stop_events.get(alloc.id)
        if rec is not None and rec.stop_requested_at is None:
            rec.stop_requested_at, rec.stop_cause = time.monotonic(), alloc.stop_cause
        if ev is not None:
            ev.set()

    # ------------------------------------------------------------------ inspection and end

    def failures(self) -> list[AllocationRecord]:
        with self._lock:
            return [r for r in self.records.values() if r.error]

    def running(self) -> list[AllocationRecord]:
        with self._lock:
            return [r for r in self.records.values() if r.started_at is not None and r.stopped_at is None]

    def alive(self) -> int:
        """How many allocation processes are still running."""
        with self._lock:
            return sum(1 for p in self._procs.values() if p.poll() is None)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every allocation still running (as a job stop would) and wait for their threads; whatever is left
        after ``timeout_s`` [s] is killed."""
        with self._lock:
            events, threads = list(self._stop_events.values()), list(self._threads.values())
        for ev in events:
            ev.set()
        deadline = time.monotonic() + timeout_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            procs = list(self._procs.values())
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)

    # ------------------------------------------------------------------ one allocation

    def _fail(self, alloc: Allocation, rec: AllocationRecord, reason: str) -> None:
        rec.error = reason
        alloc.client_status = "failed"

    def _run(self, alloc: Allocation, rec: AllocationRecord, stop: threading.Event) -> None:
        """Run one allocation: its directories and runtime environment, its templates, then its command,
        supervised until ``stop``; every failure is the allocation's (``rec.error``)."""
        job = self.jobs[alloc.job_id]
        group = job.groups[alloc.group]
        if len(group.tasks) != 1:
            self._fail(alloc, rec, f"group {group.name!r} has {len(group.tasks)} tasks; the local executor runs one")
            return
        task = group.tasks[0]
        alloc_root = self.work_dir / f"{alloc.job_id}.{alloc.group}[{alloc.index}].{alloc.id[:8]}"
        shared = alloc_root / "alloc"
        task_dir = alloc_root / task.name
        for d in (shared / "data", shared / "logs", shared / "tmp", task_dir / "local", task_dir / "secrets"):
            d.mkdir(parents=True, exist_ok=True)
        rec.log_dir = str(shared / "logs")
        ip = "127.0.0.1"
        ports = {label: (static if static is not None else _free_port()) for label, static in group.ports.items()}
        env = self._runtime_env(alloc, job, group, task, shared, task_dir, ip, ports)
        if not self._render_templates(alloc, rec, stop, task, task_dir, env):
            return
        argv, missing = task.runtime_command(env)
        if missing:
            self._fail(alloc, rec, f"unresolved runtime reference(s) {', '.join('${' + m + '}' for m in missing)} "
                                   f"in the task's command")
            return
        rec.command_line, rec.env = argv, {k: v for k, v in env.items() if k not in _BASE_ENV}
        if self.check_command is not None:
            why = self.check_command(job, group, task.name, argv)
            if why:
                self._fail(alloc, rec, why)
                return
        if stop.is_set():
            alloc.client_status, rec.stopped_at = "complete", time.monotonic()
            return
        out = (shared / "logs" / f"{task.name}.stdout.0").open("ab")
        err = (shared / "logs" / f"{task.name}.stderr.0").open("ab")
        try:
            proc = subprocess.Popen(argv, env=env, cwd=task_dir, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as e:
            self._fail(alloc, rec, f"cannot start {argv[0]!r}: {e}")
            return
        finally:
            out.close()
            err.close()
        with self._lock:
            self._procs[alloc.id] = proc
        rec.started_at = time.monotonic()
        alloc.client_status = "running"
        self._supervise(alloc, rec, stop, proc, group, task, ip, ports)

    def _runtime_env(self, alloc: Allocation, job: JobSpec, group: GroupSpec, task: Any, shared: Path,
                     task_dir: Path, ip: str, ports: Mapping[str, int]) -> dict[str, str]:
        """Nomad's runtime environment of the allocation's task, then the task's own ``env`` (interpolated)."""
        env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
        env |= self.extra_env
        env |= {"NOMAD_ALLOC_DIR": str(shared), "NOMAD_TASK_DIR": str(task_dir / "local"),
                "NOMAD_SECRETS_DIR": str(task_dir / "secrets"), "NOMAD_ALLOC_ID": alloc.id,
                "NOMAD_SHORT_ALLOC_ID": alloc.id[:8], "NOMAD_ALLOC_NAME": f"{alloc.job_id}.{alloc.group}[{alloc.index}]",
                "NOMAD_ALLOC_INDEX": str(alloc.index), "NOMAD_JOB_ID": job.id, "NOMAD_JOB_NAME": job.id,
                "NOMAD_GROUP_NAME": group.name, "NOMAD_TASK_NAME": task.name, "NOMAD_NAMESPACE": alloc.namespace,
                "NOMAD_REGION": "global", "NOMAD_DC": "dc1"}
        for label, port in ports.items():
            env |= {f"NOMAD_IP_{label}": ip, f"NOMAD_HOST_IP_{label}": ip, f"NOMAD_PORT_{label}": str(port),
                    f"NOMAD_HOST_PORT_{label}": str(port), f"NOMAD_ADDR_{label}": f"{ip}:{port}",
                    f"NOMAD_HOST_ADDR_{label}": f"{ip}:{port}"}
        if task.identity_env:
            env["NOMAD_TOKEN"] = self.identity_token
        for k, v in task.env.items():
            env[k] = interpolate_runtime(v, env)[0]
        return env

    def _render_templates(self, alloc: Allocation, rec: AllocationRecord, stop: threading.Event, task: Any,
                          task_dir: Path, env: dict[str, str]) -> bool:
        """Render the task's templates into ``task_dir`` (``env = true`` ones also into ``env``), each blocking, as
        consul-template does, until every service it lists has a healthy instance. Returns False when the
        allocation failed or was stopped meanwhile."""
        deadline = time.monotonic() + self.template_timeout_s
        for tpl in task.templates:
            while True:
                if stop.is_set():
                    alloc.client_status = "complete"
                    rec.stopped_at = time.monotonic()
                    return False
                try:
                    text = render(tpl.data, Context(env=dict(env), service=self.catalog.lookup))
                    break
                except ServiceNotReady as e:
                    if time.monotonic() > deadline:
                        self._fail(alloc, rec, f"template {tpl.destination}: service {e.name!r} had no healthy "
                                               f"instance within {self.template_timeout_s:g} s")
                        return False
                    self.catalog.wait_changed(0.2)
                except TemplateError as e:
                    self._fail(alloc, rec, f"template {tpl.destination}: {e}")
                    return False
            dest = task_dir / tpl.destination
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
            if tpl.env:
                try:
                    env |= parse_env_file(text)
                except TemplateError as e:
                    self._fail(alloc, rec, f"template {tpl.destination}: {e}")
                    return False
        return True

    def _supervise(self, alloc: Allocation, rec: AllocationRecord, stop: threading.Event, proc: subprocess.Popen,
                   group: GroupSpec, task: Any, ip: str, ports: Mapping[str, int]) -> None:
        pending = [*group.services, *task.services]
        channels: dict[str, Any] = {}
        try:
            while not stop.is_set():
                if proc.poll() is not None:
                    rec.exit_code, rec.stopped_at = proc.returncode, time.monotonic()
                    self.catalog.deregister(alloc.id)
                    self._fail(alloc, rec, f"the task exited by itself with status {proc.returncode} "
                                           f"(logs: {rec.log_dir})")
                    return
                for svc in list(pending):
                    port = ports.get(svc.port)
                    if port is None:
                        self._fail(alloc, rec, f"service {svc.name!r}: port label {svc.port!r} is not in the group's "
                                               f"network block")
                        pending.remove(svc)
                        continue
                    checks = [c for c in svc.checks]
                    if all(_check_passes(c, ip, ports.get(c.port, port), channels) for c in checks):
                        self.catalog.register(ServiceInstance(svc.name, alloc.id, ip, port, svc.tags))
                        pending.remove(svc)
                        if not pending:
                            rec.healthy_at = time.monotonic()
                stop.wait(_HEALTH_POLL_S if pending else 0.5)
        finally:
            for ch in channels.values():
                ch.close()
        # Stopping, as a Nomad client does: deregister, shutdown_delay, kill_signal, kill_timeout, SIGKILL.
        self.catalog.deregister(alloc.id)
        delay = max(task.shutdown_delay_s, group.shutdown_delay_s)
        if delay > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(delay)
        if proc.poll() is None:
            sig = getattr(signal, task.kill_signal.upper(), signal.SIGINT)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(task.kill_timeout_s)
            except subprocess.TimeoutExpired:
                rec.killed = True
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        rec.exit_code, rec.stopped_at = proc.returncode, time.monotonic()
        alloc.client_status = "complete"


def remove_tree(path: str | Path) -> None:
    """Remove an executor's work directory (allocation directories, logs)."""
    shutil.rmtree(path, ignore_errors=True)
