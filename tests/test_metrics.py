"""Prometheus metrics (services/common/metrics.py): scraped over HTTP from real services and parsed with
``prometheus_client.parser``.

The end-to-end test starts a whole cluster as real processes (``start_cluster``: etcd, queue, router, scaler and the
engines its local provider starts, every one with ``--metrics-port 0``), puts interactive and batch load through the
router and checks that every service's families exist and move.
"""

from __future__ import annotations

import asyncio
import math
import os

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chiron.v1 import queue_pb2, queue_pb2_grpc, router_pb2, router_pb2_grpc, types_pb2
from services.cluster import ClusterConfig, start_cluster
from services.common.etcd_server import EtcdNotFound
from services.common.metrics import RouterMetrics, ScalerMetrics, serve_metrics
from services.global_scaler.policy import REASON_CODES, RoleDecision
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from tests.conftest import eventually

MODEL = "llama-3-8b"
Samples = list[tuple[str, dict[str, str], float]]


async def scrape(client: httpx.AsyncClient, url: str) -> Samples:
    """Every sample of a /metrics page, parsed by prometheus_client's own parser."""
    resp = await client.get(url)
    assert resp.status_code == 200, f"{url}: HTTP {resp.status_code}"
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(resp.text) for s in fam.samples]


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when there is none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def series(samples: Samples, name: str, **labels: str) -> list[dict[str, str]]:
    return [lab for n, lab, _ in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]


def request(rid: str, model: str = MODEL, max_tokens: int = 16, **slo) -> types_pb2.InferenceRequest:
    return types_pb2.InferenceRequest(request_id=rid, model=model, prompt_token_ids=list(range(1, 33)), max_tokens=max_tokens,
                                      slo=types_pb2.SLO(**slo))


# ---- units: no processes -------------------------------------------------------------------------------------------
def test_a_stream_meets_its_slo_only_with_ttft_and_mean_itl_within_bounds():
    m = RouterMetrics()
    fast = m.stream(100.0, ttft_slo_s=1.0, itl_slo_s=0.1)
    for t in (100.5, 100.55, 100.6):
        fast.chunk(t)
    fast.finish("ok")
    slow_itl = m.stream(100.0, ttft_slo_s=1.0, itl_slo_s=0.1)
    for t in (100.5, 100.9, 101.3):
        slow_itl.chunk(t)
    slow_itl.finish("ok")
    failed = m.stream(100.0, ttft_slo_s=1.0, itl_slo_s=0.1)
    failed.chunk(100.1)
    failed.finish("error")
    reg = m.registry
    assert reg.get_sample_value("chiron_requests_total", {"class": "interactive", "outcome": "ok"}) == 2
    assert reg.get_sample_value("chiron_requests_total", {"class": "interactive", "outcome": "error"}) == 1
    assert reg.get_sample_value("chiron_slo_met_total", {"class": "interactive"}) == 1
    assert reg.get_sample_value("chiron_request_ttft_seconds_count", {"class": "interactive"}) == 3
    assert reg.get_sample_value("chiron_request_ttft_seconds_bucket", {"class": "interactive", "le": "0.25"}) == 1
    assert reg.get_sample_value("chiron_request_itl_seconds_count", {"class": "interactive"}) == 4
    assert reg.get_sample_value("chiron_request_itl_seconds_sum", {"class": "interactive"}) == pytest.approx(0.9)


def test_the_desired_count_keeps_one_series_per_role_with_the_last_reason():
    m = ScalerMetrics()
    m.decision([RoleDecision("batch", 0, 2.0, 2, "12 queued…", "batch_backpressure")], theta=0.3, batch_backpressure=0.5)
    m.decision([RoleDecision("batch", 2, 0.0, 2, "held…", "scale_down_delay")], theta=0.3, batch_backpressure=-1.0)
    reg = m.registry
    assert reg.get_sample_value("chiron_scaler_desired_instances", {"role": "batch", "reason": "scale_down_delay"}) == 2
    assert reg.get_sample_value("chiron_scaler_desired_instances", {"role": "batch", "reason": "batch_backpressure"}) is None
    assert reg.get_sample_value("chiron_scaler_decisions_total", {"role": "batch", "reason": "batch_backpressure"}) == 1
    assert reg.get_sample_value("chiron_scaler_running_instances", {"role": "batch"}) == 2
    assert reg.get_sample_value("chiron_scaler_batch_backpressure") == -1.0


