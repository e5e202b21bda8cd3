"""GPTQ speed on SmolLM2-135M: dtm's `calibrate_and_compress` against the PyTorch
transcription of IST-DASLab/gptq `llama_sequential` (tests/torch_reference.py; all seven
linears of a layer from one pass of the original layer, no --true-sequential, as dtm),
one run.

  .venv/bin/python bench/quantize.py [--samples 16] [--length 256] [--layers N]
      [--methods 'gptq(4,group_size=64),gptq(4,group_size=64,act_order=True),gptq(8)']
      [--torch-threads 2] [--no-torch]

Same procedure and flags as bench/prune.py (same model, calibration windows, timing
including dtm's jit compilation); the agreement column is the fraction of dequantized
weights equal within 1e-5 relative. act_order uses static groups on both sides (dtm's
default, the reference's --static-groups). Timings are only meaningful on an otherwise
idle machine.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

from prune import compare  # noqa: E402

CASES = {
    "gptq(4,group_size=64)": ("gptq_sequential", dict(bits=4, groupsize=64)),
    "gptq(4,group_size=64,act_order=True)": ("gptq_sequential", dict(
        bits=4, groupsize=64, actorder=True, static_groups=True)),
    "gptq(8)": ("gptq_sequential", dict(bits=8)),
}

if __name__ == "__main__":
  compare(CASES, "dtm vs reference GPTQ pipeline", ",".join(CASES),
          equal=lambda a, b: np.isclose(a, b, rtol=1e-5, atol=1e-7), agree_name="equal weights")
