"""Max and average pooling in the formulation the model's `Formulations` names: strided slices or reduce_window.

`reduce_window` max pooling differentiates to `select_and_scatter`, which
XLA:CPU runs far slower than the same gradient through a chain of elementwise
maxima of strided slices. On a GPU the slices still win for non-overlapping
windows (VGG16's 2x2 pools), but reduce_window wins where windows overlap
(ResNet50's 3x3 stride-2 pool). So 'by_overlap' (formulations.ACCELERATOR's
choice) takes reduce_window where the window is wider than the stride, and
formulations.CPU takes the slices everywhere. Values are identical, and so are
gradients up to the order in which overlapping windows' cotangents are added:
where inputs of a window tie for the maximum (after a ReLU, often), both give
the window's cotangent to its first maximum, as TensorFlow does. The slices'
gradient is written by hand for that, and so that XLA:CPU does not recompute
the window's maxima for every tap it spreads back.

Average pooling follows the same rule: on a CPU its sum of strided slices runs
faster than reduce_window, forward and backward, with values equal to
rounding; on a GPU the two run alike at NASNet's overlapping 3x3 pools.
benchmarks/BENCHMARKS.md ("Formulation choices") holds the measurements
(taken on one GPU, not on a TPU).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from covid_jax.models import formulations
from covid_jax.models.windows import Padding, explicit_pads, spread_onto, window_taps, zero_pad


def resolve(formulation: str, window: int, stride: int) -> str:
  """'strided_slices' or 'reduce_window': what pooling `formulation` (formulations.POOLING) stands for here.

  'by_overlap' takes reduce_window where windows overlap (`window` > `stride`), strided slices elsewhere.
  """
  formulations.check('pooling', formulation)
  if formulation == 'by_overlap':
    return 'reduce_window' if window > stride else 'strided_slices'
  return formulation


def max_pool(x: jax.Array, window: int, stride: int,
             formulation: str = formulations.ACCELERATOR.pooling) -> jax.Array:
  """VALID `window` x `window` max pooling of NHWC `x` with stride `stride`, written as `formulation` says."""
  if resolve(formulation, window, stride) == 'reduce_window':
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
  fuse them into their spreading onto the input, where the autodiff form recomputes every window's maxima
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


def avg_pool(x: jax.Array, window: int, stride: int, padding: Padding = 'VALID',
             formulation: str = formulations.ACCELERATOR.pooling) -> jax.Array:
  """`window` x `window` average pooling of NHWC `x` with stride `stride`, written as `formulation` says.

  'SAME' pads as TensorFlow does and, as Keras's AveragePooling2D, averages over the pixels inside the image
  only; explicit ((top, bottom), (left, right)) padding is not counted either.
  """
  windows, strides = (window, window), (stride, stride)
  pads = explicit_pads(x.shape[1:3], windows, strides, padding)
  if resolve(formulation, window, stride) == 'reduce_window':
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
