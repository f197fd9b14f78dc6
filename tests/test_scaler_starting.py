"""The scaler counts instances a provider has placed but that have not registered yet as starting.

Nomad reports an allocation "running" once its process starts, while the engine still loads and is not in etcd
membership. Found by ``chiron deploy rehearse``: the scaler set the BATCH group to 1 and stopped it again a second
later, because that instance was neither current (unregistered) nor starting (not Nomad-pending), so lowering the
count skipped the scale-down delay window.
"""

from __future__ import annotations

from dataclasses import replace

from services.global_scaler.policy import PolicyConfig, RoleLimits
from services.global_scaler.providers import InstanceCounts, InstanceProvider
from services.global_scaler.server import ScalerService


class NoMembers:
    """Membership with nobody registered (the placed engine is still loading)."""

    healthy = True

    def snapshot(self) -> dict:
        return {}


class ProcessStartedProvider(InstanceProvider):
    """Nomad's view without Nomad: every instance asked for is "running" (its process started) at once."""

    name = "standin"

    def __init__(self) -> None:
        self.count = {"interactive": 0, "mixed": 0, "batch": 0}
        self.calls: list[tuple[str, int]] = []

    async def set_count(self, role: str, count: int, reason: str = "") -> None:
        self.calls.append((role, count))
        self.count[role] = count

    async def counts(self, role: str) -> InstanceCounts:
        return InstanceCounts(running=self.count[role])


async def test_a_placed_engine_that_has_not_registered_is_not_stopped_before_the_delay():
    t = [0.0]
    cfg = PolicyConfig(interval_s=1.0, scale_down_delay_s=120.0,
                       limits={"interactive": RoleLimits(1, 4), "mixed": RoleLimits(0, 4), "batch": RoleLimits(0, 4)})
    provider = ProcessStartedProvider()
    service = ScalerService(cfg, NoMembers(), provider, clock=lambda: t[0])
    await service.step()
    assert provider.calls == [("interactive", 1)]
    # The minimum drops to 0 (as if demand had gone) while the placed engine still loads: the delay window holds it.
    service.config = replace(cfg, limits={**cfg.limits, "interactive": RoleLimits(0, 4)})
    for k in range(1, 5):
        t[0] = float(k)
        d = await service.step()
        assert provider.calls == [("interactive", 1)], d
    # Past the delay window the scale-down goes through.
    t[0] = 200.0
    await service.step()
    assert provider.calls[-1] == ("interactive", 0)
