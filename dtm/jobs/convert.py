"""Convert job: load a model from any source, optionally compress (calibrated methods with
config.calibration's windows), save orbax / HF (dense safetensors, or compressed-tensors:
`dtm.export.compressed_tensors`); the compression report and calibration settings go to
<workdir>/compression.json."""
from __future__ import annotations

import os

from dtm import checkpoint, compress, convert, io_utils
from dtm.compress import act_quant
from dtm.errors import DtmError
from dtm.export import compressed_tensors
from dtm.jobs import common

EXPORT_FORMATS = ("safetensors", "compressed-tensors")


def run(config, workdir: str) -> None:
  if not (config.save_orbax or config.export_hf):
    raise DtmError("nothing to do: set save_orbax=True and/or export_hf=True")
  if config.export_format not in EXPORT_FORMATS:
    raise DtmError(f"export_format must be one of {', '.join(EXPORT_FORMATS)}, got "
                   f"{config.export_format!r}")
  spec = compress.parse_spec(config.compression)
  model = common.load(config)
  compressed = config.export_hf and config.export_format == "compressed-tensors"
  if compressed:  # a method the format cannot express fails before any slow step
    num_layers, shapes = compress.kernel_shapes(model.params)
    compressed_tensors.quantization_config(
        compress.validate(spec, num_layers, shapes).resolve(num_layers))
  params, report, calibration = model.params, {}, None
  grids = {} if compressed else None  # gptq's integer grids, for compressed-tensors
  if spec.rules:
    params, report, calibration = common.compress_model(
        config, model, spec, common.calibration_for(config, model, spec), grids=grids)
  if config.save_orbax:
    act_quant.check_no_leaves(params, "the orbax model directory (save_orbax)")
    checkpoint.save_model(workdir, model.cfg, params, model.tokenizer, source=model.source)
    print(f"dtm model directory: {workdir} (use --config.model={workdir})")
  if config.export_hf:
    out = os.path.join(workdir, "hf")
    if compressed:
      compressed_tensors.export(out, model.cfg, model.params, spec,
                                compressed_params=act_quant.strip(params),
                                tokenizer=model.tokenizer,
                                max_shard_bytes=int(config.max_shard_mb) * 2**20, grids=grids)
    else:
      act_quant.check_no_leaves(params, "a dense safetensors export (export_format=safetensors)")
      convert.export_hf(params, model.cfg, out, model.tokenizer,
                        max_shard_bytes=int(config.max_shard_mb) * 2**20)
    print(f"HF checkpoint directory: {out}")
  if report:
    io_utils.atomic_write_json(os.path.join(workdir, "compression.json"), {
        "spec": spec.to_string(), "components": report, "calibration": calibration})
