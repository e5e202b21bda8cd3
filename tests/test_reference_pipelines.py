"""dtm's layer-by-layer `calibrate_and_compress` against PyTorch transcriptions of the
reference pipelines (tests/torch_reference.py: locuslab/wanda `prune_wanda`,
IST-DASLab/sparsegpt and IST-DASLab/gptq `llama_sequential`) on the real SmolLM2-135M
(float32, CPU), the transformers model loaded from the same GGUF file.

Both sides get the same calibration windows (token ids from
`calibration.calibration_windows` on the WikiText-2 validation split) and are compared on

  * the pruning masks (zeros) of every compressed linear weight (Wanda, SparseGPT), and
    the fraction of equal dequantized weights (GPTQ);
  * perplexity on the same WikiText-2 *test* windows, both computed by
    `dtm.evaluation.perplexity` (the torch weights copied into dtm's params), so only the
    compression differs.

The two differ only in float32 summation order (dtm batches 8 windows per layer call and
sums Hessians in one matmul; the references add one sequence at a time), which moves a few
masks in layer 0 and, through the compressed layers' outputs, more in later layers
(SparseGPT's OBS updates amplify it). The always-on tests compress the first
FAST_LAYERS layers; the `slow` ones (pytest -m slow) all 30 layers, where SparseGPT's mask
agreement is required only to be within 0.5 % of that noise floor. Over 30 layers that
noise moves a single run's perplexity by several per cent on either side (the reference's
4-bit GPTQ: 46.4 to 50.8 over calibration batch sizes 1 to 16), so there both pipelines
run with SPREAD_BATCHES calibration batch sizes and their mean perplexities, on the
larger set of SPREAD_PPL_WINDOWS test windows, must agree within PPL_RTOL or within two
standard errors of the difference of the means, whichever is larger.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHARED, torch_or_skip

torch = torch_or_skip()

import torch_reference as R  # noqa: E402
from dtm import compress as C, data, evaluation  # noqa: E402
from dtm.components import kernel_path  # noqa: E402
from dtm.compress import calibration  # noqa: E402

CAL_SAMPLES, CAL_LENGTH, CAL_SEED = 16, 256, 0   # calibration windows (token ids)
PPL_WINDOWS, PPL_LENGTH = 4, 256                # WikiText-2 test windows for perplexity
FAST_LAYERS = 2                                 # layers compressed by the always-on tests
PPL_RTOL = 0.02
SPREAD_BATCHES = (1, 4, 16)                     # all-layer cases: calibration batch sizes
SPREAD_PPL_WINDOWS = 32                         # ... and their perplexity windows
WIKITEXT_VALID = SHARED / "data" / "wikitext-2" / "wiki.valid.tokens"

# (dtm method, torch pipeline, its arguments, mask agreement required over FAST_LAYERS)
PRUNING = [
    ("wanda(0.5)", "prune_wanda", dict(sparsity_ratio=0.5), 0.99),
    ("wanda(2,4)", "prune_wanda", dict(prune_n=2, prune_m=4), 0.99),
    ("sparsegpt(0.5)", "sparsegpt_sequential", dict(sparsity=0.5), 0.97),
    ("sparsegpt(2,4)", "sparsegpt_sequential", dict(prunen=2, prunem=4), 0.97),
]
# dtm's act_order defaults to static groups (the reference's --static-groups)
GPTQ = [
    ("gptq(4,group_size=64)", dict(bits=4, groupsize=64)),
    ("gptq(4,group_size=64,act_order=True)", dict(bits=4, groupsize=64, actorder=True,
                                                  static_groups=True)),
    ("gptq(8)", dict(bits=8)),
]


class Harness:
  """The real model on both sides, the windows, and one comparison per spec."""

  def __init__(self, smollm2, smollm2_gguf, wikitext_path):
    torch.set_num_threads(1)  # see test_evaluate.hf_model: one thread is faster when busy
    self.model = smollm2
    self.hf = R.load_hf_smollm2(smollm2_gguf)
    self.original = R.snapshot(self.hf)
    cal_texts = data.load_texts("text", data_files=str(WIKITEXT_VALID))
    stream = data.tokenize_corpus(smollm2.tokenizer, cal_texts, add_bos=False)
    self.windows = calibration.calibration_windows(stream, samples=CAL_SAMPLES,
                                                   length=CAL_LENGTH, seed=CAL_SEED)
    test = data.tokenize_corpus(smollm2.tokenizer,
                                data.load_texts("text", data_files=wikitext_path), add_bos=False)
    self.ppl = data.ppl_windows(test, length=PPL_LENGTH, max_windows=PPL_WINDOWS)
    self.ppl_large = data.ppl_windows(test, length=PPL_LENGTH, max_windows=SPREAD_PPL_WINDOWS)
    self.dense_ppl = self.perplexity(smollm2.params)
    self.log: list[str] = []

  def perplexity(self, params, large: bool = False) -> float:
    w = self.ppl_large if large else self.ppl
    return evaluation.perplexity(self.model.cfg, params, w.tokens, w.ctx_len,
                                 batch_size=PPL_WINDOWS, desc="ppl")["ppl"]

  def dtm(self, method: str, layers: int, batch_size: int = 8):
    spec = f"*@0-{layers - 1}:{method}"
    start = time.perf_counter()
    params, _ = calibration.calibrate_and_compress(self.model.cfg, self.model.params, spec,
                                                   self.windows, batch_size=batch_size)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    weights = {}
    for kind in R.KIND_MODULES:
      kernel = np.asarray(C.get_path(params, kernel_path(kind)))
      weights.update({(l, kind): kernel[l].T for l in range(layers)})
    return params, weights, seconds

  def torch(self, pipeline: str, kwargs: dict, layers: int, batch_size: int = 1):
    R.restore(self.hf, self.original)
    start = time.perf_counter()
    getattr(R, pipeline)(self.hf, self.windows, num_layers=layers, batch_size=batch_size,
                         **kwargs)
    seconds = time.perf_counter() - start
    weights = {k: w.numpy().copy() for k, w in R.linear_weights(self.hf).items()
               if k[0] < layers}
    params = self.model.params
    for kind in R.KIND_MODULES:
      params = C.set_kernel_layers(params, kind, [(l, jnp.asarray(weights[(l, kind)].T))
                                                  for l in range(layers)])
    return params, weights, seconds

  def record(self, line: str) -> None:
    self.log.append(line)
    print(line)

  def spread_check(self, method: str, pipeline: str, kwargs: dict, line: str) -> str:
    """All layers, SPREAD_BATCHES calibration batch sizes on both sides: asserts that the
    mean perplexities (SPREAD_PPL_WINDOWS windows) agree within PPL_RTOL or two standard
    errors of their difference; returns the line with both spreads."""
    layers = self.model.cfg.num_layers
    d = [self.perplexity(self.dtm(method, layers, b)[0], large=True) for b in SPREAD_BATCHES]
    r = [self.perplexity(self.torch(pipeline, kwargs, layers, b)[0], large=True)
         for b in SPREAD_BATCHES]
    md, mr = np.mean(d), np.mean(r)
    se = np.sqrt(np.var(d, ddof=1) / len(d) + np.var(r, ddof=1) / len(r))
    line += (f"; ppl({SPREAD_PPL_WINDOWS} windows) over calibration batch sizes "
             f"{SPREAD_BATCHES}: dtm {md:.3f} [{min(d):.3f}, {max(d):.3f}] torch {mr:.3f} "
             f"[{min(r):.3f}, {max(r):.3f}], difference {md / mr - 1:+.2%} (2 SE "
             f"{2 * se / mr:.2%})")
    self.record(line)
    assert abs(md - mr) <= max(PPL_RTOL * mr, 2 * se), line
    return line


def near_one(ppl: float, refs: list[float]) -> bool:
  """ppl within PPL_RTOL of one of the reference's runs (one-by-one, or batched: both are
  the reference, differing only in summation order, which alone moves SparseGPT 2:4 over
  two layers by 2.6 %)."""
  return min(abs(ppl / r - 1) for r in refs) < PPL_RTOL


def agreement(a: dict, b: dict, equal) -> float:
  """Fraction of weights over all (layer, kind) where equal(a, b) holds."""
  same = sum(int(np.sum(equal(a[k], b[k]))) for k in a)
  return same / sum(a[k].size for k in a)


def same_mask(x, y):
  return (x == 0) == (y == 0)


def same_value(x, y):
  return np.isclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def harness(smollm2, smollm2_gguf, wikitext_path):
  h = Harness(smollm2, smollm2_gguf, wikitext_path)
  # the independent loaders agree on the weights, so masks are comparable at all
  for (l, kind), w in list(h.original.items())[:14]:
    kernel = np.asarray(C.get_path(smollm2.params, kernel_path(kind)))[l]
    np.testing.assert_array_equal(kernel.T, w.numpy())
  return h


def _layers(full: bool, harness) -> int:
  return harness.model.cfg.num_layers if full else FAST_LAYERS


def _cases(specs):
  """(full, spec) for every spec: first layers always, all layers marked slow."""
  return ([pytest.param(False, c, id=f"first-layers-{c[0]}") for c in specs]
          + [pytest.param(True, c, id=f"all-layers-{c[0]}", marks=pytest.mark.slow)
             for c in specs])


@pytest.mark.parametrize("full, case", _cases(PRUNING))
def test_pruning_matches_reference_pipelines(harness, full, case):
  layers = _layers(full, harness)
  method, pipeline, kwargs, required = case
  dtm_params, dtm_w, t_dtm = harness.dtm(method, layers)
  ref_params, ref_w, t_ref = harness.torch(pipeline, kwargs, layers)
  masks = agreement(dtm_w, ref_w, same_mask)
  first = agreement({k: v for k, v in dtm_w.items() if k[0] == 0}, ref_w, same_mask)
  ppl_dtm, ppl_ref = harness.perplexity(dtm_params), harness.perplexity(ref_params)
  sparsity = np.mean([np.mean(w == 0) for w in dtm_w.values()])
  ref_sparsity = np.mean([np.mean(w == 0) for w in ref_w.values()])
  line = (f"{method} layers 0-{layers - 1}: masks agree {masks:.4%} (layer 0 {first:.4%}), "
          f"sparsity dtm {sparsity:.4f} torch {ref_sparsity:.4f}, ppl dtm {ppl_dtm:.4f} "
          f"torch {ppl_ref:.4f} dense {harness.dense_ppl:.4f}; {t_dtm:.0f} s / {t_ref:.0f} s")
  refs = [ppl_ref]
  if pipeline == "sparsegpt_sequential":  # the reference against itself
    batched_params, batched_w, _ = harness.torch(pipeline, kwargs, layers,
                                                 batch_size=CAL_SAMPLES)
    floor = agreement(batched_w, ref_w, same_mask)
    refs.append(harness.perplexity(batched_params))
    line += f"; torch batched vs one-by-one: masks {floor:.4%}, ppl {refs[-1]:.4f}"
    if full:
      required = floor - 0.005
  assert first >= 0.998, line
  assert masks >= required, line
  assert abs(sparsity - ref_sparsity) < 1e-3, line
  if full:
    line = harness.spread_check(method, pipeline, kwargs, line)
  else:
    harness.record(line)
    assert near_one(ppl_dtm, refs), line
  assert ppl_dtm > harness.dense_ppl, line  # the pruning is not a no-op


@pytest.mark.parametrize("full, case", _cases(GPTQ))
def test_gptq_matches_reference_pipeline(harness, full, case):
  layers = _layers(full, harness)
  method, kwargs = case
  dtm_params, dtm_w, t_dtm = harness.dtm(method, layers)
  ref_params, ref_w, t_ref = harness.torch("gptq_sequential", kwargs, layers)
  values = agreement(dtm_w, ref_w, same_value)
  first = agreement({k: v for k, v in dtm_w.items() if k[0] == 0}, ref_w, same_value)
  ppl_dtm, ppl_ref = harness.perplexity(dtm_params), harness.perplexity(ref_params)
  # the reference against itself: a rounding near-tie flips a code and the error
  # feedback carries the change along the rest of the row, so equal weights are
  # compared with that noise floor
  batched_params, batched_w, _ = harness.torch("gptq_sequential", kwargs, layers,
                                               batch_size=CAL_SAMPLES)
  floor = agreement(batched_w, ref_w, same_value)
  refs = [ppl_ref, harness.perplexity(batched_params)]
  line = (f"{method} layers 0-{layers - 1}: equal weights {values:.4%} (layer 0 {first:.4%}), "
          f"ppl dtm {ppl_dtm:.4f} torch {ppl_ref:.4f} dense {harness.dense_ppl:.4f}; "
          f"torch batched vs one-by-one: equal weights {floor:.4%}, ppl "
          f"{refs[1]:.4f}; {t_dtm:.0f} s / {t_ref:.0f} s")
  assert values >= floor - 0.01, line
  if full:
    line = harness.spread_check(method, "gptq_sequential", kwargs, line)
  else:
    harness.record(line)
    assert near_one(ppl_dtm, refs), line
  changed = np.mean([np.mean(dtm_w[k] != harness.original[k].numpy()) for k in dtm_w])
  assert changed > 0.5, line  # quantization moved the weights


# ---------------------------------------------------------------------------------- OWL
OWL_SPARSITY, OWL_LAMDA, OWL_M = 0.5, 0.08, 5.0


def dtm_owl_rates(harness) -> np.ndarray:
  """dtm's per-layer OWL sparsities from the dense model's statistics (all layers)."""
  from dtm.compress import owl
  from dtm.components import all_components
  cfg = harness.model.cfg
  stats = calibration.collect_statistics(cfg, harness.model.params, harness.windows,
                                         hessian=False)
  method = C.Method("owl", {"rate": OWL_SPARSITY, "lamda": OWL_LAMDA, "m": OWL_M})
  rates, _ = owl.allocate(harness.model.params, stats, all_components(cfg.num_layers), method)
  return np.asarray([rates[l] for l in range(cfg.num_layers)])


@pytest.fixture(scope="module")
def owl_rates(harness):
  """(dtm's rates, the reference's rates) of the first half of OWL on the same windows."""
  R.restore(harness.hf, harness.original)
  density = R.owl_layer_ratios(harness.hf, harness.windows, OWL_SPARSITY, OWL_LAMDA, OWL_M)
  return dtm_owl_rates(harness), 1 - density


def test_owl_layer_rates_match_reference(owl_rates):
  ours, ref = owl_rates
  line = f"OWL rates dtm {np.round(ours, 5).tolist()} ref {np.round(ref, 5).tolist()}"
  print(line)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6, err_msg=line)
  assert abs(np.mean(ours) - OWL_SPARSITY) < 1e-9  # the layers average the target
  assert np.ptp(ours) == pytest.approx(2 * OWL_LAMDA)  # spread over 2 lamda
  assert np.ptp(ours) > 0.1  # a real spread: the layers differ in outlier share


OWL_CASES = [
    pytest.param("wanda", "prune_wanda_outlier", id="owl-wanda"),
    pytest.param("sparsegpt", "prune_sparsegpt_outlier", id="owl-sparsegpt",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("operator, pipeline", OWL_CASES)
def test_owl_matches_reference_pipeline(harness, owl_rates, operator, pipeline):
  """All 30 layers (OWL's rates depend on every layer): rates as above, masks >= 99 %
  equal, perplexity within 1 %."""
  layers = harness.model.cfg.num_layers
  method = (f"owl({OWL_SPARSITY},method={operator},lamda={OWL_LAMDA},m={OWL_M:g})")
  dtm_params, dtm_w, t_dtm = harness.dtm(method, layers)
  R.restore(harness.hf, harness.original)
  start = time.perf_counter()
  ref_rates = getattr(R, pipeline)(harness.hf, harness.windows, OWL_SPARSITY, OWL_LAMDA, OWL_M)
  t_ref = time.perf_counter() - start
  ref_w = {k: w.numpy().copy() for k, w in R.linear_weights(harness.hf).items()}
  ref_params = harness.model.params
  for kind in R.KIND_MODULES:
    ref_params = C.set_kernel_layers(ref_params, kind, [(l, jnp.asarray(ref_w[(l, kind)].T))
                                                        for l in range(layers)])
  masks = agreement(dtm_w, ref_w, same_mask)
  ppl_dtm, ppl_ref = harness.perplexity(dtm_params), harness.perplexity(ref_params)
  per_layer = np.asarray([np.mean([np.mean(dtm_w[(l, k)] == 0) for k in R.KIND_MODULES])
                          for l in range(layers)])
  line = (f"{method}: masks agree {masks:.4%}, ppl dtm {ppl_dtm:.4f} torch {ppl_ref:.4f} "
          f"dense {harness.dense_ppl:.4f}; {t_dtm:.0f} s / {t_ref:.0f} s")
  harness.record(line)
  np.testing.assert_allclose(owl_rates[0], ref_rates, atol=1e-6, err_msg=line)
  # each layer pruned at its own rate (per output row / block: within one weight a row)
  np.testing.assert_allclose(per_layer, ref_rates, atol=2e-3, err_msg=line)
  assert masks >= 0.99, line
  assert abs(ppl_dtm / ppl_ref - 1) < 0.01, line
