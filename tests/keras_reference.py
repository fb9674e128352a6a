"""Keras reference models for the equivalence tests: the independent truth the ports are held to."""

from typing import Any

import h5py
import keras
import numpy as np
from keras.src.applications import nasnet as keras_nasnet
from keras.src.legacy.saving import legacy_h5_format

from covid_jax import models

# Keras-side names of the generic NASNet builder arguments we expose.
NASNET_ARGS = ('penultimate_filters', 'num_blocks', 'stem_block_filters', 'skip_reduction', 'filter_multiplier')


def keras_backbone(name: str, input_shape: tuple[int, int, int], seed: int = 0, **overrides: Any) -> keras.Model:
  """keras.applications model for backbone `name` with include_top=False and weights=None.

  The initial weights come from `seed`, not from whatever the global Keras RNG
  holds after earlier tests, so each test sees the same model in any order.
  """
  keras.utils.set_random_seed(seed)
  spec = models.get_spec(name)
  if spec.keras_application == 'NASNet':
    args = {k: v for k, v in {**spec.defaults, **overrides}.items() if k in NASNET_ARGS}
    return keras_nasnet.NASNet(input_shape=input_shape, include_top=False, weights=None, **args)
  return getattr(keras.applications, spec.keras_application)(
      include_top=False, weights=None, input_shape=input_shape)


def randomize_batch_norm(model: keras.Model, seed: int = 0) -> None:
  """Random BN moving statistics, gamma and beta: Keras's initial 0/1 hide epsilon and ordering bugs."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([
          rng.uniform(0.5, 1.5, gamma.shape).astype(np.float32),
          rng.normal(0.0, 0.2, beta.shape).astype(np.float32),
          rng.normal(0.0, 0.2, mean.shape).astype(np.float32),
          rng.uniform(0.5, 2.0, var.shape).astype(np.float32),
      ])


def relative_error(got: Any, want: Any) -> float:
  """||got - want|| / ||want||, in float64."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def save_legacy_h5(model: keras.Model, path: str) -> None:
  """Writes `model`'s weights in the legacy .h5 layout that keras.applications downloads."""
  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
