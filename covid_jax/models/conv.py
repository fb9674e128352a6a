"""Keras Conv2D, with its forward pass and kernel gradient in the formulation the model's `Formulations` names.

A train step computes three convolutions per layer: the forward pass, the
gradient with respect to the input, and the gradient with respect to the
kernel, a contraction over every output pixel of the batch. XLA:CPU runs the
first two near TensorFlow's speed, but its kernel gradient far slower. Written
instead as matmuls over im2col patches (the k*k shifted input slices, side by
side on the channel axis), built a block of output rows at a time so that they
stay in the cache, a large kernel gradient runs as fast as TensorFlow's or
faster; for a small one the patch copies cost more than they save. So 'by_size'
takes im2col from IM2COL_MIN_FLOPS of kernel gradient. The two kernel gradients
agree to float32 rounding.

A convolution of few input channels (the first layer's RGB) is a poor fit for
XLA:CPU's convolution kernels. Written as a sum over the window's taps and the
input channels of one input channel times a row of the kernel (27 broadcast
products for 3x3 over RGB), one elementwise fusion, its forward pass runs
faster over a 3x3 window and slower over a 7x7 one (147 products). So 'by_size'
takes these 'products' up to PRODUCTS_MAX_TERMS products per output value;
their gradients are XLA's.

A 1x1 convolution is a matmul over channels (`pointwise_conv`, `PointwiseConv`),
which XLA:CPU runs faster than the equivalent convolution op. Its kernel
gradient contracts every pixel of the batch, and for it XLA:CPU first
transposes the whole output cotangent; past the cache that copy dominates. So
from POINTWISE_BLOCKS_MIN_BYTES of cotangent the pointwise 'by_size' takes that
gradient by blocks of pixels, as the im2col gradient does.

formulations.CPU chooses by size; ACCELERATOR keeps XLA's own convolution and
matmul, whose gradients are fast there. benchmarks/BENCHMARKS.md ("Formulation
choices") holds the measurements behind the thresholds.
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
from covid_jax.models.windows import Padding, divisors, explicit_pads, window_taps, zero_pad

# Kernel-gradient FLOPs from which 'by_size' takes im2col.
IM2COL_MIN_FLOPS = 4e9
# Products per output value (window taps x input channels) up to which 'by_size' takes 'products'.
PRODUCTS_MAX_TERMS = 27
# Bytes of one block of a kernel gradient by blocks (im2col patches; a 1x1's input and cotangent): they stay in cache.
PATCH_BLOCK_BYTES = 4 * 2**20
# Output-cotangent bytes of a 1x1 convolution from which the pointwise 'by_size' takes its kernel gradient by blocks.
POINTWISE_BLOCKS_MIN_BYTES = 8 * 2**20

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def resolve(formulation: str, flops: float, terms: int) -> str:
  """The formulation ('native', 'im2col' or 'products') that conv `formulation` (formulations.CONV) stands for.

  For a convolution whose kernel gradient takes `flops` and whose output values each sum `terms`
  products (window taps x input channels).
  """
  formulations.check('conv', formulation)
  if formulation != 'by_size':
    return formulation
  if terms <= PRODUCTS_MAX_TERMS:
    return 'products'
  return 'im2col' if flops >= IM2COL_MIN_FLOPS else 'native'


def kernel_gradient_flops(output_pixels: int, kernel_shape: Sequence[int]) -> int:
  """Multiply-adds x 2 of the kernel gradient: each output pixel of the batch meets every kernel weight once."""
  return 2 * output_pixels * int(np.prod(kernel_shape))


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), padding: Padding = 'SAME',
           formulation: str = formulations.ACCELERATOR.conv) -> jax.Array:
  """2D convolution of NHWC `x` with an HWIO `kernel`, written as `formulation` (formulations.CONV) says.

  `padding` is 'SAME' (TensorFlow's), 'VALID', or explicit ((top, bottom), (left, right)) zero padding.
  """
  strides = tuple(strides)
  window = kernel.shape[:2]
  pads = explicit_pads(x.shape[1:3], window, strides, padding)
  out_h, out_w = ((size + lo + hi - k) // s + 1 for size, (lo, hi), k, s in zip(x.shape[1:3], pads, window, strides))
  chosen = resolve(formulation, kernel_gradient_flops(x.shape[0] * out_h * out_w, kernel.shape),
                   int(np.prod(kernel.shape[:3])))
  if chosen == 'native':
    return _conv(x, kernel, strides, pads)
  if chosen == 'products':
    return _conv_products(x, kernel, strides, pads)
  return _conv_im2col_gradient(x, kernel, strides, pads)


def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: tuple[tuple[int, int], ...]) -> jax.Array:
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DIMENSIONS)


def _formulated(forward: Callable, kernel_gradient: Callable) -> Callable:
  """A convolution that `forward` computes, differentiated by XLA for its input and by `kernel_gradient` for its kernel.

  The result and `forward` take (x, kernel, strides, pads); `kernel_gradient` takes (x, g, kernel, strides, pads).
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
  def convolution(x, kernel, strides, pads):
    return forward(x, kernel, strides, pads)

  def convolution_fwd(x, kernel, strides, pads):
    return forward(x, kernel, strides, pads), (x, kernel)

  def convolution_bwd(strides, pads, residuals, g):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda x: _conv(x, kernel, strides, pads), x)
    (d_x,) = input_vjp(g)
    return d_x, kernel_gradient(x, g, kernel, strides, pads)

  convolution.defvjp(convolution_fwd, convolution_bwd)
  return convolution


