"""What every route of the HTTP gateway shares (the completions routes in :mod:`services.gateway.app`, the Batch
API in ``services.gateway.batch_api``), importable without the app:

* the OpenAI error shape (:class:`APIError`) and the gRPC status → HTTP status mapping (:data:`GRPC_TO_HTTP`);
* the bearer-token check (:func:`require_auth`, a FastAPI dependency) and the metadata that carries the client's
  credentials on to the router (:func:`forward_metadata`);
* accessors for what the app keeps on ``app.state``: the router channel and stub, the tokenizer, the config, the
  security settings and the cached list of served models;
* the request bodies of ``/v1/completions`` and ``/v1/chat/completions`` (pydantic, strict types) and their
  tokenized prompts (:func:`prompt_of`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chiron.v1 import router_pb2, router_pb2_grpc
from services.common import security
from services.common.failover import FailoverChannel
from services.gateway.tokenizer import Tokenizer

if TYPE_CHECKING:
    from services.gateway.config import GatewayConfig

# gRPC status of a router call → HTTP status of the gateway's answer (anything else: 500).
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# OpenAI's ``error.type`` by HTTP status (other 4xx: invalid_request_error; other 5xx: server_error).
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error answered in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with HTTP
    ``status``. ``code``: a short machine-readable reason (e.g. ``model_not_found``); ``param``: the request
    field at fault."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, retry_after_s: int | None = None) -> None:
        """``retry_after_s``: sent as the ``Retry-After`` header [s] (a 503 whose cause is expected to pass)."""
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.retry_after_s = retry_after_s

    @classmethod
    def from_grpc(cls, e: grpc.aio.AioRpcError) -> APIError:
        """The HTTP answer to a failed router call: the status per :data:`GRPC_TO_HTTP`, the router's message,
        the gRPC status name (lower case) as ``code``.

        Only a failure of the gateway's own connection to the router blames the router (gRPC's transport
        messages, :func:`router_unreachable`); an error the router passes on from a dependency names that
        dependency itself (the queue: trailing metadata ``chiron-dependency: queue`` and a message naming it)
        and is kept as it is."""
        code = e.code()
        status = GRPC_TO_HTTP.get(code, 500)
        message = e.details() or code.name
        if _dependency_of(e) is None and router_unreachable(e):
            message = f"the router is unreachable ({message}); retry later"
        return cls(status, message, code=code.name.lower())

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# How gRPC itself words a failure of the connection (as opposed to a status the router sent), lower case.
_TRANSPORT_FAILURES = ("failed to connect", "connections to all backends failing", "socket closed", "connection reset",
                       "connection refused", "recvmsg", "sendmsg", "goaway", "keepalive watchdog", "dns resolution",
                       "broken pipe", "endpoint closing", "transport closed", "channel closed")


def _dependency_of(e: grpc.aio.AioRpcError) -> str | None:
    """The dependency the router named in the error's trailing metadata (``chiron-dependency``), if any."""
    try:
        trailing = e.trailing_metadata() or ()
    except Exception:  # an error built here (router_mux) may carry none
        return None
    for key, value in trailing:
        if key == "chiron-dependency":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def router_unreachable(e: grpc.aio.AioRpcError) -> bool:
    """Whether a failed router call failed to reach the router (UNAVAILABLE whose message is gRPC's own about
    the connection), rather than being answered by it."""
    return e.code() == grpc.StatusCode.UNAVAILABLE and (e.details() or "").lower().startswith(_TRANSPORT_FAILURES)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> APIError:
    """A 400 :class:`APIError` for validation errors (pydantic's or FastAPI's ``errors()``): the first problem,
    naming the field at fault (``param``, e.g. ``messages.0.content``)."""
    err = errors[0]
    # Union members appear in the location as their type ("str", "list[int]", "function-after[...]"), FastAPI
    # prefixes "body" / "query" / "path": drop them.
    parts = [str(p) for p in err.get("loc", ())
             if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_TAGS and not p[0].isupper())]
    param = ".".join(parts) or None
    msg = err.get("msg", "invalid value")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance", "literal", "body", "query", "path"}


