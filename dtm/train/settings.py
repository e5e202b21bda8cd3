"""Training settings: the `train` config block read into the step's dataclasses
(`objective_of`, `optim_of`, `acdc_of`), its validation (one DtmError per bad setting,
before anything is compiled or written) and the run identity pinned in a workdir's
train_config.json. `dtm.train.trainer` re-exports these for its callers.
"""
from __future__ import annotations

import json
import os

from dtm import data, io_utils
from dtm.errors import DtmError
from dtm.train import masks as masks_lib
from dtm.train import sharding
from dtm.train import step as step_lib
from dtm.train.objective import Objective


def objective_of(tc) -> Objective:
  o = tc.objective
  return Objective(alpha=float(o.alpha), temperature=float(o.temperature),
                   div_weight=float(o.div_weight), div_margin=float(o.div_margin),
                   vocab_chunk=int(o.vocab_chunk))


def optim_of(tc) -> step_lib.OptimConfig:
  o = tc.optim
  return step_lib.OptimConfig(
      lr=float(o.lr), warmup_steps=int(o.warmup_steps), total_steps=int(tc.steps),
      min_lr_ratio=float(o.min_lr_ratio), weight_decay=float(o.weight_decay), b1=float(o.b1),
      b2=float(o.b2), eps=float(o.eps), clip_norm=float(o.clip_norm),
      decay_norms=bool(o.decay_norms), decay_embeddings=bool(o.decay_embeddings))


def acdc_of(tc) -> masks_lib.AcdcSchedule:
  a = tc.acdc
  return masks_lib.AcdcSchedule(total=int(tc.steps), dense_warmup=int(a.dense_warmup),
                                compressed=int(a.compressed), decompressed=int(a.decompressed),
                                final_compressed=int(a.final_compressed))


def check_calibrated(plan, params, acdc) -> None:
  """Calibrated methods in training: pruned ones (wanda, sparsegpt) must come compressed
  and cannot re-derive masks (AC/DC); quantized ones (gptq) cannot be fake-quantized."""
  check_trainable(plan, acdc)
  masks_lib.check_precompressed(plan, params)


def check_trainable(plan, acdc) -> None:
  """`check_calibrated`'s checks that need no weights (gptq, AC/DC with calibrated masks)."""
  cal = masks_lib.calibrated(plan)
  if cal["quantized"]:
    raise DtmError(
        f"{cal['quantized'][0]} cannot be trained with fake quantization: its codes come "
        f"from calibration statistics and weight updates a train step cannot redo; train "
        f"with rtn(...) of the same bits and group_size (the same grid, straight-through), "
        f"then apply gptq to the trained model")
  if cal["pruned"] and (acdc.alternating or acdc.dense_warmup):
    raise DtmError(
        f"train.acdc with {cal['pruned'][0]}: AC/DC re-derives the masks from the current "
        f"weights by the spec's method, which for wanda / sparsegpt needs calibration "
        f"statistics of the current model; use magnitude or nm for AC/DC, or no AC/DC")


def validate(tc, mesh, num_tokens: int) -> None:
  """One DtmError per bad training setting, before anything is compiled or written."""
  validate_settings(tc)
  dp = sharding.data_parallel_size(mesh)
  if (tc.batch_size // tc.microbatches) % dp:
    raise DtmError(f"train.batch_size={tc.batch_size} / microbatches={tc.microbatches} = "
                   f"{tc.batch_size // tc.microbatches} rows per microbatch is not divisible by "
                   f"the {dp} data-parallel devices (mesh data={mesh.shape['data']} x "
                   f"fsdp={mesh.shape['fsdp']})")
  if data.train_windows(num_tokens, tc.seq_len) < tc.batch_size:
    raise DtmError(f"not enough training data: {num_tokens} tokens give "
                   f"{data.train_windows(num_tokens, tc.seq_len)} windows of {tc.seq_len + 1} "
                   f"tokens, one batch needs {tc.batch_size}; use more data or a smaller "
                   "batch_size/seq_len")


def validate_settings(tc) -> None:
  """The checks of `validate` that need neither devices nor data (run by every job that
  trains before its first model pass: `dtm.jobs.validate`)."""
  if tc.steps < 1:
    raise DtmError(f"train.steps must be >= 1, got {tc.steps}")
  if not tc.optim.lr > 0:
    raise DtmError(f"train.optim.lr must be > 0, got {tc.optim.lr}")
  if tc.optim.warmup_steps < 0 or not 0 <= tc.optim.min_lr_ratio <= 1:
    raise DtmError("train.optim.warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
  if tc.batch_size < 1 or tc.seq_len < 1 or tc.microbatches < 1:
    raise DtmError(f"train.batch_size, seq_len and microbatches must be >= 1, got "
                   f"{tc.batch_size}, {tc.seq_len}, {tc.microbatches}")
  if tc.batch_size % tc.microbatches:
    raise DtmError(f"train.batch_size={tc.batch_size} is not divisible by "
                   f"train.microbatches={tc.microbatches}")
  o = tc.objective
  if not 0 <= o.alpha <= 1 or not o.temperature > 0 or o.div_weight < 0 or not o.div_margin > 0:
    raise DtmError("train.objective needs 0 <= alpha <= 1, temperature > 0, div_weight >= 0, "
                   f"div_margin > 0; got alpha={o.alpha}, temperature={o.temperature}, "
                   f"div_weight={o.div_weight}, div_margin={o.div_margin}")
  if tc.attention_chunk < 0:
    raise DtmError(f"train.attention_chunk must be >= 0 (0 = all query rows at once), got "
                   f"{tc.attention_chunk}")
  if o.vocab_chunk < 0:
    raise DtmError(f"train.objective.vocab_chunk must be >= 0 (0 = whole vocabulary), got "
                   f"{o.vocab_chunk}")
  a = tc.acdc
  if min(a.dense_warmup, a.compressed, a.decompressed, a.final_compressed) < 0:
    raise DtmError("train.acdc phase lengths must be >= 0")
  if (a.compressed > 0) != (a.decompressed > 0):
    raise DtmError("train.acdc: set both compressed and decompressed (> 0) to alternate, or "
                   "neither")
  if a.dense_warmup >= tc.steps:
    raise DtmError(f"train.acdc.dense_warmup={a.dense_warmup} leaves no compressed step of "
                   f"train.steps={tc.steps}")


def check_identity(workdir: str, identity: dict) -> None:
  """Pin the run's settings in train_config.json; a workdir holding a run with other
  settings is refused, naming the differing fields."""
  path = os.path.join(workdir, "train_config.json")
  identity = json.loads(json.dumps(identity))
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = _diff(old, identity)
    if diff:
      shown = ", ".join(f"{k} ({_short(old_v)} -> {_short(new_v)})" for k, old_v, new_v in diff[:8])
      raise DtmError(f"workdir {workdir} holds a training run with a different config: "
                     f"{shown}{' ...' if len(diff) > 8 else ''}; use another --workdir, or the "
                     "same settings to resume")
  else:
    io_utils.atomic_write_json(path, identity)


def _short(v) -> str:
  s = json.dumps(v)
  return s if len(s) <= 60 else s[:57] + "..."


def _diff(a, b, prefix="") -> list[tuple[str, object, object]]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [(prefix[:-1], a, b)]
