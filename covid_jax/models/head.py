"""The study's classifier head on pooled backbone features."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from covid_jax.models.batch_norm import BatchNorm

# Keras BatchNormalization defaults, which the study's head used.
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
FIRST_DENSE = 'dense_0'  # Carries the study's L1L2 regulariser.


class Head(nn.Module):
  """BN -> [Dense (ReLU) -> BN -> Dropout]* -> Dense 2, as the notebook built it.

  With the default dims (512, 256) this is BN -> Dense 512 -> BN -> Dropout ->
  Dense 256 -> BN -> Dense 2: dropout follows every hidden layer but the last.
  """

  dims: Sequence[int] = (512, 256)
  dropout: float = 0.2
  batch_norm: bool = True
  num_classes: int = 2
  dtype: Any = jnp.float32
  axis_name: str | None = None  # Synchronises BN batch statistics across devices.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    def norm(name: str, y: jax.Array) -> jax.Array:
      if not self.batch_norm:
        return y
      return BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       dtype=self.dtype, axis_name=self.axis_name, name=name)(y)

    x = norm('input_bn', x)
    for i, width in enumerate(self.dims):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f'dense_{i}')(x))
      x = norm(f'bn_{i}', x)
      if i < len(self.dims) - 1:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='logits')(x)
