"""The OpenAI-compatible HTTP gateway: a thin FastAPI shell over the ``chiron.v1.Router`` gRPC service.

Routes (all but ``/health``, ``/livez`` and ``/metrics`` need ``Authorization: Bearer <token>`` when
``CHIRON_AUTH_TOKENS`` is set):

* ``POST /v1/completions`` and ``POST /v1/chat/completions``, streaming (SSE) or not; the prompt is tokenized
  here (:mod:`services.gateway.tokenizer`). The **SLO class** comes from the body's ``slo_class``, else the
  header ``X-Chiron-SLO-Class``, else ``GatewayConfig.default_slo_class``; ``ttft_ms`` / ``itl_ms`` override its
  SLOs. An interactive class streams through the router, many requests on one ``Router.GenerateMany`` stream per
  bearer token (:mod:`services.gateway.router_mux`); a queued class (``batch``) goes through ``Router.Submit``
  and the answer waits for the result (no streaming).
* ``GET /v1/models``, ``GET /v1/models/{model}`` (``Router.ListModels``). A *known* model (``GatewayConfig.models``,
  or served since the gateway started) that no engine serves right now is 503 ``model_unavailable`` with
  ``Retry-After``; a model never known is 404 ``model_not_found``.
* the Batch API (``/v1/files``, ``/v1/batches``) from ``services.gateway.batch_api``.
* ``GET /health`` (readiness): each dependency (router; through it the queue and etcd membership) ``ok`` /
  ``down`` / ``unknown`` with a message; 503 when one in ``GatewayConfig.health_requires`` (default the router)
  is not ok, else 200 (``degraded`` when another is down). ``GET /livez`` (liveness): 200 while the server
  answers. ``GET /metrics``: ``chiron_gateway_requests_total{endpoint, status}``,
  ``chiron_gateway_request_duration_seconds``, ``chiron_gateway_ttft_seconds`` and
  ``chiron_gateway_overhead_seconds`` (a streamed request's own time in the gateway), per endpoint.

Errors come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status of
:data:`services.gateway.common.GRPC_TO_HTTP` (400, 401, 404, 413 body over ``max_body_bytes``, 429 admission
control, 503 no capacity, no engine now or a dependency down — the message names it —, 504 deadline). An error
before the first token is a plain HTTP error, a later one a last ``data: {"error": ...}`` event. A client that
disconnects cancels its request at the router, so the engine aborts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chiron.v1 import queue_pb2, router_pb2, router_pb2_grpc, types_pb2
from services.common.failover import FailoverChannel
from services.common.grpc_util import MESSAGE_OPTIONS, settle_heap
from services.common.security import SecuritySettings, security_settings
from services.gateway import common
from services.gateway.common import APIError
from services.gateway.config import GatewayConfig, SloClassConfig
from services.gateway.router_mux import RouterMux
from services.gateway.tokenizer import Detokenizer, Tokenizer, load_tokenizer

log = logging.getLogger("chiron.gateway")

SLO_CLASS_HEADER = "x-chiron-slo-class"
class GatewayMetrics:
    """The gateway's Prometheus metrics, in a registry of their own (several apps may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("chiron_gateway_requests", "HTTP requests answered, by route template and status.",
                                ["endpoint", "status"], registry=self.registry)
        self.duration = Histogram("chiron_gateway_request_duration_seconds",
                                  "Time from request arrival to the end of the response (streams included) [s].",
                                  ["endpoint"], registry=self.registry,
                                  buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300, 1800))
        self.overhead = Histogram(
            "chiron_gateway_overhead_seconds",
            "Time a streamed request spends in the gateway itself: from its arrival to its router call, plus from "
            "the router's first token to that token's SSE event being written [s].", ["endpoint"],
            registry=self.registry,
            buckets=(.0005, .001, .0015, .002, .003, .004, .005, .0075, .01, .015, .025, .05, .1, .25, 1))
        self.ttft = Histogram("chiron_gateway_ttft_seconds",
                              "Time from request arrival to the first token from the router [s].",
                              ["endpoint"], registry=self.registry,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))


