"""The name -> backbone table: one row per backbone, so nothing else branches on names."""

import dataclasses
from typing import Any

import flax.linen as nn

from covid_jax.models import formulations as _formulations
from covid_jax.models import nasnet, resnet, vgg
from covid_jax.models.formulations import Formulations

# The generic Keras NASNet builder's size arguments, which the Flax NASNet takes under the same names.
_NASNET_SIZES = ('penultimate_filters', 'num_blocks', 'stem_block_filters', 'skip_reduction', 'filter_multiplier')
# What config.model.nasnet may set on any NASNet row: the sizes, and how the cells compile.
_NASNET_EXTRA_ARGS = (*_NASNET_SIZES, 'remat', 'scan_cells')


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """How to build one backbone, what its Keras counterpart is, and what a config may change in it."""

  module: type[nn.Module]
  defaults: dict[str, Any]  # Constructor arguments of the preset.
  preprocessing: str  # Keras preprocess_input mode: 'caffe' or 'tf'.
  image_size: int  # Keras's default input size for ImageNet weights.
  # The Keras module that holds the builder and the preprocess_input going with the weights (the generic
  # NASNet builder is only in keras.src), and the builder's name in it.
  keras_module: str
  keras_application: str
  # Keras layers of the ImageNet classifier top, not the backbone: the port skips them.
  keras_top_layers: tuple[str, ...]
  has_batch_norm: bool
  # config.model.<config_group>'s non-None keys become constructor arguments, from `extra_args`.
  config_group: str | None = None
  extra_args: tuple[str, ...] = ()
  # Backbone arguments the Keras builder takes as well (from `defaults` and overrides), and fixed builder
  # arguments besides (the generic NASNet's default_size picks its ImageNet weight file).
  keras_generic_args: tuple[str, ...] = ()
  keras_fixed_args: dict[str, Any] = dataclasses.field(default_factory=dict)
  # Grad-CAM's feature layer (Keras name), and the Keras name of the backbone's output, where a map taken at
  # `output_layer` needs no hook inside the backbone (NASNet's output, the ReLU after its last cell, is unnamed
  # in Keras: 'last_cell'). Another layer is a submodule of the backbone, named as in Keras.
  gradcam_layer: str = ''
  output_layer: str = ''
  # Keras fuses into each convolution the ReLU that the Flax model applies after it, so a map taken at a
  # convolution is taken after its ReLU (VGG16).
  fused_relu: bool = False


_NASNET_GRADCAM = {'gradcam_layer': 'last_cell', 'output_layer': 'last_cell'}

BACKBONES: dict[str, BackboneSpec] = {
    'vgg16': BackboneSpec(
        vgg.VGG16, {}, 'caffe', 224, 'keras.applications.vgg16', 'VGG16',
        keras_top_layers=('fc1', 'fc2', 'predictions'), has_batch_norm=False,
        gradcam_layer='block5_conv3', output_layer='block5_pool', fused_relu=True),
    'resnet50': BackboneSpec(
        resnet.ResNet50, {}, 'caffe', 224, 'keras.applications.resnet50', 'ResNet50',
        keras_top_layers=('predictions',), has_batch_norm=True,
        gradcam_layer='conv5_block3_out', output_layer='conv5_block3_out'),
    'nasnet_large': BackboneSpec(
        nasnet.NASNet, nasnet.LARGE, 'tf', 331, 'keras.applications.nasnet', 'NASNetLarge',
        keras_top_layers=('predictions',), has_batch_norm=True, config_group='nasnet', extra_args=_NASNET_EXTRA_ARGS,
        **_NASNET_GRADCAM),
    'nasnet_mobile': BackboneSpec(
        nasnet.NASNet, nasnet.MOBILE, 'tf', 224, 'keras.applications.nasnet', 'NASNetMobile',
        keras_top_layers=('predictions',), has_batch_norm=True, config_group='nasnet', extra_args=_NASNET_EXTRA_ARGS,
        **_NASNET_GRADCAM),
    'nasnet': BackboneSpec(
        nasnet.NASNet, nasnet.LARGE, 'tf', 331, 'keras.src.applications.nasnet', 'NASNet',
        keras_top_layers=('predictions',), has_batch_norm=True, config_group='nasnet', extra_args=_NASNET_EXTRA_ARGS,
        keras_generic_args=_NASNET_SIZES, keras_fixed_args={'default_size': 331}, **_NASNET_GRADCAM),
}


def get_spec(name: str) -> BackboneSpec:
  """Returns the row for `name`, or raises naming the known backbones."""
  try:
    return BACKBONES[name]
  except KeyError:
    raise ValueError(f'Unknown backbone {name!r}; known: {sorted(BACKBONES)}') from None


def create_backbone(name: str, formulations: Formulations | None = None, **overrides: Any) -> nn.Module:
  """Builds backbone `name`; `overrides` replace its constructor defaults (e.g. NASNet sizes, dtype).

  `formulations` says how its ops are written; None takes the default backend's (formulations.py).
  """
  spec = get_spec(name)
  chosen = _formulations.for_default_backend() if formulations is None else formulations
  return spec.module(**{**spec.defaults, **overrides, 'formulations': chosen})
