"""Run checkpoints: the latest epoch (to resume) and the best epoch (to evaluate).

Two Orbax CheckpointManagers under RUN/checkpoints: `latest/` keeps only the last
completed epoch, `best/` only the epoch that early stopping last called an
improvement — so "best" means exactly what the training log says it means.
Each checkpoint holds the train state and a JSON record of the run's progress.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

STATE, PROGRESS = 'state', 'progress'


def _manager(directory: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options, item_names=(STATE, PROGRESS))


class RunCheckpoints:
  """Saves and restores (state, progress) pairs keyed by completed epoch."""

  def __init__(self, workdir: str):
    root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.latest = _manager(os.path.join(root, 'latest'))
    self.best = _manager(os.path.join(root, 'best'))

  def save(self, epoch: int, state: Any, progress: dict[str, Any], is_best: bool) -> None:
    """Writes epoch `epoch` as the latest checkpoint, and as the best one when `is_best`.

    On one host the (replicated) state is saved as NumPy arrays: Orbax writes those 2.5x faster than
    jax.Arrays (the tests' tiny NASNet, 1,166 leaves: 1.4 s against 3.4 s per save). Restoring gives
    NumPy arrays, which the trainer puts back on its devices. Several hosts save jax.Arrays, whose writes
    Orbax coordinates across processes.
    """
    if jax.process_count() == 1:
      state = jax.device_get(state)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), PROGRESS: ocp.args.JsonSave(progress)})
    self.latest.save(epoch, args=args)
    if is_best:
      self.best.save(epoch, args=args)

  def latest_progress(self) -> dict[str, Any] | None:
    """The progress record of the latest checkpoint, or None on a fresh workdir."""
    return self._progress(self.latest)

  def best_progress(self) -> dict[str, Any] | None:
    return self._progress(self.best)

  def restore_latest(self, abstract_state: Any) -> Any:
    return self._restore(self.latest, abstract_state)

  def restore_best(self, abstract_state: Any) -> Any:
    return self._restore(self.best, abstract_state)

  def close(self) -> None:
    self.latest.close()
    self.best.close()

  @staticmethod
  def _progress(manager: ocp.CheckpointManager) -> dict[str, Any] | None:
    step = manager.latest_step()
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(**{PROGRESS: ocp.args.JsonRestore()}))[PROGRESS]

  @staticmethod
  def _restore(manager: ocp.CheckpointManager, abstract_state: Any) -> Any:
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]
