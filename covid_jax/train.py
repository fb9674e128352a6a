"""The epoch loop: phases, early stopping, checkpoints, resume, then the test evaluation of the best epoch.

`train_and_evaluate(config, workdir)` is the whole run. Each epoch trains,
evaluates on val, and saves the latest checkpoint (and the best one when early
stopping calls the epoch an improvement) with the run's `Progress`; a run
restarted on the same workdir resumes from the latest. At the end the best
epoch is restored and evaluated on test (`reporting.final_report`).
"""

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
from absl import logging
from tqdm import tqdm

from covid_jax import (checkpoints, gradcam, head_features, input_pipeline, metrics, model_init, predictions,
                       reporting, run_report, runtime, scoring, state, steps, workdir_checks)
from covid_jax.config_checks import ConfigError, validate_config
from covid_jax.port import store
from covid_jax.progress import Progress

SPLITS = ('train', 'val', 'test')


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


# Errors whose message says all a user needs (what is wrong, which key or file, what to do): printed alone.
USER_ERRORS = (ConfigError, workdir_checks.WorkdirError, checkpoints.CorruptCheckpointError,
               checkpoints.OlderCheckpointError, NonFiniteLossError, store.PortedWeightsError, FileNotFoundError)


class Trainer:
  """Holds what one run needs: model, data, mesh, formulations, checkpoints, writers."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate_config(config)
    self.cache_head_features = head_features.enabled(config)
    self.config, self.workdir = config, workdir
    self.is_writer = jax.process_index() == 0
    self.mesh = input_pipeline.data_mesh()
    size = config.model.image_size
    self.readers = {split: input_pipeline.SplitReader(config.data_dir, split, size, self.mesh) for split in SPLITS}
    # What the current phase's steps read, by split: the readers, or phase 'head''s cached features (phase_steps).
    self.inputs: dict[str, Any] = self.readers
    self.steps_per_epoch = self.readers['train'].steps_per_epoch(config.batch_size)
    if self.steps_per_epoch == 0:
      raise ConfigError(f'batch_size {config.batch_size} exceeds the {self.readers["train"].num_examples} training '
                       'examples: no full batch')
    self.formulations = model_init.choose_formulations(config, self.mesh.devices.flat[0].platform)
    self.model = model_init.create_model(config, self.formulations)
    self.phases = state.make_phases(config)
    self.outline = model_init.model_outline(self.model, config)
    self.checkpoints = checkpoints.RunCheckpoints(workdir, workdir_checks.run_record(config))

  def new_state(self, variables: dict[str, Any], phase_index: int, step: int = 0) -> state.TrainState:
    phase = self.phases[phase_index]
    layer_order = self.layer_order if phase.trainable == state.Trainable.TRAILING else []
    fresh = state.make_state(self.model, self.config, variables, phase, layer_order, self.steps_per_epoch)
    return fresh.replace(step=step)

  def compile_steps(self, phase: state.Phase) -> tuple[steps.TrainStep, Callable]:
    return steps.compile_steps(self.mesh, phase, self.config, self.formulations.separate_update)

  def phase_steps(self, phase: state.Phase, train_state: state.TrainState) -> tuple[steps.TrainStep, Callable]:
    """The phase's compiled (train step, eval step); sets `inputs` to what they read. Phase 'head' reads the
    backbone's pooled features when head_features.cache says so, computed from `train_state` on first use."""
    if phase.trainable == state.Trainable.HEAD and self.cache_head_features:
      self.inputs = head_features.load_or_extract(self.config, self.workdir, self.model.dtype, self.readers,
                                                  train_state, show_progress=self.is_writer)
      return steps.compile_head_steps(self.mesh, self.config, self.formulations.separate_update)
    self.inputs = self.readers
    return self.compile_steps(phase)

  @functools.cached_property
  def layer_order(self) -> list[str]:
    """The backbone's layers in Keras's `model.layers` order, in which the study counted its trailing layers.

    Keras orders layers by depth in the graph, not by call order, so the order comes from the Keras model:
    as recorded in the ported weights' `port_info.json`, or else from the model built without weights (on
    first use: only the fine-tune phase needs it).
    """
    order = store.load_layer_order(self.config.init_from) if self.config.init_from else None
    if order is not None:
      source = os.path.join(self.config.init_from, store.INFO_FILE)
    else:
      from covid_jax.port import keras_models  # Imports Keras, which other runs do not need.
      size = self.config.model.image_size
      order = keras_models.layer_order(self.config.model.name, (size, size, 3),
                                       **model_init.backbone_args(self.config))
      source = 'the Keras model'
    missing = sorted(set(self.outline.variables['params']['backbone']) - set(order))
    if missing:
      raise ValueError(f'The layer order in {source} lacks {len(missing)} of the {self.config.model.name} '
                       f'backbone\'s layers with weights, e.g. {missing[:3]}: port the weights again')
    return order

  def restore(self, which: str, phase_index: int) -> state.TrainState:
    """The `which` ('latest' or 'best') checkpoint's state, on the mesh; `phase_index` is the phase it was in.

    Read straight onto this run's mesh, which need not hold the devices that wrote it (several processes
    save jax.Arrays, named with their devices).
    """
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                            _savable(jax.eval_shape(lambda: self.new_state(self.outline.variables, phase_index))))
    saved = self.checkpoints.restore(which, abstract)
    restored = self.new_state({'params': saved['params'], 'batch_stats': saved['batch_stats']}, phase_index)
    return steps.replicate(restored.replace(step=saved['step'], opt_state=saved['opt_state']), self.mesh)

  @functools.cached_property
  def writer(self) -> tf.summary.SummaryWriter | None:
    """TensorBoard's writer, made on first use: a run refused at its start writes no event file."""
    return tf.summary.create_file_writer(os.path.join(self.workdir, 'tensorboard')) if self.is_writer else None

  def log_scalars(self, scalars: dict[str, float], step: int) -> None:
    if self.writer is not None:
      with self.writer.as_default(step=step):
        for name, value in scalars.items():
          tf.summary.scalar(name, value)


