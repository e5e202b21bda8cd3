"""Steps shared by jobs: load the model, build prompts and PPL windows, cache references."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import numpy as np

from dtm import data, evaluation, io_utils
from dtm.errors import DtmError
from dtm.loading import LoadedModel, load_model

log = logging.getLogger("dtm")


def load(config, shardings_fn=None) -> LoadedModel:
  return load_model(config.model, param_dtype=config.param_dtype, dtype=config.dtype,
                    shardings_fn=shardings_fn)


def resolve_bos(config, tokenizer) -> int | None:
  if config.data.bos not in ("auto", "yes", "no"):
    raise DtmError(f"data.bos must be 'auto', 'yes' or 'no', got {config.data.bos!r}")
  if config.data.bos == "no":
    return None
  add = config.data.bos == "yes" or bool(getattr(tokenizer, "add_bos_token", False))
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
