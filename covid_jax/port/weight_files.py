"""Keras weight files in either layout Keras writes, read into {layer name: {short weight name: array}}.

Legacy `.h5` (keras.applications' downloads, Keras 2's `save_weights`): a group per layer, named after
the layer, whose `weight_names` attribute names its datasets.

Keras 3 `.weights.h5` (`model.save_weights`): a group `layers/<class>[_<k>]/vars` per layer of
`model.layers`, named after the layer's class in snake case and numbered from the class's second
layer on, holding the layer's variables as datasets `0`, `1`, ... in `layer.weights` order and (after
Keras 3.0) the layer's name in the attribute `name`. Keras loads a layer from the group that its class
and position give, so naming the datasets takes the Keras model's `Keras3Table`.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from covid_jax.port.convert import short_weight_name

LEGACY = 'legacy .h5'
KERAS3 = 'Keras 3 .weights.h5'
# Keras 2.13-2.15 wrote the Keras 3 layout under the second name, which Keras 3 still reads.
_KERAS3_ROOTS = ('layers', '_layer_checkpoint_dependencies')

Layers = dict[str, dict[str, np.ndarray]]
# Group of a Keras 3 file ('conv2d_3') -> (the Keras layer it loads into, that layer's short weight names in order).
Keras3Table = Mapping[str, tuple[str, Sequence[str]]]


def file_format(path: str) -> str:
  """LEGACY or KERAS3, from the file's structure (not its name).

  Raises ValueError naming the file and what it holds if it is neither, OSError if it is no HDF5 file.
  """
  with h5py.File(path, 'r') as f:
    if 'layer_names' in _legacy_root(f).attrs:
      return LEGACY
    if _keras3_root(f) is not None:
      return KERAS3
    raise ValueError(f'{path} is neither a legacy Keras .h5 weight file (no layer_names attribute) nor a Keras 3 '
                     f'.weights.h5 file (no layers group); its top level holds {sorted(f)} with attributes '
                     f'{sorted(f.attrs)}')


def read_legacy(path: str) -> Layers:
  """The layers of a legacy file, each weight by the name the file gives it."""
  layers = {}
  with h5py.File(path, 'r') as f:
    root = _legacy_root(f)
    for layer_name in root.attrs['layer_names']:
      group = root[_text(layer_name)]
      weight_names = [_text(w) for w in group.attrs.get('weight_names', [])]
      if weight_names:
        layers[_text(layer_name)] = {short_weight_name(w): np.asarray(group[w]) for w in weight_names}
  return layers


def read_keras3(path: str, table: Keras3Table, skip: Sequence[str] = ()) -> Layers:
  """The layers of a Keras 3 file, each group read as the layer Keras loads it into, per `table`.

  A group whose stored layer name differs from that layer is refused (Keras would load the weights into
  another layer than they came from), and so is a group `table` lacks, unless its stored name is in `skip`.
  """
  layers = {}
  with h5py.File(path, 'r') as f:
    for key, group in _keras3_root(f).items():
      stored = group.get('vars')
      if stored is None or not len(stored):
        continue  # A layer without weights.
      stored_name = _text(stored.attrs['name']) if 'name' in stored.attrs else None
      if key not in table:
        if stored_name in skip:
          continue
        raise ValueError(f'{path}: {stored.name} (layer {stored_name!r}) is no layer of the Keras model')
      layer_name, weight_names = table[key]
      if stored_name not in (None, layer_name):
        raise ValueError(f'{path}: {stored.name} holds layer {stored_name!r}, but Keras loads it into layer '
                         f'{layer_name!r}: the file is of another model or layer order')
      if len(stored) != len(weight_names):
        raise ValueError(f'{path}: {stored.name} holds {len(stored)} weights, Keras layer {layer_name!r} has '
                         f'{len(weight_names)} ({", ".join(weight_names)})')
      layers[layer_name] = {w: np.asarray(stored[str(i)]) for i, w in enumerate(weight_names)}
  return layers


def _legacy_root(f: h5py.File) -> h5py.Group:
  return f['model_weights'] if 'model_weights' in f else f  # A whole-model .h5 keeps its weights in a group.


def _keras3_root(f: h5py.File) -> h5py.Group | None:
  return next((f[key] for key in _KERAS3_ROOTS if isinstance(f.get(key), h5py.Group)), None)


def _text(value: Any) -> str:
  return value.decode('utf8') if isinstance(value, bytes) else str(value)
