"""The OpenAI Batch API through the gateway, with the official ``openai`` client, over real parts: etcd, the
queue (its durable store holds files and batches), the router (forwards BatchApi), simulated engine agents, and
the gateway's uvicorn server. The batch's requests are first seen waiting in the queue's request group; then a
BATCH engine agent starts and serves them."""

from __future__ import annotations

import io
import json

import grpc
import httpx
import openai
import pytest

from chiron.v1 import queue_pb2, queue_pb2_grpc
from services.common.membership import MembershipWatcher
from services.common.security import SecuritySettings
from services.gateway.app import GatewayConfig, GatewayServer
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from services.router.routing import RouterConfig
from services.router.server import RouterService
from services.router.server import serve as serve_router
from tests.conftest import eventually, start_etcd, start_sim_engine

pytestmark = pytest.mark.timeout(180)
MODEL = "llama-3-8b"
LIMIT = 16 * 1024  # the gateway's body limit [bytes]


@pytest.fixture
async def cluster(tmp_path):
    etcd = start_etcd(tmp_path / "etcd")
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    queue_addr = f"127.0.0.1:{queue.port}"
    servers, regs = [], []

    async def start_engine(iid: str, role: str, queue_address: str | None) -> None:
        srv, reg = await start_sim_engine(iid, role, queue_address=queue_address, etcd=etcd.endpoint)
        servers.append(srv)
        regs.append(reg)

    await start_engine("interactive-1", "interactive", None)  # serves no batch work
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    await watcher.wait_for(lambda m: len(m) == 1, timeout_s=20)
    router = await serve_router(RouterService(RouterConfig(), watcher, queue_addr, stats_interval_s=0.1), port=0)
    gw = GatewayServer(GatewayConfig(router=f"127.0.0.1:{router.port}", port=0, max_body_bytes=LIMIT),
                       security=SecuritySettings(auth_tokens=[]))
    await gw.start()
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    yield client, gw.url, queue_addr, lambda: start_engine("batch-1", "batch", queue_addr)
    await client.close()
    await gw.stop()
    await router.stop()
    await watcher.stop()
    for r in regs:
        await r.close()
    for s in servers:
        await s.stop(grace_s=1.0)
    await queue.stop()
    etcd.stop()


def jsonl(lines: list) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def chat_line(i: int, max_tokens: int = 6) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"Question number {i}?"}],
                     "max_tokens": max_tokens}}


async def queue_groups(queue_addr: str) -> dict[str, int]:
    async with grpc.aio.insecure_channel(queue_addr) as ch:
        stats = (await queue_pb2_grpc.QueueStub(ch).GetStats(queue_pb2.QueueGetStatsRequest())).stats
    return {g.group_id: g.size for g in stats.groups}


async def test_batch_round_trip_with_the_openai_client(cluster):
    client, _, queue_addr, start_batch_engine = cluster
    lines = [chat_line(i) for i in range(5)]
    bad = [b"{not json", jsonl([{**chat_line(9), "url": "/v1/embeddings"}]).strip(),
           jsonl([{**chat_line(10), "body": {"model": "gpt-nope", "messages": [{"role": "user", "content": "x"}]}}]).strip(),
           jsonl([{**chat_line(11), "body": {"model": MODEL, "messages": "not a list"}}]).strip()]
    content = jsonl(lines[:2] + bad[:2] + lines[2:4] + bad[2:] + lines[4:])
    f = await client.files.create(file=("requests.jsonl", io.BytesIO(content)), purpose="batch")
    assert f.purpose == "batch" and f.bytes == len(content)
    assert (await client.files.content(f.id)).read() == content

    b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                    metadata={"job": "nightly"})
    assert b.status == "in_progress" and b.completion_window == "24h" and b.metadata == {"job": "nightly"}
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (9, 0, 4)
    # While no engine serves batch work, the 5 good lines wait in the queue's request group of their deadline.
    groups = b.model_extra["request_groups"]
    assert len(groups) == 1 and (await queue_groups(queue_addr))[groups[0]] == 5
    assert (await client.batches.retrieve(b.id)).status == "in_progress"

    await start_batch_engine()

    async def done() -> bool:
        return (await client.batches.retrieve(b.id)).status == "completed"

    await eventually(done, timeout_s=60, interval_s=0.1)
    b = await client.batches.retrieve(b.id)
    assert (b.request_counts.completed, b.request_counts.failed) == (5, 4) and b.completed_at
    out = [json.loads(x) for x in (await client.files.content(b.output_file_id)).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(5)]  # one result per good line, in order
    for o in out:
        body = o["response"]["body"]
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] == 6
        assert len(body["choices"][0]["message"]["content"].split()) == 6
    errors = [json.loads(x) for x in (await client.files.content(b.error_file_id)).text.splitlines()]
    assert [(e["error"]["line"], e["error"]["code"]) for e in errors] == [
        (3, "invalid_json"), (4, "invalid_request"), (7, "model_not_found"), (8, "invalid_value")]
    assert all(e["response"] is None and e["error"]["message"] for e in errors)
    listed = [x.id async for x in client.batches.list()]
    assert listed == [b.id]


async def test_cancel_a_waiting_batch(cluster):
    client, *_ = cluster
    f = await client.files.create(file=("r.jsonl", io.BytesIO(jsonl([chat_line(i) for i in range(3)]))), purpose="batch")
    b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="1h")
    c = await client.batches.cancel(b.id)
    assert c.status == "cancelled" and c.request_counts.failed == 3 and c.output_file_id is None
    errors = (await client.files.content(c.error_file_id)).text.splitlines()
    assert [json.loads(e)["error"]["code"] for e in errors] == ["batch_cancelled"] * 3


async def test_bad_batch_api_input_gets_openai_errors_and_loses_nothing(cluster):
    client, url, *_ = cluster
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        await client.files.content("file-nope")
    with pytest.raises(openai.NotFoundError):
        await client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await client.files.create(file=("r.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    f = await client.files.create(file=("r.jsonl", io.BytesIO(jsonl([chat_line(1)]))), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="soon")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        await client.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/v1/files", files={"file": ("big.jsonl", b"x" * (LIMIT + 1))}, data={"purpose": "batch"})
        assert r.status_code == 413 and r.json()["error"]["message"]
        r = await http.post("/v1/batches", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    # The file accepted before the refusals is intact and still makes a batch.
    b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert b.request_counts.total == 1
