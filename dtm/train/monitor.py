"""Training logs: `metrics.jsonl` (one record per step, exactly once across restarts) and
TensorBoard event files written with tensorboardX (no TensorFlow).

A record is {"step": s, "train": {...}, "eval": {...}} (eval only on evaluation steps;
step 0 holds the evaluation of the untrained compressed model). On resume from a
checkpoint at step k the file is rewritten with the records of steps <= k only (records
written after that checkpoint are recomputed, a partial last line is dropped), and the
TensorBoard writer purges events of steps > k.
"""
from __future__ import annotations

import json
import os

from dtm import io_utils


def _flat(prefix: str, d: dict) -> dict[str, float]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(f"{prefix}{k}/", v))
    elif isinstance(v, (int, float)):
      out[f"{prefix}{k}"] = float(v)
  return out


class MetricsLog:
  """Append-only metrics.jsonl + TensorBoard scalars, resumable at a step."""

  def __init__(self, workdir: str, resume_step: int | None, tensorboard: bool = True,
               enabled: bool = True):
    """`enabled=False` (hosts other than process 0) reads the records but writes nothing."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.records = _read_records(self.path)
    if resume_step is None:
      self.records = []
    else:
      self.records = [r for r in self.records if r["step"] <= resume_step]
    self.enabled = enabled
    self._file = self.writer = None
    if not enabled:
      return
    io_utils.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
    self._file = open(self.path, "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      purge = None if resume_step is None else resume_step + 1
      self.writer = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)

  def write(self, record: dict) -> None:
    self.records.append(record)
    if not self.enabled:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    os.fsync(self._file.fileno())
    if self.writer is not None:
      for key, value in _flat("", {k: v for k, v in record.items() if k != "step"}).items():
        self.writer.add_scalar(key, value, record["step"])

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self.writer is not None:
      self.writer.close()


def _read_records(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a partial last line from a kill
      if isinstance(rec, dict) and "step" in rec:
        out.append(rec)
  return out
