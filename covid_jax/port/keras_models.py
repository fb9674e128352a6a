"""The keras.applications side of each backbone, by our backbone names.

One builder for the port script, the equivalence tests and the benchmark, so
all three compare against the same Keras model. Importing this module imports
Keras (and its backend); the rest of covid_jax.port does not.
"""

import collections
import importlib
from types import ModuleType
from typing import Any

import h5py
import keras
from keras.src.legacy.saving import legacy_h5_format
from keras.src.utils import naming

from covid_jax import models
from covid_jax.port.convert import short_weight_name


def keras_backbone(name: str, input_shape: tuple[int, int, int] | None = None, weights: str | None = None,
                   seed: int | None = 0, include_top: bool = False, **overrides: Any) -> keras.Model:
  """keras.applications model of backbone `name`, by default with include_top=False.

  `input_shape` defaults to the backbone's ImageNet size. The initial weights
  come from `seed` (None: the global Keras RNG), not from whatever the global
  RNG holds after earlier work, so results do not depend on what ran before.
  `overrides` reach the Keras builder where it takes them (the registry's
  keras_generic_args: the generic NASNet's sizes).
  """
  if seed is not None:
    keras.utils.set_random_seed(seed)
  spec = models.get_spec(name)
  input_shape = input_shape or (spec.image_size, spec.image_size, 3)
  args = {k: v for k, v in {**spec.defaults, **overrides}.items() if k in spec.keras_generic_args}
  builder = getattr(keras_module(name), spec.keras_application)
  return builder(include_top=include_top, weights=weights, input_shape=input_shape, **spec.keras_fixed_args, **args)


def keras_module(name: str) -> ModuleType:
  """The Keras module of backbone `name`: its builder, and the `preprocess_input` that goes with its weights."""
  return importlib.import_module(models.get_spec(name).keras_module)


def layer_order(name: str, input_shape: tuple[int, int, int] | None = None, **overrides: Any) -> list[str]:
  """Backbone `name`'s layer names in Keras's `model.layers` order: by depth in the graph, ties in graph order.

  That is the order in which Keras code such as `model.layers[-54:]` counts layers. The model is built
  with random weights, without touching the global random seed.
  """
  return [layer.name for layer in keras_backbone(name, input_shape, seed=None, **overrides).layers]


def keras3_table(model: keras.Model) -> dict[str, tuple[str, list[str]]]:
  """Where a Keras 3 `.weights.h5` holds each layer of `model`: group -> (layer name, short weight names in order).

  Mirrors Keras's saving_lib, which stores `model.layers` by class in snake case, numbered `_1`, `_2`, ...
  from a class's second layer on, and each layer's variables in `layer.weights` order.
  """
  table, seen = {}, collections.Counter()
  for layer in model.layers:
    kind = naming.to_snake_case(type(layer).__name__)
    group = f'{kind}_{seen[kind]}' if seen[kind] else kind
    table[group] = (layer.name, [short_weight_name(w.name) for w in layer.weights])
    seen[kind] += 1
  return table


def save_legacy_h5(model: keras.Model, path: str) -> None:
  """Writes `model`'s weights in the legacy .h5 layout that keras.applications downloads."""
  with h5py.File(path, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
