"""Keras's bias-free depthwise convolution, in the formulation the model's `Formulations` names.

A depthwise convolution has two exact formulations, and the fast one depends
on the backend. XLA:CPU runs a grouped convolution with one channel per group
far slower than TensorFlow's depthwise kernel, while the same computation
written as a sum of k*k shifted elementwise products ('shifted': strided slices
of the padded input times one kernel tap each) fuses into a single loop as fast
as TensorFlow's; its backward pass is written by hand so it stays one loop too
(the kernel gradient's, a block of images at a time). On GPU/TPU the grouped
convolution ('grouped') is the native depthwise kernel. Both read the kernel in
grouped-conv layout (h, w, 1, C * multiplier), so parameters do not depend on
the choice. benchmarks/BENCHMARKS.md ("Formulation choices") holds the
measurements.
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from covid_jax.models import formulations
from covid_jax.models.windows import Padding, divisors, explicit_pads, spread_onto, window_taps, zero_pad

# Bytes of padded input and cotangent per block of the shifted form's kernel gradient: a few images stay in cache.
KERNEL_GRADIENT_BLOCK_BYTES = 2**20


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), padding: Padding = 'SAME',
                   formulation: str = formulations.ACCELERATOR.depthwise) -> jax.Array:
  """Depthwise 2D convolution of NHWC `x` with a (h, w, 1, C * multiplier) `kernel`.

  `padding` is 'SAME' (TensorFlow's: the extra row/column goes bottom/right),
  'VALID', or explicit ((top, bottom), (left, right)) zero padding; `formulation`
  is 'shifted' or 'grouped' (formulations.DEPTHWISE).
  """
  formulations.check('depthwise', formulation)
  window = kernel.shape[:2]
  strides = tuple(strides)
  pads = explicit_pads(x.shape[1:3], window, strides, padding)
  if formulation == 'grouped':
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])
  multiplier = kernel.shape[-1] // x.shape[-1]
  if multiplier > 1:  # Output channel c * multiplier + m reads input channel c.
    x = jnp.repeat(x, multiplier, axis=-1)
  # CPUs lack half-precision arithmetic: XLA would convert around every tap, which slows its compile. Use float32.
  wide = jnp.promote_types(x.dtype, jnp.float32)
  xp = zero_pad(x.astype(wide), pads)
  y = _correlate(xp, kernel.astype(wide), strides)
  return y.astype(x.dtype)


def _sum_of_taps(xp: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
  """Depthwise cross-correlation of already padded `xp`: the sum over taps t of taps[t] * kernel[t].

  The backward pass calls it bare: through `_correlate`'s custom VJP, each call would trace a nested jaxpr,
  a sizeable share of a NASNet train step's trace.
  """
  taps = window_taps(xp, kernel.shape[:2], strides)
  weights = kernel.reshape(len(taps), kernel.shape[-1])
  return functools.reduce(lax.add, (_times_channels(t, lax.index_in_dim(weights, i, keepdims=False))
                                    for i, t in enumerate(taps)))


_correlate = jax.custom_vjp(_sum_of_taps, nondiff_argnums=(2,))


def _times_channels(x: jax.Array, w: jax.Array) -> jax.Array:
  """NHWC `x` times the per-channel `w`, in lax: jnp's operators cost far more to trace (thousands per model)."""
  return lax.mul(x, lax.broadcast_in_dim(w, x.shape, (3,)))


def _correlate_fwd(xp, kernel, strides):
  return _sum_of_taps(xp, kernel, strides), (xp, kernel)


def _correlate_bwd(strides, residuals, g):
  """Written by hand: autodiff gives the kernel one reduction per tap, many times the compile and run time."""
  xp, kernel = residuals
  return (_input_gradient(g, kernel, xp.shape[1:3], strides),
          kernel_gradient(xp, g, kernel.shape[:2], strides).reshape(kernel.shape).astype(kernel.dtype))


def _input_gradient(g: jax.Array, kernel: jax.Array, padded_shape: Sequence[int], strides: Sequence[int]) -> jax.Array:
  """Each tap's product scattered back onto the padded input, one stride phase at a time.

  Padded-input row q * s + r receives g[q - j] * kernel[j * s + r] over j: for each phase (r, c) that is a
  stride-1 correlation of the zero-padded g with the flipped sub-kernel kernel[r::s, c::s], spread onto its
  rows and columns by interior padding. Correlating the stride-dilated g with the whole flipped kernel
  instead multiplies 3/4 of the terms by zeros at stride 2, and runs correspondingly slower.
  """
  (sh, sw), (kh, kw), (n, out_h, out_w, channels) = strides, kernel.shape[:2], g.shape
  zero = np.zeros((), g.dtype)
  # Phase (0, 0) has the most taps and rows: g is padded once for it, and sliced for the others.
  most_h, most_w = -(-kh // sh), -(-kw // sw)
  rows_0, cols_0 = -(-padded_shape[0] // sh), -(-padded_shape[1] // sw)
  padded = lax.pad(g, zero, ((0, 0, 0), (most_h - 1, rows_0 - out_h, 0), (most_w - 1, cols_0 - out_w, 0), (0, 0, 0)))
  total = None
  for r in range(min(sh, kh)):  # A stride wider than the kernel leaves phases without taps.
    for c in range(min(sw, kw)):
      sub_kernel = lax.rev(kernel[r::sh, c::sw], (0, 1))
      jh, jw = sub_kernel.shape[:2]
      rows, cols = -(-(padded_shape[0] - r) // sh), -(-(padded_shape[1] - c) // sw)
      top, left = most_h - jh, most_w - jw
      window = lax.slice(padded, (0, top, left, 0), (n, top + rows + jh - 1, left + cols + jw - 1, channels))
      spread = spread_onto(_sum_of_taps(window, sub_kernel, (1, 1)), (r, c), strides, padded_shape)
      total = spread if total is None else lax.add(total, spread)
  return total


_correlate.defvjp(_correlate_fwd, _correlate_bwd)


def kernel_gradient(xp: jax.Array, g: jax.Array, window: Sequence[int], strides: Sequence[int]) -> jax.Array:
  """(taps, C): each tap's input slice of padded `xp` times the cotangent `g`, summed over the batch and pixels.

  One variadic reduction computes all k*k sums in a single pass over g, faster than a loop over taps or one
  reduction per tap. Over a batch larger than the cache that pass is still slower than a scan over blocks of
  whole images, at most KERNEL_GRADIENT_BLOCK_BYTES of xp and g together, which the cache holds.
  """
  n = g.shape[0]
  image_bytes = (xp.size + g.size) // n * xp.dtype.itemsize
  images = max([d for d in divisors(n) if d * image_bytes <= KERNEL_GRADIENT_BLOCK_BYTES] or [1])
  window, strides = tuple(window), tuple(strides)
  if images == n:
    return _tap_sums(window, strides, xp, g)
  blocks = n // images
  xs = tuple(a.reshape(blocks, images, *a.shape[1:]) for a in (xp, g))
  total, _ = lax.scan(_block_adder(window, strides), jnp.zeros((window[0] * window[1], g.shape[-1]), g.dtype), xs)
  return total


def _tap_sums(window: tuple[int, int], strides: tuple[int, int], xp: jax.Array, g: jax.Array) -> jax.Array:
  """`kernel_gradient` over the images of `xp` and `g` at once: one variadic reduction."""
  products = [lax.mul(tap, g) for tap in window_taps(xp, window, strides)]
  zeros = [np.zeros((), g.dtype)] * len(products)
  return jnp.stack(lax.reduce(products, zeros, lambda a, b: [u + v for u, v in zip(a, b)], (0, 1, 2)))


@functools.cache
def _block_adder(window: tuple[int, int], strides: tuple[int, int]) -> Callable:
  """The scan body for one window and stride, one function each: JAX reuses its trace for layers of equal shapes."""

  def add_block(total: jax.Array, blocks: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
    return total + _tap_sums(window, strides, *blocks), None

  return add_block


class DepthwiseConv(nn.Module):
  """Keras DepthwiseConv2D without bias; params {'kernel': (h, w, 1, C * depth_multiplier)}."""

  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = 'SAME'
  depth_multiplier: int = 1
  formulation: str = formulations.ACCELERATOR.depthwise  # 'shifted' or 'grouped'; the backbones pass theirs.
  dtype: Any = jnp.float32
  # Same distribution as Keras's glorot_uniform on its (h, w, C, multiplier) layout: the fan sum agrees.
  kernel_init: Any = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*self.kernel_size, 1, x.shape[-1] * self.depth_multiplier)
    kernel = self.param('kernel', self.kernel_init, shape, jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return depthwise_conv(x, kernel, self.strides, self.padding, self.formulation)