def _savable(train_state: state.TrainState) -> dict[str, Any]:
  return {'step': train_state.step, 'params': train_state.params, 'batch_stats': train_state.batch_stats,
          'opt_state': train_state.opt_state}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint), then evaluates the best epoch on test.

  Returns the test metrics that are also written to `workdir`/test_metrics.json.
  """
  workdir_checks.check_workdir(workdir)
  settle_backend(config, jax.devices()[0])
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, workdir)
  try:
    train_state, progress = _start_or_resume(trainer)
    if trainer.is_writer:
      reporting.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
    _train(trainer, train_state, progress)
    return _final_report(trainer)
  finally:
    trainer.checkpoints.close()


def settle_backend(config: ml_collections.ConfigDict, device: jax.Device) -> None:
  """Writes the backend's choices into the config's 'auto' keys, so the run's record and config.json hold the
  values it uses whatever started it (the command or a notebook), and logs the backend's choices once."""
  runtime.apply_backend_defaults(config, device.platform)
  chosen = model_init.choose_formulations(config, device.platform)
  logging.info(runtime.backend_summary(config, device.platform, device.device_kind, chosen))


def _start_or_resume(trainer: Trainer) -> tuple[state.TrainState, Progress]:
  """The initial state, or the saved one of this run: from its latest checkpoint, else from its best one.

  A saved run made with other settings is refused before anything is written (`workdir.check_same_run`).
  """
  run = trainer.checkpoints
  source = next((which for which in checkpoints.WHICH if run.step(which) is not None), None)
  if source is None:
    variables = model_init.initial_variables(trainer.model, trainer.config, outline=trainer.outline)
    return steps.replicate(trainer.new_state(variables, 0), trainer.mesh), Progress()
  saved = run.saved(source)
  workdir_checks.check_same_run(saved['run'], run.record, where=os.path.join(run.root, source, str(run.step(source))))
  progress = Progress.from_json(saved['progress'])
  run.complete_best(progress.best_epoch)
  train_state = trainer.restore(source, progress.phase)
  logging.info('Resuming from epoch %d (phase %s) of the %s checkpoint.', progress.epoch,
               trainer.phases[progress.phase].name, source)
  return train_state, progress


def _train(trainer: Trainer, train_state: state.TrainState, progress: Progress) -> None:
  config = trainer.config
  # Judged against the current config, so a resumed run may be given more epochs.
  saved_phase_done = progress.phase_done(trainer.phases[progress.phase].num_epochs)
  for phase_index in range(progress.phase + saved_phase_done, len(trainer.phases)):
    phase = trainer.phases[phase_index]
    if phase_index != progress.phase:
      variables = {'params': train_state.params, 'batch_stats': train_state.batch_stats}
      train_state = steps.replicate(trainer.new_state(variables, phase_index, step=int(train_state.step)),
                                    trainer.mesh)
      # Early stopping on the same metric goes on from the best value so far; on another, it starts afresh.
      same_metric = phase.stopping.metric == trainer.phases[progress.phase].stopping.metric
      progress.start_phase(phase_index, keep_best=same_metric)
    rules = state.phase_rules(phase, config, progress)
    train_fn, eval_fn = trainer.phase_steps(phase, train_state)
    schedule = state.make_schedule(phase, trainer.steps_per_epoch)
    bar = tqdm(range(progress.phase_epoch, phase.num_epochs), desc=f'phase {phase.name}', unit='epoch',
               disable=not trainer.is_writer, initial=progress.phase_epoch, total=phase.num_epochs)
    for phase_epoch in bar:
      epoch = progress.epoch + 1
      started = time.time()
      train_state, train_scores = _train_epoch(trainer, train_fn, train_state, epoch)
      val = metrics.split_metrics(steps.split_outputs(eval_fn, train_state, trainer.inputs['val'],
                                                      config.eval_batch_size), config.label_smoothing, 'val')
      # The rate this epoch ended with: the plateau rule's, or the schedule's at the epoch's last step.
      learning_rate = (rules.plateau.learning_rate if rules.plateau is not None
                       else float(schedule((phase_epoch + 1) * trainer.steps_per_epoch - 1)))
      improved = rules.update(val, epoch)
      if rules.plateau is not None:  # Set before the save, so a resumed run takes the same rate.
        train_state = state.with_learning_rate(train_state, rules.plateau.learning_rate)
      record = {'epoch': epoch, 'phase': phase.name, **train_scores, **val, 'learning_rate': learning_rate,
                'seconds': time.time() - started,
                # This process's, so far: the kept host memory (covid_jax/runtime.py) can grow when the heap fragments.
                'peak_host_memory_gib': runtime.peak_resident_bytes() / 2**30}
      progress.end_epoch(record, rules)
      trainer.checkpoints.save(epoch, _savable(train_state), progress.to_json(), is_best=improved)
      trainer.log_scalars({k: v for k, v in record.items() if isinstance(v, float)}, int(train_state.step))
      bar.set_postfix(loss=f'{record["train_loss"]:.3f}', val_acc=f'{val["val_accuracy"]:.3f}',
                      best=rules.best.best_epoch)
      if rules.stopper.should_stop:
        logging.info('Early stopping phase %s at epoch %d on %s (best epoch %d).', phase.name, epoch,
                     rules.stopper.metric, rules.best.best_epoch)
        break


