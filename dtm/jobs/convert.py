"""Convert job: load a model from any source, optionally compress (calibrated methods with
config.calibration's windows), save orbax / HF; the compression report and calibration
settings go to <workdir>/compression.json."""
from __future__ import annotations

import os

from dtm import checkpoint, compress, convert, io_utils
from dtm.errors import DtmError
from dtm.jobs import common


def run(config, workdir: str) -> None:
  if not (config.save_orbax or config.export_hf):
    raise DtmError("nothing to do: set save_orbax=True and/or export_hf=True")
  spec = compress.parse_spec(config.compression)
  model = common.load(config)
  params, report, calibration = model.params, {}, None
  if spec.rules:
    params, report, calibration = common.compress_model(
        config, model, spec, common.calibration_for(config, model, spec))
  if config.save_orbax:
    checkpoint.save_model(workdir, model.cfg, params, model.tokenizer, source=model.source)
    print(f"dtm model directory: {workdir} (use --config.model={workdir})")
  if config.export_hf:
    out = os.path.join(workdir, "hf")
    convert.export_hf(params, model.cfg, out, model.tokenizer,
                      max_shard_bytes=int(config.max_shard_mb) * 2**20)
    print(f"HF checkpoint directory: {out}")
  if report:
    io_utils.atomic_write_json(os.path.join(workdir, "compression.json"), {
        "spec": spec.to_string(), "components": report, "calibration": calibration})
