"""A run under faults and misuse: kills at any instant of its saves, corrupt checkpoints, mixed settings, bad paths.

Each resumed run must end with exactly the report an uninterrupted run writes; everything else is refused
with an error that names the key, file or folder, before anything is written.
"""

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from covid_jax import checkpoints, train, workdir_checks
from covid_jax.port import store
from tests import runs

# Timings and memory differ between any two runs; everything else in a history must not.
_UNREPEATABLE = ('seconds', 'peak_host_memory_gib')


def _repeatable(history: list[dict]) -> list[dict]:
  return [{k: v for k, v in record.items() if k not in _UNREPEATABLE} for record in history]


def _tree(root: Path) -> dict[str, bytes]:
  return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


# Step-level writes in a run's checkpoints: a step's temporary folder made, renamed into place, an old step removed.
_STEP_WRITE = re.compile(r'checkpoints/(latest|best)/\d+(\.orbax-checkpoint-tmp)?$')
_AUDITORS: list[Callable[[str, tuple], None]] = []


def _audit(event: str, args: tuple) -> None:
  for auditor in _AUDITORS:
    auditor(event, args)


class _Snapshots:
  """Copies of a workdir taken just before each step-level write of its checkpoints: the states a kill leaves."""

  def __init__(self, workdir: Path, into: Path):
    self.workdir, self.into, self.taken, self._copying = workdir, into, {}, False

  def __call__(self, event: str, args: tuple) -> None:
    if self._copying or event not in ('os.mkdir', 'os.rename', 'shutil.rmtree') or not args:
      return
    path = str(args[0])
    if not path.startswith(str(self.workdir)) or not _STEP_WRITE.search(path):
      return
    self._copying = True
    try:
      label = f'{len(self.taken):02d} before {event} {Path(path).relative_to(self.workdir / "checkpoints")}'
      destination = self.into / f'{len(self.taken):02d}'
      shutil.copytree(self.workdir, destination)
      self.taken[label] = destination
    finally:
      self._copying = False


@pytest.fixture(scope='module')
def audit_hook():
  """Python's audit hooks last for the process: one, idle unless a test adds an auditor."""
  sys.addaudithook(_audit)
  return _AUDITORS


def test_a_kill_at_any_instant_of_the_saves_resumes_to_the_uninterrupted_report(built_dataset, tmp_path, audit_hook):
  """The run is copied before every step-level write of its saves; each copy, resumed, must report the same."""
  data_dir, _ = built_dataset
  # min_delta -1: every epoch is an improvement, so every epoch writes both checkpoints.
  config = runs.tiny_config(data_dir, num_epochs=2, **{'early_stopping.min_delta': -1.0})
  snapshots = _Snapshots(tmp_path / 'whole', tmp_path / 'killed')
  audit_hook.append(snapshots)
  try:
    whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))
  finally:
    audit_hook.remove(snapshots)
  labels = list(snapshots.taken)
  # Each save: its temporary folder made, then renamed; from epoch 2 on, the previous step removed.
  expected = []
  for step in (1, 2):
    for which in ('latest', 'best'):
      expected += [f'os.mkdir {which}/{step}.orbax-checkpoint-tmp', f'os.rename {which}/{step}.orbax-checkpoint-tmp']
      expected += [f'shutil.rmtree {which}/{step - 1}'] if step > 1 else []
  assert [re.sub(r'^\d+ before ', '', label) for label in labels] == expected
  wrong = {}
  # The first copy holds no checkpoint at all: a rerun from it is a fresh run, which other tests cover.
  for label in labels[1:]:
    killed = snapshots.taken[label]
    resumed = train.train_and_evaluate(config, str(killed))
    if resumed != whole or _repeatable(runs.history(killed)) != _repeatable(runs.history(tmp_path / 'whole')):
      wrong[label] = resumed
  assert not wrong, wrong


def test_resume_after_interruption_matches_uninterrupted_run(built_dataset, tmp_path):
  data_dir, _ = built_dataset
  config = runs.tiny_config(data_dir, num_epochs=2)
  whole = train.train_and_evaluate(config, str(tmp_path / 'whole'))

  with runs.interrupted_at_epoch(2):
    train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert [r['epoch'] for r in runs.history(tmp_path / 'resumed')] == [1, 2]
  assert resumed == whole
  same = jax.tree.map(np.array_equal, runs.latest_params(tmp_path / 'whole'), runs.latest_params(tmp_path / 'resumed'))
  assert all(jax.tree.leaves(same))


@pytest.fixture(scope='module')
def one_epoch_run(built_dataset, tmp_path_factory) -> tuple[Path, dict[str, Any]]:
  """A finished one-epoch tiny run (workdir, report); tests work on copies (`_copy`)."""
  data_dir, _ = built_dataset
  workdir = tmp_path_factory.mktemp('one_epoch') / 'run'
  return workdir, train.train_and_evaluate(runs.tiny_config(data_dir, num_epochs=1), str(workdir))


