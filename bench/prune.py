"""Calibrated pruning speed on SmolLM2-135M: dtm's `calibrate_and_compress` against the
PyTorch transcriptions of the reference pipelines (tests/torch_reference.py: locuslab/wanda
`prune_wanda`, IST-DASLab/sparsegpt `llama_sequential`), one run.

  .venv/bin/python bench/prune.py [--samples 16] [--length 256] [--layers N]
                                  [--methods 'wanda(0.5),wanda(2,4),sparsegpt(0.5),sparsegpt(2,4)']
                                  [--dtm-batch 8] [--torch-batches 1,16]
                                  [--torch-threads 2] [--no-torch]
  .venv/bin/python bench/prune.py --round [--workdir DIR] [-- --config.prune.k=21 ...]

With --round: one round of the prune job (configs/prune.py on SmolLM2, its defaults unless
overridden, `prune.max_rounds=1`, a fresh workdir) and the seconds of its phases from
rounds.jsonl: the original model's held-out evaluation (round 0), then round 1's selection
(probing every candidate increment), pruning + continued training (+ saving the round's
model) and held-out evaluation; the job's own start-up (load, references) is the rest.

Both sides compress the first --layers decoder layers (default all) of the same model
(float32; transformers' LlamaForCausalLM loaded from the same GGUF file) with the same
calibration windows (`calibration.calibration_windows` of the WikiText-2 validation split,
--samples x --length tokens, seed 0). dtm: `calibrate_and_compress` of '*@0-{L-1}:<method>'
with --dtm-batch windows per layer call (default 8, the jobs' calibration.batch_size), one
JAX device on all cores, run twice: the first run's wall time includes its jit
compilation (each method compiles once per weight shape), the second is the compiled
run. torch: the reference layer loop, once per --torch-batches entry:
1 = one sequence per layer call as the references, 16 = all windows in one call (the
strongest version of the same work; it changes only the summation order). Prints the
CPU, seconds of each, the ratios torch / dtm, and the mask agreement of dtm with the
first torch run. Timings are only meaningful on an
otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # torch_reference: the test oracle
from bench import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dtm import compress as C, data, gguf_io  # noqa: E402
from dtm.components import kernel_path  # noqa: E402
from dtm.compress import calibration  # noqa: E402
from dtm.loading import load_model  # noqa: E402

WIKITEXT_VALID = os.path.join(os.path.dirname(_ROOT), "shared", "data", "wikitext-2",
                              "wiki.valid.tokens")

# dtm method -> (torch_reference pipeline, its arguments; prune_n / prunen = number PRUNED)
CASES = {
    "wanda(0.5)": ("prune_wanda", dict(sparsity_ratio=0.5)),
    "wanda(2,4)": ("prune_wanda", dict(prune_n=2, prune_m=4)),
    "sparsegpt(0.5)": ("sparsegpt_sequential", dict(sparsity=0.5)),
    "sparsegpt(2,4)": ("sparsegpt_sequential", dict(prunen=2, prunem=4)),
}



def split_methods(text: str) -> list[str]:
  """'wanda(0.5),gptq(4,group_size=64)' -> methods, splitting on commas outside parens."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += (ch == "(") - (ch == ")")
    if ch == "," and depth == 0:
      out.append(cur.strip())
      cur = ""
    else:
      cur += ch
  return [m for m in out + [cur.strip()] if m]


