"""Every row of the backbone registry against its Keras counterpart, built with random weights at a small size.

For each row: the port takes every Keras weight by layer name, preprocessing is the row's Keras module's
`preprocess_input`, `has_batch_norm` and `keras_top_layers` describe the Keras model, a config group's
`extra_args` are constructor arguments, and the config checks accept the row.
"""

import dataclasses
import functools

import jax
import keras
import numpy as np
import pytest

from configs import default
from covid_jax import config_checks, model_init, models, port
from covid_jax.port.keras_models import keras_backbone, keras_module

ROWS = sorted(models.BACKBONES)
# Keras's smallest input for every backbone: the weights do not depend on the size.
SHAPE = (32, 32, 3)
# The smallest legal NASNet: every row whose Flax backbone takes these sizes is built at them, and so is the
# Keras model of a row whose Keras builder takes them (the generic 'nasnet'; the presets' builders do not).
TINY_NASNET = dict(penultimate_filters=96, num_blocks=1, stem_block_filters=8, skip_reduction=False,
                   filter_multiplier=2)
# NASNetLarge's Keras preset takes no sizes: its smallest model has 85M weights in a thousand layers, and
# building and porting it (twice, with and without its top) would take longer than the rest of this file.
# The generic 'nasnet' row builds the same architecture through the same Keras function, at the tiny size.
KERAS_TOO_COSTLY = {'nasnet_large'}
KERAS_ROWS = [pytest.param(name, marks=pytest.mark.skip(reason='NASNetLarge has no cheap Keras variant'))
              if name in KERAS_TOO_COSTLY else name for name in ROWS]

# Keras weight name -> where the port puts it under the layer's name (DESIGN.md section 5).
FLAX_LEAVES = {
    'kernel': ('params', 'kernel'), 'bias': ('params', 'bias'), 'gamma': ('params', 'scale'),
    'beta': ('params', 'bias'), 'moving_mean': ('batch_stats', 'mean'), 'moving_variance': ('batch_stats', 'var'),
    'depthwise_kernel': ('params', 'depthwise', 'kernel'), 'pointwise_kernel': ('params', 'pointwise', 'kernel'),
}


def _flax_overrides(name: str) -> dict:
  """The tiny NASNet sizes where the row's Flax backbone takes them, else none."""
  return TINY_NASNET if set(TINY_NASNET) <= set(models.get_spec(name).extra_args) else {}


def _keras_overrides(name: str) -> dict:
  """The tiny NASNet sizes where the row's Keras builder takes them too, else none: both sides then agree."""
  return TINY_NASNET if set(TINY_NASNET) <= set(models.get_spec(name).keras_generic_args) else {}


@functools.cache
def _keras_model(name: str, include_top: bool) -> keras.Model:
  """Row `name`'s Keras model at SHAPE, built once per process; do not train it."""
  return keras_backbone(name, SHAPE, include_top=include_top, **_keras_overrides(name))


def _leaf(variables: dict, layer: str, keras_weight: str, separable: bool) -> np.ndarray:
  collection, *path = FLAX_LEAVES[keras_weight]
  if keras_weight == 'depthwise_kernel' and not separable:  # DepthwiseConv2D on its own: its kernel is `kernel`.
    path = ['kernel']
  node = variables[collection][layer]
  for key in path:
    node = node[key]
  return np.asarray(node)


@pytest.mark.parametrize('name', KERAS_ROWS)
def test_port_takes_every_keras_weight_by_layer_name(name):
  model = _keras_model(name, include_top=False)
  variables = port.from_keras(model, name, **_keras_overrides(name))  # Raises on a missing or extra leaf.
  assert sum(leaf.size for leaf in jax.tree.leaves(variables)) == model.count_params()
  for layer in model.layers:
    names = [w.name.split('/')[-1].split(':')[0] for w in layer.weights]
    for weight_name, value in zip(names, layer.get_weights()):
      got = _leaf(variables, layer.name, weight_name, 'pointwise_kernel' in names)
      # A depthwise kernel (h, w, C, multiplier) is stored as a grouped convolution's (h, w, 1, C * multiplier).
      np.testing.assert_array_equal(got, value.reshape(got.shape), err_msg=f'{layer.name}/{weight_name}')


@pytest.mark.parametrize('name', ROWS)
def test_preprocessing_is_the_keras_modules(name):
  rng = np.random.default_rng(0)
  images = np.stack([rng.uniform(lo, hi, (2, 5, 7)) for lo, hi in ((0, 80), (80, 170), (170, 255))], axis=-1)
  images = images.astype(np.float32)
  want = keras_module(name).preprocess_input(images.copy())  # Keras edits float NumPy input in place.
  np.testing.assert_allclose(models.preprocess(name, images), want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize('name', ROWS)
def test_has_batch_norm_agrees_with_the_flax_backbone(name):
  shapes = port.expected_shapes(name, **_flax_overrides(name))
  assert models.get_spec(name).has_batch_norm == bool(shapes.get('batch_stats'))


@pytest.mark.parametrize('name', KERAS_ROWS)
def test_has_batch_norm_agrees_with_keras(name):
  model = _keras_model(name, include_top=False)
  has_batch_norm = any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
  assert models.get_spec(name).has_batch_norm == has_batch_norm


@pytest.mark.parametrize('name', KERAS_ROWS)
def test_keras_top_layers_are_the_weighted_layers_include_top_adds(name):
  # With weights=None Keras builds the top at any fixed input size, so SHAPE serves.
  top, no_top = _keras_model(name, include_top=True), _keras_model(name, include_top=False)
  added = {layer.name for layer in top.layers if layer.weights} - {layer.name for layer in no_top.layers}
  assert set(models.get_spec(name).keras_top_layers) == added
  port.from_keras(top, name, **_keras_overrides(name))  # The port skips the top: no extra leaves.


@pytest.mark.parametrize('name', ROWS)
def test_config_group_arguments_are_constructor_arguments(name):
  spec = models.get_spec(name)
  fields = {field.name: field.default for field in dataclasses.fields(spec.module)}
  assert (spec.config_group is None) == (not spec.extra_args)
  assert set(spec.extra_args) <= fields.keys()
  assert set(spec.defaults) <= fields.keys()
  assert set(spec.keras_generic_args) <= set(spec.extra_args)
  backbone = models.create_backbone(name, **{arg: fields[arg] for arg in spec.extra_args})
  assert all(getattr(backbone, arg) == fields[arg] for arg in spec.extra_args)



@pytest.mark.parametrize('name', ROWS)
def test_config_checks_accept_the_row_and_pass_its_arguments_on(name):
  """configs/default.py names the row's extra arguments; a BN momentum is accepted exactly where it has BatchNorm."""
  spec = models.get_spec(name)
  config = default.get_config()
  config.model.name = name
  config_checks.validate_config(config)
  if spec.config_group:
    assert set(config.model[spec.config_group]) == set(spec.extra_args)
  config.model.bn_momentum = 0.9
  if spec.has_batch_norm:
    config_checks.validate_config(config)
    backbone = models.create_backbone(name, **model_init.backbone_args(config))
    assert backbone.bn_momentum == 0.9
  else:
    with pytest.raises(ValueError, match=f'model.bn_momentum: {name} has no BatchNorm'):
      config_checks.validate_config(config)
