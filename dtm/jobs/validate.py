"""Refuse before working: every config error a job can know without weights or data.

`validate(config)` runs at the start of the jobs (and of `--dry_run`) before the model is
loaded, references are generated or calibration runs: ranges of the train block, the
compression spec against the model's architecture (shipped facts or a local config.json;
skipped for sources without one, such as a .gguf path), method/job compatibility (gptq
cannot be fake-quantized; AC/DC cannot re-derive calibrated masks), the probe plan.
"""
from __future__ import annotations

from dtm import compress
from dtm.errors import DtmError


def _abstract_model(config):
  """Abstract params of config.model, or None when its architecture is not known here."""
  from dtm.aot.architectures import architecture
  from dtm.model import abstract_params
  try:
    cfg = architecture(config.model, config.param_dtype, config.dtype)
  except DtmError:
    return None
  return abstract_params(cfg)


def validate(config) -> None:
  """DtmError for the first bad setting of `config.job` (module docstring)."""
  job = config.job
  if job == "train":
    _train(config, config.train, config.compression)
  elif job == "probe":
    _probe(config)
  elif job == "prune":
    if int(config.train.steps) > 0:
      from dtm.train import trainer
      trainer.validate_settings(config.train)


def _train(config, tc, spec_text: str) -> None:
  from dtm.train import masks as masks_lib
  from dtm.train import trainer
  spec = compress.parse_spec(spec_text)
  trainer.validate_settings(tc)
  params = _abstract_model(config)
  if params is None:
    return
  plan = masks_lib.make_plan(spec, params)
  if plan.components == 0:
    raise DtmError(f"compression spec {plan.spec.to_string()!r} selects no component: nothing "
                   "to recover; give a spec such as 'mlp@*:magnitude(0.5)'")
  trainer.check_trainable(plan, trainer.acdc_of(tc))


def _probe(config) -> None:
  from dtm.jobs import probe as probe_job
  p = config.probe
  if p.method not in probe_job.PROBE_METHODS:
    raise DtmError(f"probe.method must be one of {', '.join(probe_job.PROBE_METHODS)}, got "
                   f"{p.method!r}")
  if p.method in compress.CALIBRATED_METHODS and config.calibration.mode != "parallel":
    raise DtmError(f"probing {p.method} uses statistics of the original model: "
                   f"set calibration.mode=parallel (got {config.calibration.mode!r})")
  if int(p.mesh_model) < 1:
    raise DtmError(f"probe.mesh_model must be >= 1, got {p.mesh_model}")
  if f"{p.candidate_alpha:g}" not in {f"{a:g}" for a in config.alphas}:
    raise DtmError(f"probe.candidate_alpha={p.candidate_alpha} must be one of "
                   f"config.alphas={tuple(config.alphas)}")
  params = _abstract_model(config)
  if params is not None:
    num_layers, shapes = compress.kernel_shapes(params)
    probe_job.plan(config, num_layers, shapes)
