"""The operator of a pruning round: how candidates are probed and increments applied.

The paper prunes by magnitude: an increment moves a component one ladder level up by
zeroing the smallest weights of the current (trained) kernel, which keeps every earlier
zero. With a calibrated operator (Wanda, SparseGPT) a round instead

  1. collects the input statistics of the CURRENT model on the calibration windows
     (parallel mode: every layer's inputs from the current params; the Hessian for
     SparseGPT, `calibration.collect_statistics`);
  2. probes each candidate (component at its next level) with the operator and those
     statistics, on top of the current params (`probe.ProbeRunner(statistics=...)`);
  3. applies only the chosen increments, with the operator, to the current params
     (sequential calibration by default, as the references: layer l's statistics on the
     outputs of the already compressed layers < l; 'parallel' reuses step 1's).

Wanda on a partly pruned kernel keeps its zeros (their score |w| ||x|| is 0, the lowest
of their row, and the new rate is higher). SparseGPT re-solves the component at its new
rate from its current weights: the count of zeros per block of columns is exact, and
OBS updates may move an earlier zero, as one-shot SparseGPT at that rate would.

`Operator` is the one place that names the probes and specs of an operator.
"""
from __future__ import annotations

import collections
import dataclasses
import sys
from typing import Mapping

import numpy as np
from tqdm.auto import tqdm

from dtm import compress, metrics, probe
from dtm.components import KINDS, Component, get_path, kernel_path
from dtm.compress import calibration
from dtm.errors import DtmError
from dtm.sweep_store import ProbeStore

OPERATORS = ("magnitude", "wanda", "sparsegpt")


@dataclasses.dataclass(frozen=True)
class Operator:
  """A pruning operator with a rate: name (OPERATORS) and extra method arguments
  ('percdamp=0.02, blocksize=64'); calibration: how increments are applied with a
  calibrated operator ('sequential' | 'parallel'), windows int32 [n, T] and the
  calibration batch size."""
  name: str = "magnitude"
  args: str = ""
  mode: str = "sequential"
  batch_size: int = 8

  @property
  def calibrated(self) -> bool:
    return self.name in compress.CALIBRATED_METHODS

  def method(self, rate: float) -> compress.Method:
    args = ", ".join(filter(None, [f"rate={rate:g}", self.args.strip()]))
    return compress.parse_method(f"{self.name}({args})")

  def probe_id(self, comp: Component, level: float) -> str:
    if self.name == "magnitude":  # the ids of the magnitude rounds' stores, unchanged
      return f"{comp.name}:magnitude({level:g})"
    return f"{comp.name}:{self.method(level).to_string()}"

  def spec(self, levels: Mapping[Component, float]) -> str:
    """The canonical spec of a level map: one rule per (kind, rate), kinds in KINDS order,
    rates ascending, layers merged ('q@0-2,5:magnitude(rate=0.5)'); components at level 0
    are left out ('none' if all are)."""
    groups: dict[tuple[str, float], list[int]] = collections.defaultdict(list)
    for comp, level in levels.items():
      if level > 0:
        groups[(comp.kind, float(level))].append(comp.layer)
    rules = [compress.Rule((kind,), tuple(sorted(layers)), self.method(level))
             for (kind, level), layers in sorted(groups.items(),
                                                 key=lambda g: (KINDS.index(g[0][0]), g[0][1]))]
    return compress.Spec(tuple(rules)).to_string()


def check_operator(op: Operator) -> None:
  """DtmError for an unknown operator, bad extra arguments or calibration mode."""
  if op.name not in OPERATORS:
    raise DtmError(f"prune.method must be one of {', '.join(OPERATORS)}, got {op.name!r}")
  if any("=" not in item for item in op.args.split(",") if item.strip()):
    raise DtmError(f"prune.method_args must be 'key=value, ...', got {op.args!r}")
  if any(item.split("=", 1)[0].strip() == "rate" for item in op.args.split(",")):
    raise DtmError("prune.method_args must not set rate: the ladder gives every rate")
  op.method(0.5)  # the spec grammar's own errors (unknown argument, bad value)
  if op.mode not in calibration.MODES:
    raise DtmError(f"calibration.mode must be one of {', '.join(calibration.MODES)}, got "
                   f"{op.mode!r}")


