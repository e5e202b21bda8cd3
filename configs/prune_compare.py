"""Pruning methods at equal overall sparsity: uniform magnitude, Wanda and SparseGPT (one-shot,
and each followed by the FDT-guided run's training budget) against FDT-guided pruning.

  python main.py --config=configs/prune_compare.py --workdir=runs/prune-compare

Everything of configs/prune.py (the FDT-guided run, its held-out prompts and PPL windows,
the training block) plus `compare` (sparsities, methods) and `calibration` (Wanda /
SparseGPT windows). Args: as configs/prune.py (model, runlocal, tiny).
"""
import ml_collections

from configs import common
from configs import prune as prune_config
from configs.train import SHARED_DATA


def get_config(arg=None):
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
  # Also train each one-shot model for as many steps as the FDT-guided run trained
  # before reaching that sparsity (rounds x train.steps), with the same train block.
  cmp.train = True
  common.calibration_fields(config)
  config.calibration.source = "text"
  config.calibration.data_files = f"{SHARED_DATA}/wikitext-2/wiki.valid.tokens"
  config.calibration.samples = 32
  config.calibration.length = 512
  if tiny:
    cmp.sparsities = (0.1, 0.2)
    config.prune.k = 6
    config.calibration.samples = 4
    config.calibration.length = 16
    config.calibration.batch_size = 4
    config.calibration.max_docs = 400
  return config