# ---- ASGI middleware --------------------------------------------------------------------------------
class _MetricsMiddleware:
    """Counts every HTTP request by route template (``unmatched`` for unknown paths) and status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope.setdefault("state", {})["arrival"] = start  # request.state.arrival: where the gateway's time starts
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.duration.labels(endpoint).observe(time.perf_counter() - start)


class _BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: at once by its Content-Length, else while it streams in (chunked
    uploads), before the route has accepted anything."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self, size: str) -> str:
        return (f"the request body ({size}) exceeds the gateway's limit of {self.max_bytes} bytes "
                f"(chiron gateway --max-body-bytes)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await APIError(413, self._message(f"{int(declared)} bytes"), code="request_too_large").response()(
                scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # An HTTPException passes FastAPI's body parsing unchanged; the app's handler renders it.
                    raise StarletteHTTPException(413, self._message(f"over {self.max_bytes} bytes so far"))
            return message

        await self.app(scope, counting_receive, send)


# ---- responses ----------------------------------------------------------------------------------------
_FINISH = {types_pb2.FINISH_REASON_LENGTH: "length", types_pb2.FINISH_REASON_STOP: "stop",
           types_pb2.FINISH_REASON_ABORT: "abort", types_pb2.FINISH_REASON_EVICTED: "abort"}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _Last(bytes):
    """The last chunk of an event stream: :class:`_EventStream` writes it together with the end of the HTTP body."""


class _DisconnectWatch:
    """Cancels a router call as soon as the HTTP client goes away (``http.disconnect`` on the ASGI receive
    channel, read once the request body has been). One task per request, where Starlette's StreamingResponse
    spends an anyio task group (two tasks and cancel scopes, under uvicorn's ASGI 2.3) and polling a read
    spends a task and a timer: about a fifth of the gateway's CPU per streamed request (``chiron bench
    gateway``, ``cpu_ms_per_request``). ``gone`` tells a cancellation caused by the client from others."""

    def __init__(self, receive: Receive, call) -> None:
        self.gone = False
        self._task = asyncio.ensure_future(self._watch(receive, call))

    async def _watch(self, receive: Receive, call) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        call.cancel()

    def stop(self) -> None:
        self._task.cancel()


class _EventStream(StreamingResponse):
    """Server-sent events from a router call, ended by ``watch`` when the client goes away. The events'
    generator is closed however the response ends, so its cleanup runs then, not when it is garbage-collected."""

    def __init__(self, events: AsyncGenerator[bytes, None], watch: _DisconnectWatch, headers: dict[str, str],
                 on_first_event: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        self._events = events
        self._watch = watch
        self._on_first_event = on_first_event

    async def stream_response(self, send: Send) -> None:
        # Starlette's, except that a :class:`_Last` chunk ends the body in the same write: with the last token's
        # event held for the end of the stream (see _stream), a short answer costs two writes fewer.
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            last = isinstance(chunk, _Last)
            await send({"type": "http.response.body", "body": chunk, "more_body": not last})
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = True

        async def send_timed(message: Message) -> None:
            nonlocal first
            await send(message)
            if first and message["type"] == "http.response.body":
                first = False
                self._on_first_event()

        try:
            await self.stream_response(send_timed)
        except asyncio.CancelledError:
            if not self._watch.gone:
                raise
        finally:
            self._watch.stop()
            await self._events.aclose()


async def _unless_disconnected(request: Request, aw: Awaitable, poll_s: float):
    """The result of ``aw``, unless the client goes away first: then ``aw`` is cancelled and APIError 499
    ("client closed request") is raised (nobody reads the answer; the status shows in the metrics)."""
    task = asyncio.ensure_future(aw)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise APIError(499, "the client closed the connection before the answer was ready", code="client_closed")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task


# ---- routes ------------------------------------------------------------------------------------------------
api = APIRouter(dependencies=[Depends(common.require_auth)])


def _slo(cfg: GatewayConfig, request: Request, req: common.CompletionRequest | common.ChatCompletionRequest
         ) -> tuple[str, SloClassConfig, int, int]:
    """``(class name, class, ttft_ms, itl_ms)``: body ``slo_class``, else the header, else the default class;
    body ``ttft_ms`` / ``itl_ms`` override the class's. Raises APIError 400 for an unknown class."""
    name = req.slo_class or request.headers.get(SLO_CLASS_HEADER) or cfg.default_slo_class
    cls = cfg.slo_classes.get(name)
    if cls is None:
        raise APIError(400, f"unknown SLO class {name!r} (body field slo_class or header X-Chiron-SLO-Class); "
                            f"known: {', '.join(sorted(cfg.slo_classes))}", param="slo_class", code="invalid_value")
    ttft = req.ttft_ms if req.ttft_ms is not None else cls.ttft_ms
    itl = req.itl_ms if req.itl_ms is not None else cls.itl_ms
    return name, cls, ttft, itl


