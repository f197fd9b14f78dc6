"""A vLLM general plugin: run-time control hooks inside vLLM's engine process.

vLLM (pinned: 0.32.0) has no public API to change the running-request cap of a live engine, or to hold
one request out of the batch and bring it back. Its engine core does run *utility calls* between steps:
``AsyncLLM.engine_core.call_utility_async(name, *args)`` reaches ``getattr(EngineCore, name)(*args)`` in
the engine process (``vllm/v1/engine/core.py``, ``_handle_client_request``). vLLM loads the
``vllm.general_plugins`` entry point ``chiron = "services.engine.vllm_plugin:register"`` (``pyproject.toml``) in
each of its processes; :func:`register` adds these methods to ``EngineCore``:

``chiron_set_max_active(n) -> int``
    The local autoscaler's max batch size: the scheduler admits while ``len(running) <
    max_num_active_reqs`` (``v1/core/sched/scheduler.py``). Clamped to ``[1, max_num_seqs]``
    (``max_num_seqs`` sizes the model runner's buffers, so the engine starts with the largest cap
    allowed). Lowering it does not evict running requests; they finish and are not replaced. The
    per-step token budget stays vLLM's (``max_num_batched_tokens``), not tied to the cap as in the
    simulated engine (``docs/decisions/0043-vllm-budget-not-tied-to-cap.md``).
``chiron_preempt(request_ids) -> list[str]``
    Take requests out of the batch and hold them (MIXED instances make room for interactive work this
    way). vLLM v1 preemption is recompute-style: the request's KV blocks are freed, its generated tokens
    are kept, and on resume its prompt + generated tokens are prefilled again (v1 has no CPU swap; the KV
    offload connectors refuse to run on CPU: ``../shared/notes/vllm-on-cpu.md``).
``chiron_resume(request_ids) -> list[str]``
    Put held requests back at the front of the waiting queue.
``chiron_state() -> dict``
    ``running``, ``waiting``, ``held`` (request-id lists), ``max_active``, ``max_num_seqs``,
    ``kv_cache_usage`` (fraction).

Request ids are the caller's (vLLM appends ``-<8 random chars>`` internally; the hooks map both ways).
These touch private scheduler fields (``running``, ``waiting``, ``max_num_active_reqs``,
``_preempt_request``); ``tests/test_vllm_backend.py`` exercises every hook against the pinned version."""

from __future__ import annotations

import time
from typing import Any

_HELD = "_chiron_held"


def _held(scheduler: Any) -> dict[str, Any]:
    held = getattr(scheduler, _HELD, None)
    if held is None:
        held = {}
        setattr(scheduler, _HELD, held)
    # Requests aborted while held are finished by vLLM's own abort path; forget them.
    for rid in [rid for rid, req in held.items() if req.is_finished() or rid not in scheduler.requests]:
        del held[rid]
    return held


def _external(request_id: str) -> str:
    """vLLM appends ``-<8 random chars>`` to the caller's request id (``InputProcessor.assign_request_id``)."""
    head, sep, tail = request_id.rpartition("-")
    return head if sep and len(tail) == 8 else request_id


def _resolve(sched: Any, request_ids: list[str]) -> list[str]:
    """Internal ids of the scheduler's requests whose caller-side (external) id is in ``request_ids``."""
    wanted = set(request_ids)
    return [rid for rid in sched.requests if rid in wanted or _external(rid) in wanted]


def chiron_set_max_active(self: Any, n: int) -> int:
    sched = self.scheduler
    applied = max(1, min(int(n), int(sched.scheduler_config.max_num_seqs)))
    sched.max_num_active_reqs = applied
    return applied


def chiron_preempt(self: Any, request_ids: list[str]) -> list[str]:
    sched = self.scheduler
    held = _held(sched)
    done: list[str] = []
    request_ids = _resolve(sched, request_ids)
    wanted = set(request_ids)
    running = [r for r in sched.running if r.request_id in wanted]
    if running:
        sched.running = [r for r in sched.running if r.request_id not in wanted]
        for req in running:
            sched._preempt_request(req, time.monotonic())  # frees KV, requeues at the front of waiting
    for rid in request_ids:
        req = sched.requests.get(rid)
        if req is None or req.is_finished() or rid in held:
            continue
        if req in sched.waiting:
            sched.waiting.remove_request(req)
        else:
            continue  # not running, not waiting (e.g. waiting on a remote KV transfer): leave it alone
        held[rid] = req
        done.append(_external(rid))
    return done


def chiron_resume(self: Any, request_ids: list[str]) -> list[str]:
    sched = self.scheduler
    held = _held(sched)
    wanted = set(request_ids)
    resumed = [held.pop(rid) for rid in list(held) if rid in wanted or _external(rid) in wanted]
    for req in reversed(resumed):
        sched.waiting.prepend_request(req)
    return [_external(r.request_id) for r in resumed]


def chiron_state(self: Any) -> dict[str, Any]:
    sched = self.scheduler
    return {
        "running": [_external(r.request_id) for r in sched.running],
        "waiting": [_external(r.request_id) for r in sched.waiting],
        "held": [_external(rid) for rid in _held(sched)],
        "max_active": int(sched.max_num_active_reqs),
        "max_num_seqs": int(sched.scheduler_config.max_num_seqs),
        "token_budget": int(sched.max_num_scheduled_tokens),
        "kv_cache_usage": float(sched.kv_cache_manager.usage),
    }


HOOKS = {f.__name__: f for f in (chiron_set_max_active, chiron_preempt, chiron_resume, chiron_state)}


def register() -> None:
    """vLLM general-plugin entry point: attach the hooks to ``EngineCore`` (idempotent)."""
    from vllm.v1.engine.core import EngineCore

    for name, fn in HOOKS.items():
        setattr(EngineCore, name, fn)
