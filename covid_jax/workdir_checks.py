"""What a workdir holds and whose run it is, checked before a run writes to it.

Every checkpoint stores the run's record (`run_record`: the config and the
digest of the data's manifest.json). A rerun on the same workdir resumes only if
its record matches, key by key, except for the keys in `MAY_CHANGE`: settings
that change neither the model, the data nor the arithmetic a resumed run repeats.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

# Keys a resumed run may change: GROW only to a value at least the saved one, ANY freely.
GROW, ANY = 'may grow', 'may change'
MAY_CHANGE = {
    'num_epochs': GROW,
    'fine_tune.num_epochs': GROW,
    'early_stopping.patience': GROW,
    'data_dir': ANY,  # Where the data lives; what it is may not change (the manifest digest is compared).
    'eval_batch_size': ANY,
    'log_every_steps': ANY,
    'prediction_grid_size': ANY,
    'gradcam_grid_size': ANY,
    'retain_freed_host_memory': ANY,
    'compilation_cache_dir': ANY,
    'formulations.*': ANY,  # The same numbers to rounding, formulated for another machine.
    'threshold.*': ANY,  # Chosen after training, on val.
}
MANIFEST_KEY = 'data manifest.json sha256'
# What a finished or started run leaves beside its checkpoints.
RUN_FILES = ('test_metrics.json', 'history.json')


class WorkdirError(ValueError):
  """The workdir cannot hold this run: a file, another run's leftovers, or a run with other settings."""


def run_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The flattened config (JSON values) and the manifest digest: what a resumed run must agree with."""
  record = json.loads(json.dumps(flatten(config.to_dict())))
  manifest = Path(config.data_dir) / 'manifest.json'
  record[MANIFEST_KEY] = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
  return record


def check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
  """Raises WorkdirError naming every key whose current value the saved run's record does not allow."""
  problems = []
  for key in sorted(saved.keys() | current.keys()):
    old, new = saved.get(key, '(absent)'), current.get(key, '(absent)')
    if old == new:
      continue
    rule = MAY_CHANGE.get(key) or MAY_CHANGE.get(key.split('.')[0] + '.*')
    if (rule == ANY or rule == GROW and isinstance(new, int) and new >= old) and '(absent)' not in (old, new):
      continue
    allowed = f' ({rule})' if rule is not None else ''
    problems.append(f'{key}: {old!r} in the saved run, {new!r} now{allowed}')
  if problems:
    raise WorkdirError(
        f'{where} holds a run made with other settings, so resuming would mix two runs:\n  ' + '\n  '.join(problems)
        + '\nRerun with the saved settings (its config.json), or give this run another --workdir.')


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that is a file, or that holds a run's report or history but no checkpoint to resume."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'workdir {workdir} exists and is not a directory')
  leftovers = [name for name in RUN_FILES if os.path.exists(os.path.join(workdir, name))]
  checkpoints = Path(workdir, 'checkpoints')
  has_checkpoint = any(step.name.isdigit() for step in checkpoints.glob('*/*'))
  if leftovers and not has_checkpoint:
    raise WorkdirError(f'workdir {workdir} holds {", ".join(leftovers)} of another run but no checkpoints to '
                       'resume from: give this run another --workdir, or delete those files to start afresh there')


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """A nested config (dicts) as one dict of dotted keys: {'model': {'name': x}} -> {'model.name': x}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat
