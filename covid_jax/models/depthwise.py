"""Keras's bias-free depthwise, 1x1 and separable convolutions, in the formulation fast on the backend.

A depthwise convolution has two exact formulations, and the fast one depends
on the backend. XLA:CPU runs a grouped convolution with one channel per group
about 50x slower than TensorFlow's depthwise kernel, while the same
computation written as a sum of k*k shifted elementwise products (strided
slices of the padded input times one kernel tap each) fuses into a single
loop that beats TensorFlow. On GPU/TPU the grouped convolution is the native
depthwise kernel. Both read the kernel in grouped-conv layout
(h, w, 1, C * multiplier), so parameters do not depend on the choice.

A 1x1 convolution is likewise written as a matmul over channels: XLA:CPU runs
it up to 4x faster than the equivalent convolution op.
"""

import functools
import operator
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# 'auto' picks per backend at trace time; the others force one formulation.
IMPLEMENTATIONS = ('auto', 'shifted', 'grouped')

Padding = str | Sequence[tuple[int, int]]


def depthwise_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
                   padding: Padding = 'SAME', impl: str = 'auto') -> jax.Array:
  """Depthwise 2D convolution of NHWC `x` with a (h, w, 1, C * multiplier) `kernel`.

  `padding` is 'SAME' (TensorFlow's: the extra row/column goes bottom/right),
  'VALID', or explicit ((top, bottom), (left, right)) zero padding.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown depthwise implementation {impl!r}; known: {IMPLEMENTATIONS}')
  if impl == 'auto':
    impl = 'shifted' if jax.default_backend() == 'cpu' else 'grouped'
  window = kernel.shape[:2]
  strides = tuple(strides)
  pads = lax.padtype_to_pads(x.shape[1:3], window, strides, padding) if isinstance(padding, str) else padding
  pads = tuple(tuple(p) for p in pads)
  if impl == 'grouped':
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=x.shape[-1])
  return _shifted_products(x, kernel, strides, pads)


def _shifted_products(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                      pads: tuple[tuple[int, int], ...]) -> jax.Array:
  """sum over taps (a, b) of x_padded[a::stride, b::stride] * kernel[a, b]: no convolution op at all."""
  multiplier = kernel.shape[-1] // x.shape[-1]
  if multiplier > 1:  # Output channel c * multiplier + m reads input channel c.
    x = jnp.repeat(x, multiplier, axis=-1)
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  (kh, kw), (sh, sw) = kernel.shape[:2], strides
  n, height, width, channels = x.shape
  out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1

  def tap(a: int, b: int) -> jax.Array:
    end = (n, a + sh * (out_h - 1) + 1, b + sw * (out_w - 1) + 1, channels)
    return lax.slice(x, (0, a, b, 0), end, (1, sh, sw, 1)) * kernel[a, b, 0]

  return functools.reduce(operator.add, (tap(a, b) for a in range(kh) for b in range(kw)))


class DepthwiseConv(nn.Module):
  """Keras DepthwiseConv2D without bias; params {'kernel': (h, w, 1, C * depth_multiplier)}."""

  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = 'SAME'
  depth_multiplier: int = 1
  impl: str = 'auto'
  dtype: Any = jnp.float32
  # Same distribution as Keras's glorot_uniform on its (h, w, C, multiplier) layout: the fan sum agrees.
  kernel_init: Any = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*self.kernel_size, 1, x.shape[-1] * self.depth_multiplier)
    kernel = self.param('kernel', self.kernel_init, shape, jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return depthwise_conv(x, kernel, self.strides, self.padding, self.impl)


class PointwiseConv(nn.Module):
  """Keras Conv2D with a 1x1 kernel, stride 1 and no bias; params {'kernel': (1, 1, C, features)}."""

  features: int
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return jnp.dot(x, kernel[0, 0])


class SeparableConv(nn.Module):
  """Keras SeparableConv2D without bias: children `depthwise` and `pointwise` (a 1x1 conv)."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: Padding = 'SAME'
  depthwise_impl: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = DepthwiseConv(self.kernel_size, self.strides, self.padding, impl=self.depthwise_impl, dtype=self.dtype,
                      name='depthwise')(x)
    return PointwiseConv(self.features, self.dtype, name='pointwise')(x)
