"""A finished run's model as one of its checkpoints holds it, with the decision (threshold, temperature) it made.

What `predict`, `evaluate` and the Grad-CAM maps share: the run's config (config.json over configs/default.py),
its classifier, the variables of its best (or latest) checkpoint, and the evaluation step over all devices,
the one the run evaluated its splits with. The run's data need not be present.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from configs import default
from covid_jax import checkpoints, model_init, state, steps
from covid_jax.models.classifier import Classifier
from covid_jax.scoring import Decision, calibrated_probability

# Where a run has made no decision (it predates the choice on val): the study's threshold, raw probabilities.
UNDECIDED = Decision(threshold=0.5, temperature=1.0, rule='fixed')


class RunError(ValueError):
  """A workdir that holds no finished run to use; the message names the file and what is wrong."""


@dataclasses.dataclass
class TrainedRun:
  """One checkpoint of a finished run, ready to score images."""

  workdir: Path
  config: ml_collections.ConfigDict
  model: Classifier
  variables: dict[str, Any]  # {'params': ..., 'batch_stats': ...} as host arrays.
  checkpoint: str  # 'best' or 'latest'.
  decision: Decision
  decision_source: str  # Where `decision` comes from, for the outputs to say.

  def covid_probability(self, logits: np.ndarray) -> np.ndarray:
    """The calibrated COVID probability the run's decision thresholds."""
    return calibrated_probability(logits, self.decision.temperature)

  def is_covid(self, probability: np.ndarray) -> np.ndarray:
    return np.asarray(probability) > self.decision.threshold

  def eval_state(self, mesh: jax.sharding.Mesh) -> state.TrainState:
    """The variables as the evaluation step takes them, replicated over `mesh` (no optimiser)."""
    fresh = state.TrainState.create(apply_fn=self.model.apply, params=self.variables['params'],
                                    tx=optax.set_to_zero(), batch_stats=self.variables['batch_stats'],
                                    trainable=frozenset())
    return steps.replicate(fresh, mesh)

  def eval_fn(self, mesh: jax.sharding.Mesh) -> Any:
    """The run's evaluation step over `mesh`: (state, {'image': float32 batch}) -> logits."""
    phase = state.make_phases(self.config)[0]
    return steps.compile_steps(mesh, phase, self.config, separate_update=False)[1]


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The run's config: its config.json over configs/default.py."""
  path = Path(workdir) / 'config.json'
  if not path.is_file():
    raise RunError(f'{path} not found: {workdir} holds no run trained with `python -m covid_jax.main`')
  config = default.get_config()
  try:
    config.update(ml_collections.ConfigDict(json.loads(path.read_text())))
  except (KeyError, TypeError, ValueError) as e:
    raise RunError(f'{path} does not fit configs/default.py: {e}') from None
  return config


def load_decision(workdir: str | Path) -> tuple[Decision, str]:
  """The threshold and temperature the run chose on val (test_metrics.json's 'decision'), and their source.

  A run that made no such decision gets threshold 0.5 on raw probabilities (UNDECIDED), and says so.
  """
  path = Path(workdir) / 'test_metrics.json'
  saved = json.loads(path.read_text()).get('decision') if path.is_file() else None
  if saved is None:
    return UNDECIDED, f'none in {path}: threshold 0.5 on uncalibrated probabilities'
  return Decision.from_json(saved), f'{path} (chosen on {saved.get("chosen_on", "val")})'


def load(workdir: str | Path, which: str = 'best') -> TrainedRun:
  """The run in `workdir` as its `which` ('best' or 'latest') checkpoint holds it."""
  if which not in checkpoints.WHICH:
    raise RunError(f'checkpoint must be one of {", ".join(checkpoints.WHICH)}, got {which!r}')
  workdir = Path(workdir)
  config = load_config(workdir)
  run = checkpoints.RunCheckpoints(str(workdir), record={})
  try:
    if run.step(which) is None:
      raise RunError(f'{run.root}/{which} holds no checkpoint: train the run first')
    saved = run.restore(which, None)  # As saved: host arrays, no target structure needed.
  finally:
    run.close()
  model = model_init.create_model(config)
  variables = {'params': saved['params'], 'batch_stats': saved.get('batch_stats', {})}
  decision, source = load_decision(workdir)
  return TrainedRun(workdir, config, model, variables, which, decision, source)


def keep_tensorflow_off_accelerators() -> None:
  """Hides the GPUs from TensorFlow, which only decodes and resizes images here: they are JAX's."""
  import tensorflow as tf  # Loaded by the input pipeline anyway; imported here for the setting alone.
  tf.config.set_visible_devices([], 'GPU')
