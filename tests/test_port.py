"""The Keras -> Flax port: legacy .h5 and Keras 3 .weights.h5 files, strictness about every leaf, the on-disk store."""

import functools
import operator
import shutil
from pathlib import Path

import h5py
import jax
import keras
import numpy as np
import pytest

from covid_jax import models, port
from covid_jax.port import store
from covid_jax.port.keras_models import keras_backbone, save_legacy_h5
from tests.keras_reference import randomize_batch_norm, relative_error
from tests.test_nasnet import SMALL

# Weights do not depend on the input size: a small one keeps the Keras models cheap.
SHAPE = (64, 64, 3)
SMALL_NASNET = dict(SMALL, skip_reduction=False)
FORMATS = ('legacy', 'keras3')
# The Flax leaves that a Keras layer's get_weights() go to, in order; a bias-free layer stops early.
_FLAX_LEAVES = {
    'Conv2D': (('params', 'kernel'), ('params', 'bias')),
    'SeparableConv2D': (('params', 'depthwise', 'kernel'), ('params', 'pointwise', 'kernel'), ('params', 'bias')),
    'BatchNormalization': (('params', 'scale'), ('params', 'bias'), ('batch_stats', 'mean'), ('batch_stats', 'var')),
}


def save_weights(model: keras.Model, directory: Path, fmt: str) -> Path:
  """`model`'s weights as keras.applications ships them ('legacy') or as Keras 3's save_weights writes them."""
  if fmt == 'legacy':
    path = directory / f'{model.name}.h5'
    save_legacy_h5(model, path)
  else:
    path = directory / f'{model.name}.weights.h5'
    model.save_weights(path)
  return path


def assert_equals_keras_weights(variables, model: keras.Model) -> None:
  """Every weight of every layer, as the layer's get_weights() gives it (not through the port), equals its leaf."""
  count = 0
  for layer in model.layers:
    for (collection, *path), want in zip(_FLAX_LEAVES.get(type(layer).__name__, ()), layer.get_weights()):
      got = functools.reduce(operator.getitem, path, variables[collection][layer.name])
      np.testing.assert_array_equal(np.reshape(got, want.shape), want, err_msg=f'{layer.name} {path}')
      count += want.size
  assert count == model.count_params()  # No layer left out.


def assert_same_variables(got, want):
  got_leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(got)}
  want_leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(want)}
  assert got_leaves.keys() == want_leaves.keys()
  for key, value in want_leaves.items():
    assert np.array_equal(got_leaves[key], value), key


@pytest.fixture(scope='module')
def resnet(tmp_path_factory):
  """A random-weight Keras ResNet50 with random BN statistics and its legacy .h5 file."""
  model = keras_backbone('resnet50', SHAPE)
  randomize_batch_norm(model, seed=3)
  path = tmp_path_factory.mktemp('h5') / 'resnet50_notop.h5'
  save_legacy_h5(model, path)
  return model, path


@pytest.fixture(scope='module')
def nasnet():
  """A small random-weight Keras NASNet (conv, separable conv and BN layers) with random BN statistics."""
  model = keras_backbone('nasnet', (32, 32, 3), **SMALL_NASNET)
  randomize_batch_norm(model, seed=5)
  return model


def _edited_copy(source, tmp_path, edit):
  path = tmp_path / 'edited.h5'
  shutil.copy(source, path)
  with h5py.File(path, 'r+') as f:
    edit(f)
  return path


def test_from_h5_equals_from_keras(resnet):
  model, path = resnet
  variables = port.from_h5(str(path), 'resnet50')
  assert_same_variables(variables, port.from_keras(model, 'resnet50'))
  # Against Keras's own weights directly, not only through from_keras.
  layer = model.get_layer('conv4_block3_2_bn')
  gamma, beta, mean, var = layer.get_weights()
  np.testing.assert_array_equal(variables['params']['conv4_block3_2_bn']['scale'], gamma)
  np.testing.assert_array_equal(variables['batch_stats']['conv4_block3_2_bn']['var'], var)


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('name', ('resnet50', 'nasnet'))
def test_from_h5_reads_both_formats(name, fmt, resnet, nasnet, tmp_path):
  model, overrides = (resnet[0], {}) if name == 'resnet50' else (nasnet, SMALL_NASNET)
  assert_equals_keras_weights(port.from_h5(str(save_weights(model, tmp_path, fmt)), name, **overrides), model)


@pytest.mark.parametrize('fmt', FORMATS)
def test_ported_file_computes_what_keras_computes(fmt, nasnet, tmp_path):
  variables = port.from_h5(str(save_weights(nasnet, tmp_path, fmt)), 'nasnet', **SMALL_NASNET)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  got = jax.jit(models.create_backbone('nasnet', **SMALL_NASNET).apply)(variables, x)
  assert relative_error(got, nasnet(x, training=False)) <= 1e-5


