"""Ports a keras.applications backbone's ImageNet weights to a Flax checkpoint, after checking them.

  python scripts/port_keras_weights.py --model resnet50 --output ported_weights/resnet50
  python scripts/port_keras_weights.py --model vgg16 --keras_weights FILE_notop.h5 --output ported_weights/vgg16
  python scripts/port_keras_weights.py --model resnet50 --keras_weights MINE.weights.h5

Without --keras_weights, Keras downloads the weights, which needs internet. Offline,
download the model's `..._notop.h5` file elsewhere and pass it with --keras_weights.
A Keras 3 `.weights.h5` (what `model.save_weights` writes) of the same Keras model ports too.

Bad arguments are refused (exit status 2) before Keras builds anything.

Before writing anything, the Keras model (loaded the way keras.applications loads
its weights) and the Flax backbone (loaded by layer name) run on the same seeded
random batch; above --tolerance nothing is written and the exit status is 1.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

# Lets the script run from a clone without installing the package.
_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))

import flax  # noqa: E402
import h5py  # noqa: E402
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from covid_jax import models, port  # noqa: E402
from covid_jax.port import store, weight_files  # noqa: E402
from covid_jax.port.keras_models import keras3_table, keras_backbone  # noqa: E402

_CHECK_BATCH = 2
# Backbone module fields that create_backbone sets itself, or that are Flax's.
_NOT_OVERRIDES = ('formulations', 'parent', 'name')
# How a file's name must end for Keras's load_weights (in the self-check) to read its format: it goes by the name.
_KERAS_NAMES = {weight_files.KERAS3: 'in .weights.h5', weight_files.LEGACY: 'in .h5 or .hdf5, not in .weights.h5'}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  """The command line, checked: anything that would fail later exits here with status 2, naming its flag."""
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', required=True, choices=sorted(models.BACKBONES), help='Backbone name.')
  parser.add_argument('--keras_weights', help='Keras weight file of the backbone: legacy .h5 (as keras.applications '
                      'downloads) or Keras 3 .weights.h5; default: let keras.applications download the ImageNet '
                      'weights.')
  parser.add_argument('--output', help='Output directory (default: ported_weights/MODEL).')
  parser.add_argument('--overrides', default='{}', type=_json_object,
                      help='Backbone constructor overrides as JSON, e.g. \'{"num_blocks": 1}\' for --model nasnet.')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='Largest accepted ||flax - keras|| / ||keras|| of the self-check.')
  parser.add_argument('--seed', type=int, default=0, help='Seed of the self-check batch.')
  parser.add_argument('--download_timeout', type=float, default=30.0,
                      help='Seconds a stalled connection may wait while Keras downloads weights.')
  parser.add_argument('--overwrite', action='store_true', help='Replace a port already in --output.')
  args = parser.parse_args(argv)
  args.output = args.output or os.path.join('ported_weights', args.model)
  accepted = sorted(f.name for f in dataclasses.fields(models.get_spec(args.model).module)
                    if f.init and f.name not in _NOT_OVERRIDES)
  unknown = sorted(set(args.overrides) - set(accepted))
  if unknown:
    parser.error(f'argument --overrides: {args.model} takes no {", ".join(map(repr, unknown))}; '
                 f'it takes {", ".join(accepted)}')
  if args.keras_weights and (problem := _weights_problem(args.keras_weights)):
    parser.error(f'argument --keras_weights: {args.keras_weights}: {problem}')
  if problem := _output_problem(args.output, args.overwrite):
    parser.error(f'argument --output: {args.output}: {problem}')
  return args


def _json_object(text: str) -> dict[str, Any]:
  """--overrides as a dict: a JSON object."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise argparse.ArgumentTypeError(f'not JSON ({e}): {text!r}') from None
  if not isinstance(value, dict):
    raise argparse.ArgumentTypeError(f'not a JSON object such as \'{{"num_blocks": 1}}\': {text!r}')
  return value


def _weights_problem(path: str) -> str | None:
  """Why `path` is no weight file this script can port and check, or None."""
  if not os.path.isfile(path):
    return 'no such file'
  if not h5py.is_hdf5(path):
    return 'not an HDF5 file (a legacy Keras .h5 or a Keras 3 .weights.h5)'
  try:
    kind = weight_files.file_format(path)
  except ValueError as e:
    return str(e)
  named_as = (weight_files.KERAS3 if path.endswith('.weights.h5')
              else weight_files.LEGACY if path.endswith(('.h5', '.hdf5')) else None)
  if named_as != kind:
    return f'a {kind} file, which Keras loads only under a name ending {_KERAS_NAMES[kind]}: rename it'
  return None


