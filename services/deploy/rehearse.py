"""``chiron deploy rehearse``: Chiron's five Nomad job files run as local processes, with traffic through them.

No Nomad, Consul or GPU is needed. The rehearsal:

1. renders every job file in ``deploy/nomad/`` as ``nomad job run -var ...`` would
   (:func:`services.deploy.jobspec.render_job_file`) and checks each task before anything starts: its templates
   render (:mod:`services.deploy.gotemplate`) and look up only services some job registers, its command's runtime
   references (``${NOMAD_PORT_grpc}``, ``${CHIRON_QUEUE_ADDRESS}``) are all defined, and a ``chiron`` command
   line parses with the real CLI parser (an unknown flag fails here). A failure is a :class:`RehearsalError`
   naming the file, the task and the reason;
2. starts etcd (a local process, as ``chiron up`` does), then a local Nomad stand-in
   (:class:`services.deploy.nomad_local.NomadApiStandIn`) whose executor runs every allocation as a process with
   exactly its rendered command line, registers the five jobs on it, and waits until the gateway, router, queue,
   scaler and an INTERACTIVE engine pass their health checks and the gateway lists the model (readiness, never
   fixed sleeps);
3. replays a slice of the Azure conversation trace (``../shared/data/traces/azure_llm_2023/``, Microsoft, CC-BY;
   :func:`services.common.traces.load_azure_trace`) as streamed ``POST /v1/completions`` through the gateway at
   the trace's arrival times ÷ ``speedup``, and runs one OpenAI Batch API job (a JSONL file uploaded through
   ``/v1/files``, a batch created through ``/v1/batches``) alongside; waits until the batch completes;
4. waits until the scaler, through the stand-in's job scale API, has both started and stopped at least one engine
   allocation (the batch group scales up for the batch and down after ``scale_down_delay_s``);
5. stops every job (``nomad job stop``: SIGTERM, ``kill_timeout``, SIGKILL) and etcd, whatever happened.

Times: wall seconds unless named ``trace``; interactive TTFT and ITL are measured by the client on the wall clock
and multiplied by ``speedup`` (the simulated engines run that much faster), so they compare with the SLO class's
trace-time SLOs (gateway class ``interactive``: TTFT 10 s, ITL 100 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import secrets
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from services.deploy.gotemplate import Context, TemplateError, parse_env_file, render, services_used
from services.deploy.jobspec import JobFileError, JobSpec, TaskSpec, render_job_file

DEFAULT_NOMAD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nomad"
JOB_ORDER = ("chiron-queue", "chiron-engine", "chiron-router", "chiron-scaler", "chiron-gateway")
MODEL = "llama-3-8b"


class RehearsalError(RuntimeError):
    """The rehearsal cannot run or failed: ``file``, ``task`` (``group/task``, or None) and ``reason``."""

    def __init__(self, reason: str, *, file: str | None = None, task: str | None = None) -> None:
        self.file, self.task, self.reason = file, task, reason
        where = ", ".join(x for x in (file, f"task {task}" if task else None) if x)
        super().__init__(f"{where}: {reason}" if where else reason)


@dataclass
class RehearsalConfig:
    """What to rehearse and how hard.

    ``nomad_dir``: the job files (``*.nomad.hcl``); ``variables``: ``-var NAME=VALUE`` overrides, applied to every
    file that declares NAME (one no file declares is an error); they go over the rehearsal's own settings
    (:func:`rehearsal_variables`). ``trace``, ``start_s``, ``duration_s`` [trace s]: the interactive slice;
    ``speedup``: replay and simulated-engine speed-up; ``max_output_tokens`` [tokens] caps a request's output;
    ``max_retries``: how often a client retries a request refused with 429 or 503 (the OpenAI client's default, 2,
    with its backoff). ``batch_requests`` lines in the Batch API job, each with ``batch_max_tokens`` [tokens] at
    most, and its ``completion_window``. ``gpu_budget`` [GPUs = engines], ``scaling_interval_s``,
    ``scale_down_delay_s``, ``model_load_time_s`` [s]: the scaler job's variables. ``ready_timeout_s``,
    ``batch_timeout_s``, ``scale_down_timeout_s`` [s]: how long each wait may take. ``work_dir``: allocation
    directories and logs (a temporary directory, removed after a success, when None).
    """

    nomad_dir: Path = DEFAULT_NOMAD_DIR
    variables: dict[str, str] = field(default_factory=dict)
    trace: str = "azure-conv"
    start_s: float = 0.0
    duration_s: float = 60.0
    speedup: float = 2.0
    max_output_tokens: int = 256
    max_retries: int = 2
    batch_requests: int = 24
    batch_max_tokens: int = 128
    completion_window: str = "10m"
    gpu_budget: int = 4
    scaling_interval_s: float = 1.0
    scale_down_delay_s: float = 10.0
    model_load_time_s: float = 5.0
    ready_timeout_s: float = 120.0
    batch_timeout_s: float = 180.0
    scale_down_timeout_s: float = 120.0
    work_dir: str | None = None


def chiron_executable() -> str:
    """The ``chiron`` executable next to this Python (the virtual environment's), else the one on PATH."""
    here = Path(sys.executable).parent / "chiron"
    found = str(here) if here.exists() else shutil.which("chiron")
    if not found:
        raise RehearsalError("no `chiron` executable next to this Python or on PATH (pip install -e .)")
    return found


def rehearsal_variables(cfg: RehearsalConfig, *, chiron_bin: str, etcd: str, nomad: str, gateway_port: int,
                        router_port: int) -> dict[str, str]:
    """The ``-var`` settings of a local rehearsal (each applies to the files that declare it): this machine's
    ``chiron``, etcd and Nomad stand-in; one router and one gateway (their ``distinct_hosts`` constraint allows
    one per node, and this is one node) on free static ports; simulated engines (``engine_args``); the scaler's
    intervals, and a GPU budget (one per engine) that keeps the engine count within what a small machine runs.
    No MIXED engine is kept (``mixed_min`` 0, the shipped files keep 1): a MIXED engine's idle capacity would
    serve the rehearsal's small batch job, and the rehearsal is there to see the scaler start and stop one."""
    return {
        "chiron_bin": chiron_bin, "etcd_address": etcd, "nomad_address": nomad,
        "gateway_port": str(gateway_port), "gateway_count": "1", "router_port": str(router_port), "router_count": "1",
        "engine_args": f"--backend simulated --model {MODEL} --speedup {cfg.speedup:g}",
        "scaling_interval_s": f"{cfg.scaling_interval_s:g}", "scale_down_delay_s": f"{cfg.scale_down_delay_s:g}",
        "model_load_time_s": f"{cfg.model_load_time_s:g}", "gpu_budget": str(cfg.gpu_budget),
        "mixed_min": "0",
    }


# ------------------------------------------------------------------------------------------------ rendering and checks

def _declared(path: Path) -> set[str]:
    from services.deploy.jobspec import load_job_spec

    return {name for block in load_job_spec(path).get("variable", []) for name in block}


def render_jobs(nomad_dir: Path, variables: Mapping[str, str], strict: Mapping[str, str] | None = None) -> list[JobSpec]:
    """Render every ``*.nomad.hcl`` of ``nomad_dir`` with the ``variables`` each declares. ``strict``: overrides
    that must be declared by at least one file (the operator's own ``-var``s). Raises :class:`RehearsalError`."""
    files = sorted(Path(nomad_dir).glob("*.nomad.hcl"))
    if not files:
        raise RehearsalError(f"no *.nomad.hcl job files in {nomad_dir}")
    jobs: list[JobSpec] = []
    declared_anywhere: set[str] = set()
    for path in files:
        try:
            declared = _declared(path)
        except Exception:  # does not parse: render_job_file below says so, with the file
            declared = set()
        try:
            jobs += render_job_file(path, {k: v for k, v in variables.items() if k in declared})
        except JobFileError as e:
            raise RehearsalError(e.reason, file=str(path),
                                 task=f"{e.group}/{e.task}" if e.task else e.group) from e
        declared_anywhere |= declared
    unknown = sorted(set(strict or {}) - declared_anywhere)
    if unknown:
        raise RehearsalError(f"-var {', '.join(unknown)}: no job file declares such a variable")
    return jobs


def chiron_arguments(argv: list[str], chiron_bin: str) -> list[str] | None:
    """The arguments after ``chiron`` in a task's command line: ``chiron ARGS`` itself, or a ``/bin/sh -c`` script
    that runs (``exec``) it. None when the command does not run ``chiron``."""
    def is_chiron(word: str) -> bool:
        return word == chiron_bin or Path(word).name == "chiron"

    if argv and is_chiron(argv[0]):
        return argv[1:]
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash", "dash") and argv[1] == "-c":
        words = shlex.split(argv[2])
        for i, w in enumerate(words):
            if is_chiron(w):
                rest = words[i + 1:]
                for j, r in enumerate(rest):
                    if r in (";", "&&", "||", "|"):
                        return rest[:j]
                return rest
    return None


def check_chiron_flags(args: list[str], chiron: click.Group) -> str | None:
    """Parse ``chiron ARGS`` with ``chiron``, the real CLI parser (:func:`services.cli.main`), without running it.
    Returns why it does not parse (unknown command or option, a bad value), or None."""
    if not args:
        return "`chiron` without a command"
    cmd = chiron.commands.get(args[0])
    if cmd is None:
        return f"`chiron` has no command {args[0]!r} (commands: {', '.join(sorted(chiron.commands))})"
    if "--help" in args or "-h" in args:
        return None
    try:
        with cmd.make_context(f"chiron {args[0]}", list(args[1:])):
            pass
    except click.NoSuchOption as e:
        return f"`chiron {args[0]}` has no option {e.option_name}" + (
            f" (did you mean {', '.join(e.possibilities)}?)" if e.possibilities else "")
    except click.ClickException as e:
        return f"`chiron {args[0]}`: {e.format_message()}"
    return None


def _placeholder_env(job: JobSpec, group_name: str, task: TaskSpec) -> dict[str, str]:
    group = job.groups[group_name]
    env = {"NOMAD_ALLOC_DIR": "/alloc", "NOMAD_TASK_DIR": "/local", "NOMAD_SECRETS_DIR": "/secrets",
           "NOMAD_ALLOC_ID": str(uuid.UUID(int=0)), "NOMAD_SHORT_ALLOC_ID": "00000000", "NOMAD_ALLOC_INDEX": "0",
           "NOMAD_ALLOC_NAME": f"{job.id}.{group_name}[0]", "NOMAD_JOB_ID": job.id, "NOMAD_JOB_NAME": job.id,
           "NOMAD_GROUP_NAME": group_name, "NOMAD_TASK_NAME": task.name, "NOMAD_NAMESPACE": "default",
           "NOMAD_REGION": "global", "NOMAD_DC": "dc1"}
    for i, (label, static) in enumerate(group.ports.items()):
        port = str(static if static is not None else 20000 + i)
        env |= {f"NOMAD_IP_{label}": "127.0.0.1", f"NOMAD_HOST_IP_{label}": "127.0.0.1", f"NOMAD_PORT_{label}": port,
                f"NOMAD_HOST_PORT_{label}": port, f"NOMAD_ADDR_{label}": f"127.0.0.1:{port}",
                f"NOMAD_HOST_ADDR_{label}": f"127.0.0.1:{port}"}
    if task.identity_env:
        env["NOMAD_TOKEN"] = "token"
    return env | task.env


def check_jobs(jobs: list[JobSpec], chiron_bin: str, chiron: click.Group) -> None:
    """Check every task before anything starts (see the module docstring). Raises :class:`RehearsalError` with
    the file, the task and the reason."""
    registered = {s.name for j in jobs for g in j.groups.values() for s in [*g.services, *(x for t in g.tasks
                                                                                            for x in t.services)]}
    for job in jobs:
        for gname, group in job.groups.items():
            for task in group.tasks:
                where = {"file": job.file, "task": f"{gname}/{task.name}"}
                if task.driver != "raw_exec":
                    raise RehearsalError(f"driver {task.driver!r}: the rehearsal runs raw_exec tasks only", **where)
                env = _placeholder_env(job, gname, task)
                for tpl in task.templates:
                    for name in services_used(tpl.data):
                        if name not in registered:
                            raise RehearsalError(f"template {tpl.destination} refers to service {name!r}, which no job "
                                                 f"registers (registered: {', '.join(sorted(registered))})", **where)

                    def fake(name: str) -> list[dict[str, Any]]:
                        return [{"Name": name, "ID": name, "Address": "127.0.0.1", "Port": 1, "Tags": []}]

                    try:
                        text = render(tpl.data, Context(env=env, service=fake))
                        if tpl.env:
                            env |= parse_env_file(text)
                    except TemplateError as e:
                        raise RehearsalError(f"template {tpl.destination}: {e}", **where) from e
                argv, missing = task.runtime_command(env)
                if missing:
                    raise RehearsalError(f"the command refers to {', '.join('${' + m + '}' for m in missing)}, which "
                                         f"neither Nomad's runtime environment nor a template defines", **where)
                args = chiron_arguments(argv, chiron_bin)
                if args is None:
                    raise RehearsalError(f"the command does not run chiron: {shlex.join(argv)}", **where)
                why = check_chiron_flags(args, chiron)
                if why:
                    raise RehearsalError(why, **where)


def _command_check(chiron_bin: str, chiron: click.Group) -> Callable[[JobSpec, Any, str, list[str]], str | None]:
    def check(job: JobSpec, group: Any, task: str, argv: list[str]) -> str | None:
        args = chiron_arguments(argv, chiron_bin)
        if args is None:
            return f"the command does not run chiron: {shlex.join(argv)}"
        return check_chiron_flags(args, chiron)

    return check


# ------------------------------------------------------------------------------------------------ traffic

@dataclass
class _Interactive:
    prompt_tokens: int
    max_tokens: int
    status: int = 0
    error: str = ""
    accepted: bool = False
    ttft_s: float = math.nan
    last_s: float = math.nan
    chunks: int = 0
    completion_tokens: int = 0
    finish: str = ""
    retries: int = 0
    t0: float = 0.0

    @property
    def served(self) -> bool:
        return self.status == 200 and self.finish in ("length", "stop") and self.completion_tokens == self.max_tokens


async def _one_interactive(client: Any, rec: _Interactive, prompt: list[int], max_retries: int) -> None:
    """One streamed completion. A 429 or 503 before any token is retried ``max_retries`` times after the answer's
    ``Retry-After`` or the OpenAI client's backoff (0.5 s, 1 s, ... at most 8 s); TTFT counts from the first try."""
    for attempt in range(max_retries + 1):
        retry_after = await _try_interactive(client, rec, prompt, time.monotonic() if attempt == 0 else rec.t0)
        if retry_after is None or attempt == max_retries:
            return
        rec.retries += 1
        await asyncio.sleep(retry_after if retry_after > 0 else min(0.5 * 2**attempt, 8.0))


async def _try_interactive(client: Any, rec: _Interactive, prompt: list[int], t0: float) -> float | None:
    import httpx

    rec.t0 = t0
    body = {"model": MODEL, "prompt": prompt, "max_tokens": rec.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "slo_class": "interactive"}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                rec.error = (await r.aread()).decode(errors="replace")[:300]
                if r.status_code in (429, 503):
                    try:
                        return float(r.headers.get("retry-after", "0"))
                    except ValueError:
                        return 0.0
                return None
            rec.accepted = True
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if msg.get("error"):
                    rec.error = json.dumps(msg["error"])[:300]
                for ch in msg.get("choices", []):
                    if ch.get("text"):
                        now = time.monotonic() - t0
                        if rec.chunks == 0:
                            rec.ttft_s = now
                        rec.last_s = now
                        rec.chunks += 1
                    if ch.get("finish_reason"):
                        rec.finish = ch["finish_reason"]
                if msg.get("usage"):
                    rec.completion_tokens = int(msg["usage"].get("completion_tokens", 0))
    except (httpx.HTTPError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"
    return None


async def _run_interactive(base_url: str, cfg: RehearsalConfig) -> tuple[list[_Interactive], str]:
    import httpx

    from services.common.traces import load_azure_trace

    trace = load_azure_trace(cfg.trace).slice(cfg.start_s, cfg.duration_s)
    if len(trace) == 0:
        raise RehearsalError(f"the trace slice {cfg.trace} [{cfg.start_s:g}, +{cfg.duration_s:g}] s holds no requests")
    rng = np.random.default_rng(0)
    recs: list[_Interactive] = []
    tasks = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(120.0, connect=10.0), limits=limits) as client:
        t0 = time.monotonic()
        for t, p, g in zip(trace.arrival_s, trace.prompt_tokens, trace.output_tokens, strict=True):
            delay = t0 + float(t) / cfg.speedup - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            rec = _Interactive(int(p), max(1, min(int(g), cfg.max_output_tokens)))
            recs.append(rec)
            prompt = rng.integers(3, 32000, size=max(1, int(p))).tolist()
            tasks.append(asyncio.create_task(_one_interactive(client, rec, prompt, cfg.max_retries)))
        await asyncio.gather(*tasks)
    return recs, trace.name


async def _run_batch(base_url: str, cfg: RehearsalConfig) -> dict[str, Any]:
    """One Batch API job: upload, create, wait until it ends; returns its outcome."""
    import httpx

    rng = np.random.default_rng(1)
    lines = []
    for i in range(cfg.batch_requests):
        words = " ".join(f"w{int(x)}" for x in rng.integers(0, 5000, size=int(rng.integers(20, 200))))
        lines.append({"custom_id": f"rehearsal-{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": MODEL, "messages": [{"role": "user", "content": words}],
                               "max_tokens": int(rng.integers(8, cfg.batch_max_tokens + 1))}})
    content = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
        r = await client.post("/v1/files", files={"file": ("rehearsal.jsonl", content)}, data={"purpose": "batch"})
        if r.status_code != 200:
            raise RehearsalError(f"Batch API upload failed: HTTP {r.status_code} {r.text[:300]}")
        file_id = r.json()["id"]
        r = await client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                                   "completion_window": cfg.completion_window})
        if r.status_code != 200:
            raise RehearsalError(f"Batch API create failed: HTTP {r.status_code} {r.text[:300]}")
        batch = r.json()
        deadline = time.monotonic() + cfg.batch_timeout_s
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)  # polling the batch's status (the Batch API has no push)
            r = await client.get(f"/v1/batches/{batch['id']}")
            if r.status_code == 200:
                batch = r.json()
        done, errors = 0, []
        if batch.get("output_file_id"):
            r = await client.get(f"/v1/files/{batch['output_file_id']}/content")
            for line in r.text.splitlines():
                out = json.loads(line)
                if (out.get("response") or {}).get("status_code") == 200:
                    done += 1
                else:
                    errors.append(out)
        if batch.get("error_file_id"):
            r = await client.get(f"/v1/files/{batch['error_file_id']}/content")
            errors += [json.loads(x) for x in r.text.splitlines()]
    return {"id": batch["id"], "status": batch["status"], "count": len(lines), "done": done,
            "request_counts": batch.get("request_counts"), "errors": errors[:5]}


