"""Writes the smooth long-prompt held-out stand-in of this folder's README to the path given.

Arrivals: 12,031 Poisson arrivals over 3,600 s (seeded uniform times, sorted): the issue's count for the unseen
trace, without the Azure trace's minute-scale swings. Lengths as the long-context stand-in
(``../heldout_long_context_2026-12-08/``): each prompt two papers of the arXiv summarization trace
(``../shared/data/traces/arxiv_summarization/``, MIT; Llama-2 tokenizer) put together, the output the first one's
summary. No Chiron setting was chosen on it.

Usage: CHIRON_DATA_DIR=../shared/data python bench/results/heldout_smooth_long_2026-12-08/make_trace.py out.csv
"""

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

data = Path(os.environ.get("CHIRON_DATA_DIR", "../shared/data")) / "traces"
rng = np.random.default_rng(3031)
n = 12_031
arrival_s = np.sort(rng.uniform(0, 3600.0, n))
arxiv = pd.read_csv(data / "arxiv_summarization" / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv")
first, second = rng.integers(0, len(arxiv), n), rng.integers(0, len(arxiv), n)
prompt = arxiv.num_prefill_tokens.to_numpy()
start = pd.Timestamp("2023-11-16 18:00:00")
stamps = [(start + pd.Timedelta(seconds=float(x))).strftime("%Y-%m-%d %H:%M:%S.%f") for x in arrival_s]
pd.DataFrame({"TIMESTAMP": stamps, "ContextTokens": prompt[first] + prompt[second],
              "GeneratedTokens": arxiv.num_decode_tokens.to_numpy()[first]}).to_csv(sys.argv[1], index=False)
