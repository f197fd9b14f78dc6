"""Writes the long-context held-out stand-in of this folder's README to the path given (default heldout_long.csv).

Arrivals: a seeded draw of 12,031 of the 19,366 timestamps of the Azure LLM inference trace 2023, conversation
(``../shared/data/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv``, CC-BY-4.0). Each prompt is two
papers of the arXiv summarization trace (``../shared/data/traces/arxiv_summarization/``, MIT; Llama-2 tokenizer)
put together, each output the first one's summary: mean prompt 5,167 tokens, mean output 294 tokens, 3.4
requests/s over 58 min, prefill-bound (about 1.8 instances of prefill at 10,000 tokens/s). It stands for the
issue's description of the unseen trace (long prompts, an hour, 12,031 requests, a lower bound near 2 GPU-hours);
no suite workload is like it, and no Chiron setting was chosen on it.

Usage: CHIRON_DATA_DIR=../shared/data python bench/results/heldout_long_context_2026-12-08/make_trace.py out.csv
"""

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

data = Path(os.environ.get("CHIRON_DATA_DIR", "../shared/data")) / "traces"
rng = np.random.default_rng(2027)
conv = pd.read_csv(data / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv")
conv = conv.iloc[np.sort(rng.choice(len(conv), 12_031, replace=False))].reset_index(drop=True)
arxiv = pd.read_csv(data / "arxiv_summarization" / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv")
first, second = rng.integers(0, len(arxiv), len(conv)), rng.integers(0, len(arxiv), len(conv))
prompt = arxiv.num_prefill_tokens.to_numpy()
conv["ContextTokens"] = prompt[first] + prompt[second]
conv["GeneratedTokens"] = arxiv.num_decode_tokens.to_numpy()[first]
conv.to_csv(sys.argv[1] if len(sys.argv) > 1 else "heldout_long.csv", index=False)
