"""No input reads as zero: while the queue's or an engine's stats cannot be read, the scaler holds (no role goes
down) and says why; once the input is back, decisions resume. Real queue service, real simulated engine
agents on loopback, a membership stand-in listing them and a provider stand-in recording its calls.

The fault probe this guards against: with the queue down (``GetStats failed (UNAVAILABLE)``) the scaler read
"queue empty" and drained a BATCH engine that still held 133 finished, unacknowledged results."""

from __future__ import annotations

import math

import pytest

from services.common.membership import InstanceInfo
from services.global_scaler.policy import PolicyConfig, RoleLimits
from services.global_scaler.providers import InstanceCounts, InstanceProvider
from services.global_scaler.server import ScalerService
from services.queue.core import CapacityTracker
from services.queue.server import serve as serve_queue
from services.queue.store import QueueConfig
from tests.conftest import eventually, start_sim_engine

pytestmark = pytest.mark.timeout(120)
# No delay window: a scale-down the policy wants is applied at once, so a held one shows.
CFG = PolicyConfig(interval_s=3600, scale_down_delay_s=0.0, model_load_time_s=5.0, theta_min=0.0, theta_max=0.0,
                   limits={"interactive": RoleLimits(1, 4), "mixed": RoleLimits(0, 0), "batch": RoleLimits(0, 4)})


class Members:
    """Membership stand-in: the engines listed here, all serving."""

    def __init__(self) -> None:
        self.members: dict[str, InstanceInfo] = {}
        self.healthy = True

    def add(self, instance_id: str, role: str, port: int) -> None:
        self.members[instance_id] = InstanceInfo(instance_id=instance_id, role=role, model="llama-3-8b",
                                                 address=f"127.0.0.1:{port}")

    def snapshot(self) -> dict[str, InstanceInfo]:
        return dict(self.members)


class Recorder(InstanceProvider):
    """Provider stand-in: counts are the listed members per role; ``calls`` records (role, count)."""

    name = "recorder"

    def __init__(self, members: Members) -> None:
        self.members = members
        self.calls: list[tuple[str, int]] = []

    async def set_count(self, role: str, count: int, reason: str = "") -> None:
        self.calls.append((role, count))

    async def counts(self, role: str) -> InstanceCounts:
        return InstanceCounts(sum(1 for m in self.members.snapshot().values() if m.role == role))


def roles(d) -> dict[str, tuple[int, int, str]]:
    return {r.role: (r.current, r.desired, r.reason) for r in d.roles}


@pytest.fixture
async def engines():
    started = []

    async def start(instance_id: str, role: str):
        server, _ = await start_sim_engine(instance_id, role)
        started.append(server)
        return server
    yield start
    for s in started:
        await s.stop(grace_s=0.1)


async def two_interactive(engines) -> tuple[Members, object]:
    """Membership listing two INTERACTIVE engines, i1 and i2 (real simulated agents); returns it and i2."""
    members = Members()
    for iid in ("i1", "i2"):
        members.add(iid, "interactive", (server := await engines(iid, "interactive")).port)
    return members, server


