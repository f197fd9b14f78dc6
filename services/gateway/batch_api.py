"""The OpenAI Batch API over Chiron's global queue (``/v1/files``, ``/v1/batches``).

A client uploads a JSONL file (``purpose=batch``), one request per line::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "llama-3-8b", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}

and creates a batch over it with a ``completion_window`` (``24h``; any ``<n>s|m|h|d`` up to the queue's longest
TTFT SLO), which becomes every request's **TTFT SLO**: the requests wait in the queue's request group of their
deadline like any other batch work, the waiting-time estimator and the global scaler see them, and batch or
idle mixed instances serve them. Lines that cannot become a request (bad JSON, wrong URL, unknown model, bad
fields) are reported one by one in the batch's error file; the good lines still run.

The gateway only parses and tokenizes lines and renders results: files, batches and their requests live in the
queue's durable store (``chiron.v1.BatchApi``, reached through the router), so a restart loses nothing. Output
and error files are rendered on demand from the stored results, in input-line order, in OpenAI's format:
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``.
"""

from __future__ import annotations

import json
import re
import time
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import Response

from chiron.v1 import batch_pb2, batch_pb2_grpc, queue_pb2, types_pb2
from services.gateway import common
from services.queue.batches import ERRORS_SUFFIX, OUTPUT_SUFFIX

router = APIRouter(dependencies=[Depends(common.require_auth)])

ENDPOINTS = (common.CHAT_COMPLETIONS, common.COMPLETIONS)
_WINDOW = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_window(text: Any) -> int:
    """``"24h"`` → 86,400 (seconds). Raises ValueError with the accepted form."""
    m = _WINDOW.match(text) if isinstance(text, str) else None
    if m is None or int(m.group(1)) <= 0:
        raise ValueError(f"completion_window must look like '24h' (a positive number with s, m, h or d), got {text!r}")
    return int(m.group(1)) * _UNIT_S[m.group(2)]


def _ts(t) -> int | None:
    return t.seconds if (t.seconds or t.nanos) else None


def batch_json(b: batch_pb2.BatchObject) -> dict[str, Any]:
    """A ``chiron.v1.BatchObject`` in OpenAI's batch object shape (times in Unix seconds)."""
    window = b.completion_window_s
    return {
        "id": b.batch_id, "object": "batch", "endpoint": b.endpoint, "errors": None,
        "input_file_id": b.input_file_id,
        "completion_window": f"{window // 3600}h" if window % 3600 == 0 else f"{window}s",
        "status": b.status, "output_file_id": b.output_file_id or None, "error_file_id": b.error_file_id or None,
        "created_at": _ts(b.created_at), "in_progress_at": _ts(b.created_at), "expires_at": _ts(b.expires_at),
        "finalizing_at": None, "completed_at": _ts(b.completed_at), "failed_at": None, "expired_at": None,
        "cancelling_at": _ts(b.cancelled_at), "cancelled_at": _ts(b.cancelled_at) if b.status == "cancelled" else None,
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": dict(b.metadata) or None,
        # Chiron: the queue's request groups these requests wait in (empty once none waits).
        "request_groups": list(b.group_ids),
    }


def file_json(f: batch_pb2.FileObject) -> dict[str, Any]:
    return {"id": f.file_id, "object": "file", "bytes": f.size_bytes, "created_at": _ts(f.created_at),
            "filename": f.filename, "purpose": f.purpose, "status": "processed"}


def _stub(request: Request) -> batch_pb2_grpc.BatchApiStub:
    return batch_pb2_grpc.BatchApiStub(common.router_channel(request))


async def _call(request: Request, method: str, msg):
    """One BatchApi call through the router, with the client's credentials; gRPC errors raise
    :class:`common.APIError` with the mapped HTTP status."""
    try:
        return await getattr(_stub(request), method)(msg, metadata=common.forward_metadata(request), timeout=60.0)
    except grpc.aio.AioRpcError as e:
        raise common.APIError.from_grpc(e) from None


