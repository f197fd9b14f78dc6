"""Writes the clipped long-prompt held-out stand-in of this folder's README to the path given.

Arrivals: a seeded draw of 12,031 of the 19,366 timestamps of the Azure LLM inference trace 2023, conversation
(``../shared/data/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv``, CC-BY-4.0). Each prompt is three
papers of the arXiv summarization trace (``../shared/data/traces/arxiv_summarization/``, MIT; Llama-2 tokenizer)
put together, each output the first one's summary: mean prompt 7,790 tokens before the simulator clips a request
to Llama-3-8B's 8,192-token context (7,216 after; half the prompts are clipped), output 287 tokens. No Chiron
setting was chosen on it.

Usage: CHIRON_DATA_DIR=../shared/data python bench/results/heldout_clipped_long_2026-12-08/make_trace.py out.csv
"""

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

data = Path(os.environ.get("CHIRON_DATA_DIR", "../shared/data")) / "traces"
rng = np.random.default_rng(4041)
conv = pd.read_csv(data / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv")
conv = conv.iloc[np.sort(rng.choice(len(conv), 12_031, replace=False))].reset_index(drop=True)
arxiv = pd.read_csv(data / "arxiv_summarization" / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv")
picks = [rng.integers(0, len(arxiv), len(conv)) for _ in range(3)]
prompt = arxiv.num_prefill_tokens.to_numpy()
conv["ContextTokens"] = sum(prompt[p] for p in picks)
conv["GeneratedTokens"] = arxiv.num_decode_tokens.to_numpy()[picks[0]]
conv.to_csv(sys.argv[1], index=False)
