"""The batch worker's leasing and eviction rules, pure (DESIGN.md §1 "Batch path" and "Eviction").

:class:`~services.engine.batch_worker.BatchWorker` applies them to a live backend's snapshot; the fleet
simulator applies the same functions to its simulated instances. Counts are in requests.
"""

from __future__ import annotations

from services.router.routing import INTERACTIVE_QUEUE

EVICTED_FOR_INTERACTIVE = "evicted for interactive load"  # the reason a MIXED instance's eviction returns with
DRAINING = "engine draining"  # the reason a drained engine's batch requests return with


def lease_room(max_batch_size: int, num_running: int, num_waiting: int, prefetch: int = 8) -> int:
    """Batch requests an engine may lease now (requests, ≥ 0): what its cap leaves,
    ``max_batch_size − running − waiting``, but no more than keeps ``prefetch`` requests waiting in the engine.

    Work the engine cannot start yet (its KV cache is full, or its token budget admits a few prompts per
    iteration) stays in the global queue, where the waiting-time estimator and the scaler see it and another
    instance can take it, rather than in one engine's waiting list. The caller returns 0 instead on a MIXED
    instance while interactive work waits for admission, and while draining.
    """
    return max(0, min(max_batch_size - num_running - num_waiting, prefetch - num_waiting))


def eviction_need(n: int, max_batch_size: int, num_running: int, num_waiting: int, interactive_waiting: int = 0) -> int:
    """Batch requests a MIXED instance must evict so that ``n`` more interactive requests start now (requests,
    may be ≤ 0): what the cap needs, ``running + waiting + n − max_batch_size``, at most ``n``; or ``n`` when
    ``interactive_waiting`` (interactive requests already here without their first token, the ``n`` not
    counted) is at least :data:`~services.router.routing.INTERACTIVE_QUEUE`: then the KV cache or the token
    budget binds below the cap, and batch work is holding it (``docs/decisions/0040-eviction-below-the-cap.md``).
    """
    at_cap = min(n, num_running + num_waiting + n - max_batch_size)
    if at_cap <= 0 and interactive_waiting >= INTERACTIVE_QUEUE:
        return n
    return at_cap


def eviction_order(submitted: bool, tokens: int, started_s: float) -> tuple[bool, int, float]:
    """Sort key of eviction victims: leases not yet handed to the engine first, then the least progress
    (fewest output tokens), then the newest (``started_s``: when the lease began, any clock)."""
    return (submitted, tokens, -started_s)


__all__ = ["DRAINING", "EVICTED_FOR_INTERACTIVE", "eviction_need", "eviction_order", "lease_room"]
