"""What a dry run compiles for: a TPU slice, a GPU kind, or N CPU devices.

  v5e-16, v6e-8            v5e / v6e names count chips (one device per chip)
  v4-32, v5p-64            v4 / v5p names count TensorCores: 2 per chip, one megacore
                           device per chip (v4-32 = 16 chips = 16 devices)
  gpu:h100[:N]             a GPU kind of the table, N devices (default 8)
  gpu:MEM_GIB:PEAK[:N]     any GPU, by memory (GiB) and peak bf16 FLOP/s
  cpu:N                    N CPU devices of this host

TPU devices come from libtpu's topology descriptors
(`jax.experimental.topologies.get_topology_desc`), so nothing has to be attached; the
compiler then answers per device: argument / temp / output bytes and FLOPs. There is no
GPU compiler here without a GPU, so a GPU target compiles the same programs for N CPU
devices (same shardings, same shapes) and judges them against the GPU's memory and peak:
a proxy, said so in the table.

Peak FLOP/s and HBM per chip (bf16 dense, vendor data sheets):
  v4   275e12, 32 GiB   cloud.google.com/tpu/docs/v4
  v5e  197e12, 16 GiB   cloud.google.com/tpu/docs/v5e
  v5p  459e12, 95 GiB   cloud.google.com/tpu/docs/v5p
  v6e  918e12, 32 GiB   cloud.google.com/tpu/docs/v6e
  h100 989e12, 80 GiB   NVIDIA H100 SXM data sheet (dense bf16)
  h200 989e12, 141 GB   NVIDIA H200 data sheet
  a100 312e12, 80 GiB   NVIDIA A100 data sheet
The usable HBM is what libtpu's compiler states as available in its RESOURCE_EXHAUSTED
message (v4 30.75 GiB of 32, v5e 15.75 of 16, v5p 95.74, v6e 31.25; measured by compiling
an oversized program for each); a program over it fails to compile, and the dry run
reports that as does-not-fit.
"""
from __future__ import annotations

import dataclasses
import os
import re
import time

from dtm.errors import DtmError

GIB = 1024 ** 3

# name -> (topology prefix, megacore, peak bf16 FLOP/s per chip, usable HBM bytes per chip)
TPU_CHIPS = {
    "v4": ("v4", True, 275e12, int(30.75 * GIB)),
    "v5e": ("v5e", False, 197e12, int(15.75 * GIB)),
    "v5p": ("v5", True, 459e12, int(95.74 * GIB)),
    "v6e": ("v6e", False, 918e12, int(31.25 * GIB)),
}
GPU_KINDS = {"h100": (989e12, 80 * GIB), "h200": (989e12, 141e9), "a100": (312e12, 80 * GIB)}

# chips -> topology of the 2-D (v5e, v6e) and 3-D (v4, v5p) tori
_TOPO_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_TOPO_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8"}


@dataclasses.dataclass
class Target:
  """A compile target: its name, the devices to lower against, and per-device limits."""
  name: str
  platform: str                # 'tpu' | 'gpu' | 'cpu'
  num_devices: int
  peak_flops: float            # per device, FLOP/s
  hbm_bytes: int               # per device
  topology: str | None = None  # libtpu's topology name (TPU)
  megacore: bool = False
  proxy: bool = False          # compiled for CPU devices in place of the real kind
  peak_source: str = ""
  local: bool = False          # this process's own devices (the preflight of a real run)
  mem_bandwidth: float = 0.0   # bytes/s of the whole host (CPU: measured; 0 = not modelled)
  _devices: list | None = None

  @property
  def devices(self) -> list:
    if self._devices is None:
      self._devices = _make_devices(self)
    return self._devices


