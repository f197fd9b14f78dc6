"""Prometheus metrics of the Chiron services: every metric is defined here, with its unit, and served on /metrics.

Each service object owns one :class:`ServiceMetrics` subclass with its own ``prometheus_client`` registry
(:class:`RouterMetrics`, :class:`QueueMetrics`, :class:`ScalerMetrics`, :class:`EngineMetrics`), so several
services can share a process (tests) without clashing. :func:`serve_metrics` exposes a registry over HTTP
(``chiron <service> --metrics-port PORT``); without it nothing is served and the counters cost a few
microseconds per request.

Names follow the Prometheus conventions: ``chiron_`` prefix, base units (seconds, ratios 0..1, tokens),
``_total`` counters. Label ``instance_id`` (not ``instance``, which Prometheus sets to the scrape target).

The metrics each service exports, with their labels and units, are listed in the docstrings of
:func:`_request_families` (router and queue), :class:`QueueMetrics`, :class:`ScalerMetrics` and
:class:`EngineMetrics`; ``docs/operations.md`` lists their names.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from chiron.v1 import queue_pb2, types_pb2

log = logging.getLogger("chiron.metrics")

# TTFT spans interactive (tens of ms to a minute) and batch requests (minutes to a day) [s].
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 1800.0,
                  3600.0, 7200.0, 14400.0, 43200.0, 86400.0)
# ITL: a decode step takes milliseconds to a few hundred ms [s].
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

OUTCOMES = ("ok", "rejected", "error", "cancelled")
_REJECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE}


def outcome_of(code: grpc.StatusCode) -> str:
    """The ``outcome`` label of a request that failed with gRPC status ``code``: ``cancelled`` for CANCELLED,
    ``rejected`` for admission control and bad requests, ``error`` for everything else."""
    if code == grpc.StatusCode.CANCELLED:
        return "cancelled"
    return "rejected" if code in _REJECTED else "error"


class _StateCollector(Collector):
    """Metric families read from a service's state at scrape time, on the service's event loop.

    The HTTP server answers scrapes on its own threads, while the service's state belongs to its asyncio event loop:
    ``read`` runs there (``run_coroutine_threadsafe``), so it sees a consistent state. Before a loop is bound, or
    when called on the loop itself, ``read`` runs directly. A read that fails or takes longer than ``timeout_s``
    [s] (loop stopped or blocked) is logged and leaves these families out of that scrape; the counters and
    histograms of the registry are still served.
    """

    def __init__(self, read: Callable[[], Iterable], timeout_s: float = 5.0) -> None:
        self.read = read
        self.timeout_s = timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None

    async def _read(self) -> list:
        return list(self.read())

    def collect(self):
        loop = self.loop
        try:
            if loop is None or _running_loop() is loop:
                return list(self.read())
            fut = asyncio.run_coroutine_threadsafe(self._read(), loop)
            try:
                return fut.result(timeout=self.timeout_s)
            except TimeoutError:
                fut.cancel()
                log.warning("metrics: service state not read within %g s (event loop busy or stopped)", self.timeout_s)
                return []
        except Exception:  # a scrape must not fail because the service is stopping
            log.exception("metrics: reading the service state failed")
            return []


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class ServiceMetrics:
    """One service's metrics in its own :class:`~prometheus_client.CollectorRegistry` (``registry``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._state: list[_StateCollector] = []

    def _read_at_scrape(self, read: Callable[[], Iterable]) -> None:
        c = _StateCollector(read)
        self.registry.register(c)
        self._state.append(c)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the service's state on ``loop`` (the loop that runs the service) when scraped from another thread."""
        for c in self._state:
            c.loop = loop


