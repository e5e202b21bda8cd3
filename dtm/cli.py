"""What `main.py` needs beyond flags: clean one-line errors and job dispatch."""
from __future__ import annotations

import importlib
import logging
import os
import sys

from dtm.errors import DtmError

EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def run_job(config, workdir: str) -> int:
  """Run `dtm.jobs.<config.job>.run(config, workdir)`; DtmError -> one line, exit 2."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    module = importlib.import_module(f"dtm.jobs.{config.job}")
  except ModuleNotFoundError:
    _fail(f"unknown job {config.job!r}: no module dtm/jobs/{config.job}.py")
  try:
    module.run(config, os.path.abspath(workdir))
  except DtmError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume", file=sys.stderr)
    return 130
  return 0


def run_app(main) -> None:
  """absl's app.run, with flag/config errors (unknown config field, bad config file)
  reported in one line instead of a usage dump or traceback."""
  from absl import app, flags
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    argv = flags.FLAGS(sys.argv)
  except flags.Error as e:
    _fail(_flag_message(e))
  except (AttributeError, KeyError, ValueError, TypeError, FileNotFoundError, SyntaxError) as e:
    _fail(f"bad config: {type(e).__name__}: {e}")
  except DtmError as e:
    _fail(str(e))
  app.run(main, argv=argv, flags_parser=lambda a: a)


def _flag_message(e: Exception) -> str:
  text = str(e).strip().splitlines()
  text = " ".join(t.strip() for t in text if t.strip())
  if "not found" in text.lower() or "does not exist" in text.lower() or "has no attribute" in text:
    return f"bad config override: {text}"
  return text
