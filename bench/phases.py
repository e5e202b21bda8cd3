"""Where the time goes, per phase: dtm against PyTorch on this CPU, for the train step and
for the calibrated methods (issue 21).

  .venv/bin/python bench/phases.py [--part train,calib] [--repeats 3] [--hlo]
      [--spec 'mlp@*:magnitude(0.5)'] [--vocab-chunk 8192] [--remat]           (train)
      [--methods 'wanda(0.5),sparsegpt(0.5),gptq(4,group_size=64)'] [--layers N]
      [--samples 16] [--length 256] [--dtm-batch 8] [--torch-batch 1]          (calib)
      [--torch-threads 2] [--no-torch]

Train (bench/train.py's setting: SmolLM2-135M, batch 8 x 256, the spec's masks, CE,
AdamW, float32). dtm's step is cut into the two functions it is made of
(`dtm.train.step.gradients`, `apply_gradients`), each jitted on its own: forward (the
loss alone, `batch_loss`), forward + backward (`gradients`), optimizer + masking
(`apply_gradients` on those gradients, state donated), and the whole step
(`compile_step`, one jit). torch (LlamaForCausalLM sdpa, AdamW foreach): the forward
with autograd recording, forward + `backward()`, then masking + clipping + AdamW +
re-masking (`bench.train.torch_update`). backward = (forward + backward) - forward.
Each phase: the first call (dtm: compilation included) and the median of --repeats
further calls, and their minor page faults per call (fresh memory touched: every
fault is a 4 KiB page the kernel hands out and zeroes). Useful GFLOP/s by MaxText's
counting (forward 1/3 of the step's FLOPs). --remat: dtm's layers rematerialised in the
backward pass (`ModelConfig.remat`; torch unchanged).

Calib (bench/prune.py's setting): dtm's `calibrate_and_compress` and the torch reference
pipelines (tests/torch_reference.py), each run with timers around its own pieces:
  layer forward   the pass that feeds the compressed layer's output to the next layer
  statistics      the statistics pass (forward + X^T X or sq norms) minus a forward
  solve           the per-matrix work of a layer (Wanda metric + mask, SparseGPT OBS,
                  GPTQ column loop; dtm: one call per input site, q/k/v and gate/up
                  together)
  layer-0 inputs  embedding (dtm) / the model up to layer 0, one window a call (torch)
  other           the rest of the wall time (host work, kernels written back)
dtm runs twice per method: the first run pays the compilations, the second is the
compiled run; "compile" = first-run layer-0 call - the compiled run's per-layer median,
summed over the layer forward, statistics pass and solve. torch runs once (no compile).

--hlo: the optimized HLO of dtm's forward + backward (and of the calibration statistics
pass): per loop, the trips, dots, transposes, copies, fusions, MB moved per trip and
the float32 [B, Hq, T, S] attention-score buffers written per trip; then one profiled
call, its thunk seconds by kind of op and its slowest instructions (bench/xla_ops.py).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import resource
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # torch_reference: the test oracle
from bench import common  # noqa: E402
from bench import prune as prune_bench  # noqa: E402
from bench import quantize as quantize_bench  # noqa: E402
from bench import train as train_bench  # noqa: E402
from bench import xla_ops  # noqa: E402

import jax  # noqa: E402

from dtm import data, gguf_io  # noqa: E402
from dtm.compress import calibration, site  # noqa: E402
from dtm.loading import load_model  # noqa: E402
from dtm.train import masks as masks_lib  # noqa: E402
from dtm.train import sharding  # noqa: E402
from dtm.train import step as step_lib  # noqa: E402

CALIB_CASES = {**prune_bench.CASES, **quantize_bench.CASES}


def _call(fn) -> tuple[float, int]:
  """(seconds, minor page faults) of one blocking call."""
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  seconds = common.timed(fn)
  return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def first_and_median(fn, repeats: int) -> tuple[float, float, float]:
  """(seconds of the first call, median seconds of `repeats` more, their median minor
  page faults per call); fn must block."""
  first, _ = _call(fn)
  runs = [_call(fn) for _ in range(repeats)]
  return (first, statistics.median(s for s, _ in runs), statistics.median(f for _, f in runs))


# --------------------------------------------------------------------------------- train


def dtm_train(cfg, params, spec, batches, repeats, vocab_chunk, hlo: bool) -> dict:
  """{phase: (first s, median s, faults)} of dtm's train step pieces (module docstring);
  hlo: print the HLO summary and an op profile of forward + backward."""
  d = train_bench.dtm_setup(cfg, params, spec, vocab_chunk)
  state, bs = d.pop("state"), d["bs"]
  batch = sharding.put_batch(batches[0], bs)
  obj, plan, oc = d["obj"], d["plan"], d["oc"]
  fwd = jax.jit(lambda p, b: step_lib.batch_loss(cfg, obj, plan, p, None, b, bs).loss)
  grads_fn = jax.jit(functools.partial(step_lib.gradients, teacher_params=None, cfg=cfg, obj=obj,
                                       plan=plan, microbatches=1, rows=bs))
  update = jax.jit(functools.partial(step_lib.apply_gradients, tx=d["tx"], masked=True,
                                     schedule=step_lib.lr_schedule(oc), clip_norm=oc.clip_norm),
                   donate_argnums=(0,))
  params_ = state["params"]
  out, box = {}, {"state": state}
  out["forward"] = first_and_median(lambda: fwd(params_, batch).block_until_ready(), repeats)

  def fwd_bwd():
    box["grads"] = None  # the previous gradients are freed before the next call
    box["grads"] = jax.block_until_ready(grads_fn(params_, batch))

  out["forward + backward"] = first_and_median(fwd_bwd, repeats)
  if hlo:
    text = grads_fn.lower(params_, batch).compile().as_text()
    b, t = batch.shape[0], batch.shape[1] - 1
    xla_ops.print_hlo("dtm forward + backward (dtm.train.step.gradients)", text,
                      (b, cfg.num_attention_heads, t, t))
    xla_ops.print_op_seconds("dtm forward + backward", fwd_bwd, text, out["forward + backward"][1])

  def opt():
    box["state"], m = update(box["state"], *box["grads"])
    jax.block_until_ready((box["state"], m))

  out["optimizer + masking"] = first_and_median(opt, repeats)
  box["grads"] = None

  def step():
    box["state"], m = d["step"](box["state"], batch, None)
    jax.block_until_ready((box["state"], m))

  out["whole step"] = first_and_median(step, repeats)
  return out


def torch_train(cfg, masks, spec_params, batches, repeats) -> dict:
  """{phase: (first s, median s, faults)} of the PyTorch loop's pieces (module docstring)."""
  model, torch_masks, opt = train_bench.torch_setup(cfg, masks, spec_params)
  out = {"forward": first_and_median(
      lambda: float(train_bench.torch_loss(model, batches[0]).detach()), repeats)}
  fb, up = [], []
  for _ in range(repeats + 1):
    fb.append(_call(lambda: train_bench.torch_loss(model, batches[0]).backward()))
    up.append(_call(lambda: train_bench.torch_update(model, torch_masks, opt)))
  steps = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(fb, up)]
  for phase, runs in (("forward + backward", fb), ("optimizer + masking", up),
                      ("whole step", steps)):
    out[phase] = (runs[0][0], statistics.median(s for s, _ in runs[1:]),
                  statistics.median(f for _, f in runs[1:]))
  return out


