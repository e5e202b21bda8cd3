"""FDT-guided sparsity allocation (`dtm.jobs.allocate`): probe every component at a fine
ladder of rates with a calibrated operator, choose one rate per component for an overall
target by a knapsack over the probes' costs, apply it with sequential calibration.

  python main.py --config=configs/allocate.py --workdir=runs/allocate
  python main.py --config=configs/evaluate.py --workdir=runs/eval-recipe \
      --config.compression="$(cat runs/allocate/recipe.txt)" ...   (same data/prompts/ppl)

The held-out blocks (data, prompts, ppl, alphas, kl, calibration) are the evaluate job's
own fields, so the evaluate job given recipe.txt and the same settings reproduces the
held-out numbers exactly. Args: model (configs.common.MODELS), runlocal (the tests' tiny
CPU run). Ablations: `sweep()` below.
"""
import ml_collections

from configs import common
from configs.train import SHARED_DATA


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2", runlocal=False)
  config = ml_collections.ConfigDict()
  # Which job main.py runs.
  config.job = "allocate"
  common.model_fields(config, common.model_name(arg.model))
  _allocate_fields(config)
  _selection_fields(config)
  _heldout_fields(config)
  # JAX CPU devices on a CPU-only host (0 = one per core: one probe per core).
  config.cpu_devices = 0
  if arg.runlocal:
    _runlocal(config)
  return config


def _allocate_fields(config) -> None:
  a = config.allocate = ml_collections.ConfigDict()
  # Calibrated pruning operator probed and applied: wanda | sparsegpt.
  a.operator = "sparsegpt"
  # Its further arguments (e.g. 'percdamp=0.01,blocksize=128'; '' = the defaults).
  a.operator_args = ""
  # Rates every component is probed at (strictly increasing, in (0, 1)); the allocation
  # gives each component 0 or one of them (one component per target is trimmed so the
  # overall sparsity meets the target exactly). 7 rates: the SmolLM2 allocation at one
  # target in under 15 min on 2 cores (README); the README's first table used 14 rates
  # (0.1, 0.2, 0.3, ..., 0.5, 0.55, ..., 0.95), twice the probes.
  a.ladder = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  # Overall sparsities of all selected linear weights (parameter-weighted), each <= the
  # ladder's top rate; the probes are shared by all targets.
  a.targets = (0.5,)
  # Costs tried (dtm.search.allocation): kl | nll | sdt | fdt; the best on the selection
  # prompts (select_by) is applied (kl won at 40-70 % on SmolLM2, README).
  a.costs = ("kl",)
  # Allocation units tried: component (one rate each) and/or layer (one rate per layer).
  a.units = ("component",)
  # Trust regions tried around the uniform allocation: each component's rate within
  # target ± band (0: the uniform allocation itself, a candidate like any other; >= 1:
  # unbounded). The probes are noisy single-component measurements; a band keeps the
  # knapsack from trading on their noise (OWL's λ = 0.08 plays this role).
  a.bands = (0.0, 0.1, 1.0)
  # Selection-prompt metric that picks among the (cost, unit, band) candidates: dppl | fdt_mean |
  # kl_mean | sdt_mean.
  a.select_by = "dppl"
  # Components allocated ('KINDS@LAYERS'); the others stay dense.
  a.components = "*@*"
  common.local_calibration_fields(config, samples=64)


def _selection_fields(config) -> None:
  # Selection prompts: the probes and the choice among candidates (never the held-out ones).
  sel = config.select = ml_collections.ConfigDict()
  common.data_fields(sel)
  sel.data.source = "text"
  sel.data.data_files = f"{SHARED_DATA}/wikitext-2/wiki.valid.tokens"
  common.prompt_fields(sel)
  sel.prompts.num = 8
  sel.prompts.length = 32
  sel.prompts.new_tokens = 16
  sel.prompts.seed = 1


def _heldout_fields(config) -> None:
  # Held-out prompts, references and PPL windows (the evaluate job's fields).
  common.data_fields(config)
  config.data.source = "text"
  config.data.data_files = f"{SHARED_DATA}/wikitext-2-raw/wiki.test.raw"
  common.prompt_fields(config)
  config.prompts.num = 64
  config.prompts.length = 32
  config.prompts.new_tokens = 32
  common.ppl_fields(config)
  config.ppl.window = 512
  config.ppl.ctx = 1
  config.ppl.max_windows = 32
  config.ppl.batch_size = 4
  # FDT_α levels reported.
  config.alphas = (0.75, 0.9)
  # KL(F‖F') and top-1 agreement on the held-out prompts.
  config.kl = True


def _runlocal(config) -> None:
  a = config.allocate
  a.ladder = (0.25, 0.5, 0.75)
  a.targets = (0.3, 0.5)
  a.costs = ("kl", "fdt")
  a.units = ("component", "layer")
  a.bands = (1.0,)
  config.cpu_devices = 1
  config.calibration.samples = 4
  config.calibration.length = 32
  config.calibration.batch_size = 4
  config.calibration.max_docs = 400
  for block in (config.select, config):
    block.data.max_docs = 400
    block.prompts.num = 4
    block.prompts.length = 8
    block.prompts.new_tokens = 6
    block.prompts.batch_size = 4
  config.ppl.window = 32
  config.ppl.max_windows = 2


def sweep(add):
  """Ablation grid for launch/sweep.py: each operator with every cost and both units
  (the README's allocation section), at the comparison's targets."""
  targets = (0.3, 0.4, 0.5, 0.6, 0.7)
  for operator in ("sparsegpt", "wanda"):
    add({"allocate.operator": operator, "allocate.targets": targets,
         "allocate.costs": ("kl", "nll", "sdt", "fdt"),
         "allocate.units": ("component", "layer")})
