"""scripts/port_keras_weights.py end to end, in a subprocess as users run it."""

import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import keras
import pytest

from covid_jax import port
from covid_jax.port import store
from covid_jax.port.keras_models import keras_backbone, save_legacy_h5
from tests.keras_reference import randomize_batch_norm
from tests.test_port import SMALL_NASNET, assert_equals_keras_weights, assert_same_variables, save_weights

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


def test_ports_a_keras3_weights_file(tmp_path):
  model = keras_backbone('nasnet', (32, 32, 3), **SMALL_NASNET)
  randomize_batch_norm(model, seed=6)
  out = tmp_path / 'ported'
  result = run_script('--model', 'nasnet', '--overrides', json.dumps(SMALL_NASNET),
                      '--keras_weights', str(save_weights(model, tmp_path, 'keras3')), '--output', str(out))
  assert result.returncode == 0, result.stderr
  assert_equals_keras_weights(store.load_ported(str(out), 'nasnet', **SMALL_NASNET), model)


@pytest.fixture(scope='module')
def script():
  """The script as a module, to call its main in this process."""
  spec = importlib.util.spec_from_file_location('port_keras_weights', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def bad_files(tmp_path):
  """Files that are no weight file for --keras_weights, or that are no directory for --output."""
  (tmp_path / 'notes.txt').write_text('not a weight file\n')
  with h5py.File(tmp_path / 'other.h5', 'w') as f:
    f['data'] = [0.0]
  keras3 = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  keras3.save_weights(tmp_path / 'dense.weights.h5')
  (tmp_path / 'dense.weights.h5').rename(tmp_path / 'renamed.h5')
  return tmp_path


# argv -> phrases the error must hold; {tmp} is the bad_files folder.
BAD_ARGS = {
    'unknown override': (['--overrides', '{"foo": 1}'], ['--overrides', "'foo'", 'num_blocks', 'penultimate_filters']),
    'overrides not json': (['--overrides', 'not json'], ['--overrides', 'not JSON']),
    'overrides not an object': (['--overrides', '[1]'], ['--overrides', 'JSON object']),
    'output a file': (['--output', '{tmp}/notes.txt'], ['--output', 'is a file']),
    'output inside a file': (['--output', '{tmp}/notes.txt/ported'], ['--output', 'inside', 'notes.txt']),
    'weights missing': (['--keras_weights', '{tmp}/missing.h5'], ['--keras_weights', 'no such file']),
    'weights not hdf5': (['--keras_weights', '{tmp}/notes.txt'], ['--keras_weights', 'not an HDF5 file']),
    'weights of neither format': (['--keras_weights', '{tmp}/other.h5'], ['--keras_weights', 'neither']),
    'keras3 weights misnamed': (['--keras_weights', '{tmp}/renamed.h5'], ['--keras_weights', '.weights.h5']),
}


@pytest.mark.parametrize('case', BAD_ARGS)
def test_a_bad_argument_fails_before_any_work(case, script, bad_files, monkeypatch, capsys):

  def no_work(*args, **kwargs):
    raise AssertionError('Keras built a model before the arguments were checked')

  monkeypatch.setattr(script, 'keras_backbone', no_work)
  argv, phrases = BAD_ARGS[case]
  with pytest.raises(SystemExit) as exit_:
    script.main(['--model', 'nasnet', '--output', str(bad_files / 'out'),
                 *(arg.replace('{tmp}', str(bad_files)) for arg in argv)])
  stderr = capsys.readouterr().err
  assert exit_.value.code == 2 and 'error: ' in stderr, stderr
  assert all(phrase in stderr for phrase in phrases), stderr
  assert not (bad_files / 'out').exists()


def test_a_bad_argument_exits_with_status_2(tmp_path):
  result = run_script('--model', 'nasnet', '--overrides', '[1]', '--output', str(tmp_path / 'out'))
  assert result.returncode == 2 and 'error: argument --overrides' in result.stderr, result.stderr
  assert 'Traceback' not in result.stderr
