"""Nomad deployment: the job specs in deploy/nomad/ (parsed with python-hcl2) and the Nomad instance provider,
tested against a LOCAL HTTP STAND-IN for Nomad's API (tests/nomad_standin.py) — no Nomad agent can be had here."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.deploy.jobspec import evaluate, interpolate, resolve_locals, resolve_variables
from services.global_scaler.nomad import DEFAULT_GROUPS, NomadApiError, NomadConfig, NomadProvider, parse_groups
from services.global_scaler.providers import ROLES, InstanceCounts, ProviderError
from tests.conftest import eventually
from tests.nomad_standin import NomadApiStandIn, load_job_spec, resolve, variable_defaults

NOMAD_DIR = Path(__file__).resolve().parent.parent / "deploy" / "nomad"
ENGINE_SPEC = NOMAD_DIR / "chiron-engine.nomad.hcl"
SPECS = ("chiron-engine", "chiron-queue", "chiron-scaler", "chiron-router", "chiron-gateway")


# ---------------------------------------------------------------------------------------------------- job specs


def _one(blocks: Any) -> Any:
    """python-hcl2 gives repeated-block lists; most blocks here appear once."""
    assert isinstance(blocks, list) and len(blocks) == 1, blocks
    return blocks[0]


def _job(spec: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The job's id and body, its ``dynamic "group"`` blocks expanded into ``group`` blocks as ``nomad job run``
    renders them (variables at their defaults; static groups stay as parsed)."""
    (job_id, job), = _one(spec["job"]).items()
    dynamic = [b for b in job.get("dynamic", []) if "group" in b]
    if dynamic:
        var = resolve_variables(spec)
        made = evaluate({"dynamic": dynamic}, {"var": var, "local": resolve_locals(spec, var)})["group"]
        job = {**job, "group": [*job.get("group", []), *made]}
    return job_id, job


def _groups(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: body for block in job["group"] for name, body in block.items()}


def _tasks(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: body for block in group["task"] for name, body in block.items()}


def _command_line(task: dict[str, Any]) -> str:
    config = _one(task["config"])
    return " ".join([config["command"], *config.get("args", [])])


def _ports(group: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: body for block in _one(group["network"])["port"] for name, body in block.items()}


def _checks(group: dict[str, Any]) -> list[dict[str, Any]]:
    services = list(group.get("service", []))
    for task in _tasks(group).values():
        services += task.get("service", [])
    return [c for s in services for c in s.get("check", [])]


@pytest.fixture(scope="module")
def specs() -> dict[str, dict[str, Any]]:
    return {name: load_job_spec(NOMAD_DIR / f"{name}.nomad.hcl") for name in SPECS}


def test_every_spec_parses_and_references_only_declared_variables_and_ports(specs):
    assert sorted(p.name for p in NOMAD_DIR.glob("*.nomad.hcl")) == sorted(f"{n}.nomad.hcl" for n in SPECS)
    for name, spec in specs.items():
        job_id, job = _job(spec)
        assert job_id == name
        assert job.get("type", "service") == "service"
        declared = set(variable_defaults(spec)) | {n for b in spec.get("variable", []) for n in b}
        text = (NOMAD_DIR / f"{name}.nomad.hcl").read_text()
        used = set(re.findall(r"var\.([A-Za-z0-9_]+)", text))
        assert used <= declared, f"{name}: undeclared variables {used - declared}"
        for group_name, group in _groups(job).items():
            ports = _ports(group)
            for task in _tasks(group).values():
                assert task["driver"] in ("raw_exec", "docker")
                for label in re.findall(r"\$\{NOMAD_(?:PORT|IP|ADDR|HOST_PORT)_([A-Za-z0-9_]+)\}", _command_line(task)):
                    assert label in ports, f"{name}/{group_name}: port {label!r} used but not declared"