def parse_target(text: str) -> Target:
  """'v5e-16' | 'v4-32' | 'v5p-64' | 'v6e-8' | 'gpu:h100[:N]' | 'gpu:MEM:PEAK[:N]' | 'cpu:N'
  (module docstring); DtmError naming what is wrong."""
  text = text.strip().lower()
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", text)
  if m:
    kind, count = m.group(1), int(m.group(2))
    prefix, megacore, peak, hbm = TPU_CHIPS[kind]
    chips = count // 2 if megacore else count
    table = _TOPO_3D if megacore else _TOPO_2D
    if (megacore and count % 2) or chips not in table:
      sizes = sorted((2 * c if megacore else c) for c in table)
      raise DtmError(f"unknown TPU slice {text!r}: libtpu topologies of {kind} are "
                     f"{', '.join(f'{kind}-{s}' for s in sizes)}")
    return Target(text, "tpu", chips, peak, hbm, f"{prefix}:{table[chips]}", megacore,
                  peak_source=f"{kind} data sheet, bf16 dense per chip")
  parts = text.split(":")
  if parts[0] == "gpu" and len(parts) in (2, 3) and parts[1] in GPU_KINDS:
    peak, hbm = GPU_KINDS[parts[1]]
    n = _count(parts[2] if len(parts) == 3 else "8", text)
    return Target(text, "gpu", n, peak, int(hbm), proxy=True,
                  peak_source=f"{parts[1]} data sheet, bf16 dense")
  if parts[0] == "gpu" and len(parts) in (3, 4):
    try:
      hbm, peak = float(parts[1]) * GIB, float(parts[2])
    except ValueError:
      hbm = peak = 0.0
    if hbm > 0 and peak > 0:
      n = _count(parts[3] if len(parts) == 4 else "8", text)
      return Target(text, "gpu", n, peak, int(hbm), proxy=True, peak_source="given")
  if parts[0] == "cpu" and len(parts) == 2:
    n = _count(parts[1], text)
    return Target(text, "cpu", n, 0.0, 0, peak_source="same-run 2048^3 f32 matmul")
  raise DtmError(f"unknown dry-run target {text!r}: use a TPU slice (v5e-16, v4-32, v5p-64, "
                 f"v6e-8, ...), gpu:{'|'.join(GPU_KINDS)}[:N], gpu:MEM_GIB:PEAK_FLOPS[:N] or "
                 "cpu:N")


def _count(text: str, whole: str) -> int:
  if not text.isdigit() or int(text) < 1:
    raise DtmError(f"bad device count {text!r} in dry-run target {whole!r}")
  return int(text)


def libtpu_available() -> bool:
  import importlib.util
  return importlib.util.find_spec("libtpu") is not None


def _make_devices(target: Target) -> list:
  import jax
  if target.platform == "tpu":
    if not libtpu_available():
      raise DtmError("compiling for a TPU slice needs libtpu: pip install -e '.[tpu]' "
                     "(jax[tpu] pinned to dtm's jax)")
    from jax.experimental import topologies
    # libtpu takes /tmp/libtpu_lockfile for the process that drives a real TPU; compiling
    # for a descriptor drives none, so several dry runs (or test workers) may share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
      topo = topologies.get_topology_desc(
          platform="tpu", topology_name=target.topology,
          chip_config_name="megacore" if target.megacore else "default",
          chips_per_host_bounds=(1, 1, 1) if target.num_devices == 1 else (2, 2, 1),
          num_slices=1)
    except Exception as e:  # libtpu's own message names the topology
      raise DtmError(f"libtpu does not know topology {target.topology!r} ({target.name}): "
                     f"{str(e).strip().splitlines()[-1][:200]}") from None
    devices = list(topo.devices)
  else:
    devices = jax.devices("cpu")
    if len(devices) < target.num_devices:
      raise DtmError(f"{target.name} needs {target.num_devices} CPU devices, this process has "
                     f"{len(devices)} (the dry run creates them when it starts the job)")
    devices = devices[:target.num_devices]
  if len(devices) != target.num_devices:
    raise DtmError(f"topology {target.topology} has {len(devices)} devices, expected "
                   f"{target.num_devices}")
  if target.platform == "cpu" and not target.peak_flops:
    total = measure_cpu_peak()
    target.peak_flops = total / target.num_devices  # the devices share the host's cores
    target.mem_bandwidth = measure_cpu_bandwidth()
    target.hbm_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // target.num_devices
  elif target.platform == "gpu":
    pass
  return devices


def measure_cpu_bandwidth(n: int = 1 << 25, repeats: int = 5) -> float:
  """Bytes/s of this host's best streaming op (x * 2 over n float32: n x 4 bytes read and
  n x 4 written), compiled, warm: the memory term of the CPU time model."""
  import jax
  import jax.numpy as jnp
  x = jax.device_put(jnp.ones((n,), jnp.float32), jax.devices("cpu")[0])
  f = jax.jit(lambda a: a * 2.0)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * 4 * n / best


def measure_cpu_peak(n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of this host's best n^3 float32 matmul (all cores, compiled, warm)."""
  import jax
  import jax.numpy as jnp
  x = jax.device_put(jnp.ones((n, n), jnp.float32), jax.devices("cpu")[0])
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def cpu_devices_needed(text: str) -> int | None:
  """How many CPU devices the process must create for `text` (GPU proxies and cpu:N)."""
  try:
    t = parse_target(text)
  except DtmError:
    return None
  return t.num_devices if t.platform in ("gpu", "cpu") else None
