"""Nomad instance provider: one task group per engine role, scaled through Nomad's HTTP API.

The engine job (``deploy/nomad/chiron-engine.nomad.hcl``) has a task group per role: ``engine-interactive``,
``engine-mixed`` and ``engine-batch``, each with a ``scaling`` block whose ``min``/``max`` bound the count.
:class:`NomadProvider` talks to three endpoints:

* ``POST /v1/job/<job_id>/scale`` with ``{"Count": n, "Target": {"Group": group}, "Message": reason}``: Nomad
  records the new count as a new job version and schedules (or stops) allocations. Nomad refuses a count outside
  the group's scaling min/max with HTTP 400 ("group count was greater than scaling policy maximum: 40 > 32"),
  and any scale request while the job has an active deployment (HTTP 400, "job scaling blocked due to active
  deployment"; the engine groups use ``update { max_parallel = 0 }`` so scaling never starts one).
* ``GET /v1/job/<job_id>/allocations``: an allocation of the role's group counts as *pending* while its
  ``ClientStatus`` is ``pending`` (placed, task starting) and *running* once it is ``running``; ``complete``,
  ``failed``, ``lost`` and ``unknown`` allocations are ignored, and so, by default, are allocations Nomad already
  wants stopped (``DesiredStatus`` other than ``run``: an engine draining after a scale-down).

* ``GET /v1/job/<job_id>``: the groups' counts and scaling bounds. Nomad's allocations endpoint answers ``[]`` for
  a job it does not know, so the provider looks the job up before the first :meth:`NomadProvider.counts` (404 →
  error; a role's group missing → error); :meth:`NomadProvider.set_count` reads it to send nothing when the group
  already has the count (see ``skip_unchanged``).

Errors: a 4xx answer other than 429 raises :class:`NomadApiError` (a :class:`ProviderError`) at once with Nomad's
message; 429, 5xx, timeouts and connection failures are retried with exponential backoff (``max_retries`` times)
and then raise :class:`NomadApiError`.

API reference: https://developer.hashicorp.com/nomad/api-docs/jobs#scale-task-group and
https://developer.hashicorp.com/nomad/api-docs/jobs#list-job-allocations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from services.global_scaler.providers import ROLES, InstanceCounts, InstanceProvider, ProviderError

log = logging.getLogger(__name__)

DEFAULT_GROUPS: Mapping[str, str] = {"interactive": "engine-interactive", "mixed": "engine-mixed", "batch": "engine-batch"}
TOKEN_HEADER = "X-Nomad-Token"
_MAX_MESSAGE_CHARS = 500


def parse_groups(spec: str) -> dict[str, str]:
    """Parse a role → task group mapping written ``interactive=engine-interactive,batch=gpu-batch``.

    Roles left out keep their default group (:data:`DEFAULT_GROUPS`). Raises ValueError for an unknown role, a
    missing ``=`` or an empty group name.
    """
    groups = dict(DEFAULT_GROUPS)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        role, sep, group = (s.strip() for s in item.partition("="))
        if not sep or not group:
            raise ValueError(f"expected ROLE=GROUP, got {item!r}")
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        groups[role] = group
    return groups


@dataclass(frozen=True)
class NomadConfig:
    """Where the engine job lives and how hard to try (units in names).

    ``address`` is Nomad's HTTP API (``https://`` works too); ``token`` is sent as ``X-Nomad-Token`` when set
    (with ACLs on, it needs ``read-job``, ``read-job-scaling`` and ``scale-job`` on ``namespace``); ``namespace``
    and ``region`` go as query parameters when set (Nomad's defaults otherwise). Like Nomad's own clients, the
    defaults of these four come from ``NOMAD_ADDR`` (else ``http://127.0.0.1:4646``), ``NOMAD_TOKEN``,
    ``NOMAD_NAMESPACE`` and ``NOMAD_REGION``; inside a Nomad task the last two are the task's own job's, and
    ``identity { env = true }`` puts a workload-identity token in ``NOMAD_TOKEN``.

    A request that fails transiently is tried ``1 + max_retries`` times; before retry ``k`` (from 1) the provider
    waits ``min(backoff_max_s, backoff_initial_s × backoff_multiplier^(k-1))`` seconds, or the server's
    ``Retry-After`` on a 429 if longer (capped at ``backoff_max_s``). ``request_timeout_s`` bounds one try.

    Raises ValueError from :meth:`validate` for inconsistent values.
    """

    address: str = field(default_factory=lambda: os.environ.get("NOMAD_ADDR") or "http://127.0.0.1:4646")
    job_id: str = "chiron-engine"
    groups: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_GROUPS))
    namespace: str | None = field(default_factory=lambda: os.environ.get("NOMAD_NAMESPACE") or None)
    region: str | None = field(default_factory=lambda: os.environ.get("NOMAD_REGION") or None)
    token: str | None = field(default_factory=lambda: os.environ.get("NOMAD_TOKEN") or None)
    request_timeout_s: float = 10.0
    max_retries: int = 4
    backoff_initial_s: float = 0.5
    backoff_multiplier: float = 2.0
    backoff_max_s: float = 8.0
    count_desired_run_only: bool = True  # ignore allocations Nomad is stopping (DesiredStatus != "run")
    skip_unchanged: bool = True  # set_count reads the group's count first and sends nothing when it already matches

    def validate(self) -> NomadConfig:
        if not self.address.startswith(("http://", "https://")):
            raise ValueError(f"address must start with http:// or https:// (got {self.address!r})")
        if not self.job_id:
            raise ValueError("job_id must not be empty")
        missing = [r for r in ROLES if not self.groups.get(r)]
        if missing:
            raise ValueError(f"no task group for role(s) {', '.join(missing)}")
        unknown = sorted(set(self.groups) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown role(s) {', '.join(unknown)} (roles: {', '.join(ROLES)})")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.backoff_initial_s < 0 or self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")
        if self.backoff_multiplier < 1:
            raise ValueError("backoff_multiplier must be >= 1")
        return self

    def backoff_s(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry)."""
        return min(self.backoff_max_s, self.backoff_initial_s * self.backoff_multiplier ** (retry - 1))


class NomadApiError(ProviderError):
    """Nomad answered with an error (``status`` is the HTTP status, ``nomad_message`` its body), or could not be
    reached (``status`` None) after the retries."""

    def __init__(self, message: str, *, status: int | None = None, nomad_message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.nomad_message = nomad_message


@dataclass(frozen=True)
class ScalingBounds:
    """A task group's ``scaling`` block as Nomad holds it: counts [instances]."""

    min: int
    max: int
    enabled: bool = True


class NomadProvider(InstanceProvider):
    """Engine instances as allocations of a Nomad job, one task group per role.

    Configure with a :class:`NomadConfig`, or with its fields as keywords (``NomadProvider(address=...,
    job_id=...)``), which override the config's. ``transport`` replaces httpx's network transport (tests);
    ``sleep`` replaces :func:`asyncio.sleep` for the backoff waits. Call :meth:`close` (or use ``async with``) to
    release the HTTP connection pool. Raises ValueError for an invalid configuration, TypeError for an unknown
    keyword.
    """

    name = "nomad"

    def __init__(self, config: NomadConfig | None = None, *, transport: httpx.AsyncBaseTransport | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, **fields: Any) -> None:
        self.config = dataclasses.replace(config or NomadConfig(), **fields).validate()
        headers = {"Accept": "application/json", "User-Agent": "chiron-global-scaler"}
        if self.config.token:
            headers[TOKEN_HEADER] = self.config.token
        params = {k: v for k, v in (("namespace", self.config.namespace), ("region", self.config.region)) if v}
        self._client = httpx.AsyncClient(base_url=self.config.address.rstrip("/"), headers=headers, params=params,
                                         timeout=self.config.request_timeout_s, transport=transport)
        self._sleep = sleep
        self._job_path = f"/v1/job/{quote(self.config.job_id, safe='')}"
        self._bounds: dict[str, ScalingBounds | None] | None = None  # per group, once the job was looked up

    async def __aenter__(self) -> NomadProvider:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ InstanceProvider

    async def set_count(self, role: str, count: int, reason: str = "") -> None:
        """Set the role's task group count to ``count`` [instances] through Nomad's job scale API.

        Returns once Nomad accepted the new count (it has created an evaluation; allocations are placed or
        stopped afterwards). With ``skip_unchanged`` (default) the job is read first (``GET /v1/job/<job_id>``)
        and nothing is sent when the group's count already is ``count``: allocations Nomad cannot place yet (no
        free A100) stay queued in Nomad and are not in :meth:`counts`, and asking again would only add a job
        version, an evaluation and a scaling event per scaling interval.

        Raises ValueError for an unknown role or a count that is not a non-negative int; :class:`NomadApiError`
        when Nomad refuses (e.g. HTTP 400 for a count outside the group's scaling min/max, 404 for an unknown job,
        403 without the ``scale-job`` capability), the job has no such group, or Nomad stays unreachable after
        the retries.
        """
        group = self._group(role)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be a non-negative int (got {count!r})")
        if self.config.skip_unchanged:
            current = (await self._load_job())[group]
            if current == count:
                log.debug("nomad: %s/%s already has count %d; nothing sent", self.config.job_id, group, count)
                return
        body = {
            "Count": count,
            "Target": {"Group": group},
            "Message": reason or f"chiron global scaler: {role} -> {count}",
            "Meta": {"chiron.role": role},
        }
        what = f"scale {self.config.job_id}/{group} to {count}"
        reply = await self._request("POST", f"{self._job_path}/scale", what, json=body)
        log.info("nomad: %s accepted (eval %s): %s", what, (reply or {}).get("EvalID", "-"), body["Message"])

    async def counts(self, role: str) -> InstanceCounts:
        """Allocations of the role's task group: ``running`` (ClientStatus running) and ``pending`` (ClientStatus
        pending), counting only those Nomad wants running unless ``count_desired_run_only`` is off.

        Raises ValueError for an unknown role; :class:`NomadApiError` for an unknown job or group, or when Nomad
        stays unreachable after the retries.
        """
        group = self._group(role)
        await self._ensure_job()
        allocs = await self._request("GET", f"{self._job_path}/allocations", f"list allocations of {self.config.job_id}")
        if not isinstance(allocs, list):
            raise NomadApiError(f"nomad: allocations of job {self.config.job_id!r}: expected a JSON list, got "
                                f"{type(allocs).__name__}")
        running = pending = 0
        for alloc in allocs:
            if not isinstance(alloc, dict) or alloc.get("TaskGroup") != group:
                continue
            if self.config.count_desired_run_only and alloc.get("DesiredStatus", "run") != "run":
                continue
            status = alloc.get("ClientStatus")
            if status == "running":
                running += 1
            elif status == "pending":
                pending += 1
        return InstanceCounts(running=running, pending=pending)

    async def close(self) -> None:
        """Close the HTTP connection pool (idempotent)."""
        await self._client.aclose()

    # ------------------------------------------------------------------ extras

    async def scaling_bounds(self, role: str) -> ScalingBounds | None:
        """The role's group ``scaling`` min/max [instances] as registered in Nomad (None: the group has no
        scaling block, so Nomad bounds nothing). Cached from the last job lookup. Raises like :meth:`counts`."""
        group = self._group(role)
        bounds = await self._ensure_job()
        return bounds[group]

    def forget_job(self) -> None:
        """Drop the cached scaling bounds (after the job was re-registered with other groups or bounds)."""
        self._bounds = None

    # ------------------------------------------------------------------ internals

    def _group(self, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
        return self.config.groups[role]

    async def _ensure_job(self) -> dict[str, ScalingBounds | None]:
        """The groups' scaling bounds, from the first job lookup (cached)."""
        if self._bounds is None:
            await self._load_job()
        assert self._bounds is not None
        return self._bounds

    async def _load_job(self) -> dict[str, int]:
        """Look the job up now: returns each task group's count; refreshes the cached scaling bounds. Raises
        NomadApiError for an unknown job or when a role's group is missing."""
        job = await self._request("GET", self._job_path, f"look up job {self.config.job_id}")
        groups = job.get("TaskGroups") if isinstance(job, dict) else None
        if not isinstance(groups, list):
            raise NomadApiError(f"nomad: job {self.config.job_id!r}: answer has no TaskGroups list")
        counts: dict[str, int] = {}
        bounds: dict[str, ScalingBounds | None] = {}
        for tg in groups:
            if not isinstance(tg, dict) or not tg.get("Name"):
                continue
            counts[tg["Name"]] = int(tg.get("Count") or 0)
            scaling = tg.get("Scaling")
            bounds[tg["Name"]] = (ScalingBounds(int(scaling.get("Min") or 0), int(scaling["Max"]), bool(scaling.get("Enabled", True)))
                                  if isinstance(scaling, dict) and scaling.get("Max") is not None else None)
        missing = sorted(g for g in self.config.groups.values() if g not in bounds)
        if missing:
            raise NomadApiError(f"nomad: job {self.config.job_id!r} has no task group {', '.join(map(repr, missing))} "
                                f"(groups: {', '.join(sorted(bounds)) or 'none'}); check the role → group mapping")
        self._bounds = bounds
        return counts

    async def _request(self, method: str, path: str, what: str, *, json: Any = None) -> Any:
        """One API call with retries; returns the decoded JSON body (None when empty)."""
        attempts = self.config.max_retries + 1
        status: int | None = None
        message = last = ""
        for attempt in range(1, attempts + 1):
            retry_after_s = 0.0
            try:
                resp = await self._client.request(method, path, json=json)
            except httpx.TransportError as e:  # connect/read/write errors and timeouts
                status, message = None, ""
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            else:
                status = resp.status_code
                if status < 400:
                    if not resp.content:
                        return None
                    try:
                        return resp.json()
                    except ValueError as e:
                        raise NomadApiError(f"nomad: {what}: {method} {path} answered HTTP {status} with a body that "
                                            f"is not JSON: {resp.text[:200]!r}", status=status) from e
                message = _message(resp)
                if status != 429 and status < 500:
                    raise NomadApiError(f"nomad: {what} refused: HTTP {status}: {message}", status=status,
                                        nomad_message=message)
                last = f"HTTP {status}: {message}"
                retry_after_s = _retry_after_s(resp) if status == 429 else 0.0
            if attempt == attempts:
                break
            delay = min(self.config.backoff_max_s, max(self.config.backoff_s(attempt), retry_after_s))
            log.warning("nomad: %s: %s %s failed (%s); retry %d/%d in %.3f s", what, method, path, last, attempt,
                        self.config.max_retries, delay)
            await self._sleep(delay)
        raise NomadApiError(f"nomad: {what} failed after {attempts} tries ({self.config.address}{path}): {last}",
                            status=status, nomad_message=message)


def _message(resp: httpx.Response) -> str:
    """Nomad's error text: its HTTP API answers errors with a plain-text body."""
    text = resp.text.strip() or resp.reason_phrase or "no message"
    return text if len(text) <= _MAX_MESSAGE_CHARS else text[:_MAX_MESSAGE_CHARS] + "…"


def _retry_after_s(resp: httpx.Response) -> float:
    try:
        return max(0.0, float(resp.headers.get("Retry-After", "0")))
    except ValueError:
        return 0.0
