"""Probe sweep: compress one component (layer, kind) at a time, at every level.

  python main.py --config=configs/probe.py --workdir=runs/probe-smollm2
  python main.py --config=configs/probe.py:model=llama2-7b --workdir=runs/probe-7b \
      --config.probe.method=absmax --config.probe.levels='(8,6,4,3)' \
      --config.probe.method_args=granularity=channel

Args: model (smollm2 | llama2-7b | llama2-13b | any key of configs.common.MODELS),
runlocal (a CPU-sized run for tests), quick (the README quick start: all components,
few levels), beyond90 (levels 0.9 / 0.95 / 0.99 ranked by FDT_0.75: the share of components
prunable beyond 90 %; add --config.probe.method=wanda for Wanda). Ablations: `sweep()` below; expand with launch/sweep.py.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2", runlocal=False, quick=False, beyond90=False)
  config = ml_collections.ConfigDict()
  # Which job main.py runs.
  config.job = "probe"
  common.model_fields(config, common.model_name(arg.model))
  common.data_fields(config)
  common.prompt_fields(config)
  _probe_fields(config)
  common.calibration_fields(config)
  # Probes compress one component of the original model: statistics of the original.
  config.calibration.mode = "parallel"
  # FDT_alpha levels stored per probe.
  config.alphas = (0.75, 0.9)
  # Per-position KL(F‖F') and top-1 agreement per probe (keeps base logits on device).
  config.kl = True
  # CPU-only hosts: JAX CPU devices to create (0 = one per core). Probes then run one per
  # core, about 1.3x the throughput of splitting each matmul over the cores; GPU/TPU
  # hosts are unaffected. Ignored if XLA_FLAGS or JAX_NUM_CPU_DEVICES already set it.
  config.cpu_devices = 0

  config.prompts.num = 16
  config.prompts.length = 64
  config.prompts.new_tokens = 32
  if arg.model != "smollm2":
    _llama2(config, arg.model)
  if arg.quick:
    _quick(config)
  if arg.beyond90:
    _beyond90(config)
  if arg.runlocal:
    _runlocal(config)
  return config


def _probe_fields(config: ml_collections.ConfigDict) -> None:
  """config.probe: the method, its levels and the components swept."""
  probe = config.probe = ml_collections.ConfigDict()
  # Compression method family: magnitude | absmax | nm | rtn, or calibrated (statistics of
  # the original model, config.calibration in parallel mode): wanda | sparsegpt | gptq.
  probe.method = "magnitude"
  # Levels: the method's first argument (rate for magnitude / wanda / sparsegpt, bits for
  # absmax / rtn / gptq, n for nm; wanda and sparsegpt take n with method_args='m=4').
  probe.levels = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
  # Further method arguments, e.g. 'granularity=channel' (absmax), 'm=4' (nm, wanda, sparsegpt)
  # or 'group_size=128' (rtn, gptq).
  probe.method_args = ""
  # Component kinds to probe (comma-separated subset of q,k,v,o,gate,up,down).
  probe.kinds = "q,k,v,o,gate,up,down"
  # Layers to probe: '*' or e.g. '0-3,7' (inclusive ranges).
  probe.layers = "*"
  # Probes per device and call (0 = all levels of a component, capped by device memory).
  # Each device of a call runs its own component; see dtm.probe.schedule.
  probe.chunk_size = 0
  # Devices per tensor-parallel group of the ('probe', 'model') mesh: 1 = every device holds
  # the whole model (fastest where it fits); >1 splits heads and the MLP over that many
  # devices (13B on v5e, 70B anywhere). Results are the same for every value.
  probe.mesh_model = 1
  # Candidates: per component, the largest level whose FDT_alpha >= min_fdt.
  probe.candidate_alpha = 0.9
  # FDT threshold in tokens for candidates (0 = half of prompts.new_tokens).
  probe.candidate_min_fdt = 0


def _llama2(config: ml_collections.ConfigDict, model: str) -> None:
  """Llama-2 sizes: bf16, WikiText-2 from the hub, finer levels, 64 prompts."""
  config.param_dtype = config.dtype = "bfloat16"
  config.data.source = "wikitext-2-raw-v1"
  config.probe.levels = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
  config.prompts.num = 64
  if model in ("llama2-13b", "llama2-70b"):
    # A bf16 replica does not fit one chip (13B: 26 GB > v5e's 16 GiB; 70B: 140 GB): four
    # chips per tensor-parallel probe group (dry run: v5e-16 / v4-32 for 13B, v5p-64 for 70B).
    config.probe.mesh_model = 4


def _quick(config: ml_collections.ConfigDict) -> None:
  """The README quick start: all components, few levels, short prompts."""
  config.prompts.num = 8
  config.prompts.length = 32
  config.probe.levels = (0.25, 0.5, 0.75)


def _beyond90(config: ml_collections.ConfigDict) -> None:
  """Levels 0.9 / 0.95 / 0.99 ranked by FDT_0.75."""
  # The paper's prunability claim, one component at a time: which components keep
  # FDT_0.75 >= N/2 at 90 % sparsity and beyond (README "Prunability beyond 90 %").
  config.probe.levels = (0.9, 0.95, 0.99)
  config.probe.candidate_alpha = 0.75


def _runlocal(config: ml_collections.ConfigDict) -> None:
  """The tests' CPU-sized sweep: two components of layers 0 and 29, two levels."""
  config.prompts.num = 4
  config.prompts.length = 12
  config.prompts.new_tokens = 8
  config.probe.levels = (0.5, 0.9)
  config.probe.layers = "0,29"
  config.probe.kinds = "q,down"
  config.calibration.samples = 4
  config.calibration.length = 16
  config.calibration.batch_size = 4


def sweep(add):
  """Ablation grid for launch/sweep.py: one run per override dict."""
  for method, levels, args in (("magnitude", (0.1, 0.25, 0.5, 0.75, 0.9), ""),
                               ("absmax", (8, 6, 4, 3), "granularity=channel"),
                               ("nm", (2,), "m=4")):
    add({"probe.method": method, "probe.levels": levels, "probe.method_args": args})
