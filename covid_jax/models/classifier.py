"""preprocess -> backbone -> pooling -> head -> 2 logits: the whole trained model."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from covid_jax.models.head import Head
from covid_jax.models.preprocessing import preprocess

_POOLING = {
    'avg': lambda x: x.mean(axis=(1, 2)),
    'max': lambda x: x.max(axis=(1, 2)),
    'flatten': lambda x: x.reshape(x.shape[0], -1),
}


class Classifier(nn.Module):
  """Takes float RGB 0-255 images; returns float32 logits (non-COVID, COVID).

  Variables nest as {'backbone': <Keras layer names>, 'head': ...}, so ported
  backbone weights drop in under 'backbone' unchanged.
  """

  backbone: nn.Module
  backbone_name: str  # Selects the Keras preprocessing.
  head: Head
  pooling: str = 'avg'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, backbone_train: bool = False,
               frozen_backbone: bool = False) -> jax.Array:
    """`backbone_train` runs the backbone's BN on batch statistics; `frozen_backbone` cuts its gradient."""
    x = preprocess(self.backbone_name, images).astype(self.dtype)
    x = self.backbone(x, train=backbone_train)
    if frozen_backbone:
      x = jax.lax.stop_gradient(x)
    x = _POOLING[self.pooling](x)
    return self.head(x, train=train).astype(jnp.float32)
