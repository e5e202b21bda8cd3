"""Frozen architecture description of a Llama-family model, made once from an HF config."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from dtm.errors import DtmError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Llama architecture hyper-parameters (names follow HF `LlamaConfig`).

  Shapes: hidden size D = hidden_size, Hq = num_attention_heads, Hkv =
  num_key_value_heads, Dh = head_dim, F = intermediate_size, V = vocab_size,
  L = num_hidden_layers.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  max_position_embeddings: int = 2048
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Llama-3 style scaling as a sorted tuple of (key, value) pairs so the dataclass
  # stays hashable (it is a static argument of jitted functions); None = no scaling.
  rope_scaling: tuple[tuple[str, Any], ...] | None = None
  tie_word_embeddings: bool = False
  bos_token_id: int | None = 1
  eos_token_id: int | None = 2
  # dtypes of stored params and of activations/matmuls ('float32', 'bfloat16', ...)
  param_dtype: str = "float32"
  dtype: str = "float32"
  # remat each decoder layer in the backward pass (training only)
  remat: bool = False
  # query rows per attention block without a cache (0 = all T at once): blocks bound the
  # float32 scores a training backward pass holds to [Hq, chunk, S] (`model._attention`)
  attention_chunk: int = 0

  @property
  def num_layers(self) -> int:
    return self.num_hidden_layers

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any], **overrides) -> "ModelConfig":
    """Build from an HF config.json dict; raises DtmError for non-Llama models."""
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if model_type is None and (not archs or set(archs) & set(SUPPORTED_ARCHITECTURES)):
      arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), SUPPORTED_ARCHITECTURES[0])
      raise DtmError(f"config.json has no model_type (expected 'llama' for {arch}); add "
                     f"\"model_type\": \"llama\" (dtm supports Llama-family models: {supported})")
    if model_type != "llama" or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
      raise DtmError(
          f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
          f"dtm supports Llama-family models ({supported})")
    if d.get("attention_bias") or d.get("mlp_bias"):
      raise DtmError("unsupported architecture: Llama with attention_bias/mlp_bias=True")
    try:
      heads = int(d["num_attention_heads"])
      hidden = int(d["hidden_size"])
      rs = d.get("rope_scaling")
      rope_theta = d.get("rope_theta")
      if rope_theta is None and isinstance(d.get("rope_parameters"), dict):
        rope_theta = d["rope_parameters"].get("rope_theta")
        if rs is None and d["rope_parameters"].get("rope_type", "default") != "default":
          rs = d["rope_parameters"]
      if rs is not None:
        rope_type = rs.get("rope_type", rs.get("type"))
        if rope_type in (None, "default"):
          rs = None
        elif rope_type != "llama3":
          raise DtmError(f"unsupported rope_scaling type {rope_type!r} (supported: llama3)")
        else:
          rs = tuple(sorted((k, v) for k, v in rs.items() if k != "rope_theta"))
      eos = d.get("eos_token_id", 2)
      if isinstance(eos, list):
        eos = eos[0] if eos else None
      cfg = cls(
          vocab_size=int(d["vocab_size"]),
          hidden_size=hidden,
          intermediate_size=int(d["intermediate_size"]),
          num_hidden_layers=int(d["num_hidden_layers"]),
          num_attention_heads=heads,
          num_key_value_heads=int(d.get("num_key_value_heads") or heads),
          head_dim=int(d.get("head_dim") or hidden // heads),
          max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
          rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
          rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
          rope_scaling=rs,
          tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
          bos_token_id=d.get("bos_token_id", 1),
          eos_token_id=eos,
      )
    except KeyError as e:
      raise DtmError(f"config.json is missing required field {e.args[0]!r}") from None
    if cfg.num_attention_heads % cfg.num_key_value_heads:
      raise DtmError(f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                     f"num_key_value_heads={cfg.num_key_value_heads}")
    return cfg.replace(**overrides) if overrides else cfg

  @classmethod
  def from_json_file(cls, path: str, **overrides) -> "ModelConfig":
    try:
      with open(path) as f:
        d = json.load(f)
    except FileNotFoundError:
      raise DtmError(f"model config not found: {path}") from None
    except json.JSONDecodeError as e:
      raise DtmError(f"model config {path} is not valid JSON: {e}") from None
    return cls.from_hf_dict(d, **overrides)

  def to_hf_dict(self) -> dict[str, Any]:
    """An HF LlamaConfig dict that transformers loads (`LlamaConfig(**d)`)."""
    d = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_hidden_layers,
        "num_attention_heads": self.num_attention_heads,
        "num_key_value_heads": self.num_key_value_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
        "tie_word_embeddings": self.tie_word_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": self.param_dtype,
    }
    return d


def write_hf_config(cfg: ModelConfig, directory: str) -> None:
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg.to_hf_dict(), f, indent=2)