def compare(cases: dict, description: str, default_methods: str, argv=None,
            equal=lambda a, b: (a == 0) == (b == 0), agree_name: str = "masks agree") -> None:
  """Parse the flags of the module docstring, time dtm and torch per method, print a table."""
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--samples", type=int, default=16)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--layers", type=int, default=0, help="first N layers (0: all)")
  p.add_argument("--methods", default=default_methods)
  p.add_argument("--dtm-batch", type=int, default=8, help="dtm: windows per layer call")
  p.add_argument("--torch-batches", default="1,16",
                 help="torch: windows per layer call, one timed run each")
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)
  methods = split_methods(args.methods)
  torch_batches = [int(b) for b in args.torch_batches.split(",") if b.strip()]
  if not torch_batches or any(args.samples % b for b in torch_batches + [args.dtm_batch]):
    sys.exit(f"--dtm-batch and --torch-batches must divide --samples={args.samples}")
  unknown = [m for m in methods if m not in cases]
  if unknown:
    sys.exit(f"unknown method(s) {unknown}; choose from {list(cases)}")
  print(f"CPU: {common.cpu_model()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}")
  model = load_model("smollm2-135m")
  layers = args.layers or model.cfg.num_layers
  stream = data.tokenize_corpus(model.tokenizer, data.load_texts("text", data_files=WIKITEXT_VALID),
                                add_bos=False)
  windows = calibration.calibration_windows(stream, samples=args.samples, length=args.length,
                                            seed=0)
  print(f"SmolLM2-135M float32, layers 0-{layers - 1}, calibration {args.samples} x "
        f"{args.length} WikiText-2 valid tokens")
  hf = original = None
  if not args.no_torch:
    import torch
    import torch_reference as R
    torch.set_num_threads(args.torch_threads)
    hf = R.load_hf_smollm2(gguf_io.find_smollm2_gguf())
    original = R.snapshot(hf)
  header = ("method", f"dtm first s (batch {args.dtm_batch})", "dtm compiled s",
            *[c for b in torch_batches
              for c in (f"torch s (batch {b})", "torch / dtm first", "torch / dtm compiled")],
            agree_name + f" (torch batch {torch_batches[0]})")
  rows = []
  for method in methods:
    box = {}

    def run_dtm():
      box["params"], _ = calibration.calibrate_and_compress(
          model.cfg, model.params, f"*@0-{layers - 1}:{method}", windows,
          batch_size=args.dtm_batch, progress=True)
      jax.block_until_ready(box["params"])

    t_dtm = common.timed(run_dtm)  # first run: pays the compilations
    t_compiled = common.timed(run_dtm)  # the same work again, compiled
    times = (f"{t_dtm:.1f}", f"{t_compiled:.1f}")
    if hf is None:
      rows.append((method, *times, *["-"] * (3 * len(torch_batches) + 1)))
      print(common.table(rows[-1:], header), flush=True)
      continue
    pipeline, kwargs = cases[method]
    cells, agree = [], None
    for b in torch_batches:
      R.restore(hf, original)
      t_ref = common.timed(lambda: getattr(R, pipeline)(hf, windows, num_layers=layers,
                                                        batch_size=b, **kwargs))
      cells += [f"{t_ref:.1f}", f"{t_ref / t_dtm:.2f}", f"{t_ref / t_compiled:.2f}"]
      if agree is None:
        ref = R.linear_weights(hf)
        same = total = 0
        for kind in R.KIND_MODULES:
          kernel = np.asarray(C.get_path(box["params"], kernel_path(kind)))
          for l in range(layers):
            same += int(np.sum(equal(kernel[l].T, ref[(l, kind)].numpy())))
            total += kernel[l].size
        agree = f"{same / total:.4%}"
    rows.append((method, *times, *cells, agree))
    print(common.table(rows[-1:], header), flush=True)
  print()
  print(common.table(rows, header))


def time_round(argv) -> None:
  """--round: time the phases of one prune-job round (see the module docstring)."""
  import json
  import subprocess
  import tempfile
  import time
  p = argparse.ArgumentParser(description="one prune round, timed by phase")
  p.add_argument("--round", action="store_true")
  p.add_argument("--workdir", default="", help="fresh directory (default: a temporary one)")
  p.add_argument("overrides", nargs="*", help="extra --config.* flags of configs/prune.py")
  args = p.parse_args(argv)
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench-prune-round-")
  if os.path.exists(os.path.join(workdir, "rounds.jsonl")):
    sys.exit(f"{workdir} already holds a prune run; give a fresh --workdir")
  print(f"CPU: {common.cpu_model()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}")
  cmd = [sys.executable, os.path.join(_ROOT, "main.py"), "--config=configs/prune.py",
         f"--workdir={workdir}", "--config.prune.max_rounds=1", *args.overrides]
  print("+", " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  subprocess.run(cmd, cwd=_ROOT, check=True)
  total = time.perf_counter() - t0
  with open(os.path.join(workdir, "rounds.jsonl")) as f:
    base, rec = [json.loads(line) for line in f][:2]
  ph = rec["phase_seconds"]
  rows = [("held-out evaluation of F (round 0)", f"{base['seconds']:.1f}"),
          (f"round 1 selection ({rec['num_candidates']} candidate probes)",
           f"{ph['selection']:.1f}"),
          ("round 1 prune + continued training + save", f"{ph['prune_and_train']:.1f}"),
          ("round 1 held-out evaluation", f"{ph['evaluation']:.1f}"),
          ("whole job (incl. load, references, compilation)", f"{total:.1f}")]
  print(f"round 1: +{len(rec['chosen'])} increments, sparsity {rec['sparsity']:.4f}")
  print(common.table(rows, ("phase", "seconds")))


if __name__ == "__main__":
  if "--round" in sys.argv[1:]:
    time_round(sys.argv[1:])
    sys.exit(0)
  compare(CASES, "dtm vs reference pruning pipelines (Wanda, SparseGPT)",
          ",".join(CASES))