def test_engine_spec_has_what_the_scaler_relies_on(specs):
    spec = specs["chiron-engine"]
    job_id, job = _job(spec)
    assert job_id == "chiron-engine"
    variables = variable_defaults(spec)
    assert variables.get("etcd_address"), "etcd_address variable with a default"
    groups = _groups(job)
    assert set(groups) == set(DEFAULT_GROUPS.values())
    for role, group_name in DEFAULT_GROUPS.items():
        group = groups[group_name]
        scaling = _one(group["scaling"])
        lo, hi = int(scaling["min"]), int(scaling["max"])
        assert 0 <= lo <= hi and hi >= 1, (group_name, lo, hi)
        assert scaling.get("enabled", True) is True
        assert lo <= int(resolve(group.get("count", lo), variables)) <= hi
        # Scaling must never be refused for an active deployment: no deployments on engine groups.
        assert int(_one(group["update"])["max_parallel"]) == 0
        # A dynamic gRPC port, used by the task.
        ports = _ports(group)
        assert "grpc" in ports and "static" not in ports["grpc"]
        (task,) = _tasks(group).values()
        cmd = _command_line(task)
        for part in ("engine", "--backend vllm", f"--model {variables['model_dir']}", f"--role {role}",
                     "--port ${NOMAD_PORT_grpc}", f"--etcd {variables['etcd_address']}"):
            assert part in cmd, (group_name, part, cmd)
        # BATCH and MIXED engines lease batch work: they need the queue (from Consul, like the router and scaler).
        if role in ("batch", "mixed"):
            assert "--queue ${CHIRON_QUEUE_ADDRESS}" in cmd, (group_name, cmd)
            assert any('service "chiron-queue"' in t["data"] and "CHIRON_QUEUE_ADDRESS=" in t["data"]
                       for t in task["template"]), group_name
        # One A100 per engine.
        resources = _one(task["resources"])
        gpu = _one(resources["device"])["nvidia/gpu"]
        assert int(gpu.get("count", 1)) == 1
        constraints = gpu["constraint"]
        assert any(c["attribute"] == "${device.model}" and "A100" in str(c["value"])
                   and c.get("operator", "=") in ("=", "==", "regexp") for c in constraints), constraints
        # gRPC health check on the gRPC port.
        checks = _checks(group)
        assert any(c["type"] == "grpc" and c.get("port", "grpc") == "grpc"
                   and c.get("grpc_service", "") in ("", "chiron.v1.Engine") for c in checks), checks


@pytest.mark.parametrize("name,service", [("chiron-queue", "chiron.v1.Queue"), ("chiron-scaler", "chiron.v1.GlobalScaler"),
                                          ("chiron-router", "chiron.v1.Router")])
def test_control_plane_specs_have_ports_and_grpc_health_checks(specs, name, service):
    _, job = _job(specs[name])
    for group_name, group in _groups(job).items():
        assert "grpc" in _ports(group), group_name
        assert any(c["type"] == "grpc" and c.get("grpc_service", "") in ("", service) for c in _checks(group))
        (task,) = _tasks(group).values()
        cmd = _command_line(task)
        assert "--port ${NOMAD_PORT_grpc}" in cmd
        assert f" {name.removeprefix('chiron-')} " in f" {cmd} "


def test_scaler_spec_points_the_nomad_provider_at_the_engine_job(specs):
    spec = specs["chiron-scaler"]
    _, job = _job(spec)
    variables = variable_defaults(spec)
    (group,) = _groups(job).values()
    assert int(group.get("count", 1)) == 1  # one writer of scale decisions
    args = _one(_tasks(group)["scaler"]["config"])["args"]
    opts = {args[i]: interpolate(args[i + 1], {"var": variables}) for i in range(len(args) - 1) if args[i].startswith("--")}
    engine_id, engine = _job(specs["chiron-engine"])
    assert opts["--provider"] == "nomad"
    assert opts["--nomad-job"] == engine_id == "chiron-engine"
    assert str(opts["--nomad-address"]).startswith("http")
    assert opts["--etcd"] == variables["etcd_address"]
    # The scaler's MIN:MAX per role must be the engine groups' scaling bounds, or Nomad refuses its counts.
    engine_groups = _groups(engine)
    for role, group_name in DEFAULT_GROUPS.items():
        scaling = _one(engine_groups[group_name]["scaling"])
        assert opts[f"--{role}"] == f"{scaling['min']}:{scaling['max']}", role


