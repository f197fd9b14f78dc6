"""``chiron deploy rehearse`` (services/deploy/): the Nomad job files rendered as Nomad renders them, the Go-template
subset, the local executor's process life (NOMAD_* environment, kill_signal then SIGKILL after kill_timeout), bad
job files failing with the file, the task and the reason, and the whole rehearsal once, with its targets."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest

from services.cli import main
from services.deploy.gotemplate import Context, ServiceNotReady, TemplateError, parse_env_file, render, services_used
from services.deploy.jobspec import JobFileError, interpolate_runtime, parse_duration_s, render_job_file
from services.deploy.nomad_local import LocalExecutor, NomadApiStandIn, ServiceCatalog, ServiceInstance
from services.deploy.rehearse import (
    DEFAULT_NOMAD_DIR,
    RehearsalConfig,
    RehearsalError,
    check_chiron_flags,
    check_jobs,
    chiron_arguments,
    chiron_executable,
    rehearsal_variables,
    rehearse,
    render_jobs,
)
from services.deploy.rehearse import _declared as declared_variables

ROUTER = [{"Name": "chiron-router", "ID": "r1", "Address": "10.0.0.1", "Port": 50050, "Tags": []},
          {"Name": "chiron-router", "ID": "r2", "Address": "10.0.0.2", "Port": 50051, "Tags": []}]


def _services(**found):
    def lookup(name: str):
        if not found.get(name.replace("-", "_")):
            raise ServiceNotReady(name)
        return found[name.replace("-", "_")]

    return lookup


# ---------------------------------------------------------------------------------------------------- templates

def test_the_templates_of_the_job_files_render_as_consul_template_would():
    ctx = Context(env={"NOMAD_SECRETS_DIR": "/s"}, service=_services(chiron_router=ROUTER, chiron_queue=ROUTER[1:]))
    # gateway: the first router only
    text = ('{{ range $i, $s := service "chiron-router" }}{{ if eq $i 0 }}CHIRON_ROUTER_ADDRESS={{ $s.Address }}:'
            '{{ $s.Port }}\n{{ end }}{{ end }}')
    assert render(text, ctx) == "CHIRON_ROUTER_ADDRESS=10.0.0.1:50050\n"
    # router, scaler, batch/mixed engines: every queue instance (one)
    assert render('{{ range service "chiron-queue" }}CHIRON_QUEUE_ADDRESS={{ .Address }}:{{ .Port }}\n{{ end }}',
                  ctx) == "CHIRON_QUEUE_ADDRESS=10.0.0.2:50051\n"
    # env, pipes, trim markers, comments, else
    assert render('A={{ env "NOMAD_SECRETS_DIR" }}/x {{- /* c */ -}}  \n B={{ env "UNSET" }}', ctx) == "A=/s/xB="
    assert render('{{ "a" | printf "%s-%d" 7 }}', ctx) == "7-a"
    assert render('{{ with env "UNSET" }}set{{ else }}unset{{ end }}', ctx) == "unset"
    assert services_used(text) == ["chiron-router"]


def test_a_template_blocks_until_its_service_is_registered_and_names_what_it_cannot_do():
    ctx = Context(env={}, service=_services())
    with pytest.raises(ServiceNotReady) as e:
        render('{{ range service "chiron-queue" }}{{ .Address }}{{ end }}', ctx)
    assert e.value.name == "chiron-queue"
    with pytest.raises(TemplateError, match="pkiCert"):
        render('{{ with pkiCert "pki/issue/x" "common_name=a" }}{{ .Cert }}{{ end }}', ctx)
    with pytest.raises(TemplateError, match="end"):
        render("{{ if true }}x", ctx)
    with pytest.raises(TemplateError, match="no field 'Adress'"):
        render("{{ range service \"r\" }}{{ .Adress }}{{ end }}", Context(env={}, service=_services(r=ROUTER)))


def test_env_templates_are_read_as_key_value_lines():
    assert parse_env_file('# c\n\nA=1\nexport B="two words"\nC=x=y\n') == {"A": "1", "B": "two words", "C": "x=y"}
    with pytest.raises(TemplateError, match="line 1"):
        parse_env_file("not a pair\n")


# ---------------------------------------------------------------------------------------------------- job files

def test_the_engine_groups_render_from_one_labeled_dynamic_group_block():
    """``dynamic "group"`` with ``labels`` (the engine job's roles): one named group per element, the iterator
    usable in nested blocks and nested dynamic blocks, ``$${...}`` in a local left for runtime interpolation."""
    (job,) = render_job_file(DEFAULT_NOMAD_DIR / "chiron-engine.nomad.hcl", {"batch_itl_slo_ms": "400"})
    assert sorted(job.groups) == ["engine-batch", "engine-interactive", "engine-mixed"]
    bounds = {name: (g.count, g.scaling) for name, g in job.groups.items()}
    assert bounds == {"engine-interactive": (1, (1, 16, True)), "engine-mixed": (1, (1, 8, True)),
                      "engine-batch": (0, (0, 32, True))}
    for role in ("interactive", "mixed", "batch"):
        (task,) = job.groups[f"engine-{role}"].tasks
        cmd = " ".join(task.args)
        assert f"--role {role} " in cmd and task.services[0].name == f"chiron-engine-{role}"
        assert f"--itl-slo-ms {400 if role == 'batch' else 50} " in cmd
        leases = role != "interactive"
        assert ("--queue ${CHIRON_QUEUE_ADDRESS} " in cmd) == leases
        assert [t.destination for t in task.templates] == (["local/queue.env"] if leases else [])


def test_job_files_render_with_var_overrides_locals_and_dynamic_blocks():
    (job,) = render_job_file(DEFAULT_NOMAD_DIR / "chiron-gateway.nomad.hcl",
                             {"gateway_count": "1", "gateway_port": "18000", "tls": "true", "auth": "true",
                              "datacenters": '["a", "b"]'})
    assert job.variables["gateway_count"] == 1 and job.variables["tls"] is True
    assert job.variables["datacenters"] == ["a", "b"]
    group = job.groups["gateway"]
    assert group.count == 1 and group.ports == {"http": 18000}
    assert group.services[0].checks[0].protocol == "https"  # var.tls ? "https" : "http"
    (task,) = group.tasks
    # the static router template plus the three TLS templates of local.tls_templates and the auth template
    dests = [t.destination for t in task.templates]
    assert sorted(dests) == sorted(["local/router.env", "secrets/chiron.pem", "secrets/ca.pem", "secrets/tls.env",
                                    "secrets/auth.env"])
    pem = next(t for t in task.templates if t.destination == "secrets/chiron.pem")
    assert 'pkiCert "pki_int/issue/chiron"' in pem.data  # ${var.vault_pki_issue} inside a local
    assert task.kill_signal == "SIGTERM" and task.kill_timeout_s == 30.0
    assert task.args[task.args.index("--port") + 1] == "${NOMAD_PORT_http}"  # runtime references kept
    (plain,) = render_job_file(DEFAULT_NOMAD_DIR / "chiron-gateway.nomad.hcl")
    assert [t.destination for t in plain.groups["gateway"].tasks[0].templates] == ["local/router.env"]
    assert plain.groups["gateway"].count == 2 and plain.groups["gateway"].services[0].checks[0].protocol == "http"


def test_engine_job_renders_a_queue_for_batch_and_mixed_engines_and_the_engine_args():
    (job,) = render_job_file(DEFAULT_NOMAD_DIR / "chiron-engine.nomad.hcl", {"engine_args": "--speedup 3"})
    for name, group in job.groups.items():
        (task,) = group.tasks
        script = task.args[1]
        assert script.endswith("--speedup 3"), script
        assert ("--queue ${CHIRON_QUEUE_ADDRESS}" in script) == (name != "engine-interactive")
        assert task.kill_timeout_s == 45.0 and task.shutdown_delay_s == 5.0
        assert [s.name for s in task.services] == [f"chiron-{name}"]


def test_variable_errors_and_runtime_interpolation():
    with pytest.raises(JobFileError, match="no variable 'nope'"):
        render_job_file(DEFAULT_NOMAD_DIR / "chiron-queue.nomad.hcl", {"nope": "1"})
    with pytest.raises(JobFileError, match="is a number"):
        render_job_file(DEFAULT_NOMAD_DIR / "chiron-queue.nomad.hcl", {"lease_timeout_s": "soon"})
    assert interpolate_runtime("--port ${NOMAD_PORT_grpc} --q ${X}", {"NOMAD_PORT_grpc": "1"}) == ("--port 1 --q ${X}", ["X"])
    assert parse_duration_s("1m30s") == 90.0 and parse_duration_s("500ms") == 0.5
    with pytest.raises(ValueError):
        parse_duration_s("5 minutes")


def test_chiron_command_lines_are_checked_with_the_real_cli_parser():
    assert chiron_arguments(["/x/chiron", "queue", "--port", "1"], "/x/chiron") == ["queue", "--port", "1"]
    script = 'CUDA_VISIBLE_DEVICES="$NVIDIA_VISIBLE_DEVICES" exec /x/chiron engine --role batch --port 1'
    assert chiron_arguments(["/bin/sh", "-c", script], "/x/chiron") == ["engine", "--role", "batch", "--port", "1"]
    assert chiron_arguments(["/bin/echo", "hi"], "/x/chiron") is None
    assert check_chiron_flags(["queue", "--port", "1", "--lease-timeout-s", "60"], main) is None
    assert "has no option --no-such-flag" in check_chiron_flags(["queue", "--no-such-flag", "1"], main)
    assert "no command 'quux'" in check_chiron_flags(["quux"], main)
    assert "batch" in check_chiron_flags(["engine", "--role", "batchy"], main)  # a bad choice names the choices


def test_the_shipped_job_files_pass_the_checks():
    chiron = chiron_executable()
    jobs = render_jobs(DEFAULT_NOMAD_DIR, rehearsal_variables(RehearsalConfig(), chiron_bin=chiron, etcd="127.0.0.1:2379",
                                                              nomad="http://127.0.0.1:4646", gateway_port=8000,
                                                              router_port=50050))
    assert {j.id for j in jobs} == {"chiron-queue", "chiron-engine", "chiron-router", "chiron-scaler", "chiron-gateway"}
    check_jobs(jobs, chiron, main)


# ---------------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def nomad_dir(tmp_path) -> Path:
    d = tmp_path / "nomad"
    shutil.copytree(DEFAULT_NOMAD_DIR, d, ignore=shutil.ignore_patterns("*.md"))
    return d


def _check_dir(d: Path) -> None:
    chiron = chiron_executable()
    variables = rehearsal_variables(RehearsalConfig(), chiron_bin=chiron, etcd="127.0.0.1:2379",
                                    nomad="http://127.0.0.1:4646", gateway_port=8000, router_port=50050)
    check_jobs(render_jobs(d, variables), chiron, main)


def test_a_job_file_that_does_not_parse_fails_with_its_name(nomad_dir):
    (nomad_dir / "chiron-router.nomad.hcl").write_text('job "chiron-router" {\n  group "router" {\n')
    with pytest.raises(RehearsalError) as e:
        _check_dir(nomad_dir)
    assert e.value.file.endswith("chiron-router.nomad.hcl") and "does not parse" in e.value.reason


def test_a_flag_chiron_does_not_have_fails_with_the_file_and_task(nomad_dir):
    path = nomad_dir / "chiron-queue.nomad.hcl"
    path.write_text(path.read_text().replace('"--lease-timeout-s"', '"--lease-timeout"'))
    with pytest.raises(RehearsalError) as e:
        _check_dir(nomad_dir)
    assert e.value.file.endswith("chiron-queue.nomad.hcl") and e.value.task == "queue/queue"
    assert "`chiron queue` has no option --lease-timeout" in e.value.reason


def test_a_template_naming_a_service_nobody_registers_fails(nomad_dir):
    path = nomad_dir / "chiron-gateway.nomad.hcl"
    path.write_text(path.read_text().replace('service \\"chiron-router\\"', 'service \\"chiron-routers\\"'))
    with pytest.raises(RehearsalError) as e:
        _check_dir(nomad_dir)
    assert e.value.file.endswith("chiron-gateway.nomad.hcl") and e.value.task == "gateway/gateway"
    assert "service 'chiron-routers', which no job registers" in e.value.reason


def test_an_undefined_runtime_reference_fails(nomad_dir):
    path = nomad_dir / "chiron-router.nomad.hcl"
    path.write_text(path.read_text().replace('"${CHIRON_QUEUE_ADDRESS}"', '"${CHIRON_QUEUE_ADDR}"'))
    with pytest.raises(RehearsalError, match=r"\$\{CHIRON_QUEUE_ADDR\}, which neither"):
        _check_dir(nomad_dir)


def test_an_undeclared_var_is_refused(nomad_dir):
    cfg = RehearsalConfig(nomad_dir=nomad_dir, variables={"no_such_variable": "1"})
    with pytest.raises(RehearsalError, match="no job file declares"):
        asyncio.run(rehearse(cfg, main))
    assert "engine_args" in declared_variables(nomad_dir / "chiron-engine.nomad.hcl")


# ---------------------------------------------------------------------------------------------------- executor

def _job_file(tmp_path: Path, script: str, kill_timeout: str = "1s") -> Path:
    path = tmp_path / "t.nomad.hcl"
    path.write_text(f'''
variable "word" {{
  type    = string
  default = "hello"
}}
job "t" {{
  group "g" {{
    count = 1
    network {{
      port "p" {{}}
    }}
    service {{
      name = "t-svc"
      port = "p"
    }}
    task "k" {{
      driver = "raw_exec"
      env {{
        GREETING = "${{var.word}} from ${{NOMAD_ALLOC_ID}}"
      }}
      config {{
        command = "/bin/sh"
        args    = ["-c", {json.dumps(script)}]
      }}
      kill_signal  = "SIGTERM"
      kill_timeout = "{kill_timeout}"
    }}
  }}
}}
''')
    return path


def _wait(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def test_an_allocation_runs_with_nomads_environment_and_stops_with_its_kill_signal(tmp_path):
    script = ('env > "$NOMAD_ALLOC_DIR/data/env.txt"; trap "echo bye > $NOMAD_ALLOC_DIR/data/bye; exit 0" TERM; '
              'while true; do sleep 0.05; done')
    catalog = ServiceCatalog()
    executor = LocalExecutor(tmp_path / "allocs", catalog)
    with NomadApiStandIn(executor=executor) as nomad:
        nomad.register_job_file(_job_file(tmp_path, script), variables={"word": "hi"})
        _wait(lambda: catalog.instances("t-svc"))  # no checks: registered once running
        (rec,) = executor.records.values()
        alloc_dir = Path(rec.log_dir).parent
        _wait(lambda: (alloc_dir / "data" / "env.txt").exists() and "NOMAD_PORT_p" in (alloc_dir / "data" / "env.txt").read_text())
        env = dict(line.split("=", 1) for line in (alloc_dir / "data" / "env.txt").read_text().splitlines() if "=" in line)
        assert env["NOMAD_ALLOC_ID"] == rec.alloc_id and env["NOMAD_ALLOC_DIR"] == str(alloc_dir)
        assert env["GREETING"] == f"hi from {rec.alloc_id}"
        assert 20000 <= int(env["NOMAD_PORT_p"]) <= 32000 and env["NOMAD_IP_p"] == "127.0.0.1"
        assert env["NOMAD_TASK_DIR"].endswith("/k/local") and env["NOMAD_JOB_ID"] == "t"
        assert catalog.instances("t-svc")[0].port == int(env["NOMAD_PORT_p"])
        assert nomad.allocations("t")[0]["ClientStatus"] == "running"
        nomad.stop_job("t")
        _wait(lambda: rec.stopped_at is not None)
        assert rec.exit_code == 0 and not rec.killed and (alloc_dir / "data" / "bye").exists()
        assert nomad.allocations("t")[0]["ClientStatus"] == "complete" and not catalog.instances("t-svc")
    executor.shutdown()


def test_a_task_that_ignores_its_kill_signal_is_killed_after_kill_timeout(tmp_path):
    executor = LocalExecutor(tmp_path / "allocs")
    with NomadApiStandIn(executor=executor) as nomad:
        nomad.register_job_file(_job_file(tmp_path, "trap '' TERM; while true; do sleep 0.05; done", "1s"))
        (rec,) = executor.records.values()
        _wait(lambda: rec.started_at is not None)
        t0 = time.monotonic()
        nomad.stop_job("t")
        _wait(lambda: rec.stopped_at is not None)
        assert rec.killed and 1.0 <= rec.stopped_at - t0 < 10.0
    executor.shutdown()


def test_a_task_that_exits_by_itself_fails_its_allocation(tmp_path):
    executor = LocalExecutor(tmp_path / "allocs")
    with NomadApiStandIn(executor=executor) as nomad:
        nomad.register_job_file(_job_file(tmp_path, "exit 3"))
        _wait(lambda: executor.failures())
        assert "exited by itself with status 3" in executor.failures()[0].error
        assert nomad.allocations("t")[0]["ClientStatus"] == "failed"
    executor.shutdown()
    catalog = ServiceCatalog()
    catalog.register(ServiceInstance("x", "a1", "127.0.0.1", 1))
    assert catalog.lookup("x")[0]["Port"] == 1
    catalog.deregister("a1")
    with pytest.raises(ServiceNotReady):
        catalog.lookup("x")


# ---------------------------------------------------------------------------------------------------- the rehearsal

@pytest.mark.timeout(600)
def test_the_whole_rehearsal_meets_its_targets(tmp_path):
    from services.common.etcd_server import EtcdNotFound, find_etcd_binary

    if find_etcd_binary() is None:
        import os

        if os.environ.get("CI") == "true":
            pytest.fail(str(EtcdNotFound("no etcd binary")))
        pytest.skip("no etcd binary")
    t0 = time.monotonic()
    report = asyncio.run(rehearse(RehearsalConfig(work_dir=str(tmp_path / "work")), main, progress=print))
    wall = time.monotonic() - t0
    print(json.dumps({k: report[k] for k in ("allocations_started", "allocations_stopped", "scaler_allocations",
                                             "interactive", "batch", "lost_requests", "wall_seconds", "targets")}))
    assert report["targets"]["ok"], report["targets"]
    assert report["interactive"]["served"] == report["interactive"]["count"] > 0
    assert report["batch"]["done"] == report["batch"]["count"] > 0
    assert report["lost_requests"] == 0
    assert report["scaler_allocations"]["started"] >= 1 and report["scaler_allocations"]["stopped"] >= 1
    assert any(e["group"].startswith("engine-") for e in report["scale_events"])
    jobs = {j["job"]: j for j in report["jobs"]}
    assert set(jobs) == {"chiron-queue", "chiron-engine", "chiron-router", "chiron-scaler", "chiron-gateway"}
    for job in jobs.values():
        for task in job["tasks"]:
            for line in task["rendered"]:
                assert "${" not in line and "chiron" in line, line
    batch_engine = next(t for t in jobs["chiron-engine"]["tasks"] if t["group"] == "engine-batch")
    assert batch_engine["rendered"] and all("--queue 127.0.0.1:" in x for x in batch_engine["rendered"])
    assert wall < 300, wall
    assert report["teardown"]["left_running"] == 0, report["teardown"]


def test_the_cli_fails_bad_job_files_with_the_file_task_and_reason(nomad_dir):
    from click.testing import CliRunner

    path = nomad_dir / "chiron-scaler.nomad.hcl"
    path.write_text(path.read_text().replace('"--interval-s"', '"--interval"'))
    result = CliRunner().invoke(main, ["deploy", "rehearse", "--nomad-dir", str(nomad_dir), "--json",
                                       str(nomad_dir / "r.json")])
    assert result.exit_code == 1
    assert "chiron-scaler.nomad.hcl, task scaler/scaler: `chiron scaler` has no option --interval" in result.output
    assert not (nomad_dir / "r.json").exists()
    result = CliRunner().invoke(main, ["deploy", "rehearse", "--var", "oops"])
    assert result.exit_code == 2 and "NAME=VALUE" in result.output
