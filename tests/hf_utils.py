"""Tiny random HF Llama checkpoints written with transformers (torch), for oracle tests."""
from __future__ import annotations

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            max_position_embeddings=128)


def tiny_hf_model(*, heads=4, kv_heads=2, tie=False, rope_theta=10000.0, rope_scaling=None,
                  seed=0, **kw):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(seed)
  cfg = LlamaConfig(**{**TINY, **kw}, num_attention_heads=heads, num_key_value_heads=kv_heads,
                    tie_word_embeddings=tie, rope_theta=rope_theta, rope_scaling=rope_scaling)
  model = LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # larger-than-init weights so differences are not hidden by tiny logits
    for p in model.parameters():
      p.normal_(0.0, 0.08 if p.ndim > 1 else 1.0)
  return model


def save_tiny(model, directory, shard_size=None) -> str:
  kw = {"max_shard_size": shard_size} if shard_size else {}
  model.save_pretrained(directory, safe_serialization=True, **kw)
  return str(directory)


def hf_logits(model, tokens):
  import numpy as np
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()