# ---- one real queue, in this process -----------------------------------------------------------------------------------
async def test_queue_group_gauges_appear_and_go_with_their_group(tmp_path):
    q = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    msrv = await serve_metrics(q.service.metrics, "127.0.0.1", 0, tmp_path / "metrics.port")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{q.port}")
    stub = queue_pb2_grpc.QueueStub(channel)
    url = f"http://127.0.0.1:{int((tmp_path / 'metrics.port').read_text())}/metrics"
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            assert not series(await scrape(client, url), "chiron_queue_requests")
            group = ""
            for rid in ("a", "b"):
                group = (await stub.Enqueue(queue_pb2.EnqueueRequest(request=request(rid, ttft_ms=3_600_000)))).group_id
            lease = (await stub.Lease(queue_pb2.LeaseRequest(worker_id="w", max_requests=1))).leases[0]
            s = await scrape(client, url)
            assert value(s, "chiron_queue_requests", group=group, model=MODEL, state="queued") == 1
            assert value(s, "chiron_queue_requests", group=group, state="leased") == 1
            assert math.isinf(value(s, "chiron_queue_estimated_wait_seconds", group=group, stat="p95"))  # no capacity known
            assert value(s, "chiron_queue_enqueued_total", model=MODEL) == 2
            assert value(s, "chiron_request_ttft_seconds_count", **{"class": "batch"}) == 1  # at the first lease
            assert value(s, "chiron_slo_met_total", **{"class": "batch"}) == 1
            await stub.Ack(queue_pb2.AckRequest(request_id=lease.request.request_id, lease_id=lease.lease_id, output_tokens=16))
            await stub.Cancel(queue_pb2.CancelRequest(request_id="b" if lease.request.request_id == "a" else "a"))
            s = await scrape(client, url)
            assert not series(s, "chiron_queue_requests", group=group)  # the group emptied out: its series are gone
            assert value(s, "chiron_requests_total", **{"class": "batch", "outcome": "ok"}) == 1
            assert value(s, "chiron_requests_total", **{"class": "batch", "outcome": "cancelled"}) == 1
            assert value(s, "chiron_queue_capacity_tokens_per_second", model=MODEL) > 0  # learnt from the ack
    finally:
        await channel.close()
        msrv.stop()
        await q.stop()


