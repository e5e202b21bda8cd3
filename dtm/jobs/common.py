"""Steps shared by jobs: load the model, build prompts and PPL windows, cache references,
compress (with calibration windows for the calibrated methods)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from dtm import compress, data, evaluation, io_utils
from dtm.compress import calibration
from dtm.errors import DtmError
from dtm.loading import LoadedModel, load_model

log = logging.getLogger("dtm")


def load(config, shardings_fn=None) -> LoadedModel:
  return load_model(config.model, param_dtype=config.param_dtype, dtype=config.dtype,
                    shardings_fn=shardings_fn)


def resolve_bos(config, tokenizer) -> int | None:
  return _bos_id(config.data.bos, tokenizer, "data.bos")


def _bos_id(setting: str, tokenizer, field: str) -> int | None:
  if setting not in ("auto", "yes", "no"):
    raise DtmError(f"{field} must be 'auto', 'yes' or 'no', got {setting!r}")
  if setting == "no":
    return None
  add = setting == "yes" or bool(getattr(tokenizer, "add_bos_token", False))
  return tokenizer.bos_token_id if add else None


def load_texts(config) -> list[str]:
  files = [f for f in config.data.data_files.split(",") if f] or None
  return data.load_texts(config.data.source, split=config.data.split, data_files=files,
                         text_field=config.data.text_field,
                         max_docs=config.data.max_docs or None)


@dataclasses.dataclass
class EvalData:
  prompts: np.ndarray         # int32 [P, c]
  ppl: data.PplWindows | None
  settings: dict              # what was used, recorded in results


def build_eval_data(config, tokenizer, need_ppl: bool = True) -> EvalData:
  """Prompts (from JSONL or the data pipeline) and PPL windows, as configured."""
  p = config.prompts
  texts = None
  bos_id = resolve_bos(config, tokenizer) if tokenizer is not None else None
  if p.jsonl:
    prompts = data.read_prompt_jsonl(p.jsonl, length=p.length or None)
    source = f"jsonl:{os.path.abspath(p.jsonl)}"
  else:
    if tokenizer is None:
      raise DtmError("the model has no tokenizer; pass token-id prompts with --config.prompts.jsonl")
    texts = load_texts(config)
    if config.data.source == "default":
      prompts = data.prompt_windows_from_texts(tokenizer, texts, num=p.num, length=p.length,
                                               seed=p.seed, bos_id=bos_id)
    else:
      stream = data.tokenize_corpus(tokenizer, texts, add_bos=False)
      prompts = data.prompt_windows(stream, num=p.num, length=p.length, seed=p.seed, bos_id=bos_id)
    source = config.data.source
  ppl = None
  if need_ppl and tokenizer is None:
    log.info("perplexity skipped: the model has no tokenizer to tokenize data.source")
  if need_ppl and tokenizer is not None:
    texts = load_texts(config) if texts is None else texts
    stream = data.tokenize_corpus(tokenizer, texts, add_bos=bos_id is not None)
    q = config.ppl
    ppl = data.ppl_windows(stream, length=q.window, stride=q.stride or None,
                           max_windows=q.max_windows or None)
    if q.ctx >= q.window:
      raise DtmError(f"ppl.ctx={q.ctx} must be smaller than ppl.window={q.window}")
    ppl = data.PplWindows(ppl.tokens, np.maximum(ppl.ctx_len, q.ctx).astype(np.int32))
  settings = {
      "prompt_source": source, "num_prompts": int(prompts.shape[0]),
      "prompt_length": int(prompts.shape[1]), "new_tokens": int(p.new_tokens),
      "bos_id": bos_id, "prompt_seed": int(p.seed),
  }
  if ppl is not None:
    settings["ppl"] = {
        "dataset": config.data.source, "data_files": config.data.data_files,
        "window": int(config.ppl.window), "stride": int(config.ppl.stride or config.ppl.window),
        "ctx": int(config.ppl.ctx), "num_windows": int(ppl.tokens.shape[0]),
        "bos_at_stream_start": bos_id is not None, "unit": "token-level (model's tokenizer)",
        "joiner": "\\n\\n"}
  return EvalData(prompts, ppl, settings)


def references(config, model: LoadedModel, prompts: np.ndarray, workdir: str) -> np.ndarray:
  """y = greedy(F, p, N) [P, N], cached under workdir/cache keyed by a fingerprint of
  (model weights, prompts, c, N); also written as workdir/references.jsonl."""
  n = int(config.prompts.new_tokens)
  if prompts.shape[1] + n > model.cfg.max_position_embeddings:
    raise DtmError(f"prompt length c={prompts.shape[1]} + N={n} exceeds the model's context of "
                   f"{model.cfg.max_position_embeddings} tokens")
  if n < 1:
    raise DtmError(f"prompts.new_tokens must be >= 1, got {n}")
  key = io_utils.array_fingerprint(prompts, extra=f"{io_utils.params_fingerprint(model.params)}:"
                                   f"{prompts.shape[1]}:{n}")
  cache_dir = os.path.join(workdir, "cache")
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, f"references-{key}.npy")
  if os.path.exists(path):
    y = np.load(path)
    log.info("reusing cached reference continuations %s", path)
  else:
    y = evaluation.generate_references(model.cfg, model.params, prompts, n,
                                       config.prompts.batch_size)
    tmp = path + ".tmp.npy"
    np.save(tmp, y)
    os.replace(tmp, path)
  data.write_prompt_jsonl(os.path.join(workdir, "prompts.jsonl"), prompts)
  data.write_prompt_jsonl(os.path.join(workdir, "references.jsonl"), y)
  return y


def config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


# ------------------------------------------------------------------------------ compression


def calibrated_components(spec: compress.Spec, num_layers: int) -> dict:
  """{Component: Method} of the spec's components whose method needs calibration."""
  return {comp: m for comp, m in spec.resolve(num_layers).items()
          if m.name in compress.CALIBRATED_METHODS}