# ---------------------------------------------------------------------------------------------------- provider

@pytest.fixture(autouse=True)
def _no_nomad_env(monkeypatch):
    for name in ("NOMAD_ADDR", "NOMAD_TOKEN", "NOMAD_NAMESPACE", "NOMAD_REGION"):
        monkeypatch.delenv(name, raising=False)


FAST = dict(max_retries=3, backoff_initial_s=0.001, backoff_multiplier=2.0, backoff_max_s=0.004, request_timeout_s=2.0)


@pytest.fixture
def nomad():
    """Stand-in with the real engine job registered; allocations move only on tick() unless a test says so."""
    with NomadApiStandIn(start_delay_s=None, stop_delay_s=None) as standin:
        standin.register_job_file(ENGINE_SPEC)
        standin.tick()
        yield standin


@pytest.fixture
async def provider(nomad):
    p = NomadProvider(NomadConfig(address=nomad.address, **FAST))
    yield p
    await p.close()


def _bounds(nomad: NomadApiStandIn, role: str) -> tuple[int, int]:
    lo, hi, _ = nomad.scaling("chiron-engine", DEFAULT_GROUPS[role])
    return lo, hi


async def test_scale_up_counts_pending_then_running(nomad, provider):
    start = await provider.counts("interactive")
    assert start == InstanceCounts(running=nomad.group_count("chiron-engine", "engine-interactive"), pending=0)
    target = min(start.running + 2, _bounds(nomad, "interactive")[1])
    await provider.set_count("interactive", target, reason="burst: CV 1.8")
    assert nomad.group_count("chiron-engine", "engine-interactive") == target
    assert await provider.counts("interactive") == InstanceCounts(running=start.running, pending=target - start.running)
    nomad.tick()
    assert await provider.counts("interactive") == InstanceCounts(running=target, pending=0)
    # Other roles untouched; the request carried what Nomad's scale endpoint expects.
    assert await provider.counts("batch") == InstanceCounts(running=0, pending=0)
    req = nomad.scale_requests[-1]
    assert req["Count"] == target and req["Target"] == {"Group": "engine-interactive"} and req["Message"] == "burst: CV 1.8"
    assert [r.path for r in nomad.requests if r.method == "POST"] == ["/v1/job/chiron-engine/scale"]
    # Asking for the count the group already has sends nothing (no new job version, eval or scaling event).
    await provider.set_count("interactive", target)
    assert len(nomad.scale_requests) == 1


async def test_allocations_start_after_a_delay(nomad):
    nomad.start_delay_s = 0.15
    async with NomadProvider(NomadConfig(address=nomad.address, **FAST)) as p:
        await p.set_count("batch", 2)
        assert await p.counts("batch") == InstanceCounts(running=0, pending=2)

        async def both_running() -> bool:
            return await p.counts("batch") == InstanceCounts(running=2, pending=0)

        await eventually(both_running, timeout_s=3.0)


async def test_scale_down_stops_allocations(nomad, provider):
    await provider.set_count("mixed", 3)
    nomad.tick()
    assert await provider.counts("mixed") == InstanceCounts(running=3)
    await provider.set_count("mixed", 1, reason="hysteresis window passed")
    # Nomad wants two stopped; their tasks still drain (ClientStatus running) but they no longer count.
    stopping = [a for a in nomad.allocations(group="engine-mixed") if a["DesiredStatus"] == "stop"]
    assert len(stopping) == 2 and all(a["ClientStatus"] == "running" for a in stopping)
    assert sorted(a["Name"] for a in stopping) == ["chiron-engine.engine-mixed[1]", "chiron-engine.engine-mixed[2]"]
    assert await provider.counts("mixed") == InstanceCounts(running=1)
    async with NomadProvider(NomadConfig(address=nomad.address, count_desired_run_only=False, **FAST)) as all_allocs:
        assert await all_allocs.counts("mixed") == InstanceCounts(running=3)
        nomad.tick()
        assert await all_allocs.counts("mixed") == InstanceCounts(running=1)
    statuses = sorted(a["ClientStatus"] for a in nomad.allocations(group="engine-mixed"))
    assert statuses == ["complete", "complete", "running"]
    # Back up: new allocations reuse the freed name indexes.
    await provider.set_count("mixed", 2)
    assert await provider.counts("mixed") == InstanceCounts(running=1, pending=1)