async def _generate(request: Request, endpoint: str) -> Response:
    start = time.perf_counter()
    cfg = common.config(request)
    req = common.parse_body(endpoint, await common.json_body(request))
    slo_name, slo_cls, ttft_ms, itl_ms = _slo(cfg, request, req)
    if slo_cls.queued and req.stream:
        raise APIError(400, f"SLO class {slo_name!r} is served through the queue and cannot stream: send stream: false, "
                            f"or use the Batch API", param="stream", code="invalid_value")
    await common.models(request).require(request, req.model, queued=slo_cls.queued)
    tok = common.tokenizer(request)
    ids = common.prompt_ids(tok, req)
    rid = uuid.uuid4().hex
    chat = endpoint == common.CHAT_COMPLETIONS
    shape = common.Shape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{rid}", req.model, int(time.time()))
    max_tokens = common.max_tokens_of(req, cfg.default_max_tokens)
    # A non-streaming answer needs the first token (TTFT) and the rest at the finish: one message each from the
    # engine through the router (the stream interval), not one per token.
    ir = types_pb2.InferenceRequest(
        request_id=rid, model=req.model, prompt_token_ids=ids, max_tokens=max_tokens,
        slo=types_pb2.SLO(ttft_ms=ttft_ms, itl_ms=itl_ms),
        request_class=types_pb2.REQUEST_CLASS_BATCH if slo_cls.queued else types_pb2.REQUEST_CLASS_INTERACTIVE,
        stream_interval=0 if req.stream else max_tokens)
    headers = {"X-Request-Id": rid}
    if slo_cls.queued:
        return JSONResponse(await _queued(request, ir, shape), headers=headers)

    arrival = getattr(request.state, "arrival", start)
    call = request.app.state.router_mux.generate(ir, common.forward_metadata(request), cfg.request_timeout_s)
    before_router = time.perf_counter() - arrival
    watch = _DisconnectWatch(request.receive, call)
    streaming = False  # once the event stream is returned, it owns the watch
    try:
        # The first message before any answer: refusals (429, 503, …) become plain HTTP errors.
        first = await call.read()
        if first is grpc.aio.EOF:
            raise APIError(502, "the router ended the stream without any token", code="empty_stream")
        first_at = time.perf_counter()
        metrics = request.app.state.metrics
        metrics.ttft.labels(endpoint).observe(first_at - start)
        if req.stream:
            def on_first_event() -> None:
                metrics.overhead.labels(endpoint).observe(before_router + time.perf_counter() - first_at)
            response = _EventStream(_stream(call, first, shape, Detokenizer(tok), len(ids), req.include_usage), watch,
                                    headers, on_first_event)
            streaming = True
            return response
        out, finish = await _collect(call, first)
    except grpc.aio.AioRpcError as e:
        raise APIError.from_grpc(e) from None
    except asyncio.CancelledError:
        if watch.gone:  # nobody reads the answer; the status shows in the metrics
            raise APIError(499, "the client closed the connection before the answer was ready",
                           code="client_closed") from None
        call.cancel()
        raise
    except BaseException:
        call.cancel()
        raise
    finally:
        if not streaming:
            watch.stop()
    return JSONResponse(shape.full(tok.decode(out), finish, common.usage(len(ids), len(out))), headers=headers)


