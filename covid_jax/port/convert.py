"""Keras layer weights -> Flax variables.

Flax submodules carry their Keras layer's name, so a layer converts on its own:
its weights, keyed by their short Keras names, decide the Flax leaves.
"""

import re
from collections.abc import Mapping

import numpy as np

# Keras weight name -> (Flax collection, path inside the module).
_LEAVES = {
    'kernel': ('params', ('kernel',)),
    'bias': ('params', ('bias',)),
    'gamma': ('params', ('scale',)),
    'beta': ('params', ('bias',)),
    'moving_mean': ('batch_stats', ('mean',)),
    'moving_variance': ('batch_stats', ('var',)),
    'pointwise_kernel': ('params', ('pointwise', 'kernel')),
}


# Keras 1 weight names ('block1_conv1_W_1:0'), still in the VGG16 files keras.applications downloads.
_KERAS1_NAME = re.compile(r'_(W|b)(_\d+)?$')
_KERAS1_LEAVES = {'W': 'kernel', 'b': 'bias'}


def short_weight_name(name: str) -> str:
  """'block1_conv1/kernel:0', 'a/b/kernel' or Keras 1's 'block1_conv1_W_1:0' -> 'kernel'."""
  short = name.split('/')[-1].split(':')[0]
  keras1 = _KERAS1_NAME.search(short)
  return _KERAS1_LEAVES[keras1.group(1)] if keras1 else short


def depthwise_to_grouped(kernel: np.ndarray) -> np.ndarray:
  """Keras depthwise kernel (h, w, C, mult) -> grouped-conv kernel (h, w, 1, C * mult)."""
  h, w, c, mult = kernel.shape
  return kernel.reshape(h, w, 1, c * mult)


def layer_variables(weights: Mapping[str, np.ndarray]) -> dict[str, dict]:
  """One Keras layer's weights -> {'params': {...}, 'batch_stats': {...}} for its Flax module.

  A depthwise kernel goes to `depthwise/kernel` beside a pointwise kernel
  (SeparableConv2D) and to `kernel` on its own (DepthwiseConv2D).
  """
  out: dict[str, dict] = {}
  for name, value in weights.items():
    value = np.asarray(value)
    if name == 'depthwise_kernel':
      path = ('depthwise', 'kernel') if 'pointwise_kernel' in weights else ('kernel',)
      collection, value = 'params', depthwise_to_grouped(value)
    elif name in _LEAVES:
      collection, path = _LEAVES[name]
    else:
      raise ValueError(f'Unknown Keras weight {name!r}; known: {sorted(_LEAVES)} and depthwise_kernel')
    node = out.setdefault(collection, {})
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out
