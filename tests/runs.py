"""Helpers for tests that train: the tiny config, a run's files, scripted val metrics, interruptions, `main`."""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
import pytest

from configs import demo
from covid_jax import metrics, train

ROOT = Path(__file__).resolve().parents[1]
# The demo's small NASNet made smaller still: the same cell code as NASNetLarge, tiny and fast.
TINY = {
    'model.image_size': 32,
    'model.nasnet.penultimate_filters': 96,
    'model.nasnet.stem_block_filters': 8,
    'formulations.depthwise': 'grouped',  # Its gradients compile several times faster on CPU.
    'model.head.dims': (16,),
    'num_epochs': 3,
    'warmup_epochs': 0,
    'end_learning_rate': 1e-4,
    'early_stopping.patience': 15,
    'log_every_steps': 2,
    'prediction_grid_size': 4,
    'gradcam_grid_size': 0,  # Grad-CAM's compile would add a minute to every run; conftest's trained_run draws it.
}


def tiny_config(data_dir: Path, **overrides: Any) -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.data_dir = str(data_dir)
  config.update_from_flattened_dict({**TINY, **overrides})
  return config


def history(workdir: Path) -> list[dict]:
  return json.loads((workdir / 'history.json').read_text())


def latest_params(workdir: Path) -> dict:
  directory = workdir / 'checkpoints' / 'latest'
  (step,) = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(directory / str(step) / 'state')['params']


_SPLIT_METRICS = metrics.split_metrics


def script_val_accuracy(monkeypatch: pytest.MonkeyPatch, values: list[float]) -> None:
  """Each val evaluation from now on reports the next of `values` as its accuracy (replacing an earlier script)."""
  real, script = _SPLIT_METRICS, list(values)

  def scripted(outputs, smoothing, prefix):
    scores = real(outputs, smoothing, prefix)
    return {**scores, 'val_accuracy': script.pop(0)} if prefix == 'val' else scores
  monkeypatch.setattr(metrics, 'split_metrics', scripted)


@contextlib.contextmanager
def interrupted_at_epoch(epoch: int) -> Iterator[None]:
  """Inside, a run stops with KeyboardInterrupt as epoch `epoch` starts (as a kill between epochs would); it must."""
  real = train._train_epoch

  def interrupted(trainer, train_fn, train_state, current):
    if current == epoch:
      raise KeyboardInterrupt
    return real(trainer, train_fn, train_state, current)
  with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
    patch.setattr(train, '_train_epoch', interrupted)
    yield


def main_args(workdir: Path, *overrides: str, devices: int = 1, env_changes: dict[str, str | None] | None = None
              ) -> dict[str, Any]:
  """Arguments to `subprocess` that run `python -m covid_jax.main` on the demo config; `env_changes` sets
  (or, with None, removes) variables."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  for name, value in (env_changes or {}).items():
    if value is None:
      env.pop(name, None)
    else:
      env[name] = value
  return {'args': [sys.executable, '-m', 'covid_jax.main', '--config=configs/demo.py', f'--workdir={workdir}',
                   *overrides], 'cwd': ROOT, 'env': env, 'text': True}


def run_main(workdir: Path, *overrides: str, **kwargs: Any) -> subprocess.CompletedProcess:
  return subprocess.run(**main_args(workdir, *overrides, **kwargs), capture_output=True)


def tiny_overrides(data_dir: Path, **changes: Any) -> list[str]:
  """`--config.key=value` flags of `tiny_config(data_dir, **changes)` for the main command."""
  values = {**TINY, 'data_dir': data_dir, **changes}
  return [f'--config.{key}={value}' for key, value in values.items()]
