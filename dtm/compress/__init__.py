"""Weight compression of Llama components: a spec grammar and the methods it names.

The face of the package (re-exports only); the code lives by concern:
  spec.py          the spec grammar (documented there): Method, Rule, Spec, parse_spec, validate
  elementwise.py   the uncalibrated per-matrix methods: magnitude, nm, absmax, rtn, identity
  apply.py         compress / compress_calibrated one matrix, apply_spec a whole params tree
  wanda.py, sparsegpt.py, gptq.py   calibrated methods; calibration.py collects their statistics
  owl.py           the OWL allocation (per-layer rates of wanda / sparsegpt / magnitude)
  int8.py, act_quant.py             run-time activation quantization (w8a8, llm_int8)
"""
# The component naming and three private helpers (used by dtm.train.masks and dtm.probe) are
# re-exported too, as callers reach them through the package.
from dtm.components import KINDS, Component, get_path, kernel_path
from dtm.compress.apply import (
    _compress_layers, _layer_kernel, _set_path, apply_spec, compress, compress_calibrated,
    compress_kernel, kernel_shapes, report_entry, set_kernel_layers)
from dtm.compress.elementwise import (
    absmax, absmax_scale, absmax_values, identity, magnitude, magnitude_cut, magnitude_pruned, nm,
    nm_rank, num_pruned, prune_lowest, prune_rank, prune_rank_kernel, rtn)
from dtm.compress.spec import (
    CALIBRATED_METHODS, GRANULARITIES, HESSIAN_METHODS, IDENTITY, KIND_GROUPS, METHOD_NAMES, Method,
    Rule, Spec, needs_hessian, parse_method, parse_rule, parse_spec, validate)