async def _collect(call, first: router_pb2.RouterGenerateResponse) -> tuple[list[int], str]:
    out: list[int] = []
    finish = "stop"
    msg = first
    while msg is not grpc.aio.EOF:
        out.extend(msg.chunk.token_ids)
        if msg.chunk.finish_reason:
            finish = _FINISH.get(msg.chunk.finish_reason, "stop")
        msg = await call.read()
    return out, finish


async def _stream(call, first: router_pb2.RouterGenerateResponse, shape: common.Shape, detok: Detokenizer,
                  prompt_tokens: int, include_usage: bool) -> AsyncGenerator[bytes, None]:
    """SSE events of one streaming request; cancelling it (client gone) cancels the router call.

    Events go out as their tokens arrive, as few writes as that allows: a chat stream's opening role chunk goes
    with the first token, and from the message that carries the finish reason (with the last tokens) on, events
    are held until the router's stream ends (its status follows at once) and go out with the end of the stream
    and the end of the HTTP body, in one write (:class:`_Last`)."""
    generated = 0
    finish: str | None = None
    out = _sse(shape.chunk("", role=True)) if shape.chat else b""  # events not yet written
    instances: list[str] = []  # the engines that served it, in order (named on their first message)
    try:
        msg = first
        while msg is not grpc.aio.EOF:
            c = msg.chunk
            if msg.instance_id:
                instances.append(msg.instance_id)
            if c.token_ids:
                generated += len(c.token_ids)
                text = detok.step(c.token_ids)
                if text:
                    out += _sse(shape.chunk(text))
            if c.finish_reason:
                finish = _FINISH.get(c.finish_reason, "stop")
            if finish is None and out:
                yield out
                out = b""
            msg = await call.read()
        if generated > call.request.max_tokens:  # the router broke its contract: say so, with what to look for
            log.error("request %s: the router streamed %d tokens for max_tokens %d (instances %s); look for it in "
                      "the router's and engines' logs", call.request.request_id, generated, call.request.max_tokens,
                      ", ".join(instances) or "none named")
        tail = detok.flush()
        end = [out, _sse(shape.chunk(tail)) if tail else b"", _sse(shape.chunk("", finish or "stop")),
               _sse(shape.usage_chunk(common.usage(prompt_tokens, generated))) if include_usage else b"", b"data: [DONE]\n\n"]
        yield _Last(b"".join(end))
    except grpc.aio.AioRpcError as e:
        yield out + _sse(APIError.from_grpc(e).body())
    finally:
        call.cancel()  # no-op once the call has ended


async def _queued(request: Request, ir: types_pb2.InferenceRequest, shape: common.Shape) -> dict[str, Any]:
    """A queued (batch-class) request: Submit, wait for its final state, answer like a synchronous call."""
    cfg = common.config(request)
    stub = common.router_stub(request)
    md = common.forward_metadata(request)
    try:
        sub = await stub.Submit(router_pb2.SubmitRequest(request=ir), metadata=md, timeout=30.0)
    except grpc.aio.AioRpcError as e:
        raise APIError.from_grpc(e) from None

    async def final():
        last = None
        async for update in stub.StreamResult(router_pb2.StreamResultRequest(request_id=sub.request_id), metadata=md):
            last = update.result
        return last

    try:
        res = await _unless_disconnected(request, final(), cfg.disconnect_poll_s)
    except grpc.aio.AioRpcError as e:
        raise APIError.from_grpc(e) from None
    except APIError:  # the client went away: nobody will read the result
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.Cancel(router_pb2.RouterCancelRequest(request_id=sub.request_id), metadata=md, timeout=5.0)
        raise
    if res is None or res.state != queue_pb2.QUEUED_REQUEST_STATE_DONE:
        raise APIError(409, f"queued request {sub.request_id} was cancelled before it finished", code="cancelled")
    out = list(res.output_token_ids)
    finish = common.queued_finish_reason(len(out), ir.max_tokens)
    return shape.full(common.tokenizer(request).decode(out), finish, common.usage(len(ir.prompt_token_ids), len(out)))


