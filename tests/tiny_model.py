"""A tiny random Llama written as an HF checkpoint directory, and token-id prompts for it.

Used by job-level tests (probe sweep) that want the real CLI / job path with a model
that compiles and runs in well under a second per call on CPU.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from dtm import convert, data
from dtm.model import init_params
from dtm.model_config import ModelConfig

TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=128, tie_word_embeddings=False)


def write_tiny_model(directory: str, cfg: ModelConfig = TINY, seed: int = 0,
                     logit_scale: float = 50.0) -> str:
  """Random params (`init_params`) exported with `convert.export_hf`; no tokenizer.

  The LM head is scaled by `logit_scale` so greedy continuations are decided by clear
  logit margins rather than by near-ties of a nearly uniform random model.
  """
  params = init_params(cfg, seed=seed)
  params = {**params, "lm_head": jax.tree.map(lambda x: x * logit_scale, params["lm_head"])}
  convert.export_hf(params, cfg, directory)
  return directory


def write_prompts(path: str, num: int, length: int, vocab_size: int = TINY.vocab_size,
                  seed: int = 0) -> str:
  """`num` random token-id prompts of `length` tokens as a prompt JSONL file."""
  ids = np.random.default_rng(seed).integers(0, vocab_size, (num, length))
  data.write_prompt_jsonl(path, ids)
  return os.fspath(path)
