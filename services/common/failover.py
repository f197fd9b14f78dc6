"""Clients of stateless replicas (routers, queue replicas over one database): a list of addresses, failed over.

:class:`FailoverChannel` looks like a ``grpc.aio.Channel`` to generated stubs (``RouterStub(FailoverChannel(...))``)
and keeps one real channel per address:

* a unary call that fails with UNAVAILABLE on one address is made again on the next (each address once per call,
  within the call's own deadline); the address that last answered is tried first;
* a server-streaming call is made again on the next address only when it failed with UNAVAILABLE *before any
  message arrived*: a stream that delivered tokens is never repeated (that would duplicate them), its error is
  the caller's;
* client- and bidirectional-streaming calls cannot be replayed (their request iterator is consumed): they go to
  the preferred address and fail over no further (:class:`services.gateway.router_mux.RouterMux` fails over its
  ``GenerateMany`` requests itself, over :attr:`FailoverChannel.channels`).

Every channel reconnects at least once a second after its address went away (:data:`RECONNECT_OPTIONS`:
gRPC's default backoff grows to two minutes), so a restarted service on the same address is used again within
about a second.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from services.common.security import SecuritySettings, open_channel

# Reconnect to an address that went away within about a second (gRPC's default backoff: 1 s growing ×1.6 to 120 s).
RECONNECT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000))


def parse_addresses(value: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` (or a sequence of such strings) → ``["a:1", "b:2"]``, blanks dropped, order kept. Raises
    ValueError when no address is left."""
    items = [value] if isinstance(value, str) else list(value)
    out = [a.strip() for item in items for a in item.split(",") if a.strip()]
    if not out:
        raise ValueError(f"no address in {value!r}: give host:port, or several separated by commas")
    return out


def with_reconnect_options(options: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    """``options`` plus :data:`RECONNECT_OPTIONS` (those given win)."""
    given = {k for k, _ in options}
    return [*options, *((k, v) for k, v in RECONNECT_OPTIONS if k not in given)]


def retryable(e: grpc.aio.AioRpcError) -> bool:
    """Whether another address may answer where this one failed: UNAVAILABLE (unreachable, shutting down)."""
    return e.code() == grpc.StatusCode.UNAVAILABLE


class FailoverChannel:
    """A channel over several addresses of interchangeable servers; see the module docstring.
    ``addresses``: ``"a:1,b:2"`` or a list; ``options``: gRPC channel options for every channel (with
    :data:`RECONNECT_OPTIONS` added); TLS per ``settings`` (the process's by default)."""

    def __init__(self, addresses: str | Sequence[str], *, options: Sequence[tuple[str, Any]] = (),
                 settings: SecuritySettings | None = None) -> None:
        self.addresses = parse_addresses(addresses)
        opts = with_reconnect_options(options)
        self.channels: list[grpc.aio.Channel] = [open_channel(a, options=opts, settings=settings)
                                                 for a in self.addresses]
        self.preferred = 0

    def __str__(self) -> str:
        return ",".join(self.addresses)

    def order(self) -> list[int]:
        """Indices of the addresses in the order a call tries them: the preferred one first."""
        n = len(self.channels)
        return [(self.preferred + k) % n for k in range(n)]

    def failed(self, index: int) -> None:
        """The address at ``index`` failed a call: prefer the next one (unless another call moved on already)."""
        if self.preferred == index:
            self.preferred = (index + 1) % len(self.channels)

    def answered(self, index: int) -> None:
        self.preferred = index

    # ---- grpc.aio.Channel, as generated stubs use it ----
    def unary_unary(self, method: str, request_serializer=None, response_deserializer=None, **kw: Any):
        return _UnaryUnary(self, [ch.unary_unary(method, request_serializer, response_deserializer, **kw)
                                  for ch in self.channels])

    def unary_stream(self, method: str, request_serializer=None, response_deserializer=None, **kw: Any):
        return _UnaryStream(self, [ch.unary_stream(method, request_serializer, response_deserializer, **kw)
                                   for ch in self.channels])

    def stream_unary(self, method: str, request_serializer=None, response_deserializer=None, **kw: Any):
        return _Preferred(self, [ch.stream_unary(method, request_serializer, response_deserializer, **kw)
                                 for ch in self.channels])

    def stream_stream(self, method: str, request_serializer=None, response_deserializer=None, **kw: Any):
        return _Preferred(self, [ch.stream_stream(method, request_serializer, response_deserializer, **kw)
                                 for ch in self.channels])

    async def close(self, grace: float | None = None) -> None:
        for ch in self.channels:
            await ch.close(grace)

    async def __aenter__(self) -> FailoverChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


class _UnaryUnary:
    def __init__(self, fc: FailoverChannel, callables: list) -> None:
        self._fc = fc
        self._callables = callables

    def __call__(self, request: Any, *, timeout: float | None = None, **kw: Any):
        return self._call(request, timeout, kw)

    async def _call(self, request: Any, timeout: float | None, kw: dict[str, Any]) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        last: grpc.aio.AioRpcError | None = None
        for i in self._fc.order():
            left = _remaining(deadline)
            if last is not None and left is not None and left <= 0:
                break
            try:
                response = await self._callables[i](request, timeout=left, **kw)
            except grpc.aio.AioRpcError as e:
                if not retryable(e):
                    raise
                self._fc.failed(i)
                last = e
                continue
            self._fc.answered(i)
            return response
        assert last is not None
        raise last


class _UnaryStream:
    def __init__(self, fc: FailoverChannel, callables: list) -> None:
        self._fc = fc
        self._callables = callables

    def __call__(self, request: Any, *, timeout: float | None = None, **kw: Any) -> FailoverStreamCall:
        return FailoverStreamCall(self._fc, self._callables, request, timeout, kw)


class FailoverStreamCall:
    """A server-streaming call over a :class:`FailoverChannel`: iterate it (``async for``) or :meth:`read` it
    like a ``grpc.aio.UnaryStreamCall``; :meth:`cancel` cancels it."""

    def __init__(self, fc: FailoverChannel, callables: list, request: Any, timeout: float | None,
                 kw: dict[str, Any]) -> None:
        self._fc = fc
        self._callables = callables
        self._request = request
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._kw = kw
        self._call: grpc.aio.UnaryStreamCall | None = None
        self._messages = self._run()

    async def _run(self) -> AsyncIterator[Any]:
        last: grpc.aio.AioRpcError | None = None
        for i in self._fc.order():
            left = _remaining(self._deadline)
            if last is not None and left is not None and left <= 0:
                break
            self._call = call = self._callables[i](self._request, timeout=left, **self._kw)
            received = False
            try:
                async for message in call:
                    received = True
                    yield message
            except grpc.aio.AioRpcError as e:
                if received or not retryable(e):
                    raise
                self._fc.failed(i)
                last = e
                continue
            self._fc.answered(i)
            return
        assert last is not None
        raise last

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._messages

    async def read(self) -> Any:
        """The next message, or ``grpc.aio.EOF`` after the last."""
        try:
            return await self._messages.__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF

    def cancel(self) -> bool:
        return self._call.cancel() if self._call is not None else False


class _Preferred:
    """A streaming-request call: the preferred address only (a consumed request iterator cannot be replayed)."""

    def __init__(self, fc: FailoverChannel, callables: list) -> None:
        self._fc = fc
        self._callables = callables

    def __call__(self, *args: Any, **kw: Any):
        return self._callables[self._fc.preferred](*args, **kw)