@api.post(common.COMPLETIONS)
async def completions(request: Request) -> Response:
    """OpenAI ``POST /v1/completions`` (body: :class:`services.gateway.common.CompletionRequest`)."""
    return await _generate(request, common.COMPLETIONS)


@api.post(common.CHAT_COMPLETIONS)
async def chat_completions(request: Request) -> Response:
    """OpenAI ``POST /v1/chat/completions`` (body: :class:`services.gateway.common.ChatCompletionRequest`)."""
    return await _generate(request, common.CHAT_COMPLETIONS)


def _model_json(m: router_pb2.ModelInfo, created: int) -> dict[str, Any]:
    return {"id": m.model, "object": "model", "created": created, "owned_by": "chiron",
            "instances": {"interactive": m.interactive_instances, "mixed": m.mixed_instances, "batch": m.batch_instances}}


@api.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """OpenAI ``GET /v1/models``: models with serving engine instances (with Chiron's instance counts by role)."""
    created = request.app.state.started_at
    return {"object": "list", "data": [_model_json(m, created) for m in await common.models(request).models(request)]}


@api.get("/v1/models/{model:path}")
async def get_model(request: Request, model: str) -> dict[str, Any]:
    """OpenAI ``GET /v1/models/{model}``: the model while an engine instance serves it; 503 ``model_unavailable``
    (with ``Retry-After``) for a known model without one now, 404 ``model_not_found`` for one never known
    (:meth:`services.gateway.common.ModelCache.require`)."""
    info = await common.models(request).require(request, model)
    assert info is not None  # only a queued request accepts a model without an engine
    return _model_json(info, request.app.state.started_at)


# ---- health ---------------------------------------------------------------------------------------------------
_DEPENDENCY_SERVICES = {"queue": "chiron.dependency.queue", "membership": "chiron.dependency.membership"}
_DOWN_MEANS = {
    "queue": "the router's queue does not answer its health check: batch-class requests and the Batch API fail "
             "until it is back (interactive requests are served)",
    "membership": "the router's etcd membership watch is down: it routes on the engines it last saw and does not "
                  "see engines that start or stop meanwhile",
}


