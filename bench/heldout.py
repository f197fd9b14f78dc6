"""Held-out stand-in traces: ``python -m bench.heldout NAME OUT.csv`` writes one, seeded, in the Azure CSV columns
``chiron simulate --trace-file`` reads (TIMESTAMP, ContextTokens, GeneratedTokens).

The issue's unseen trace is a real conversation trace with long prompts: 12,031 requests over an hour, a lower
bound near 2.2 GPU-h. None of its requests is here; each stand-in keeps its count and varies what is not known
(arrival process, prompt length), and none was used to choose a Chiron setting (each results folder says when it
was run and what, if anything, it showed). Sources (under :func:`services.common.paths.shared_data_dir`):

- arrivals ``azure-conv``: a seeded draw of 12,031 of the 19,366 timestamps of the Azure LLM inference trace 2023,
  conversation (``traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv``, Azure/AzurePublicDataset, CC-BY-4.0);
  ``poisson``: 12,031 seeded uniform times over 3,600 s, sorted;
- lengths: each prompt ``papers`` papers of the arXiv summarization trace put together
  (``traces/arxiv_summarization/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv``, MIT; Llama-2
  tokenizer), the output the first paper's summary. The simulator clips a request to the model's context.

| name | arrivals | papers | seed | mean prompt / output [tokens] | lower bound [GPU-h] | results |
|---|---|---|---|---|---|---|
| ``long-prompt`` | azure-conv | 1 | 2026 | 2,583 / 288 | 0.94 | ``bench/results/heldout_long_prompt_2026-12-07*`` |
| ``long-context`` | azure-conv | 2 | 2027 | 5,167 / 294 | 1.89 | ``bench/results/heldout_long_context_2026-12-08`` |
| ``smooth-long`` | poisson | 2 | 3031 | 5,181 / 288 | 1.89 | ``bench/results/heldout_smooth_long_2026-12-08`` |
| ``clipped-long`` | azure-conv | 3 | 4041 | 7,790 (7,216 clipped) / 287 | 2.66 | ``bench/results/heldout_clipped_long_2026-12-08`` |
"""

from __future__ import annotations

from dataclasses import dataclass

import click
import numpy as np
import pandas as pd

from services.common.paths import shared_data_dir
from services.common.traces import AZURE_TRACES
from simulator.workloads import ARXIV

REQUESTS = 12_031  # the count for the unseen trace
POISSON_SPAN_S = 3_600.0
POISSON_START = pd.Timestamp("2023-11-16 18:00:00")


@dataclass(frozen=True)
class StandIn:
    arrivals: str  # "azure-conv" or "poisson"
    papers: int  # arXiv papers per prompt
    seed: int


STAND_INS = {
    "long-prompt": StandIn("azure-conv", 1, 2026),
    "long-context": StandIn("azure-conv", 2, 2027),
    "smooth-long": StandIn("poisson", 2, 3031),
    "clipped-long": StandIn("azure-conv", 3, 4041),
}


def stand_in_trace(name: str) -> pd.DataFrame:
    """The stand-in ``name`` (module docstring) as a DataFrame of TIMESTAMP, ContextTokens, GeneratedTokens
    [tokens], one row per request. Raises KeyError for an unknown name, FileNotFoundError for a missing source."""
    s = STAND_INS[name]
    data = shared_data_dir()
    rng = np.random.default_rng(s.seed)
    if s.arrivals == "azure-conv":
        conv = pd.read_csv(data / AZURE_TRACES["azure-conv"])
        out = conv.iloc[np.sort(rng.choice(len(conv), REQUESTS, replace=False))].reset_index(drop=True)
    else:
        arrival_s = np.sort(rng.uniform(0, POISSON_SPAN_S, REQUESTS))
        stamps = [(POISSON_START + pd.Timedelta(seconds=float(x))).strftime("%Y-%m-%d %H:%M:%S.%f") for x in arrival_s]
        out = pd.DataFrame({"TIMESTAMP": stamps})
    arxiv = pd.read_csv(data / ARXIV)  # the raw rows: a draw indexes them all, unlike simulator.workloads.arxiv_lengths
    picks = [rng.integers(0, len(arxiv), len(out)) for _ in range(s.papers)]
    prompt = arxiv.num_prefill_tokens.to_numpy()
    out["ContextTokens"] = sum(prompt[p] for p in picks)
    out["GeneratedTokens"] = arxiv.num_decode_tokens.to_numpy()[picks[0]]
    return out


@click.command(help=__doc__.split("\n\n")[0])
@click.argument("name", type=click.Choice(sorted(STAND_INS)))
@click.argument("out", type=click.Path(dir_okay=False))
def main(name: str, out: str) -> None:
    try:
        trace = stand_in_trace(name)
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    trace.to_csv(out, index=False)
    click.echo(f"wrote {out}: stand-in {name}, {REQUESTS} requests")


if __name__ == "__main__":
    main()
