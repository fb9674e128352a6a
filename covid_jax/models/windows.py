"""Windows and padding shared by the convolutions and pools: pads, zero padding, a window's strided slices."""

from collections.abc import Iterable, Sequence

import jax
import numpy as np
from jax import lax

# 'SAME' (TensorFlow's: the extra row/column goes bottom/right), 'VALID', or ((top, bottom), (left, right)).
Padding = str | Sequence[tuple[int, int]]


def explicit_pads(spatial_shape: Sequence[int], window: Sequence[int], strides: Sequence[int],
                  padding: Padding) -> tuple[tuple[int, int], ...]:
  """`padding` as ((top, bottom), (left, right)), hashable (custom_vjp takes it as a static argument)."""
  pads = lax.padtype_to_pads(spatial_shape, window, strides, padding) if isinstance(padding, str) else padding
  return tuple(tuple(p) for p in pads)


def correct_pad(shape: Sequence[int], kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  """Keras imagenet_utils.correct_pad for NHWC `shape`: one less on top/left where a size is even."""
  return tuple((kernel // 2 - (1 - size % 2), kernel // 2) for size in shape[1:3])


def zero_pad(x: jax.Array, pads: Sequence[tuple[int, int]], axes: Iterable[int] = (1, 2)) -> jax.Array:
  """`x` with pads[i] = (before, after) zeros added on axes[i]: by default NHWC's spatial axes, as ZeroPadding2D."""
  config = [(0, 0, 0)] * x.ndim
  for axis, (lo, hi) in zip(axes, pads):
    config[axis] = (lo, hi, 0)
  return lax.pad(x, np.zeros((), x.dtype), config)


def window_taps(xp: jax.Array, window: Sequence[int], strides: Sequence[int]) -> list[jax.Array]:
  """For each kernel tap (a, b), row-major: the strided slice of padded `xp` that the tap multiplies."""
  (kh, kw), (sh, sw) = window, strides
  n, height, width, c = xp.shape
  out_h, out_w = (height - kh) // sh + 1, (width - kw) // sw + 1
  return [lax.slice(xp, (0, a, b, 0), (n, a + sh * (out_h - 1) + 1, b + sw * (out_w - 1) + 1, c), (1, sh, sw, 1))
          for a in range(kh) for b in range(kw)]


def spread_onto(piece: jax.Array, offset: Sequence[int], strides: Sequence[int], shape: Sequence[int]) -> jax.Array:
  """NHWC `piece` spread onto zeros of spatial `shape`, from `offset` every `strides`: a strided slice's transpose."""
  (r, c), (sh, sw), (rows, cols) = offset, strides, piece.shape[1:3]
  return lax.pad(piece, np.zeros((), piece.dtype), ((0, 0, 0), (r, shape[0] - r - sh * (rows - 1) - 1, sh - 1),
                                                    (c, shape[1] - c - sw * (cols - 1) - 1, sw - 1), (0, 0, 0)))


def divisors(n: int) -> list[int]:
  """The divisors of `n`, ascending: the block sizes that split a batch (or rows) into equal blocks."""
  return [d for d in range(1, n + 1) if n % d == 0]