def train_part(model, args, peak: float) -> None:
  cfg, params = model.cfg, model.params
  if args.remat:
    cfg = cfg.replace(remat=True)
  batches = train_bench.train_batches(model.tokenizer, 1)
  tokens = train_bench.BATCH * train_bench.SEQ
  step_flops = step_lib.train_flops_per_token(cfg, train_bench.SEQ, teacher=False) * tokens
  flops = {"forward": step_flops / 3, "backward": step_flops * 2 / 3,
           "whole step": step_flops}
  print(f"\n== train: SmolLM2-135M, batch {train_bench.BATCH} x {train_bench.SEQ}, spec "
        f"{args.spec!r}, CE (vocab chunk {args.vocab_chunk}), AdamW, dtm remat {cfg.remat}; "
        f"{step_flops / 1e12:.2f} TFLOP per step (MaxText counting)", flush=True)
  res = {"dtm": dtm_train(cfg, params, args.spec, batches, args.repeats, args.vocab_chunk,
                          args.hlo)}
  if not args.no_torch:
    plan = masks_lib.make_plan(args.spec, params)
    spec_params, masks = jax.jit(lambda p: masks_lib.prune(plan, p))(params)
    res["torch"] = torch_train(cfg, masks, spec_params, batches, args.repeats)
  for side in res.values():  # backward = (forward + backward) - forward, per column
    side["backward"] = tuple(a - b for a, b in zip(side["forward + backward"], side["forward"]))
    side["forward + backward + optimizer"] = tuple(
        a + b for a, b in zip(side["forward + backward"], side["optimizer + masking"]))
  order = ["forward", "backward", "forward + backward", "optimizer + masking",
           "forward + backward + optimizer", "whole step"]
  rows = []
  for phase in order:
    row = [phase]
    for name, side in res.items():
      first, med, faults = side[phase]
      gf = f"{flops[phase] / med / 1e9:.0f} ({100 * flops[phase] / med / 1e9 / peak:.0f} %)" \
          if phase in flops else ""
      row += [f"{first:.3f}", f"{med:.3f}", gf, f"{faults / 1e3:.0f}"]
    if "torch" in res:
      row.append(f"{res['torch'][phase][1] / res['dtm'][phase][1]:.2f}")
    rows.append(tuple(row))
  header = ["phase"] + [c for n in res for c in (f"{n} first s", f"{n} s", f"{n} GFLOP/s",
                                                 f"{n} k faults")]
  header += ["torch / dtm"] if "torch" in res else []
  print(common.table(rows, tuple(header)))
  print("(first: the first call, dtm's compilation included; s: median of the next "
        f"{args.repeats}; k faults: minor page faults per call, thousands; torch's whole step "
        "= its forward + backward and optimizer calls; dtm's is one jit of the same work)")


