"""The train state, the run's phases, their optimisers and schedules, and which parameters each phase trains.

With `freeze_backbone`, phase 'head' trains the head on a frozen backbone and
phase 'fine_tune' then unfreezes the trailing backbone layers; otherwise one
phase 'train' trains everything. Each phase has its own optimiser and cosine
schedule; frozen parameters get no optimiser state and no updates.
"""

import dataclasses
import enum
import functools
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from flax import struct, traverse_util
from flax.training import train_state

OPTIMIZERS = ('adam', 'adamw', 'sgd')


class TrainState(train_state.TrainState):
  batch_stats: Any
  # Paths of the parameters the optimiser trains, such as ('head', 'dense_1', 'kernel'): the gradient
  # program differentiates only these. Static, so it is part of the compiled programs' signature.
  trainable: frozenset[tuple[str, ...]] = struct.field(pytree_node=False)


class Trainable(enum.Enum):
  """What a phase trains."""

  ALL = 'all'  # Backbone and head; the backbone's BatchNorm on batch statistics.
  HEAD = 'head'  # The head only; the backbone frozen, in inference mode, its gradient cut.
  TRAILING = 'trailing'  # The fine-tune layers (trailing backbone layers, BatchNorm excluded) and the head.


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stretch of training with its own optimiser and learning-rate schedule."""

  name: str
  num_epochs: int
  learning_rate: float
  end_learning_rate: float
  warmup_epochs: float
  trainable: Trainable


def make_phases(config: ml_collections.ConfigDict) -> list[Phase]:
  """The run's phases from the config."""
  first = functools.partial(Phase, num_epochs=config.num_epochs, learning_rate=config.learning_rate,
                            end_learning_rate=config.end_learning_rate, warmup_epochs=config.warmup_epochs)
  if not config.freeze_backbone:
    return [first(name='train', trainable=Trainable.ALL)]
  phases = [first(name='head', trainable=Trainable.HEAD)]
  ft = config.fine_tune
  if ft.num_epochs > 0:
    phases.append(Phase('fine_tune', ft.num_epochs, ft.learning_rate, ft.end_learning_rate, ft.warmup_epochs,
                        Trainable.TRAILING))
  return phases


def param_labels(params: Any, batch_stats: Any, layer_order: list[str], phase: Phase,
                 unfreeze_layers: int) -> Any:
  """'train' or 'freeze' for each parameter leaf in `phase`.

  The fine-tune phase unfreezes the last `unfreeze_layers` backbone layers that
  have weights, BatchNorm excluded (it stays frozen and in inference mode, as
  in the study); -1 unfreezes them all.
  """
  if phase.trainable == Trainable.TRAILING:
    batch_norms = set(batch_stats.get('backbone', {}))
    candidates = [name for name in layer_order if name in params['backbone'] and name not in batch_norms]
    unfrozen = set(candidates if unfreeze_layers < 0 else candidates[len(candidates) - unfreeze_layers:])
  else:
    unfrozen = set(params['backbone']) if phase.trainable == Trainable.ALL else set()
  return {
      'backbone': {name: jax.tree.map(lambda _, n=name: 'train' if n in unfrozen else 'freeze', tree)
                   for name, tree in params['backbone'].items()},
      'head': jax.tree.map(lambda _: 'train', params['head']),
  }


def make_schedule(phase: Phase, steps_per_epoch: int) -> optax.Schedule:
  """Cosine decay from learning_rate to end_learning_rate over the phase, after optional linear warm-up."""
  total = max(phase.num_epochs * steps_per_epoch, 1)
  warmup = int(phase.warmup_epochs * steps_per_epoch)
  if warmup:
    return optax.warmup_cosine_decay_schedule(0.0, phase.learning_rate, warmup, total, phase.end_learning_rate)
  return optax.cosine_decay_schedule(phase.learning_rate, total, alpha=phase.end_learning_rate / phase.learning_rate)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   labels: Any) -> optax.GradientTransformation:
  """The configured optimiser on 'train' leaves; frozen leaves get zero updates and no optimiser state."""
  base = {
      'adam': lambda: optax.adam(schedule),
      'adamw': lambda: optax.adamw(schedule, weight_decay=config.weight_decay),
      'sgd': lambda: optax.chain(optax.add_decayed_weights(config.weight_decay), optax.sgd(schedule, momentum=0.9)),
  }[config.optimizer]()
  return optax.multi_transform({'train': base, 'freeze': optax.set_to_zero()}, labels)


def make_state(model: nn.Module, config: ml_collections.ConfigDict, variables: dict[str, Any], phase: Phase,
               layer_order: list[str], steps_per_epoch: int) -> TrainState:
  """A fresh train state for `phase` on `variables`: the phase's schedule, and its optimiser on trainable leaves.

  `layer_order` (the backbone's layers in Keras's order, `keras_models.layer_order`) matters only to the
  fine-tune phase, which unfreezes trailing layers.
  """
  batch_stats = variables.get('batch_stats', {})  # Absent without BatchNorm (VGG16 under a head without BN).
  labels = param_labels(variables['params'], batch_stats, layer_order, phase, config.fine_tune.unfreeze_layers)
  tx = make_optimizer(config, make_schedule(phase, steps_per_epoch), labels)
  trainable = frozenset(path for path, label in traverse_util.flatten_dict(labels).items() if label == 'train')
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=batch_stats, trainable=trainable)
