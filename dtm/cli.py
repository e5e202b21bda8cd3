"""What `main.py` needs beyond flags: clean one-line errors and job dispatch."""
from __future__ import annotations

import importlib
import logging
import os
import re
import sys

from dtm.errors import DtmError

EXIT_USER_ERROR = 2


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def run_job(config, workdir: str, dry_run: str | None = None, mfu: float = 0.4) -> int:
  """Run `dtm.jobs.<config.job>.run(config, workdir)`, or with `dry_run` (a target) the
  ahead-of-time compile of its functions (`dtm.aot.dry_run`); DtmError -> one line, exit 2."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    module = importlib.import_module(f"dtm.jobs.{config.job}")
  except ModuleNotFoundError:
    _fail(f"unknown job {config.job!r}: no module dtm/jobs/{config.job}.py")
  try:
    if dry_run:
      from dtm.aot import dry_run as dry, targets
      targets.parse_target(dry_run)  # an unknown target fails before JAX starts
      # executables for topology descriptors cannot be reloaded from the persistent cache
      os.environ["DTM_JAX_CACHE"] = ""
      setup_jax(cpu_devices=targets.cpu_devices_needed(dry_run) or config.get("cpu_devices"),
                force_cpu_devices=targets.cpu_devices_needed(dry_run) is not None)
      dry.run(config, os.path.abspath(workdir), dry_run, mfu)
      return 0
    setup_jax(cpu_devices=config.get("cpu_devices"))
    if os.environ.get("DTM_ESTIMATE", "1") != "0":
      from dtm.aot import preflight  # the job's functions compiled here: cost before work
      preflight.estimate(config, os.path.abspath(workdir), mfu)
    module.run(config, os.path.abspath(workdir))
  except DtmError as e:
    _fail(str(e))
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume", file=sys.stderr)
    return 130
  return 0


def setup_jax(cpu_devices: int | None = None, force_cpu_devices: bool = False) -> None:
  """Multi-host init (launch scripts set DTM_DISTRIBUTED=1 on every worker), a persistent
  compilation cache so resumed runs do not recompile (DTM_JAX_CACHE='' disables it), and,
  if `cpu_devices` is given, the number of JAX CPU devices (`set_cpu_devices`). Must run
  before anything touches a JAX backend."""
  import jax
  _quiet_libtpu()
  if force_cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  elif cpu_devices is not None:
    set_cpu_devices(cpu_devices)
  if os.environ.get("DTM_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  cache = os.environ.get("DTM_JAX_CACHE", os.path.expanduser("~/.cache/dtm/jax"))
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def _quiet_libtpu() -> None:
  """With libtpu installed (the `tpu` extra, for dry runs) but no TPU attached, JAX would
  try the TPU backend first and print libtpu's start-up noise: use the CPU (or CUDA)
  backends instead, unless JAX_PLATFORMS says otherwise. TPU VMs expose /dev/accel* or
  /dev/vfio; the dry run's topology descriptors need no TPU backend."""
  import glob
  import importlib.util
  import jax
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  cuda = any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  jax.config.update("jax_platforms", "cuda,cpu" if cuda else "cpu")


def set_cpu_devices(n: int = 0) -> None:
  """Create n JAX CPU devices (0: one per core this process may use), unless XLA_FLAGS
  (--xla_force_host_platform_device_count) or JAX_NUM_CPU_DEVICES already chose. Only the
  CPU backend is affected; single-device programs still use every core."""
  import jax
  if ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
      or os.environ.get("JAX_NUM_CPU_DEVICES")):
    return
  if n < 0:
    raise DtmError(f"cpu_devices must be >= 0 (0 = one per core), got {n}")
  jax.config.update("jax_num_cpu_devices", n or len(os.sched_getaffinity(0)))


