"""Max and average pooling in the formulation fast on the backend: strided slices, or reduce_window.

`reduce_window` max pooling differentiates to `select_and_scatter`, which
XLA:CPU runs about 8x slower than the same gradient through a chain of
elementwise maxima of strided slices (VGG16's first 2x2 pool at batch 8: 340 ms
against 44 ms; ResNet50's 3x3 stride-2 pool: 98 ms against 12 ms). On an H200
(float32, batch 8, forward + backward; scripts/benchmark_formulations.py) the
slices still win for VGG16's non-overlapping 2x2 pools (0.19 against 0.21 ms,
0.08 against 0.12 ms) but reduce_window wins 3x for ResNet50's overlapping 3x3
stride-2 pool (0.06 against 0.18 ms), so backends other than the CPU use it
where windows overlap (measured on that GPU only, not on a TPU). Values are
identical, and so are gradients up to the order in which overlapping windows'
cotangents are added: where inputs of a window tie for the maximum (after a
ReLU, often), both give the window's cotangent to its first maximum, as
TensorFlow does. The slices' gradient is written by hand for that, and so that
XLA:CPU does not recompute the window's maxima for every tap it spreads back.

Average pooling follows the same rule. On this project's 2-core CPU its sum of
strided slices ran 2-7x faster than reduce_window, forward + backward, at
NASNet's shapes (28x28x168 at batch 8: 2.5 against 9.1 ms; a 3x3 stride-2 pool
of 57x57x84: 1.9 against 13.2 ms), with values equal to rounding. Elsewhere it
keeps reduce_window where windows overlap: on an H200 the two were equal at
NASNet's 3x3 pools (0.08-0.12 ms forward + backward, float32, batch 8), the
slices 0.02 ms faster only on the stem's.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from covid_jax.models.depthwise import Padding, explicit_pads, spread_onto, window_taps, zero_pad


# 'auto' picks per backend (and window overlap) at trace time; the others force one formulation.
IMPLEMENTATIONS = ('auto', 'strided_slices', 'reduce_window')


def resolve_impl(impl: str, window: int, stride: int) -> str:
  """The formulation `impl` stands for on the default backend and this window ('auto': see the docstring)."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown pooling implementation {impl!r}; known: {IMPLEMENTATIONS}')
  if impl == 'auto':
    return 'reduce_window' if jax.default_backend() != 'cpu' and window > stride else 'strided_slices'
  return impl


def max_pool(x: jax.Array, window: int, stride: int, impl: str = 'auto') -> jax.Array:
  """VALID `window` x `window` max pooling of NHWC `x` with stride `stride`."""
  if resolve_impl(impl, window, stride) == 'reduce_window':
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), 'VALID')
  return _max_of_slices(x, window, stride)


def _maximum_of_slices(x: jax.Array, window: int, stride: int) -> jax.Array:
  """The elementwise maximum of the window's strided slices."""
  return functools.reduce(lax.max, window_taps(x, (window, window), (stride, stride)))


_max_of_slices = jax.custom_vjp(_maximum_of_slices, nondiff_argnums=(1, 2))


def _max_of_slices_fwd(x, window, stride):
  y = _maximum_of_slices(x, window, stride)  # Bare: through the custom VJP, each call would trace a nested jaxpr.
  return y, (x, y)


def _max_of_slices_bwd(window, stride, residuals, g):
  """Each output's cotangent goes to the first input of its window that holds the maximum, as in TensorFlow.

  The routed pieces are computed on the output grid, behind an optimization barrier so that XLA does not
  fuse them into their spreading onto the input: there, the autodiff form recomputed every window's maxima
  once per tap.
  """
  x, y = residuals
  zero = np.zeros((), g.dtype)
  taken, pieces = jnp.zeros(y.shape, bool), []
  for tap in window_taps(x, (window, window), (stride, stride)):
    hit = lax.bitwise_and(lax.eq(tap, y), lax.bitwise_not(taken))
    taken = lax.bitwise_or(taken, hit)
    pieces.append(lax.select(hit, g, lax.full_like(g, zero)))
  total = None
  for t, piece in enumerate(lax.optimization_barrier(pieces)):
    spread = spread_onto(piece, divmod(t, window), (stride, stride), x.shape[1:3])
    total = spread if total is None else lax.add(total, spread)
  return (total,)


_max_of_slices.defvjp(_max_of_slices_fwd, _max_of_slices_bwd)


def avg_pool(x: jax.Array, window: int, stride: int, padding: Padding = 'VALID', impl: str = 'auto') -> jax.Array:
  """`window` x `window` average pooling of NHWC `x` with stride `stride`.

  'SAME' pads as TensorFlow does and, as Keras's AveragePooling2D, averages over the pixels inside the image
  only; explicit ((top, bottom), (left, right)) padding is not counted either.
  """
  windows, strides = (window, window), (stride, stride)
  pads = explicit_pads(x.shape[1:3], windows, strides, padding)
  if resolve_impl(impl, window, stride) == 'reduce_window':
    total = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, (1, *windows, 1), (1, *strides, 1),
                              ((0, 0), *pads, (0, 0)))
  else:
    total = functools.reduce(lax.add, window_taps(zero_pad(x, pads), windows, strides))
  wide = jnp.promote_types(x.dtype, jnp.float32)  # Scaled in float32 at least, as flax.linen.avg_pool divides.
  scale = lax.broadcast_in_dim(jnp.asarray(_inverse_counts(x.shape[1:3], windows, strides, pads), wide),
                               total.shape, (1, 2))
  return lax.mul(total.astype(wide), scale).astype(x.dtype)


def _inverse_counts(spatial_shape: Sequence[int], windows: Sequence[int], strides: Sequence[int],
                    pads: Sequence[tuple[int, int]]) -> np.ndarray:
  """(out_h, out_w): one over the number of image pixels (padding excluded) in each output's window."""
  inside = np.pad(np.ones(spatial_shape), pads)
  (kh, kw), (sh, sw) = windows, strides
  out_h, out_w = ((size - k) // s + 1 for size, k, s in zip(inside.shape, windows, strides))
  counts = sum(inside[a:a + sh * (out_h - 1) + 1:sh, b:b + sw * (out_w - 1) + 1:sw]
               for a in range(kh) for b in range(kw))
  return 1.0 / counts
