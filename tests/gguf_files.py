"""Tiny GGUF files written with the `gguf` package's own writer (tests of the GGUF reader
and of the CLI's errors on bad GGUF input)."""
from __future__ import annotations

import gguf

# llama hyper-parameters of every tiny file: head_dim = hidden / heads = 16
TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, ffn=96, vocab=32)


def write_gguf(path, arch="llama", tensors=(), tokenizer=None, extra=None) -> str:
  """Write a GGUF with llama hyper-parameters TINY and `tensors` = [(name, array,
  raw_dtype)]; tokenizer: {'model', 'tokens'[, 'scores', 'types', 'ids']} (default: a
  32-token 'gpt2' list); extra: {writer method name: value}. Returns the path."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(TINY["layers"])
  w.add_context_length(256)
  w.add_embedding_length(TINY["hidden"])
  w.add_feed_forward_length(TINY["ffn"])
  w.add_head_count(TINY["heads"])
  w.add_head_count_kv(TINY["kv_heads"])
  w.add_layer_norm_rms_eps(1e-5)
  w.add_rope_freq_base(500000.0)
  w.add_vocab_size(TINY["vocab"])
  tokenizer = tokenizer or {"model": "gpt2", "tokens": [f"t{i}" for i in range(TINY["vocab"])]}
  w.add_tokenizer_model(tokenizer["model"])
  w.add_token_list(tokenizer["tokens"])
  if "scores" in tokenizer:
    w.add_token_scores(tokenizer["scores"])
  if "types" in tokenizer:
    w.add_token_types(tokenizer["types"])
  for key, value in (tokenizer.get("ids") or {}).items():
    getattr(w, f"add_{key}_token_id")(value)
  for fn, value in (extra or {}).items():
    getattr(w, fn)(value)
  for name, arr, raw_dtype in tensors:
    w.add_tensor(name, arr, raw_dtype=raw_dtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)
