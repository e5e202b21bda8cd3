"""Convert a model once: any source -> orbax model dir (fast reloads) and/or HF directory.

  python main.py --config=configs/convert.py:model=llama2-7b --workdir=models/llama2-7b
  python main.py --config=configs/convert.py --workdir=out/smollm2-pruned \
      --config.compression='down@*:magnitude(0.5)' --config.export_hf=True
  python main.py --config=configs/convert.py --workdir=out/smollm2-w8a8 --config.save_orbax=False \
      --config.compression='*@*:w8a8' --config.export_hf=True --config.export_format=compressed-tensors

The orbax dir is then usable as --config.model=models/llama2-7b in every job.
Args: model (see configs.common.MODELS), runlocal (small calibration for tests).
"""
import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, model="smollm2", runlocal=False)
  config = ml_collections.ConfigDict()
  # Which job main.py runs.
  config.job = "convert"
  common.model_fields(config, common.model_name(arg.model))
  # Optional compression applied before saving (spec grammar: dtm/compress/__init__.py;
  # wanda, sparsegpt and gptq use the calibration block).
  config.compression = ""
  common.calibration_fields(config)
  # Write <workdir>/params (orbax) + config/tokenizer: a dtm model directory.
  config.save_orbax = True
  # Also write <workdir>/hf: config.json + safetensors + tokenizer for transformers.
  config.export_hf = False
  # Format of <workdir>/hf: 'safetensors' (dense weights) or 'compressed-tensors' (int8 /
  # packed int4 weights + quantization_config, for vLLM and transformers; absmax, rtn,
  # gptq (its grids kept while compressing), w8a8: dtm/export/compressed_tensors.py).
  config.export_format = "safetensors"
  # Shard size of exported safetensors files, in MB.
  config.max_shard_mb = 5000
  if arg.runlocal:
    config.calibration.samples = 4
    config.calibration.length = 32
    config.calibration.batch_size = 4
  return config