async def health_report(request: Request) -> tuple[int, dict[str, Any]]:
    """``(HTTP status, body)`` of ``GET /health``.

    Sources: the router's standard gRPC health service on the gateway's router channel, for ``chiron.v1.Router``
    (the router serves) and the dependencies it reports (``chiron.dependency.queue``,
    ``chiron.dependency.membership``: see :mod:`services.router.server`), each with a deadline of
    ``health_timeout_s`` [s]. Each dependency is ``ok``, ``down`` (with a message saying what fails) or
    ``unknown`` (the router did not answer, or does not report it). ``status`` is ``ok`` when all are ok,
    ``unavailable`` (HTTP 503) when one of ``GatewayConfig.health_requires`` is not ok, else ``degraded`` (200).
    Never raises for a dependency's failure."""
    cfg = common.config(request)
    stub = health_pb2_grpc.HealthStub(common.router_channel(request))

    async def check(service: str) -> int | grpc.aio.AioRpcError:
        try:
            return (await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=cfg.health_timeout_s)).status
        except grpc.aio.AioRpcError as e:
            return e

    router_name = router_pb2.DESCRIPTOR.services_by_name["Router"].full_name
    answers = await asyncio.gather(check(router_name), *(check(s) for s in _DEPENDENCY_SERVICES.values()))
    deps: dict[str, dict[str, Any]] = {}
    router = answers[0]
    if isinstance(router, grpc.aio.AioRpcError):
        deps["router"] = {"status": "down", "address": cfg.router,
                          "message": f"the router at {cfg.router} is unreachable ({router.code().name}: "
                                     f"{router.details()}): no request can be served"}
    elif router != health_pb2.HealthCheckResponse.SERVING:
        deps["router"] = {"status": "down", "address": cfg.router,
                          "message": f"the router at {cfg.router} is not serving (starting or draining)"}
    else:
        deps["router"] = {"status": "ok", "address": cfg.router}
    for name, answer in zip(_DEPENDENCY_SERVICES, answers[1:], strict=True):
        if deps["router"]["status"] != "ok":
            deps[name] = {"status": "unknown", "message": "not known: the router, which reports it, does not answer"}
        elif isinstance(answer, grpc.aio.AioRpcError):
            deps[name] = {"status": "unknown", "message": f"the router does not report it ({answer.code().name})"}
        elif answer == health_pb2.HealthCheckResponse.SERVING:
            deps[name] = {"status": "ok"}
        else:
            deps[name] = {"status": "down", "message": _DOWN_MEANS[name]}
    failing = [n for n in cfg.health_requires if deps[n]["status"] != "ok"]
    overall = "unavailable" if failing else "ok" if all(d["status"] == "ok" for d in deps.values()) else "degraded"
    body = {"status": overall, "dependencies": deps, "required": list(cfg.health_requires)}
    return (503 if failing else 200), body


# ---- the app ------------------------------------------------------------------------------------------------
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def create_app(config: GatewayConfig | None = None, *, security: SecuritySettings | None = None,
               tokenizer: Tokenizer | None = None) -> FastAPI:
    """The gateway app. ``security``: tokens and TLS (default: the process's, from ``CHIRON_*`` variables);
    ``tokenizer``: default from ``config.tokenizer``. The router channel opens when the app starts (lifespan).
    Raises RuntimeError / ValueError when the tokenizer cannot be loaded."""
    cfg = config or GatewayConfig()
    sec = security or security_settings()
    tok = tokenizer or load_tokenizer(cfg.tokenizer, cfg.vocab_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        channel = FailoverChannel(cfg.router, options=MESSAGE_OPTIONS, settings=sec)
        app.state.router_channel = channel
        app.state.router_stub = router_pb2_grpc.RouterStub(channel)
        app.state.router_mux = RouterMux([router_pb2_grpc.RouterStub(ch) for ch in channel.channels])
        try:
            yield
        finally:
            await app.state.router_mux.close()
            await channel.close()

    app = FastAPI(title="Chiron OpenAI-compatible gateway", lifespan=lifespan)
    app.state.config = cfg
    app.state.security = sec
    app.state.tokenizer = tok
    app.state.models = common.ModelCache(ttl_s=cfg.models_ttl_s, configured=cfg.models, retry_after_s=cfg.retry_after_s)
    app.state.metrics = metrics = GatewayMetrics()
    app.state.started_at = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, e: APIError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, e: RequestValidationError) -> Response:
        return common.validation_error(e.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        message = str(e.detail)
        if e.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return APIError(e.status_code, message, code=_HTTP_CODES.get(e.status_code)).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error in the gateway ({type(e).__name__}); see its log").response()

    @app.get("/health", include_in_schema=False)
    async def health(request: Request) -> Response:
        """Readiness with what the gateway depends on; see :func:`health_report`."""
        status, report = await health_report(request)
        return JSONResponse(report, status_code=status,
                            headers={"Retry-After": str(cfg.retry_after_s)} if status == 503 else None)

    @app.get("/livez", include_in_schema=False)
    async def livez() -> dict[str, str]:
        """Liveness: the HTTP server answers (checks nothing else; for liveness probes and waiting for start-up,
        where /health would restart or hold back a gateway for an outage of the router behind it)."""
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(_exposed_registry(metrics)), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api)
    if importlib.util.find_spec("services.gateway.batch_api") is not None:
        app.include_router(importlib.import_module("services.gateway.batch_api").router)
    app.add_middleware(_BodyLimitMiddleware, max_bytes=cfg.max_body_bytes)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # outermost: sees every status, 413 included
    return app


