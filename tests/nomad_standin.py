"""A LOCAL HTTP STAND-IN for Nomad's HTTP API — not Nomad. No Nomad agent can be had here, so the Nomad provider
is tested against this small server, which answers the few endpoints the provider uses the way Nomad 1.x does.

What it models (checked against Nomad's ``nomad/job_endpoint.go`` ``Job.Scale`` and ``command/agent/job_endpoint.go``):

* jobs registered from a real job file (``deploy/nomad/chiron-engine.nomad.hcl`` parsed with python-hcl2): the task
  groups, their initial ``count`` and their ``scaling`` ``min``/``max`` (``${var.x}`` resolved from the variables'
  defaults);
* ``POST /v1/job/<id>/scale``: 404 ``job "<id>" not found``; 400 for an unknown group, a negative count, and a count
  outside the scaling min/max with Nomad's exact texts (``group count was greater than scaling policy maximum:
  N > M`` / ``... less than scaling policy minimum: N < M``); otherwise the count changes at once and allocations are
  placed (``pending``) or stopped (``DesiredStatus`` ``stop``, highest name index first) — the reply carries an
  ``EvalID`` and indexes;
* ``GET /v1/job/<id>``: the job with ``TaskGroups[].Name/Count/Scaling{Min,Max,Enabled}``; 404 ``job not found``;
* ``GET /v1/job/<id>/allocations``: allocation stubs (``ID``, ``Name``, ``JobID``, ``TaskGroup``, ``DesiredStatus``,
  ``ClientStatus``, ...); ``[]`` for an unknown job, as Nomad does;
* allocation life: ``pending`` → ``running`` after ``start_delay_s`` (None: only on :meth:`NomadApiStandIn.tick`);
  a stopped allocation keeps its client status for ``stop_delay_s`` (None: until a tick), then is ``complete``;
* ``?namespace=`` (jobs live in ``default`` unless registered elsewhere); ``X-Nomad-Token`` checked when
  ``required_token`` is set (403 ``Permission denied``); errors as plain-text bodies, as Nomad's HTTP server writes
  them;
* injected faults: :meth:`~NomadApiStandIn.fail_next` (the next N requests answer a status, 500 by default, or 429
  with ``Retry-After``) and :meth:`~NomadApiStandIn.drop_next` (the next N connections close without an answer).

What it does not model: evaluations, the scheduler (placement always succeeds: no nodes, resources, devices or
constraints), deployments (so no "job scaling blocked due to active deployment"), blocking queries and indexes
beyond a counter, job registration through the API, regions, ACL policies beyond one token, failed/lost allocations
and rescheduling, health checks, and every endpoint not listed above (404).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hcl2
from hcl2 import SerializationOptions

_HCL_OPTIONS = SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
_VAR_REF = re.compile(r"^\$\{var\.([A-Za-z0-9_]+)\}$")


def load_job_spec(path: str | Path) -> dict[str, Any]:
    """Parse a Nomad job file with python-hcl2 into a dict (``variable`` and ``job`` lists of one-key dicts)."""
    with open(path, encoding="utf-8") as f:
        return hcl2.load(f, serialization_options=_HCL_OPTIONS)


def variable_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: default}`` of the file's ``variable`` blocks (those without a default are left out)."""
    out: dict[str, Any] = {}
    for block in spec.get("variable", []):
        for name, body in block.items():
            if "default" in body:
                out[name] = body["default"]
    return out


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
                 required_token: str | None = None) -> None:
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

    def register_job_file(self, path: str | Path, *, namespace: str = "default") -> list[str]:
        """Register every job of a Nomad job file (groups, counts, scaling blocks) and place the initial
        allocations. Returns the job ids."""
        spec = load_job_spec(path)
        variables = variable_defaults(spec)
        ids = []
        for job_block in spec.get("job", []):
            for job_id, job in job_block.items():
                groups: dict[str, GroupState] = {}
                for group_block in job.get("group", []):
                    for name, group in group_block.items():
                        count = int(resolve(group.get("count", 1), variables))
                        scaling = None
                        for sc in group.get("scaling", []):
                            if isinstance(sc, dict) and "max" in sc:  # the group-level (horizontal) block
                                scaling = (int(resolve(sc.get("min", count), variables)),
                                           int(resolve(sc["max"], variables)), bool(resolve(sc.get("enabled", True), variables)))
                        groups[name] = GroupState(name, count, scaling)
                self.register_job(job_id, groups, namespace=namespace)
                ids.append(job_id)
        return ids

    def register_job(self, job_id: str, groups: Mapping[str, GroupState], *, namespace: str = "default") -> None:
        with self._lock:
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

    def _reconcile(self, job: JobState, group: GroupState) -> None:
        """Place or stop allocations so the group has ``count`` allocations Nomad wants running."""
        now = time.monotonic()
        live = [a for a in job.allocs if a.group == group.name and a.desired_status == "run"]
        if len(live) < group.count:
            used = {a.index for a in live}
            free = (i for i in range(10**6) if i not in used)
            for _ in range(group.count - len(live)):
                job.allocs.append(Allocation(str(uuid.uuid4()), job.id, job.namespace, group.name, next(free), now))
        elif len(live) > group.count:
            for a in sorted(live, key=lambda a: a.index, reverse=True)[: len(live) - group.count]:
                a.desired_status, a.stop_requested = "stop", now
        self._advance()

    def _advance(self, force: bool = False) -> None:
        now = time.monotonic()
        for job in self._jobs.values():
            for a in job.allocs:
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
            self._reconcile(job, group)
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