# ---- parsing input lines ------------------------------------------------------------------------
def parse_line(request: Request, raw: bytes, line: int, endpoint: str, default_max_tokens: int,
               served: set[str] | frozenset[str]) -> tuple[batch_pb2.BatchItem | None, batch_pb2.BatchLineError | None]:
    """One JSONL line → a batch item, or a line error naming what is wrong (never raises). ``served``: the
    models accepted, those engine instances serve now and those the gateway knows
    (:meth:`services.gateway.common.ModelCache.known`: a batch waits in the queue for its model's engines, so a
    known model without one right now is accepted); a line for another model is an error (``model_not_found``)."""
    def err(code: str, message: str, custom_id: str = "") -> tuple[None, batch_pb2.BatchLineError]:
        return None, batch_pb2.BatchLineError(line=line, custom_id=custom_id, code=code, message=f"line {line}: {message}")

    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return err("invalid_json", f"not valid JSON ({e.msg if hasattr(e, 'msg') else e})")
    if not isinstance(obj, dict):
        return err("invalid_request", "each line must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return err("invalid_request", "custom_id must be a non-empty string")
    if obj.get("method", "POST") != "POST":
        return err("invalid_request", f"method must be POST, got {obj.get('method')!r}", cid)
    if obj.get("url") != endpoint:
        return err("invalid_request", f"url {obj.get('url')!r} differs from the batch's endpoint {endpoint}", cid)
    body = obj.get("body")
    if not isinstance(body, dict):
        return err("invalid_request", "body must be a JSON object", cid)
    try:
        model, ids, max_tokens = common.prompt_of(request, endpoint, body, default_max_tokens)
    except common.APIError as e:
        return err(e.code or "invalid_request", e.message, cid)
    if model not in served:
        return err("model_not_found", f"the model {model!r} is not one this deployment serves or has served; "
                                      f"known models: {', '.join(sorted(served)) or 'none'}", cid)
    return batch_pb2.BatchItem(line=line, custom_id=cid, request=types_pb2.InferenceRequest(
        model=model, prompt_token_ids=ids, max_tokens=max_tokens)), None


# ---- rendering results --------------------------------------------------------------------------
def result_body(request: Request, endpoint: str, r: batch_pb2.BatchResult) -> dict[str, Any]:
    """The completion object a synchronous call would have returned for one finished request."""
    chat = endpoint == common.CHAT_COMPLETIONS
    shape = common.Shape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{r.request_id}", r.model,
                         _ts(r.finished) or int(time.time()))
    out = list(r.output_token_ids)
    return shape.full(common.tokenizer(request).decode(out), common.queued_finish_reason(len(out), r.max_tokens),
                      common.usage(r.num_prompt_tokens, len(out)))


def render_output(request: Request, res: batch_pb2.GetBatchResultsResponse) -> bytes:
    lines = []
    for r in res.results:
        if r.state == queue_pb2.QUEUED_REQUEST_STATE_DONE:
            lines.append({"id": f"batch_req_{r.request_id}", "custom_id": r.custom_id,
                          "response": {"status_code": 200, "request_id": r.request_id,
                                       "body": result_body(request, res.batch.endpoint, r)}, "error": None})
    return "".join(json.dumps(x) + "\n" for x in lines).encode()


def render_errors(res: batch_pb2.GetBatchResultsResponse) -> bytes:
    rows: list[tuple[int, dict]] = [
        (e.line, {"id": f"batch_req_{res.batch.batch_id}-{e.line}", "custom_id": e.custom_id or None, "response": None,
                  "error": {"code": e.code, "message": e.message, "line": e.line}}) for e in res.errors]
    for r in res.results:
        if r.state == queue_pb2.QUEUED_REQUEST_STATE_CANCELLED:
            rows.append((r.line, {"id": f"batch_req_{r.request_id}", "custom_id": r.custom_id, "response": None,
                                  "error": {"code": "batch_cancelled", "line": r.line,
                                            "message": "the batch was cancelled before this request finished"}}))
    rows.sort(key=lambda x: x[0])
    return "".join(json.dumps(x) + "\n" for _, x in rows).encode()


