"""Keras -> Flax weight conversion by layer name, strict about every leaf."""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from covid_jax import models
from covid_jax.port import weight_files
from covid_jax.port.convert import layer_variables, short_weight_name

# Any legal input size: the backbones' variable shapes do not depend on it.
_SHAPE_PROBE_SIZE = 64

Variables = dict[str, Any]


def from_keras(keras_model: Any, name: str, **overrides: Any) -> Variables:
  """Variables {'params', 'batch_stats'} of backbone `name` from a Keras model's layers.

  `overrides` are the same as for `models.create_backbone` (needed for the generic
  'nasnet'). Raises ValueError naming any missing, extra or mis-shaped leaf.
  """
  layers = {
      layer.name: {short_weight_name(w.name): np.asarray(v) for w, v in zip(layer.weights, layer.get_weights())}
      for layer in keras_model.layers
      if layer.weights
  }
  return _assemble(layers, name, overrides, source=f'Keras model {keras_model.name!r}')


def from_h5(path: str, name: str, keras3_table: weight_files.Keras3Table | None = None,
            **overrides: Any) -> Variables:
  """Like `from_keras`, from a legacy Keras `.h5` (as keras.applications downloads) or a Keras 3 `.weights.h5`.

  The format comes from the file's structure. A legacy file names each weight; a Keras 3 file stores
  them unnamed, in groups that Keras maps to layers by class and position, which `keras3_table`
  (`keras_models.keras3_table` of the Keras model) resolves. None builds the keras.applications model
  to get it (importing Keras); pass it where that model is at hand.
  """
  if weight_files.file_format(path) == weight_files.LEGACY:
    layers = weight_files.read_legacy(path)
  else:
    if keras3_table is None:
      from covid_jax.port import keras_models  # Imports Keras, which only this format needs.
      keras3_table = keras_models.keras3_table(keras_models.keras_backbone(name, seed=None, **overrides))
    layers = weight_files.read_keras3(path, keras3_table, skip=models.get_spec(name).keras_top_layers)
  return _assemble(layers, name, overrides, source=f'file {path}')


def expected_shapes(name: str, **overrides: Any) -> Variables:
  """The backbone's variable tree as ShapeDtypeStructs (no computation)."""
  backbone = models.create_backbone(name, **overrides)
  x = jnp.zeros((1, _SHAPE_PROBE_SIZE, _SHAPE_PROBE_SIZE, 3), jnp.float32)
  return jax.eval_shape(lambda: backbone.init(jax.random.key(0), x, train=False))


def _assemble(layers: Mapping[str, Mapping[str, np.ndarray]], name: str, overrides: Mapping[str, Any],
              source: str) -> Variables:
  skip = set(models.get_spec(name).keras_top_layers)  # A model built with include_top=True ports too.
  variables: Variables = {}
  for layer_name, weights in layers.items():
    if layer_name in skip:
      continue
    try:
      converted = layer_variables(weights)
    except ValueError as e:
      raise ValueError(f'{source}: layer {layer_name!r}: {e}') from None
    for collection, tree in converted.items():
      variables.setdefault(collection, {})[layer_name] = tree
  check_matches(variables, expected_shapes(name, **overrides), source)
  return jax.tree.map(jnp.asarray, variables)


def check_matches(got: Variables, want: Variables, source: str) -> None:
  """Raises naming every leaf that is missing, extra or of the wrong shape."""
  got_leaves = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(got)}
  want_leaves = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(want)}
  problems = [f'missing {k} (shape {want_leaves[k]})' for k in sorted(want_leaves.keys() - got_leaves.keys())]
  problems += [f'extra {k} (shape {got_leaves[k]})' for k in sorted(got_leaves.keys() - want_leaves.keys())]
  problems += [
      f'wrong shape {k}: {got_leaves[k]} in the source, {want_leaves[k]} expected'
      for k in sorted(got_leaves.keys() & want_leaves.keys())
      if tuple(got_leaves[k]) != tuple(want_leaves[k])
  ]
  if problems:
    shown = '\n  '.join(problems[:20]) + (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else '')
    raise ValueError(f'{source} does not match the Flax backbone:\n  {shown}')

