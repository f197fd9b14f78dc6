"""OpenTelemetry tracing for the chiron services: one span per gRPC call, across router → queue → engine.

Off unless configured. :func:`setup_tracing` reads the standard OpenTelemetry environment variables:

- ``OTEL_SDK_DISABLED=true`` turns everything off, whatever else is set;
- ``OTEL_TRACES_EXPORTER``: a comma-separated list of ``otlp``, ``console`` or ``none``. Unset, tracing is on
  with ``otlp`` only when an endpoint is given (below), and off otherwise (the OpenTelemetry default would be
  ``otlp`` to localhost; a service with no collector should not try);
- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``: where OTLP goes, e.g.
  ``http://jaeger:4317`` (Jaeger takes OTLP natively). ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or its ``_TRACES_``
  form) picks ``grpc`` (default, port 4317) or ``http/protobuf`` (port 4318, endpoint without a path for the
  generic variable: ``/v1/traces`` is appended by the exporter);
- the exporter's and batch processor's other variables (``OTEL_EXPORTER_OTLP_HEADERS``, ``..._INSECURE``,
  ``OTEL_BSP_SCHEDULE_DELAY``, ``OTEL_TRACES_SAMPLER``, ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``…)
  are honoured by the SDK as usual.

When on, it installs a global ``TracerProvider`` (resource ``service.name``) with a ``BatchSpanProcessor`` per
exporter, and instruments ``grpc.aio`` with ``opentelemetry-instrumentation-grpc``: every server gets an
interceptor that opens a SERVER span per RPC (continuing the caller's trace from the W3C ``traceparent``
metadata), and every channel an interceptor that opens a CLIENT span per outgoing call and injects
``traceparent`` into its metadata. The instrumentation patches ``grpc.aio.server`` / ``grpc.aio.insecure_channel``
/ ``grpc.aio.secure_channel``, so call it before any server or channel is created (``chiron <service>`` does so
first thing). etcd (``etcdserverpb.*``), health checking and reflection calls are not traced (nor the services
named in ``OTEL_PYTHON_GRPC_EXCLUDED_SERVICES``, comma-separated).
"""

from __future__ import annotations

import atexit
import logging
import os

log = logging.getLogger(__name__)

_TRUE = ("true", "1", "yes", "on")
_EXCLUDED_PREFIXES = ("etcdserverpb.", "v3electionpb.", "v3lockpb.", "grpc.health.", "grpc.reflection.")

_provider = None  # the TracerProvider installed by setup_tracing, if any
_instrumentors: list = []


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _exporter_names() -> list[str]:
    """The exporters the environment asks for: [] when tracing stays off."""
    if _env("OTEL_SDK_DISABLED").lower() in _TRUE:
        return []
    names = [n.strip().lower() for n in _env("OTEL_TRACES_EXPORTER").split(",") if n.strip()]
    if not names:  # unset: on only when an OTLP endpoint is configured
        names = ["otlp"] if (_env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or _env("OTEL_EXPORTER_OTLP_ENDPOINT")) else []
    return [n for n in names if n != "none"]


def _make_exporter(name: str):
    if name in ("otlp", "otlp_proto_grpc", "otlp_proto_http"):
        protocol = (_env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or _env("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").lower()
        if name == "otlp_proto_http" or (name == "otlp" and protocol.startswith("http")):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

            return HttpExporter()
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, TLS, timeout from OTEL_EXPORTER_OTLP_* variables
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (use otlp, console or none)")


def _rpc_filter():
    """Trace an RPC unless it is etcd, health checking, reflection or an excluded service."""
    from opentelemetry.instrumentation.grpc import filters

    extra = [s.strip() for s in _env("OTEL_PYTHON_GRPC_EXCLUDED_SERVICES").split(",") if s.strip()]
    skip = [filters.service_prefix(p) for p in _EXCLUDED_PREFIXES] + [filters.service_name(s) for s in extra]
    return filters.negate(filters.any_of(*skip))


def setup_tracing(service_name: str) -> bool:
    """Turn on tracing for this process as the environment says (see the module docstring).

    ``service_name`` becomes the resource's ``service.name`` (``OTEL_SERVICE_NAME`` overrides it). Call it once,
    before any ``grpc.aio`` server or channel exists. Returns True when tracing is on (a provider is installed
    and gRPC is instrumented), False when the environment leaves it off; a second call returns whether the
    first one turned it on. Spans are flushed at exit, or by :func:`shutdown_tracing`.
    """
    global _provider
    if _provider is not None:
        return True
    names = _exporter_names()
    if not names:
        return False
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient, GrpcAioInstrumentorServer
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [_make_exporter(n) for n in dict.fromkeys(names)]
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: _env("OTEL_SERVICE_NAME") or service_name}),
                              shutdown_on_exit=False)  # shutdown_tracing does it, once
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    rpc_filter = _rpc_filter()
    for cls in (GrpcAioInstrumentorServer, GrpcAioInstrumentorClient):
        inst = cls(filter_=rpc_filter)
        # The instrumentor ORs its own OTEL_PYTHON_GRPC_EXCLUDED_SERVICES filter with ours, which would let
        # etcd calls through whenever that variable is set: ours already folds it in, so use ours alone.
        inst._filter = rpc_filter
        inst.instrument(tracer_provider=provider)
        _instrumentors.append(inst)
    _provider = provider
    atexit.register(shutdown_tracing)
    log.info("tracing on: service %s, exporters %s", service_name, ", ".join(names))
    return True


def shutdown_tracing() -> None:
    """Export the spans still buffered, stop the exporters and undo the gRPC instrumentation (idempotent)."""
    global _provider
    provider, _provider = _provider, None
    if provider is None:
        return
    for inst in _instrumentors:
        inst.uninstrument()
    _instrumentors.clear()
    try:
        provider.shutdown()  # flushes every BatchSpanProcessor
    except Exception:  # exporting at exit must never turn a clean exit into a crash
        log.exception("flushing spans at exit failed")
