"""`dtm.aot.hlo_flops`: matmul FLOPs of a compiled program, counted through its loops.

XLA's cost_analysis counts a while body once; these tiny programs have a known matmul
count (2 x M x K x N per product) and check that the count multiplies loop bodies by
their trips (annotated on CPU, inferred from init / condition / step where the compiler
leaves no annotation, as the TPU compiler does), takes one branch of a conditional, and
takes the caller's trip count for a loop whose length is only known at run time.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from dtm.aot import hlo_flops

S = jax.ShapeDtypeStruct
F32 = jnp.float32
MM = 2 * 8 * 32 * 32  # one [8, 32] @ [32, 32]


def _text(fn, *args) -> str:
  return jax.jit(fn).lower(*args).compile().as_text()


def _strip_annotation(text: str) -> str:
  return re.sub(r'"known_trip_count":\{"n":"\d+"\}', "", text)


def _scan(x, w):
  return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]


def test_scan_counts_every_trip_where_cost_analysis_counts_one():
  compiled = jax.jit(_scan).lower(S((8, 32), F32), S((5, 32, 32), F32)).compile()
  count = hlo_flops.compiled_matmul_flops(compiled)
  assert count.flops == 5 * MM and count.loops == 1 and count.unknown_loops == 0
  assert compiled.cost_analysis()["flops"] < 2 * MM  # XLA: the body once


@pytest.mark.parametrize("start, stop", [(0, 5), (2, 7), (3, 4)])
def test_trip_count_inferred_without_annotation(start, stop):
  fn = lambda x, w: jax.lax.fori_loop(start, stop, lambda i, h: h @ w[i], x)
  text = _text(fn, S((8, 32), F32), S((9, 32, 32), F32))
  got = hlo_flops.matmul_flops(_strip_annotation(text))
  assert got.flops == (stop - start) * MM and got.unknown_loops == 0


def test_nested_loops_and_run_time_trip_count():
  def fn(x, w, n):
    inner = lambda h, wi: (jax.lax.fori_loop(0, n, lambda i, h: h @ wi, h), None)
    return jax.lax.scan(inner, x, w)[0]
  text = _text(fn, S((8, 32), F32), S((5, 32, 32), F32), S((), jnp.int32))
  assert hlo_flops.matmul_flops(text, unknown_trips=3).flops == 5 * 3 * MM
  once = hlo_flops.matmul_flops(text)
  assert once.flops == 5 * MM and once.unknown_loops == 1


def test_conditional_takes_one_branch_and_loop_free_matches_xla():
  fn = lambda x, w, p: jax.lax.cond(p, lambda: (x @ w) @ w @ w, lambda: x @ w)
  text = _text(fn, S((8, 32), F32), S((32, 32), F32), S((), jnp.bool_))
  assert hlo_flops.matmul_flops(text).flops == 3 * MM
  bmm = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
  compiled = jax.jit(bmm).lower(S((4, 8, 16), F32), S((4, 16, 32), F32)).compile()
  assert hlo_flops.compiled_matmul_flops(compiled).flops == compiled.cost_analysis()["flops"]


def test_tpu_convolution_form():
  """The TPU compiler writes dots as `convolution` with dim_labels (bf_io->bf)."""
  text = """HloModule m

ENTRY %main (p0: bf16[16,256], p1: bf16[256,128]) -> bf16[16,128] {
  %p0 = bf16[16,256]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[256,128]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.5 = bf16[16,128]{1,0:T(8,128)(2,1)} convolution(%p0, %p1), dim_labels=bf_io->bf
}
"""
  assert hlo_flops.matmul_flops(text).flops == 2 * 16 * 256 * 128
  # a batched dot bkmd,bksd->bkms with its batch dims b=16, k=2 as dilated spatial dims
  text = """HloModule m

ENTRY %main (p0: f32[16,2,24,16], p1: f32[16,2,20,16]) -> f32[16,2,24,20] {
  %p0 = f32[16,2,24,16]{3,2,1,0} parameter(0)
  %p1 = f32[16,2,20,16]{3,2,1,0} parameter(1)
  ROOT %c = f32[16,2,24,20]{3,2,1,0} convolution(%p0, %p1), window={size=16x2 stride=15x1 lhs_dilate=16x2}, dim_labels=01bf_01oi->01bf
}
"""
  assert hlo_flops.matmul_flops(text).flops == 2 * 16 * 2 * 24 * 20 * 16


def test_convolution_counts_valid_taps_as_xla():
  conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME")
  compiled = jax.jit(conv).lower(S((2, 3, 16, 16), F32), S((8, 3, 3, 3), F32)).compile()
  assert hlo_flops.compiled_matmul_flops(compiled).flops == compiled.cost_analysis()["flops"]


def test_bytes_read_one_layer_of_stacked_weights_and_update_a_cache_in_place():
  """A layer loop reads one [K, N] slice of the stacked [L, K, N] weights per trip, and a
  decode-style loop writes one row of its [T, D] cache per trip: the bytes grow with
  the slices, not with L or T times the whole buffer."""
  L, M, K = 6, 8, 256
  compiled = jax.jit(_scan).lower(S((M, K), F32), S((L, K, K), F32)).compile()
  got = hlo_flops.compiled_matmul_flops(compiled).bytes
  per_trip = 4 * (K * K + 2 * M * K)  # the weight slice, h in, h out
  # (XLA:CPU copies the slice out before the dot: up to 3 reads/writes of it per trip)
  assert L * per_trip <= got <= 4 * L * per_trip < L * (L * K * K * 4), got

  T, D = 64, 512
  def fill(cache):
    def step(i, c):
      return jax.lax.dynamic_update_slice(c, jax.lax.dynamic_slice(c, (i - 1, 0), (1, D)) * 2.0, (i, 0))
    return jax.lax.fori_loop(1, T, step, cache)
  got = hlo_flops.compiled_matmul_flops(jax.jit(fill).lower(S((T, D), F32)).compile()).bytes
  assert got < 0.5 * T * T * D * 4, got  # not the whole cache per trip
  assert got >= (T - 1) * D * 4, got     # at least each written row
