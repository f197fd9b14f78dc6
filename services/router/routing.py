"""The router's decisions, pure: classify a request (interactive or batch) and choose the instance for an
interactive one. No I/O; the router service feeds them membership and engine stats.

**Classification** (DESIGN.md §1): a named SLO class from config wins (``slo.slo_class``); else an explicit
``request_class``; else the TTFT SLO: up to ``interactive_ttft_max_ms`` (default 60 s) is interactive, longer
is batch; a request with no SLO at all is interactive with the default SLOs.

**Choice**: among the instances serving the model with room (``max_batch_size`` minus running, waiting and the
requests this router sent since their last stats; none while a queue of interactive requests waits there at
least a quarter of its running ones, since then its KV cache or token budget binds before its cap; on a MIXED
instance its batch requests count as room, because it evicts them), in this order of tiers: INTERACTIVE ones and
MIXED ones without batch work, where no queue of interactive requests (≥ 4) waits; INTERACTIVE ones; MIXED ones.
Within a tier the fewest interactive requests waiting (and sent since the last stats) win, then the fewest
running, then the most room: a request behind others' prompts waits for their prefills, whatever the cap
(``docs/decisions/0027``), and every request running beside it lengthens its ITL (``0032``). A MIXED instance
with batch work is used only when the others queue, so it keeps lending its idle share; one without batch work
lends nothing, and leaving it idle only loads the INTERACTIVE ones (``0023``, ``0032``). **Admission**: an
instance is eligible only if its projected TTFT fits the request's TTFT SLO: ``ttft_p50 × (1 + queued /
max_batch_size)`` where ``queued`` counts the requests waiting there (a heuristic: each full batch ahead
costs about one more TTFT). No eligible instance ⇒ the request is refused at once (RESOURCE_EXHAUSTED)
rather than left to wait unboundedly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# Interactive requests waiting for their first token that make a queue rather than the normal moment between an
# arrival and the next iteration (requests). The one threshold of the router's choice, of
# :func:`queue_binds` (router and scaler) and of the MIXED eviction rule (``services.engine.batch_rules.eviction_need``).
INTERACTIVE_QUEUE = 4


def queue_binds(num_running: int, num_waiting: int, max_batch_size: int) -> bool:
    """Whether an instance is bound below its cap (KV cache or token budget): a queue of at least
    max(:data:`INTERACTIVE_QUEUE`, running / 4) requests waits while fewer than ``max_batch_size`` run. A request
    or two waiting is the normal moment between an arrival and the next iteration, not a bound (counts in
    requests). The router asks it of an instance's interactive queue, the scaler
    (:mod:`services.global_scaler.policy`) of its whole queue."""
    return 0 < num_running < max_batch_size and num_waiting >= max(INTERACTIVE_QUEUE, num_running / 4)


@dataclass(frozen=True)
class SloClass:
    ttft_ms: int
    itl_ms: int = 0


@dataclass(frozen=True)
class RouterConfig:
    """``interactive_ttft_max_ms``: TTFT SLOs up to this are interactive [ms]. ``default_ttft_ms`` /
    ``default_itl_ms``: SLOs given to a request that names none [ms]. ``slo_classes``: named SLO classes."""

    interactive_ttft_max_ms: int = 60_000
    default_ttft_ms: int = 10_000
    default_itl_ms: int = 100
    slo_classes: Mapping[str, SloClass] = field(default_factory=lambda: {
        "interactive": SloClass(10_000, 100), "chat": SloClass(2_000, 100),
        "batch": SloClass(3_600_000, 0), "batch-24h": SloClass(86_400_000, 0)})
    max_prompt_tokens: int = 131_072

    def validate(self) -> RouterConfig:
        if self.interactive_ttft_max_ms <= 0 or self.default_ttft_ms <= 0 or self.default_itl_ms < 0:
            raise ValueError("interactive_ttft_max_ms and default_ttft_ms must be > 0, default_itl_ms >= 0")
        for name, c in self.slo_classes.items():
            if c.ttft_ms <= 0 or c.itl_ms < 0:
                raise ValueError(f"SLO class {name!r}: ttft_ms must be > 0 and itl_ms >= 0")
        return self


class Rejected(ValueError):
    """A request the router refuses; ``code`` names the gRPC status."""

    def __init__(self, message: str, code: str = "INVALID_ARGUMENT") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Classified:
    request_class: str  # "interactive" or "batch"
    ttft_ms: int
    itl_ms: int


def classify(cfg: RouterConfig, *, slo_class: str, ttft_ms: int, itl_ms: int, request_class: int) -> Classified:
    """Interactive or batch, with the SLOs that apply. ``request_class``: the proto enum value (0 unspecified,
    1 interactive, 2 batch). Raises :class:`Rejected` for an unknown SLO class, negative SLOs or an unknown
    request class."""
    if ttft_ms < 0 or itl_ms < 0:
        raise Rejected(f"SLO bounds must be >= 0 (ttft_ms={ttft_ms}, itl_ms={itl_ms})")
    if request_class not in (0, 1, 2):
        raise Rejected(f"unknown request_class {request_class}: use INTERACTIVE or BATCH")
    if slo_class:
        c = cfg.slo_classes.get(slo_class)
        if c is None:
            raise Rejected(f"unknown SLO class {slo_class!r}; known: {', '.join(sorted(cfg.slo_classes))}")
        ttft_ms, itl_ms = c.ttft_ms, c.itl_ms
    if not ttft_ms:
        ttft_ms = cfg.default_ttft_ms
    if not itl_ms:
        itl_ms = cfg.default_itl_ms
    if request_class == 1:
        kind = "interactive"
    elif request_class == 2:
        kind = "batch"
    else:
        kind = "interactive" if ttft_ms <= cfg.interactive_ttft_max_ms else "batch"
    return Classified(kind, ttft_ms, itl_ms)


@dataclass(frozen=True)
class EngineStatsView:
    """The fields of an engine's stats (``chiron.v1.EngineStats``, same names) that the router and the global
    scaler read: the services pass the message itself, the fleet simulator this view of a simulated engine.
    Counts in requests (``*_total`` cumulative); ``ttft_p50_ms``: median TTFT of recent requests, 0 when none."""

    max_batch_size: int = 0
    num_running: int = 0
    num_waiting: int = 0
    finished_requests_total: int = 0
    num_batch_requests: int = 0  # batch requests leased from the queue among running + waiting
    batch_finished_total: int = 0
    ttft_p50_ms: float = 0.0
    interactive_prompt_tokens_mean: float = 0.0  # tokens, 0 when none (the scaler's TTFT bound reads it)


@dataclass(frozen=True)
class InstanceLoad:
    """An instance as the router sees it: membership (role, address, model) plus its last engine stats and the
    requests this router dispatched to it since (``pending``). Counts in requests, times in ms."""

    instance_id: str
    role: str
    address: str
    model: str
    max_batch_size: int = 0
    num_running: int = 0
    num_waiting: int = 0
    ttft_p50_ms: float = 0.0
    pending: int = 0
    batch_requests: int = 0  # batch requests a MIXED instance serves (evictable for interactive work)

    @property
    def interactive_waiting(self) -> int:
        """Interactive requests waiting there at its last stats (a MIXED instance's batch requests excluded)."""
        return max(0, self.num_waiting - (self.batch_requests if self.role == "mixed" else 0))

    @property
    def room(self) -> int:
        """Interactive requests it can start now: its cap minus running, waiting and pending requests (batch
        requests on a MIXED instance count as room: they are evicted). An instance where a queue of interactive
        requests (≥ max(4, running / 4)) waits below its cap is bound by its KV cache or token budget: no room."""
        evictable = self.batch_requests if self.role == "mixed" else 0
        free = self.max_batch_size - self.num_running - self.num_waiting - self.pending + evictable
        return min(free, 0) if self._bound else free

    @property
    def queued(self) -> bool:
        """A queue of interactive requests (at least :data:`INTERACTIVE_QUEUE`) waits here: a new one would wait
        behind them."""
        return self.interactive_waiting >= INTERACTIVE_QUEUE

    @property
    def _bound(self) -> bool:
        # Interactive requests queue below the cap.
        return queue_binds(self.num_running, self.interactive_waiting, self.max_batch_size)

    def projected_ttft_ms(self) -> float:
        waiting = self.interactive_waiting + self.pending
        if self._bound:  # not admitting: everything waiting is ahead
            queued = waiting
        else:
            queued = max(0, waiting - max(0, self.max_batch_size - self.num_running))
        return self.ttft_p50_ms * (1 + queued / max(self.max_batch_size, 1))


def instance_load(instance_id: str, role: str, address: str, model: str, stats: EngineStatsView) -> InstanceLoad:
    """The router's view of a serving instance from its membership and engine stats (``stats``: an
    :class:`EngineStatsView` or ``chiron.v1.EngineStats``). Used by the router service and the simulator."""
    return InstanceLoad(instance_id, role, address, model, stats.max_batch_size, stats.num_running,
                        stats.num_waiting, stats.ttft_p50_ms, batch_requests=stats.num_batch_requests)


def choose_instance(instances: Iterable[InstanceLoad], model: str, ttft_slo_ms: float) -> InstanceLoad:
    """The instance for an interactive request (module docstring). Raises :class:`Rejected` with UNAVAILABLE
    when no instance serves ``model``, RESOURCE_EXHAUSTED when none can start it within ``ttft_slo_ms``."""
    serving = [i for i in instances if i.model == model and i.role in ("interactive", "mixed")]
    if not serving:
        raise Rejected(f"no interactive or mixed instance serves model {model!r} right now; retry later", "UNAVAILABLE")
    eligible = [i for i in serving if i.projected_ttft_ms() <= ttft_slo_ms]
    with_room = [i for i in eligible if i.room > 0]
    tiers = (
        lambda i: not i.queued and (i.role == "interactive" or i.batch_requests == 0),
        lambda i: i.role == "interactive",
        lambda i: i.role == "mixed",
    )
    for tier in tiers:
        cands = [i for i in with_room if tier(i)]
        if cands:
            return max(cands, key=lambda i: (-(i.interactive_waiting + i.pending), -(i.num_running + i.pending),
                                             i.room, i.instance_id))
    if eligible:  # no room anywhere but the projected TTFT still fits: the least loaded one queues it
        return min(eligible, key=lambda i: (i.projected_ttft_ms(), -i.room, i.instance_id))
    best = min(serving, key=lambda i: i.projected_ttft_ms())
    raise Rejected(f"no capacity to start this request within its TTFT SLO of {ttft_slo_ms:.0f} ms (best projected "
                   f"{best.projected_ttft_ms():.0f} ms on {best.instance_id}); retry later or relax the SLO",
                   "RESOURCE_EXHAUSTED")