def _virtual(file_id: str) -> tuple[str, str] | None:
    for suffix in (OUTPUT_SUFFIX, ERRORS_SUFFIX):
        if file_id.startswith("batch_") and file_id.endswith(suffix):
            return file_id[: -len(suffix)], suffix
    return None


# ---- routes -------------------------------------------------------------------------------------
@router.post("/v1/files")
async def create_file(request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]):
    content = await file.read()
    resp = await _call(request, "CreateFile", batch_pb2.CreateFileRequest(
        filename=file.filename or "upload.jsonl", purpose=purpose, content=content))
    return file_json(resp.file)


async def _results(request: Request, batch_id: str) -> batch_pb2.GetBatchResultsResponse:
    return await _call(request, "GetBatchResults", batch_pb2.GetBatchResultsRequest(batch_id=batch_id))


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str):
    v = _virtual(file_id)
    if v is None:
        return file_json((await _call(request, "GetFile", batch_pb2.GetFileRequest(file_id=file_id))).file)
    res = await _results(request, v[0])
    content = render_output(request, res) if v[1] == OUTPUT_SUFFIX else render_errors(res)
    return {"id": file_id, "object": "file", "bytes": len(content), "created_at": _ts(res.batch.created_at),
            "filename": f"{v[0]}{v[1]}.jsonl", "purpose": "batch_output", "status": "processed"}


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str):
    v = _virtual(file_id)
    if v is None:
        resp = await _call(request, "GetFileContent", batch_pb2.GetFileContentRequest(file_id=file_id))
        return Response(resp.content, media_type="application/octet-stream")
    res = await _results(request, v[0])
    content = render_output(request, res) if v[1] == OUTPUT_SUFFIX else render_errors(res)
    return Response(content, media_type="application/jsonl")


@router.post("/v1/batches")
async def create_batch(request: Request):
    body = await common.json_body(request)
    input_file_id = body.get("input_file_id")
    if not isinstance(input_file_id, str) or not input_file_id:
        raise common.APIError(400, "input_file_id must be the id of an uploaded file", param="input_file_id")
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise common.APIError(400, f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}", param="endpoint")
    try:
        window_s = parse_window(body.get("completion_window", "24h"))
    except ValueError as e:
        raise common.APIError(400, str(e), param="completion_window") from None
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise common.APIError(400, "metadata must be an object of string keys and string values", param="metadata")
    content = (await _call(request, "GetFileContent", batch_pb2.GetFileContentRequest(file_id=input_file_id))).content
    default_max_tokens = common.config(request).default_max_tokens
    cache = common.models(request)
    served = {m.model for m in await cache.models(request)} | cache.known()
    msg = batch_pb2.CreateBatchRequest(input_file_id=input_file_id, endpoint=endpoint, completion_window_s=window_s,
                                       metadata=metadata)
    for i, raw in enumerate(content.split(b"\n"), start=1):
        if not raw.strip():
            continue
        item, error = parse_line(request, raw, i, endpoint, default_max_tokens, served)
        if item is not None:
            msg.items.append(item)
        else:
            msg.errors.append(error)
    return batch_json((await _call(request, "CreateBatch", msg)).batch)


@router.get("/v1/batches")
async def list_batches(request: Request, limit: int = 20):
    resp = await _call(request, "ListBatches", batch_pb2.ListBatchesRequest(limit=max(0, min(limit, 100))))
    data = [batch_json(b) for b in resp.batches]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": False}


@router.get("/v1/batches/{batch_id}")
async def get_batch(request: Request, batch_id: str):
    return batch_json((await _call(request, "GetBatch", batch_pb2.GetBatchRequest(batch_id=batch_id))).batch)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str):
    return batch_json((await _call(request, "CancelBatch", batch_pb2.CancelBatchRequest(batch_id=batch_id))).batch)

