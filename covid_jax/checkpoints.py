"""Run checkpoints: the latest epoch (to resume) and the best epoch (to evaluate).

Two Orbax CheckpointManagers under RUN/checkpoints: `latest/` keeps only the last
completed epoch, `best/` only the epoch that early stopping last called an
improvement — so "best" means exactly what the training log says it means.
Each checkpoint holds the train state, a JSON record of the run's progress, and
the run's record (`covid_jax.workdir.run_record`: its config and data digest).
"""

import os
import shutil
import sys
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

STATE, PROGRESS, RUN = 'state', 'progress', 'run'
WHICH = ('latest', 'best')


_closed_loop_callbacks_hidden = False


def _hide_closed_loop_callbacks() -> None:
  """Drops the 'Event loop is closed' errors TensorStore reports for reads still pending after one failed.

  Orbax closes its event loop on the first error; each pending read then fails to call back into it and
  reports the error (uncaught in any thread, or unraisable): hundreds of lines that bury the one that matters.
  Installed once, before the first read.
  """
  def closed_loop(value: BaseException | None) -> bool:
    return isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'

  global _closed_loop_callbacks_hidden
  if _closed_loop_callbacks_hidden:
    return
  _closed_loop_callbacks_hidden = True
  previous_excepthook, previous_unraisablehook = sys.excepthook, sys.unraisablehook
  previous_threading_excepthook = threading.excepthook

  def excepthook(kind: type[BaseException], value: BaseException, traceback: Any) -> None:
    if not closed_loop(value):
      previous_excepthook(kind, value, traceback)

  def unraisablehook(unraisable: Any) -> None:
    if not closed_loop(unraisable.exc_value):
      previous_unraisablehook(unraisable)

  def threading_excepthook(failed: Any) -> None:
    if not closed_loop(failed.exc_value):
      previous_threading_excepthook(failed)

  sys.excepthook, sys.unraisablehook, threading.excepthook = excepthook, unraisablehook, threading_excepthook


def _manager(directory: str) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory, options=options, item_names=(STATE, PROGRESS, RUN))


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be read; the message names it, the file and the way on."""


class OlderCheckpointError(RuntimeError):
  """A checkpoint written before checkpoints held the run's record: not resumable with a check."""


class RunCheckpoints:
  """Saves and restores (state, progress) pairs keyed by completed epoch: 'latest' and 'best'.

  One object per run, open from the first epoch until the report is written; `close` ends it.
  """

  def __init__(self, workdir: str, record: dict[str, Any]):
    """`record` is the run's record, saved with every checkpoint."""
    self.root = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.record = record
    self._managers = {which: _manager(os.path.join(self.root, which)) for which in WHICH}

  def save(self, epoch: int, state: Any, progress: dict[str, Any], is_best: bool) -> None:
    """Writes epoch `epoch` as the latest checkpoint, and as the best one when `is_best`.

    A save that Orbax skips (a step at or below one it holds already) is an error, not silence. A run
    killed between the two writes leaves a latest epoch that is also the best; `complete_best` copies it.

    On one host the (replicated) state is saved as NumPy arrays, which Orbax writes faster than
    jax.Arrays. Several hosts save jax.Arrays, whose writes Orbax coordinates across processes. Either
    way `restore` puts the state where its abstract state's shardings say, on whatever devices.
    """
    if jax.process_count() == 1:
      state = jax.device_get(state)
    args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), PROGRESS: ocp.args.JsonSave(progress),
                                 RUN: ocp.args.JsonSave(self.record)})
    for which in ('latest', 'best') if is_best else ('latest',):
      manager = self._managers[which]
      if not manager.save(epoch, args=args):
        raise RuntimeError(f'epoch {epoch} was not saved: {manager.directory} holds step {manager.latest_step()} '
                           'already, from another run')

  def complete_best(self, best_epoch: int | None) -> None:
    """Makes 'best' hold `best_epoch`, the best epoch the latest checkpoint's progress names.

    Where a run was killed after its latest save and before its best one, that epoch is the latest
    checkpoint, which is copied. Where neither holds it, the best epoch's weights are lost: an error.
    """
    best, latest = self._managers['best'], self._managers['latest']
    if best_epoch is None or best.latest_step() == best_epoch:
      return
    if latest.latest_step() != best_epoch:
      raise CorruptCheckpointError(
          f'the run\'s best epoch is {best_epoch}, but {best.directory} holds {best.latest_step()} and '
          f'{latest.directory} holds {latest.latest_step()}: the best epoch\'s weights are gone, so the run cannot '
          'report it. Start the run afresh in another --workdir.')
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

  def step(self, which: str) -> int | None:
    """The epoch the `which` ('latest' or 'best') checkpoint holds, or None where there is none yet."""
    return self._managers[which].latest_step()

  def saved(self, which: str) -> dict[str, Any] | None:
    """{'progress': ..., 'run': ...} of the `which` checkpoint, or None where there is none yet."""
    step = self.step(which)
    if step is None:
      return None
    folder = os.path.join(self.root, which, str(step))
    if not os.path.isdir(os.path.join(folder, RUN)):
      raise OlderCheckpointError(f'checkpoint {folder} predates the run record that each checkpoint now holds '
                                 '(config and data digest), so whether this run may resume it cannot be checked: '
                                 'give this run another --workdir')
    return self._read(which, step, {PROGRESS: ocp.args.JsonRestore(), RUN: ocp.args.JsonRestore()})

  def progress(self, which: str) -> dict[str, Any] | None:
    """The progress record of the `which` checkpoint, or None where there is none yet."""
    saved = self.saved(which)
    return None if saved is None else saved[PROGRESS]

  def restore(self, which: str, abstract_state: Any) -> Any:
    """The `which` checkpoint's state, shaped and placed as `abstract_state` (jax.ShapeDtypeStructs with shardings)."""
    return self._read(which, self.step(which), {STATE: ocp.args.StandardRestore(abstract_state)})[STATE]

  def _read(self, which: str, step: int, items: dict[str, Any]) -> dict[str, Any]:
    # Before the read: a failed read's pending callbacks may report from other threads at once.
    _hide_closed_loop_callbacks()
    try:
      return dict(self._managers[which].restore(step, args=ocp.args.Composite(**items)))
    except Exception as e:  # Orbax and TensorStore raise many types; the message names the file.
      raise CorruptCheckpointError(self._corrupt_message(which, step, e)) from None

  def _corrupt_message(self, which: str, step: int, error: Exception) -> str:
    folder = os.path.join(self.root, which, str(step))
    # TensorStore appends its whole JSON spec to the message: the part before it names the file.
    reason = (str(error).strip().splitlines() or [''])[0].split(' [tensorstore_spec=')[0]
    aside = os.path.join(os.path.dirname(self.root), f'corrupt-{which}-{step}')
    best = self.step('best')
    if which == 'latest' and best is not None and best <= step:
      way_on = (f'To resume from the best checkpoint (epoch {best}), move {folder} out of the way (e.g. '
                f'`mv {folder} {aside}`) and rerun the same command: epochs after {best} are trained again, '
                'to the same result.')
    elif which == 'best':
      way_on = (f'Move {folder} out of the way (e.g. `mv {folder} {aside}`) and rerun the same command: the run '
                f'takes epoch {step} from {os.path.join(self.root, "latest")} where that still holds it.')
    else:
      way_on = 'No other checkpoint of this run is left: start it afresh in another --workdir.'
    return f'checkpoint {folder} cannot be read ({type(error).__name__}: {reason}). {way_on}'

  def close(self) -> None:
    for manager in self._managers.values():
      manager.close()
