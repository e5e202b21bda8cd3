"""Evaluate one compression spec: DTMs (FDT, SDT, DPPL), KL/top-1, context-aware PPL.

  python main.py --config=configs/evaluate.py --workdir=runs/eval \
      --config.compression='down@*:magnitude(0.5)'

Args (`configs/evaluate.py:model=llama2-7b,runlocal`): model (see configs.common.MODELS),
runlocal (tiny CPU-sized run for tests).
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2", runlocal=False)
  config = ml_collections.ConfigDict()
  # Which job main.py runs.
  config.job = "evaluate"
  common.model_fields(config, common.model_name(arg.model))
  # Compression spec, e.g. 'down@*:magnitude(0.5); q@3:absmax(bits=8,granularity=channel)';
  # '' = the original model. Grammar: dtm/compress/__init__.py; wanda, sparsegpt and gptq
  # use the calibration block below.
  config.compression = ""
  common.data_fields(config)
  common.prompt_fields(config)
  common.ppl_fields(config)
  common.calibration_fields(config)
  # FDT_α levels to report.
  config.alphas = (0.75, 0.9)
  # Also compute per-position KL(F‖F') and top-1 agreement (needs the base logits).
  config.kl = True
  if arg.runlocal:
    config.prompts.num = 4
    config.prompts.length = 16
    config.prompts.new_tokens = 8
    config.ppl.window = 32
    config.ppl.ctx = 16
    config.ppl.max_windows = 2
    config.calibration.samples = 4
    config.calibration.length = 32
    config.calibration.batch_size = 4
  return config
