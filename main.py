"""dtm entry point: `python main.py --config=configs/<job>.py[:arg] --workdir=DIR`.

`--dry_run=TARGET` compiles the job for TARGET (a TPU slice, a GPU kind, cpu:N) without
weights, prints bytes per device, FLOPs and estimated time, and stops (`dtm.aot`).

Fine overrides: `--config.<field>=<value>`. Dispatches to `dtm.jobs.<config.job>.run`.
User errors (`DtmError`) print one line and exit with status 2.
"""
import sys

if __name__ == "__main__":
  from dtm.memory import exec_with_huge_pages
  exec_with_huge_pages()  # restarts once with malloc using huge pages (dtm/memory.py)

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and checkpoints.")
_DRY_RUN = flags.DEFINE_string(
    "dry_run", None, "Compile every function of the job for this target (v5e-16, v4-32, "
    "v5p-64, v6e-8, gpu:h100[:N], gpu:MEM_GIB:PEAK[:N], cpu:N), print its cost, write "
    "<workdir>/dry_run.json, and stop (dtm/aot).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOP utilisation assumed by the time estimates.")


def main(argv):
  del argv
  from dtm.cli import run_job
  sys.exit(run_job(_CONFIG.value, _WORKDIR.value, dry_run=_DRY_RUN.value, mfu=_MFU.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  from dtm.cli import run_app
  run_app(main)