# --------------------------------------------------------------------------------- calib


@contextlib.contextmanager
def patched(obj, name: str, wrapper):
  """obj.name replaced by wrapper(original) inside the block."""
  original = getattr(obj, name)
  setattr(obj, name, wrapper(original))
  try:
    yield
  finally:
    setattr(obj, name, original)


class LayerLog:
  """Seconds per (layer, phase), filled by the timers around each side's pieces."""

  def __init__(self):
    self.layer, self.seconds = -1, {}

  def add(self, phase: str, seconds: float, layer: int | None = None) -> None:
    key = (self.layer if layer is None else layer, phase)
    self.seconds[key] = self.seconds.get(key, 0.0) + seconds

  def values(self, phase: str) -> list[float]:
    return [s for (l, p), s in sorted(self.seconds.items()) if p == phase]


def _timer(log: LayerLog, phase_of):
  def wrap(fn):
    def timed_fn(*args, **kwargs):
      t = time.perf_counter()
      out = jax.block_until_ready(fn(*args, **kwargs))
      log.add(phase_of(args, kwargs), time.perf_counter() - t)
      return out
    return timed_fn
  return wrap


def dtm_calib_run(model, method: str, windows, layers: int, batch: int) -> tuple[LayerLog, float]:
  """One `calibrate_and_compress` run with timers -> (LayerLog, wall seconds)."""
  log = LayerLog()

  def pass_phase(args, kwargs):
    if kwargs["stats"]:
      log.layer += 1
      return "stats pass"
    return "forward"

  spec = f"*@0-{layers - 1}:{method}"
  with patched(calibration, "_layer_pass", _timer(log, pass_phase)), \
       patched(calibration, "_embed", _timer(log, lambda a, k: "layer-0 inputs")), \
       patched(site, "compress_site", _timer(log, lambda a, k: "solve")):
    wall = common.timed(lambda: jax.block_until_ready(calibration.calibrate_and_compress(
        model.cfg, model.params, spec, windows, batch_size=batch)[0]))
  return log, wall