def _copy(run: tuple[Path, dict], to: Path) -> Path:
  shutil.copytree(run[0], to)
  return to


def _changed_data(data_dir: Path, to: Path) -> Path:
  """A copy of the built data whose manifest differs, as another build's would."""
  shutil.copytree(data_dir, to)
  manifest = json.loads((to / 'manifest.json').read_text())
  (to / 'manifest.json').write_text(json.dumps({**manifest, 'seed': manifest['seed'] + 1}, indent=1))
  return to


def test_resuming_with_other_settings_names_the_keys_and_writes_nothing(built_dataset, one_epoch_run, tmp_path):
  """Another data_dir, image_size or pooling once resumed silently, mixing two runs in one history."""
  data_dir, _ = built_dataset
  workdir = _copy(one_epoch_run, tmp_path / 'run')
  before = _tree(workdir)
  refused = {
      (('model.image_size', 64),): 'model.image_size: 32 in the saved run, 64 now',
      (('model.pooling', 'max'),): "model.pooling: 'avg' in the saved run, 'max' now",
      (('early_stopping.patience', 5),): 'early_stopping.patience: 15 in the saved run, 5 now (may grow)',
      (('data_dir', str(_changed_data(data_dir, tmp_path / 'other_data'))),): workdir_checks.MANIFEST_KEY,
      (('seed', 1), ('learning_rate', 0.5)): 'learning_rate: 0.003 in the saved run, 0.5 now\n  seed: 0',
  }
  for changes, message in refused.items():
    with pytest.raises(workdir_checks.WorkdirError) as error:
      config = runs.tiny_config(data_dir, num_epochs=1)
      config.update_from_flattened_dict(dict(changes))
      train.train_and_evaluate(config, str(workdir))
    assert message in str(error.value)
    assert _tree(workdir) == before, changes
  # The same data elsewhere, more epochs and another eval batch size resume the run.
  moved = tmp_path / 'moved_data'
  shutil.copytree(data_dir, moved)
  train.train_and_evaluate(runs.tiny_config(moved, num_epochs=2, eval_batch_size=32), str(workdir))
  assert [r['epoch'] for r in runs.history(workdir)] == [1, 2]


def test_another_runs_best_checkpoint_is_refused_and_this_runs_is_resumed(built_dataset, one_epoch_run, tmp_path):
  """With `latest/` lost, a new run once trained from scratch and reported the old run's best epoch."""
  data_dir, _ = built_dataset
  workdir = _copy(one_epoch_run, tmp_path / 'run')
  shutil.rmtree(workdir / 'checkpoints' / 'latest')
  before = _tree(workdir)
  with pytest.raises(workdir_checks.WorkdirError, match=r'best/1 holds a run made with other settings(.|\n)*seed'):
    train.train_and_evaluate(runs.tiny_config(data_dir, num_epochs=1, seed=1), str(workdir))
  assert _tree(workdir) == before
  assert train.train_and_evaluate(runs.tiny_config(data_dir, num_epochs=1), str(workdir)) == one_epoch_run[1]


def _corrupt(step_dir: Path) -> None:
  """Truncates every array data file of a checkpoint, as a full disk or an interrupted copy leaves them."""
  for data_file in (step_dir / 'state').rglob('d/*'):
    data_file.write_bytes(data_file.read_bytes()[:data_file.stat().st_size // 2])


def test_a_corrupt_checkpoint_is_one_paragraph_and_the_run_goes_on_from_the_other(built_dataset, one_epoch_run,
                                                                                   tmp_path):
  """A truncated checkpoint once buried the error naming the file under ~350 lines of 'Event loop is closed'."""
  data_dir, _ = built_dataset
  config = runs.tiny_config(data_dir, num_epochs=1)
  workdir = _copy(one_epoch_run, tmp_path / 'run')
  latest = workdir / 'checkpoints' / 'latest' / '1'
  _corrupt(latest)
  result = runs.run_main(workdir, *runs.tiny_overrides(data_dir, num_epochs=1))
  error = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 1 and 'Traceback' not in result.stderr and 'Event loop' not in result.stderr
  assert error.startswith(f'error: checkpoint {latest} cannot be read') and str(latest / 'state' / 'd') in error
  assert f'To resume from the best checkpoint (epoch 1), move {latest} out of the way' in error
  latest.rename(workdir / 'corrupt-latest-1')
  assert train.train_and_evaluate(config, str(workdir)) == one_epoch_run[1]

  workdir = _copy(one_epoch_run, tmp_path / 'run_with_corrupt_best')
  best = workdir / 'checkpoints' / 'best' / '1'
  _corrupt(best)
  with pytest.raises(checkpoints.CorruptCheckpointError, match=f'takes epoch 1 from {best.parent.parent}/latest'):
    train.train_and_evaluate(config, str(workdir))
  best.rename(workdir / 'corrupt-best-1')
  assert train.train_and_evaluate(config, str(workdir)) == one_epoch_run[1]


def test_non_finite_loss_stops_with_step_and_keeps_last_good_checkpoint(built_dataset, one_epoch_run, tmp_path,
                                                                       monkeypatch):
  data_dir, _ = built_dataset
  workdir = _copy(one_epoch_run, tmp_path / 'run')
  good = runs.latest_params(workdir)
  real_compile = train.Trainer.compile_steps
  blown_up_steps = []

  def compile_steps(trainer, phase):
    train_fn, eval_fn = real_compile(trainer, phase)
    blown_up_steps.append(trainer.steps_per_epoch + 2)  # The second step of epoch 2 reports an infinite loss.

    def blown_up(state, batch, key):
      step = int(state.step) + 1
      state, scores = train_fn(state, batch, key)
      return state, {**scores, 'loss': scores['loss'] * (np.inf if step == blown_up_steps[0] else 1.0)}
    return blown_up, eval_fn

  monkeypatch.setattr(train.Trainer, 'compile_steps', compile_steps)
  with pytest.raises(train.NonFiniteLossError, match=r'loss is inf at step (\d+);') as error:
    train.train_and_evaluate(runs.tiny_config(data_dir, num_epochs=2), str(workdir))
  assert f'at step {blown_up_steps[0]};' in str(error.value)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, good, runs.latest_params(workdir))))


