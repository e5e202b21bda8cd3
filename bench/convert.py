"""Checkpoint conversion benchmark: seconds and peak host memory (RSS) per conversion.

  /root/venv/bin/python bench/convert.py [--keep DIR]

Cases, each measured in a fresh subprocess so that peak RSS belongs to one conversion:
  (a) SmolLM2-135M from its GGUF (Q4_1, dequantized to float32), tokenizer included;
  (b) a random float32 Llama (~1 GB) as a sharded HF safetensors directory
      (written first by `dtm.convert.export_hf`, 256 MB shards);
  (c) orbax: `dtm.checkpoint.save_model` of (b)'s params, then `load_model` of the result
      (timed; its memory is reported but not checked).

Per case: checkpoint bytes on disk, seconds, RSS after imports and JAX start-up
(baseline), peak RSS (VmHWM, reset after the baseline where the kernel allows), the
increase over the baseline and its ratio to the checkpoint size. The memory check is
  peak - baseline < 1.3 x model bytes + 500 MB,
with model bytes = checkpoint bytes, except for GGUF, whose quantized file is smaller
than the float32 model it expands to; there model bytes = float32 param bytes.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from dtm.memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # /proc VmRSS, VmHWM

MB = 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench import children  # noqa: E402

# ~254M params = 1.02 GB float32: 12 layers, untied 32k vocab.
RANDOM_LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
                    num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=8,
                    head_dim=64, max_position_embeddings=2048)
SHARD_BYTES = 256 * MB


# ----------------------------------------------------------------------------- memory


def disk_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


# ----------------------------------------------------------------------------- children


def _start() -> dict:
  """Import everything a conversion needs and start JAX, then take the baseline."""
  import jax
  import gguf  # noqa: F401
  import orbax.checkpoint  # noqa: F401
  import transformers  # noqa: F401
  from dtm import loading  # noqa: F401
  jax.devices()
  base = rss_bytes()
  reset = reset_peak_rss()
  return {"baseline": base, "hwm_reset": reset}


def _param_bytes(params) -> int:
  import jax
  return int(sum(x.nbytes for x in jax.tree.leaves(params)))


def child_load(name: str) -> dict:
  """Time `load_model(name)` (read, convert, place on device, tokenizer)."""
  out = _start()
  from dtm.loading import load_model
  t0 = time.perf_counter()
  m = load_model(name)
  import jax
  jax.block_until_ready(m.params)
  out["seconds"] = time.perf_counter() - t0
  out["peak"] = peak_rss_bytes()
  out["param_bytes"] = _param_bytes(m.params)
  return out


def child_save_orbax(src: str, dst: str) -> dict:
  """Load `src`, then time `checkpoint.save_model(dst)` alone."""
  out = _start()
  from dtm import checkpoint
  from dtm.loading import load_model
  m = load_model(src)
  t0 = time.perf_counter()
  checkpoint.save_model(dst, m.cfg, m.params, tokenizer=m.tokenizer, source=src)
  out["seconds"] = time.perf_counter() - t0
  out["peak"] = peak_rss_bytes()
  out["param_bytes"] = _param_bytes(m.params)
  return out


def child_write_random(directory: str) -> dict:
  """Random float32 params of RANDOM_LLAMA (numpy, no device copy) -> sharded HF directory."""
  import jax
  import numpy as np
  from dtm import convert
  from dtm.model import abstract_params
  from dtm.model_config import ModelConfig
  cfg = ModelConfig(**RANDOM_LLAMA)
  rng = np.random.default_rng(0)

  def leaf(a):
    x = rng.standard_normal(a.shape, np.float32)
    x *= 0.02
    return x

  params = jax.tree.map(leaf, abstract_params(cfg))
  t0 = time.perf_counter()
  convert.export_hf(params, cfg, directory, max_shard_bytes=SHARD_BYTES)
  return {"seconds": time.perf_counter() - t0, "param_bytes": _param_bytes(params)}


CHILDREN = {"load": child_load, "save_orbax": child_save_orbax, "write_random": child_write_random}


def run_child(kind: str, *args: str) -> dict:
  return children.run_child(__file__, kind, *args)


# ----------------------------------------------------------------------------- report


def row(case: str, ckpt_bytes: int, r: dict, model_bytes: int | None = None,
        checked: bool = True) -> dict:
  model_bytes = ckpt_bytes if model_bytes is None else model_bytes
  inc = r["peak"] - r["baseline"]
  bound = 1.3 * model_bytes + 500 * MB
  return {"case": case, "ckpt_mb": ckpt_bytes / MB, "params_mb": r["param_bytes"] / MB,
          "seconds": r["seconds"], "base_mb": r["baseline"] / MB, "peak_mb": r["peak"] / MB,
          "inc_mb": inc / MB, "inc_per_ckpt": inc / ckpt_bytes, "bound_mb": bound / MB,
          "ok": inc < bound, "checked": checked}


def print_table(rows: list[dict]) -> None:
  head = ("case", "ckpt MB", "f32 MB", "sec", "RSS base", "RSS peak", "peak-base",
          "/ckpt", "bound", "check")
  lines = [head]
  for r in rows:
    lines.append((r["case"], f"{r['ckpt_mb']:.0f}", f"{r['params_mb']:.0f}", f"{r['seconds']:.1f}",
                  f"{r['base_mb']:.0f}", f"{r['peak_mb']:.0f}", f"{r['inc_mb']:.0f}",
                  f"{r['inc_per_ckpt']:.2f}", f"{r['bound_mb']:.0f}",
                  ("PASS" if r["ok"] else "FAIL") + ("" if r["checked"] else " (info)")))
  widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
  for l in lines:
    print("  ".join(f"{str(c):<{w}}" if i == 0 else f"{str(c):>{w}}"
                    for i, (c, w) in enumerate(zip(l, widths))))


def main(argv: list[str]) -> int:
  if argv[:1] == ["--child"]:
    print(json.dumps(CHILDREN[argv[1]](*argv[2:])))
    return 0
  keep = argv[argv.index("--keep") + 1] if "--keep" in argv else None
  tmp = keep or tempfile.mkdtemp(prefix="dtm-bench-convert-")
  from dtm import gguf_io
  gguf_path = gguf_io.find_smollm2_gguf()
  hf_dir, orbax_dir = os.path.join(tmp, "random-hf"), os.path.join(tmp, "random-orbax")
  if not os.path.exists(os.path.join(hf_dir, "config.json")):
    w = run_child("write_random", hf_dir)
    print(f"wrote random checkpoint {hf_dir} in {w['seconds']:.1f}s", file=sys.stderr)
  smollm2 = run_child("load", "smollm2-135m")
  rows = [row("smollm2 gguf -> flax", disk_bytes(gguf_path), smollm2,
              model_bytes=smollm2["param_bytes"]),
          row("random hf safetensors -> flax", disk_bytes(hf_dir), run_child("load", hf_dir))]
  shutil.rmtree(orbax_dir, ignore_errors=True)
  save = run_child("save_orbax", hf_dir, orbax_dir)
  restore = run_child("load", orbax_dir)
  rows.append(row("orbax restore (random)", disk_bytes(orbax_dir), restore, checked=False))
  print_table(rows)
  print(f"orbax save_model of the random params: {save['seconds']:.1f}s "
        f"({disk_bytes(orbax_dir) / MB:.0f} MB on disk); restore: {restore['seconds']:.1f}s")
  print("check: peak-base < 1.3 x model bytes + 500 MB; model bytes = ckpt bytes "
        "(f32 param bytes for the quantized GGUF); the orbax row is informational. "
        "RSS base = after imports + JAX start.")
  if not keep:
    shutil.rmtree(tmp, ignore_errors=True)
  return 0 if all(r["ok"] for r in rows if r["checked"]) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