def _native_kernel_gradient(x, g, kernel, strides, pads):
  _, kernel_vjp = jax.vjp(lambda kernel: _conv(x, kernel, strides, pads), kernel)
  return kernel_vjp(g)[0]


def _im2col_kernel_gradient(x, g, kernel, strides, pads):
  return im2col_kernel_gradient(x, g, kernel.shape[:2], strides, pads).astype(kernel.dtype)


def broadcast_products(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                       pads: Sequence[tuple[int, int]]) -> jax.Array:
  """The convolution as a sum, over taps and input channels, of one input channel times a kernel row.

  In float32 (CPUs lack half-precision arithmetic), in lax: jnp's operators cost far more to trace.
  """
  wide = jnp.promote_types(x.dtype, jnp.float32)
  taps = window_taps(zero_pad(x.astype(wide), pads), kernel.shape[:2], strides)
  c_in, c_out = kernel.shape[2:]
  rows = kernel.astype(wide).reshape(len(taps) * c_in, c_out)
  shape = (*taps[0].shape[:3], c_out)
  products = (lax.mul(lax.broadcast_in_dim(lax.slice_in_dim(tap, c, c + 1, axis=3), shape, (0, 1, 2, 3)),
                      lax.broadcast_in_dim(lax.index_in_dim(rows, t * c_in + c, keepdims=False), shape, (3,)))
              for t, tap in enumerate(taps) for c in range(c_in))
  return functools.reduce(lax.add, products).astype(x.dtype)


# XLA's forward pass and input gradient, the kernel gradient as im2col matmuls.
_conv_im2col_gradient = _formulated(_conv, _im2col_kernel_gradient)
# The forward pass as broadcast products, XLA's gradients: differentiating the products would take one
# reduction over the output cotangent per product.
_conv_products = _formulated(broadcast_products, _native_kernel_gradient)


def im2col_kernel_gradient(x: jax.Array, g: jax.Array, window: Sequence[int], strides: Sequence[int],
                           pads: Sequence[tuple[int, int]]) -> jax.Array:
  """The HWIO kernel gradient of a convolution of `x` whose output cotangent is `g`, as matmuls over patches.

  A scan over blocks of output rows (see `block_shape`) builds one block's patches at a time and
  accumulates their matmuls with `g` in float32.
  """
  n, out_h, out_w, c_out = g.shape
  shape = block_shape(n, out_h, out_w, window[0] * window[1] * x.shape[-1] * x.dtype.itemsize, c_out)
  return _kernel_gradient_by_blocks(zero_pad(x, pads), g, window, strides, shape)


def pointwise_kernel_gradient(x: jax.Array, g: jax.Array) -> jax.Array:
  """The (C_in, C_out) gradient of `x @ kernel` whose cotangent is `g`, in float32, by blocks of pixels.

  Each block's slices of both `x` and `g` fit PATCH_BLOCK_BYTES, so XLA's transposes for the matmuls stay
  in the cache.
  """
  n, h, w, c_out = g.shape
  shape = block_shape(n, h, w, (x.shape[-1] + c_out) * x.dtype.itemsize, c_out)
  return _kernel_gradient_by_blocks(x, g, (1, 1), (1, 1), shape)[0, 0]


