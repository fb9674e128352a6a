"""The training paths beyond one float32 phase: head then fine-tune from ported weights (and its resume at the
switch), bfloat16, early stopping on val_loss and val_roc_auc, and the warm-up + cosine schedule."""

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from covid_jax import metrics, model_init, state, train
from covid_jax.port import keras_models, store
from tests import runs
from tests.test_run_faults import _repeatable

UNFREEZE = 5  # Trailing backbone layers the fine-tune phase of the two-phase run trains.


@dataclasses.dataclass
class TwoPhaseRun:
  """The uninterrupted two-phase run and what it showed along the way."""

  config: ml_collections.ConfigDict
  workdir: Path
  report: dict[str, Any]
  ported: dict[str, Any]  # The backbone's variables as ported.
  layer_order: list[str]  # As port_info.json records it.
  variables: dict[int, dict[str, Any]]  # Epoch -> params and batch_stats at its end.
  killed: dict[int, Path]  # Epoch -> a copy of the workdir as a kill during that epoch leaves it.


def _port_drawn_backbone(config: ml_collections.ConfigDict, directory: Path) -> tuple[dict[str, Any], list[str]]:
  """Writes the tiny model's randomly drawn backbone as ported weights with Keras's layer order; returns both.

  Drawn, not zero (as test_train's `_ported_tiny_backbone`): through zero weights no gradient reaches a layer.
  """
  variables = model_init.initial_variables(model_init.create_model(config), config)
  backbone = jax.tree.map(np.array, {col: tree['backbone'] for col, tree in variables.items()})
  size = config.model.image_size
  order = keras_models.layer_order(config.model.name, (size, size, 3), **model_init.backbone_args(config))
  store.save_ported(str(directory), backbone, {'model': config.model.name, 'layer_order': order})
  return backbone, order


@pytest.fixture(scope='module')
def two_phase_run(built_dataset, tmp_path_factory) -> TwoPhaseRun:
  """The default phases, 2 epochs each: head (warm-up of 1 epoch), then fine-tune of the trailing layers."""
  data_dir, _ = built_dataset
  root = tmp_path_factory.mktemp('two_phase')
  config = runs.tiny_config(data_dir, freeze_backbone=True, num_epochs=2, warmup_epochs=1,
                            **{'fine_tune.num_epochs': 2, 'fine_tune.unfreeze_layers': UNFREEZE})
  ported, order = _port_drawn_backbone(config, root / 'ported')
  config.init_from = str(root / 'ported')
  workdir, variables, killed = root / 'whole', {}, {}
  real_epoch = train._train_epoch

  def recorded(trainer, train_fn, train_state, epoch):
    if epoch > 2:  # Epochs 3 and 4 start from the checkpoints of the last head and first fine-tune epoch.
      killed[epoch] = shutil.copytree(workdir, root / f'killed_in_{epoch}')
    train_state, scores = real_epoch(trainer, train_fn, train_state, epoch)
    variables[epoch] = jax.tree.map(np.array, {'params': train_state.params, 'batch_stats': train_state.batch_stats})
    return train_state, scores

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(train, '_train_epoch', recorded)
    report = train.train_and_evaluate(config, str(workdir))
  return TwoPhaseRun(config, workdir, report, ported, order, variables, killed)


