"""Architecture facts of the named models, shipped so that a dry run needs no hub access.

Each entry is what the model's HF `config.json` says (hidden size, layers, heads, KV heads,
intermediate size, vocabulary, RoPE settings, tied embeddings); no weight is read. Models
not listed here are described by a local `config.json` (an HF or converted dtm directory).
"""
from __future__ import annotations

import os

from dtm.errors import DtmError
from dtm.model_config import ModelConfig

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
               rope_theta=10000.0, bos_token_id=1, eos_token_id=2)

ARCHITECTURES: dict[str, ModelConfig] = {
    "meta-llama/Llama-2-7b-hf": ModelConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, head_dim=128, **_LLAMA2),
    "meta-llama/Llama-2-13b-hf": ModelConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, head_dim=128, **_LLAMA2),
    "meta-llama/Llama-2-70b-hf": ModelConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, **_LLAMA2),
    "meta-llama/Meta-Llama-3-8B": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        bos_token_id=128000, eos_token_id=128001),
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": ModelConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, head_dim=64,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
}


def architecture(model: str, param_dtype: str = "float32", dtype: str = "float32"
                 ) -> ModelConfig:
  """The ModelConfig of `model` (a config's `model` field) without reading weights: the
  shipped facts for a named model, else the header of a .gguf file or `<model>/config.json`
  of a local directory.
  DtmError when neither exists."""
  if model in ARCHITECTURES:
    cfg = ARCHITECTURES[model]
  elif model.endswith(".gguf") and os.path.isfile(model):
    from dtm import gguf_io  # the header only: no tensor is read
    cfg = ModelConfig.from_hf_dict(gguf_io.read_gguf_config(model))
  elif os.path.isfile(os.path.join(model, "config.json")):
    cfg = ModelConfig.from_json_file(os.path.join(model, "config.json"))
  else:
    raise DtmError(f"model {model!r} has no shipped architecture (dtm ships "
                   f"{', '.join(sorted(ARCHITECTURES))}) and no config.json to read")
  return cfg.replace(param_dtype=param_dtype, dtype=dtype)
