"""Continued training of a compressed model (recovery): masks, STE fake quantization,
distillation from the original model, AC/DC, orbax resume, TensorBoard.

  python main.py --config=configs/train.py --workdir=runs/train \
      --config.compression='mlp@*:magnitude(0.5)'

Args (`configs/train.py:model=llama2-7b,runlocal`): model (see configs.common.MODELS),
runlocal (a CPU-sized run for tests). Variants: `smollm2` (default; WikiText-2 valid
tokens for training, WikiText-2 raw test for the held-out evaluation), `llama2-7b`
(bfloat16 compute, FSDP over all devices, remat, C4 streamed). Ablations: `sweep()` below;
expand and collect with launch/sweep.py.
"""
import ml_collections

from configs import common

SHARED_DATA = common.SHARED_DATA


def train_fields(config: ml_collections.ConfigDict) -> None:
  """The `train` block read by `dtm.train.trainer.train` (also used by pruning rounds)."""
  t = config.train = ml_collections.ConfigDict()
  # Optimizer updates to run (the run's length; the LR schedule ends here).
  t.steps = 80
  # Global batch: windows per update (divisible by microbatches x data-parallel devices).
  t.batch_size = 4
  # Window length T in tokens (each window holds T + 1 tokens: inputs and next tokens).
  t.seq_len = 128
  # Gradient accumulation: the batch is split into this many microbatches (lax.scan).
  t.microbatches = 1
  # Seed of the window order (batches are a pure function of seed and step) and the RNG.
  t.seed = 0
  # Rematerialise each decoder layer in the backward pass (less memory, ~1/3 more compute).
  t.remat = False
  # Query rows per attention block (0 = all T at once): the backward pass then holds one
  # block's float32 scores [heads, block, T], not [heads, T, T] (same results).
  t.attention_chunk = 0
  _objective_fields(t)
  _optim_fields(t)
  _acdc_fields(t)
  c = t.checkpoint = ml_collections.ConfigDict()
  # Save the train state every `every` steps (and at the end, and on SIGTERM).
  c.every = 20
  # Keep the newest `keep` checkpoints.
  c.keep = 2
  # Write checkpoints in the background (orbax async).
  c.use_async = True
  m = t.mesh = ml_collections.ConfigDict()
  # Device mesh ('data', 'fsdp'): sizes multiply to the device count; -1 = the rest.
  m.data = -1
  m.fsdp = 1
  # Held-out evaluation (FDT, SDT, DPPL, PPL) every eval_every steps (0 = start and end only).
  t.eval_every = 20
  # Per-kind sparsity in the logs every log_every steps (0 = never); forces a host sync.
  t.log_every = 10
  # Peak FLOP/s of one device for the MFU scalar (0 = unknown: MFU not logged).
  t.peak_flops = 0.0
  # Write TensorBoard event files (tensorboardX) under <workdir>/tb.
  t.tensorboard = True


def _objective_fields(t: ml_collections.ConfigDict) -> None:
  """train.objective: the loss (dtm.train.objective.Objective)."""
  o = t.objective = ml_collections.ConfigDict()
  # Weight of the distillation term KL(F||F') (CE weight 1 - alpha); 0 = CE only, no teacher.
  o.alpha = 1.0
  # Distillation temperature tau (the KL is scaled by tau^2).
  o.temperature = 1.0
  # Divergence-aware weighting beta: positions where F' nearly changes F's greedy token
  # weigh up to 1 + beta (0 = plain KL). See dtm/train/objective.py.
  o.div_weight = 0.0
  # Logit-margin scale kappa of that weighting (nats).
  o.div_margin = 1.0
  # LM-head rows per chunk of the fused loss (0 = whole vocabulary at once).
  o.vocab_chunk = 8192


def _optim_fields(t: ml_collections.ConfigDict) -> None:
  """train.optim: AdamW and its schedule (dtm.train.step.OptimConfig)."""
  p = t.optim = ml_collections.ConfigDict()
  # Peak learning rate of AdamW (> 0).
  p.lr = 2e-4
  # Linear warm-up steps from 0 to lr.
  p.warmup_steps = 5
  # Cosine decay ends at lr * min_lr_ratio at the last step.
  p.min_lr_ratio = 0.1
  # Decoupled weight decay (AdamW) on linear kernels.
  p.weight_decay = 0.0
  # Adam betas and epsilon.
  p.b1 = 0.9
  p.b2 = 0.95
  p.eps = 1e-8
  # Clip gradients by global norm (0 = no clipping).
  p.clip_norm = 1.0
  # Also decay RMSNorm scales / the embedding (and tied LM head).
  p.decay_norms = False
  p.decay_embeddings = False


