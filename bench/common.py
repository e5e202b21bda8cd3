"""Shared benchmark helpers: the real model and WikiText prompts, a matmul peak, timers."""
from __future__ import annotations

import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from dtm import memory as _memory  # noqa: E402

# as main.py does: malloc asks for transparent huge pages (a restart of this process
# before JAX and torch start); every contender in a bench runs under the same setting,
# printed with the CPU model; DTM_HUGE_PAGES=0 measures without.
_memory.exec_with_huge_pages()

import jax  # noqa: E402

from dtm import cli as _cli  # noqa: E402

_cli._quiet_libtpu()  # CPU benches: the CPU backend, without libtpu's start-up noise
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def wikitext_prompts(tokenizer, num: int, length: int, seed: int = 0) -> np.ndarray:
  """`num` prompts of `length` tokens from the WikiText-2 raw test split (dtm.data path)."""
  from dtm import data
  texts = data.load_texts("text", data_files=str(WIKITEXT))
  stream = data.tokenize_corpus(tokenizer, texts, add_bos=False)
  return data.prompt_windows(stream, num=num, length=length, seed=seed, bos_id=None)


def matmul_peak(n: int = 2048, dtype=jnp.float32, reps: int = 5) -> float:
  """GFLOP/s of a jitted n x n x n matmul, best of `reps`."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = min(timed(lambda: f(a, a).block_until_ready()) for _ in range(reps))
  return 2 * n**3 / best / 1e9


def torch_matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """GFLOP/s of a torch n x n x n float32 matmul (torch's current threads), best of reps."""
  import torch
  a = torch.randn(n, n)
  a @ a
  return 2 * n**3 / min(timed(lambda: a @ a) for _ in range(reps)) / 1e9


def timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def table(rows: list[tuple], header: tuple) -> str:
  rows = [tuple(str(x) for x in r) for r in [header, *rows]]
  w = [max(len(r[i]) for r in rows) for i in range(len(header))]
  return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                             for i, c in enumerate(r)) for r in rows)


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (ratios to PyTorch differ between vendors),
  with whether malloc asks for huge pages (`dtm.memory.huge_pages_status`)."""
  name = "unknown"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          name = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{name} [{_memory.huge_pages_status()}]"