LOCAL_BUILDERS = ("text", "json", "parquet", "auto")


def check_calibration_block(c, method: str) -> None:
  """DtmError for a calibration block that cannot give `method` its windows, found
  before anything is loaded: sizes, mode, and a source (JSONL windows, a hub corpus, or a
  local builder with existing data_files)."""
  if c.samples < 1 or c.length < 1 or c.batch_size < 1:
    raise DtmError(f"calibration.samples, .length and .batch_size must be >= 1 ({method} needs "
                   f"calibration windows), got {c.samples}, {c.length}, {c.batch_size}")
  if c.samples % c.batch_size:
    raise DtmError(f"calibration.batch_size={c.batch_size} must divide calibration.samples="
                   f"{c.samples}")
  if c.mode not in calibration.MODES:
    raise DtmError(f"calibration.mode must be one of {', '.join(calibration.MODES)}, got "
                   f"{c.mode!r}")
  if c.jsonl:
    if not os.path.isfile(c.jsonl):
      raise DtmError(f"calibration.jsonl={c.jsonl!r} does not exist")
    return
  if not c.source:
    raise DtmError(f"{method} needs calibration data: set calibration.source (a corpus) or "
                   f"calibration.jsonl (token-id windows)")
  if c.source in LOCAL_BUILDERS:
    files = [f for f in c.data_files.split(",") if f]
    if not files:
      raise DtmError(f"{method} needs calibration data: calibration.source={c.source!r} reads "
                     f"local files, but calibration.data_files is empty")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise DtmError(f"calibration.data_files: {missing[0]} does not exist")


