"""Run checkpoints: the latest epoch (to resume) and the best epoch (to evaluate).

Two Orbax CheckpointManagers under RUN/checkpoints: `latest/` keeps only the last
completed epoch, `best/` only the epoch that early stopping last called an
improvement — so "best" means exactly what the training log says it means.
Each checkpoint holds the train state and a JSON record of the run's progress.
"""

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

STATE, PROGRESS = 'state', 'progress'
WHICH = ('latest', 'best')


def _manager(directory: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options, item_names=(STATE, PROGRESS))


class RunCheckpoints:
  """Saves and restores (state, progress) pairs keyed by completed epoch: 'latest' and 'best'.

  One object per run, open from the first epoch until the report is written; `close` ends it.
  """

  def __init__(self, workdir: str):
    root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._managers = {which: _manager(os.path.join(root, which)) for which in WHICH}

  def save(self, epoch: int, state: Any, progress: dict[str, Any], is_best: bool) -> None:
    """Writes epoch `epoch` as the latest checkpoint, and as the best one when `is_best`.

    A save that Orbax skips (a step at or below one it holds already) is an error, not silence. A run
    killed between the two writes leaves a latest epoch that is also the best; `complete_best` copies it.

    On one host the (replicated) state is saved as NumPy arrays, which Orbax writes faster than
    jax.Arrays; restoring gives NumPy arrays, which the trainer puts back on its devices. Several hosts
    save jax.Arrays, whose writes Orbax coordinates across processes.
    """
    if jax.process_count() == 1:
      state = jax.device_get(state)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), PROGRESS: ocp.args.JsonSave(progress)})
    for which in ('latest', 'best') if is_best else ('latest',):
      manager = self._managers[which]
      if not manager.save(epoch, args=args):
        raise RuntimeError(f'epoch {epoch} was not saved: {manager.directory} holds step {manager.latest_step()} '
                           'already, from another run')

  def complete_best(self, best_epoch: int | None) -> None:
    """Makes 'best' hold `best_epoch`, the best epoch the latest checkpoint's progress names.

    Where a run was killed after its latest save and before its best one, that epoch is the latest
    checkpoint, which is copied. Any other disagreement is an error naming both folders.
    """
    best, latest = self._managers['best'], self._managers['latest']
    if best_epoch is None or best.latest_step() == best_epoch:
      return
    if latest.latest_step() != best_epoch:
      raise RuntimeError(f'{best.directory} holds step {best.latest_step()}, but the progress in {latest.directory} '
                         f'names epoch {best_epoch} as the best: the checkpoints are not one run\'s')
    if jax.process_index() == 0:
      partial = os.path.join(best.directory, f'{best_epoch}.partial-copy')
      shutil.rmtree(partial, ignore_errors=True)
      shutil.copytree(os.path.join(latest.directory, str(best_epoch)), partial)
      os.replace(partial, os.path.join(best.directory, str(best_epoch)))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('covid_jax.checkpoints.complete_best')
    best.reload()
    for step in best.all_steps():
      if step != best_epoch:
        best.delete(step)

  def progress(self, which: str) -> dict[str, Any] | None:
    """The progress record of the `which` ('latest' or 'best') checkpoint, or None where there is none yet."""
    manager = self._managers[which]
    step = manager.latest_step()
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(**{PROGRESS: ocp.args.JsonRestore()}))[PROGRESS]

  def restore(self, which: str, abstract_state: Any) -> Any:
    """The `which` checkpoint's state, shaped as `abstract_state` (a tree of jax.ShapeDtypeStruct)."""
    manager = self._managers[which]
    step = manager.latest_step()
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE]

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()