def _changed_layers(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
  return {layer for layer in before
          if not all(jax.tree.leaves(jax.tree.map(np.array_equal, before[layer], after[layer])))}


def test_head_phase_keeps_the_ported_backbone_and_fine_tune_trains_only_the_trailing_layers(two_phase_run):
  run = two_phase_run
  assert [r['phase'] for r in runs.history(run.workdir)] == ['head', 'head', 'fine_tune', 'fine_tune']
  params, stats = run.ported['params'], run.ported['batch_stats']
  weighted = [name for name in run.layer_order if name in params and name not in stats]
  head_end, end = run.variables[2], run.variables[4]
  assert not _changed_layers(params, head_end['params']['backbone'])
  assert _changed_layers(params, end['params']['backbone']) == set(weighted[-UNFREEZE:])
  # The backbone's BatchNorm stays in inference mode in both phases.
  assert not _changed_layers(stats, end['batch_stats']['backbone'])
  for before, after in ((run.variables[1], head_end), (head_end, end)):
    assert _changed_layers(before['params']['head'], after['params']['head']) == set(before['params']['head'])


def _latest_state(workdir: Path) -> dict[str, Any]:
  """The latest checkpoint's whole train state: step, params, batch_stats and opt_state."""
  directory = workdir / 'checkpoints' / 'latest'
  (step,) = [p.name for p in directory.iterdir() if p.name.isdigit()]
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(directory / step / 'state')


@pytest.mark.parametrize('killed_in', (3, 4), ids=('after the last head epoch', 'after the first fine-tune epoch'))
def test_resume_at_the_phase_switch_matches_the_uninterrupted_run(two_phase_run, tmp_path, monkeypatch, killed_in):
  run = two_phase_run
  workdir = shutil.copytree(run.killed[killed_in], tmp_path / 'run')
  trained, real_epoch = [], train._train_epoch

  def counted(trainer, train_fn, train_state, epoch):
    trained.append(epoch)
    return real_epoch(trainer, train_fn, train_state, epoch)

  monkeypatch.setattr(train, '_train_epoch', counted)
  assert train.train_and_evaluate(run.config, str(workdir)) == run.report
  assert trained == list(range(killed_in, 5))
  assert _repeatable(runs.history(workdir)) == _repeatable(runs.history(run.workdir))
  same = jax.tree.map(np.array_equal, _latest_state(run.workdir), _latest_state(workdir))
  assert not [jax.tree_util.keystr(path) for path, equal in jax.tree_util.tree_leaves_with_path(same) if not equal]


def test_bfloat16_training_learns_and_keeps_float32_parameters(built_dataset, tmp_path):
  data_dir, manifest = built_dataset
  features = set()  # The backbone's output dtype in each trace of the model: its steps and the outline.

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.module.path == ('backbone',) and context.method_name == '__call__':
      features.add(out.dtype)
    return out

  # conftest's `trained_run` at 64 px, in bfloat16.
  config = runs.tiny_config(data_dir, dtype='bfloat16', num_epochs=10,
                            **{'early_stopping.patience': 10, 'model.image_size': 64})
  with nn.intercept_methods(record):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert features == {jnp.dtype(jnp.bfloat16)}
  assert {leaf.dtype for leaf in jax.tree.leaves(runs.latest_params(tmp_path))} == {np.dtype(np.float32)}
  history = runs.history(tmp_path)
  assert all(math.isfinite(r[key]) for r in history for key in ('train_loss', 'val_loss'))
  test_counts = manifest['counts']['test']
  assert result['accuracy'] > max(test_counts.values()) / sum(test_counts.values())


def _script_val(monkeypatch: pytest.MonkeyPatch, key: str, values: list[float]) -> None:
  """Each val evaluation from now on reports the next of `values` as its `key` (runs.script_val_accuracy's way)."""
  real, script = metrics.split_metrics, list(values)

  def scripted(outputs, smoothing, prefix):
    scores = real(outputs, smoothing, prefix)
    return {**scores, key: script.pop(0)} if prefix == 'val' else scores
  monkeypatch.setattr(metrics, 'split_metrics', scripted)


@pytest.mark.parametrize('metric,values,patience,min_delta,stop_epoch,best_epoch', [
    # Lower is better: 0.62 and 0.61 do not beat 0.60.
    ('val_loss', [0.80, 0.60, 0.62, 0.61, 0.10], 2, 0.0, 4, 2),
    # 0.81 beats 0.80 by less than min_delta.
    ('val_roc_auc', [0.70, 0.80, 0.81, 0.79, 0.99], 2, 0.02, 4, 2),
], ids=('val_loss', 'val_roc_auc'))
def test_early_stopping_on_val_loss_and_roc_auc(built_dataset, tmp_path, monkeypatch, metric, values, patience,
                                                min_delta, stop_epoch, best_epoch):
  data_dir, _ = built_dataset
  _script_val(monkeypatch, metric, values)
  config = runs.tiny_config(data_dir, num_epochs=len(values), **{
      'early_stopping.metric': metric, 'early_stopping.patience': patience, 'early_stopping.min_delta': min_delta})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert [r[metric] for r in runs.history(tmp_path)] == values[:stop_epoch]
  assert (result['best_epoch'], result['checkpoint'], result['monitored_metric']) == (best_epoch, 'best', metric)
  assert [p.name for p in (tmp_path / 'checkpoints' / 'best').iterdir() if p.name.isdigit()] == [str(best_epoch)]


def _warmup_cosine(step: int, peak: float, end: float, warmup_steps: int, total_steps: int) -> float:
  """Linear from 0 to `peak` over the warm-up steps, then half a cosine from `peak` to `end` at `total_steps`."""
  if step < warmup_steps:
    return peak * step / warmup_steps
  done = min(step - warmup_steps, total_steps - warmup_steps) / (total_steps - warmup_steps)
  return end + (peak - end) * (1 + math.cos(math.pi * done)) / 2


def test_schedule_is_linear_warmup_then_cosine():
  config = default.get_config()
  config.update_from_flattened_dict({
      'num_epochs': 4, 'learning_rate': 0.1, 'end_learning_rate': 1e-3, 'warmup_epochs': 2,
      'fine_tune.num_epochs': 3, 'fine_tune.learning_rate': 0.01, 'fine_tune.end_learning_rate': 1e-4,
      'fine_tune.warmup_epochs': 0})
  head, fine_tune = state.make_phases(config)
  # 10 steps an epoch: the head phase warms up over 20 of its 40 steps (15 with 1.5 epochs of warm-up, which a
  # Phase takes though the config's integer key does not); the fine-tune phase has 30 steps and no warm-up.
  cases = ((head, 0.1, 1e-3, 20, 40), (dataclasses.replace(head, warmup_epochs=1.5), 0.1, 1e-3, 15, 40),
           (fine_tune, 0.01, 1e-4, 0, 30))
  for phase, peak, end, warmup, total in cases:
    schedule = state.make_schedule(phase, 10)
    for step in (0, 1, 7, 14, 15, 16, 19, 20, 21, 27, 29, 39, 40, 50):
      assert float(schedule(step)) == pytest.approx(_warmup_cosine(step, peak, end, warmup, total), rel=1e-5,
                                                    abs=1e-9), (phase, step)


def test_history_records_the_learning_rate_of_each_epochs_last_step(two_phase_run, built_dataset):
  _, manifest = built_dataset
  steps_per_epoch = sum(manifest['counts']['train'].values()) // two_phase_run.config.batch_size
  head = (3e-3, 1e-4, steps_per_epoch, 2 * steps_per_epoch)  # runs.TINY and the demo; warm-up of 1 epoch.
  fine_tune = (1e-4, 1e-6, 0, 2 * steps_per_epoch)  # configs/default.py.
  expected = [_warmup_cosine(epoch * steps_per_epoch - 1, *phase)
              for phase in (head, fine_tune) for epoch in (1, 2)]
  recorded = [r['learning_rate'] for r in runs.history(two_phase_run.workdir)]
  assert recorded == pytest.approx(expected, rel=1e-5)
