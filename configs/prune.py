"""FDT-guided iterative magnitude pruning (`dtm.search.prune_rounds`), the paper's Sec. 5.

  python main.py --config=configs/prune.py --workdir=runs/prune

Each round probes every component at its next ladder level on the current model against
the original model's references (selection prompts), applies the k increments with the
highest FDT_α, trains `train.steps` steps (KL distillation from the original model) and
evaluates the whole model on held-out prompts. Args (`configs/prune.py:model=llama2-7b`):
model (see configs.common.MODELS; `smollm2` default: a real SmolLM2 run sized for CPU
minutes), runlocal / tiny (the tests' CPU-sized run), llama2-7b and llama2-13b pod-sized
runs (bfloat16 compute, FSDP training, C4). Ablations: `sweep()` below; expand and collect
with launch/sweep.py.
"""
import ml_collections

from configs import common
from configs.train import SHARED_DATA, train_fields


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2", runlocal=False, tiny=False)
  config = ml_collections.ConfigDict()
  # Which job main.py runs.
  config.job = "prune"
  common.model_fields(config, common.model_name(arg.model))
  p = config.prune = ml_collections.ConfigDict()
  # Rates a component climbs, one level per increment (strictly increasing, in (0, 1)).
  p.ladder = (0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
  _operator_fields(config)
  # Increments (components moved one level up) applied per round (>= 1).
  p.k = 42
  # α of the FDT_α that ranks the candidates (ties: lower SDT, then lower DPPL) and is
  # compared with fdt_bound on the held-out prompts.
  p.alpha = 0.75
  # Stop when held-out FDT_α falls below this many tokens (0..N of eval.prompts; 0 = never).
  p.fdt_bound = 0.0
  # Stop once this fraction of all linear-kernel weights (q..down, every layer) is zero.
  p.target_sparsity = 0.5
  # At most this many pruning rounds.
  p.max_rounds = 3
  # Prunable components as 'KINDS@LAYERS' of the spec grammar ('*@*' = every component).
  p.components = "*@*"
  # Training text of the recovery phases (one token stream, as in configs/train.py).
  common.data_fields(config)
  config.data.source = "text"
  config.data.data_files = f"{SHARED_DATA}/wikitext-2/wiki.valid.tokens"
  config.data.split = "train"
  # Recovery training after each round (configs/train.py's block; steps = T per round,
  # 0 = no training; the window seed is train.seed + round).
  train_fields(config)
  config.train.steps = 4
  # A pruning increment barely moves the model (KL ~0.02 on training windows): the train
  # job's 2e-4 raised the KL tenfold in 4 steps on SmolLM2 (measured), so 10x lower.
  config.train.optim.lr = 2e-5
  config.train.optim.warmup_steps = 1
  config.train.checkpoint.every = 2
  config.train.eval_every = 0
  config.train.log_every = 0
  config.train.tensorboard = False
  _selection_fields(config)
  _heldout_fields(config)
  # Write the final model as an HF directory too (<workdir>/hf).
  config.export_hf = False
  # JAX CPU devices on a CPU-only host (0 = one per core: one probe per core; GPU/TPU
  # hosts are unaffected). Training splits its batch over them (train.mesh).
  config.cpu_devices = 0
  if arg.model in ("llama2-7b", "llama2-13b"):
    _pod(config)
  if arg.runlocal or arg.tiny:
    _runlocal(config)
  return config


def _operator_fields(config) -> None:
  p = config.prune
  # What an increment does (dtm.search.increments): 'magnitude' (the paper: zero the
  # smallest current weights), or a calibrated operator, 'wanda' | 'sparsegpt', with the
  # CURRENT model's statistics on config.calibration's windows, re-collected every round.
  p.method = "magnitude"
  # Extra arguments of the method, e.g. 'percdamp=0.01, blocksize=128' (never the rate).
  p.method_args = ""
  # How candidates are ranked: 'fdt' (the paper: highest FDT_alpha, then lowest SDT, then
  # DPPL) or 'kl' (lowest mean KL(F||F') on the selection prompts per weight the increment
  # zeroes, then FDT_alpha).
  p.rank_by = "fdt"
  # Start from a one-shot recipe instead of F (refinement): a recipe file (the allocate
  # job's recipe-<target>.txt) or spec text, with prune.method and a rate on every
  # component; round 0 is F with it applied with config.calibration; '' = start at F.
  p.start = ""
  # Calibration windows of the calibrated operators (unused by magnitude); the increments
  # are applied with calibration.mode (sequential, as the references) on the current model.
  common.local_calibration_fields(config, samples=64)


def _selection_fields(config) -> None:
  # Selection prompts: the probes of every round measure FDT on these (against the
  # original model's references); must not overlap the held-out prompts.
  sel = config.select = ml_collections.ConfigDict()
  common.data_fields(sel)
  sel.data.source = "text"
  sel.data.data_files = f"{SHARED_DATA}/wikitext-2/wiki.valid.tokens"
  common.prompt_fields(sel)
  sel.prompts.num = 8
  sel.prompts.length = 32
  sel.prompts.new_tokens = 16
  sel.prompts.seed = 1
  # Devices per tensor-parallel group of the selection probes' ('probe', 'model') mesh
  # (`probe.probe_mesh`): 1 = every device holds the whole model (one probe per device);
  # >1 splits heads and the MLP over that many devices. Results are the same for every value.
  sel.mesh_model = 1


def _heldout_fields(config) -> None:
  # Held-out evaluation of every round's whole model: prompts, references, PPL windows.
  ev = config.eval = ml_collections.ConfigDict()
  common.data_fields(ev)
  ev.data.source = "text"
  ev.data.data_files = f"{SHARED_DATA}/wikitext-2-raw/wiki.test.raw"
  common.prompt_fields(ev)
  ev.prompts.num = 16
  ev.prompts.length = 32
  ev.prompts.new_tokens = 16
  common.ppl_fields(ev)
  ev.ppl.ctx = 1
  ev.ppl.window = 128
  ev.ppl.max_windows = 8
  # FDT_α levels reported per round (prune.alpha is always added).
  ev.alphas = (0.75, 0.9)
  # Also compute KL(F||F') and top-1 agreement at held-out positions.
  ev.kl = True


def _pod(config) -> None:
  """Llama-2-7B / 13B on a pod slice: bf16 compute, FSDP training, C4, WikiText-2 prompts."""
  p, sel, ev = config.prune, config.select, config.eval
  config.param_dtype = "float32"
  config.dtype = "bfloat16"
  p.k = 32
  p.max_rounds = 40
  p.target_sparsity = 0.5
  p.fdt_bound = 4.0
  config.data.source = "c4"
  config.data.data_files = ""
  config.data.max_docs = 200000
  config.calibration.source, config.calibration.data_files = "c4", ""
  config.calibration.max_docs, config.calibration.samples = 20000, 128
  config.calibration.length = 2048
  config.train.steps = 200
  config.train.batch_size = 64
  config.train.seq_len = 2048
  # 16 rows per microbatch: one per chip of a 16-chip slice (8 rows cannot split over 16
  # devices); 13B's step on v4-32 then needs 26.0 GiB per chip (dry run)
  config.train.microbatches = 4
  config.train.remat = True
  config.train.attention_chunk = 512
  config.train.optim.lr = 2e-5
  config.train.optim.warmup_steps = 10
  config.train.checkpoint.every = 50
  config.train.mesh.data = 1
  config.train.mesh.fsdp = -1
  config.train.peak_flops = 989e12  # H100 bf16 dense
  for block in (sel, ev):
    block.data.source = "wikitext-2-raw-v1"
    block.data.data_files = ""
  sel.data.split = "validation"
  ev.data.split = "test"
  sel.prompts.num, sel.prompts.length, sel.prompts.new_tokens = 64, 64, 32
  ev.prompts.num, ev.prompts.length, ev.prompts.new_tokens = 128, 64, 32
  ev.ppl.window, ev.ppl.max_windows = 2048, 40
  # float32 params replicated per chip do not fit a v4 chip (7B: 27 GB, its probes 39 GiB
  # of 30.75); four chips per probe group hold a quarter each (dry run: v4-32)
  sel.mesh_model = 4


def _runlocal(config) -> None:
  """The tests' CPU-sized run (runlocal / tiny)."""
  p, sel, ev = config.prune, config.select, config.eval
  p.ladder = (0.25, 0.5, 0.75)
  p.k = 2
  p.max_rounds = 2
  config.cpu_devices = 1
  config.data.max_docs = 400
  config.train.steps = 2
  config.train.batch_size = 2
  config.train.seq_len = 32
  config.train.optim.lr = 1e-3
  config.train.checkpoint.every = 1
  config.train.objective.vocab_chunk = 4096
  for block in (sel, ev):
    block.data.max_docs = 400
    block.prompts.num = 4
    block.prompts.length = 8
    block.prompts.new_tokens = 6
    block.prompts.batch_size = 4
  ev.ppl.window = 32
  ev.ppl.max_windows = 2
  config.calibration.samples = 4
  config.calibration.length = 32
  config.calibration.batch_size = 4
  config.calibration.max_docs = 400


def sweep(add):
  """Ablation grid for launch/sweep.py: the defaults, then one knob at a time (the README's
  "FDT-guided pruning" section): increments per round k, a finer ladder, the recovery lr
  and the training steps per round (0 = no recovery training)."""
  add({})
  for k in (14, 84):
    add({"prune.k": k})
  add({"prune.ladder": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)})
  for lr in (5e-6, 2e-4):
    add({"train.optim.lr": lr})
  for steps in (0, 16):
    add({"train.steps": steps})
