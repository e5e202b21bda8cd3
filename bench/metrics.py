"""Speed of the evaluate job's two passes on SmolLM2-135M, against PyTorch transformers.

  /root/venv/bin/python bench/metrics.py [--spec SPEC] [--no-torch] [--reps 3]

P=32 WikiText-2 prompts, c=64, N=32, batch 16, float32, on however many CPU cores XLA sees:
  * teacher-forced DTM pass: `evaluation.divergence` of F' = compress(F, spec) on s = p ⊕ y,
    tokens/s counted as P·(c+N-1) (every fed position);
  * reference generation: `evaluation.generate_references`, P·N new tokens/s; prefill alone
    (`greedy_generate` with N=1: the prompt pass and the first token) is timed separately
    and the decode rate is P·(N-1) / (total - prefill);
  * achieved GFLOP/s of the teacher-forced pass (`teacher_forced_flops`) against a jitted
    2048^3 float32 matmul timed in the same run (best of 5);
  * with torch installed: the same teacher-forced computation in transformers'
    LlamaForCausalLM (same GGUF, F' weights copied from dtm, batch 16, 2 threads;
    `logits_to_keep=N`, log_softmax, argmax -> FDT, SDT, NLL) and the ratio torch/dtm.
Timings are the median of --reps calls after a warm-up call; compile times (AOT
`lower().compile()`) are reported on their own.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dtm import compress, evaluation  # noqa: E402
from dtm.components import kernel_path  # noqa: E402
from dtm.generate import greedy_generate  # noqa: E402
from dtm.loading import load_model  # noqa: E402

P, C, N, BATCH = 32, 64, 32, 16
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
              "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
              "down": "mlp.down_proj"}


def teacher_forced_flops(cfg, p: int, t: int, n: int) -> float:
  """Matmul FLOPs of the teacher-forced pass over p sequences of t = c+N-1 fed positions:

    2 · (non-embedding linear params per layer) · L · p · t      q, k, v, o, gate, up, down
  + 2 · D · V · p · n                                            LM head at the N positions
  + 4 · L · Hq · K · t² · p                                      QKᵀ and PV over the full t×t
                                                                 score matrix (the model
                                                                 computes it, then masks)
  """
  d, k = cfg.hidden_size, cfg.head_dim
  per_layer = (2 * d * cfg.num_attention_heads * k + 2 * d * cfg.num_key_value_heads * k
               + 3 * d * cfg.intermediate_size)
  linear = 2 * per_layer * cfg.num_layers * p * t
  head = 2 * d * cfg.vocab_size * p * n
  attention = 4 * cfg.num_layers * cfg.num_attention_heads * k * t * t * p
  return float(linear + head + attention)


def median_time(fn, reps: int) -> float:
  return float(np.median([common.timed(fn) for _ in range(reps)]))


def compile_seconds(jitted, *args, **kwargs) -> float:
  return common.timed(lambda: jitted.lower(*args, **kwargs).compile())


def torch_teacher_forced(hf, seq: np.ndarray, c: int, batch: int) -> dict[str, np.ndarray]:
  """FDT, SDT, NLL of the HF model teacher-forced on s = p ⊕ y, batch by batch."""
  import torch
  n = seq.shape[1] - c
  fdt, sdt, nll = [], [], []
  with torch.inference_mode():
    for start in range(0, len(seq), batch):
      s = torch.as_tensor(seq[start:start + batch], dtype=torch.long)
      y = s[:, c:]
      logits = hf(s[:, :-1], logits_to_keep=n).logits.float()  # rows c-1 .. c+N-2
      logp = torch.log_softmax(logits, dim=-1)
      nll.append(-logp.gather(-1, y[..., None])[..., 0])
      div = logits.argmax(-1) != y
      fdt.append(torch.where(div.any(1), div.int().argmax(1), torch.tensor(n)))
      sdt.append(div.float().mean(1))
  return {k: torch.cat(v).numpy() for k, v in (("fdt", fdt), ("sdt", sdt), ("nll", nll))}


def load_torch_model(params_c, spec):
  """transformers LlamaForCausalLM from the SmolLM2 GGUF with F' weights copied from dtm."""
  import torch
  from transformers import LlamaForCausalLM
  from dtm import gguf_io
  torch.set_num_threads(2)
  path = gguf_io.find_smollm2_gguf()
  hf = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                        dtype=torch.float32).eval()
  kinds = {comp.kind for comp in compress.parse_spec(spec).resolve(len(hf.model.layers))}
  with torch.no_grad():
    for kind in kinds:
      kernel_LIO = np.asarray(params_c["layers"][kernel_path(kind)[1]][kind]["kernel"])
      for l, layer in enumerate(hf.model.layers):
        layer.get_submodule(HF_MODULES[kind]).weight.copy_(torch.from_numpy(kernel_LIO[l].T.copy()))
  return hf


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--spec", default="*@*:absmax(bits=8,granularity=channel)",
                  help="compression of F' for the teacher-forced pass")
  ap.add_argument("--reps", type=int, default=3)
  ap.add_argument("--no-torch", action="store_true")
  args = ap.parse_args()

  m = load_model("smollm2-135m")
  cfg = m.cfg
  prompts = common.wikitext_prompts(m.tokenizer, P, C)
  peak = common.matmul_peak()

  # reference generation
  p16 = jnp.asarray(prompts[:BATCH])
  gen_compile = compile_seconds(greedy_generate, cfg, m.params, p16, N)
  evaluation.generate_references(cfg, m.params, prompts[:BATCH], N, BATCH, desc="warm-up")
  jax.block_until_ready(greedy_generate(cfg, m.params, p16, 1))
  y = None

  def gen():
    nonlocal y
    y = evaluation.generate_references(cfg, m.params, prompts, N, BATCH)
  t_gen = median_time(gen, args.reps)

  def prefill():
    for start in range(0, P, BATCH):
      jax.block_until_ready(greedy_generate(cfg, m.params, jnp.asarray(prompts[start:start + BATCH]), 1))
  t_prefill = median_time(prefill, args.reps)
  seq = np.concatenate([prompts, y], axis=1)

  # teacher-forced DTM pass of F'
  t = time.perf_counter()
  params_c, _ = compress.apply_spec(m.params, args.spec)
  jax.block_until_ready(params_c)
  t_compress = time.perf_counter() - t
  tf_compile = compile_seconds(evaluation.dtm_batch, cfg, params_c, jnp.asarray(seq[:BATCH]), C)
  stats = evaluation.divergence(cfg, params_c, seq, C, BATCH, desc="warm-up")
  t_tf = median_time(lambda: evaluation.divergence(cfg, params_c, seq, C, BATCH), args.reps)
  tf_tokens = P * (C + N - 1)
  flops = teacher_forced_flops(cfg, P, C + N - 1, N)
  gflops = flops / t_tf / 1e9

  rows = [
      ("dtm teacher-forced DTM pass", f"{t_tf:.3f}", f"{tf_tokens / t_tf:,.0f}", f"{gflops:.1f}",
       f"{tf_compile:.1f}"),
      ("dtm reference generation", f"{t_gen:.3f}", f"{P * N / t_gen:,.0f}", "", f"{gen_compile:.1f}"),
      ("  prefill only (P x c)", f"{t_prefill:.3f}", f"{P * C / t_prefill:,.0f}", "", ""),
      ("  decode only (P x (N-1))", f"{t_gen - t_prefill:.3f}",
       f"{P * (N - 1) / (t_gen - t_prefill):,.0f}", "", ""),
  ]
  agree = torch_peak = t_torch = None
  if not args.no_torch:
    try:
      hf = load_torch_model(params_c, args.spec)
    except ImportError:
      hf = None
    if hf is not None:
      torch_teacher_forced(hf, seq, C, BATCH)  # warm-up
      ref = {}

      def run_torch():
        ref.update(torch_teacher_forced(hf, seq, C, BATCH))
      t_torch = median_time(run_torch, args.reps)
      rows.append(("torch teacher-forced (logits_to_keep=N)", f"{t_torch:.3f}",
                   f"{tf_tokens / t_torch:,.0f}", f"{flops / t_torch / 1e9:.1f}", ""))
      rows.append(("  ratio torch time / dtm time", f"{t_torch / t_tf:.2f}", "", "", ""))
      torch_peak = common.torch_matmul_peak()
      dppl = lambda nll: float(np.exp(np.mean(np.asarray(nll, np.float64))))  # noqa: E731
      agree = (np.mean(stats["fdt"] == ref["fdt"]), dppl(stats["nll"]), dppl(ref["nll"]))

  print(f"\nSmolLM2-135M float32, P={P} WikiText-2 prompts, c={C}, N={N}, batch {BATCH}, "
        f"F' = {compress.parse_spec(args.spec).to_string()}; {jax.devices()[0].platform} x "
        f"{jax.device_count()}, {os.cpu_count()} CPU cores, load avg {os.getloadavg()[0]:.2f}")
  print(common.table(rows, ("pass", "seconds", "tokens/s", "GFLOP/s", "compile s")))
  print(f"float32 2048^3 matmul: {peak:.1f} GFLOP/s; teacher-forced pass reaches "
        f"{gflops / peak:.0%} of it ({flops / 1e9:.1f} GFLOP: linear layers at all "
        f"{C + N - 1} positions, LM head at {N}, full t x t attention)")
  print(f"compress.apply_spec: {t_compress:.1f} s; FDT mean {np.mean(stats['fdt']):.2f}, "
        f"SDT mean {np.mean(stats['sdt']):.3f}")
  if agree is not None:
    print(f"torch 2048^3 float32 matmul ({torch_peak:.1f} GFLOP/s): the torch pass reaches "
          f"{flops / t_torch / 1e9 / torch_peak:.0%} of it")
    print(f"dtm vs torch: per-prompt FDT equal on {agree[0]:.1%}; DPPL {agree[1]:.5f} vs {agree[2]:.5f}")


if __name__ == "__main__":
  main()
