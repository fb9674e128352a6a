"""What a run has done so far, and the epoch rules that read its val metrics: the best checkpoint's monitor,
early stopping (when a phase ends) and the plateau schedule (the fine-tune phase's learning rate).

`Progress` is saved beside every checkpoint (as JSON), so a run restarted on its
workdir resumes where it stopped, with each rule's state, and its report reads the same history.
"""

import dataclasses
import math
from typing import Any

import numpy as np

# Monitored metric -> True when larger is better.
MONITORED = {'val_accuracy': True, 'val_roc_auc': True, 'val_loss': False}


def improves(metric: str, value: float, best: float | None, min_delta: float) -> bool:
  """Keras's rule: `value` of `metric` beats `best` by more than `min_delta` (any value beats no best yet)."""
  sign = 1.0 if MONITORED[metric] else -1.0
  return best is None or sign * (value - best) > min_delta


@dataclasses.dataclass
class Monitor:
  """The best value of a validation metric so far and its epoch; the best checkpoint follows one over the run."""

  metric: str
  min_delta: float = 0.0
  best_value: float | None = None
  best_epoch: int | None = None

  def update(self, value: float, epoch: int) -> bool:
    """Records `value` for `epoch`; True if it beats the best by more than `min_delta` (a new best)."""
    if improves(self.metric, value, self.best_value, self.min_delta):
      self.best_value, self.best_epoch = value, epoch
      return True
    return False

  def state(self) -> dict[str, Any]:
    """What a resumed run needs to go on with the same monitor."""
    return {'best_value': self.best_value, 'best_epoch': self.best_epoch}


@dataclasses.dataclass
class EarlyStopping:
  """Keras-style early stopping on a validation metric, written out so its rule is visible.

  An epoch improves when its value beats the best so far by more than
  `min_delta`; after `patience` epochs in a phase without improvement the phase
  stops. The best value is kept across phases that stop on the same metric.
  """

  metric: str
  patience: int
  min_delta: float = 0.0
  best_value: float | None = None
  best_epoch: int | None = None
  wait: int = 0

  def update(self, value: float, epoch: int) -> bool:
    """Records `value` for `epoch`; True if it is an improvement (a new best)."""
    if improves(self.metric, value, self.best_value, self.min_delta):
      self.best_value, self.best_epoch, self.wait = value, epoch, 0
      return True
    self.wait += 1
    return False

  @property
  def should_stop(self) -> bool:
    return self.wait >= self.patience

  def state(self) -> dict[str, Any]:
    """What a resumed run needs to go on with the same rule: best value, best epoch, epochs waited."""
    return {'best_value': self.best_value, 'best_epoch': self.best_epoch, 'wait': self.wait}


@dataclasses.dataclass
class ReduceOnPlateau:
  """Keras's ReduceLROnPlateau callback, judged once per epoch: the learning rate for the epochs that follow.

  An epoch improves as `improves` says (Keras's default min_delta is 1e-4). Outside a cooldown, `patience` epochs
  without one multiply the rate by `factor`, not below `min_learning_rate` (a rate already at or below it stays);
  the `cooldown` epochs after a reduction each restart the count, and only the last of them is counted (so, as in
  Keras, a cooldown of 1 changes nothing). The rate is float32, as Keras's optimiser holds it.
  """

  metric: str
  factor: float
  patience: int
  cooldown: int
  min_learning_rate: float
  min_delta: float
  learning_rate: float
  best_value: float | None = None
  wait: int = 0
  cooldown_counter: int = 0

  def update(self, value: float) -> float:
    """Takes the epoch's `value` of the metric; returns the learning rate from the next epoch on."""
    if self.cooldown_counter > 0:
      self.cooldown_counter -= 1
      self.wait = 0
    if improves(self.metric, value, self.best_value, self.min_delta):
      self.best_value, self.wait = value, 0
    elif self.cooldown_counter == 0:
      self.wait += 1
      if self.wait >= self.patience and self.learning_rate > np.float32(self.min_learning_rate):
        reduced = max(self.learning_rate * self.factor, self.min_learning_rate)
        self.learning_rate = float(np.float32(reduced))
        self.cooldown_counter, self.wait = self.cooldown, 0
    return self.learning_rate

  def state(self) -> dict[str, Any]:
    """What a resumed run needs to go on with the same rule: the rate, the best value and both counters."""
    return {'learning_rate': self.learning_rate, 'best_value': self.best_value, 'wait': self.wait,
            'cooldown_counter': self.cooldown_counter}