def _acdc_fields(t: ml_collections.ConfigDict) -> None:
  """train.acdc: alternating compressed / decompressed phases (dtm.train.masks.AcdcSchedule)."""
  a = t.acdc = ml_collections.ConfigDict()
  # Decompressed (dense) steps before the first compressed phase.
  a.dense_warmup = 0
  # Lengths of alternating compressed / decompressed phases (0 and 0 = always compressed).
  a.compressed = 0
  a.decompressed = 0
  # The last final_compressed steps are one compressed phase.
  a.final_compressed = 0


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2", runlocal=False)
  config = ml_collections.ConfigDict()
  # Which job main.py runs.
  config.job = "train"
  common.model_fields(config, common.model_name(arg.model))
  # Compression spec to recover from, e.g. 'mlp@*:magnitude(0.5)' (grammar: dtm/compress).
  config.compression = "mlp@*:magnitude(0.5)"
  # Training text (the data pipeline's fields; windows come from one token stream).
  common.data_fields(config)
  config.data.source = "text"
  config.data.data_files = f"{SHARED_DATA}/wikitext-2/wiki.valid.tokens"
  config.data.split = "train"
  train_fields(config)
  # Calibration windows for wanda / sparsegpt specs (the start model is compressed once
  # with them; gptq cannot be fake-quantized: train rtn, then apply gptq).
  common.local_calibration_fields(config, samples=32)
  _eval_fields(config)
  # Write the trained model as an HF directory too (<workdir>/hf).
  config.export_hf = False
  # JAX CPU devices on a CPU-only host (0 = one per core; GPU/TPU hosts are unaffected).
  config.cpu_devices = 1
  if arg.model == "llama2-7b":
    _llama2_7b(config)
  if arg.runlocal:
    _runlocal(config)
  return config


def _eval_fields(config: ml_collections.ConfigDict) -> None:
  """config.eval: the held-out evaluation (prompts, references, PPL windows from other text)."""
  ev = config.eval = ml_collections.ConfigDict()
  common.data_fields(ev)
  ev.data.source = "text"
  ev.data.data_files = f"{SHARED_DATA}/wikitext-2-raw/wiki.test.raw"
  common.prompt_fields(ev)
  ev.prompts.num = 64
  ev.prompts.length = 64
  ev.prompts.new_tokens = 32
  common.ppl_fields(ev)
  ev.ppl.ctx = 1
  ev.ppl.max_windows = 16
  ev.ppl.window = 256
  # FDT_alpha levels to report.
  ev.alphas = (0.75, 0.9)
  # Also compute KL(F||F') and top-1 agreement at held-out positions.
  ev.kl = True


def _llama2_7b(config: ml_collections.ConfigDict) -> None:
  """bf16 compute on f32 master weights, FSDP over every device, remat, C4 streamed."""
  config.param_dtype = "float32"
  config.dtype = "bfloat16"
  config.data.source = "c4"
  config.data.data_files = ""
  config.data.split = "train"
  config.data.max_docs = 200000
  config.train.batch_size = 64
  config.train.seq_len = 2048
  config.train.microbatches = 4
  config.train.remat = True
  config.train.attention_chunk = 512  # v5e-16: 13.9 GiB/chip, was 15.8 with [32, T, T] f32 scores
  config.train.steps = 1000
  config.train.optim.lr = 2e-5
  config.train.eval_every = 100
  config.train.checkpoint.every = 100
  config.train.mesh.data = 1
  config.train.mesh.fsdp = -1
  config.train.peak_flops = 989e12  # H100 bf16 dense
  config.calibration.source = "c4"
  config.calibration.data_files = ""
  config.calibration.max_docs = 20000
  config.calibration.samples = 128
  config.calibration.length = 2048


def _runlocal(config: ml_collections.ConfigDict) -> None:
  """The tests' CPU-sized run: 6 steps of 2 x 32 tokens, 4 held-out prompts."""
  ev = config.eval
  config.data.max_docs = 400
  config.train.steps = 6
  config.train.batch_size = 2
  config.train.seq_len = 32
  config.train.optim.warmup_steps = 1
  config.train.optim.lr = 1e-3
  config.train.checkpoint.every = 2
  config.train.eval_every = 3
  config.train.log_every = 2
  config.train.objective.vocab_chunk = 4096
  ev.data.max_docs = 400
  ev.prompts.num = 4
  ev.prompts.length = 16
  ev.prompts.new_tokens = 8
  ev.prompts.batch_size = 4
  ev.ppl.window = 32
  ev.ppl.max_windows = 2
  config.calibration.samples = 4
  config.calibration.length = 32
  config.calibration.batch_size = 4


def sweep(add):
  """Ablation grid for launch/sweep.py: the defaults, then one knob at a time (the README's
  "Continued training" section): distillation weight alpha (0 = CE only), temperature tau,
  peak learning rate, divergence-aware weighting beta."""
  add({})
  for alpha in (0.0, 0.5):
    add({"train.objective.alpha": alpha})
  for temperature in (2.0, 4.0):
    add({"train.objective.temperature": temperature})
  for lr in (5e-5, 1e-3):
    add({"train.optim.lr": lr})
  for div_weight in (1.0, 2.0):
    add({"train.objective.div_weight": div_weight})