def _request_families(registry: CollectorRegistry) -> tuple[Counter, Histogram, Counter]:
    """The request families in ``registry``: (requests, TTFT, SLO met).

    Requests (router and queue; one name, each process exports the label values it sees; sum over jobs):

    - ``chiron_requests_total{class, outcome}`` counter: requests that reached a final outcome. ``class``:
      ``interactive`` | ``batch``; ``outcome``: ``ok`` | ``rejected`` (admission control, invalid request) |
      ``error`` | ``cancelled``. Interactive requests are counted by the router when their stream ends; batch
      ones by the router when ``Submit`` fails (rejected, error) and by the queue when acked (ok) or cancelled.
    - ``chiron_request_ttft_seconds{class}`` histogram [s]: time to first token. Interactive: router arrival to
      the first chunk with tokens (router); batch: queue arrival to the first lease (queue), as in replay reports.
    - ``chiron_request_itl_seconds{class}`` histogram [s]: time between successive chunks of one interactive
      stream (router; one token per chunk from the engines).
    - ``chiron_slo_met_total{class}`` counter: requests that met their SLO. Interactive: a stream that ended ok
      with TTFT ≤ its TTFT SLO and mean ITL ≤ its ITL SLO; batch: first lease by its deadline (arrival + TTFT SLO),
      counted at that lease. SLO attainment = ``rate(chiron_slo_met_total) / rate(chiron_requests_total)`` by class
      (batch: over windows longer than a request's service time).
    """
    requests = Counter("chiron_requests_total", "Requests that reached a final outcome, by class (interactive, batch) and "
                       "outcome (ok, rejected, error, cancelled) [requests].", ["class", "outcome"], registry=registry)
    ttft = Histogram("chiron_request_ttft_seconds", "Time to first token [s]: interactive from router arrival to the first "
                     "token, batch from queue arrival to the first lease.", ["class"], buckets=TTFT_BUCKETS_S,
                     registry=registry)
    slo_met = Counter("chiron_slo_met_total", "Requests that met their SLO (interactive: TTFT and mean ITL; batch: first "
                      "lease by the TTFT deadline) [requests].", ["class"], registry=registry)
    return requests, ttft, slo_met