@pytest.mark.parametrize("role", ROLES)
async def test_count_outside_scaling_bounds_is_refused_with_nomads_message(nomad, provider, role):
    lo, hi = _bounds(nomad, role)
    b = await provider.scaling_bounds(role)
    assert (b.min, b.max) == (lo, hi)
    with pytest.raises(ProviderError) as err:
        await provider.set_count(role, hi + 1)
    assert f"group count was greater than scaling policy maximum: {hi + 1} > {hi}" in str(err.value)
    assert isinstance(err.value, NomadApiError) and err.value.status == 400
    assert len(nomad.scale_requests) == 1  # a 400 is not retried
    if lo > 0:
        with pytest.raises(ProviderError, match=f"less than scaling policy minimum: {lo - 1} < {lo}"):
            await provider.set_count(role, lo - 1)
    assert nomad.group_count("chiron-engine", DEFAULT_GROUPS[role]) in range(lo, hi + 1)


async def test_transient_failures_are_retried(nomad, provider):
    sleeps: list[float] = []

    async def record_sleep(s: float) -> None:
        sleeps.append(s)

    provider._sleep = record_sleep
    nomad.fail_next(2)  # 500 "rpc error: No cluster leader"
    before = len(nomad.requests)
    await provider.set_count("batch", 2)
    assert len(nomad.requests) == before + 4  # job lookup: 2 failures + 1 success; then the scale request
    assert sleeps == [0.001, 0.002]  # exponential backoff
    assert nomad.group_count("chiron-engine", "engine-batch") == 2
    nomad.fail_next(1, status=429, message="too many requests", retry_after_s=0.003)
    nomad.drop_next(1)  # connection closed without an answer
    nomad.tick()
    assert await provider.counts("batch") == InstanceCounts(running=2)
    assert sleeps[2] == pytest.approx(0.003)  # Retry-After honoured (capped at backoff_max_s)


async def test_persistent_failures_raise_after_the_retries(nomad, provider):
    nomad.fail_next(100, status=503, message="No path to region")
    before = len(nomad.requests)
    with pytest.raises(ProviderError) as err:
        await provider.set_count("batch", 1)
    assert len(nomad.requests) == before + 1 + FAST["max_retries"] and not nomad.scale_requests
    assert "after 4 tries" in str(err.value) and "HTTP 503: No path to region" in str(err.value)
    assert err.value.status == 503 and err.value.nomad_message == "No path to region"


async def test_unreachable_nomad_raises_after_the_retries():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: connection refused
    async with NomadProvider(NomadConfig(address=f"http://127.0.0.1:{port}", **FAST)) as p:
        with pytest.raises(ProviderError, match="after 4 tries.*ConnectError") as err:
            await p.counts("interactive")
        assert err.value.status is None


async def test_unknown_job_is_an_error(nomad):
    async with NomadProvider(NomadConfig(address=nomad.address, job_id="no-such-job", **FAST)) as p:
        with pytest.raises(ProviderError, match="HTTP 404: job not found"):
            await p.set_count("interactive", 1)
        # Nomad lists no allocations (not 404) for an unknown job: the provider's job lookup catches it.
        with pytest.raises(ProviderError, match="HTTP 404: job not found"):
            await p.counts("interactive")
    async with NomadProvider(NomadConfig(address=nomad.address, job_id="no-such-job", skip_unchanged=False, **FAST)) as p:
        with pytest.raises(ProviderError, match='HTTP 404: job "no-such-job" not found'):
            await p.set_count("interactive", 1)
    assert len([r for r in nomad.requests if "no-such-job" in r.path]) == 3  # 404s are not retried


