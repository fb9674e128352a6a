"""Max pooling in the formulation fast on the backend: maxima of strided slices, or reduce_window.

`reduce_window` max pooling differentiates to `select_and_scatter`, which
XLA:CPU runs about 8x slower than the same gradient through a chain of
elementwise maxima of strided slices (VGG16's first 2x2 pool at batch 8: 340 ms
against 44 ms; ResNet50's 3x3 stride-2 pool: 98 ms against 12 ms). On an H200
(float32, batch 8, forward + backward; scripts/benchmark_formulations.py) the
slices still win for VGG16's non-overlapping 2x2 pools (0.19 against 0.21 ms,
0.08 against 0.12 ms) but reduce_window wins 3x for ResNet50's overlapping 3x3
stride-2 pool (0.06 against 0.18 ms), so backends other than the CPU use it
where windows overlap (measured on that GPU only, not on a TPU). Values are
identical. Gradients differ only where two inputs of a
window tie for the maximum (split by the slices, given to one by
select_and_scatter): after a ReLU, ties are zeros whose gradient the ReLU stops
anyway.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax


# 'auto' picks per backend (and window overlap) at trace time; the others force one formulation.
IMPLEMENTATIONS = ('auto', 'strided_slices', 'reduce_window')


def resolve_impl(impl: str, window: int, stride: int) -> str:
  """The formulation `impl` stands for on the default backend and this window ('auto': see the docstring)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown max-pool implementation {impl!r}; known: {IMPLEMENTATIONS}')
  if impl == 'auto':
    return 'reduce_window' if jax.default_backend() != 'cpu' and window > stride else 'strided_slices'
  return impl


def max_pool(x: jax.Array, window: int, stride: int, impl: str = 'auto') -> jax.Array:
  """VALID `window` x `window` max pooling of NHWC `x` with stride `stride`."""
  if resolve_impl(impl, window, stride) == 'reduce_window':
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), 'VALID')
  n, height, width, c = x.shape
  out_h, out_w = (height - window) // stride + 1, (width - window) // stride + 1
  taps = (lax.slice(x, (0, a, b, 0), (n, a + stride * (out_h - 1) + 1, b + stride * (out_w - 1) + 1, c),
                    (1, stride, stride, 1))
          for a in range(window) for b in range(window))
  return functools.reduce(jnp.maximum, taps)
