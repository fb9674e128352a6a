"""The train state, the run's phases, their optimisers and schedules, and which parameters each phase trains.

With `freeze_backbone`, phase 'head' trains the head on a frozen backbone and
phase 'fine_tune' then unfreezes the trailing backbone layers; otherwise one
phase 'train' trains everything. Each phase has its own optimiser, learning-rate
schedule (cosine, or for the fine-tune phase Keras's ReduceLROnPlateau, driven
from the host once per epoch) and early-stopping rule; frozen parameters get no
optimiser state and no updates.
"""

import dataclasses
import enum
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct, traverse_util
from flax.training import train_state

from covid_jax import progress
from covid_jax.models.classifier import Classifier

OPTIMIZERS = ('adam', 'adamw', 'sgd')
# How config.fine_tune.unfreeze_layers counts: 'weighted' counts the backbone's layers with weights, BatchNorm
# excluded; 'study' counts every layer of the whole Keras model (weightless ones and the head's included), as the
# study's `for layer in model.layers[-N:]` did, and unfreezes the backbone's weighted non-BatchNorm layers among them.
LAYER_RULES = ('weighted', 'study')
SCHEDULES = ('cosine', 'plateau')


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
class StopRule:
  """When a phase stops early: `patience` epochs without `metric` improving by more than `min_delta`."""

  metric: str
  patience: int
  min_delta: float


@dataclasses.dataclass(frozen=True)
class PlateauRule:
  """Keras's ReduceLROnPlateau: after `patience` epochs without `metric` improving by more than `min_delta`, the
  learning rate is multiplied by `factor` (not below `min_learning_rate`); `progress.ReduceOnPlateau` has the rule."""

  metric: str
  factor: float
  patience: int
  cooldown: int
  min_learning_rate: float
  min_delta: float


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stretch of training with its own optimiser, learning-rate schedule and early-stopping rule."""

  name: str
  num_epochs: int
  learning_rate: float
  end_learning_rate: float
  warmup_epochs: float
  trainable: Trainable
  stopping: StopRule
  plateau: PlateauRule | None = None  # None: cosine decay to end_learning_rate.


def make_phases(config: ml_collections.ConfigDict) -> list[Phase]:
  """The run's phases from the config."""
  stopping = StopRule(config.early_stopping.metric, config.early_stopping.patience, config.early_stopping.min_delta)
  first = functools.partial(Phase, num_epochs=config.num_epochs, learning_rate=config.learning_rate,
                            end_learning_rate=config.end_learning_rate, warmup_epochs=config.warmup_epochs,
                            stopping=stopping)
  if not config.freeze_backbone:
    return [first(name='train', trainable=Trainable.ALL)]
  phases = [first(name='head', trainable=Trainable.HEAD)]
  ft = config.fine_tune
  if ft.num_epochs > 0:
    _check_fine_tune(ft)
    phases.append(Phase('fine_tune', ft.num_epochs, ft.learning_rate, ft.end_learning_rate, ft.warmup_epochs,
                        Trainable.TRAILING, _fine_tune_stopping(ft, stopping), _plateau_rule(ft)))
  return phases


def _check_fine_tune(ft: ml_collections.ConfigDict) -> None:
  """Fails at the start of a run, naming the key, on fine_tune values its second phase could only trip over."""
  allowed = {'layer_rule': (ft.layer_rule, LAYER_RULES), 'schedule': (ft.schedule, SCHEDULES),
             'plateau_metric': (ft.plateau_metric, tuple(progress.MONITORED)),
             'early_stopping.metric': (ft.early_stopping.metric, (None, *progress.MONITORED))}
  for key, (value, values) in allowed.items():
    if value not in values:
      raise ValueError(f'fine_tune.{key} {value!r}: one of {values}')
  if not 0 < ft.plateau_factor < 1:
    raise ValueError(f'fine_tune.plateau_factor {ft.plateau_factor}: between 0 and 1 (Keras refuses a factor >= 1)')


