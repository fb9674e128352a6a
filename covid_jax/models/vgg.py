"""VGG16 without its classifier top, layer for layer as keras.applications.VGG16 builds it."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from covid_jax.models.conv import Conv
from covid_jax.models.formulations import ACCELERATOR, Formulations
from covid_jax.models.pooling import max_pool

# (filters, convolutions) of each block; every block ends in a 2x2 max pool.
BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


class VGG16(nn.Module):
  """Keras VGG16 with include_top=False: returns the `block5_pool` feature map.

  Submodules carry the Keras layer names (`block{b}_conv{i}`) so the weight port
  is the identity map on names.
  """

  formulations: Formulations = ACCELERATOR  # How each op is written; create_backbone passes the backend's.
  dtype: Any = jnp.float32  # Computation dtype; parameters stay float32.
  axis_name: str | None = None  # Accepted for a uniform backbone interface; VGG16 has no BatchNorm.

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # VGG16 has no layer that behaves differently in training.
    for b, (filters, convs) in enumerate(BLOCKS, start=1):
      for i in range(1, convs + 1):
        x = Conv(filters, (3, 3), padding='SAME', formulation=self.formulations.conv, dtype=self.dtype,
                 name=f'block{b}_conv{i}')(x)
        x = nn.relu(x)
      x = max_pool(x, 2, 2, self.formulations.pooling)
    return x
