"""The held-out stand-in traces (``bench/heldout.py``): seeded, in the columns ``chiron simulate --trace-file`` reads,
with the lengths and arrival spans each results folder reports."""

from __future__ import annotations

import numpy as np
import pytest

from bench.heldout import REQUESTS, STAND_INS, stand_in_trace
from services.common.traces import load_azure_trace

# name: (mean prompt, mean output) [tokens] as the results folders report them, and the arrival span bounds [s]
REPORTED = {"long-prompt": (2_583, 288, 3_300, 3_600), "long-context": (5_167, 294, 3_300, 3_600),
            "smooth-long": (5_181, 288, 3_550, 3_600), "clipped-long": (7_790, 287, 3_300, 3_600)}


@pytest.mark.parametrize("name", sorted(STAND_INS))
def test_each_stand_in_is_the_trace_its_results_report(name, tmp_path):
    df = stand_in_trace(name)
    path = tmp_path / f"{name}.csv"
    df.to_csv(path, index=False)
    trace = load_azure_trace(str(path))
    prompt, output, span_lo, span_hi = REPORTED[name]
    assert len(trace) == REQUESTS
    assert round(float(np.mean(trace.prompt_tokens))) == prompt
    assert round(float(np.mean(trace.output_tokens))) == output
    assert span_lo < trace.arrival_s[-1] <= span_hi and np.all(np.diff(trace.arrival_s) >= 0)
    assert stand_in_trace(name).equals(df)  # seeded: the same trace every time


def test_an_unknown_stand_in_is_a_key_error():
    with pytest.raises(KeyError):
        stand_in_trace("no-such-trace")
