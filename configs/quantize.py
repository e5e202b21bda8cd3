"""Quantization search (the paper's search tree): the largest share of linear parameters
quantized with held-out FDT_α >= bound, for FDT-, DPPL-, KL-ranked and random orders.

  python main.py --config=configs/quantize.py --workdir=runs/quant-smollm2
  python main.py --config=configs/quantize.py:model=llama2-7b --workdir=runs/quant-7b

Args: model (configs.common.MODELS); runlocal (tiny CPU run for tests: 3-bit AbsMax on the
first three layers, about a minute on 2 cores); mixed (stages int4 group-wise, then int8 for
the rest). Ablations: `sweep()` below; expand and collect with launch/sweep.py.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2", runlocal=False, mixed=False)
  config = ml_collections.ConfigDict()
  # Which job main.py runs.
  config.job = "quantize"
  common.model_fields(config, common.model_name(arg.model))
  common.data_fields(config)
  # Held-out prompts (the search's bound is checked on them); selection prompts (the
  # ranking probes) are drawn from the same data with search.selection_seed.
  common.prompt_fields(config)
  common.calibration_fields(config)
  s = _search_fields(config)
  # CPU-only hosts: JAX CPU devices (0 = one per core); see configs/probe.py.
  config.cpu_devices = 0

  config.data.source = "text"
  config.data.data_files = "../shared/data/wikitext-2-raw/wiki.test.raw"
  config.prompts.num = 16
  config.prompts.length = 32
  config.prompts.new_tokens = 32
  if arg.mixed:
    s.levels = (4, 8)
    s.method_args = "granularity=group,group_size=64"
  if arg.model != "smollm2":
    config.param_dtype = config.dtype = "bfloat16"
    config.data.source = "wikitext-2-raw-v1"
    config.data.data_files = ""
    config.prompts.num = 64
  if arg.runlocal:
    _runlocal(config)
  return config


def _search_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.search: the stages, the components, the rankings and the bounds."""
  s = config.search = ml_collections.ConfigDict()
  # Quantization method family (probe.method of the ranking probes): absmax | rtn | gptq.
  s.method = "absmax"
  # Stages: one level (bits) per stage, tried in this order; (4, 8) = int4 where FDT allows,
  # int8 for the rest.
  s.levels = (8,)
  # Further method arguments, e.g. 'granularity=tensor' (absmax) or 'group_size=64' (gptq).
  s.method_args = "granularity=tensor"
  # Components searched: kinds (subset of q,k,v,o,gate,up,down) and layers ('*' or '0-3,7').
  s.kinds = "q,k,v,o,gate,up,down"
  s.layers = "*"
  # Rankings to run: fdt (the paper's), dppl, kl, random (seeded by search.seed).
  s.rank_by = ("fdt", "dppl", "kl", "random")
  # FDT_α of the bound, and the bounds in tokens (each 0 <= bound <= prompts.new_tokens).
  s.alpha = 0.9
  s.bounds = (24.0,)
  # Consecutive rejections that end a stage (0 = try every component).
  s.patience = 0
  # Most evaluated configurations per search (0 = no limit).
  s.max_evals = 0
  # Seed of the random ranking.
  s.seed = 0
  # Seed of the selection prompts (must draw prompts other than the held-out ones).
  s.selection_seed = 1000
  # Selection prompts as a token-id JSONL file; required when prompts.jsonl is set.
  s.selection_jsonl = ""
  # Probes per device and call of the ranking sweep (0 = automatic).
  s.chunk_size = 0
  return s


def _runlocal(config: ml_collections.ConfigDict) -> None:
  """A one-minute CPU run: 3-bit AbsMax on the first three layers, bound 6 of 8 tokens."""
  s = config.search
  # Held-out and selection prompts are windows of the same WikiText-2 stream drawn with
  # prompts.seed and search.selection_seed (4 of the 64 shipped default prompts, one per
  # document, drawn twice would overlap by chance).
  config.data.max_docs = 400
  config.prompts.num = 4
  config.prompts.length = 12
  config.prompts.new_tokens = 8
  config.prompts.batch_size = 4
  s.bounds = (6.0,)
  s.levels = (3,)
  # The first three layers (21 SmolLM2 components; all of the tests' 3-layer model).
  s.layers = "0-2"
  config.calibration.samples = 4
  config.calibration.length = 16
  config.calibration.batch_size = 4


def sweep(add):
  """Ablation grid for launch/sweep.py: every run searches all four rankings at three bounds
  (collected as one row per ranking and bound); the runs vary the stages of AbsMax per group
  of 64: int8, int4, and int4 where the bound allows, then int8."""
  for levels in ((8,), (4,), (4, 8)):
    add({"search.levels": levels, "search.method_args": "granularity=group,group_size=64",
         "search.bounds": (8.0, 16.0, 24.0)})
