"""Compare compressions on several prompt domains: greedy DTMs, sampled DTMs, perplexity,
and the rank correlations between the metrics across compressions.

  python main.py --config=configs/compare.py --workdir=runs/compare-smollm2
  python main.py --config=configs/compare.py:study=components --workdir=runs/compare-comps

Args: model (see configs.common.MODELS); runlocal (tiny CPU run for tests);
study: 'methods' (a few whole-model compressions, the default) or 'components' (one
component at a time: every kind at three depths, for ranking components by greedy vs
sampled FDT and on prose vs code).
"""
import ml_collections

from configs import common

SHARED_DATA = common.SHARED_DATA

# Whole-model compressions at several strengths (uncalibrated methods; calibrated ones
# (wanda, sparsegpt, gptq) take the config.calibration block where the job supports it).
METHODS = (
    "mlp@*:magnitude(0.2)", "mlp@*:magnitude(0.4)", "*@*:magnitude(0.3)",
    "attn@*:magnitude(0.5)", "*@*:nm(3,4)", "mlp@*:nm(2,4)",
    "*@*:absmax(bits=8)", "*@*:absmax(bits=6)", "*@*:absmax(bits=4,granularity=group,group_size=64)",
    "mlp@*:absmax(bits=4)",
)


def component_specs(layers=(0, 14, 29), kinds=("q", "k", "v", "o", "gate", "up", "down"),
                    method="magnitude(0.9)") -> tuple[str, ...]:
  return tuple(f"{k}@{l}:{method}" for l in layers for k in kinds)


def _domain(source: str, data_files: str = "") -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = source
  d.data_files = data_files
  d.split = "test"
  d.text_field = "text"
  d.max_docs = 0
  d.bos = "auto"
  return d


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2", runlocal=False, study="methods")
  config = ml_collections.ConfigDict()
  # Which job main.py runs.
  config.job = "compare"
  common.model_fields(config, common.model_name(arg.model))
  # The compressions to compare, one spec per entry (tuple, or one string with '|'
  # between specs); each is evaluated on every domain and written as one record.
  config.compressions = METHODS if arg.study == "methods" else component_specs()
  # Prompt domains: name -> a data block (fields as configs.common.data_fields). Each
  # domain draws its own prompts and perplexity windows with config.prompts / config.ppl.
  config.domains = ml_collections.ConfigDict()
  # Prose: WikiText-2 raw test split (local file).
  config.domains.prose = _domain("text", f"{SHARED_DATA}/wikitext-2-raw/wiki.test.raw")
  # Program text: this interpreter's standard-library sources, one document per file.
  config.domains.code = _domain("python-stdlib")
  # Which domains to evaluate, in this order (the first two are compared with each other).
  config.domain_names = "prose,code"
  common.prompt_fields(config)
  common.ppl_fields(config)
  common.calibration_fields(config)
  _sampling_fields(config)
  _task_fields(config)
  # FDT_α levels to report.
  config.alphas = (0.75, 0.9)
  # Metrics whose rank correlations (Spearman, across compressions) are reported.
  config.correlate = ("fdt_alpha_0.9", "fdt_mean", "sdt_mean", "dppl", "ppl",
                      "sampled_fdt_mean", "sampled_sdt_mean", "task_acc_mean")

  config.prompts.num = 32
  config.prompts.length = 32
  config.prompts.new_tokens = 32
  config.ppl.max_windows = 16
  if arg.runlocal:
    _runlocal(config)
  return config


def _sampling_fields(config: ml_collections.ConfigDict) -> None:
  """config.sampling: DTMs under sampling decoding."""
  sampling = config.sampling = ml_collections.ConfigDict()
  # Also compute DTMs under sampling decoding (dtm.sampling: shared Gumbel noise).
  sampling.enabled = True
  # Softmax temperature T > 0.
  sampling.temperature = 1.0
  # Keep the k most likely tokens (0 = off).
  sampling.top_k = 0
  # Nucleus: keep the smallest set of tokens with probability mass >= top_p (1 = off).
  sampling.top_p = 0.9
  # Seed of the noise shared by F and F'.
  sampling.seed = 0


def _task_fields(config: ml_collections.ConfigDict) -> None:
  """config.tasks: zero-shot task accuracy (lm-evaluation-harness)."""
  tasks = config.tasks = ml_collections.ConfigDict()
  # Zero-shot tasks (lm-evaluation-harness through dtm.tasks.DtmLM), comma-separated, e.g.
  # 'piqa,arc_easy'; '' = no task accuracy. Their mean accuracy joins the correlations.
  tasks.names = ""
  # Documents per task (0 = all).
  tasks.limit = 200
  # Requests per forward pass.
  tasks.batch_size = 16
  # Task data: 'auto' (local copies when HF_DATASETS_OFFLINE/HF_HUB_OFFLINE), 'local', 'hub'.
  tasks.task_data = "auto"


def _runlocal(config: ml_collections.ConfigDict) -> None:
  """A tiny CPU run for tests: three compressions, 4 prompts, 2 PPL windows."""
  config.compressions = ("mlp@*:magnitude(0.5)", "q@0:magnitude(0.9)", "*@*:absmax(bits=4)")
  config.domains.prose = _domain("default")
  config.prompts.num = 4
  config.prompts.length = 16
  config.prompts.new_tokens = 8
  config.prompts.batch_size = 4
  config.ppl.window = 32
  config.ppl.ctx = 16
  config.ppl.max_windows = 2
  config.calibration.source = "default"
  config.calibration.samples = 4
  config.calibration.length = 16
  config.calibration.batch_size = 4