def _fine_tune_stopping(ft: ml_collections.ConfigDict, first: StopRule) -> StopRule:
  """fine_tune.early_stopping's keys where set, else the first phase's rule."""
  own = {key: value for key, value in ft.early_stopping.items() if value is not None}
  return dataclasses.replace(first, **own)


def _plateau_rule(ft: ml_collections.ConfigDict) -> PlateauRule | None:
  if ft.schedule == 'cosine':
    return None
  return PlateauRule(ft.plateau_metric, ft.plateau_factor, ft.plateau_patience, ft.plateau_cooldown,
                     ft.plateau_min_learning_rate, ft.plateau_min_delta)


def checkpoint_metric(config: ml_collections.ConfigDict) -> str:
  """The metric the best checkpoint is chosen by: early_stopping.checkpoint_metric, else early_stopping.metric."""
  return config.early_stopping.checkpoint_metric or config.early_stopping.metric


def phase_rules(phase: Phase, config: ml_collections.ConfigDict, saved: progress.Progress) -> progress.PhaseRules:
  """The epoch rules of `phase`, going on from the state `saved` holds (a fresh phase's is empty)."""
  stop = phase.stopping
  rules = progress.PhaseRules(
      best=progress.Monitor(checkpoint_metric(config), config.early_stopping.min_delta, **saved.checkpoint),
      stopper=progress.EarlyStopping(stop.metric, stop.patience, stop.min_delta, **saved.early_stopping))
  if phase.plateau is not None:
    start = {'learning_rate': float(np.float32(phase.learning_rate)), **saved.plateau}
    rules.plateau = progress.ReduceOnPlateau(**dataclasses.asdict(phase.plateau), **start)
  return rules


def unfrozen_layers(layer_order: list[str], weighted: set[str], batch_norms: set[str], unfreeze_layers: int,
                    layer_rule: str = 'weighted') -> set[str]:
  """The backbone layers the fine-tune phase trains: weighted, not BatchNorm, and among the trailing layers.

  `layer_order` is Keras's `model.layers` order. Under 'weighted' the last `unfreeze_layers` of the candidates
  count; under 'study' the last `unfreeze_layers` names of `layer_order` (the whole model's layers, weightless
  and head layers included) are the window the candidates must fall in. -1 unfreezes every candidate.
  """
  if layer_rule not in LAYER_RULES:
    raise ValueError(f'fine_tune.layer_rule {layer_rule!r}: one of {LAYER_RULES}')
  candidates = [name for name in layer_order if name in weighted and name not in batch_norms]
  if unfreeze_layers < 0:
    return set(candidates)
  counted = candidates if layer_rule == 'weighted' else layer_order
  window = set(counted[max(len(counted) - unfreeze_layers, 0):])
  return {name for name in candidates if name in window}


def param_labels(params: Any, batch_stats: Any, layer_order: list[str], phase: Phase,
                 unfreeze_layers: int, layer_rule: str = 'weighted') -> Any:
  """'train' or 'freeze' for each parameter leaf in `phase`.

  The fine-tune phase unfreezes the trailing backbone layers `unfrozen_layers` names; BatchNorm stays frozen
  and in inference mode, as in the study. The head trains in every phase.
  """
  if phase.trainable == Trainable.TRAILING:
    unfrozen = unfrozen_layers(layer_order, set(params['backbone']), set(batch_stats.get('backbone', {})),
                               unfreeze_layers, layer_rule)
  else:
    unfrozen = set(params['backbone']) if phase.trainable == Trainable.ALL else set()
  return {
      'backbone': {name: jax.tree.map(lambda _, n=name: 'train' if n in unfrozen else 'freeze', tree)
                   for name, tree in params['backbone'].items()},
      'head': jax.tree.map(lambda _: 'train', params['head']),
  }


