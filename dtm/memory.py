"""Host memory of this process: resident set size (RSS) and its peak per job phase.

Linux: VmRSS / VmHWM of /proc/self/status (bytes); the peak is reset to the current RSS
by writing 5 to /proc/self/clear_refs (Linux >= 4.0), so each phase gets its own peak.
Where the reset is refused, VmHWM is the process peak so far, and a phase's value is an
upper bound of its own peak (`PhasePeaks.exact` is False). Without /proc (macOS), the
peak is `resource.getrusage`'s ru_maxrss (never reset); without either, None.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import sys

log = logging.getLogger("dtm")


def _status_bytes(field: str) -> int | None:
  """A `kB` field of /proc/self/status in bytes, or None where there is none."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return None


def rss_bytes() -> int | None:
  """Current resident set size in bytes (VmRSS), or None off Linux."""
  return _status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
  """Largest RSS in bytes since process start or the last `reset_peak_rss` (VmHWM);
  off Linux ru_maxrss (never reset); None where neither exists."""
  hwm = _status_bytes("VmHWM")
  if hwm is not None:
    return hwm
  try:
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  except (ImportError, OSError):
    return None
  return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes vs kB


def reset_peak_rss() -> bool:
  """Set VmHWM to the current RSS (write 5 to /proc/self/clear_refs); False if refused."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter numbers (malloc.h)


def _glibc():
  """The C library when it is glibc (has mallopt and malloc_trim), else None."""
  try:
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
  except (OSError, AttributeError):
    return None


def map_large_buffers(threshold_bytes: int = 1 << 20) -> bool:
  """glibc: allocations of at least `threshold_bytes` get their own mmap, so a freed
  array's pages go back to the OS at once. By default glibc raises this threshold to the
  size of each freed mapping (up to 32 MB), after which XLA's buffers below that size come
  from the heap, and the heap keeps what they leave (measured on prune_compare: 3.7 GB of
  free heap inside a 6.5 GB RSS with 1.4 GB of live arrays). Setting the threshold fixes
  it. Returns False where there is no glibc (nothing changes)."""
  libc = _glibc()
  return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


def release_free_memory() -> None:
  """Collect Python's reference cycles (arrays a finished job still holds through them),
  then return the C heap's free pages to the OS (glibc malloc_trim; elsewhere only gc)."""
  gc.collect()
  libc = _glibc()
  if libc is not None:
    libc.malloc_trim(0)


class PhasePeaks:
  """Peak RSS per named phase of a job: `with peaks.phase("compress"): ...`.

  `peaks.bytes[name]` is the largest peak of all entries of that phase (int bytes, in
  the order the phases were first entered); `exact` is True while every reset worked
  (each value is then that phase's own peak; otherwise the process peak up to the
  phase's end). Phases do not nest: an inner phase's reset would hide the outer's peak.
  With release=True every phase starts with `release_free_memory`, so that what an
  earlier phase freed is neither counted in nor held through the next one.
  """

  def __init__(self, release: bool = False):
    self.bytes: dict[str, int] = {}
    self.exact = True
    self.release = release

  @contextlib.contextmanager
  def phase(self, name: str):
    if self.release:
      release_free_memory()
    self.exact = reset_peak_rss() and self.exact
    try:
      yield
    finally:
      peak, now = peak_rss_bytes(), rss_bytes()
      if peak is not None:
        self.bytes[name] = max(self.bytes.get(name, 0), peak)
        log.info("memory: %s peak RSS %.0f MB%s", name, peak / 2**20,
                 "" if now is None else f", {now / 2**20:.0f} MB at its end")

  def summary(self) -> str:
    """One line: 'name 1234 MB, ...' (MB = 2**20 bytes)."""
    return ", ".join(f"{k} {v / 2**20:.0f} MB" for k, v in self.bytes.items())


_HUGETLB = "glibc.malloc.hugetlb=1"


def transparent_huge_pages() -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or None
  off Linux."""
  try:
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def _glibc_version() -> tuple[int, int] | None:
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (ValueError, OSError, AttributeError, TypeError):
    return None


def huge_pages_wanted(environ=None) -> bool:
  """Whether `exec_with_huge_pages` would restart this process: Linux with transparent
  huge pages in 'madvise' mode, glibc >= 2.35 (its `glibc.malloc.hugetlb` tunable),
  GLIBC_TUNABLES not already naming it, and DTM_HUGE_PAGES not '0'."""
  environ = os.environ if environ is None else environ
  if environ.get("DTM_HUGE_PAGES", "1") == "0" or "glibc.malloc.hugetlb" in environ.get(
      "GLIBC_TUNABLES", ""):
    return False
  version = _glibc_version()
  return transparent_huge_pages() == "madvise" and version is not None and version >= (2, 35)


def huge_pages_environ(environ=None) -> dict[str, str]:
  """A copy of the environment with `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES."""
  env = dict(os.environ if environ is None else environ)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), _HUGETLB) if t)
  return env


def exec_with_huge_pages() -> None:
  """Restart this process (same interpreter, same arguments) with glibc's malloc asking
  for transparent huge pages (madvise) on the memory it maps, where `huge_pages_wanted`.

  Why: XLA:CPU allocates each step's large buffers (the layer scan's stacked residuals
  and gradients, 6.4 GB per SmolLM2 train step of 8 x 256 tokens) with fresh mmaps, and
  the kernel hands them out 4 KiB at a time: 1.6 M page faults per step, 2-3 s of a 15 s
  step on a 2-core AMD EPYC (bench/phases.py). With 2 MiB pages the faults drop to
  thousands and the step takes 13 s. glibc reads the tunable only at process start, hence
  the restart; it must run before anything else has started (threads, JAX). A no-op
  elsewhere (returns); DTM_HUGE_PAGES=0 turns it off."""
  if not huge_pages_wanted():
    return
  argv = getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, argv, huge_pages_environ())


def huge_pages_status() -> str:
  """One line for benchmark headers: whether this process's malloc asks for huge pages."""
  on = "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")
  return (f"malloc huge pages {'on' if on else 'off'} (transparent huge pages: "
          f"{transparent_huge_pages()}, DTM_HUGE_PAGES={os.environ.get('DTM_HUGE_PAGES', '1')})")
