"""The Batch API end to end over real parts: the router's forwarded chiron.v1.BatchApi, the queue's durable
store, and a real simulated BATCH engine agent that leases the batch's requests from the queue."""

from __future__ import annotations

import grpc
import pytest

from chiron.v1 import batch_pb2, batch_pb2_grpc, queue_pb2, queue_pb2_grpc, types_pb2
from services.common.membership import MembershipWatcher
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from services.router.routing import RouterConfig
from services.router.server import RouterService
from services.router.server import serve as serve_router
from tests.conftest import eventually, start_etcd, start_sim_engine

pytestmark = pytest.mark.timeout(120)
MODEL = "llama-3-8b"


@pytest.fixture
async def parts(tmp_path):
    etcd = start_etcd(tmp_path / "etcd")
    watcher = MembershipWatcher(etcd.endpoint)
    await watcher.start()
    queue = await serve_queue(QueueConfig(db_path=str(tmp_path / "q.db")), port=0)
    queue_addr = f"127.0.0.1:{queue.port}"
    router = await serve_router(RouterService(RouterConfig(), watcher, queue_addr, stats_interval_s=0.1), port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{router.port}")
    engines = []

    async def start_batch_engine():
        engines.append((await start_sim_engine("batch-1", "batch", queue_address=queue_addr))[0])

    yield batch_pb2_grpc.BatchApiStub(channel), start_batch_engine, queue_addr
    await channel.close()
    for srv in engines:
        await srv.stop(grace_s=1.0)
    await router.stop()
    await queue.stop()
    await watcher.stop()
    etcd.stop()


def item(line: int, n_prompt: int = 16, max_tokens: int = 8, model: str = MODEL) -> batch_pb2.BatchItem:
    return batch_pb2.BatchItem(line=line, custom_id=f"c{line}", request=types_pb2.InferenceRequest(
        model=model, prompt_token_ids=list(range(1, n_prompt + 1)), max_tokens=max_tokens))


async def test_a_batch_waits_in_a_queue_group_then_a_batch_engine_serves_every_line(parts):
    api, start_batch_engine, queue_addr = parts
    f = (await api.CreateFile(batch_pb2.CreateFileRequest(filename="in.jsonl", purpose="batch", content=b"..."))).file
    assert f.file_id.startswith("file-") and f.size_bytes == 3
    b = (await api.CreateBatch(batch_pb2.CreateBatchRequest(
        input_file_id=f.file_id, endpoint="/v1/completions", completion_window_s=3600,
        items=[item(i) for i in (1, 2, 4)],
        errors=[batch_pb2.BatchLineError(line=3, code="invalid_json", message="line 3: not JSON")]))).batch
    assert (b.status, b.total, b.failed) == ("in_progress", 4, 1) and len(b.group_ids) == 1
    # No engine serves batch work yet: the requests wait in the queue's request group of their deadline.
    async with grpc.aio.insecure_channel(queue_addr) as ch:
        stats = (await queue_pb2_grpc.QueueStub(ch).GetStats(queue_pb2.QueueGetStatsRequest())).stats
    groups = {g.group_id: g for g in stats.groups}
    assert groups[b.group_ids[0]].size == 3

    await start_batch_engine()

    async def completed() -> bool:
        return (await api.GetBatch(batch_pb2.GetBatchRequest(batch_id=b.batch_id))).batch.status == "completed"

    await eventually(completed, timeout_s=60)
    res = await api.GetBatchResults(batch_pb2.GetBatchResultsRequest(batch_id=b.batch_id))
    assert res.batch.completed == 3 and res.batch.output_file_id and res.batch.error_file_id
    assert [r.custom_id for r in res.results] == ["c1", "c2", "c4"]
    assert all(len(r.output_token_ids) == 8 and r.state == queue_pb2.QUEUED_REQUEST_STATE_DONE for r in res.results)
    assert [e.line for e in res.errors] == [3]


async def test_cancel_and_errors_through_the_router(parts):
    api, *_ = parts
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await api.GetBatch(batch_pb2.GetBatchRequest(batch_id="batch_nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await api.CreateFile(batch_pb2.CreateFileRequest(filename="x", purpose="fine-tune", content=b"x"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "purpose" in e.value.details()
    f = (await api.CreateFile(batch_pb2.CreateFileRequest(filename="x", purpose="batch", content=b"x"))).file
    b = (await api.CreateBatch(batch_pb2.CreateBatchRequest(
        input_file_id=f.file_id, endpoint="/v1/completions", completion_window_s=60,
        items=[item(1), item(2, model="")]))).batch
    assert (b.total, b.failed) == (2, 1)  # a line the queue refuses is a line error, not a refused batch
    c = (await api.CancelBatch(batch_pb2.CancelBatchRequest(batch_id=b.batch_id))).batch
    assert (c.status, c.completed, c.failed) == ("cancelled", 0, 2) and c.error_file_id and not c.output_file_id
    listed = (await api.ListBatches(batch_pb2.ListBatchesRequest())).batches
    assert [x.batch_id for x in listed] == [b.batch_id]