async def test_a_stopped_queue_holds_every_role_and_decisions_resume_when_it_returns(tmp_path, engines):
    qcfg = QueueConfig(db_path=str(tmp_path / "queue.db"))
    queue = await serve_queue(qcfg, port=0, capacity=CapacityTracker(prior_throughput_tokens_per_s=50.0))
    members = Members()
    for iid, role in (("i1", "interactive"), ("i2", "interactive"), ("b1", "batch")):
        members.add(iid, role, (await engines(iid, role)).port)
    provider = Recorder(members)
    service = ScalerService(CFG, members, provider, queue=f"127.0.0.1:{queue.port}")
    try:
        # The queue goes down. Idle engines and an unreadable queue: the policy alone would keep 1 INTERACTIVE
        # and no BATCH ("queue empty"). The scaler holds 2 and 1, and says why.
        await queue.stop()
        for _ in range(3):
            d = await service.step()
            got = roles(d)
            assert got["interactive"][:2] == (2, 2) and got["batch"][:2] == (1, 1), got
            for role in ("interactive", "batch"):
                assert got[role][2].startswith("holding: queue stats unavailable (UNAVAILABLE)"), got[role][2]
            assert "queue empty" not in got["batch"][2]
            assert "holding scale-downs: queue stats unavailable" in got["mixed"][2]
            assert math.isnan(d.inputs["queued_requests"]) and math.isnan(d.batch_backpressure)
            assert d.inputs["inputs_unavailable"] == 1.0
        assert provider.calls == []  # nothing drained, nothing asked of the provider

        # The queue returns (same store, same port): decisions resume, and the idle fleet shrinks.
        queue = await serve_queue(qcfg, port=queue.port, capacity=CapacityTracker(prior_throughput_tokens_per_s=50.0))

        async def resumed() -> bool:
            return "holding" not in roles(await service.step())["batch"][2]
        await eventually(resumed, timeout_s=20, interval_s=0.1)
        d = service.latest_decision()
        got = roles(d)
        assert got["interactive"][1] == 1 and got["batch"][1] == 0, got
        assert "queue empty" in got["batch"][2] and d.inputs["queued_requests"] == 0
        assert "inputs_unavailable" not in d.inputs
        assert sorted(provider.calls) == [("batch", 0), ("interactive", 1)]
    finally:
        await service.stop()
        await queue.stop()


async def test_an_engine_without_stats_or_a_stale_membership_holds_and_a_fresh_reading_resumes(engines):
    members, i2 = await two_interactive(engines)
    provider = Recorder(members)
    service = ScalerService(CFG, members, provider)
    try:
        # i2 stops answering but is still listed (its lease has not expired yet): its load is unknown, not 0.
        await i2.stop(grace_s=0.1)
        d = await service.step()
        current, desired, reason = roles(d)["interactive"]
        assert (current, desired) == (2, 2)
        assert reason.startswith("holding: engine stats unavailable: i2 (UNAVAILABLE)"), reason
        assert provider.calls == []

        # Membership itself may be stale (etcd unreachable): hold as well.
        i2b = await engines("i2", "interactive")
        members.add("i2", "interactive", i2b.port)
        members.healthy = False
        d = await service.step()
        assert roles(d)["interactive"][:2] == (2, 2)
        assert "instance membership unavailable" in roles(d)["interactive"][2]
        assert provider.calls == []

        # Every input readable again: the idle second instance goes.
        members.healthy = True
        d = await service.step()
        assert roles(d)["interactive"][1] == 1 and "holding" not in roles(d)["interactive"][2]
        assert provider.calls == [("interactive", 1)]
    finally:
        await service.stop()


class Placed(InstanceProvider):
    """Provider stand-in that places what it is asked for: ``live`` instances answer, the rest of ``count``
    are placed but not serving yet (or dead and still counted, as a provider may count a crashed one)."""

    name = "placed"

    def __init__(self, count: int, live: int) -> None:
        self.count, self.live = count, live
        self.calls: list[tuple[str, int]] = []

    async def set_count(self, role: str, count: int, reason: str = "") -> None:
        self.calls.append((role, count))
        if role == "interactive":
            self.count = count

    async def counts(self, role: str) -> InstanceCounts:
        if role != "interactive":
            return InstanceCounts(0)
        return InstanceCounts(running=self.live, pending=self.count - self.live)


async def test_a_dead_engine_still_listed_holds_the_fleet_without_growing_it(engines):
    # i2 was SIGKILLed: membership lists it until its lease expires, its stats fail, and the provider counts it
    # as placed. Holding "current + pending" (2 + 1) started one more instance every interval (3, 4, 5, ...).
    members, i2 = await two_interactive(engines)
    await i2.stop(grace_s=0.1)
    provider = Placed(count=2, live=1)
    service = ScalerService(CFG, members, provider)
    try:
        for _ in range(4):
            d = await service.step()
            assert roles(d)["interactive"][1] == 2, roles(d)
            assert roles(d)["interactive"][2].startswith("holding: engine stats unavailable: i2"), roles(d)
        assert provider.calls == [], provider.calls
    finally:
        await service.stop()