def _output_problem(output: str, overwrite: bool) -> str | None:
  """Why the port cannot go to `output`, or None."""
  target = existing = os.path.abspath(output)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    return 'is a file' if existing == target else f'is inside {existing}, which is a file'
  if existing == target and os.listdir(target) and not overwrite:
    return 'exists and is not empty; pass --overwrite to replace the port in it'
  return None


def load_from_file(path: str, name: str, overrides: dict[str, Any]) -> tuple[keras.Model, port.Variables, dict]:
  """Flax variables read by layer name, and the Keras model loaded as keras.applications loads the file."""
  model = keras_backbone(name, weights=None, **overrides)
  variables = port.from_h5(path, name, keras3_table=keras3_table(model), **overrides)
  model.load_weights(path)
  with open(path, 'rb') as f:
    sha256 = hashlib.file_digest(f, 'sha256').hexdigest()
  return model, variables, {'source': os.path.abspath(path), 'source_sha256': sha256}


def load_from_download(name: str, overrides: dict[str, Any],
                       timeout: float) -> tuple[keras.Model, port.Variables, dict]:
  """The Keras model with downloaded ImageNet weights, and its Flax variables."""
  socket.setdefaulttimeout(timeout)
  try:
    model = keras_backbone(name, weights='imagenet', **overrides)
  except Exception as e:  # Keras raises a bare Exception when the download fails.
    raise SystemExit(
        f'error: Keras could not get the ImageNet weights of {name}: {e}\n'
        'To port offline, download the `..._notop.h5` file of that URL on a machine with internet, copy it here '
        f'and run:\n  python {sys.argv[0]} --model {name} --keras_weights PATH/TO/FILE_notop.h5') from None
  return model, port.from_keras(model, name, **overrides), {'source': 'keras.applications imagenet download'}


def self_check(model: keras.Model, variables: port.Variables, name: str, overrides: dict[str, Any],
               seed: int) -> float:
  """||flax - keras|| / ||keras|| on a seeded batch of preprocessed random RGB images."""
  size = models.get_spec(name).image_size
  images = np.random.default_rng(seed).uniform(0, 255, (_CHECK_BATCH, size, size, 3)).astype(np.float32)
  x = np.asarray(models.preprocess(name, images))
  want = np.asarray(model(x, training=False), np.float64)
  backbone = models.create_backbone(name, **overrides)
  got = np.asarray(jax.jit(backbone.apply)(variables, x), np.float64)
  if got.shape != want.shape:
    raise SystemExit(f'error: self-check output shapes differ: Flax {got.shape}, Keras {want.shape}')
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _git_commit() -> str | None:
  try:
    return subprocess.run(['git', '-C', str(_REPO), 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  # Full float32 matmuls in both frameworks, so the check measures the port, not TF32.
  jax.config.update('jax_default_matmul_precision', 'highest')
  tf.config.experimental.enable_tensor_float_32_execution(False)

  try:
    if args.keras_weights:
      model, variables, source = load_from_file(args.keras_weights, args.model, args.overrides)
    else:
      model, variables, source = load_from_download(args.model, args.overrides, args.download_timeout)
  except (OSError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  error = self_check(model, variables, args.model, args.overrides, args.seed)
  print(f'self-check: relative error {error:.3g} (tolerance {args.tolerance:g})')
  if not error <= args.tolerance:
    raise SystemExit(f'error: the Flax {args.model} differs from Keras by {error:.3g} > tolerance '
                     f'{args.tolerance:g}; nothing written.')

  info = {
      'model': args.model,
      'overrides': args.overrides,
      'layer_order': [layer.name for layer in model.layers],  # What the fine-tune phase counts trailing layers in.
      **source,
      'self_check': {'relative_error': error, 'tolerance': args.tolerance, 'seed': args.seed,
                     'batch': _CHECK_BATCH, 'image_size': models.get_spec(args.model).image_size},
      'versions': {'keras': keras.__version__, 'tensorflow': tf.__version__, 'jax': jax.__version__,
                   'flax': flax.__version__, 'covid_jax_commit': _git_commit()},
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  store.save_ported(args.output, variables, info)
  print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