def levels_of_spec(spec: compress.Spec, num_layers: int, op: Operator,
                   allowed: tuple[Component, ...]) -> dict[Component, float]:
  """Component -> rate of a start spec (a recipe of the allocate job): every rule must be
  `op`'s method with a rate, on prunable components (DtmError naming the first that is
  not)."""
  levels = {}
  for comp, method in spec.resolve(num_layers).items():
    if method.name != op.name or "rate" not in method.kwargs:
      raise DtmError(f"prune.start: {comp.name} uses {method.to_string()}; a start recipe "
                     f"must use prune.method={op.name} with a rate on every component")
    if comp not in allowed:
      raise DtmError(f"prune.start prunes {comp.name}, which prune.components leaves out")
    levels[comp] = float(method.kwargs["rate"])
  return levels


def statistics(cfg, params, op: Operator, windows: np.ndarray, layers: set[int]):
  """The current model's input statistics of `layers` (parallel mode), or None for
  magnitude."""
  if not op.calibrated:
    return None
  return calibration.collect_statistics(
      cfg, params, windows, mode="parallel", batch_size=op.batch_size,
      hessian=op.name in compress.HESSIAN_METHODS, layers=layers, progress=True)


def probe_candidates(cfg, params, seq_PS: np.ndarray, c: int, cands, store: ProbeStore,
                     alphas, mesh=None, op: Operator = Operator(), stats=None,
                     kl: bool = False) -> dict[Component, dict]:
  """FDT/SDT/DPPL (and KL with `kl`) aggregates of each candidate (component compressed
  at its level by `op` on top of `params`; calibrated operators with `stats` of the
  current model), measured on s = p ⊕ y (seq_PS int32 [P, c+N], y from the original
  model). Probes not yet in `store` run with `probe.ProbeRunner` (one component per
  device and call) and are appended per call, so a killed round resumes where it
  stopped."""
  todo = [(comp, lvl) for comp, lvl in cands if op.probe_id(comp, lvl) not in store.records]
  if todo:
    runner = probe.ProbeRunner(cfg, params, seq_PS, c, mesh or probe.probe_mesh(), kl=kl,
                               kinds=tuple(sorted({comp.kind for comp, _ in todo})),
                               statistics=stats)
    bar = tqdm(total=len(todo), unit="probe", desc="probes", smoothing=0.1,
               mininterval=0.5 if sys.stderr.isatty() else 30)
    for slots, outs in runner.stream(_calls(params, todo, op, runner)):
      recs = []
      for slot, out in zip(slots, outs):
        comp, lvl = slot.keys[0]
        per = {k: np.asarray(v[0]) for k, v in out.items() if k != "sparsity"}
        recs.append({"probe": op.probe_id(comp, lvl), "component": comp.name, "level": lvl,
                     "sparsity": round(float(out["sparsity"][0]), 6),
                     "aggregate": metrics.aggregate(per, alphas),
                     "fdt": per["fdt"].tolist()})
      store.add(recs)
      bar.update(len(recs))
    bar.close()
  return {comp: store.records[op.probe_id(comp, lvl)]["aggregate"] for comp, lvl in cands}


def _calls(params, todo, op: Operator, runner):
  """(family, slots) per call: one candidate per slot; precomputed families (sparsegpt)
  one kind per call (their kernels enter the call, shaped by the kind)."""
  groups: dict[object, dict[Component, list]] = {}
  for comp, lvl in todo:
    family, level = probe.split_method(op.method(lvl))
    shape = get_path(params, kernel_path(comp.kind)).shape  # [L, in, out]
    level = lvl if family.name == "magnitude" else level
    arg = probe.dynamic_arg(family, level, int(shape[1] * shape[2]), int(shape[1]))
    key = (family, comp.kind if family.precomputed else None)
    groups.setdefault(key, {})[comp] = [((comp, lvl), arg)]
  for (family, _), work in groups.items():
    for slots in probe.schedule(work, runner.num_devices, 1, runner.uniform):
      yield family, slots


def apply(cfg, params, increments: Mapping[Component, float], op: Operator,
          windows: np.ndarray | None, stats=None):
  """The chosen increments (component -> new rate) applied by a calibrated `op` to the
  current params -> params: sequential calibration on the current model (layers past the
  last named one untouched), or with `stats` (the round's parallel statistics)."""
  spec = op.spec(increments)
  if op.mode == "parallel" and stats is not None:
    new, _ = compress.apply_spec(params, spec, calibration=stats)
    return new
  if windows is None:
    raise DtmError(f"prune.method={op.name} needs calibration windows (config.calibration)")
  new, _ = calibration.calibrate_and_compress(cfg, params, spec, windows,
                                              batch_size=op.batch_size, progress=True)
  return new
