"""Orbax checkpoints of converted params, so a large model is converted once.

A converted model directory holds `config.json` (HF style), the tokenizer files,
`dtm_model.json` (marker + provenance) and `params/` (an orbax checkpoint of
the Flax params tree). Restoring goes straight into the abstract (optionally
sharded) tree, so every host reads only its shards.
"""
from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from dtm.errors import DtmError
from dtm.model import abstract_params
from dtm.model_config import ModelConfig, write_hf_config

MARKER = "dtm_model.json"


def is_model_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MARKER))


def save_model(directory: str, cfg: ModelConfig, params, tokenizer=None, source: str = "") -> None:
  """Write config, tokenizer and an orbax checkpoint of `params`; the marker file is
  written last, so a directory without it is an interrupted save, never a model."""
  directory = os.path.abspath(directory)
  if is_model_dir(directory):
    raise DtmError(f"{directory} already holds a converted model; choose another directory")
  os.makedirs(directory, exist_ok=True)
  write_hf_config(cfg, directory)
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, "params"), params, force=True)
  ckptr.wait_until_finished()
  with open(os.path.join(directory, MARKER), "w") as f:
    json.dump({"format": 1, "source": source, "param_dtype": cfg.param_dtype}, f)


def restore_params(directory: str, cfg: ModelConfig, shardings=None):
  """Restore params into `abstract_params(cfg)` (dtype cfg.param_dtype), placed by
  `shardings` (a matching tree of Shardings) or on the default device."""
  abstract = abstract_params(cfg)
  if shardings is None:
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev), abstract)
  else:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  try:
    return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(directory), "params"),
                                              abstract)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise DtmError(f"cannot restore params from {directory}/params "
                   f"(missing or corrupt orbax checkpoint, or config mismatch): {e}") from None