# ---- response objects ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """OpenAI's response objects of one request: chat completion or text completion."""

    chat: bool
    id: str
    model: str
    created: int

    def _wrap(self, obj: str, choices: list, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def chunk(self, text: str, finish: str | None = None, *, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if finish is None else {})
            return self._wrap("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                          "finish_reason": finish}])
        return self._wrap("text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return self._wrap("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)

    def full(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            return self._wrap("chat.completion", [{"index": 0, "message": {"role": "assistant", "content": text},
                                                   "logprobs": None, "finish_reason": finish}], usage=usage)
        return self._wrap("text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
                          usage=usage)


def usage(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's ``usage`` object [tokens]."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def queued_finish_reason(num_output_tokens: int, max_tokens: int) -> str:
    """``finish_reason`` of a request served through the queue, whose stored result keeps its tokens but not the
    engine's reason: ``length`` when it used its whole budget, else ``stop``."""
    return "length" if num_output_tokens >= max_tokens else "stop"


# ---- app state ------------------------------------------------------------------------------------
def config(request: Request) -> GatewayConfig:
    """The gateway's :class:`~services.gateway.config.GatewayConfig`."""
    return request.app.state.config


def tokenizer(request: Request) -> Tokenizer:
    """The gateway's tokenizer (:mod:`services.gateway.tokenizer`)."""
    return request.app.state.tokenizer


def router_channel(request: Request) -> FailoverChannel:
    """The gateway's channel to the router, or routers: a :class:`~services.common.failover.FailoverChannel`
    that stubs use as a ``grpc.aio.Channel`` (a call UNAVAILABLE at one router is made at the next; TLS when
    configured; opened at start-up)."""
    return request.app.state.router_channel


def router_stub(request: Request) -> router_pb2_grpc.RouterStub:
    """A ``chiron.v1.Router`` stub on :func:`router_channel`."""
    return request.app.state.router_stub


def security_settings(request: Request) -> security.SecuritySettings:
    """The security settings the app was created with (tokens, TLS)."""
    return request.app.state.security


async def require_auth(request: Request) -> None:
    """FastAPI dependency: the request's ``Authorization: Bearer <token>`` must carry an accepted token when
    authentication is on (``CHIRON_AUTH_TOKENS``). Raises :class:`APIError` 401 (the token is never echoed)."""
    s = security_settings(request)
    if not s.auth_enabled:
        return
    sent = security.bearer_token(request.headers.get("authorization"))
    if sent is None:
        raise APIError(401, "missing API key: send the header 'Authorization: Bearer <token>' (the openai client's "
                            "api_key) with a token the gateway accepts", code="invalid_api_key")
    if not security.token_ok(sent, s):
        raise APIError(401, "invalid API key: the bearer token sent is not one the gateway accepts (CHIRON_AUTH_TOKENS)",
                       code="invalid_api_key")


def forward_metadata(request: Request) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for router calls made on behalf of ``request``: the client's bearer token when it sent one,
    else the gateway's own (``CHIRON_TOKEN``), else none."""
    sent = security.bearer_token(request.headers.get("authorization"))
    if sent is not None:
        return (("authorization", f"Bearer {sent}"),)
    return security.auth_metadata(security_settings(request))


async def json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object. Raises :class:`APIError` 400 when it is not valid JSON or not an
    object."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object with "
                            f"Content-Type: application/json", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


class ModelCache:
    """The router's ``ListModels``, cached for ``ttl_s`` seconds, and the models this gateway *knows*.

    Once read, an expired list is still answered from while a background task re-reads it (no request waits on
    that round trip: one would every ``ttl_s``, a slow TTFT at the p99); a model not in the list is re-read at
    once, at most every ``min_refresh_s``, so a model whose first engine just registered is found.

    Known models (``known()``) are the configured ones (``configured``: ``GatewayConfig.models``, the models the
    operator deploys) and every model the router has listed as served since this gateway started. A known model
    with no engine instance right now (none started yet, all restarting, scaled to zero) is a passing state:
    :meth:`require` answers it with 503 ``model_unavailable`` and ``Retry-After``, where a model never known is
    404 ``model_not_found``. A gateway restarted while no engine serves knows only its configured models, so
    an operator who wants 503 rather than 404 in that window lists them (``CHIRON_GATEWAY_MODELS``).
    """

    def __init__(self, ttl_s: float = 2.0, min_refresh_s: float = 0.25, *, configured: Sequence[str] = (),
                 retry_after_s: int = 5) -> None:
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self.retry_after_s = retry_after_s
        self._models: dict[str, router_pb2.ModelInfo] = {}
        self._configured = frozenset(configured)
        self._seen: set[str] = set()
        self._at = float("-inf")
        self._lock = asyncio.Lock()
        self._background: asyncio.Task | None = None

    def _refresh_in_background(self, request: Request) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.ensure_future(self._refresh(request, self.ttl_s))
            # A failed background read leaves the old list; the next request past the TTL tries again.
            self._background.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _refresh(self, request: Request, older_than_s: float) -> None:
        async with self._lock:
            if time.monotonic() - self._at < older_than_s:
                return  # another request refreshed it meanwhile
            try:
                resp = await router_stub(request).ListModels(router_pb2.ListModelsRequest(),
                                                             metadata=forward_metadata(request), timeout=5.0)
            except grpc.aio.AioRpcError as e:
                raise APIError.from_grpc(e) from None
            self._models = {m.model: m for m in resp.models}
            self._seen.update(self._models)
            self._at = time.monotonic()

    async def models(self, request: Request) -> list[router_pb2.ModelInfo]:
        """Models with serving instances, by name. Raises :class:`APIError` when the router call fails."""
        if time.monotonic() - self._at >= self.ttl_s:
            if self._at == float("-inf"):
                await self._refresh(request, self.ttl_s)  # never read: nothing to answer from yet
            else:
                self._refresh_in_background(request)
        return [self._models[k] for k in sorted(self._models)]

    def known(self) -> frozenset[str]:
        """Configured models and models served at some point since this gateway started (see the class)."""
        return self._configured | self._seen

    def unavailable(self, model: str) -> APIError:
        """The 503 ``model_unavailable`` answer for a known ``model`` without an engine instance now."""
        return APIError(503, f"the model {model!r} is known but no engine instance serves it right now (starting, "
                             f"restarting or scaled to zero); retry in {self.retry_after_s} s", param="model",
                        code="model_unavailable", retry_after_s=self.retry_after_s)

    async def require(self, request: Request, model: str, *, queued: bool = False) -> router_pb2.ModelInfo | None:
        """The served ``model``'s entry. Raises :class:`APIError`: 503 ``model_unavailable`` (with Retry-After)
        when the model is known (:meth:`known`) but no engine instance serves it now, 404 ``model_not_found``
        when it was never known, or the router call's error. ``queued``: the request waits in the queue for an
        engine anyway (a queued SLO class), so a known model without one now is accepted (returns None)."""
        await self.models(request)
        if model not in self._models:
            await self._refresh(request, self.min_refresh_s)
        if model not in self._models:
            if model in self.known():
                if queued:
                    return None
                raise self.unavailable(model)
            known = ", ".join(sorted(self.known())) or "none (no engine instance has served yet)"
            raise APIError(404, f"the model {model!r} does not exist or no engine serves it; known models: {known}",
                           param="model", code="model_not_found")
        return self._models[model]


def models(request: Request) -> ModelCache:
    """The app's :class:`ModelCache`."""
    return request.app.state.models


# ---- request bodies -------------------------------------------------------------------------------
_INT32_MAX = 2**31 - 1


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """Fields both endpoints share. Sampling fields (``temperature``, ``top_p``, ``stop``, ``seed``, penalties,
    ``user``) are type-checked and then ignored: the engines sample with their own settings. Fields OpenAI
    defines and Chiron does not use (``logprobs``, ``tools``, …) are ignored. Chiron's own: ``slo_class``
    (wins over the ``X-Chiron-SLO-Class`` header), ``ttft_ms`` / ``itl_ms`` (override the class's SLOs, ms)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1, le=_INT32_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    slo_class: str | None = Field(None, min_length=1, max_length=128)
    ttft_ms: int | None = Field(None, ge=0, le=2**62)
    itl_ms: int | None = Field(None, ge=0, le=_INT32_MAX)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported (got {v}); send n separate requests for several choices")
        return v

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_GenerationRequest):
    """Body of ``POST /v1/completions``. ``prompt``: text, a list of one text, or token ids (a list of ints, or a
    list of one such list)."""

    prompt: str | list[Annotated[int, Field(ge=0, le=_INT32_MAX)]] | list[str] | list[list[Annotated[int, Field(ge=0, le=_INT32_MAX)]]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str | list):
            if len(v) != 1:
                raise ValueError(f"only one prompt per request is supported (got {len(v)}); send one request per prompt")
            return v[0]
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    """Body of ``POST /v1/chat/completions``. ``max_completion_tokens`` wins over ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=_INT32_MAX)


COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
_BODIES: dict[str, type[_GenerationRequest]] = {COMPLETIONS: CompletionRequest, CHAT_COMPLETIONS: ChatCompletionRequest}


def parse_body(endpoint: str, body: dict[str, Any]) -> CompletionRequest | ChatCompletionRequest:
    """Validate a request body of ``endpoint`` (``/v1/completions`` or ``/v1/chat/completions``). Raises
    :class:`APIError` 400 naming the first bad field."""
    try:
        return _BODIES[endpoint].model_validate(body)
    except ValidationError as e:
        raise validation_error(e.errors(include_url=False, include_input=False)) from None


def prompt_ids(tok: Tokenizer, req: CompletionRequest | ChatCompletionRequest) -> list[int]:
    """The prompt's token ids (chat: the messages through the tokenizer's chat template). Raises
    :class:`APIError` 400 for a prompt without tokens."""
    if isinstance(req, ChatCompletionRequest):
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
        ids = tok.encode(text, add_special_tokens=False)
        param = "messages"
    elif isinstance(req.prompt, str):
        ids = tok.encode(req.prompt)
        param = "prompt"
    else:
        ids = list(req.prompt)
        param = "prompt"
    if not ids:
        raise APIError(400, "the prompt has no tokens: send some text", param=param, code="invalid_value")
    return ids


def max_tokens_of(req: CompletionRequest | ChatCompletionRequest, default: int) -> int:
    """Output tokens wanted: ``max_completion_tokens`` (chat), else ``max_tokens``, else ``default``."""
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens is not None:
        return req.max_completion_tokens
    return req.max_tokens if req.max_tokens is not None else default


def prompt_of(request: Request, endpoint: str, body: dict[str, Any], default_max_tokens: int) -> tuple[str, list[int], int]:
    """``(model, prompt token ids, max_tokens)`` of one request body of ``endpoint``, tokenized with the app's
    tokenizer. Raises :class:`APIError` 400 (bad fields, empty prompt). The model is not checked against the
    served ones (see :meth:`ModelCache.require`)."""
    req = parse_body(endpoint, body)
    return req.model, prompt_ids(tokenizer(request), req), max_tokens_of(req, default_max_tokens)
