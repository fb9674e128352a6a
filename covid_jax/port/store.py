"""Ported backbone weights on disk: an Orbax checkpoint of the variables plus `port_info.json`.

The port script writes them once per backbone; training restores them with
`load_ported`, which is as strict about every leaf as the port itself. The
JSON also holds the Keras model's layer order (`layer_order`), which the study's
fine-tune phase counts its trailing layers in, so training need not build the
Keras model to learn it.
"""

import json
import os
from typing import Any

import orbax.checkpoint as ocp

from covid_jax import port

VARIABLES_DIR = 'variables'
INFO_FILE = 'port_info.json'


class PortedWeightsError(ValueError):
  """A ported-weights directory that cannot be read; the message names the file and how to port again."""


def save_ported(directory: str, variables: port.Variables, info: dict[str, Any]) -> None:
  """Writes `variables` under `directory`/variables and `info` to `directory`/port_info.json.

  The JSON is written last, so a directory holding it holds a complete port.
  Existing files of a previous port in `directory` are replaced.
  """
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, VARIABLES_DIR), variables, force=True)
  with open(os.path.join(directory, INFO_FILE), 'w') as f:
    json.dump(info, f, indent=2, sort_keys=True)


def load_ported(directory: str, name: str, **overrides: Any) -> port.Variables:
  """Restores the variables `save_ported` wrote for backbone `name` (with constructor `overrides`).

  Raises FileNotFoundError (saying how to port) if there is no checkpoint, and
  ValueError naming every missing, extra or mis-shaped leaf, or what makes the checkpoint unreadable.
  """
  path = os.path.join(os.path.abspath(directory), VARIABLES_DIR)
  how_to_port = f'python scripts/port_keras_weights.py --model {name} --output {directory}'
  if not os.path.isdir(path):
    raise FileNotFoundError(f'No ported {name} weights at {path}. Port them first with: {how_to_port}')
  want = port.expected_shapes(name, **overrides)
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      metadata = checkpointer.metadata(path).item_metadata
    except Exception as e:  # Orbax raises many types for a folder that is not its checkpoint.
      metadata, reason = None, f'{type(e).__name__}: {e}'
    else:
      reason = 'no Orbax checkpoint metadata'
    if metadata is None:
      raise PortedWeightsError(f'{path} is not a checkpoint of ported weights ({reason}). Port them again with: '
                       f'{how_to_port}')
    port.check_matches(metadata.tree, want, source=f'ported checkpoint {path}')
    return checkpointer.restore(path, want)


def load_layer_order(directory: str) -> list[str] | None:
  """The Keras `model.layers` names `port_info.json` in `directory` records, or None if it predates them."""
  path = os.path.join(os.path.abspath(directory), INFO_FILE)
  try:
    with open(path) as f:
      info = json.load(f)
    if not isinstance(info, dict):
      raise ValueError(f'holds a {type(info).__name__}, not an object')
  except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError.
    raise PortedWeightsError(f'{path} cannot be read as the port\'s record ({e}); port the weights again') from None
  return info.get('layer_order')
