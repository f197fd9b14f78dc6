"""Per-service settings of the ``chiron`` service commands (``engine``, ``queue``, ``router``, ``scaler``) as
pydantic models: every default, including the ones that depend on another setting (an engine's ITL SLO on its
role, its batch-size bound on its backend), and the service configurations built from them. The commands in
:mod:`services.cli` only map their options onto these; the fidelity bench (``bench/fidelity.py``) reads the
live scaler's settings here too. The gateway's are :class:`services.gateway.config.GatewayConfig`.

Errors: the ``*_config`` methods raise ValueError for values their service refuses (the message names the
setting)."""

from __future__ import annotations

import dataclasses
import shlex
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, field_validator

from services.common.grpc_util import MAX_MESSAGE_BYTES as MAX_FILE_BYTES  # a Batch API upload is one message

if TYPE_CHECKING:
    from services.engine.core import EngineConfig
    from services.engine.local_autoscaler import LocalAutoscalerConfig
    from services.engine.server import AgentConfig
    from services.engine.vllm_backend import VllmConfig
    from services.global_scaler.policy import PolicyConfig
    from services.queue.store import QueueConfig
    from services.router.routing import RouterConfig

Role = Literal["interactive", "mixed", "batch"]
SIMULATED_MODELS = ("llama-3-8b", "llama-2-70b")


class EngineSettings(BaseModel):
    """``chiron engine``: one engine agent. Sizes in requests, tokens or MiB as named; times in ms or s."""

    model_config = ConfigDict(frozen=True)

    backend: Literal["simulated", "vllm"] = "simulated"
    model: str = "llama-3-8b"
    load_format: Literal["auto", "dummy"] = "auto"
    dtype: str = "auto"
    max_num_batched_tokens: int | None = None  # vllm: per-step token budget; None: vLLM's
    kv_cache_mb: int = 0  # vllm: 0 = vLLM's sizing
    role: Role = "interactive"
    instance_id: str = ""
    itl_slo_ms: float | None = None  # None: 50 ms (INTERACTIVE, MIXED), 500 ms (BATCH)
    initial_batch_size: int = 16
    max_batch_size: int | None = None  # None: 1024 (simulated), 256 (vllm)
    control_interval_s: float = 1.0
    static_batch_size: int | None = None  # set: no local autoscaler, this max batch size
    min_prefill_tokens: int = 512
    token_budget: int | None = None  # None: tied to the batch size
    speedup: float = 1.0
    queue_address: str | None = None  # leased from by BATCH and MIXED agents only

    @property
    def local_itl_slo_ms(self) -> float:
        """The ITL SLO the local autoscaler holds [ms]."""
        if self.itl_slo_ms is not None:
            return self.itl_slo_ms
        return 500.0 if self.role == "batch" else 50.0

    @property
    def batch_size_bound(self) -> int:
        """Upper bound of the max batch size [requests], never below a static batch size."""
        bound = self.max_batch_size if self.max_batch_size is not None else 256 if self.backend == "vllm" else 1024
        return max(bound, self.static_batch_size or 1)

    def check_model(self) -> None:
        """Raises ValueError when the simulated backend does not model ``model``."""
        if self.backend == "simulated" and self.model not in SIMULATED_MODELS:
            raise ValueError(f"the simulated backend models llama-3-8b or llama-2-70b, not {self.model!r}")

    def autoscaler_config(self) -> LocalAutoscalerConfig:
        from services.engine.local_autoscaler import LocalAutoscalerConfig, role_overrides

        return LocalAutoscalerConfig(itl_slo_ms=self.local_itl_slo_ms,
                                     initial_batch_size=self.static_batch_size or self.initial_batch_size,
                                     max_batch_size=self.batch_size_bound, control_interval_s=self.control_interval_s,
                                     **role_overrides(self.role)).validate()

    def engine_config(self, autoscaler: LocalAutoscalerConfig) -> EngineConfig:
        from services.engine.core import EngineConfig

        return EngineConfig(max_num_seqs=autoscaler.initial_batch_size, max_num_seqs_limit=autoscaler.max_batch_size,
                            max_num_batched_tokens=self.token_budget, min_prefill_tokens=self.min_prefill_tokens)

    def vllm_config(self) -> VllmConfig:
        from services.engine.vllm_backend import VllmConfig

        return VllmConfig(model_dir=self.model, load_format=self.load_format, dtype=self.dtype,
                          max_num_seqs=self.batch_size_bound, kv_cache_bytes=self.kv_cache_mb << 20,
                          max_num_batched_tokens=self.max_num_batched_tokens)

    def agent_config(self, autoscaler: LocalAutoscalerConfig) -> AgentConfig:
        from services.engine.server import ROLE_NAMES, AgentConfig

        return AgentConfig(instance_id=self.instance_id, role=ROLE_NAMES[self.role], autoscaler=autoscaler,
                           autoscale=self.static_batch_size is None,
                           queue_address=self.queue_address if self.role in ("batch", "mixed") else None)


