"""The study command: its arguments, its run directories, and a study killed mid-run that finishes the same."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from covid_jax import study
from tests import runs

# A tiny model; its head's width names it.
_TINY_CONFIG = '''
from configs import demo
from tests import runs


def get_config():
  config = demo.get_config()
  config.update_from_flattened_dict({{**runs.TINY, 'num_epochs': 2, 'model.head.dims': ({width},)}})
  return config
'''


def _config(folder: Path, width: int = 16) -> Path:
  path = folder / f'tiny_{width}.py'
  path.write_text(_TINY_CONFIG.format(width=width))
  return path


def _run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
  done = subprocess.run(command, cwd=runs.ROOT, env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def _study_command(workdir: Path, configs: list[Path], data_dir: Path, *extra: str) -> list[str]:
  return [sys.executable, '-m', 'covid_jax.study', f'--workdir={workdir}', '--configs=' + ','.join(map(str, configs)),
          '--seeds=0', f'--config.data_dir={data_dir}', *extra]


def test_arguments_are_checked_before_anything_runs(tmp_path, capsys):
  config = _config(tmp_path)
  for argv, phrase in (([f'--configs={tmp_path}/missing.py'], 'config file(s) not found'),
                       ([f'--configs={config}', '--seeds=0,one'], 'comma-separated integers'),
                       ([f'--configs={config}', '--config_seed=1'], 'unrecognised arguments')):
    with pytest.raises(SystemExit):
      study.main([f'--workdir={tmp_path / "w"}', *argv])
    assert phrase in capsys.readouterr().err
  with pytest.raises(SystemExit, match='Did you mean "seed" instead of "sed"'):
    study.main([f'--workdir={tmp_path / "w"}', f'--configs={config}', '--config.sed=1'])
  assert not (tmp_path / 'w').exists()


def test_run_directories_are_named_by_config_and_disambiguated_by_folder():
  assert study.run_names([Path('configs/vgg16.py'), Path('configs/nasnet.py')]) == ['vgg16', 'nasnet']
  assert study.run_names([Path('configs/nasnet.py'), Path('configs/notebook/nasnet.py')]) == [
      'configs-nasnet', 'notebook-nasnet']


@pytest.mark.slow
def test_a_study_killed_mid_run_finishes_with_the_same_comparison(built_dataset, tmp_path):
  data_dir, _ = built_dataset
  configs = [_config(tmp_path)]  # One run to kill and resume is enough; compare's tests cover several groups.
  env = runs.main_args(tmp_path)['env']
  whole = tmp_path / 'whole'
  _run(_study_command(whole, configs, data_dir), env)

  interrupted = tmp_path / 'interrupted'
  command = _study_command(interrupted, configs, data_dir)
  process = subprocess.Popen(command, cwd=runs.ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  latest = interrupted / 'tiny_16' / 'seed_0' / 'checkpoints' / 'latest'
  while not (latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir())):
    assert process.poll() is None, 'the study ended before its first checkpoint'
    time.sleep(0.05)
  os.killpg(process.pid, signal.SIGKILL)  # The study and the run it started.
  process.wait()
  assert not (interrupted / 'tiny_16' / 'seed_0' / 'test_metrics.json').exists()
  assert 'Resuming from epoch 1' in _run(command, env).stderr
  again = _run(command, env)
  assert again.stdout.count('finished, skipped') == 1
  assert (interrupted / 'comparison.csv').read_text() == (whole / 'comparison.csv').read_text()
  assert (whole / 'comparison.csv').read_text().splitlines()[1].startswith('tiny_16,')