# ---- a whole cluster of real processes -------------------------------------------------------------------------------------
@pytest.mark.timeout(280)
async def test_every_service_exports_its_metrics_and_they_move_under_load(tmp_path):
    cfg = ClusterConfig(engine_args="--backend simulated --speedup 20",
                        scaler_args="--interactive 1:1 --mixed 0:0 --batch 1:1 --interval-s 0.5 --scale-down-delay-s 60",
                        work_dir=str(tmp_path / "cluster"), ready_timeout_s=120.0)
    try:
        cluster = await start_cluster(cfg)
    except EtcdNotFound as e:
        if os.environ.get("CI") == "true":
            pytest.fail(str(e))
        pytest.skip(str(e))
    channel = grpc.aio.insecure_channel(cluster.endpoint("router"))
    router = router_pb2_grpc.RouterStub(channel)
    try:
        urls: dict[str, str] = {}

        async def both_engines_listed() -> bool:
            urls.update(await cluster.metrics_endpoints())
            return sum(1 for n in urls if n.startswith("local-")) == 2

        await eventually(both_engines_listed, timeout_s=120, interval_s=0.2)
        assert {"queue", "router", "scaler", "gateway"} <= set(urls)
        engines = {n: u for n, u in urls.items() if n.startswith("local-")}
        inter_id = next(n for n in engines if n.startswith("local-interactive-"))
        batch_id = next(n for n in engines if n.startswith("local-batch-"))

        async def generate(rid: str) -> None:
            async for _ in router.Generate(router_pb2.RouterGenerateRequest(request=request(rid, ttft_ms=10_000, itl_ms=1_000))):
                pass

        async def router_routes() -> bool:  # the router has seen the interactive engine's stats
            try:
                await generate("probe")
                return True
            except grpc.aio.AioRpcError:
                return False

        await eventually(router_routes, timeout_s=60, interval_s=0.2)
        async with httpx.AsyncClient(timeout=10.0) as client:
            before = {n: await scrape(client, u) for n, u in urls.items()}

            # Load: interactive streams, one refused request, batch requests, one batch request nobody serves;
            # through the gateway: completions, one of them streamed, and one bad body.
            await asyncio.gather(*(generate(f"i{k}") for k in range(12)))
            body = {"model": MODEL, "prompt": "Hello there", "max_tokens": 4}
            for stream in (False, True):
                r = await client.post(f"{cluster.gateway_url}/v1/completions", json={**body, "stream": stream})
                assert r.status_code == 200, r.text
            assert (await client.post(f"{cluster.gateway_url}/v1/completions", content=b"{bad")).status_code == 400
            with pytest.raises(grpc.aio.AioRpcError):
                await generate_bad(router)
            for k in range(6):
                await router.Submit(router_pb2.SubmitRequest(request=request(f"b{k}", slo_class="batch")))
            orphan = await router.Submit(router_pb2.SubmitRequest(request=request("orphan", model="nobody-serves", slo_class="batch")))

            async def batch_done() -> bool:
                states = [(await router.GetResult(router_pb2.GetResultRequest(request_id=f"b{k}"))).result.state for k in range(6)]
                return all(s == queue_pb2.QUEUED_REQUEST_STATE_DONE for s in states)

            await eventually(batch_done, timeout_s=90, interval_s=0.2)

            async def scaler_decided_again() -> bool:
                s = await scrape(client, urls["scaler"])
                return value(s, "chiron_scaler_decisions_total") > value(before["scaler"], "chiron_scaler_decisions_total")

            await eventually(scaler_decided_again, timeout_s=30, interval_s=0.2)
            after = {n: await scrape(client, u) for n, u in urls.items()}

            # Router: interactive outcomes, TTFT and ITL histograms, SLO attainment, refusals.
            def moved(part: str, name: str, **labels: str) -> float:
                return value(after[part], name, **labels) - value(before[part], name, **labels)

            inter = {"class": "interactive"}
            # 12 streams of our own + the gateway's 2 completions, which reach the router too.
            assert moved("router", "chiron_requests_total", outcome="ok", **inter) == 14
            assert moved("router", "chiron_requests_total", outcome="rejected", **inter) >= 1
            assert moved("router", "chiron_request_ttft_seconds_count", **inter) == 14
            assert 14 <= moved("router", "chiron_request_itl_seconds_count", **inter) <= 14 * 15
            assert moved("router", "chiron_slo_met_total", **inter) > 0
            r1 = after["router"]
            assert value(r1, "chiron_request_ttft_seconds_bucket", le="+Inf", **inter) == value(
                r1, "chiron_request_ttft_seconds_count", **inter)

            # Gateway: requests by endpoint and status, their durations, streamed TTFT.
            assert moved("gateway", "chiron_gateway_requests_total", endpoint="/v1/completions", status="200") == 2
            assert moved("gateway", "chiron_gateway_requests_total", endpoint="/v1/completions", status="400") == 1
            assert moved("gateway", "chiron_gateway_request_duration_seconds_count", endpoint="/v1/completions") == 3
            assert moved("gateway", "chiron_gateway_ttft_seconds_count", endpoint="/v1/completions") >= 1

            # Queue: batch outcomes and TTFT, enqueued per model, the orphan's group gauges.
            q1 = after["queue"]
            batch = {"class": "batch"}
            assert value(q1, "chiron_requests_total", outcome="ok", **batch) == 6
            assert value(q1, "chiron_request_ttft_seconds_count", **batch) == 6
            assert value(q1, "chiron_slo_met_total", **batch) == 6
            assert value(q1, "chiron_queue_enqueued_total", model=MODEL) == 6
            assert value(q1, "chiron_queue_requests", group=orphan.group_id, model="nobody-serves", state="queued") == 1
            assert series(q1, "chiron_queue_estimated_wait_seconds", group=orphan.group_id, stat="p95")
            assert value(q1, "chiron_queue_capacity_tokens_per_second", model=MODEL) > 0

            # Scaler: desired vs running per role, each desired series with a reason code.
            s1 = after["scaler"]
            for role in ("interactive", "mixed", "batch"):
                [labels] = series(s1, "chiron_scaler_desired_instances", role=role)
                assert labels["reason"] in REASON_CODES
                assert series(s1, "chiron_scaler_running_instances", role=role)
            assert value(s1, "chiron_scaler_running_instances", role="interactive") == 1
            assert value(s1, "chiron_scaler_desired_instances", role="batch") == 1

            # Engines: max batch size, KV cache, tokens, finished batch work.
            for iid, role in ((inter_id, "interactive"), (batch_id, "batch")):
                key = {"instance_id": iid, "role": role, "model": MODEL}
                assert value(after[iid], "chiron_engine_max_batch_size", **key) > 0
                assert series(after[iid], "chiron_engine_kv_cache_usage_ratio", **key)
                assert series(after[iid], "chiron_engine_preemptions_total", **key)
                assert moved(iid, "chiron_engine_generated_tokens_total", **key) > 0
            assert value(after[batch_id], "chiron_engine_batch_finished_requests_total") >= 6

            # The orphan cancelled: its group empties out and its series go.
            assert (await router.Cancel(router_pb2.RouterCancelRequest(request_id="orphan"))).cancelled
            q2 = await scrape(client, urls["queue"])
            assert not series(q2, "chiron_queue_requests", group=orphan.group_id)
            assert value(q2, "chiron_requests_total", outcome="cancelled", **batch) == 1
    finally:
        await channel.close()
        await cluster.stop(grace_s=10)


async def generate_bad(router: router_pb2_grpc.RouterStub) -> None:
    """A request the router refuses (max_tokens 0)."""
    async for _ in router.Generate(router_pb2.RouterGenerateRequest(request=request("bad", max_tokens=0))):
        pass
