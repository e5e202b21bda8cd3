"""Train-state checkpoints with orbax's CheckpointManager.

Layout: <dir>/<step>/{state, meta}: `state` is the whole train-state pytree (params,
optimizer state, masks, step, rng), `meta` a JSON dict (data position, phase, config
fingerprint). Orbax writes `<step>.orbax-checkpoint-tmp-*`, commits by rename and lists
only committed steps; old steps are deleted only after a newer one has committed.

Restore takes the latest committed step; if it cannot be read (partial, corrupt), the
previous one is tried with a warning, and the unreadable step directory is moved aside
to <dir>/../ckpt_unreadable/<step> (never deleted), so the run continues from the last
good state. If no committed step is readable, a DtmError says so and nothing is touched.
"""
from __future__ import annotations

import logging
import os
import shutil
import time

import jax
import orbax.checkpoint as ocp

from dtm.errors import DtmError

log = logging.getLogger("dtm")


class TrainCheckpoints:
  """Save every `every` steps, keep the newest `keep`, optionally asynchronously."""

  def __init__(self, directory: str, *, every: int, keep: int, use_async: bool = True):
    if every < 1 or keep < 1:
      raise DtmError(f"checkpoint.every and checkpoint.keep must be >= 1, got every={every}, "
                     f"keep={keep}")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=every, max_to_keep=keep, create=True,
        enable_async_checkpointing=use_async)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self.manager.should_save(step)

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Start saving `state` at `step` (returns once the device arrays are copied; the
    write continues in the background when asynchronous)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
    """(step, state, meta) of the newest readable committed checkpoint, restored into
    `abstract_state` (ShapeDtypeStructs with shardings); None if there is none."""
    steps = self.steps()
    errors = []
    for step in reversed(steps):
      try:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  meta=ocp.args.JsonRestore())
        restored = self.manager.restore(step, args=args)
        state = restored["state"]
        jax.block_until_ready(state)
        return step, state, dict(restored["meta"])
      except Exception as e:  # orbax/tensorstore raise many types for unreadable data
        msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        errors.append((step, msg))
        log.warning("warning: checkpoint step %d in %s is unreadable (%s); trying an earlier one",
                    step, self.directory, msg[:300])
    if steps:
      raise DtmError(f"no readable checkpoint in {self.directory}: steps "
                     f"{', '.join(str(s) for s, _ in errors)} all failed to restore (newest: "
                     f"{errors[0][1][:200]}); nothing was deleted. Move the directory away to "
                     "start over, or fix the files")
    return None

  def set_aside(self, newer_than: int) -> None:
    """Move committed steps > newer_than (unreadable ones skipped by `restore_latest`)
    to ckpt_unreadable/ beside the checkpoint directory, so new saves can use their step
    numbers; nothing is deleted."""
    aside = os.path.join(os.path.dirname(self.directory), "ckpt_unreadable")
    moved = False
    for step in self.steps():
      if step > newer_than:
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, f"{step}-{int(time.time())}")
        shutil.move(os.path.join(self.directory, str(step)), target)
        log.warning("warning: moved unreadable checkpoint step %d to %s", step, target)
        moved = True
    if moved:
      self.manager.reload()