def make_schedule(phase: Phase, steps_per_epoch: int) -> optax.Schedule:
  """Cosine decay from learning_rate to end_learning_rate over the phase, after optional linear warm-up.

  A plateau phase's rate changes between epochs only, set from the host (`with_learning_rate`): its schedule
  is the starting rate.
  """
  if phase.plateau is not None:
    return optax.constant_schedule(phase.learning_rate)
  total = max(phase.num_epochs * steps_per_epoch, 1)
  warmup = int(phase.warmup_epochs * steps_per_epoch)
  if warmup:
    return optax.warmup_cosine_decay_schedule(0.0, phase.learning_rate, warmup, total, phase.end_learning_rate)
  return optax.cosine_decay_schedule(phase.learning_rate, total, alpha=phase.end_learning_rate / phase.learning_rate)


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.ScalarOrSchedule, labels: Any,
                   injected: bool = False) -> optax.GradientTransformation:
  """The configured optimiser on 'train' leaves; frozen leaves get zero updates and no optimiser state.

  `injected` keeps the learning rate in the optimiser state (optax.inject_hyperparams), where the host sets
  it between steps and the checkpoint saves it; `schedule` must then be a number, which the steps do not change.
  """
  builders = {
      'adam': lambda learning_rate: optax.adam(learning_rate),
      'adamw': lambda learning_rate: optax.adamw(learning_rate, weight_decay=config.weight_decay),
      'sgd': lambda learning_rate: optax.chain(optax.add_decayed_weights(config.weight_decay),
                                               optax.sgd(learning_rate, momentum=0.9)),
  }
  build = builders[config.optimizer]
  # A float32 rate: inferring it from the parameters would need them concrete, not the shapes a restore traces.
  base = (optax.inject_hyperparams(build, hyperparam_dtype=jnp.float32)(learning_rate=schedule) if injected
          else build(schedule))
  return optax.multi_transform({'train': base, 'freeze': optax.set_to_zero()}, labels)


def phase_labels(model: Classifier, config: ml_collections.ConfigDict, variables: dict[str, Any], phase: Phase,
                 layer_order: list[str]) -> Any:
  """`param_labels` for `phase` under config.fine_tune's rule; `layer_order` is the backbone's Keras order, and
  the study's rule counts the head's Keras layers after it."""
  rule = config.fine_tune.layer_rule
  order = [*layer_order, *model.keras_head_layers()] if rule == 'study' else layer_order
  return param_labels(variables['params'], variables.get('batch_stats', {}), order, phase,
                      config.fine_tune.unfreeze_layers, rule)


def make_state(model: Classifier, config: ml_collections.ConfigDict, variables: dict[str, Any], phase: Phase,
               layer_order: list[str], steps_per_epoch: int) -> TrainState:
  """A fresh train state for `phase` on `variables`: the phase's schedule, and its optimiser on trainable leaves.

  `layer_order` (the backbone's layers in Keras's order, `keras_models.layer_order`) matters only to the
  fine-tune phase, which unfreezes trailing layers.
  """
  batch_stats = variables.get('batch_stats', {})  # Absent without BatchNorm (VGG16 under a head without BN).
  labels = phase_labels(model, config, variables, phase, layer_order)
  plateau = phase.plateau is not None
  tx = make_optimizer(config, phase.learning_rate if plateau else make_schedule(phase, steps_per_epoch), labels,
                      injected=plateau)
  trainable = frozenset(path for path, label in traverse_util.flatten_dict(labels).items() if label == 'train')
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=batch_stats, trainable=trainable)


def with_learning_rate(current: TrainState, learning_rate: float) -> TrainState:
  """`current` with the learning rate its optimiser state holds (`make_optimizer(injected=True)`) set.

  The new value takes each old leaf's dtype and placement, so the compiled steps take it unchanged.
  """
  found = []

  def replace(path: tuple[Any, ...], leaf: Any) -> Any:
    if path[-2:] == (jax.tree_util.GetAttrKey('hyperparams'), jax.tree_util.DictKey('learning_rate')):
      found.append(path)
      return jax.device_put(np.asarray(learning_rate, leaf.dtype), getattr(leaf, 'sharding', None))
    return leaf
  opt_state = jax.tree_util.tree_map_with_path(replace, current.opt_state)
  if not found:
    raise ValueError('the optimiser state holds no learning rate to set: the phase has no plateau schedule')
  return current.replace(opt_state=opt_state)