def test_a_workdir_that_is_a_file_or_holds_another_runs_report_is_refused(built_dataset, tmp_path):
  data_dir, _ = built_dataset
  config = runs.tiny_config(data_dir, num_epochs=1)
  a_file = tmp_path / 'file'
  a_file.write_text('x')
  with pytest.raises(workdir_checks.WorkdirError, match=f'workdir {a_file} exists and is not a directory'):
    train.train_and_evaluate(config, str(a_file))
  reported = tmp_path / 'reported'
  reported.mkdir()
  (reported / 'test_metrics.json').write_text('{}')
  with pytest.raises(workdir_checks.WorkdirError, match='holds test_metrics.json of another run but no checkpoints'):
    train.train_and_evaluate(config, str(reported))
  assert sorted(p.name for p in reported.iterdir()) == ['test_metrics.json']


def test_a_save_orbax_would_skip_is_an_error(tmp_path):
  state = {'w': np.zeros(3, np.float32)}
  run = checkpoints.RunCheckpoints(str(tmp_path), {'seed': 0})
  run.save(2, state, {'epoch': 2}, is_best=True)
  run.close()
  shutil.rmtree(tmp_path / 'checkpoints' / 'latest')
  run = checkpoints.RunCheckpoints(str(tmp_path), {'seed': 0})
  with pytest.raises(RuntimeError, match=r'epoch 1 was not saved: .*best holds step 2 already'):
    run.save(1, state, {'epoch': 1}, is_best=True)
  run.close()


def test_missing_or_garbage_init_from_says_how_to_port(built_dataset, tmp_path):
  data_dir, _ = built_dataset
  with pytest.raises(FileNotFoundError, match='scripts/port_keras_weights.py --model nasnet'):
    train.train_and_evaluate(runs.tiny_config(data_dir, init_from=str(tmp_path / 'nowhere')), str(tmp_path / 'a'))
  garbage = tmp_path / 'garbage'
  (garbage / store.VARIABLES_DIR).mkdir(parents=True)
  (garbage / store.VARIABLES_DIR / 'weights.bin').write_bytes(b'\0' * 64)
  (garbage / store.INFO_FILE).write_text('{}')
  with pytest.raises(store.PortedWeightsError, match=f'{garbage / store.VARIABLES_DIR} is not a checkpoint of '
                     'ported weights.*scripts/port_keras_weights.py --model nasnet'):
    train.train_and_evaluate(runs.tiny_config(data_dir, init_from=str(garbage)), str(tmp_path / 'b'))


def test_mistyped_override_or_half_a_cluster_address_fails(tmp_path):
  result = runs.run_main(tmp_path, '--config.num_epoch=3')
  assert result.returncode != 0 and 'num_epoch' in result.stderr
  result = runs.run_main(tmp_path, '--multihost', '--process_id=1')
  assert result.returncode != 0
  assert "--coordinator_address, --num_processes, --process_id go together, with --multihost (given: ['process_id'])" \
      in result.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_a_checkpoint_from_before_run_records_is_refused_not_resumed(built_dataset, one_epoch_run, tmp_path):
  data_dir, _ = built_dataset
  workdir = _copy(one_epoch_run, tmp_path / 'run')
  shutil.rmtree(workdir / 'checkpoints' / 'latest' / '1' / checkpoints.RUN)
  with pytest.raises(checkpoints.OlderCheckpointError, match='latest/1 predates the run record'):
    train.train_and_evaluate(runs.tiny_config(data_dir, num_epochs=1), str(workdir))