class QueueSettings(BaseModel):
    """``chiron queue``: the global queue and Batch API store."""

    model_config = ConfigDict(frozen=True)

    db_path: str = "chiron-queue.db"  # SQLite file or postgresql:// URL
    models: tuple[str, ...] = ()  # accepted models; empty: any
    capacity: int = 2_000_000  # requests queued or leased at once
    group_granularity_s: float = 60.0
    lease_timeout_s: float = 60.0
    max_ttft_slo_s: float = 7 * 24 * 3600.0
    max_prompt_tokens: int = 32768
    prior_throughput: float = 0.0  # tokens/s per model before any completion; 0 = unknown
    max_file_bytes: int = 64 * 2**20  # largest Batch API upload, at most MAX_FILE_BYTES

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, v):
        return tuple(m for m in v.split(",") if m) if isinstance(v, str) else v

    def queue_config(self) -> QueueConfig:
        """The store's config, validated (ValueError)."""
        from services.queue.store import QueueConfig

        cfg = QueueConfig(db_path=self.db_path, models=self.models, capacity=self.capacity,
                          group_granularity_s=self.group_granularity_s, lease_timeout_s=self.lease_timeout_s,
                          max_ttft_slo_ms=int(self.max_ttft_slo_s * 1000), max_prompt_tokens=self.max_prompt_tokens)
        cfg.validate()
        return cfg

    def check_max_file_bytes(self) -> None:
        """Raises ValueError unless 1 <= ``max_file_bytes`` <= MAX_FILE_BYTES."""
        if not 1 <= self.max_file_bytes <= MAX_FILE_BYTES:
            raise ValueError(f"--max-file-bytes must be in 1 .. {MAX_FILE_BYTES} bytes, got {self.max_file_bytes}")


class RouterSettings(BaseModel):
    """``chiron router``."""

    model_config = ConfigDict(frozen=True)

    interactive_ttft_max_ms: int = 60_000  # TTFT SLOs up to this are interactive
    stats_interval_s: float = 0.25

    def router_config(self) -> RouterConfig:
        from services.router.routing import RouterConfig

        return dataclasses.replace(RouterConfig(), interactive_ttft_max_ms=self.interactive_ttft_max_ms).validate()


class ScalerSettings(BaseModel):
    """``chiron scaler``: the scaling policy's knobs and how decisions are applied. Role limits are (MIN, MAX)
    instance counts; a "MIN:MAX" string is accepted."""

    model_config = ConfigDict(frozen=True)

    provider: Literal["local", "nomad", "keda"] = "local"
    advisory: bool = False
    interval_s: float = 5.0
    scale_down_delay_s: float | None = None  # None: 2 × model_load_time_s
    model_load_time_s: float = 60.0
    arrival_cv: float | None = None  # None: measured from the observed arrival rates
    interactive_ttft_slo_ms: float = 10_000.0
    prefill_tokens_per_s: float = 10_000.0  # an engine's prefill rate [prompt tokens/s] (the TTFT bound on C, the prefill need)
    interactive: tuple[int, int] = (1, 16)
    mixed: tuple[int, int] = (1, 16)
    batch: tuple[int, int] = (0, 16)
    gpu_budget: int = 50
    gpus_per_instance: int = 1
    engine_args: str = "--backend simulated"  # local provider
    work_dir: str = "out/scaler-local"  # local provider
    nomad_address: str = "http://127.0.0.1:4646"
    nomad_job: str = "chiron-engine"
    election: bool | None = None  # None: on unless advisory
    leader_ttl_s: int = 10

    @field_validator("interactive", "mixed", "batch", mode="before")
    @classmethod
    def _limits(cls, v):
        return tuple(int(x) for x in v.split(":")) if isinstance(v, str) else v

    @property
    def limits(self) -> dict[str, tuple[int, int]]:
        return {"interactive": self.interactive, "mixed": self.mixed, "batch": self.batch}

    @property
    def elects(self) -> bool:
        """Whether this replica takes part in the leader election. Raises ValueError for an advisory scaler asked
        to (it never acts)."""
        if self.election and self.advisory:
            raise ValueError("an advisory scaler never acts, so it takes no part in the election")
        return not self.advisory if self.election is None else self.election

    def policy_config(self) -> PolicyConfig:
        """The scaling policy's config, validated (ValueError)."""
        from services.global_scaler.policy import PolicyConfig, with_limits

        return dataclasses.replace(
            with_limits(PolicyConfig(), **self.limits), interval_s=self.interval_s,
            scale_down_delay_s=self.scale_down_delay_s, model_load_time_s=self.model_load_time_s,
            gpu_budget=self.gpu_budget, gpus_per_instance=self.gpus_per_instance,
            interactive_ttft_slo_s=self.interactive_ttft_slo_ms / 1e3,
            prefill_tokens_per_s=self.prefill_tokens_per_s).validate()

    @classmethod
    def from_args(cls, args: str) -> ScalerSettings:
        """The policy settings ``chiron scaler ARGS`` runs with (``--interval-s 2 --interactive 1:4``, ...; the
        other options are ignored), parsed by pydantic-settings' command-line source, defaults as here. Raises
        ValueError (pydantic's ValidationError) for a bad value."""
        from pydantic import create_model
        from pydantic_settings import CliSettingsSource

        options = create_model("ScalerPolicyOptions", **{f: (str | None, None) for f in POLICY_OPTIONS})
        given = CliSettingsSource(options, cli_kebab_case=True, cli_ignore_unknown_args=True)(args=shlex.split(args))()
        return cls(**given)


# The ``chiron scaler`` options that shape its policy (what the simulator needs to decide alike).
POLICY_OPTIONS = ("interval_s", "scale_down_delay_s", "model_load_time_s", "arrival_cv", "interactive_ttft_slo_ms",
                  "interactive", "mixed", "batch", "gpu_budget", "gpus_per_instance")
