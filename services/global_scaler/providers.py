"""Instance providers: how the global scaler's desired counts become running engine instances.

A provider makes the number of engine instances of one role (``interactive``, ``mixed``, ``batch``) converge
to a desired count and reports what it sees running. The scaler never calls a provider in advisory mode.

* ``local`` — ``chiron engine`` processes on this machine (:mod:`services.global_scaler.local_provider`);
* ``nomad`` — an engine task group per role scaled through Nomad's job scale API
  (:mod:`services.global_scaler.nomad`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

ROLES = ("interactive", "mixed", "batch")


class ProviderError(RuntimeError):
    """A provider could not carry out a change (after its retries); the message says what failed and why."""


@dataclass(frozen=True)
class InstanceCounts:
    """Instances of one role as the provider sees them: ``running`` (serving) and ``pending`` (placed or
    starting, not serving yet). Counts of instances, not GPUs."""

    running: int
    pending: int = 0

    @property
    def total(self) -> int:
        return self.running + self.pending


class InstanceProvider(abc.ABC):
    """Places and removes engine instances. Implementations are asyncio-friendly and retry transient failures
    with backoff before raising :class:`ProviderError`."""

    name: str = "abstract"

    @abc.abstractmethod
    async def set_count(self, role: str, count: int, reason: str = "") -> None:
        """Ask for ``count`` instances of ``role`` (ValueError for an unknown role or a negative count).
        Returns once the request is accepted (instances may still be starting or draining)."""

    @abc.abstractmethod
    async def counts(self, role: str) -> InstanceCounts:
        """What runs now for ``role``."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (HTTP sessions, child processes as the provider's policy says)."""