@dataclasses.dataclass
class PhaseRules:
  """The epoch rules in force during one phase: the run's best-checkpoint monitor, the phase's early stopping,
  and its plateau schedule (None: the phase's rate follows a fixed schedule)."""

  best: Monitor
  stopper: EarlyStopping
  plateau: ReduceOnPlateau | None = None

  def update(self, val: dict[str, float], epoch: int) -> bool:
    """Feeds each rule its metric from epoch `epoch`'s `val` scores; True if the epoch is the new best checkpoint."""
    self.stopper.update(val[self.stopper.metric], epoch)
    if self.plateau is not None:
      self.plateau.update(val[self.plateau.metric])
    return self.best.update(val[self.best.metric], epoch)


@dataclasses.dataclass
class Progress:
  """Epochs completed, the current phase, each epoch's record, and the state of the epoch rules."""

  epoch: int = 0  # Epochs completed in the run.
  phase: int = 0  # Index of the current phase.
  phase_epoch: int = 0  # Epochs completed in the current phase.
  stopped_early: bool = False  # The current phase stopped on early stopping.
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # One record per epoch.
  early_stopping: dict[str, Any] = dataclasses.field(default_factory=dict)  # The phase's `EarlyStopping.state()`.
  checkpoint: dict[str, Any] = dataclasses.field(default_factory=dict)  # The best checkpoint's `Monitor.state()`.
  plateau: dict[str, Any] = dataclasses.field(default_factory=dict)  # The phase's `ReduceOnPlateau.state()`.

  @property
  def best_epoch(self) -> int | None:
    """The epoch the best checkpoint holds."""
    return self.checkpoint.get('best_epoch')

  def start_phase(self, phase: int, keep_best: bool) -> None:
    """Moves to `phase`; its early stopping goes on from the best value so far when `keep_best`, else starts afresh."""
    self.phase, self.phase_epoch, self.stopped_early = phase, 0, False
    kept = {key: self.early_stopping[key] for key in ('best_value', 'best_epoch') if key in self.early_stopping}
    self.early_stopping = kept if keep_best else {}
    self.plateau = {}

  def end_epoch(self, record: dict[str, Any], rules: PhaseRules) -> None:
    """Appends the epoch's `record` and takes the rules' state after it."""
    self.history.append(record)
    self.epoch, self.phase_epoch = record['epoch'], self.phase_epoch + 1
    self.stopped_early = rules.stopper.should_stop
    self.early_stopping, self.checkpoint = rules.stopper.state(), rules.best.state()
    self.plateau = rules.plateau.state() if rules.plateau is not None else {}

  def phase_done(self, num_epochs: int) -> bool:
    """Whether the current phase is over: stopped early, or `num_epochs` (today's config) reached."""
    return self.stopped_early or self.phase_epoch >= num_epochs

  def to_json(self) -> dict[str, Any]:
    """A plain dict for the checkpoint; NaN (an undefined AUC) becomes None: JSON has no NaN."""
    return _json_safe(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, saved: dict[str, Any]) -> 'Progress':
    """The saved progress; one saved before the best checkpoint had its own monitor took it from early stopping."""
    saved = dict(saved)
    if 'checkpoint' not in saved:
      stopping = saved.get('early_stopping', {})
      saved['checkpoint'] = {key: stopping[key] for key in ('best_value', 'best_epoch') if key in stopping}
    return cls(**saved)


def _json_safe(value: Any) -> Any:
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value