def _kernel_gradient_by_blocks(xp: jax.Array, g: jax.Array, window: Sequence[int], strides: Sequence[int],
                               shape: tuple[int, int]) -> jax.Array:
  """The HWIO kernel gradient for padded `xp`, accumulated in float32 over blocks of `shape` (images, output rows)."""
  n, out_h, out_w, c_out = g.shape
  (kh, kw), sh, c_in = window, strides[0], xp.shape[-1]
  images, rows = shape
  blocks_per_image = out_h // rows

  def add_block(total: jax.Array, block: jax.Array) -> tuple[jax.Array, None]:
    image, row = images * (block // blocks_per_image), rows * (block % blocks_per_image)
    slab = lax.dynamic_slice_in_dim(lax.dynamic_slice_in_dim(xp, image, images, 0), sh * row, sh * (rows - 1) + kh, 1)
    g_block = lax.dynamic_slice(g, (image, row, 0, 0), (images, rows, out_w, c_out))
    patches = jnp.concatenate(window_taps(slab, window, strides), axis=-1)
    product = lax.dot_general(patches, g_block, (((0, 1, 2), (0, 1, 2)), ((), ())),
                              preferred_element_type=jnp.float32)
    return total + product, None

  initial = jnp.zeros((kh * kw * c_in, c_out), jnp.float32)
  total, _ = lax.scan(add_block, initial, jnp.arange(n // images * blocks_per_image))
  return total.reshape(kh, kw, c_in, c_out)


def pointwise_conv(x: jax.Array, kernel: jax.Array, formulation: str = formulations.ACCELERATOR.pointwise) -> jax.Array:
  """1x1 convolution of NHWC `x` with a (C_in, C_out) `kernel`: a matmul over channels.

  Its kernel gradient is XLA's ('matmul') or by blocks of pixels ('blocks'), as `resolve_pointwise` reads
  `formulation` (formulations.POINTWISE).
  """
  if resolve_pointwise(formulation, x.size // x.shape[-1] * kernel.shape[-1] * x.dtype.itemsize) == 'blocks':
    return pointwise_conv_by_blocks(x, kernel)
  return jnp.dot(x, kernel)


def resolve_pointwise(formulation: str, output_bytes: int) -> str:
  """'matmul' or 'blocks': what pointwise `formulation` stands for with `output_bytes` of output cotangent.

  'by_size' takes blocks from POINTWISE_BLOCKS_MIN_BYTES.
  """
  formulations.check('pointwise', formulation)
  if formulation == 'by_size':
    return 'blocks' if output_bytes >= POINTWISE_BLOCKS_MIN_BYTES else 'matmul'
  return formulation


@jax.custom_vjp
def pointwise_conv_by_blocks(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`pointwise_conv` whose kernel gradient is `pointwise_kernel_gradient`, on any backend."""
  return jnp.dot(x, kernel)


def _pointwise_conv_by_blocks_fwd(x, kernel):
  return jnp.dot(x, kernel), (x, kernel)


def _pointwise_conv_by_blocks_bwd(residuals, g):
  x, kernel = residuals
  return jnp.dot(g, kernel.T), pointwise_kernel_gradient(x, g).astype(kernel.dtype)


pointwise_conv_by_blocks.defvjp(_pointwise_conv_by_blocks_fwd, _pointwise_conv_by_blocks_bwd)


def block_shape(n: int, out_h: int, out_w: int, patch_pixel_bytes: int, c_out: int) -> tuple[int, int]:
  """(images, output rows) per block of a kernel gradient by blocks; rows < out_h only for one image.

  `patch_pixel_bytes` is what one output pixel's block data take: its im2col patch, or a 1x1 convolution's
  input and cotangent. The largest block whose data fit PATCH_BLOCK_BYTES (they are written and read back
  from the cache) while holding at least c_out pixels (the matmul then outweighs the accumulation of its
  patch-channels x c_out product); where no block does both, the smallest that holds c_out pixels.
  """
  shapes = [(1, r) for r in divisors(out_h)] + [(i, out_h) for i in divisors(n) if i > 1]
  pixels = [images * rows * out_w for images, rows in shapes]
  large_enough = [(p, shape) for p, shape in zip(pixels, shapes) if p >= c_out] or [(pixels[-1], shapes[-1])]
  in_cache = [(p, shape) for p, shape in large_enough if p * patch_pixel_bytes <= PATCH_BLOCK_BYTES]
  return max(in_cache)[1] if in_cache else min(large_enough)[1]


class Conv(nn.Module):
  """Keras Conv2D; params {'kernel': HWIO} and, with use_bias, {'bias'}, as flax.linen.Conv names them."""

  features: int
  kernel_size: tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: Padding = 'SAME'
  use_bias: bool = True
  formulation: str = formulations.ACCELERATOR.conv  # One of formulations.CONV; the backbones pass theirs.
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()  # flax.linen.Conv's.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else self.strides
    y = conv2d(x, kernel, strides, self.padding, self.formulation)
    return y if bias is None else y + bias


class PointwiseConv(nn.Module):
  """Keras Conv2D with a 1x1 kernel; params {'kernel': (1, 1, C, features)} and, with use_bias, {'bias'}.

  A stride keeps every stride-th pixel, as a strided 1x1 convolution does.
  """

  features: int
  strides: int = 1
  use_bias: bool = False
  formulation: str = formulations.ACCELERATOR.pointwise  # One of formulations.POINTWISE; the backbones pass theirs.
  dtype: Any = jnp.float32
  kernel_init: Any = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.strides > 1:
      x = lax.slice(x, (0, 0, 0, 0), x.shape, (1, self.strides, self.strides, 1))
    y = pointwise_conv(x, kernel.reshape(kernel.shape[2:]), self.formulation)
    return y if bias is None else y + bias
