"""Writes the long-prompt held-out trace of this folder's README to the path given (default heldout.csv).

Arrivals: a seeded draw of 12,031 of the 19,366 timestamps of the Azure LLM inference trace 2023, conversation
(``../shared/data/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv``, CC-BY-4.0); prompt and output lengths:
seeded draws from the arXiv summarization trace (``../shared/data/traces/arxiv_summarization/``, MIT; Llama-2
tokenizer). Mean prompt 2,583 tokens, mean output 288 tokens, 3.4 requests/s over 58 min. No suite workload
combines these, and no Chiron setting was chosen on it.

Usage: CHIRON_DATA_DIR=../shared/data python bench/results/heldout_long_prompt_2026-12-07/make_trace.py out.csv
"""

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

data = Path(os.environ.get("CHIRON_DATA_DIR", "../shared/data")) / "traces"
rng = np.random.default_rng(2026)
conv = pd.read_csv(data / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv")
conv = conv.iloc[np.sort(rng.choice(len(conv), 12_031, replace=False))].reset_index(drop=True)
arxiv = pd.read_csv(data / "arxiv_summarization" / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv")
pick = rng.integers(0, len(arxiv), len(conv))
conv["ContextTokens"] = arxiv.num_prefill_tokens.to_numpy()[pick]
conv["GeneratedTokens"] = arxiv.num_decode_tokens.to_numpy()[pick]
conv.to_csv(sys.argv[1] if len(sys.argv) > 1 else "heldout.csv", index=False)
