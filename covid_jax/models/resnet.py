"""ResNet50 (v1) without its classifier top, layer for layer as keras.applications.ResNet50 builds it.

This is Keras's variant, not torchvision's: the stride sits on the 1x1 convolutions
(`_1_conv`, `_0_conv`), every convolution has a bias, and the stem pads explicitly.
The 1x1 convolutions, two thirds of the model's, are matmuls over channels
(`PointwiseConv`), which XLA:CPU runs faster than convolution ops, forward and backward.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from covid_jax.models.batch_norm import BatchNorm
from covid_jax.models.conv import Conv, PointwiseConv
from covid_jax.models.formulations import ACCELERATOR, Formulations
from covid_jax.models.pooling import max_pool
from covid_jax.models.windows import zero_pad

# (bottleneck filters, blocks, stride of the first block) of stages conv2 .. conv5.
STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))

# Keras BatchNormalization settings of this model.
BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.99


def _block(x: jax.Array, conv: Callable[..., nn.Module], conv1x1: Callable[..., nn.Module],
           norm: Callable[..., nn.Module], filters: int, stride: int, project: bool, name: str) -> jax.Array:
  """Keras `residual_block_v1`: 1x1 (strided) -> 3x3 -> 1x1 bottleneck plus a shortcut."""
  shortcut = x
  if project:
    shortcut = conv1x1(4 * filters, strides=stride, name=f'{name}_0_conv')(x)
    shortcut = norm(name=f'{name}_0_bn')(shortcut)
  x = conv1x1(filters, strides=stride, name=f'{name}_1_conv')(x)
  x = nn.relu(norm(name=f'{name}_1_bn')(x))
  x = conv(filters, (3, 3), padding='SAME', name=f'{name}_2_conv')(x)
  x = nn.relu(norm(name=f'{name}_2_bn')(x))
  x = conv1x1(4 * filters, name=f'{name}_3_conv')(x)
  x = norm(name=f'{name}_3_bn')(x)
  return nn.relu(shortcut + x)


class ResNet50(nn.Module):
  """Keras ResNet50 with include_top=False: returns the `conv5_block3_out` feature map.

  Submodules carry the Keras layer names (`conv1_conv`, `conv{stage}_block{n}_{0..3}_{conv,bn}`)
  so the weight port is the identity map on names.
  """

  formulations: Formulations = ACCELERATOR  # How each op is written; create_backbone passes the backend's.
  dtype: Any = jnp.float32  # Computation dtype; parameters stay float32.
  axis_name: str | None = None  # Device axis over which training-mode BN statistics are averaged.
  bn_momentum: float = BN_MOMENTUM  # Keras's; lower it to train from scratch in few steps.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = functools.partial(Conv, formulation=self.formulations.conv, dtype=self.dtype)
    conv1x1 = functools.partial(PointwiseConv, use_bias=True, formulation=self.formulations.pointwise,
                                dtype=self.dtype)
    norm = functools.partial(
        BatchNorm, use_running_average=not train, momentum=self.bn_momentum, epsilon=BN_EPSILON,
        dtype=self.dtype, axis_name=self.axis_name)
    x = zero_pad(x, ((3, 3), (3, 3)))  # conv1_pad
    x = conv(64, (7, 7), strides=2, padding='VALID', name='conv1_conv')(x)
    x = nn.relu(norm(name='conv1_bn')(x))
    # pool1_pad pads with zeros; after the ReLU that equals padding with -inf.
    x = max_pool(zero_pad(x, ((1, 1), (1, 1))), 3, 2, self.formulations.pooling)
    for stage, (filters, blocks, stride) in enumerate(STAGES, start=2):
      for n in range(1, blocks + 1):
        first = n == 1
        x = _block(x, conv, conv1x1, norm, filters, stride if first else 1, project=first,
                   name=f'conv{stage}_block{n}')
    return x
