"""Authentication and TLS over real gRPC: a real etcd, queue and router on loopback configured the way a process
is (``CHIRON_*`` environment variables), certificates made by ``chiron certs`` (``cryptography``), clients with no
token, a wrong token, no client certificate, a certificate of another CA, or no TLS at all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import ValidationError

from chiron.v1 import batch_pb2, batch_pb2_grpc, queue_pb2, queue_pb2_grpc, router_pb2, router_pb2_grpc, types_pb2
from services.cli import main as cli
from services.cluster import spawn_chiron
from services.common.membership import MembershipWatcher
from services.common.security import (
    SecuritySettings,
    auth_metadata,
    bearer_token,
    open_channel,
    reset_security_settings,
    security_settings,
    server_credentials,
    token_ok,
    write_dev_certificates,
)
from services.engine.demo import stop_process, wait_healthy, wait_port_file
from services.gateway.router_mux import RouterMux
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from services.router.routing import RouterConfig
from services.router.server import RouterService
from services.router.server import serve as serve_router
from tests.conftest import start_etcd, start_sim_engine
from tests.nomad_standin import load_job_spec
from tests.test_node_client import node_or_skip, run_client, summary

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-token-for-tests"
WRONG = "not-the-token-at-all"


@pytest.fixture
def environ() -> Iterator[dict[str, str]]:
    """``os.environ`` to set ``CHIRON_*`` variables in (the security settings are read from there, and cached):
    restored, and the cache cleared, afterwards."""
    saved = dict(os.environ)
    reset_security_settings()
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)
    reset_security_settings()


def tls_env(certs: dict[str, Path]) -> dict[str, str]:
    """The environment of a cluster process with mutual TLS on."""
    return {"CHIRON_TLS_CERT": str(certs["server"]), "CHIRON_TLS_KEY": str(certs["server_key"]),
            "CHIRON_TLS_CA": str(certs["ca"])}


@pytest.fixture
async def router_and_queue(tmp_path):
    """A real queue and router (the router's membership from a real etcd) serving with the security settings of
    the environment at the time; yields ``(router_address, queue_address)``."""
    etcd = start_etcd(tmp_path / "etcd")
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    router = await serve_router(RouterService(RouterConfig(), watcher, f"127.0.0.1:{queue.port}", stats_interval_s=0.1),
                                port=0)
    yield f"127.0.0.1:{router.port}", f"127.0.0.1:{queue.port}"
    await router.stop()
    await queue.stop()
    await watcher.stop()
    etcd.stop()


def batch_request(rid: str) -> types_pb2.InferenceRequest:
    return types_pb2.InferenceRequest(request_id=rid, model="llama-3-8b", prompt_token_ids=list(range(1, 17)),
                                      max_tokens=8, request_class=types_pb2.REQUEST_CLASS_BATCH,
                                      slo=types_pb2.SLO(ttft_ms=3_600_000))


# ---- settings ------------------------------------------------------------------------------------
def test_settings_from_environment_keep_tokens_out_of_repr_and_errors(environ, tmp_path):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# operators\nfile-token\n\n  other-file-token  \n")
    environ.update({"CHIRON_AUTH_TOKENS": f"{TOKEN}, second", "CHIRON_AUTH_TOKENS_FILE": str(tokens_file),
                    "CHIRON_TOKEN": TOKEN})
    s = security_settings()
    assert s.auth_tokens == [TOKEN, "second", "file-token", "other-file-token"] and s.auth_enabled
    assert s is security_settings()  # cached
    assert TOKEN not in repr(s) and TOKEN not in str(s)
    assert auth_metadata(s) == (("authorization", f"Bearer {TOKEN}"),)
    assert token_ok(TOKEN, s) and token_ok("file-token", s)
    assert not token_ok(WRONG, s) and not token_ok(None, s) and not token_ok("", s)
    assert token_ok(None, SecuritySettings(auth_tokens=[], auth_tokens_file=None))  # authentication off

    environ["CHIRON_TLS_CERT"] = str(tmp_path / "missing.pem")
    reset_security_settings()
    with pytest.raises(ValidationError) as e:
        security_settings()
    assert "CHIRON_TLS_CERT and CHIRON_TLS_KEY go together" in str(e.value) and TOKEN not in str(e.value)
    environ["CHIRON_TLS_KEY"] = str(tmp_path / "missing-key.pem")
    with pytest.raises(ValidationError, match="no such file .*chiron certs") as e:
        SecuritySettings()
    assert TOKEN not in str(e.value)


def test_a_pem_file_without_the_expected_block_is_named_in_the_error(certs):
    no_key = SecuritySettings(tls_cert=certs["server"], tls_key=certs["server"], tls_ca=certs["ca"])
    with pytest.raises(ValueError, match=f"CHIRON_TLS_KEY={certs['server']}: no PEM private key"):
        server_credentials(no_key)
    no_cert = SecuritySettings(tls_cert=certs["server_key"], tls_key=certs["server_key"], tls_ca=certs["ca"])
    with pytest.raises(ValueError, match="CHIRON_TLS_CERT=.*: no PEM certificate"):
        open_channel("127.0.0.1:1", settings=no_cert)
    with pytest.raises(ValueError, match="CHIRON_TLS_CA is set but CHIRON_TLS_CERT / CHIRON_TLS_KEY are not"):
        server_credentials(SecuritySettings(tls_cert=None, tls_key=None, tls_ca=certs["ca"]))


def test_bearer_token_parsing():
    assert bearer_token(f"Bearer {TOKEN}") == TOKEN
    assert bearer_token(f"bearer   {TOKEN} ") == TOKEN
    assert bearer_token(f"Basic {TOKEN}") is None
    assert bearer_token("Bearer") is None and bearer_token("Bearer   ") is None
    assert bearer_token("") is None and bearer_token(None) is None


# ---- bearer tokens on the router ---------------------------------------------------------------------
@pytest.fixture
def auth_on(environ):
    environ["CHIRON_AUTH_TOKENS"] = f"{TOKEN},another-accepted-token"


async def test_router_refuses_calls_without_an_accepted_token(auth_on, router_and_queue, caplog):
    router, queue = router_and_queue
    async with grpc.aio.insecure_channel(router) as ch:
        stub, batches = router_pb2_grpc.RouterStub(ch), batch_pb2_grpc.BatchApiStub(ch)
        for metadata in ((), (("authorization", f"Bearer {WRONG}"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Submit(router_pb2.SubmitRequest(request=batch_request("r-refused")), metadata=metadata, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "CHIRON_TOKEN" in e.value.details() and WRONG not in e.value.details() and TOKEN not in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:  # a streaming method, and the BatchApi the router forwards
                async for _ in stub.Generate(router_pb2.RouterGenerateRequest(request=batch_request("g")), metadata=metadata):
                    pass
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=metadata, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing bearer token" in (await _code_and_details(stub, ()))[1]
        assert "invalid bearer token" in (await _code_and_details(stub, (("authorization", f"Bearer {WRONG}"),)))[1]

        # Health checking stays open, for orchestrators' probes.
        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        # The right token is served, on both services; so is any accepted token.
        ok = await stub.Submit(router_pb2.SubmitRequest(request=batch_request("r-ok")), metadata=auth_metadata(
            SecuritySettings(token=TOKEN)), timeout=10)
        assert ok.request_id
        await batches.ListBatches(batch_pb2.ListBatchesRequest(), metadata=(("authorization", "Bearer another-accepted-token"),),
                                  timeout=10)

    # Only the router is client-facing: the queue, an internal service, takes the router's calls without a token.
    async with grpc.aio.insecure_channel(queue) as ch:
        stats = await queue_pb2_grpc.QueueStub(ch).GetStats(queue_pb2.QueueGetStatsRequest(), timeout=10)
        assert stats.stats.queued == 1
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused ")]
    assert refusals and not any(TOKEN in m or WRONG in m for m in refusals)  # logged, tokens never


async def _code_and_details(stub: router_pb2_grpc.RouterStub, metadata) -> tuple[grpc.StatusCode, str]:
    try:
        await stub.Submit(router_pb2.SubmitRequest(request=batch_request("x")), metadata=metadata, timeout=10)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


# ---- mutual TLS --------------------------------------------------------------------------------------
@pytest.fixture
def certs(tmp_path) -> dict[str, Path]:
    return write_dev_certificates(tmp_path / "certs")


@pytest.fixture
def other_ca(tmp_path) -> dict[str, Path]:
    """An unrelated CA with its own server and client certificates."""
    return write_dev_certificates(tmp_path / "other")


@pytest.fixture
def mtls_on(environ, certs):
    environ.update(tls_env(certs))


async def _submit(channel: grpc.aio.Channel, rid: str) -> grpc.StatusCode:
    try:
        await router_pb2_grpc.RouterStub(channel).Submit(router_pb2.SubmitRequest(request=batch_request(rid)), timeout=10)
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def test_the_gateways_request_streams_are_authenticated_per_bearer_token(auth_on, router_and_queue):
    """The gateway forwards each client's token: one GenerateMany stream per token, each authenticated by the
    router as a call would be. A refused token ends only its own requests and stream."""
    router, _ = router_and_queue
    r = types_pb2.InferenceRequest(model="m", prompt_token_ids=[1, 2], max_tokens=2)
    good = (("authorization", f"Bearer {TOKEN}"),)
    async with grpc.aio.insecure_channel(router) as ch:
        mux = RouterMux(router_pb2_grpc.RouterStub(ch))
        try:
            for metadata, code in ((good, grpc.StatusCode.UNAVAILABLE),  # past authentication: no engine serves "m"
                                   ((("authorization", f"Bearer {WRONG}"),), grpc.StatusCode.UNAUTHENTICATED),
                                   ((), grpc.StatusCode.UNAUTHENTICATED),
                                   (good, grpc.StatusCode.UNAVAILABLE)):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await mux.generate(r, metadata, timeout_s=10).read()
                assert e.value.code() == code, e.value.details()
                assert WRONG not in e.value.details() and TOKEN not in e.value.details()
            assert list(mux._streams) == [good]  # the refused streams are gone, the accepted one stays
        finally:
            await mux.close()


async def test_mutual_tls_admits_only_clients_with_a_certificate_of_the_configured_ca(mtls_on, certs, other_ca,
                                                                                       router_and_queue):
    router, queue = router_and_queue
    ca = certs["ca"].read_bytes()

    # A client with the CA's client certificate: served by the router, which reached the queue over mutual TLS.
    client = SecuritySettings(tls_ca=certs["ca"], tls_cert=certs["client"], tls_key=certs["client_key"])
    async with open_channel(router, settings=client) as ch:
        assert await _submit(ch, "tls-ok") == grpc.StatusCode.OK
    async with open_channel(queue, settings=client) as ch:
        assert (await queue_pb2_grpc.QueueStub(ch).GetStats(queue_pb2.QueueGetStatsRequest(), timeout=10)).stats.queued == 1

    refused = {
        "no client certificate": grpc.aio.secure_channel(router, grpc.ssl_channel_credentials(root_certificates=ca)),
        "a client certificate of another CA": grpc.aio.secure_channel(router, grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=other_ca["client_key"].read_bytes(),
            certificate_chain=other_ca["client"].read_bytes())),
        "no TLS": grpc.aio.insecure_channel(router),
        "a server CA it does not trust": grpc.aio.secure_channel(router, grpc.ssl_channel_credentials(
            root_certificates=other_ca["ca"].read_bytes(), private_key=certs["client_key"].read_bytes(),
            certificate_chain=certs["client"].read_bytes())),
    }
    for what, ch in refused.items():
        async with ch:
            assert await _submit(ch, f"refused-{what}") == grpc.StatusCode.UNAVAILABLE, what
            with pytest.raises(grpc.aio.AioRpcError) as e:  # health checks too need a certificate now
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, what


@pytest.fixture
def mtls_and_auth_on(environ, certs):
    environ.update({**tls_env(certs), "CHIRON_AUTH_TOKENS": TOKEN})


async def test_tls_and_tokens_together(mtls_and_auth_on, certs, router_and_queue):
    """Both on: a client with the right certificate still needs the token, and with it is served."""
    router, _ = router_and_queue
    client = SecuritySettings(tls_ca=certs["ca"], tls_cert=certs["client"], tls_key=certs["client_key"], token=TOKEN)
    async with open_channel(router, settings=client) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        assert (await _code_and_details(stub, ()))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert (await _code_and_details(stub, auth_metadata(client)))[0] == grpc.StatusCode.OK


@pytest.fixture
async def node_cluster(mtls_and_auth_on, tmp_path):
    """A simulated engine, the queue and the router, all serving mutual TLS (the router requiring TOKEN); the
    Node.js client's binary and the router's address."""
    node = node_or_skip()
    etcd = start_etcd(tmp_path / "etcd")
    srv, reg = await start_sim_engine("inter-1", "interactive", cap=4, speedup=20.0, etcd=etcd.endpoint)
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    await watcher.wait_for(lambda m: len(m) == 1, timeout_s=20)
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    router = await serve_router(RouterService(RouterConfig(), watcher, f"127.0.0.1:{queue.port}", stats_interval_s=0.1),
                                port=0)
    yield node, f"127.0.0.1:{router.port}"
    await router.stop()
    await queue.stop()
    await watcher.stop()
    await reg.close()
    await srv.stop(grace_s=1.0)
    etcd.stop()


async def test_node_client_end_to_end_over_mutual_tls_with_a_token(node_cluster, environ):
    """examples/node/client.js takes CHIRON_TLS_* and CHIRON_TOKEN like the Python clients: every hop (client →
    router → engine, router → queue) is mutual TLS, and the router admits the client only with the token."""
    node, address = node_cluster
    args = (address, "--max-tokens", "8", "--prompt-tokens", "16", "--timeout-ms", "30000", "--quiet")
    environ["CHIRON_TOKEN"] = WRONG  # the environment the client subprocess inherits
    rc, stdout, _ = await run_client(node, *args)
    assert rc == 2 and summary(stdout)["error"]["code"] == "UNAUTHENTICATED"
    environ["CHIRON_TOKEN"] = TOKEN
    rc, stdout, stderr = await run_client(node, *args)
    assert rc == 0, stderr
    out = summary(stdout)
    assert out["generate_tokens"] == 8 and out["state"] == "QUEUED_REQUEST_STATE_QUEUED"


# ---- chiron certs, and the environment reaching child processes ----------------------------------------
def test_chiron_certs_writes_a_ca_and_certificates_it_signed(tmp_path):
    out = tmp_path / "dev-certs"
    result = CliRunner().invoke(cli, ["certs", str(out), "--host", "127.0.0.1", "--host", "queue.internal"])
    assert result.exit_code == 0, result.output
    assert "CHIRON_TLS_CA=" in result.output
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for name in ("server", "client"):
        cert = x509.load_pem_x509_certificate((out / f"{name}.pem").read_bytes())
        assert cert.issuer == ca.subject
        cert.verify_directly_issued_by(ca)
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert (out / f"{name}-key.pem").stat().st_mode & 0o077 == 0  # private keys: owner only
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["queue.internal"]


async def test_child_processes_serve_tls_with_the_inherited_environment(environ, certs, tmp_path):
    """What ``chiron up --tls`` relies on: a service started as a subprocess takes the settings from the
    environment it inherits, serves mutual TLS only, and this process's readiness check reaches it over TLS.
    The child's certificate and key come in one bundle file, as deploy/nomad's templates render them."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(b"".join(certs[k].read_bytes() for k in ("server", "ca", "server_key")))
    environ.update({"CHIRON_TLS_CERT": str(bundle), "CHIRON_TLS_KEY": str(bundle), "CHIRON_TLS_CA": str(certs["ca"])})
    proc, port_file = spawn_chiron(tmp_path, "queue", ["queue", "--db", str(tmp_path / "q.db")])
    try:
        port = await wait_port_file(port_file, proc)
        await wait_healthy(f"127.0.0.1:{port}", timeout_s=30, proc=proc)  # over mutual TLS, from the environment
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_process(proc)


# ---- the Nomad job files ----------------------------------------------------------------------------------
def test_nomad_jobs_render_the_variables_the_services_read_when_tls_is_on():
    """Every task of deploy/nomad gets, behind ``var.tls``, a Vault token and templates that end in the
    CHIRON_TLS_* variables SecuritySettings reads; Consul's gRPC checks follow; the router's tokens behind ``var.auth``."""
    root = Path(__file__).resolve().parents[1] / "deploy" / "nomad"
    fields = {f"CHIRON_{name.upper()}" for name in SecuritySettings.model_fields}
    for name in ("chiron-engine", "chiron-queue", "chiron-scaler", "chiron-router", "chiron-gateway"):
        path = root / f"{name}.nomad.hcl"
        spec = load_job_spec(path)
        (job_name, job), = spec["job"][0].items()
        local = {name: value for block in spec["locals"] for name, value in block.items()}
        templates = {t["destination"]: t for t in local["tls_templates"]}
        env_lines = [line for line in templates["secrets/tls.env"]["data"].splitlines() if line]
        assert {line.split("=", 1)[0] for line in env_lines} == {"CHIRON_TLS_CERT", "CHIRON_TLS_KEY", "CHIRON_TLS_CA"} <= fields
        assert templates["secrets/tls.env"]["env"] is True
        assert f"common_name={job_name}.service.consul" in templates["secrets/chiron.pem"]["data"]
        groups = [body for block in job.get("group", []) for body in block.values()]
        groups += [b["group"]["content"][0] for b in job.get("dynamic", []) if "group" in b]  # the engine's roles
        for group in groups:
            for task in (body for block in group["task"] for body in block.values()):
                dynamic = [(kind, body) for block in task["dynamic"] for kind, body in block.items()]
                gated = {(kind, body["for_each"]) for kind, body in dynamic}
                assert {("vault", "${var.tls ? [1] : []}"), ("template", "${var.tls ? local.tls_templates : []}")} <= gated, path
                if job_name in ("chiron-router", "chiron-gateway"):
                    auth = next(body for kind, body in dynamic if body["for_each"] == "${var.auth ? [1] : []}")
                    assert auth["content"][0]["data"].startswith(f'{{{{ with nomadVar "nomad/jobs/{job_name}" }}}}CHIRON_AUTH_TOKENS=')
            services = [*group.get("service", []), *(s for b in group["task"] for t in b.values() for s in t.get("service", []))]
            checks = [c for s in services for c in s["check"]]
            if job_name == "chiron-gateway":  # HTTP(S) health check
                assert checks and all(c["protocol"] == '${var.tls ? "https" : "http"}' for c in checks), path
            else:
                assert checks and all(c["grpc_use_tls"] == "${var.tls}" for c in checks), path
