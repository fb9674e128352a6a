"""The name -> backbone table: one row per backbone, so nothing else branches on names."""

import dataclasses
from typing import Any

import flax.linen as nn

from covid_jax.models import nasnet, resnet, vgg


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build one backbone and what its Keras counterpart expects."""

  module: type[nn.Module]
  defaults: dict[str, Any]
  preprocessing: str  # Keras preprocess_input mode: 'caffe' or 'tf'.
  image_size: int  # Keras's default input size for ImageNet weights.
  keras_application: str  # Name under keras.applications, for the port script and tests.


BACKBONES: dict[str, BackboneSpec] = {
    'vgg16': BackboneSpec(vgg.VGG16, {}, 'caffe', 224, 'VGG16'),
    'resnet50': BackboneSpec(resnet.ResNet50, {}, 'caffe', 224, 'ResNet50'),
    'nasnet_large': BackboneSpec(nasnet.NASNet, nasnet.LARGE, 'tf', 331, 'NASNetLarge'),
    'nasnet_mobile': BackboneSpec(nasnet.NASNet, nasnet.MOBILE, 'tf', 224, 'NASNetMobile'),
    'nasnet': BackboneSpec(nasnet.NASNet, nasnet.LARGE, 'tf', 331, 'NASNet'),
}


def get_spec(name: str) -> BackboneSpec:
  """Returns the row for `name`, or raises naming the known backbones."""
  try:
    return BACKBONES[name]
  except KeyError:
    raise ValueError(f'Unknown backbone {name!r}; known: {sorted(BACKBONES)}') from None


def create_backbone(name: str, **overrides: Any) -> nn.Module:
  """Builds backbone `name`; `overrides` replace its constructor defaults (e.g. NASNet sizes, dtype)."""
  spec = get_spec(name)
  return spec.module(**{**spec.defaults, **overrides})