def torch_calib_run(R, hf, method: str, windows, layers: int, batch: int) -> tuple[LayerLog, float]:
  """One reference pipeline run with timers around its layer calls, statistics
  accumulators and per-matrix compressions -> (LayerLog, wall seconds)."""
  log = LayerLog()
  state = {"pass": "forward"}

  def seq_wrapper(sequential):
    def timed_sequential(model, windows_NT, make_stats, compress, progress=None, **loop):
      def stats(columns):
        if state["pass"] != "stats pass":
          log.layer, state["pass"] = log.layer + 1, "stats pass"
        return make_stats(columns)

      def comp(lin, s, kind):
        state["pass"] = "forward"
        log.add("solve", common.timed(lambda: compress(lin, s, kind)))
      return sequential(model, windows_NT, stats, comp, progress, **loop)
    return timed_sequential

  pipeline, kwargs = CALIB_CASES[method]
  with patched(R, "sequential", seq_wrapper), \
       patched(R, "_layer_out", _timer(log, lambda a, k: state["pass"])), \
       patched(R, "layer0_inputs", _timer(log, lambda a, k: "layer-0 inputs")):
    wall = common.timed(lambda: getattr(R, pipeline)(hf, windows, num_layers=layers,
                                                     batch_size=batch, **kwargs))
  return log, wall


def phase_totals(log: LayerLog, wall: float, layers: int) -> dict[str, tuple[float, float]]:
  """{phase: (median per layer s, total s)} of one run (module docstring's phases)."""
  fwd, sp, solve = log.values("forward"), log.values("stats pass"), log.values("solve")
  f = statistics.median(fwd[1:] or fwd)
  out = {"layer-0 inputs": (sum(log.values("layer-0 inputs")),) * 2,
         "layer forward": (f, sum(fwd) + f * layers),
         "statistics": (statistics.median(sp[1:]) - f, sum(sp) - f * layers),
         "solve": (statistics.median(solve[1:]), sum(solve))}
  out["other"] = (float("nan"), wall - sum(t for _, t in out.values()))
  out["whole run"] = (float("nan"), wall)
  return out


def compile_seconds(first: LayerLog, compiled: LayerLog) -> float:
  """Sum over the per-layer pieces of (first run's layer-0 call - compiled median)."""
  total = 0.0
  for phase in ("forward", "stats pass", "solve"):
    a, b = first.values(phase), compiled.values(phase)
    if a and b:
      total += a[0] - statistics.median(b[1:] or b)
  return total


def calib_part(model, args) -> None:
  layers = args.layers or model.cfg.num_layers
  methods = prune_bench.split_methods(args.methods)
  unknown = [m for m in methods if m not in CALIB_CASES]
  if unknown:
    sys.exit(f"unknown method(s) {unknown}; choose from {list(CALIB_CASES)}")
  stream = data.tokenize_corpus(model.tokenizer, data.load_texts(
      "text", data_files=prune_bench.WIKITEXT_VALID), add_bos=False)
  windows = calibration.calibration_windows(stream, samples=args.samples, length=args.length,
                                            seed=0)
  print(f"\n== calib: SmolLM2-135M float32, layers 0-{layers - 1}, {args.samples} x "
        f"{args.length} WikiText-2 valid tokens; dtm batch {args.dtm_batch}, torch batch "
        f"{args.torch_batch} ({args.torch_threads} threads)", flush=True)
  R = hf = original = None
  if not args.no_torch:
    import torch
    import torch_reference as R
    torch.set_num_threads(args.torch_threads)
    hf = R.load_hf_smollm2(gguf_io.find_smollm2_gguf())
    original = R.snapshot(hf)
  for method in methods:
    first_log, first_wall = dtm_calib_run(model, method, windows, layers, args.dtm_batch)
    log, wall = dtm_calib_run(model, method, windows, layers, args.dtm_batch)
    dtm = phase_totals(log, wall, layers)
    ref = None
    if hf is not None:
      R.restore(hf, original)
      ref = phase_totals(*torch_calib_run(R, hf, method, windows, layers, args.torch_batch),
                         layers)
    firsts = first_calls(first_log, log)
    rows = []
    for phase, (per_layer, total) in dtm.items():
      row = [phase, _fmt(firsts.get(phase)), _fmt(per_layer), f"{total:.2f}"]
      if ref is not None:
        row += [_fmt(ref[phase][0]), f"{ref[phase][1]:.2f}", f"{ref[phase][1] / total:.2f}"]
      rows.append(tuple(row))
    comp = compile_seconds(first_log, log)
    rows.append(("compile (first - compiled)", "", "", f"{comp:.2f}"))
    rows.append(("whole run, first (compile included)", "", "", f"{first_wall:.2f}",
                 *(["", f"{ref['whole run'][1]:.2f}", f"{ref['whole run'][1] / first_wall:.2f}"]
                   if ref else [])))
    header = ("phase", "dtm first call s", "dtm s/layer", "dtm total s (compiled run)")
    if ref is not None:
      header += ("torch s/layer", "torch total s", "torch / dtm")
    print(f"\n{method}")
    print(common.table([r + ("",) * (len(header) - len(r)) for r in rows], header), flush=True)
  if args.hlo:
    print_calib_hlo(model, windows, args.dtm_batch)