def _train_epoch(trainer: Trainer, train_fn: Callable, train_state: state.TrainState,
                 epoch: int) -> tuple[state.TrainState, dict[str, float]]:
  """One epoch of steps; checks the loss for NaN/inf every log interval, before anything is saved."""
  config = trainer.config
  key = jax.random.fold_in(jax.random.key(config.seed), epoch)
  losses, accuracies = [], []
  step0 = int(train_state.step)
  batches = trainer.inputs['train'].train_epoch(config.batch_size, epoch, config.seed, flip=config.augment.flip,
                                                 contrast=config.augment.contrast)
  every = config.log_every_steps
  for i, batch in enumerate(batches):
    train_state, scores = train_fn(train_state, batch, jax.random.fold_in(key, i))
    losses.append(scores['loss'])
    accuracies.append(scores['accuracy'])
    if (i + 1) % every == 0:
      _check_finite(losses[-every:], step0 + i + 2 - every, trainer.workdir)
      trainer.log_scalars({'train/loss_step': float(np.mean(jax.device_get(losses[-every:])))}, step0 + i + 1)
  _check_finite(losses, step0 + 1, trainer.workdir)
  return train_state, {'train_loss': float(np.mean(jax.device_get(losses))),
                       'train_accuracy': float(np.mean(jax.device_get(accuracies)))}


def _check_finite(losses: list[jax.Array], first_step: int, workdir: str) -> None:
  values = np.asarray(jax.device_get(losses), np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    step = first_step + int(bad[0])
    raise NonFiniteLossError(f'loss is {values[bad[0]]} at step {step}; stopping. The last good checkpoint is '
                             f'kept under {os.path.join(workdir, "checkpoints")}.')


def _final_report(trainer: Trainer) -> dict[str, Any]:
  """Restores the best epoch (else the latest), evaluates it on test, and writes the run's report."""
  config = trainer.config
  best, latest = trainer.checkpoints.progress('best'), trainer.checkpoints.progress('latest')
  source = 'best' if best is not None else 'latest'
  chosen = best if best is not None else latest
  if chosen is None:
    raise RuntimeError(f'no checkpoint in {trainer.workdir}: nothing was trained (num_epochs is 0?)')
  last = latest if latest is not None else best  # None only when a run resumed from its best ends at once.
  # The best checkpoint's progress is as of that epoch; its phase tells which optimiser state it holds.
  train_state = trainer.restore(source, chosen['phase'])
  _, eval_fn = trainer.compile_steps(trainer.phases[chosen['phase']])
  outputs = {split: steps.split_outputs(eval_fn, train_state, trainer.readers[split], config.eval_batch_size,
                                        keep_images=split == 'test') for split in ('val', 'test')}
  val, test = (predictions.from_outputs(outputs[split], config.data_dir, split) for split in ('val', 'test'))
  # Threshold and temperature from val alone: the test labels cannot move them.
  decision = scoring.decide_on_val(val.label, val.logits, config.threshold.rule, config.threshold.target)
  details = {
      'best_epoch': chosen['epoch'],
      'checkpoint': source,
      'monitored_metric': state.checkpoint_metric(config),
      'split_sizes': {split: reader.num_examples for split, reader in trainer.readers.items()},
      'model': config.model.name,
  }
  result = reporting.final_report(trainer.workdir, outputs['test'], val, test, decision, last['history'], details,
                                  seed=config.seed, grid_size=config.prediction_grid_size, write=trainer.is_writer)
  if trainer.is_writer:
    if config.gradcam_grid_size:
      test_local = outputs['test']
      predicted = metrics.predict(scoring.calibrated_probability(test_local['local_logits'], decision.temperature),
                                  decision.threshold)
      gradcam.write_run_grid(trainer.workdir, trainer.model, {'params': train_state.params,
                                                              'batch_stats': train_state.batch_stats},
                             test_local['local_image'], test_local['local_label'], predicted,
                             count=config.gradcam_grid_size, seed=config.seed)
    run_report.write(trainer.workdir, config, result)
  return result
