"""Probe-sweep speed on SmolLM2-135M against PyTorch transformers loops.

Same 16 WikiText prompts (c=64, N=32) and the same 14 probes (layers 0,5,10,15,20,25,29
x kinds q and down, magnitude 50%) for every contender, in one run:
  * dtm: the vmapped, prefix-reusing sweep (`dtm.probe.ProbeRunner`), after compile,
    with one JAX CPU device per core as the probe job uses (each device runs its own
    component; `--cpu-devices=1`: one device whose matmuls use both cores);
  * torch (a): prune one component, batched `generate(do_sample=False)`, FDT by comparison;
  * torch (b): prune one component, one batched teacher-forced forward pass, the LM head
    only at the N positions that predict the continuation (`logits_to_keep=N`; checked
    once per run against the full-head logits[:, c-1:]: same tokens, logits within 1e-4).
Prints seconds per probe (median of --repeats passes over the 14 probes, for every
contender: this shared 2-core machine's speed drifts by ~10% between minutes), ratios,
the sweep's useful GFLOP/s (`probe.useful_flops`: layers l..L-2 at all positions, the
last layer's queries/MLP at the N positions, the LM head at the N positions) and a
2048^3 float32 matmul's GFLOP/s.
`--full` also times the full 210-component sweep (one level) through the probe job.

  python bench/probe.py [--full] [--dtype bfloat16] [--cpu-devices N]
  python bench/probe.py --smoke     # 2 prompts, 2 probes, 1 pass: checks the script runs
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dtm import compress, evaluation, probe  # noqa: E402
from dtm.cli import set_cpu_devices  # noqa: E402
from dtm.components import Component  # noqa: E402
from dtm.loading import load_model  # noqa: E402

LAYERS = (0, 5, 10, 15, 20, 25, 29)
KINDS = ("q", "down")
P, C, N, RATE = 16, 64, 32, 0.5


def dtm_sweep(m, seq, probes, repeats: int):
  """Seconds per probe (median pass), compile seconds, FDT [probes, P]. The probes are
  grouped into calls of one component per device (`probe.schedule`), as the probe job
  does."""
  runner = probe.ProbeRunner(m.cfg, m.params, seq, C, probe.probe_mesh(), kinds=KINDS)
  jax.block_until_ready(runner.h_in)
  family = probe.MethodFamily("magnitude")

  def arg(comp):
    shape = m.params["layers"][probe.kernel_path(comp.kind)[1]][comp.kind]["kernel"].shape
    return probe.dynamic_arg(family, RATE, shape[1] * shape[2])

  calls = probe.schedule({c: [(i, arg(c))] for i, c in enumerate(probes)}, runner.num_devices, 1)
  t0 = time.perf_counter()  # one compile covers both kinds
  jax.block_until_ready(runner.run_slots(family, calls[-1]))
  compile_s = time.perf_counter() - t0
  times, fdt = [], np.zeros((len(probes), P), np.int64)
  for _ in range(repeats):  # each repeat: all calls, one in flight (as the probe job runs them)
    t0 = time.perf_counter()
    for slots, outs in runner.stream([(family, slots) for slots in calls]):
      for slot, out in zip(slots, outs):
        fdt[slot.keys[0]] = out["fdt"][0]
    times.append((time.perf_counter() - t0) / len(probes))
  return float(np.median(times)), compile_s, fdt


def torch_loops(m, prompts, y, probes, dtype: str, repeats: int):
  import torch
  from transformers import LlamaForCausalLM
  from dtm import gguf_io
  torch.set_num_threads(2)
  path = gguf_io.find_smollm2_gguf()
  hf = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                        torch_dtype=getattr(torch, dtype)).eval()
  seq = torch.as_tensor(np.concatenate([prompts, y], 1), dtype=torch.long)
  p = torch.as_tensor(prompts, dtype=torch.long)

  def module(comp):
    layer = hf.model.layers[comp.layer]
    return layer.self_attn.q_proj if comp.kind == "q" else layer.mlp.down_proj

  def pruned(w):  # magnitude 50%, ties -> lower HF flat index first (torch.sort stable)
    flat = w.abs().reshape(-1)
    order = torch.sort(flat, stable=True).indices
    out = w.clone().reshape(-1)
    out[order[:compress.num_pruned(RATE, flat.numel())]] = 0
    return out.reshape(w.shape)

  with torch.no_grad():  # logits_to_keep=N computes the head at the last N fed positions
    full = hf(seq[:, :-1]).logits[:, C - 1:]
    kept = hf(seq[:, :-1], logits_to_keep=N).logits
    if kept.shape != full.shape or not torch.equal(kept.argmax(-1), full.argmax(-1)):
      raise AssertionError(f"logits_to_keep={N} gives other tokens than the full head "
                           f"({tuple(kept.shape)} vs {tuple(full.shape)})")
    diff = float((kept.float() - full.float()).abs().max())
    if diff > 1e-4 * max(1.0, float(full.float().abs().max())):
      raise AssertionError(f"logits_to_keep={N}: logits differ from the full head by {diff}")
  t_gen, t_tf = [], []
  with torch.no_grad():
    for _ in range(repeats):
      t_gen.append(0.0)
      t_tf.append(0.0)
      fdt_gen, fdt_tf = [], []
      for comp in probes:
        mod = module(comp)
        orig = mod.weight.data.clone()
        mod.weight.data = pruned(orig)
        t = time.perf_counter()
        out = hf.generate(p, attention_mask=torch.ones_like(p), do_sample=False,
                          max_new_tokens=N, min_new_tokens=N, pad_token_id=0, eos_token_id=None)
        t_gen[-1] += time.perf_counter() - t
        div = (out[:, C:].numpy() != y)
        fdt_gen.append(np.where(div.any(1), div.argmax(1), N))
        t = time.perf_counter()
        logits = hf(seq[:, :-1], logits_to_keep=N).logits  # positions c-1 .. c+N-2
        t_tf[-1] += time.perf_counter() - t
        div = (logits.argmax(-1).numpy() != y)
        fdt_tf.append(np.where(div.any(1), div.argmax(1), N))
        mod.weight.data = orig
  k = len(probes)
  return (float(np.median(t_gen)) / k, float(np.median(t_tf)) / k, np.stack(fdt_gen),
          np.stack(fdt_tf))


def full_sweep(dtype: str) -> float:
  from configs import probe as probe_config
  from dtm.jobs import probe as probe_job
  config = probe_config.get_config()
  config.probe.levels = (RATE,)
  config.param_dtype = config.dtype = dtype
  with tempfile.TemporaryDirectory() as workdir:
    t = time.perf_counter()
    probe_job.run(config, workdir)
    return time.perf_counter() - t


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--full", action="store_true", help="also time the 210-component sweep")
  ap.add_argument("--dtype", default="float32", help="param/compute dtype of the dtm sweep")
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--repeats", type=int, default=3,
                  help="passes over the 14 probes per contender; the median is reported")
  ap.add_argument("--cpu-devices", type=int, default=0,
                  help="JAX CPU devices (0 = one per core, as the probe job does)")
  ap.add_argument("--smoke", action="store_true",
                  help="2 prompts, probes on layer 0 only, 1 pass: does the script run (no timing)")
  args = ap.parse_args()
  global P, LAYERS
  if args.smoke:
    P, LAYERS, args.repeats = 2, (0,), 1
  set_cpu_devices(args.cpu_devices)
  m = load_model("smollm2-135m", param_dtype=args.dtype, dtype=args.dtype)
  prompts = common.wikitext_prompts(m.tokenizer, P, C)
  y = evaluation.generate_references(m.cfg, m.params, prompts, N, P)
  seq = np.concatenate([prompts, y], 1)
  probes = [Component(l, k) for l in LAYERS for k in KINDS]
  peak = common.matmul_peak()
  s_dtm, compile_s, fdt_dtm = dtm_sweep(m, seq, probes, args.repeats)
  flops = np.mean([probe.useful_flops(m.cfg, c.layer, P, C + N - 1, N) for c in probes])
  rows = [("dtm sweep (" + args.dtype + ")", f"{s_dtm:.3f}", "1.00", f"{flops / s_dtm / 1e9:.1f}")]
  if not args.no_torch:
    try:
      s_gen, s_tf, fdt_gen, fdt_tf = torch_loops(m, prompts, y, probes, args.dtype,
                                                 args.repeats)
      rows += [(f"torch (a) generate loop ({args.dtype})", f"{s_gen:.3f}",
                f"{s_gen / s_dtm:.2f}", ""),
               (f"torch (b) teacher-forced loop ({args.dtype})", f"{s_tf:.3f}",
                f"{s_tf / s_dtm:.2f}", "")]
      agree, agree_tf = np.mean(fdt_gen == fdt_dtm), np.mean(fdt_tf == fdt_dtm)
    except ImportError:
      agree = agree_tf = None
  print(f"\nSmolLM2-135M, {P} WikiText prompts, c={C}, N={N}, {len(probes)} probes "
        f"(layers {LAYERS} x {KINDS}, magnitude {RATE}), {jax.device_count()} device(s), "
        f"{os.cpu_count()} CPU cores; median of {args.repeats} passes per contender")
  print(common.table(rows, ("contender", "s/probe", "s / dtm s", "useful GFLOP/s")))
  print(f"float32 2048^3 matmul peak: {peak:.1f} GFLOP/s; sweep useful GFLOP/s = "
        f"{flops / s_dtm / 1e9 / peak:.0%} of it; dtm compile {compile_s:.1f} s")
  if not args.no_torch and agree is not None:
    print(f"per-prompt FDT, dtm teacher-forced vs torch free-running generate: {agree:.1%} equal; "
          f"vs torch teacher-forced (logits_to_keep={N}): {agree_tf:.1%} equal")
  if args.full:
    print(f"full sweep, 210 components x 1 level, {P} prompts, job wall time "
          f"(load, references, compile, probes, outputs): {full_sweep(args.dtype):.1f} s")


if __name__ == "__main__":
  main()
