"""Training speed on SmolLM2-135M: dtm's jitted train step against a PyTorch loop.

  .venv/bin/python bench/train.py [--steps 5] [--spec 'mlp@*:magnitude(0.5)'] [--no-torch]

Both contenders train the same masked model (F' = spec applied to SmolLM2, float32) on
the same batches (WikiText-2 valid tokens, `dtm.data.train_batch`, batch 8 x 256) with
next-token cross-entropy and AdamW (lr 1e-5, betas 0.9/0.95, clip 1.0):
  * dtm: `dtm.train.step` (one jit, donated state, masked updates and re-masked params,
    loss over vocabulary chunks), one JAX device using both cores;
  * torch: transformers' LlamaForCausalLM (sdpa attention), `model(ids, labels=...)`,
    `loss.backward()`, clip_grad_norm_, `torch.optim.AdamW(foreach=True)`, gradients and
    params masked in place with the same masks, 2 threads.
Each contender's step time is the median of --steps timed steps after 2 warm-up steps.
Useful FLOPs follow MaxText: 6 x matmul params x tokens plus causal attention
(`dtm.train.step.train_flops_per_token`); the large float32 matmul (2048^3, jitted) is
timed in the same run. Peak RSS (VmHWM) is printed per contender phase.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dtm import convert, data  # noqa: E402
from dtm.components import get_path, kernel_path  # noqa: E402
from dtm.loading import load_model  # noqa: E402
from dtm.train import masks as masks_lib  # noqa: E402
from dtm.train import sharding  # noqa: E402
from dtm.train import step as step_lib  # noqa: E402
from dtm.train.objective import Objective  # noqa: E402

BATCH, SEQ = 8, 256
VALID = common.WIKITEXT.parents[1] / "wikitext-2" / "wiki.valid.tokens"
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}


def peak_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM"):
        return int(line.split()[1]) / 1024
  return float("nan")



def train_batches(tokenizer, num: int) -> list[np.ndarray]:
  """`num` training batches int32 [BATCH, SEQ + 1] of WikiText-2 valid tokens (steps 0..)."""
  texts = data.load_texts("text", data_files=str(VALID))
  stream = data.tokenize_corpus(tokenizer, texts, add_bos=False)
  return [data.train_batch(stream, batch=BATCH, seq_len=SEQ, seed=0, step=i) for i in range(num)]


def dtm_setup(cfg, params, spec, vocab_chunk) -> dict:
  """The masked model's train state and its jitted step on one device: a dict with
  mesh, plan, obj, tx, oc, state (pruned params, AdamW state, masks), shard (the state's
  shardings), step (`step_lib.compile_step`, state donated), bs (the batch sharding)."""
  mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
  plan = masks_lib.make_plan(spec, params)
  pruned, masks = jax.jit(lambda p: masks_lib.prune(plan, p))(params)
  oc = step_lib.OptimConfig(lr=1e-5, warmup_steps=0, total_steps=1000, clip_norm=1.0)
  tx = step_lib.make_optimizer(oc, pruned)
  abstract = jax.eval_shape(lambda p, m: step_lib.init_state(p, m, tx, 0), pruned, masks)
  shard = step_lib.state_shardings(mesh, abstract)
  state = jax.jit(lambda p, m: step_lib.init_state(p, m, tx, 0), out_shardings=shard)(pruned, masks)
  del pruned
  obj = Objective(alpha=0.0, vocab_chunk=vocab_chunk)
  fn = step_lib.compile_step(cfg, obj, plan, tx, mesh, shard, None, microbatches=1, masked=True,
                             schedule=step_lib.lr_schedule(oc), clip_norm=oc.clip_norm)
  return dict(mesh=mesh, plan=plan, obj=obj, tx=tx, oc=oc, state=state, shard=shard, step=fn,
              bs=sharding.batch_sharding(mesh))


def dtm_steps(cfg, params, spec, batches, steps, vocab_chunk):
  d = dtm_setup(cfg, params, spec, vocab_chunk)
  fn, bs, state = d["step"], d["bs"], d.pop("state")
  t0 = time.perf_counter()
  state, m = fn(state, sharding.put_batch(batches[0], bs), None)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times, losses = [], [float(m["loss"])]
  for i in range(1, steps + 2):
    t = time.perf_counter()
    state, m = fn(state, sharding.put_batch(batches[i], bs), None)
    losses.append(float(m["loss"]))  # blocks: the step is done
    times.append(time.perf_counter() - t)
  zeros_ok = all(bool(np.all(np.asarray(get_path(state["params"], kernel_path(k)))[~np.asarray(v)] == 0))
                 for k, v in ((key.split("/")[2], masks_) for key, masks_ in state["masks"].items()))
  return statistics.median(times[1:]), compile_s, losses, zeros_ok, state["masks"]


def torch_setup(cfg, masks, spec_params):
  """transformers' LlamaForCausalLM (sdpa, float32, train mode) of the pruned params, at
  one thread per core -> (model, [(weight, keep mask [out, in])], AdamW foreach)."""
  import torch
  from transformers import LlamaForCausalLM
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  with tempfile.TemporaryDirectory() as tmp:
    convert.export_hf(spec_params, cfg, tmp)
    model = LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32,
                                             attn_implementation="sdpa")
  model.train()
  torch_masks = []
  for key, keep in masks.items():
    kind = key.split("/")[2]
    keep = np.asarray(keep)
    for layer in range(cfg.num_layers):
      mod = model.model.layers[layer].get_submodule(HF_MODULES[kind])
      torch_masks.append((mod.weight, torch.from_numpy(np.ascontiguousarray(keep[layer].T))))
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.0, foreach=True)
  return model, torch_masks, opt


def torch_loss(model, batch):
  """The next-token CE of one batch [B, T + 1] (autograd graph kept)."""
  import torch
  ids = torch.from_numpy(batch.astype(np.int64))
  return model(input_ids=ids[:, :-1], labels=ids[:, 1:].contiguous(),
               shift_labels=ids[:, 1:].contiguous()).loss


def torch_update(model, torch_masks, opt) -> None:
  """Masked gradients, clip by global norm 1.0, AdamW, gradients dropped, params re-masked."""
  import torch
  for w, keep in torch_masks:
    w.grad.mul_(keep)
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  opt.step()
  opt.zero_grad(set_to_none=True)
  with torch.no_grad():
    for w, keep in torch_masks:
      w.mul_(keep)


def torch_steps(cfg, params, masks, spec_params, batches, steps):
  model, torch_masks, opt = torch_setup(cfg, masks, spec_params)

  def one(batch):
    loss = torch_loss(model, batch)
    loss.backward()
    torch_update(model, torch_masks, opt)
    return float(loss.detach())

  times, losses = [], []
  for i in range(steps + 2):
    t = time.perf_counter()
    losses.append(one(batches[i]))
    times.append(time.perf_counter() - t)
  return statistics.median(times[2:]), losses


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--spec", default="mlp@*:magnitude(0.5)")
  ap.add_argument("--vocab-chunk", type=int, default=8192)
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args()
  print(f"CPU: {common.cpu_model()}, {len(os.sched_getaffinity(0))} cores; jax {jax.__version__}, "
        f"devices {jax.devices()}")
  model = load_model("smollm2-135m")
  cfg, params = model.cfg, model.params
  batches = train_batches(model.tokenizer, args.steps + 3)
  tokens = BATCH * SEQ
  flops = step_lib.train_flops_per_token(cfg, SEQ, teacher=False) * tokens
  peak = common.matmul_peak()
  print(f"float32 2048^3 matmul (jit): {peak:.1f} GFLOP/s")
  rss0 = peak_rss_mb()
  t_dtm, compile_s, losses, zeros_ok, masks = dtm_steps(cfg, params, args.spec, batches,
                                                        args.steps, args.vocab_chunk)
  rss_dtm = peak_rss_mb()
  print(f"dtm: compile+first step {compile_s:.1f} s; losses {[round(x, 4) for x in losses]}; "
        f"pruned weights still zero: {zeros_ok}; peak RSS {rss_dtm:.0f} MB (after load {rss0:.0f})")
  rows = [("dtm train step (jit, float32)", f"{t_dtm:.3f}", f"{tokens / t_dtm:.0f}",
           f"{flops / t_dtm / 1e9:.1f} ({100 * flops / t_dtm / 1e9 / peak:.0f} % of peak)", "1.00")]
  if not args.no_torch:
    spec_params, _ = jax.jit(lambda p: masks_lib.prune(masks_lib.make_plan(args.spec, params), p))(params)
    t_torch, tlosses = torch_steps(cfg, params, masks, spec_params, batches, args.steps)
    print(f"torch: losses {[round(x, 4) for x in tlosses]}; peak RSS {peak_rss_mb():.0f} MB")
    rows.append(("torch LlamaForCausalLM + AdamW", f"{t_torch:.3f}", f"{tokens / t_torch:.0f}",
                 f"{flops / t_torch / 1e9:.1f} ({100 * flops / t_torch / 1e9 / peak:.0f} % of peak)",
                 f"{t_torch / t_dtm:.2f}"))
  print(f"\nSmolLM2-135M, batch {BATCH} x {SEQ}, float32, CE, spec {args.spec!r}, "
        f"{flops / 1e12:.2f} TFLOP per step (MaxText counting)")
  print(common.table(rows, ("contender", "s/step", "tokens/s", "useful GFLOP/s",
                            "contender s / dtm s")))


if __name__ == "__main__":
  main()
