"""The pruning search's records: rounds.jsonl (one committed record per round) and the
settings pinned in workdir/prune_config.json (a workdir is one search)."""
from __future__ import annotations

import json
import os

from dtm import io_utils
from dtm.errors import DtmError


class RoundLog:
  """rounds.jsonl: one JSON record per committed round, appended with write + fsync; an
  unterminated last line (a kill during the write) is cut off when opened."""

  def __init__(self, path: str):
    self.path = path
    self.records: list[dict] = []
    if not os.path.exists(path):
      return
    with open(path, "rb") as f:
      raw = f.read()
    good_end = 0
    for line in raw.split(b"\n")[:-1]:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        break
      if rec["round"] != len(self.records):
        raise DtmError(f"{path}: record of round {rec['round']} where round "
                       f"{len(self.records)} was expected; the file is not this job's")
      self.records.append(rec)
      good_end += len(line) + 1
    if good_end < len(raw):
      with open(path, "r+b") as f:
        f.truncate(good_end)

  def append(self, rec: dict) -> None:
    if rec["round"] != len(self.records):
      raise ValueError(f"round {rec['round']} appended after {len(self.records)} records")
    with open(self.path, "a") as f:
      f.write(json.dumps(rec, separators=(",", ":")) + "\n")
      f.flush()
      os.fsync(f.fileno())
    self.records.append(rec)


def check_identity(workdir: str, identity: dict) -> None:
  """Pin the search's settings in workdir/prune_config.json; a workdir holding a search
  with other settings is refused, naming the differing fields."""
  path = os.path.join(workdir, "prune_config.json")
  identity = json.loads(json.dumps(identity))
  if not os.path.exists(path):
    io_utils.atomic_write_json(path, identity)
    return
  with open(path) as f:
    old = json.load(f)
  diff = _diff(old, identity)
  if diff:
    shown = ", ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
    raise DtmError(f"workdir {workdir} holds a pruning search with a different config "
                   f"(differs in: {shown}); use another --workdir, or the same settings to resume")


def _diff(a, b, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in _diff(a.get(k), b.get(k), f"{prefix}{k}.")]
  return [] if a == b else [prefix[:-1]]