def calibration_data(config, model: LoadedModel) -> tuple[np.ndarray, dict]:
  """Calibration windows int32 [samples, length] from config.calibration (its JSONL file,
  or `samples` seeded windows of its corpus's token stream) and the settings that define
  them (recorded in results: source, samples, length, seed, mode, token fingerprint).

  DtmError for: samples / length / batch_size < 1, length beyond the model's context, no
  tokenizer for a corpus, an empty corpus, fewer stream tokens than the windows need (the
  message says how many there are), a JSONL file with too few rows or rows of another
  length (named by file:line)."""
  c = config.calibration
  context = model.cfg.max_position_embeddings
  if c.samples < 1 or c.length < 1 or c.batch_size < 1:
    raise DtmError(f"calibration.samples, .length and .batch_size must be >= 1, got "
                   f"{c.samples}, {c.length}, {c.batch_size}")
  if c.length > context:
    raise DtmError(f"calibration.length={c.length} exceeds the model's context of {context} "
                   f"tokens; set --config.calibration.length={min(2048, context)} or less")
  if c.mode not in calibration.MODES:
    raise DtmError(f"calibration.mode must be one of {', '.join(calibration.MODES)}, got "
                   f"{c.mode!r}")
  bos_id = None
  if c.jsonl:
    windows = calibration.read_calibration_jsonl(c.jsonl, samples=c.samples, length=c.length)
    source = {"source": f"jsonl:{os.path.abspath(c.jsonl)}"}
  else:
    if model.tokenizer is None:
      raise DtmError("the model has no tokenizer to tokenize calibration.source; pass token-id "
                     "windows with --config.calibration.jsonl")
    files = [f for f in c.data_files.split(",") if f] or None
    texts = data.load_texts(c.source, split=c.split, data_files=files, text_field=c.text_field,
                            max_docs=c.max_docs or None)
    bos_id = _bos_id(c.bos, model.tokenizer, "calibration.bos")
    stream = data.tokenize_corpus(model.tokenizer, texts, add_bos=False)
    if stream.size == 0:
      raise DtmError(f"no calibration tokens in calibration.source={c.source!r} "
                     f"data_files={c.data_files!r} split={c.split!r}")
    windows = calibration.calibration_windows(stream, samples=c.samples, length=c.length,
                                              seed=c.seed, bos_id=bos_id)
    source = {"source": c.source, "data_files": c.data_files, "split": c.split,
              "text_field": c.text_field, "max_docs": int(c.max_docs),
              "stream_tokens": int(stream.size), "seed": int(c.seed), "bos_id": bos_id}
  if windows.shape[0] % c.batch_size:
    raise DtmError(f"calibration.batch_size={c.batch_size} must divide calibration.samples="
                   f"{c.samples}")
  settings = {**source, "samples": int(windows.shape[0]), "length": int(windows.shape[1]),
              "mode": c.mode, "batch_size": int(c.batch_size),
              "tokens": io_utils.array_fingerprint(windows)}
  return windows, settings


def calibration_for(config, model: LoadedModel, spec) -> tuple[np.ndarray, dict] | None:
  """`calibration_data` if the (validated) spec has calibrated methods, else None; jobs
  call it before their slow steps so bad calibration input fails first."""
  num_layers, _ = compress.kernel_shapes(model.params)
  if not calibrated_components(compress.parse_spec(spec), num_layers):
    return None
  return calibration_data(config, model)


def compress_model(config, model: LoadedModel, spec,
                   calibration_windows: tuple[np.ndarray, dict] | None = None,
                   grids: dict | None = None) -> tuple[object, dict, dict | None]:
  """F' = the spec applied to the model's params -> (params, report, calibration settings).

  Without calibrated methods (wanda, sparsegpt, gptq) this is `compress.apply_spec` and the
  settings are None. With them, windows come from `calibration_windows` (the result of
  `calibration_for`) or else config.calibration (`calibration_data`), and mode
  'sequential' runs `calibration.calibrate_and_compress` (the references: layer
  l's statistics on the outputs of the compressed layers < l), mode 'parallel' collects
  every statistic from the original model (`collect_statistics`, only the layers that
  need them; the Hessian only if a method needs it) and applies the spec with them.
  grids: a dict that receives every gptq component's grid (`compress.apply_spec`)."""
  num_layers, shapes = compress.kernel_shapes(model.params)
  spec = compress.validate(spec, num_layers, shapes)
  calibrated = calibrated_components(spec, num_layers)
  if not calibrated:
    params, report = compress.apply_spec(model.params, spec)
    return params, report, None
  windows, settings = calibration_windows or calibration_data(config, model)
  c = config.calibration
  log.info("calibration: %d windows of %d tokens, %s mode", windows.shape[0], windows.shape[1],
           c.mode)
  if c.mode == "sequential":
    params, report = calibration.calibrate_and_compress(model.cfg, model.params, spec, windows,
                                                        batch_size=c.batch_size, progress=True,
                                                        grids=grids)
  else:
    stats = calibration.collect_statistics(
        model.cfg, model.params, windows, mode="parallel", batch_size=c.batch_size,
        hessian=any(compress.needs_hessian(m) for m in calibrated.values()),
        layers={comp.layer for comp in calibrated}, progress=True)
    params, report = compress.apply_spec(model.params, spec, calibration=stats, grids=grids)
  return params, report, settings
