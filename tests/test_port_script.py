"""scripts/port_keras_weights.py end to end, in a subprocess as users run it."""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from covid_jax import port
from covid_jax.port import store
from covid_jax.port.keras_models import keras_backbone, save_legacy_h5
from tests.keras_reference import randomize_batch_norm
from tests.test_port import assert_same_variables

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'port_keras_weights.py'


def run_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                        env={**os.environ, **(env or {})})


@pytest.fixture(scope='module')
def resnet_h5(tmp_path_factory):
  """A legacy .h5 of a random-weight ResNet50 with random BN statistics, as keras.applications ships it."""
  model = keras_backbone('resnet50', (224, 224, 3))
  randomize_batch_norm(model, seed=4)
  path = tmp_path_factory.mktemp('h5') / 'resnet50_notop.h5'
  save_legacy_h5(model, path)
  return path


def test_writes_a_checked_port(resnet_h5, tmp_path):
  out = tmp_path / 'ported'
  result = run_script('--model', 'resnet50', '--keras_weights', str(resnet_h5), '--output', str(out))
  assert result.returncode == 0, result.stderr
  info = json.loads((out / 'port_info.json').read_text())
  assert info['model'] == 'resnet50' and info['overrides'] == {}
  # Keras's model.layers order; layers without weights (the input) are named per process, so compare the others.
  keras_layers = keras_backbone('resnet50', (224, 224, 3)).layers
  weighted = [layer.name for layer in keras_layers if layer.weights]
  assert len(info['layer_order']) == len(keras_layers)
  assert [name for name in info['layer_order'] if name in set(weighted)] == weighted
  assert info['source_sha256'] == hashlib.sha256(resnet_h5.read_bytes()).hexdigest()
  assert info['self_check']['relative_error'] <= info['self_check']['tolerance'] == 1e-4
  assert_same_variables(store.load_ported(str(out), 'resnet50'), port.from_h5(str(resnet_h5), 'resnet50'))

  again = run_script('--model', 'resnet50', '--keras_weights', str(resnet_h5), '--output', str(out))
  assert again.returncode != 0 and '--overwrite' in again.stderr


def test_refuses_weights_keras_reads_differently(resnet_h5, tmp_path):
  """Two same-shaped layers listed in swapped order: Keras loads by position, the port by name."""
  path = tmp_path / 'swapped.h5'
  path.write_bytes(resnet_h5.read_bytes())
  with h5py.File(path, 'r+') as f:
    names = list(f.attrs['layer_names'])
    i, j = names.index('conv4_block2_2_conv'), names.index('conv4_block3_2_conv')
    names[i], names[j] = names[j], names[i]
    f.attrs['layer_names'] = names
  out = tmp_path / 'ported'
  result = run_script('--model', 'resnet50', '--keras_weights', str(path), '--output', str(out))
  assert result.returncode != 0
  assert 'nothing written' in result.stderr
  assert not out.exists()


def test_offline_download_fails_fast_and_says_what_to_do(tmp_path):
  """A proxy that accepts connections and never answers: without a timeout the download would hang."""
  with socket.socket() as silent:
    silent.bind(('127.0.0.1', 0))
    silent.listen()
    proxy = f'http://127.0.0.1:{silent.getsockname()[1]}'
    env = {'KERAS_HOME': str(tmp_path / 'keras'), 'HTTPS_PROXY': proxy, 'https_proxy': proxy,
           'HTTP_PROXY': proxy, 'http_proxy': proxy}
    out = tmp_path / 'ported'
    result = run_script('--model', 'vgg16', '--output', str(out), '--download_timeout', '2', env=env)
  assert result.returncode != 0
  assert '--keras_weights' in result.stderr and 'notop.h5' in result.stderr
  assert not out.exists()
