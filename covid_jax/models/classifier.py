"""preprocess -> backbone -> pooling -> head -> 2 logits: the whole trained model."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from covid_jax.models.head import Head
from covid_jax.models.preprocessing import model_input

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
  backbone_name: str  # Selects the backbone's input scaling.
  head: Head
  pooling: str = 'avg'
  dtype: Any = jnp.float32
  preprocessing: str = 'keras'  # keras (each backbone's own) | notebook (the study's): models.preprocessing.

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False, backbone_train: bool = False,
               frozen_backbone: bool = False) -> jax.Array:
    """`backbone_train` runs the backbone's BN on batch statistics; `frozen_backbone` cuts its gradient."""
    return self.classify(self.pooled_features(images, backbone_train, frozen_backbone), train=train)

  def pooled_features(self, images: jax.Array, backbone_train: bool = False,
                      frozen_backbone: bool = False) -> jax.Array:
    """The head's input: the pooled backbone features. A frozen backbone in inference mode fixes them per image,
    so phase 'head' can compute them once (covid_jax/head_features.py)."""
    x = model_input(self.preprocessing, self.backbone_name, images).astype(self.dtype)
    x = self.backbone(x, train=backbone_train)
    if frozen_backbone:
      x = jax.lax.stop_gradient(x)
    return _POOLING[self.pooling](x)

  def classify(self, features: jax.Array, train: bool = False) -> jax.Array:
    """The head on pooled features -> float32 logits."""
    return self.head(features, train=train).astype(jnp.float32)

  def keras_head_layers(self) -> list[str]:
    """The Keras layers that follow the backbone in the study's model, in `model.layers` order, named here.

    One pooling layer (GlobalAveragePooling2D, GlobalMaxPooling2D or Flatten), then the head's BatchNormalization,
    Dense and Dropout layers (Dense 2 with its softmax is one layer): what `model.layers[-N:]` counts after the
    backbone. The names are the head's module names under 'head/', so none is a backbone layer's.
    """
    head = self.head
    norm = lambda name: [f'head/{name}'] if head.batch_norm else []
    layers = ['head/pooling', *norm('input_bn')]
    for i in range(len(head.dims)):
      layers += [f'head/dense_{i}', *norm(f'bn_{i}')]
      if i < len(head.dims) - 1:
        layers.append(f'head/dropout_{i}')
    return [*layers, 'head/logits']