def run_app(main) -> None:
  """absl's app.run, with flag/config errors (unknown config field, bad value, missing or
  broken config file) reported in one line instead of a usage dump or traceback."""
  from absl import app, flags
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    argv = flags.FLAGS(sys.argv)
    _touch_config_flags(flags.FLAGS)
  except flags.Error as e:
    _fail(_flag_message(e))
  except (AttributeError, KeyError) as e:  # ml_collections: override of an undeclared field
    _fail(_unknown_field_message(e, sys.argv))
  except (ValueError, TypeError, OSError, SyntaxError) as e:
    _fail(f"bad config: {_last_line(e)}")
  except DtmError as e:
    _fail(str(e))
  app.run(main, argv=argv, flags_parser=lambda a: a)


def _touch_config_flags(flag_values) -> None:
  """ml_collections defers 'config file not found' until the config is first read; read it
  now (OSError) so the failure is reported here rather than as a traceback inside main."""
  if "config" in flag_values and flag_values["config"].value is not None:
    flag_values["config"].value.keys()


def _last_line(e: BaseException) -> str:
  """The last non-blank line of an exception message (drops embedded tracebacks)."""
  lines = [t.strip() for t in str(e).strip().splitlines() if t.strip()]
  return lines[-1] if lines else type(e).__name__


def _unknown_field_message(e: BaseException, argv: list[str]) -> str:
  """"unknown config field 'prompts.lenght' (did you mean 'prompts.length'?)" for the
  `--config.a.b=v` override that names an undeclared field.

  The config file is loaded again (ml_collections has not stored it when an override
  fails) to find the first path component that is not declared and the closest
  declared name at that level (difflib); without a close match the message lists the
  declared fields there. Falls back to the exception's key if the file cannot be loaded.
  """
  config = _load_config_from_argv(argv)
  overrides = [_override_path(arg) for arg in argv]
  overrides = [p for p in overrides if p]
  if config is not None:
    for path in overrides:
      hint = _missing_field_hint(config, path.split("."))
      if hint is not None:
        return f"unknown config field {path!r} ({hint})"
  found = re.search(r"[A-Za-z_]\w*", str(e))  # the key, inside nested quotes and escapes
  key = found.group(0) if found else str(e)
  for path in overrides:
    if key in path.split("."):
      return f"unknown config field {path!r}"
  return f"unknown config field {key!r}"


def _override_path(arg: str) -> str | None:
  """'--config.prompts.num=3' -> 'prompts.num'; other args -> None."""
  name = arg.lstrip("-").split("=", 1)[0]
  return name[len("config."):] if name.startswith("config.") else None


def _missing_field_hint(config, parts: list[str]) -> str | None:
  """None if every component of `parts` is declared; else the did-you-mean text."""
  import difflib
  node = config
  for i, part in enumerate(parts):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part in keys:
      node = node[part]
      continue
    if not keys:
      return None  # below a leaf (e.g. a dict-valued field): not a missing-field problem
    match = difflib.get_close_matches(part, keys, n=1)
    if match:
      return f"did you mean {'.'.join(parts[:i] + match + parts[i + 1:])!r}?"
    where = ".".join(parts[:i]) or "the config"
    return f"{where} has: {', '.join(sorted(keys))}"
  return None


def _load_config_from_argv(argv: list[str]):
  """get_config(arg) of the `--config=FILE[:arg]` in argv, or None if that fails."""
  import importlib.util
  value = None
  for i, arg in enumerate(argv):
    if arg.lstrip("-").startswith("config="):
      value = arg.split("=", 1)[1]
    elif arg.lstrip("-") == "config" and arg.startswith("-") and i + 1 < len(argv):
      value = argv[i + 1]
  if not value:
    return None
  path, _, config_arg = value.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_dtm_config_for_hint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(config_arg) if config_arg else module.get_config()
  except Exception:  # any failure: fall back to the exception's own text
    return None


def _flag_message(e: Exception) -> str:
  text = str(e).strip()
  if "Traceback (most recent call last)" in text:  # ml_collections embeds get_config's trace
    head = text.split(":", 2)[:2] if text.startswith("flag --") else []
    return f"bad config: {':'.join(head) + ': ' if head else ''}{_last_line(e)}"
  text = " ".join(t.strip() for t in text.splitlines() if t.strip())
  if "not found" in text.lower() or "does not exist" in text.lower() or "has no attribute" in text:
    return f"bad config override: {text}"
  return text
