"""The gateway's settings (:class:`GatewayConfig`, from ``CHIRON_GATEWAY_*`` variables or ``chiron gateway``'s
options) and its named SLO classes."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.gateway.tokenizer import DEFAULT_SIMPLE_VOCAB

HEALTH_DEPENDENCIES = ("router", "queue", "membership")
"""What ``/health`` reports: the router, and through its health service the queue and etcd membership."""


class SloClassConfig(BaseModel):
    """One named SLO class. ``ttft_ms``: TTFT SLO [ms]; ``itl_ms``: ITL SLO [ms] (0 = the router's default);
    ``queued``: served through the global queue (``Router.Submit``; the HTTP answer waits for the result, no
    streaming) instead of streamed (``Router.GenerateMany``)."""

    ttft_ms: int = Field(gt=0)
    itl_ms: int = Field(0, ge=0)
    queued: bool = False


def _default_slo_classes() -> dict[str, SloClassConfig]:
    # The router's named classes (services.router.routing.RouterConfig), with how the gateway serves each.
    return {"interactive": SloClassConfig(ttft_ms=10_000, itl_ms=100), "chat": SloClassConfig(ttft_ms=2_000, itl_ms=100),
            "batch": SloClassConfig(ttft_ms=3_600_000, queued=True),
            "batch-24h": SloClassConfig(ttft_ms=86_400_000, queued=True)}


class GatewayConfig(BaseSettings):
    """Configuration of the gateway; every field can be set through ``CHIRON_GATEWAY_<FIELD>`` (``slo_classes`` as
    JSON) or the ``chiron gateway`` options. Raises pydantic.ValidationError for bad values."""

    model_config = SettingsConfigDict(env_prefix="CHIRON_GATEWAY_", extra="forbid")

    router: str = Field("127.0.0.1:50050", description=(
        "Router gRPC address (host:port), or several separated by commas: calls fail over between them "
        "(services.common.failover; a streamed request only before its first token)."))
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 = pick a free one).")
    tokenizer: str = Field("simple", description="'simple' (simulated engines) or a Hugging Face model directory.")
    vocab_size: int = Field(DEFAULT_SIMPLE_VOCAB, ge=2, description="Vocabulary of the simple tokenizer [tokens].")
    max_body_bytes: int = Field(65 * 2**20, gt=0, description=(
        "Largest request body [bytes]; larger ones get 413 (default: a 64 MiB Batch API upload plus framing)."))
    default_max_tokens: int = Field(256, gt=0, description="Output tokens when a request sets no max_tokens.")
    default_slo_class: str = Field("interactive", description="SLO class of requests that name none.")
    slo_classes: dict[str, SloClassConfig] = Field(default_factory=_default_slo_classes,
                                                   description="Named SLO classes clients may ask for.")
    request_timeout_s: float = Field(600.0, gt=0, description="Deadline of an interactive request's router call [s].")
    models_ttl_s: float = Field(2.0, ge=0, description="How long the router's model list is cached [s].")
    models: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Models this deployment serves (comma-separated in CHIRON_GATEWAY_MODELS). A request for one of them, or "
        "for a model served since the gateway started, while no engine instance serves it gets 503 "
        "model_unavailable with Retry-After; a model never known gets 404 model_not_found."))
    retry_after_s: int = Field(5, ge=1, description=(
        "Retry-After of a 503 for a known model without an engine instance right now [s]."))
    health_requires: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["router"], description=(
        "Dependencies whose loss makes /health answer 503 (comma-separated in CHIRON_GATEWAY_HEALTH_REQUIRES; of "
        "router, queue, membership). Default: the router only, without which nothing is served; a queue or etcd "
        "outage shows as 'degraded' with 200, so that load balancers keep interactive traffic flowing."))
    health_timeout_s: float = Field(2.0, gt=0, description="Deadline of each dependency check of /health [s].")
    disconnect_poll_s: float = Field(0.5, gt=0, description=(
        "How often a non-streaming request checks whether its client went away [s]."))
    graceful_shutdown_s: float = Field(30.0, ge=0, description="On stop, how long in-flight requests may finish [s].")
    workers: int = Field(1, ge=1, le=64, description=(
        "HTTP worker processes of 'chiron gateway' (GatewayWorkers), each with its own event loop and listening "
        "socket on the one port; 1 serves in the command's own process."))

    @field_validator("models", "health_requires", mode="before")
    @classmethod
    def _split_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [m.strip() for m in v.split(",") if m.strip()]
        return v

    @field_validator("health_requires")
    @classmethod
    def _known_dependencies(cls, v: list[str]) -> list[str]:
        unknown = [d for d in v if d not in HEALTH_DEPENDENCIES]
        if unknown:
            raise ValueError(f"health_requires: unknown dependencies {unknown}; choose from {list(HEALTH_DEPENDENCIES)}")
        return v

    @model_validator(mode="after")
    def _check(self) -> GatewayConfig:
        if self.default_slo_class not in self.slo_classes:
            raise ValueError(f"default_slo_class {self.default_slo_class!r} is not one of the slo_classes "
                             f"({', '.join(sorted(self.slo_classes))})")
        return self
