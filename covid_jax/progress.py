"""What a run has done so far, and the early-stopping rule that decides when a phase ends.

`Progress` is saved beside every checkpoint (as JSON), so a run restarted on its
workdir resumes where it stopped and its report reads the same history.
"""

import dataclasses
import math
from typing import Any

# Monitored metric -> True when larger is better.
MONITORED = {'val_accuracy': True, 'val_roc_auc': True, 'val_loss': False}


@dataclasses.dataclass
class EarlyStopping:
  """Keras-style early stopping on a validation metric, written out so its rule is visible.

  An epoch improves when its value beats the best so far by more than
  `min_delta`; after `patience` epochs in a phase without improvement the phase
  stops. The best value is kept across phases, so "best" names one epoch of the run.
  """

  metric: str
  patience: int
  min_delta: float = 0.0
  best_value: float | None = None
  best_epoch: int | None = None
  wait: int = 0

  def update(self, value: float, epoch: int) -> bool:
    """Records `value` for `epoch`; True if it is an improvement (a new best)."""
    sign = 1.0 if MONITORED[self.metric] else -1.0
    if self.best_value is None or sign * (value - self.best_value) > self.min_delta:
      self.best_value, self.best_epoch, self.wait = value, epoch, 0
      return True
    self.wait += 1
    return False

  @property
  def should_stop(self) -> bool:
    return self.wait >= self.patience

  def start_phase(self) -> None:
    self.wait = 0

  def state(self) -> dict[str, Any]:
    """What a resumed run needs to go on with the same rule: best value, best epoch, epochs waited."""
    return {'best_value': self.best_value, 'best_epoch': self.best_epoch, 'wait': self.wait}


@dataclasses.dataclass
class Progress:
  """Epochs completed, the current phase, each epoch's record, and the early-stopping state."""

  epoch: int = 0  # Epochs completed in the run.
  phase: int = 0  # Index of the current phase.
  phase_epoch: int = 0  # Epochs completed in the current phase.
  stopped_early: bool = False  # The current phase stopped on early stopping.
  history: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # One record per epoch.
  early_stopping: dict[str, Any] = dataclasses.field(default_factory=dict)  # `EarlyStopping.state()`.

  def start_phase(self, phase: int) -> None:
    self.phase, self.phase_epoch, self.stopped_early = phase, 0, False

  def end_epoch(self, record: dict[str, Any], stopper: EarlyStopping) -> None:
    """Appends the epoch's `record` and takes the stopper's state after it."""
    self.history.append(record)
    self.epoch, self.phase_epoch = record['epoch'], self.phase_epoch + 1
    self.stopped_early = stopper.should_stop
    self.early_stopping = stopper.state()

  def phase_done(self, num_epochs: int) -> bool:
    """Whether the current phase is over: stopped early, or `num_epochs` (today's config) reached."""
    return self.stopped_early or self.phase_epoch >= num_epochs

  def to_json(self) -> dict[str, Any]:
    """A plain dict for the checkpoint; NaN (an undefined AUC) becomes None: JSON has no NaN."""
    return _json_safe(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, saved: dict[str, Any]) -> 'Progress':
    return cls(**saved)


def _json_safe(value: Any) -> Any:
  if isinstance(value, float) and math.isnan(value):
    return None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value