def test_from_h5_reads_keras3_files_of_older_versions(resnet, tmp_path):
  """Keras 3.0 stored no layer names, Keras 2.13-2.15 used the root `_layer_checkpoint_dependencies`."""

  def age(f):
    f.move('layers', '_layer_checkpoint_dependencies')
    for group in f['_layer_checkpoint_dependencies'].values():
      del group['vars'].attrs['name']

  path = _edited_copy(save_weights(resnet[0], tmp_path, 'keras3'), tmp_path, age)
  assert_equals_keras_weights(port.from_h5(str(path), 'resnet50'), resnet[0])


def test_from_h5_refuses_a_keras3_layer_keras_loads_elsewhere(resnet, tmp_path):
  """Two same-shaped layers' groups swapped: Keras loads by group path, so each would go into the other."""

  def swap(f):
    path_of = {group['vars'].attrs['name']: path for path, group in f['layers'].items()}
    a, b = (f'layers/{path_of[layer]}' for layer in ('conv4_block2_2_conv', 'conv4_block3_2_conv'))
    f.move(a, 'swapping')
    f.move(b, a)
    f.move('swapping', b)

  path = _edited_copy(save_weights(resnet[0], tmp_path, 'keras3'), tmp_path, swap)
  with pytest.raises(ValueError, match=r"holds layer 'conv4_block[23]_2_conv'.* loads .*'conv4_block[23]_2_conv'"):
    port.from_h5(str(path), 'resnet50')


def test_from_h5_names_a_file_of_neither_format(tmp_path):
  path = tmp_path / 'other.h5'
  with h5py.File(path, 'w') as f:
    f['data'] = np.zeros(3)
  with pytest.raises(ValueError, match=r"other.h5 is neither .*top level holds \['data'\]"):
    port.from_h5(str(path), 'vgg16')


def test_from_h5_reads_keras1_weight_names(tmp_path):
  """The VGG16 file keras.applications downloads still names its weights the Keras 1 way."""
  model = keras_backbone('vgg16', SHAPE)
  path = tmp_path / 'vgg16_keras1.h5'
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = [layer.name.encode() for layer in model.layers]
    for layer in model.layers:
      group = f.create_group(layer.name)
      names = [f'{layer.name}_{short}_1:0' for short in ('W', 'b')][:len(layer.weights)]
      group.attrs['weight_names'] = [n.encode() for n in names]
      for name, value in zip(names, layer.get_weights()):
        group[name] = value
  # Keras itself loads the file (by position), so it is a faithful legacy file.
  reloaded = keras_backbone('vgg16', SHAPE)
  reloaded.load_weights(str(path))
  assert_same_variables(port.from_h5(str(path), 'vgg16'), port.from_keras(reloaded, 'vgg16'))
  assert_same_variables(port.from_h5(str(path), 'vgg16'), port.from_keras(model, 'vgg16'))


def test_from_h5_names_a_missing_layer(resnet, tmp_path):

  def drop_layer(f):
    names = list(f.attrs['layer_names'])
    names.remove('conv3_block2_2_bn')
    f.attrs['layer_names'] = names
    del f['conv3_block2_2_bn']

  with pytest.raises(ValueError, match=r"missing \['batch_stats'\]\['conv3_block2_2_bn'\]\['mean'\]"):
    port.from_h5(str(_edited_copy(resnet[1], tmp_path, drop_layer)), 'resnet50')


def test_from_h5_names_a_wrong_shape(resnet, tmp_path):

  def shrink_kernel(f):
    group = f['conv1_conv']
    del group['conv1_conv/kernel']
    group['conv1_conv/kernel'] = np.zeros((7, 7, 3, 32), np.float32)

  with pytest.raises(ValueError, match=r"wrong shape \['params'\]\['conv1_conv'\]\['kernel'\]: \(7, 7, 3, 32\)"):
    port.from_h5(str(_edited_copy(resnet[1], tmp_path, shrink_kernel)), 'resnet50')


@pytest.mark.parametrize('application, named', [
    ('ResNet50V2', r"missing \['batch_stats'\]\['conv1_bn'\]"),
    ('ResNet101', r"extra \['batch_stats'\]\['conv4_block10_1_bn'\]"),
    ('VGG16', r"missing \['batch_stats'\]\['conv1_bn'\]"),
], ids=('resnet50v2', 'resnet101', 'vgg16'))
def test_from_keras_rejects_another_architecture(application, named):
  model = getattr(keras.applications, application)(include_top=False, weights=None, input_shape=SHAPE)
  with pytest.raises(ValueError, match=named):
    port.from_keras(model, 'resnet50')


def test_store_round_trip(resnet, tmp_path):
  variables = port.from_h5(str(resnet[1]), 'resnet50')
  store.save_ported(str(tmp_path), variables, {'model': 'resnet50'})
  assert_same_variables(store.load_ported(str(tmp_path), 'resnet50'), variables)
  with pytest.raises(ValueError, match=r"missing \['params'\]\['block1_conv1'\]"):
    store.load_ported(str(tmp_path), 'vgg16')


def test_load_ported_says_how_to_port(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r'python scripts/port_keras_weights.py --model vgg16 --output .*nothing_here'):
    store.load_ported(str(tmp_path / 'nothing_here'), 'vgg16')
