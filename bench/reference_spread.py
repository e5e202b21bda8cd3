"""How far does a harmless change of float32 summation order move a calibrated method's
perplexity, in dtm and in the reference pipeline? (Not a speed benchmark: the noise floor
behind the README's dtm-vs-reference perplexity comparison.)

Both pipelines compress all layers of SmolLM2-135M on the same 16 x 256 WikiText-2 valid
calibration windows (seed 0, as tests/test_reference_pipelines.py), once per calibration
batch size (the number of windows per layer call, which changes only the order in which
the Hessian and the layer outputs are summed). Perplexity by `dtm.evaluation.perplexity` on
the test's 4 x 256 WikiText-2 test windows and on a larger set (`--ppl-windows` x 256).

  python bench/reference_spread.py --spec 'gptq(4,group_size=64)' --batches 1,2,4,8,16

The reference is tests/torch_reference.py (IST-DASLab gptq / sparsegpt `llama_sequential`,
locuslab/wanda `prune_wanda`) on transformers' LlamaForCausalLM from the same GGUF.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

from bench import common  # noqa: E402

# dtm method -> (torch pipeline, its arguments)
REFERENCE = {
    "gptq(4,group_size=64)": ("gptq_sequential", dict(bits=4, groupsize=64)),
    "gptq(4,group_size=64,act_order=True)": ("gptq_sequential", dict(
        bits=4, groupsize=64, actorder=True, static_groups=True)),
    "gptq(8)": ("gptq_sequential", dict(bits=8)),
    "sparsegpt(0.5)": ("sparsegpt_sequential", dict(sparsity=0.5)),
    "sparsegpt(2,4)": ("sparsegpt_sequential", dict(prunen=2, prunem=4)),
    "wanda(0.5)": ("prune_wanda", dict(sparsity_ratio=0.5)),
    "wanda(2,4)": ("prune_wanda", dict(prune_n=2, prune_m=4)),
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--spec", default="gptq(4,group_size=64)", choices=sorted(REFERENCE))
  ap.add_argument("--batches", default="1,2,4,8,16", help="calibration batch sizes")
  ap.add_argument("--ppl-windows", type=int, default=32, help="larger PPL set (x 256 tokens)")
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args()
  print(f"CPU: {common.cpu_model()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}")

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import torch_reference as R
  from dtm import compress as C, data, evaluation, gguf_io
  from dtm.compress import calibration
  from dtm.loading import load_model

  torch.set_num_threads(2)
  shared = os.path.join(os.path.dirname(REPO), "shared", "data")
  model = load_model("smollm2-135m")
  cfg = model.cfg
  valid = data.tokenize_corpus(model.tokenizer, data.load_texts(
      "text", data_files=os.path.join(shared, "wikitext-2", "wiki.valid.tokens")), add_bos=False)
  windows = calibration.calibration_windows(valid, samples=16, length=256, seed=0)
  test = data.tokenize_corpus(model.tokenizer, data.load_texts(
      "text", data_files=os.path.join(shared, "wikitext-2-raw", "wiki.test.raw")), add_bos=False)
  small = data.ppl_windows(test, length=256, max_windows=4)
  large = data.ppl_windows(test, length=256, max_windows=args.ppl_windows)

  def ppl(params, w):
    return evaluation.perplexity(cfg, params, w.tokens, w.ctx_len, batch_size=4,
                                 desc=None)["ppl"]

  print(f"dense: ppl(4 x 256) {ppl(model.params, small):.3f}, "
        f"ppl({large.tokens.shape[0]} x 256) {ppl(model.params, large):.3f}")
  batches = [int(b) for b in args.batches.split(",")]
  rows: dict[str, list[tuple[int, float, float, float]]] = {"dtm": [], "torch": []}
  spec = f"*@*:{args.spec}"
  for b in batches:
    t = time.perf_counter()
    params, _ = calibration.calibrate_and_compress(cfg, model.params, spec, windows,
                                                   batch_size=b)
    jax.block_until_ready(params)
    s = time.perf_counter() - t
    rows["dtm"].append((b, ppl(params, small), ppl(params, large), s))
    print(f"dtm   batch {b:2d}: ppl small {rows['dtm'][-1][1]:.3f} large "
          f"{rows['dtm'][-1][2]:.3f} ({s:.0f} s)", flush=True)
  if not args.no_torch:
    pipeline, kwargs = REFERENCE[args.spec]
    hf = R.load_hf_smollm2(gguf_io.find_smollm2_gguf())
    original = R.snapshot(hf)
    for b in batches:
      R.restore(hf, original)
      t = time.perf_counter()
      getattr(R, pipeline)(hf, windows, batch_size=b, **kwargs)
      s = time.perf_counter() - t
      params = model.params
      weights = R.linear_weights(hf)
      for kind in R.KIND_MODULES:
        params = C.set_kernel_layers(params, kind, [
            (l, jnp.asarray(weights[(l, kind)].numpy().T)) for l in range(cfg.num_layers)])
      rows["torch"].append((b, ppl(params, small), ppl(params, large), s))
      print(f"torch batch {b:2d}: ppl small {rows['torch'][-1][1]:.3f} large "
            f"{rows['torch'][-1][2]:.3f} ({s:.0f} s)", flush=True)
  print(f"\n{args.spec}, all layers, calibration batch sizes {batches}")
  print("| pipeline | PPL 4 x 256: mean ± sd [min, max] | PPL "
        f"{large.tokens.shape[0]} x 256: mean ± sd [min, max] |")
  print("| --- | --- | --- |")
  for name, r in rows.items():
    if not r:
      continue
    cells = []
    for col in (1, 2):
      v = [x[col] for x in r]
      sd = statistics.stdev(v) if len(v) > 1 else 0.0
      cells.append(f"{statistics.mean(v):.2f} ± {sd:.2f} [{min(v):.2f}, {max(v):.2f}]")
    print(f"| {name} | {cells[0]} | {cells[1]} |")
  del np


if __name__ == "__main__":
  main()
