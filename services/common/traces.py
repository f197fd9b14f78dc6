"""Loaders for the request traces in ``../shared/data/traces`` (see its PROVENANCE.md).

* Azure LLM inference traces 2023 (Splitwise, ISCA'24; Azure/AzurePublicDataset @ b469a113, CC-BY-4.0):
  ``azure_llm_2023/AzureLLMInferenceTrace_{conv,code}.csv`` with columns
  ``TIMESTAMP,ContextTokens,GeneratedTokens``. A user's own CSV with the same columns loads the same way.
* ShareGPT prompt/output token counts (Llama-2 tokenizer; microsoft/sarathi-serve, Apache-2.0):
  ``sharegpt/sharegpt_8k_filtered_stats_llama2_tokenizer.csv`` (:func:`load_sharegpt_lengths`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from services.common.paths import shared_data_dir

SHAREGPT = "traces/sharegpt/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"
AZURE_TRACES = {
    "azure-conv": "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
    "azure-code": "traces/azure_llm_2023/AzureLLMInferenceTrace_code.csv",
}


@dataclass(frozen=True)
class Trace:
    """Arrivals (seconds from the first request) with prompt and output lengths (tokens)."""

    name: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival_s)

    def slice(self, start_s: float = 0.0, duration_s: float | None = None) -> Trace:
        """Requests arriving in ``[start_s, start_s + duration_s)``, re-based to start at 0."""
        end = np.inf if duration_s is None else start_s + duration_s
        sel = (self.arrival_s >= start_s) & (self.arrival_s < end)
        return Trace(self.name, self.arrival_s[sel] - start_s, self.prompt_tokens[sel], self.output_tokens[sel])


def _parse_ts(s: str) -> float:
    # "2023-11-16 18:15:46.6805900": 7 fractional digits, more than datetime parses.
    head, _, frac = s.strip().partition(".")
    base = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp()
    return base + (float("0." + frac) if frac else 0.0)


def load_azure_trace(name_or_path: str = "azure-conv") -> Trace:
    """Load an Azure-format trace by name (``azure-conv``, ``azure-code``) or path to a CSV.

    Raises FileNotFoundError (missing file) or ValueError (missing columns / unparsable rows, with the line).
    """
    path = shared_data_dir() / AZURE_TRACES[name_or_path] if name_or_path in AZURE_TRACES else Path(name_or_path)
    if not path.exists():
        raise FileNotFoundError(f"trace {path} not found")
    ts, ctx, gen = [], [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)} (need TIMESTAMP,ContextTokens,GeneratedTokens)")
        for line, row in enumerate(reader, start=2):
            try:
                ts.append(_parse_ts(row["TIMESTAMP"]))
                ctx.append(int(row["ContextTokens"]))
                gen.append(int(row["GeneratedTokens"]))
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}:{line}: {e}") from e
    arr = np.array(ts)
    order = np.argsort(arr, kind="stable")
    arr = arr[order] - arr[order][0] if len(arr) else arr
    return Trace(name_or_path, arr, np.array(ctx)[order], np.array(gen)[order])


def load_sharegpt_lengths(max_total_tokens: int) -> np.ndarray:
    """(prompt_tokens, output_tokens) rows of the ShareGPT trace whose sum fits ``max_total_tokens``."""
    path = shared_data_dir() / SHAREGPT
    with path.open(newline="") as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    arr = np.array(rows)
    return arr[(arr.sum(axis=1) <= max_total_tokens) & (arr[:, 0] > 0) & (arr[:, 1] > 0)]
