"""The epoch rules the study's notebooks used: Keras's ReduceLROnPlateau, and separate monitors per phase for
early stopping and for the best checkpoint, on scripted val metrics; a plateau run resumes bit-identically."""

from pathlib import Path

import jax
import keras
import numpy as np
import orbax.checkpoint as ocp
import pytest

from covid_jax import metrics, progress, train
from tests import runs

# factor 0.5, patience 2, cooldown 2, min_lr 0.1, min_delta 0.01, from 1.0.
PLATEAU = {'metric': 'val_loss', 'factor': 0.5, 'patience': 2, 'cooldown': 2, 'min_learning_rate': 0.1,
           'min_delta': 0.01}
LOSSES = [1.0, 0.995, 0.98, 0.98, 0.975, 0.99, 0.99, 0.99, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
# Worked by hand with Keras's rule: an improvement must beat the best by more than 0.01, so epoch 4 is the second
# without one (0.995 and 0.975 do not count) and the rate halves. The cooldown's two epochs reset the count: the
# first is not counted, the second counts as the first epoch waited (a cooldown of 1 would change nothing). The
# rate halves after epochs 7, 10 and 13, the last time to the floor 0.1, below which it never goes.
HAND = [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.125, 0.125, 0.125, 0.1, 0.1, 0.1, 0.1, 0.1]


def test_plateau_rule_against_a_hand_computed_sequence():
  rule = progress.ReduceOnPlateau(**PLATEAU, learning_rate=1.0)
  rates = [rule.update(loss) for loss in LOSSES]
  np.testing.assert_array_equal(rates, np.float32(HAND))


def test_plateau_rule_against_keras_callback():
  model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
  model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss='mse')
  callback = keras.callbacks.ReduceLROnPlateau(monitor='val_loss', factor=0.5, patience=2, cooldown=2, min_lr=0.1,
                                               min_delta=0.01)
  callback.set_model(model)
  callback.on_train_begin()
  rule = progress.ReduceOnPlateau(**PLATEAU, learning_rate=1.0)
  for epoch, loss in enumerate(LOSSES):
    callback.on_epoch_end(epoch, {'val_loss': loss})
    assert rule.update(loss) == float(model.optimizer.learning_rate), epoch


_SPLIT_METRICS = metrics.split_metrics


def _script_val(monkeypatch: pytest.MonkeyPatch, values: list[tuple[float, float]]) -> None:
  """Each val evaluation from now on reports the next (accuracy, loss) of `values` (replacing an earlier script)."""
  real, script = _SPLIT_METRICS, list(values)

  def scripted(outputs, smoothing, prefix):
    scores = real(outputs, smoothing, prefix)
    if prefix != 'val':
      return scores
    accuracy, loss = script.pop(0)
    return {**scores, 'val_accuracy': accuracy, 'val_loss': loss}
  monkeypatch.setattr(metrics, 'split_metrics', scripted)


# Phase 1 stops on val_accuracy (min_delta 0.05, patience 2): epochs 3 and 4 gain too little, so it ends at 4.
# Phase 2 stops on val_loss (patience 2, starting afresh): best at 6, then 7 and 8 worse, so it ends at 8.
# The best checkpoint follows val_accuracy over both phases: epoch 7 (0.80), which val_loss never picks.
# The plateau rule (factor 0.5, patience 1) halves the rate after epochs 7 and 8.
SCRIPT = [(0.50, 1.0), (0.60, 1.0), (0.62, 1.0), (0.64, 1.0),
          (0.66, 0.90), (0.65, 0.80), (0.80, 0.85), (0.70, 0.82)]
SPARE = [(0.5, 0.8)] * 4  # Only a broken stopping rule reads these.
OVERRIDES = {'freeze_backbone': True, 'num_epochs': 4, 'early_stopping.patience': 2, 'early_stopping.min_delta': 0.05,
             'early_stopping.checkpoint_metric': 'val_accuracy', 'fine_tune.num_epochs': 6,
             'fine_tune.unfreeze_layers': 3, 'fine_tune.learning_rate': 1e-3, 'fine_tune.schedule': 'plateau',
             'fine_tune.plateau_factor': 0.5, 'fine_tune.plateau_patience': 1, 'fine_tune.plateau_cooldown': 0,
             'fine_tune.plateau_min_delta': 0.0, 'fine_tune.early_stopping.metric': 'val_loss',
             'fine_tune.early_stopping.patience': 2}


def _train_only(config, workdir: Path) -> dict:
  """Trains (or resumes) the run without its test report; returns the latest checkpoint's progress and state."""
  trainer = train.Trainer(config, str(workdir))
  try:
    train._train(trainer, *train._start_or_resume(trainer))
    latest = trainer.checkpoints.step('latest')
    best = trainer.checkpoints.step('best')
    saved = trainer.checkpoints.progress('latest')
  finally:
    trainer.checkpoints.close()
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(workdir / 'checkpoints' / 'latest' / str(latest) / 'state')
  return {'progress': saved, 'best': best, 'state': state}


@pytest.fixture(scope='module')
def plateau_run(built_dataset, tmp_path_factory):
  data_dir, _ = built_dataset
  with pytest.MonkeyPatch.context() as monkeypatch:
    _script_val(monkeypatch, SCRIPT + SPARE)
    return _train_only(runs.tiny_config(data_dir, **OVERRIDES), tmp_path_factory.mktemp('plateau_run'))


def test_each_phase_stops_on_its_own_metric_and_the_best_checkpoint_on_another(plateau_run):
  history = plateau_run['progress']['history']
  assert [r['phase'] for r in history] == ['head'] * 4 + ['fine_tune'] * 4
  assert plateau_run['best'] == 7 and plateau_run['progress']['checkpoint']['best_epoch'] == 7


def test_plateau_schedule_sets_the_optimiser_rate(plateau_run):
  start = float(np.float32(1e-3))
  assert [r['learning_rate'] for r in plateau_run['progress']['history'][4:]] == [start, start, start, start / 2]
  rates = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(plateau_run['state']['opt_state'])
           if jax.tree_util.keystr(path).endswith("['learning_rate']")]
  assert rates and all(np.float32(rate) == np.float32(start / 4) for rate in rates)


def test_plateau_run_resumes_bit_identically(plateau_run, built_dataset, tmp_path, monkeypatch):
  """Stopped after two fine-tune epochs and resumed with the full config: the same rates, weights and state."""
  data_dir, _ = built_dataset
  _script_val(monkeypatch, SCRIPT[:6])
  _train_only(runs.tiny_config(data_dir, **{**OVERRIDES, 'fine_tune.num_epochs': 2}), tmp_path)
  _script_val(monkeypatch, SCRIPT[6:] + SPARE)
  resumed = _train_only(runs.tiny_config(data_dir, **OVERRIDES), tmp_path)
  drop = lambda history: [{k: v for k, v in r.items() if k not in ('seconds', 'peak_host_memory_gib')}
                          for r in history]
  assert drop(resumed['progress']['history']) == drop(plateau_run['progress']['history'])
  assert resumed['progress']['plateau'] == plateau_run['progress']['plateau']
  same = jax.tree.map(np.array_equal, resumed['state'], plateau_run['state'])
  assert all(jax.tree.leaves(same))