def first_calls(first: LayerLog, compiled: LayerLog) -> dict[str, float]:
  """The first run's layer-0 seconds per phase (compilation included); statistics = the
  stats pass minus the compiled forward."""
  f = statistics.median(compiled.values("forward")[1:] or compiled.values("forward"))
  return {"layer forward": first.values("forward")[0],
          "statistics": first.values("stats pass")[0] - f, "solve": first.values("solve")[0]}


def _fmt(x: float | None) -> str:
  return "" if x is None or x != x else f"{x:.3f}"


def print_calib_hlo(model, windows, batch: int) -> None:
  """HLO summary and op profile of one layer's statistics pass (X^T X at every site)."""
  cfg = model.cfg
  h = calibration._embed(cfg, model.params["embed"], jax.numpy.asarray(windows))
  lp = calibration.layer_params(model.params, 0)
  run = functools.partial(calibration._layer_pass, cfg, lp, h, batch_size=batch, stats=True,
                          hessian=True, sharding=None)
  text = calibration._layer_pass.lower(cfg, lp, h, batch_size=batch, stats=True, hessian=True,
                                       sharding=None).compile().as_text()
  t = windows.shape[1]
  xla_ops.print_hlo("dtm calibration statistics pass (one layer, X^T X at 4 sites)", text,
                    (batch, cfg.num_attention_heads, t, t))
  jax.block_until_ready(run())
  xla_ops.print_op_seconds("dtm calibration statistics pass", lambda: jax.block_until_ready(run()),
                           text)


# ---------------------------------------------------------------------------------- main


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--part", default="train,calib")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--hlo", action="store_true")
  p.add_argument("--spec", default="mlp@*:magnitude(0.5)")
  p.add_argument("--remat", action="store_true", help="dtm: rematerialise each layer")
  p.add_argument("--vocab-chunk", type=int, default=8192)
  p.add_argument("--methods", default="wanda(0.5),sparsegpt(0.5),gptq(4,group_size=64)")
  p.add_argument("--layers", type=int, default=0, help="first N layers (0: all)")
  p.add_argument("--samples", type=int, default=16)
  p.add_argument("--length", type=int, default=256)
  p.add_argument("--dtm-batch", type=int, default=8)
  p.add_argument("--torch-batch", type=int, default=1)
  p.add_argument("--torch-threads", type=int, default=2)
  p.add_argument("--no-torch", action="store_true")
  args = p.parse_args(argv)
  parts = {s.strip() for s in args.part.split(",")}
  if not parts <= {"train", "calib"} or args.repeats < 1:
    sys.exit("--part takes train and/or calib, --repeats >= 1")
  print(f"CPU: {common.cpu_model()}, {len(os.sched_getaffinity(0))} cores; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; jax {jax.__version__}")
  peak = common.matmul_peak()
  print(f"float32 2048^3 matmul (jit): {peak:.1f} GFLOP/s", flush=True)
  if not args.no_torch:
    import torch
    torch.set_num_threads(args.torch_threads)
    print(f"float32 2048^3 matmul (torch, {args.torch_threads} threads): "
          f"{common.torch_matmul_peak():.1f} GFLOP/s", flush=True)
  model = load_model("smollm2-135m")
  if "train" in parts:
    train_part(model, args, peak)
  if "calib" in parts:
    calib_part(model, args)
  print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
  main()