def _exposed_registry(metrics: GatewayMetrics) -> CollectorRegistry:
    """What ``/metrics`` shows: the app's own registry, or, in a worker of :class:`GatewayWorkers`
    (``PROMETHEUS_MULTIPROC_DIR`` set), every worker's metrics summed (prometheus_client's multiprocess mode)."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return metrics.registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


# ---- serving ----------------------------------------------------------------------------------------------
def _base_url(config: GatewayConfig, security: SecuritySettings, port: int) -> str:
    """``http[s]://HOST:PORT`` of a gateway bound to ``config.host`` (a wildcard address reads as 127.0.0.1)."""
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"{'https' if security.tls_enabled else 'http'}://{host}:{port}"


class _Server(uvicorn.Server):
    """uvicorn without signal handlers of its own: whoever runs it decides when to stop (``chiron gateway``
    stops it on SIGTERM / SIGINT)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class GatewayServer:
    """uvicorn serving :func:`create_app` in the running event loop; HTTPS when ``security`` has a certificate
    and key (HTTP clients are not asked for certificates: they authenticate with bearer tokens)."""

    def __init__(self, config: GatewayConfig | None = None, *, security: SecuritySettings | None = None,
                 tokenizer: Tokenizer | None = None, access_log: bool = False,
                 sock: socket.socket | None = None) -> None:
        self.config = config or GatewayConfig()
        self.security = security or security_settings()
        self.app = create_app(self.config, security=self.security, tokenizer=tokenizer)
        self._sock = sock  # a listening socket to serve (a GatewayWorkers worker), instead of binding host:port
        tls = self.security.tls_enabled
        self._server = _Server(uvicorn.Config(
            self.app, host=self.config.host, port=self.config.port, log_config=None, access_log=access_log,
            timeout_graceful_shutdown=self.config.graceful_shutdown_s, lifespan="on",
            ssl_certfile=str(self.security.tls_cert) if tls else None,
            ssl_keyfile=str(self.security.tls_key) if tls else None))
        self._task: asyncio.Task | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:8000``."""
        return _base_url(self.config, self.security, self.port)

    async def _serve(self) -> None:
        try:
            await self._server.serve(sockets=[self._sock] if self._sock is not None else None)
        except SystemExit as e:  # uvicorn exits when it cannot bind or the app fails to start
            raise RuntimeError(f"the gateway could not start on {self.config.host}:{self.config.port} "
                               f"(see the log above)") from e

    async def start(self) -> int:
        """Start serving; returns the bound port once the server accepts connections. Raises RuntimeError
        when it cannot start (address in use, router channel or TLS files unusable)."""
        self._task = asyncio.create_task(self._serve(), name="gateway-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the gateway stopped during start-up")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        settle_heap()
        log.info("gateway serving on %s (router %s)", self.url, self.config.router)
        return self.port

    async def stop(self) -> None:
        """Stop accepting connections, let in-flight requests finish (up to ``graceful_shutdown_s``), close the
        router channel."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task


class GatewayWorkers:
    """``config.workers`` gateway processes on one port (``chiron gateway --workers N``).

    One event loop serves requests one callback at a time, so one worker uses at most one core (about 2 ms of
    CPU per streamed request: some 450 requests/s). This process binds one listening socket per worker, all on
    the same port with ``SO_REUSEPORT``, so the kernel spreads new connections over the workers by their
    addresses. A worker's socket stays open here, so connections that wait for a worker being restarted are
    served by its successor. Each worker is ``chiron gateway`` itself (``--worker-fd``), started with
    ``PROMETHEUS_MULTIPROC_DIR`` set so that any worker's ``/metrics`` sums all of them; a worker writes
    ``ready-<pid>`` in the shared directory once it serves. A worker that exits while serving is restarted
    (after a second); one that exits during start-up fails :meth:`start`. Workers run in sessions of their own
    (a terminal's Ctrl-C reaches this process, which stops them in order) and stop by themselves, removing the
    shared directory, if this process dies.
    """

    def __init__(self, config: GatewayConfig, *, access_log: bool = False, security: SecuritySettings | None = None,
                 ready_timeout_s: float = 60.0) -> None:
        self.config = config
        self.security = security or security_settings()
        self.access_log = access_log
        self.ready_timeout_s = ready_timeout_s
        self.port = 0
        self.procs: list[subprocess.Popen] = []
        self._dir: Path | None = None
        self._socks: list[socket.socket] = []
        self._watch: asyncio.Task | None = None
        self._stopping = False

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. ``http://127.0.0.1:8000``."""
        return _base_url(self.config, self.security, self.port)

    def _spawn(self, i: int) -> subprocess.Popen:
        assert self._dir is not None
        fd = self._socks[i].fileno()
        cmd = [sys.executable, "-m", "services.cli", "gateway", "--worker-fd", str(fd),
               "--worker-dir", str(self._dir), *(["--access-log"] if self.access_log else [])]
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._dir / "metrics")}
        return subprocess.Popen(cmd, pass_fds=(fd,), env=env, start_new_session=True)

    async def start(self) -> int:
        """Bind ``host:port``, start the workers, return the bound port once every worker serves. Raises
        OSError when the address cannot be bound, RuntimeError when a worker exits during start-up (its output
        is in this process's log), TimeoutError when one is not serving within ``ready_timeout_s``."""
        host, family = self.config.host, socket.AF_INET6 if ":" in self.config.host else socket.AF_INET
        self.port = self.config.port
        try:
            for _ in range(self.config.workers):  # the first one picks the port when it is 0
                sock = socket.create_server((host, self.port), family=family, backlog=2048, reuse_port=True)
                sock.set_inheritable(True)
                self._socks.append(sock)
                self.port = sock.getsockname()[1]
            self._dir = Path(tempfile.mkdtemp(prefix="chiron-gateway-workers-"))
            (self._dir / "metrics").mkdir()
            (self._dir / "config.json").write_text(self.config.model_dump_json())
            self.procs = [self._spawn(i) for i in range(self.config.workers)]
            deadline = time.monotonic() + self.ready_timeout_s
            while not all((self._dir / f"ready-{p.pid}").exists() for p in self.procs):
                for p in self.procs:
                    if p.poll() is not None:
                        raise RuntimeError(f"gateway worker {p.pid} exited with code {p.returncode} during start-up")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the gateway workers were not serving within {self.ready_timeout_s:.0f} s")
                await asyncio.sleep(0.05)
        except BaseException:
            await self.stop()
            raise
        self._watch = asyncio.create_task(self._restart_dead(), name="gateway-workers")
        return self.port

    async def _restart_dead(self) -> None:
        while not self._stopping:
            await asyncio.sleep(1.0)
            for i, p in enumerate(self.procs):
                if p.poll() is not None and not self._stopping:
                    log.warning("gateway worker %d exited with code %s; starting another", p.pid, p.returncode)
                    self.procs[i] = self._spawn(i)

    async def stop(self) -> None:
        """SIGTERM every worker (in-flight requests finish, up to ``graceful_shutdown_s``), SIGKILL those still
        running 5 s after that, close the sockets and remove the shared directory."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.graceful_shutdown_s + 5.0
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for sock in self._socks:
            sock.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def worker_config(worker_dir: str | Path) -> GatewayConfig:
    """The configuration :class:`GatewayWorkers` wrote for its workers (``WORKER_DIR/config.json``)."""
    return GatewayConfig(**json.loads((Path(worker_dir) / "config.json").read_text()))
