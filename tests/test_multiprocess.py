"""Two JAX processes on this host train one run: as one process with two devices does, and only process 0 writes.

The processes find each other as on plain hosts, through `--multihost --coordinator_address
--num_processes --process_id`; CPU collectives between the processes go over gloo.

Each process shuffles its own part of the training split, so the batches of two processes are not those of
one (input_pipeline.py). The comparison therefore trains on full batches, one step per epoch, without
augmentation or dropout: every step then sees the same examples, and the runs agree to float rounding.
"""

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import runs

# A hang (a process waiting in a collective for one that died) fails the test after this long: some three
# times what the runs take on two busy cores with a warm compilation cache.
TIMEOUT_S = 300
PROCESSES = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _wait_all(processes: dict[str, subprocess.Popen], logs: dict[str, Path]) -> None:
  """Waits for every process to exit 0; on a failure or the timeout, kills the rest and fails with the logs."""
  deadline = time.monotonic() + TIMEOUT_S
  while any(p.poll() is None for p in processes.values()):
    failed = any(p.returncode not in (None, 0) for p in processes.values())
    if failed or time.monotonic() > deadline:
      break
    time.sleep(1)
  for p in processes.values():
    if p.poll() is None:
      p.kill()
      p.wait()
  if any(p.returncode != 0 for p in processes.values()):
    report = '\n'.join(f'--- {name} (exit {p.returncode}) ---\n{logs[name].read_text()[-3000:]}'
                       for name, p in processes.items())
    pytest.fail(f'a run failed or took over {TIMEOUT_S} s:\n{report}')


def _latest_params(workdir: Path) -> dict[str, Any]:
  """The latest checkpoint's parameters, read onto this process's device whichever devices wrote them."""
  (step,) = [p for p in (workdir / 'checkpoints' / 'latest').iterdir() if p.name.isdigit()]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as checkpointer:
    saved = checkpointer.metadata(step / 'state').item_metadata
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    return jax.device_get(checkpointer.restore(step / 'state', abstract)['params'])


def _test_metrics(workdir: Path) -> dict[str, Any]:
  return json.loads((workdir / 'test_metrics.json').read_text())


def _assert_same_metrics(a: dict[str, Any], b: dict[str, Any]) -> None:
  assert a['confusion_matrix'] == b['confusion_matrix'] and a['split_sizes'] == b['split_sizes']
  for key in ('accuracy', 'roc_auc', 'balanced_accuracy'):
    assert a[key] == pytest.approx(b[key], rel=1e-5), key
  for key, interval in a['ci95'].items():
    assert interval == pytest.approx(b['ci95'][key], rel=1e-5), key


@pytest.mark.slow
def test_two_processes_train_as_one_process_with_two_devices(built_dataset, tmp_path):
  data_dir, manifest = built_dataset
  train_size = sum(manifest['counts']['train'].values())
  assert train_size % PROCESSES == 0, 'a full batch must divide over the devices'
  overrides = runs.tiny_overrides(data_dir, num_epochs=2, batch_size=train_size, **{
      'model.head.dropout': 0.0, 'augment.flip': False, 'augment.contrast': 0.0})
  one, shared = tmp_path / 'one', tmp_path / 'shared'
  port = _free_port()
  commands = {'one process': runs.main_args(one, *overrides, devices=PROCESSES)}
  for i in range(PROCESSES):
    commands[f'process {i}'] = runs.main_args(shared, '--multihost', f'--coordinator_address=localhost:{port}',
                                              f'--num_processes={PROCESSES}', f'--process_id={i}', *overrides,
                                              devices=1)
  logs = {name: tmp_path / f'{name}.log' for name in commands}
  processes = {}
  for name, command in commands.items():
    with logs[name].open('w') as log:
      processes[name] = subprocess.Popen(**command, stdout=log, stderr=subprocess.STDOUT)
  _wait_all(processes, logs)

  out = {name: path.read_text() for name, path in logs.items()}
  for i in range(PROCESSES):
    assert f'JAX process {i} of {PROCESSES}; local devices: [CpuDevice' in out[f'process {i}']
  assert 'Global devices: 2 x cpu' in out['process 1']
  # The report and its file list: from process 0 only.
  assert 'Run directory:' in out['process 0'] and 'test metrics' in out['process 0']
  assert 'Run directory:' not in out['process 1'] and 'test metrics' not in out['process 1']
  # The shared workdir holds what a one-process run leaves, once: one TensorBoard event file, no partial writes.
  assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in one.iterdir())
  assert len(list((shared / 'tensorboard').iterdir())) == 1
  assert not list(shared.rglob('*.partial'))

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               _latest_params(shared), _latest_params(one))
  for a, b in zip(runs.history(shared), runs.history(one), strict=True):
    for key in ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy', 'val_roc_auc', 'learning_rate'):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a['epoch'], key)
  two_processes = _test_metrics(shared)
  assert two_processes['split_sizes'] == {s: sum(manifest['counts'][s].values()) for s in ('train', 'val', 'test')}
  _assert_same_metrics(two_processes, _test_metrics(one))

  # One process resumes the finished two-process run on its own two devices: nothing left to train, the same
  # report from the same checkpoint.
  resumed = subprocess.run(**runs.main_args(shared, *overrides, devices=PROCESSES), capture_output=True,
                           timeout=TIMEOUT_S)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert [r['epoch'] for r in runs.history(shared)] == [1, 2]
  _assert_same_metrics(_test_metrics(shared), two_processes)
