"""Append-only, crash-safe store of probe records (`probes.jsonl`) and the sweep's identity.

Each finished chunk appends its records in one write followed by fsync, so after a
SIGKILL at any moment the file holds whole records plus at most one partial last
line, which `ProbeStore.open` cuts off. `sweep.json` pins the settings that define
the results; reopening a workdir with different settings is refused.
"""
from __future__ import annotations

import hashlib
import json
import os

from dtm import io_utils
from dtm.errors import DtmError


def identity_hash(identity: dict) -> str:
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


class ProbeStore:
  """Records keyed by probe id; `add` appends durably."""

  def __init__(self, path: str, records: dict[str, dict]):
    self.path = path
    self.records = records

  @classmethod
  def open(cls, workdir: str, identity: dict, writer: bool = True) -> "ProbeStore":
    os.makedirs(workdir, exist_ok=True)
    meta_path = os.path.join(workdir, "sweep.json")
    ident = identity_hash(identity)
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        old = json.load(f)
      if old.get("identity_hash") != ident:
        changed = sorted(k for k in set(old.get("identity", {})) | set(identity)
                         if old.get("identity", {}).get(k) != identity.get(k))
        raise DtmError(f"workdir {workdir} holds a sweep with different settings "
                       f"(differs in: {', '.join(changed) or 'settings'}); use a new --workdir "
                       "or the same config to resume")
    elif writer:
      io_utils.atomic_write_json(meta_path, {"identity_hash": ident, "identity": identity})
    path = os.path.join(workdir, "probes.jsonl")
    return cls(path, _read_records(path, repair=writer))

  def add(self, records: list[dict]) -> None:
    new = [r for r in records if r["probe"] not in self.records]
    if not new:
      return
    blob = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in new)
    with open(self.path, "a") as f:
      f.write(blob)
      f.flush()
      os.fsync(f.fileno())
    for r in new:
      self.records[r["probe"]] = r


def _read_records(path: str, repair: bool) -> dict[str, dict]:
  records: dict[str, dict] = {}
  if not os.path.exists(path):
    return records
  with open(path, "rb") as f:
    raw = f.read()
  good_end = 0
  for line in raw.split(b"\n")[:-1]:  # an unterminated last line is partial, even if it parses
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      break  # a partial line can only be the last one written
    records.setdefault(rec["probe"], rec)
    good_end += len(line) + 1
  if repair and good_end < len(raw):
    with open(path, "r+b") as f:
      f.truncate(good_end)
  return records
