"""Pruning methods at equal overall sparsity: uniform magnitude, Wanda and SparseGPT (one-shot,
and each followed by the FDT-guided run's training budget) against FDT-guided pruning.

  python main.py --config=configs/prune_compare.py --workdir=runs/prune-compare
  python main.py --config=configs/prune_compare.py:study=allocation \
      --workdir=runs/compare-allocation   (after configs/allocate.py --workdir=runs/alloc-sgpt)

Everything of configs/prune.py (the FDT-guided run, its held-out prompts and PPL windows,
the training block) plus `compare` (sparsities, methods, specs, recipes) and `calibration`
(Wanda / SparseGPT windows). Args: as configs/prune.py (model, runlocal, tiny), and
study=allocation: uniform magnitude / Wanda / SparseGPT, OWL-Wanda, OWL-SparseGPT and the
FDT-allocated recipes of runs/alloc-sgpt at 30..70 %, on configs/allocate.py's held-out
prompts, PPL windows and calibration windows (no FDT-guided magnitude run, no training).
"""
import ml_collections

from configs import common
from configs import prune as prune_config


def get_config(arg=None):
  parts = [a for a in (arg or "").split(",") if a]
  study = common.parse_arg(",".join(a for a in parts if a.startswith("study=")), study="")
  if study.study not in ("", "allocation"):
    raise ValueError(f"unknown study {study.study!r}; known: allocation")
  arg = ",".join(a for a in parts if not a.startswith("study="))
  config = prune_config.get_config(arg)
  tiny = any(a in (arg or "") for a in ("runlocal", "tiny"))
  # Which job main.py runs.
  config.job = "prune_compare"
  cmp = config.compare = ml_collections.ConfigDict()
  # Overall sparsities of the linear parameters compared (each in (0, 1)); the FDT-guided
  # run goes on until it reaches the largest (prune.target_sparsity is set to it).
  cmp.sparsities = (0.1, 0.2, 0.3, 0.5)
  # One-shot methods applied uniformly (same rate on every prunable component).
  cmp.methods = ("magnitude", "wanda", "sparsegpt")
  # More one-shot rows: 'label=template', the template a method of the spec grammar with
  # {s} for the sparsity, applied to prune.components (e.g. OWL's per-layer allocation:
  # 'owl-sparsegpt=owl({s}, method=sparsegpt)').
  cmp.specs = ()
  # An allocate job's workdir: its recipe-<s>.txt for every sparsity, as rows
  # 'fdt-alloc-<operator>' ('' = none).
  cmp.recipes = ""
  # Run the FDT-guided magnitude rounds (configs/prune.py) and show their rows.
  cmp.fdt_guided = True
  # Also train each one-shot model for as many steps as the FDT-guided run trained
  # before reaching that sparsity (rounds x train.steps), with the same train block.
  cmp.train = True
  common.local_calibration_fields(config, samples=32)
  if study.study == "allocation":
    _allocation_study(config)
  if tiny:
    cmp.sparsities = (0.1, 0.2)
    config.prune.k = 6
    config.calibration.samples = 4
    config.calibration.length = 16
    config.calibration.batch_size = 4
    config.calibration.max_docs = 400
  return config


def _allocation_study(config) -> None:
  """Issue 20's comparison: every row on configs/allocate.py's held-out set and
  calibration windows, so the FDT-allocated rows are the allocate job's own recipes."""
  from configs import allocate
  alloc = allocate.get_config()
  cmp = config.compare
  cmp.sparsities = (0.3, 0.4, 0.5, 0.6, 0.7)
  cmp.specs = ("owl-wanda=owl({s}, method=wanda)", "owl-sparsegpt=owl({s}, method=sparsegpt)")
  cmp.recipes = "runs/alloc-sgpt"
  cmp.fdt_guided = False
  cmp.train = False
  config.prune.components = alloc.allocate.components
  config.calibration = alloc.calibration
  ev = config.eval
  for key in ("data", "prompts", "ppl", "alphas", "kl"):
    ev[key] = alloc[key]
