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
