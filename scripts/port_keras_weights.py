"""Ports a keras.applications backbone's ImageNet weights to a Flax checkpoint, after checking them.

  python scripts/port_keras_weights.py --model resnet50 --output ported_weights/resnet50
  python scripts/port_keras_weights.py --model vgg16 --keras_weights FILE_notop.h5 --output ported_weights/vgg16

Without --keras_weights, Keras downloads the weights, which needs internet. Offline,
download the model's `..._notop.h5` file elsewhere and pass it with --keras_weights.

Before writing anything, the Keras model (loaded the way keras.applications loads
its weights) and the Flax backbone (loaded by layer name) run on the same seeded
random batch; above --tolerance nothing is written and the exit status is 1.
"""

import argparse
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
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from covid_jax import models, port  # noqa: E402
from covid_jax.port import store  # noqa: E402
from covid_jax.port.keras_models import keras_backbone  # noqa: E402

_CHECK_BATCH = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--model', required=True, choices=sorted(models.BACKBONES), help='Backbone name.')
  parser.add_argument('--keras_weights', help='Legacy Keras .h5 weight file (include_top=False); '
                      'default: let keras.applications download the ImageNet weights.')
  parser.add_argument('--output', help='Output directory (default: ported_weights/MODEL).')
  parser.add_argument('--overrides', default='{}', type=json.loads,
                      help='Backbone constructor overrides as JSON, e.g. \'{"num_blocks": 1}\' for --model nasnet.')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='Largest accepted ||flax - keras|| / ||keras|| of the self-check.')
  parser.add_argument('--seed', type=int, default=0, help='Seed of the self-check batch.')
  parser.add_argument('--download_timeout', type=float, default=30.0,
                      help='Seconds a stalled connection may wait while Keras downloads weights.')
  parser.add_argument('--overwrite', action='store_true', help='Replace a port already in --output.')
  args = parser.parse_args(argv)
  args.output = args.output or os.path.join('ported_weights', args.model)
  return args


def load_from_file(path: str, name: str, overrides: dict[str, Any]) -> tuple[keras.Model, port.Variables, dict]:
  """Flax variables read by layer name, and the Keras model loaded as keras.applications loads the file."""
  variables = port.from_h5(path, name, **overrides)
  model = keras_backbone(name, weights=None, **overrides)
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
  if os.path.exists(args.output) and (not os.path.isdir(args.output) or os.listdir(args.output)):
    if not args.overwrite:
      raise SystemExit(f'error: {args.output} exists and is not empty; pass --overwrite to replace the port in it.')
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
