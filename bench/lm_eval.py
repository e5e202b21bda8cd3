"""lm-eval task accuracy and speed: dtm's adapter vs lm-eval's own HF backend, one run.

  python bench/lm_eval.py [--task piqa] [--limit 200] [--batch-size 16] [--repeats 2]
                          [--hf-dir DIR] [--torch-threads N] [--until S] [--max-gen-toks N]

Both backends evaluate the same lm-eval task (local data, dtm/tasks/offline.py) on the
same first `limit` documents of SmolLM2-135M (float32): dtm through `DtmLM`, HF through
`lm_eval.models.huggingface.HFLM` wrapping transformers' LlamaForCausalLM, loaded by
transformers from the same GGUF file (or from --hf-dir, e.g. a directory written by
`configs/convert.py --config.export_hf=True`). Prints the CPU, accuracy of both, how many
documents are predicted differently, the largest difference of a choice's summed
log-likelihood, and seconds of `simple_evaluate` per backend (repeat 1 includes dtm's
jit compilation; later repeats reuse it) with the ratio HF / dtm. Timings are only
meaningful on an otherwise idle machine.

For a generate_until task (nq_open) both backends decode greedily in batches of
--batch-size (HF: `model.generate` on left-padded batches of equal gen_kwargs, KV cache,
SDPA attention; dtm: right-padded rows with a cache index per row); the report gives the
task metric of both, how many generations differ and the tokens generated. --until
(a Python string literal, e.g. "'\\n\\n'") and --max-gen-toks replace the task's stop
sequences and token limit, for longer generations.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# This file is named like the lm_eval package: drop bench/ from the import path (python puts
# the script's directory first), put the repo root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import ast  # noqa: E402

import numpy as np  # noqa: E402

from bench import common  # noqa: E402



def hf_backend(args, batch_size: int):
  import torch
  from lm_eval.models.huggingface import HFLM
  from transformers import AutoTokenizer, LlamaForCausalLM
  from dtm import gguf_io
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  if args.hf_dir:
    return HFLM(pretrained=args.hf_dir, dtype="float32", batch_size=batch_size, device="cpu")
  path = gguf_io.find_smollm2_gguf()
  d, f = os.path.dirname(path), os.path.basename(path)
  model = LlamaForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                           attn_implementation="sdpa").eval()
  return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(d, gguf_file=f),
              batch_size=batch_size)


def evaluate(lm, tasks, tm, limit: int):
  from lm_eval import simple_evaluate
  t0 = time.perf_counter()
  out = simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=tm, bootstrap_iters=0,
                        log_samples=True, torch_random_seed=None)
  return out, time.perf_counter() - t0


def _override_generation(task_cfg: dict, args) -> None:
  kw = dict(task_cfg["generation_kwargs"])
  if args.until:
    kw["until"] = [ast.literal_eval(args.until)]
  if args.max_gen_toks:
    kw["max_gen_toks"] = args.max_gen_toks
  task_cfg["generation_kwargs"] = kw


def report_choices(out: dict, task: str) -> None:
  """Accuracy of both backends, documents predicted differently, score differences."""
  res = {k: v["results"][task] for k, v in out.items()}
  samples = {k: v["samples"][task] for k, v in out.items()}
  scores = {k: np.array([r[0] for s in v for r in s["filtered_resps"]])  # tasks vary in #choices
            for k, v in samples.items()}
  diff = np.abs(scores["dtm"] - scores["hf"])
  rel = diff / np.maximum(np.abs(scores["hf"]), 1e-9)
  metric_names = [m for m in ("acc", "acc_norm") if f"{m},none" in res["dtm"]]
  disagree = {m: sum(a[m] != b[m] for a, b in zip(samples["dtm"], samples["hf"]))
              for m in metric_names}
  for m in metric_names:
    print(f"{m}: dtm {res['dtm'][m + ',none']:.4f}  hf {res['hf'][m + ',none']:.4f}  "
          f"docs predicted differently: {disagree[m]}")
  print(f"choice log-likelihoods: max |dtm - hf| {diff.max():.2e} nats, "
        f"max relative {rel.max():.2e}, over {diff.size} choices")


def report_generations(out: dict, task: str, gen_kwargs: dict, lm) -> None:
  """Metric of both backends, generations that differ, tokens generated (dtm's tokenizer)."""
  res = {k: v["results"][task] for k, v in out.items()}
  texts = {k: [s["resps"][0][0] for s in v["samples"][task]] for k, v in out.items()}
  metrics = sorted(k for k, v in res["dtm"].items() if isinstance(v, float) and "_stderr" not in k)
  for m in metrics:
    print(f"{m}: dtm {res['dtm'][m]:.4f}  hf {res['hf'][m]:.4f}")
  differ = sum(a != b for a, b in zip(texts["dtm"], texts["hf"]))
  toks = [len(lm.tok_encode(t, add_special_tokens=False)) for t in texts["dtm"]]
  print(f"generation kwargs {gen_kwargs}: generations that differ: {differ} of "
        f"{len(toks)}; answer tokens mean {np.mean(toks):.1f}, max {max(toks)}; first "
        f"answers {texts['dtm'][:3]}")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--task", default="piqa")
  ap.add_argument("--limit", type=int, default=200)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--model", default="smollm2-135m", help="dtm model (the HF side uses its GGUF)")
  ap.add_argument("--hf-dir", default="", help="HF directory for the HF backend")
  ap.add_argument("--torch-threads", type=int, default=0, help="0 = torch's default")
  ap.add_argument("--until", default="", help="generate_until: stop sequence (a Python "
                  "string literal) replacing the task's")
  ap.add_argument("--max-gen-toks", type=int, default=0, help="generate_until: token limit")
  args = ap.parse_args()

  from dtm.loading import load_model
  from dtm.tasks import offline
  from dtm.tasks.lm_eval_model import DtmLM
  tm = offline.task_manager()
  tasks, record = offline.task_configs([args.task], "local", tm)
  generative = tasks[0].get("output_type") == "generate_until"
  if generative:
    _override_generation(tasks[0], args)
  backends = {"dtm": DtmLM(loaded=load_model(args.model), batch_size=args.batch_size),
              "hf": hf_backend(args, args.batch_size)}
  out, seconds = {}, {name: [] for name in backends}
  for _ in range(args.repeats):
    for name, lm in backends.items():
      out[name], s = evaluate(lm, tasks, tm, args.limit)
      seconds[name].append(s)

  task = args.task
  n = out["dtm"]["n-samples"][task]["effective"]
  print(f"CPU: {common.cpu_model()}, {os.cpu_count()} cores, load avg {os.getloadavg()[0]:.2f}")
  print(f"task {task}: {n} docs of the local {record[task]['split']} split "
        f"({record[task]['path']}); batch size {args.batch_size}")
  if generative:
    report_generations(out, task, tasks[0]["generation_kwargs"], backends["dtm"])
  else:
    report_choices(out, task)
  for i in range(args.repeats):
    d, h = seconds["dtm"][i], seconds["hf"][i]
    print(f"repeat {i + 1}{' (dtm compiles)' if i == 0 else ''}: dtm {d:.1f} s, hf {h:.1f} s, "
          f"hf/dtm {h / d:.2f}")


if __name__ == "__main__":
  main()