# ------------------------------------------------------------------------------------------------ the rehearsal

async def _wait(what: str, predicate: Callable[[], Any], timeout_s: float, failed: Callable[[], str | None],
                interval_s: float = 0.2) -> None:
    """Poll ``predicate`` (sync or async) every ``interval_s`` [s] until true; ``failed()`` raises (or returns a
    reason) when the rehearsal cannot go on; RehearsalError after ``timeout_s`` [s]."""
    deadline = time.monotonic() + timeout_s
    while True:
        why = failed()
        if why:
            raise RehearsalError(f"while waiting for {what}: {why}")
        v = predicate()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return
        if time.monotonic() > deadline:
            raise RehearsalError(f"{what}: not reached within {timeout_s:g} s")
        await asyncio.sleep(interval_s)


def _free_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log_dir: str, n: int = 2000) -> str:
    out = []
    for p in sorted(Path(log_dir).glob("*.0")) if log_dir else []:
        with contextlib.suppress(OSError):
            text = p.read_text(errors="replace")[-n:]
            if text.strip():
                out.append(f"--- {p} ---\n{text}")
    return "\n".join(out)


async def rehearse(cfg: RehearsalConfig, chiron: click.Group,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the rehearsal (module docstring) with ``chiron``, the CLI parser the tasks' chiron flags are checked
    against (:func:`services.cli.main`); returns the report. Raises :class:`RehearsalError` for bad job files
    (before anything starts) and for a rehearsal that cannot go on (a task that fails, a wait that times out);
    everything started is stopped in every case."""
    from services.common.etcd_server import EtcdNotFound, EtcdServer
    from services.deploy.nomad_local import LocalExecutor, NomadApiStandIn, ServiceCatalog

    say = progress or (lambda _m: None)
    t_start = t_end = time.monotonic()
    chiron_bin = chiron_executable()
    # Render and check with placeholder addresses first: bad input fails before anything starts.
    placeholder = rehearsal_variables(cfg, chiron_bin=chiron_bin, etcd="127.0.0.1:2379", nomad="http://127.0.0.1:4646",
                                      gateway_port=8000, router_port=50050)
    check_jobs(render_jobs(cfg.nomad_dir, placeholder | cfg.variables, strict=cfg.variables), chiron_bin, chiron)
    say("job files rendered and checked")

    work = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.mkdtemp(prefix="chiron-rehearsal-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        etcd = EtcdServer(work / "etcd")
    except EtcdNotFound as e:
        raise RehearsalError(str(e)) from e
    token = secrets.token_hex(16)  # the scaler's workload identity (identity { env = true } → NOMAD_TOKEN)
    catalog = ServiceCatalog()
    executor = LocalExecutor(work / "allocs", catalog, check_command=_command_check(chiron_bin, chiron), identity_token=token,
                             template_timeout_s=cfg.ready_timeout_s)
    standin = NomadApiStandIn(required_token=token, executor=executor)
    ok = False
    report: dict[str, Any] | None = None
    try:
        await asyncio.to_thread(etcd.start)
        standin.start()
        say(f"etcd on {etcd.endpoint}; Nomad API stand-in on {standin.address}")
        jobs, base_url, failed = await _start_jobs(cfg, chiron_bin, etcd.endpoint, standin, catalog, executor, say)
        t_ready = time.monotonic()
        say(f"ready after {t_ready - t_start:.1f} s; replaying {cfg.duration_s:g} s of {cfg.trace} at {cfg.speedup:g}x "
            f"plus a Batch API job of {cfg.batch_requests} requests")
        inter, trace_name, batch = await _traffic(base_url, cfg, failed)
        say(f"traffic done after {time.monotonic() - t_ready:.1f} s: interactive {sum(r.served for r in inter)}/"
            f"{len(inter)} served, batch {batch['done']}/{batch['count']} done ({batch['status']})")
        with contextlib.suppress(RehearsalError):  # reported as a missed target, not an error
            await _wait("the scaler to start and stop an engine allocation", lambda: _scaler_cycled(executor),
                        cfg.scale_down_timeout_s, lambda: None)
        t_end = time.monotonic()
        report = _report(cfg, jobs, executor, standin, inter, trace_name, batch, t_start, t_ready, t_end)
        ok = report["targets"]["ok"]
        return report
    finally:
        say("stopping every job (SIGTERM, then SIGKILL after kill_timeout)")
        await _teardown(standin, executor, report, t_end)
        await asyncio.to_thread(etcd.stop)
        if ok and cfg.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
        elif not ok:
            say(f"allocation directories and logs kept in {work}")


async def _start_jobs(cfg: RehearsalConfig, chiron_bin: str, etcd: str, standin: Any, catalog: Any, executor: Any,
                      say: Callable[[str], None]) -> tuple[dict[str, JobSpec], str, Callable[[], None]]:
    """Render the job files for this rehearsal's addresses, register them with the stand-in and wait until every
    service is healthy and the gateway lists the model. Returns the jobs by id, the gateway's base URL and the
    check that raises :class:`RehearsalError` for the first failed allocation."""
    variables = rehearsal_variables(cfg, chiron_bin=chiron_bin, etcd=etcd, nomad=standin.address,
                                    gateway_port=_free_local_port(), router_port=_free_local_port())
    jobs = {j.id: j for j in render_jobs(cfg.nomad_dir, variables | cfg.variables, strict=cfg.variables)}
    for job_id in [*(j for j in JOB_ORDER if j in jobs), *(j for j in jobs if j not in JOB_ORDER)]:
        standin.register_job_spec(jobs[job_id])
    say(f"registered {', '.join(jobs)}")

    def failed() -> None:
        bad = executor.failures()
        if bad:
            r = bad[0]
            raise RehearsalError(f"allocation {r.alloc_id[:8]} failed: {r.error}\n{_log_tail(r.log_dir)}",
                                 file=jobs[r.job].file, task=f"{r.group}/{r.task}")

    needed = ["chiron-queue", "chiron-router", "chiron-scaler", "chiron-gateway", "chiron-engine-interactive"]
    await _wait("every service healthy (" + ", ".join(needed) + ")",
                lambda: all(catalog.instances(n) for n in needed), cfg.ready_timeout_s, failed)
    gw = catalog.instances("chiron-gateway")[0]
    base_url = f"http://{gw.address}:{gw.port}"
    await _wait(f"the gateway at {base_url} to list {MODEL}", lambda: _model_listed(base_url), cfg.ready_timeout_s,
                failed)
    return jobs, base_url, failed


async def _model_listed(base_url: str) -> bool:
    """Whether the gateway's /v1/models lists the rehearsal's model."""
    import httpx

    async with httpx.AsyncClient(timeout=5.0) as c:
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = await c.get(f"{base_url}/v1/models")
            return r.status_code == 200 and any(m.get("id") == MODEL for m in r.json().get("data", []))
    return False


async def _traffic(base_url: str, cfg: RehearsalConfig,
                   failed: Callable[[], None]) -> tuple[list[_Interactive], str, dict[str, Any]]:
    """The interactive slice and the Batch API job through the gateway, side by side, while ``failed()`` is
    checked every 0.5 s (its RehearsalError ends the traffic and is raised). Returns the interactive records,
    the trace's name and the batch outcome."""
    async def watch_failures() -> None:
        while True:
            failed()
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_failures())
    work_tasks = asyncio.gather(_run_interactive(base_url, cfg), _run_batch(base_url, cfg))
    done, _ = await asyncio.wait([watcher, work_tasks], return_when=asyncio.FIRST_COMPLETED)
    if watcher in done:
        work_tasks.cancel()
        with contextlib.suppress(BaseException):
            await work_tasks
        watcher.result()  # raises the allocation's failure
    watcher.cancel()
    (inter, trace_name), batch = work_tasks.result()
    return inter, trace_name, batch