async def test_unknown_group_in_the_mapping_is_an_error(nomad):
    groups = parse_groups("batch=gpu-batch")
    async with NomadProvider(NomadConfig(address=nomad.address, groups=groups, **FAST)) as p:
        with pytest.raises(ProviderError, match="no task group 'gpu-batch'"):
            await p.counts("interactive")
        with pytest.raises(ProviderError, match="no task group 'gpu-batch'"):
            await p.set_count("batch", 1)
    async with NomadProvider(NomadConfig(address=nomad.address, groups=groups, skip_unchanged=False, **FAST)) as p:
        with pytest.raises(ProviderError, match='task group "gpu-batch" specified for scaling does not exist'):
            await p.set_count("batch", 1)


async def test_acl_token_and_namespace_are_sent():
    with NomadApiStandIn(start_delay_s=0.0, required_token="s3cret") as nomad:
        nomad.register_job_file(ENGINE_SPEC, namespace="llm")
        async with NomadProvider(NomadConfig(address=nomad.address, namespace="llm", **FAST)) as anonymous:
            with pytest.raises(ProviderError, match="HTTP 403: Permission denied"):
                await anonymous.set_count("batch", 1)
        async with NomadProvider(NomadConfig(address=nomad.address, namespace="llm", token="s3cret", **FAST)) as p:
            await p.set_count("batch", 1)
            assert await p.counts("batch") == InstanceCounts(running=1)
        assert nomad.requests[-1].headers.get("X-Nomad-Token") == "s3cret"
        assert nomad.requests[-1].query["namespace"] == ["llm"]


async def test_keyword_construction_and_nomad_environment(nomad, monkeypatch):
    monkeypatch.setenv("NOMAD_NAMESPACE", "default")
    monkeypatch.setenv("NOMAD_TOKEN", "from-env")
    async with NomadProvider(address=nomad.address, job_id="chiron-engine", **FAST) as p:  # as `chiron scaler` builds it
        assert p.config.token == "from-env" and p.config.namespace == "default"
        await p.set_count("batch", 1)
    assert nomad.requests[-1].headers.get("X-Nomad-Token") == "from-env"
    assert nomad.requests[-1].query["namespace"] == ["default"]
    with pytest.raises(TypeError):
        NomadProvider(adress="http://127.0.0.1:4646")


async def test_bad_arguments_raise_value_error(provider):
    with pytest.raises(ValueError, match="unknown role"):
        await provider.set_count("prefill", 1)
    with pytest.raises(ValueError, match="non-negative"):
        await provider.set_count("batch", -1)
    with pytest.raises(ValueError, match="unknown role"):
        await provider.counts("prefill")
    with pytest.raises(ValueError):
        NomadConfig(address="127.0.0.1:4646").validate()
    with pytest.raises(ValueError):
        parse_groups("decode=engine-decode")
    assert parse_groups("") == dict(DEFAULT_GROUPS)


async def test_non_json_success_is_an_error():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="<html>proxy login</html>")

    async with NomadProvider(NomadConfig(**FAST), transport=httpx.MockTransport(handler)) as p:
        with pytest.raises(ProviderError, match="not JSON"):
            await p.set_count("batch", 1)


def test_gateway_spec_serves_http_with_a_health_check_and_finds_the_router(specs):
    _, job = _job(specs["chiron-gateway"])
    (group,) = _groups(job).values()
    assert "http" in _ports(group)
    assert any(c["type"] == "http" and c["path"] == "/health" and c["port"] == "http" for c in _checks(group))
    (task,) = _tasks(group).values()
    cmd = _command_line(task)
    for part in (" gateway ", "--port ${NOMAD_PORT_http}", "--router ${CHIRON_ROUTER_ADDRESS}"):
        assert part in f" {cmd} ", (part, cmd)
    assert any("chiron-router" in t["data"] and "CHIRON_ROUTER_ADDRESS" in t["data"] for t in task["template"])
