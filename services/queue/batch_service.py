"""The ``chiron.v1.BatchApi`` gRPC service: a thin shell over :class:`~services.queue.batches.BatchStore`, served
by the queue process beside ``chiron.v1.Queue`` (files and batches in the queue's own database)."""

from __future__ import annotations

from chiron.v1 import batch_pb2, batch_pb2_grpc, queue_pb2
from services.common.grpc_util import status_code, timestamp
from services.common.metrics import QueueMetrics
from services.queue.batches import BatchRecord, BatchStore, FileRecord, LineError
from services.queue.store import QueueError

_STATE_CODES = {0: queue_pb2.QUEUED_REQUEST_STATE_QUEUED, 1: queue_pb2.QUEUED_REQUEST_STATE_LEASED,
                2: queue_pb2.QUEUED_REQUEST_STATE_DONE, 3: queue_pb2.QUEUED_REQUEST_STATE_CANCELLED}


def file_pb(f: FileRecord) -> batch_pb2.FileObject:
    """The protobuf message of a stored file (without its content)."""
    return batch_pb2.FileObject(file_id=f.file_id, filename=f.filename, purpose=f.purpose, size_bytes=f.size_bytes,
                                created_at=timestamp(f.created_s))


def batch_pb(b: BatchRecord) -> batch_pb2.BatchObject:
    """The protobuf message of a batch (OpenAI's fields; times as timestamps)."""
    msg = batch_pb2.BatchObject(
        batch_id=b.batch_id, endpoint=b.endpoint, input_file_id=b.input_file_id, completion_window_s=b.window_s,
        status=b.status, created_at=timestamp(b.created_s), expires_at=timestamp(b.expires_s), total=b.total,
        completed=b.completed, failed=b.failed, output_file_id=b.output_file_id, error_file_id=b.error_file_id,
        metadata=b.metadata, group_ids=b.group_ids)
    if b.completed_s is not None and b.status == "completed":
        msg.completed_at.CopyFrom(timestamp(b.completed_s))
    if b.cancelled_s is not None:
        msg.cancelled_at.CopyFrom(timestamp(b.cancelled_s))
    return msg


class BatchApiService(batch_pb2_grpc.BatchApiServicer):
    """``chiron.v1.BatchApi`` over a :class:`BatchStore` (in the queue process)."""

    def __init__(self, batches: BatchStore, metrics: QueueMetrics | None = None) -> None:
        self.batches = batches
        self.metrics = metrics  # the queue's counters: a batch's requests count as enqueued / cancelled there too

    @staticmethod
    async def _fail(context, e: QueueError):
        await context.abort(status_code(e.code), e.message)

    async def CreateFile(self, request: batch_pb2.CreateFileRequest, context):
        try:
            return batch_pb2.CreateFileResponse(file=file_pb(self.batches.create_file(
                request.filename, request.purpose, request.content)))
        except QueueError as e:
            await self._fail(context, e)

    async def GetFile(self, request: batch_pb2.GetFileRequest, context):
        try:
            return batch_pb2.GetFileResponse(file=file_pb(self.batches.get_file(request.file_id)))
        except QueueError as e:
            await self._fail(context, e)

    async def GetFileContent(self, request: batch_pb2.GetFileContentRequest, context):
        try:
            return batch_pb2.GetFileContentResponse(file=file_pb(self.batches.get_file(request.file_id)),
                                                    content=self.batches.file_content(request.file_id))
        except QueueError as e:
            await self._fail(context, e)

    async def CreateBatch(self, request: batch_pb2.CreateBatchRequest, context):
        items = [(it.line, it.custom_id, it.request.model, list(it.request.prompt_token_ids), it.request.max_tokens)
                 for it in request.items]
        errors = [LineError(e.line, e.custom_id, e.code, e.message) for e in request.errors]
        try:
            rec = self.batches.create_batch(request.input_file_id, request.endpoint, request.completion_window_s,
                                            dict(request.metadata), items, errors)
        except QueueError as e:
            await self._fail(context, e)
        if self.metrics is not None:
            refused = {e.line for e in self.batches.line_errors(rec.batch_id)} if rec.failed else set()
            for line, _, model, _, _ in items:
                if line not in refused:
                    self.metrics.enqueued.labels(model).inc()
        return batch_pb2.CreateBatchResponse(batch=batch_pb(rec))

    async def GetBatch(self, request: batch_pb2.GetBatchRequest, context):
        try:
            return batch_pb2.GetBatchResponse(batch=batch_pb(self.batches.get_batch(request.batch_id)))
        except QueueError as e:
            await self._fail(context, e)

    async def ListBatches(self, request: batch_pb2.ListBatchesRequest, context):
        return batch_pb2.ListBatchesResponse(batches=[batch_pb(b) for b in self.batches.list_batches(request.limit)])

    async def CancelBatch(self, request: batch_pb2.CancelBatchRequest, context):
        try:
            before = self.batches.get_batch(request.batch_id).pending
            rec = self.batches.cancel_batch(request.batch_id)
        except QueueError as e:
            await self._fail(context, e)
        if self.metrics is not None:
            for _ in range(before - rec.pending):
                self.metrics.cancelled()
        return batch_pb2.CancelBatchResponse(batch=batch_pb(rec))

    async def GetBatchResults(self, request: batch_pb2.GetBatchResultsRequest, context):
        try:
            rec, items, errors = self.batches.results(request.batch_id)
        except QueueError as e:
            await self._fail(context, e)
        resp = batch_pb2.GetBatchResultsResponse(batch=batch_pb(rec))
        for it in items:
            r = resp.results.add(line=it.line, custom_id=it.custom_id, request_id=it.request_id, state=_STATE_CODES[it.state],
                                 output_token_ids=it.output_token_ids, num_prompt_tokens=it.num_prompt_tokens, model=it.model,
                                 max_tokens=it.max_tokens)
            if it.finished_s is not None:
                r.finished.CopyFrom(timestamp(it.finished_s))
        for e in errors:
            resp.errors.add(line=e.line, custom_id=e.custom_id, code=e.code, message=e.message)
        return resp