def _scaler_cycled(executor: Any) -> bool:
    """Whether the scaler (Nomad's job scale API) has both started and stopped an allocation."""
    recs = list(executor.records.values())
    return (any(r.cause == "job scale" and r.started_at is not None for r in recs)
            and any(r.stop_cause == "job scale" and r.stopped_at is not None for r in recs))


async def _teardown(standin: Any, executor: Any, report: dict[str, Any] | None, t_end: float) -> None:
    """Stop every job (gateway first, queue last), wait for the allocations and the stand-in, and add what the
    teardown left to ``report`` (when there is one)."""
    for job_id in ("chiron-gateway", "chiron-scaler", "chiron-router", "chiron-engine", "chiron-queue"):
        with contextlib.suppress(KeyError):
            standin.stop_job(job_id)
    await asyncio.to_thread(executor.shutdown, 90.0)
    if report is not None:
        recs = list(executor.records.values())
        report["teardown"] = {"stopped": sum(r.stopped_at is not None for r in recs),
                              "killed": sum(r.killed for r in recs),
                              "left_running": executor.alive(),
                              "seconds": round(time.monotonic() - t_end, 3)}
    standin.stop()


def _report(cfg: RehearsalConfig, jobs: dict[str, JobSpec], executor: Any, standin: Any, inter: list[_Interactive],
            trace_name: str, batch: dict[str, Any], t_start: float, t_ready: float, t_end: float) -> dict[str, Any]:
    recs = sorted(executor.records.values(), key=lambda r: r.started_at or math.inf)

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - t_start, 3)

    job_rows = []
    for job in jobs.values():
        tasks = []
        for gname, group in job.groups.items():
            for task in group.tasks:
                rendered = sorted({shlex.join(r.command_line) for r in recs
                                   if r.job == job.id and r.group == gname and r.command_line})
                tasks.append({"group": gname, "task": task.name, "spec": shlex.join(task.command_line()),
                              "rendered": rendered})
        job_rows.append({"file": str(Path(job.file).name), "job": job.id, "tasks": tasks})
    started = [r for r in recs if r.started_at is not None]
    stopped = [r for r in recs if r.stopped_at is not None and r.stopped_at <= t_end]
    scaler_started = [r for r in started if r.cause == "job scale"]
    scaler_stopped = [r for r in stopped if r.stop_cause == "job scale"]
    served = [r for r in inter if r.served]
    speed = cfg.speedup

    def meets(r: _Interactive) -> bool:
        itl_ms = (r.last_s - r.ttft_s) / max(r.completion_tokens - 1, 1) * 1e3 * speed if r.completion_tokens > 1 else 0.0
        return r.served and r.ttft_s * 1e3 * speed <= 10_000 and itl_ms <= 100

    ttft = np.array([r.ttft_s * 1e3 * speed for r in served]) if served else np.array([math.nan])
    lost_i = sum(1 for r in inter if r.accepted and not r.served)
    lost_b = max(0, batch["count"] - batch["done"]) if batch["status"] in ("completed", "failed", "expired") else 0
    report = {
        "trace": trace_name, "speedup": speed,
        "jobs": job_rows,
        "allocations_started": len(started),
        "allocations_stopped": len(stopped),
        # stopped_before_healthy: allocations the scaler stopped before their engine passed its health check
        "scaler_allocations": {"started": len(scaler_started), "stopped": len(scaler_stopped),
                               "stopped_before_healthy": sum(1 for r in scaler_stopped if r.healthy_at is None)},
        "allocations": [{"job": r.job, "group": r.group, "id": r.alloc_id, "cause": r.cause, "stop_cause": r.stop_cause,
                         "started_s": rel(r.started_at), "healthy_s": rel(r.healthy_at), "stopped_s": rel(r.stopped_at),
                         "exit_code": r.exit_code, "killed": r.killed, "error": r.error} for r in recs],
        "interactive": {"count": len(inter), "served": len(served), "accepted": sum(r.accepted for r in inter),
                        "retries": sum(r.retries for r in inter),
                        "slo_attainment": sum(meets(r) for r in inter) / max(len(inter), 1),
                        "ttft_p50_ms": float(np.nanpercentile(ttft, 50)), "ttft_p99_ms": float(np.nanpercentile(ttft, 99)),
                        "errors": sorted({f"{r.status} {r.error}"[:200] for r in inter if not r.served})[:5]},
        "batch": batch,
        "scale_events": [{"t_s": round(e["t"] - t_start, 3), "group": e["group"], "count": e["count"],
                          "message": e["message"]} for e in standin.scale_log],
        "lost_requests": lost_i + lost_b,
        "wall_seconds": {"ready": round(t_ready - t_start, 3), "total": round(t_end - t_start, 3)},
    }
    targets = {
        "every_interactive_served": len(served) == len(inter) > 0,
        "every_batch_done": batch["done"] == batch["count"] > 0,
        "no_lost_requests": report["lost_requests"] == 0,
        "scaler_started_an_engine": bool(scaler_started),
        "scaler_stopped_an_engine": bool(scaler_stopped),
    }
    targets["ok"] = all(targets.values())
    report["targets"] = targets
    return report