class RouterMetrics(ServiceMetrics):
    """The router's request counters and TTFT/ITL histograms (:func:`_request_families`)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests, self.ttft, self.slo_met = _request_families(self.registry)
        self.itl = Histogram("chiron_request_itl_seconds", "Time between successive chunks of one interactive token stream "
                             "(one token per chunk) [s].", ["class"], buckets=ITL_BUCKETS_S, registry=self.registry)
        self._ttft_i = self.ttft.labels("interactive")
        self._itl_i = self.itl.labels("interactive")
        self._met_i = self.slo_met.labels("interactive")
        self._ok_i = self.requests.labels("interactive", "ok")

    def count(self, request_class: str, outcome: str) -> None:
        """One request of ``request_class`` ended with ``outcome`` (before or without a stream)."""
        self.requests.labels(request_class, outcome).inc()

    def stream(self, start_s: float, ttft_slo_s: float, itl_slo_s: float) -> StreamTimer:
        """A timer for one interactive stream that arrived at ``start_s`` (``time.monotonic()`` seconds) with the
        given SLOs [s; 0 = no bound]."""
        return StreamTimer(self, start_s, ttft_slo_s, itl_slo_s)


class StreamTimer:
    """TTFT and ITL of one interactive stream. Call :meth:`chunk` for every chunk that carries tokens and
    :meth:`finish` once with the outcome."""

    __slots__ = ("_m", "_start", "_last", "_ttft", "_itl_sum", "_itl_n", "_ttft_slo", "_itl_slo")

    def __init__(self, metrics: RouterMetrics, start_s: float, ttft_slo_s: float, itl_slo_s: float) -> None:
        self._m = metrics
        self._start = start_s
        self._last: float | None = None
        self._ttft = math.inf
        self._itl_sum = 0.0
        self._itl_n = 0
        self._ttft_slo = ttft_slo_s or math.inf
        self._itl_slo = itl_slo_s or math.inf

    def chunk(self, now_s: float | None = None) -> None:
        """A chunk with tokens arrived at ``now_s`` (``time.monotonic()`` seconds; default now)."""
        now = time.monotonic() if now_s is None else now_s
        if self._last is None:
            self._ttft = now - self._start
            self._m._ttft_i.observe(self._ttft)
        else:
            gap = now - self._last
            self._itl_sum += gap
            self._itl_n += 1
            self._m._itl_i.observe(gap)
        self._last = now

    def finish(self, outcome: str) -> None:
        """The stream ended with ``outcome`` (one of :data:`OUTCOMES`); counts it and whether it met its SLO."""
        if outcome != "ok":
            self._m.count("interactive", outcome)
            return
        self._m._ok_i.inc()
        mean_itl = self._itl_sum / self._itl_n if self._itl_n else 0.0
        if self._ttft <= self._ttft_slo and mean_itl <= self._itl_slo:
            self._m._met_i.inc()


class QueueMetrics(ServiceMetrics):
    """The queue's batch request counters, batch TTFT (:func:`_request_families`) and per-group gauges.
    ``stats``: the service's current :class:`chiron.v1.QueueStats` (called on the service's loop at scrape time).

    Queue (groups read from the service's state at scrape time; a group that empties out disappears):

    - ``chiron_queue_requests{group, model, state}`` gauge [requests], ``state``: ``queued`` | ``leased``;
    - ``chiron_queue_estimated_wait_seconds{group, model, stat}`` gauge [s]: estimated wait until the group's last
      queued request starts, ``stat``: ``mean`` | ``p95`` (+Inf while the serving capacity is unknown);
    - ``chiron_queue_group_slack_seconds{group, model}`` gauge [s]: deadline − now − wait p95 (< 0: a projected
      TTFT SLO violation); ``chiron_queue_group_deadline_timestamp_seconds{group, model}`` gauge [Unix s];
    - ``chiron_queue_capacity_tokens_per_second{model}`` / ``chiron_queue_capacity_slots{model}`` gauges: batch
      serving capacity the estimates assume (output tokens/s; concurrent leases);
    - ``chiron_queue_enqueued_total{model}``, ``chiron_queue_returned_total{model}`` (given back by an engine:
      eviction, drain) counters [requests].
    """

    def __init__(self, stats: Callable[[], queue_pb2.QueueStats]) -> None:
        super().__init__()
        requests, ttft, slo_met = _request_families(self.registry)
        self._ok = requests.labels("batch", "ok")
        self._cancelled = requests.labels("batch", "cancelled")
        self._ttft = ttft.labels("batch")
        self._met = slo_met.labels("batch")
        self.enqueued = Counter("chiron_queue_enqueued_total", "Batch requests accepted into the queue [requests].",
                                ["model"], registry=self.registry)
        self.returned = Counter("chiron_queue_returned_total", "Leased requests an engine gave back (eviction, drain) "
                                "[requests].", ["model"], registry=self.registry)
        self._read_at_scrape(lambda: queue_families(stats()))

    def first_lease(self, wait_s: float, slo_met: bool) -> None:
        """A request was leased for the first time ``wait_s`` [s] after its arrival; ``slo_met``: by its deadline."""
        self._ttft.observe(max(0.0, wait_s))
        if slo_met:
            self._met.inc()

    def done(self) -> None:
        """A batch request was acked."""
        self._ok.inc()

    def cancelled(self) -> None:
        """A queued or leased batch request was cancelled."""
        self._cancelled.inc()


def queue_families(stats: queue_pb2.QueueStats) -> list:
    """The queue's per-group and per-model gauges from one :class:`chiron.v1.QueueStats`."""
    gl = ["group", "model"]
    requests = GaugeMetricFamily("chiron_queue_requests", "Requests per request group, queued or leased [requests].",
                                 labels=[*gl, "state"])
    wait = GaugeMetricFamily("chiron_queue_estimated_wait_seconds", "Estimated wait until the group's last queued request "
                             "starts, mean and p95 [s].", labels=[*gl, "stat"])
    slack = GaugeMetricFamily("chiron_queue_group_slack_seconds", "Group deadline - now - estimated wait p95; negative "
                              "means a projected TTFT SLO violation [s].", labels=gl)
    deadline = GaugeMetricFamily("chiron_queue_group_deadline_timestamp_seconds", "Earliest deadline of the group's "
                                 "requests [Unix time, s].", labels=gl)
    tput = GaugeMetricFamily("chiron_queue_capacity_tokens_per_second", "Batch serving capacity the estimates assume "
                             "[output tokens/s].", labels=["model"])
    slots = GaugeMetricFamily("chiron_queue_capacity_slots", "Concurrent leases the estimates assume [requests].",
                              labels=["model"])
    for g in stats.groups:
        key = [g.group_id, g.model]
        requests.add_metric([*key, "queued"], g.size)
        requests.add_metric([*key, "leased"], g.leased)
        wait.add_metric([*key, "mean"], g.estimated_wait_mean_s)
        wait.add_metric([*key, "p95"], g.estimated_wait_p95_s)
        slack.add_metric(key, g.slack_s)
        deadline.add_metric(key, g.deadline.ToNanoseconds() / 1e9)
    for c in stats.capacity:
        tput.add_metric([c.model], c.throughput_tokens_per_s)
        slots.add_metric([c.model], c.slots)
    return [requests, wait, slack, deadline, tput, slots]


class _RoleDecision(Protocol):
    role: str
    current: int
    wanted: float
    desired: int
    code: str


class ScalerMetrics(ServiceMetrics):
    """The global scaler's last decision per role.

    Scaler (set at every decision):

    - ``chiron_scaler_desired_instances{role, reason}`` gauge [instances]: the last decision's desired count; one
      series per role, ``reason`` the short code of what shaped it (:data:`services.global_scaler.policy.REASON_CODES`);
    - ``chiron_scaler_running_instances{role}`` gauge [instances]: instances serving when it decided;
    - ``chiron_scaler_wanted_instances{role}`` gauge [instances]: what the load asks for before rounding and limits;
    - ``chiron_scaler_decisions_total{role, reason}``, ``chiron_scaler_provider_errors_total{role}`` counters;
    - ``chiron_scaler_overprovisioning_ratio`` (Θ) and ``chiron_scaler_batch_backpressure`` (BBP) gauges [ratio].
    """

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.desired = Gauge("chiron_scaler_desired_instances", "Desired instances of the role in the last decision, with "
                             "the code of what shaped it [instances].", ["role", "reason"], registry=r)
        self.running = Gauge("chiron_scaler_running_instances", "Instances of the role serving at the last decision "
                             "[instances].", ["role"], registry=r)
        self.wanted = Gauge("chiron_scaler_wanted_instances", "Instances of the role the load asks for before rounding, "
                            "limits and the scale-down delay [instances].", ["role"], registry=r)
        self.decisions = Counter("chiron_scaler_decisions_total", "Scaling decisions per role, by the code of what shaped "
                                 "them [decisions].", ["role", "reason"], registry=r)
        self.provider_errors = Counter("chiron_scaler_provider_errors_total", "Instance provider calls that failed "
                                       "[calls].", ["role"], registry=r)
        self.theta = Gauge("chiron_scaler_overprovisioning_ratio", "Over-provisioning level Θ of interactive capacity "
                           "[ratio].", registry=r)
        self.bbp = Gauge("chiron_scaler_batch_backpressure", "Batch backpressure: max over groups of wait p95 / time "
                         "left, minus 1 [ratio].", registry=r)
        self._reason: dict[str, str] = {}

    def decision(self, roles: Iterable[_RoleDecision], theta: float, batch_backpressure: float) -> None:
        """Record one decision: per role its counts and reason code (the series of a role's previous reason go)."""
        for d in roles:
            old = self._reason.get(d.role)
            self.desired.labels(d.role, d.code).set(d.desired)
            if old is not None and old != d.code:
                self.desired.remove(d.role, old)
            self._reason[d.role] = d.code
            self.running.labels(d.role).set(d.current)
            self.wanted.labels(d.role).set(d.wanted)
            self.decisions.labels(d.role, d.code).inc()
        self.theta.set(theta)
        self.bbp.set(batch_backpressure)


_ROLE_LABEL = {v: k.removeprefix("INSTANCE_ROLE_").lower() for k, v in types_pb2.InstanceRole.items()}


class EngineMetrics(ServiceMetrics):
    """One engine agent's gauges and counters, read from ``stats`` (its current :class:`chiron.v1.EngineStats`,
    called on the agent's loop at scrape time).

    Engine (one engine per process; read from the agent at scrape time; labels ``instance_id, role, model``):

    - gauges ``chiron_engine_max_batch_size`` (the local autoscaler's current cap), ``chiron_engine_running_requests``,
      ``chiron_engine_waiting_requests``, ``chiron_engine_batch_requests`` [requests];
      ``chiron_engine_kv_cache_usage_ratio`` [0..1]; ``chiron_engine_kv_cache_capacity_tokens`` [tokens];
      ``chiron_engine_throughput_tokens_per_second``; ``chiron_engine_window_itl_seconds{quantile}`` and
      ``chiron_engine_window_ttft_seconds{quantile}`` [s] over the agent's stats window; ``chiron_engine_itl_slo_seconds``;
      ``chiron_engine_latency_backpressure_ratio`` and ``chiron_engine_throughput_backpressure_ratio``;
    - counters ``chiron_engine_preemptions_total``, ``chiron_engine_generated_tokens_total`` [tokens],
      ``chiron_engine_finished_requests_total``, ``chiron_engine_batch_finished_requests_total`` [requests],
      ``chiron_engine_late_control_steps_total`` (local-autoscaler steps over 3 intervals late: a stalled agent or engine).
    """

    def __init__(self, stats: Callable[[], types_pb2.EngineStats]) -> None:
        super().__init__()
        self._read_at_scrape(lambda: engine_families(stats()))


def engine_families(s: types_pb2.EngineStats) -> list:
    """The engine's metric families from one :class:`chiron.v1.EngineStats`."""
    labels = ["instance_id", "role", "model"]
    key = [s.instance_id, _ROLE_LABEL.get(s.role, "unspecified"), s.model]
    out = []

    def gauge(name: str, doc: str, value: float) -> None:
        out.append(GaugeMetricFamily(name, doc, labels=labels))
        out[-1].add_metric(key, value)

    def counter(name: str, doc: str, value: float) -> None:
        out.append(CounterMetricFamily(name, doc, labels=labels))
        out[-1].add_metric(key, value)

    gauge("chiron_engine_max_batch_size", "Maximum batch size the local autoscaler set [requests].", s.max_batch_size)
    gauge("chiron_engine_running_requests", "Requests in the running batch [requests].", s.num_running)
    gauge("chiron_engine_waiting_requests", "Requests waiting for admission [requests].", s.num_waiting)
    gauge("chiron_engine_batch_requests", "Batch requests leased from the queue and served here [requests].",
          s.num_batch_requests)
    gauge("chiron_engine_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use [0..1].", s.kv_cache_usage)
    gauge("chiron_engine_kv_cache_capacity_tokens", "KV-cache capacity [tokens].", s.kv_cache_capacity_tokens)
    gauge("chiron_engine_throughput_tokens_per_second", "Output-token throughput over the stats window [tokens/s].",
          s.throughput_tokens_per_s)
    counter("chiron_engine_late_control_steps_total", "Local-autoscaler control steps over 3 intervals late (the agent or "
            "the engine stalled; the max batch size held meanwhile) [steps].", s.late_control_steps_total)
    gauge("chiron_engine_itl_slo_seconds", "ITL SLO the local autoscaler holds [s].", s.itl_slo_ms / 1e3)
    gauge("chiron_engine_latency_backpressure_ratio", "Latest latency backpressure: observed ITL / ITL SLO [ratio].",
          s.latency_backpressure)
    gauge("chiron_engine_throughput_backpressure_ratio", "Latest throughput backpressure: previous / current "
          "throughput [ratio].", s.throughput_backpressure)
    q = GaugeMetricFamily("chiron_engine_window_itl_seconds", "Inter-token latency quantiles over the stats window [s].",
                          labels=[*labels, "quantile"])
    q.add_metric([*key, "0.5"], s.itl_p50_ms / 1e3)
    q.add_metric([*key, "0.95"], s.itl_p95_ms / 1e3)
    t = GaugeMetricFamily("chiron_engine_window_ttft_seconds", "Time-to-first-token median over the stats window [s].",
                          labels=[*labels, "quantile"])
    t.add_metric([*key, "0.5"], s.ttft_p50_ms / 1e3)
    out += [q, t]
    counter("chiron_engine_preemptions_total", "Requests preempted by the engine [preemptions].", s.num_preemptions_total)
    counter("chiron_engine_generated_tokens_total", "Output tokens generated [tokens].", s.generated_tokens_total)
    counter("chiron_engine_finished_requests_total", "Requests finished [requests].", s.finished_requests_total)
    counter("chiron_engine_batch_finished_requests_total", "Batch requests finished and acked [requests].",
            s.batch_finished_total)
    return out


@dataclass
class MetricsServer:
    """A running /metrics endpoint (``port``: the bound port)."""

    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5.0)


async def serve_metrics(metrics: ServiceMetrics, host: str, port: int, port_file: str | Path | None = None) -> MetricsServer:
    """Serve ``metrics`` at ``http://host:port/metrics`` (Prometheus text format) from a background thread.

    Call it from the event loop that runs the service: state gauges are read on that loop. ``port`` 0 picks a free
    port; the bound port is written to ``port_file`` when given. Raises OSError when the address cannot be bound."""
    metrics.bind(asyncio.get_running_loop())
    httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    bound = int(httpd.server_port)
    if port_file:
        Path(port_file).write_text(str(bound))
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return MetricsServer(bound, httpd, thread)
