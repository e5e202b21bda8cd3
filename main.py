"""dtm entry point: `python main.py --config=configs/<job>.py[:arg] --workdir=DIR`.

Fine overrides: `--config.<field>=<value>`. Dispatches to `dtm.jobs.<config.job>.run`.
User errors (`DtmError`) print one line and exit with status 2.
"""
import sys

from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results and checkpoints.")


def main(argv):
  del argv
  from dtm.cli import run_job
  sys.exit(run_job(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  from dtm.cli import run_app
  run_app(main)
