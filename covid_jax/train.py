"""Training and evaluation: train state, data-parallel steps, the epoch loop, early stopping.

The gradient step is per-device code with the axis name 'data' (gradients,
BatchNorm statistics and metrics are `lax.pmean`-ed), mapped with `jax.shard_map`
over the 1-D data mesh inside `jax.jit`, and followed by the optimiser update
(`TrainStep`: on a CPU a second program). A run has one or two phases: with
`freeze_backbone`, phase 'head' trains the head on a frozen backbone and phase
'fine_tune' then unfreezes the trailing backbone layers; otherwise one phase
'train' trains everything. Each phase has its own optimiser and cosine schedule.
"""

import concurrent.futures
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow as tf
from absl import logging
from flax import struct, traverse_util
from flax.training import train_state
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from covid_jax import checkpoints, host_memory, input_pipeline, metrics, models, python_gc, reporting
from covid_jax.models.classifier import Classifier
from covid_jax.models.head import FIRST_DENSE, Head
from covid_jax.port import store

AXIS = 'data'
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_OPTIMIZERS = ('adam', 'adamw', 'sgd')
# Monitored metric -> True when larger is better.
_MONITORED = {'val_accuracy': True, 'val_roc_auc': True, 'val_loss': False}
_NASNET_NAMES = ('nasnet', 'nasnet_large', 'nasnet_mobile')


class TrainState(train_state.TrainState):
  batch_stats: Any
  # Paths of the parameters the optimiser trains, such as ('head', 'dense_1', 'kernel'): the gradient
  # program differentiates only these. Static, so it is part of the compiled programs' signature.
  trainable: frozenset[tuple[str, ...]] = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True)
class Phase:
  """One stretch of training with its own optimiser and learning-rate schedule."""

  name: str
  num_epochs: int
  learning_rate: float
  end_learning_rate: float
  warmup_epochs: float
  trainable: str  # 'all' | 'head' | 'trailing' (the fine-tune layers plus the head).


def make_phases(config: ml_collections.ConfigDict) -> list[Phase]:
  """The run's phases from the config."""
  first = functools.partial(Phase, num_epochs=config.num_epochs, learning_rate=config.learning_rate,
                            end_learning_rate=config.end_learning_rate, warmup_epochs=config.warmup_epochs)
  if not config.freeze_backbone:
    return [first(name='train', trainable='all')]
  phases = [first(name='head', trainable='head')]
  ft = config.fine_tune
  if ft.num_epochs > 0:
    phases.append(Phase('fine_tune', ft.num_epochs, ft.learning_rate, ft.end_learning_rate, ft.warmup_epochs,
                        'trailing'))
  return phases


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, naming the key, on values the run could only trip over later."""
  checks = [
      (config.model.name in models.BACKBONES, f'model.name {config.model.name!r}: one of {sorted(models.BACKBONES)}'),
      (config.model.pooling in ('avg', 'max', 'flatten'), f'model.pooling {config.model.pooling!r}: avg|max|flatten'),
      (config.dtype in _DTYPES, f'dtype {config.dtype!r}: one of {sorted(_DTYPES)}'),
      (config.optimizer in _OPTIMIZERS, f'optimizer {config.optimizer!r}: one of {_OPTIMIZERS}'),
      (config.early_stopping.metric in _MONITORED,
       f'early_stopping.metric {config.early_stopping.metric!r}: one of {sorted(_MONITORED)}'),
      (config.model.image_size >= 32, f'model.image_size {config.model.image_size}: at least 32'),
  ]
  devices = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    checks.append((config[key] > 0 and config[key] % devices == 0,
                   f'{key} {config[key]} must be a positive multiple of the device count ({devices})'))
  nasnet_args = {k: v for k, v in config.model.nasnet.items() if v is not None}
  checks.append((not nasnet_args or config.model.name in _NASNET_NAMES,
                 f'model.nasnet.{",".join(nasnet_args)} only applies to NASNet backbones, not {config.model.name}'))
  checks.append((config.model.bn_momentum is None or config.model.name != 'vgg16',
                 'model.bn_momentum: vgg16 has no BatchNorm'))
  for prefix, phase in (('', config), ('fine_tune.', config.fine_tune)):
    checks.append((phase.num_epochs <= 0 or phase.warmup_epochs < phase.num_epochs,
                   f'{prefix}warmup_epochs {phase.warmup_epochs} must be less than {prefix}num_epochs '
                   f'{phase.num_epochs}: the cosine decay needs steps after the warm-up'))
  problems = [message for ok, message in checks if not ok]
  if problems:
    raise ValueError('invalid config: ' + '; '.join(problems))


def backbone_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Backbone arguments beyond its preset: the generic NASNet sizes and a BN momentum, when set."""
  args = {k: v for k, v in config.model.nasnet.items() if v is not None}
  if config.model.bn_momentum is not None:
    args['bn_momentum'] = config.model.bn_momentum
  return args


def create_model(config: ml_collections.ConfigDict) -> Classifier:
  dtype = _DTYPES[config.dtype]
  backbone = models.create_backbone(config.model.name, dtype=dtype, axis_name=AXIS, **backbone_args(config))
  head = Head(dims=tuple(config.model.head.dims), dropout=config.model.head.dropout,
              batch_norm=config.model.head.batch_norm, dtype=dtype, axis_name=AXIS)
  return Classifier(backbone=backbone, backbone_name=config.model.name, head=head, pooling=config.model.pooling,
                    dtype=dtype)


def _dummy_images(config: ml_collections.ConfigDict) -> jax.Array:
  return jnp.zeros((1, config.model.image_size, config.model.image_size, 3), jnp.float32)


# An init runs once, and compiling its random-number kernels is most of its cost. With LLVM at -O1 instead
# of -O2, the tiny test NASNet's init compiles in 8 s instead of 19 s on a 2-core CPU (NASNetLarge's: 49 s
# instead of 52 s), to bit-identical values (-O0 changes them). Measured on CPU only, so other backends
# keep their defaults.
_RUN_ONCE_CPU_OPTIONS = {'xla_backend_optimization_level': 1}


@python_gc.full_collections_deferred()
def compile_and_run_once(fn: Callable[[], Any]) -> Any:
  """`jax.jit(fn)()` for code that runs once, such as an init: compiled for compile time (see above)."""
  options = _RUN_ONCE_CPU_OPTIONS if jax.default_backend() == 'cpu' else None
  return jax.jit(fn).trace().lower().compile(compiler_options=options)()


def _init(model: Classifier, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Random initial variables (inference mode, so BN's cross-device axis is not needed yet)."""
  return model.init(jax.random.key(config.seed), _dummy_images(config), train=False)


@dataclasses.dataclass(frozen=True)
class ModelOutline:
  """What one abstract trace of the model's init shows; a run traces the model for it once, not per use."""

  variables: dict[str, Any]  # jax.ShapeDtypeStruct leaves, nested as the variables are.
  head_input: jax.ShapeDtypeStruct  # The pooled features, for initialising the head alone.


@python_gc.full_collections_deferred()
def model_outline(model: Classifier, config: ml_collections.ConfigDict) -> ModelOutline:
  """Variable shapes and the head's input shape, from one `jax.eval_shape` of the init."""
  head_inputs: list[jax.ShapeDtypeStruct] = []

  def record(next_fun, args, kwargs, context):
    if context.module.path == ('head',) and context.method_name == '__call__':
      head_inputs.append(jax.ShapeDtypeStruct(args[0].shape, args[0].dtype))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: _init(model, config))
  return ModelOutline(variables, head_inputs[0])


def initial_variables(model: Classifier, config: ml_collections.ConfigDict, backbone: dict[str, Any] | None = None,
                      outline: ModelOutline | None = None) -> dict[str, Any]:
  """Random init, with the backbone's variables taken from `backbone` or else from `init_from` when set.

  A given backbone is not drawn or traced at all: only the head is initialised, on features shaped as
  `outline` (traced here if not given) says. Flax derives each module's random stream from its path, so
  the head's values are those of the full init (NASNetLarge on a 2-core CPU: under a second, not 52 s).
  """
  if backbone is None and config.init_from:
    backbone = store.load_ported(config.init_from, config.model.name, **backbone_args(config))
  if backbone is None:
    return compile_and_run_once(lambda: _init(model, config))
  features = (outline or model_outline(model, config)).head_input

  def head_only():
    return model.init(jax.random.key(config.seed), jnp.zeros((1, *features.shape[1:]), features.dtype),
                      method=lambda classifier, x: classifier.head(x, train=False))
  return with_backbone(compile_and_run_once(head_only), backbone)


def with_backbone(variables: dict[str, Any], backbone: dict[str, Any]) -> dict[str, Any]:
  """The classifier's `variables` with the backbone's replaced by `backbone` (e.g. ported Keras weights)."""
  return {'params': {**variables['params'], 'backbone': backbone['params']},
          'batch_stats': {**variables.get('batch_stats', {}), 'backbone': backbone.get('batch_stats', {})}}


def param_labels(params: Any, batch_stats: Any, layer_order: list[str], phase: Phase,
                 unfreeze_layers: int) -> Any:
  """'train' or 'freeze' for each parameter leaf in `phase`.

  The fine-tune phase unfreezes the last `unfreeze_layers` backbone layers that
  have weights, BatchNorm excluded (it stays frozen and in inference mode, as
  in the study); -1 unfreezes them all.
  """
  if phase.trainable == 'trailing':
    batch_norms = set(batch_stats.get('backbone', {}))
    candidates = [name for name in layer_order if name in params['backbone'] and name not in batch_norms]
    unfrozen = set(candidates if unfreeze_layers < 0 else candidates[len(candidates) - unfreeze_layers:])
  else:
    unfrozen = set(params['backbone']) if phase.trainable == 'all' else set()
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


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """Per-example cross-entropy against Keras-style smoothed targets (y (1 - s) + s / 2)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_gradients(state: TrainState, batch: dict[str, jax.Array], dropout_key: jax.Array, *, phase: Phase,
                    label_smoothing: float, l1: float, l2: float
                    ) -> tuple[dict[tuple[str, ...], jax.Array], Any, dict[str, jax.Array]]:
  """Per device: the trainable parameters' gradients (keyed by path), new BN statistics and metrics, pmean-ed."""
  dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(AXIS))
  params = traverse_util.flatten_dict(state.params)

  def loss_fn(trainable):
    logits, updates = state.apply_fn(
        {'params': traverse_util.unflatten_dict({**params, **trainable}), 'batch_stats': state.batch_stats},
        batch['image'], train=True, backbone_train=phase.trainable == 'all',
        frozen_backbone=phase.trainable == 'head', rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    loss = smoothed_cross_entropy(logits, batch['label'], label_smoothing).mean()
    kernel = trainable[('head', FIRST_DENSE, 'kernel')]
    penalty = l1 * jnp.abs(kernel).sum() + l2 * jnp.square(kernel).sum()
    return loss + penalty, (loss, logits, updates.get('batch_stats', {}))

  trainable = {path: params[path] for path in state.trainable}
  (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == batch['label'])
  scores = {'loss': lax.pmean(loss, AXIS), 'accuracy': lax.pmean(accuracy, AXIS)}
  return lax.pmean(grads, AXIS), lax.pmean(batch_stats, AXIS), scores


def apply_update(state: TrainState, grads: dict[tuple[str, ...], jax.Array], batch_stats: Any) -> TrainState:
  """The optimiser step. Frozen parameters get zero gradients, which their `set_to_zero` never reads."""
  params = traverse_util.flatten_dict(state.params)
  grads = traverse_util.unflatten_dict({path: grads[path] if path in grads else jnp.zeros_like(value)
                                        for path, value in params.items()})
  return state.apply_gradients(grads=grads, batch_stats=batch_stats)


class TrainStep:
  """One optimiser step, `(state, batch, dropout_key) -> (state, scores)`, compiled on its first call.

  On a CPU it runs as two programs: the gradients (forward and backward pass) and
  the optimiser's update, compiled side by side. XLA:CPU compiles a program on
  about one core, so NASNetLarge's full fine-tune on a 2-core CPU reached its
  first step 6-12 s sooner than as one program, with bit-identical values and the
  same step time. On a GPU (or TPU) it runs as one program: there a launch costs
  the host milliseconds for the state's hundreds of arrays (ResNet50's update
  program alone took 6.6 ms on an H100), and two programs made ResNet50's step
  1.4-1.5x slower (BENCHMARKS.md). Either way it is compiled once, for the first
  call's shapes, which every train batch of a phase shares, and the state is
  donated.
  """

  def __init__(self, gradients: Callable, replicated: jax.sharding.Sharding, separate_update: bool):
    """`gradients`: `train_gradients` mapped over the mesh; `replicated`: the state's sharding;
    `separate_update`: two programs (see above) rather than one."""
    self.separate_update = separate_update
    if separate_update:
      self._gradients = jax.jit(gradients)
      self._update = jax.jit(apply_update, in_shardings=replicated, out_shardings=replicated, donate_argnums=0)
    else:
      self._step = jax.jit(functools.partial(_gradients_then_update, gradients), donate_argnums=0,
                           out_shardings=(replicated, replicated))
    self._compiled = None

  @python_gc.full_collections_deferred()
  def compile(self, state: TrainState, batch: dict[str, Any], dropout_key: Any) -> None:
    """Compiles the step for these arguments (arrays, or `jax.ShapeDtypeStruct`s).

    As two programs: the gradients, the longer to compile, are traced and lowered first, alone (tracing
    holds Python's lock), and the update is traced and compiled on a second thread while XLA compiles
    them; XLA's passes over the gradients keep one core busy for most of that. NASNetLarge's train step
    compiled sooner that way than with both traced at once in 10 of 11 pairs of runs, by a median of
    1.8 s (BENCHMARKS.md).
    """
    if not self.separate_update:
      self._compiled = self._step.trace(state, batch, dropout_key).lower().compile()
      return
    params = traverse_util.flatten_dict(state.params)
    grads = {path: jax.ShapeDtypeStruct(params[path].shape, params[path].dtype) for path in state.trainable}
    gradients = self._gradients.trace(state, batch, dropout_key).lower()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      update = pool.submit(lambda: self._update.trace(state, grads, state.batch_stats).lower().compile())
      self._compiled = gradients.compile(), update.result()

  def __call__(self, state: TrainState, batch: dict[str, jax.Array],
               dropout_key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    if self._compiled is None:
      self.compile(state, batch, dropout_key)
    if not self.separate_update:
      return self._compiled(state, batch, dropout_key)
    gradients, update = self._compiled
    grads, batch_stats, scores = gradients(state, batch, dropout_key)
    return update(state, grads, batch_stats), scores


def _gradients_then_update(gradients: Callable, state: TrainState, batch: dict[str, jax.Array],
                           dropout_key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  grads, batch_stats, scores = gradients(state, batch, dropout_key)
  return apply_update(state, grads, batch_stats), scores


def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
  """Logits of one batch, per device (inference-mode BN, no dropout)."""
  return state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, batch['image'], train=False)


def compile_steps(mesh: jax.sharding.Mesh, phase: Phase, config: ml_collections.ConfigDict,
                  separate_update: bool | None = None) -> tuple[TrainStep, Callable]:
  """(train step, eval step) over the mesh, compiled on first call.

  `separate_update`: the train step as two programs; None chooses by the mesh's platform (on a CPU only).
  """
  gradients = functools.partial(train_gradients, phase=phase, label_smoothing=config.label_smoothing,
                                l1=config.model.head.l1, l2=config.model.head.l2)
  # check_vma=False gives pmap's semantics: gradients inside the body are local to the device and
  # are averaged explicitly with pmean (with vma checking, the gradient of a replicated parameter
  # would already be summed over devices).
  mapped = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
  gradients = mapped(gradients, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P(), P()))
  evaluate = jax.jit(mapped(eval_step, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)))
  if separate_update is None:
    separate_update = mesh.devices.flat[0].platform == 'cpu'
  return TrainStep(gradients, jax.sharding.NamedSharding(mesh, P()), separate_update), evaluate


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
    sign = 1.0 if _MONITORED[self.metric] else -1.0
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


def _host_local(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def evaluate(eval_fn: Callable, state: TrainState, reader: input_pipeline.SplitReader, batch_size: int,
             keep_images: bool = False) -> dict[str, np.ndarray]:
  """Logits and labels of every example of a split (gathered from all processes); padding removed.

  With `keep_images`, also this process's images (for the prediction grid).
  """
  local = {'logits': [], 'label': [], 'mask': [], 'image': []}
  for batch in reader.eval_batches(batch_size):
    logits = eval_fn(state, batch)
    for key, value in (('logits', logits), ('label', batch['label']), ('mask', batch['mask'])):
      local[key].append(_host_local(value))
    if keep_images:
      local['image'].append(_host_local(batch['image']).astype(np.uint8))
  local_real = np.concatenate(local['mask']).astype(bool)
  result = {k: multihost_utils.process_allgather(np.concatenate(local[k]), tiled=True)
            for k in ('logits', 'label', 'mask')}
  real = result.pop('mask').astype(bool)
  result = {k: v[real] for k, v in result.items()}
  if keep_images:
    for key in ('image', 'logits', 'label'):
      result[f'local_{key}'] = np.concatenate(local[key])[local_real]
  return result


def split_metrics(outputs: dict[str, np.ndarray], label_smoothing: float, prefix: str) -> dict[str, float]:
  """Loss, accuracy and ROC AUC of gathered outputs, computed on the host."""
  logits = outputs['logits'].astype(np.float64)
  labels = outputs['label']
  targets = np.eye(2)[labels] * (1 - label_smoothing) + label_smoothing / 2
  log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  scores = metrics.from_logits(labels, logits)
  return {f'{prefix}_loss': float(-(targets * log_probs).sum(-1).mean()),
          f'{prefix}_accuracy': scores['accuracy'],
          f'{prefix}_roc_auc': scores['roc_auc'] if scores['roc_auc'] is not None else float('nan')}


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def _check_finite(losses: list[jax.Array], first_step: int, workdir: str) -> None:
  values = np.asarray(jax.device_get(losses), np.float64)
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    step = first_step + int(bad[0])
    raise NonFiniteLossError(f'loss is {values[bad[0]]} at step {step}; stopping. The last good checkpoint is '
                             f'kept under {os.path.join(workdir, "checkpoints")}.')


class Trainer:
  """Holds what one run needs: model, data, mesh, checkpoints, writers."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    validate_config(config)
    self.config, self.workdir = config, workdir
    self.is_writer = jax.process_index() == 0
    self.mesh = input_pipeline.data_mesh()
    size = config.model.image_size
    self.readers = {split: input_pipeline.SplitReader(config.data_dir, split, size, self.mesh)
                    for split in ('train', 'val', 'test')}
    self.steps_per_epoch = self.readers['train'].steps_per_epoch(config.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f'batch_size {config.batch_size} exceeds the {self.readers["train"].num_examples} training '
                       'examples: no full batch')
    self.model = create_model(config)
    self.phases = make_phases(config)
    self.outline = model_outline(self.model, config)
    self.checkpoints = checkpoints.RunCheckpoints(workdir)
    self.writer = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard')) if self.is_writer else None

  def new_state(self, variables: dict[str, Any], phase_index: int, step: int = 0) -> TrainState:
    phase = self.phases[phase_index]
    layer_order = self.layer_order if phase.trainable == 'trailing' else []
    state = make_state(self.model, self.config, variables, phase, layer_order, self.steps_per_epoch)
    return state.replace(step=step)

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
      order = keras_models.layer_order(self.config.model.name, (size, size, 3), **backbone_args(self.config))
      source = 'the Keras model'
    missing = sorted(set(self.outline.variables['params']['backbone']) - set(order))
    if missing:
      raise ValueError(f'The layer order in {source} lacks {len(missing)} of the {self.config.model.name} '
                       f'backbone\'s layers with weights, e.g. {missing[:3]}: port the weights again')
    return order

  def abstract_state(self, phase_index: int) -> dict[str, Any]:
    state = jax.eval_shape(lambda: self.new_state(self.outline.variables, phase_index))
    return _savable(state)

  def restore(self, which: str, phase_index: int) -> TrainState:
    saved = getattr(self.checkpoints, f'restore_{which}')(self.abstract_state(phase_index))
    state = self.new_state({'params': saved['params'], 'batch_stats': saved['batch_stats']}, phase_index)
    return state.replace(step=saved['step'], opt_state=saved['opt_state'])

  def log_scalars(self, scalars: dict[str, float], step: int) -> None:
    if self.writer is not None:
      with self.writer.as_default(step=step):
        for name, value in scalars.items():
          tf.summary.scalar(name, value)


def _savable(state: TrainState) -> dict[str, Any]:
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats, 'opt_state': state.opt_state}


def _replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, P()))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint), then evaluates the best epoch on test.

  Returns the test metrics that are also written to `workdir`/test_metrics.json.
  """
  os.makedirs(workdir, exist_ok=True)
  trainer = Trainer(config, workdir)
  if trainer.is_writer:
    reporting.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
  progress = trainer.checkpoints.latest_progress()
  if progress is None:
    progress = {'epoch': 0, 'phase': 0, 'phase_epoch': 0, 'stopped_early': False, 'history': [],
                'early_stopping': {}}
    state = trainer.new_state(initial_variables(trainer.model, config, outline=trainer.outline), 0)
  else:
    logging.info('Resuming from epoch %d (phase %s).', progress['epoch'], trainer.phases[progress['phase']].name)
    state = trainer.restore('latest', progress['phase'])
  stopper = EarlyStopping(config.early_stopping.metric, config.early_stopping.patience,
                          config.early_stopping.min_delta, **progress['early_stopping'])
  state = _replicate(state, trainer.mesh)
  try:
    _train(trainer, state, progress, stopper)
  finally:
    trainer.checkpoints.close()
  return _final_report(trainer)


def _train(trainer: Trainer, state: TrainState, progress: dict[str, Any], stopper: EarlyStopping) -> None:
  config = trainer.config
  # Judged against the current config, so a resumed run may be given more epochs.
  saved_phase_done = (progress['stopped_early'] or
                      progress['phase_epoch'] >= trainer.phases[progress['phase']].num_epochs)
  for phase_index in range(progress['phase'] + saved_phase_done, len(trainer.phases)):
    phase = trainer.phases[phase_index]
    if phase_index != progress['phase']:
      state = _replicate(trainer.new_state({'params': state.params, 'batch_stats': state.batch_stats}, phase_index,
                                           step=int(state.step)), trainer.mesh)
      stopper.start_phase()
      progress.update(phase=phase_index, phase_epoch=0, stopped_early=False)
    train_fn, eval_fn = compile_steps(trainer.mesh, phase, config)
    schedule = make_schedule(phase, trainer.steps_per_epoch)
    bar = tqdm(range(progress['phase_epoch'], phase.num_epochs), desc=f'phase {phase.name}', unit='epoch',
               disable=not trainer.is_writer, initial=progress['phase_epoch'], total=phase.num_epochs)
    for phase_epoch in bar:
      epoch = progress['epoch'] + 1
      started = time.time()
      state, train_scores = _train_epoch(trainer, train_fn, state, epoch)
      val = split_metrics(evaluate(eval_fn, state, trainer.readers['val'], config.eval_batch_size),
                          config.label_smoothing, 'val')
      improved = stopper.update(val[config.early_stopping.metric], epoch)
      step = int(state.step)
      record = {'epoch': epoch, 'phase': phase.name, **train_scores, **val,
                'learning_rate': float(schedule((phase_epoch + 1) * trainer.steps_per_epoch - 1)),
                'seconds': time.time() - started,
                # This process's, so far: the kept host memory (host_memory.py) can grow when the heap fragments.
                'peak_host_memory_gib': host_memory.peak_resident_bytes() / 2**30}
      progress['history'].append(record)
      progress.update(epoch=epoch, phase_epoch=phase_epoch + 1, stopped_early=stopper.should_stop,
                      early_stopping={'best_value': stopper.best_value, 'best_epoch': stopper.best_epoch,
                                      'wait': stopper.wait})
      trainer.checkpoints.save(epoch, _savable(state), _json_safe(progress), is_best=improved)
      trainer.log_scalars({k: v for k, v in record.items() if isinstance(v, float)}, step)
      bar.set_postfix(loss=f'{record["train_loss"]:.3f}', val_acc=f'{val["val_accuracy"]:.3f}',
                      best=stopper.best_epoch)
      if stopper.should_stop:
        logging.info('Early stopping phase %s at epoch %d (best epoch %d).', phase.name, epoch, stopper.best_epoch)
        break


def _train_epoch(trainer: Trainer, train_fn: Callable, state: TrainState,
                 epoch: int) -> tuple[TrainState, dict[str, float]]:
  """One epoch of steps; checks the loss for NaN/inf every log interval, before anything is saved."""
  config = trainer.config
  key = jax.random.fold_in(jax.random.key(config.seed), epoch)
  losses, accuracies = [], []
  step0 = int(state.step)
  batches = trainer.readers['train'].train_epoch(config.batch_size, epoch, config.seed, flip=config.augment.flip,
                                                 contrast=config.augment.contrast)
  for i, batch in enumerate(batches):
    state, scores = train_fn(state, batch, jax.random.fold_in(key, i))
    losses.append(scores['loss'])
    accuracies.append(scores['accuracy'])
    if (i + 1) % config.log_every_steps == 0:
      _check_finite(losses[-config.log_every_steps:], step0 + i + 2 - config.log_every_steps, trainer.workdir)
      trainer.log_scalars({'train/loss_step': float(np.mean(jax.device_get(losses[-config.log_every_steps:])))},
                          step0 + i + 1)
  _check_finite(losses, step0 + 1, trainer.workdir)
  return state, {'train_loss': float(np.mean(jax.device_get(losses))),
                 'train_accuracy': float(np.mean(jax.device_get(accuracies)))}


def _json_safe(progress: dict[str, Any]) -> dict[str, Any]:
  """NaN (an undefined AUC) becomes None: JSON has no NaN."""
  def clean(value):
    if isinstance(value, float) and math.isnan(value):
      return None
    if isinstance(value, dict):
      return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
      return [clean(v) for v in value]
    return value
  return clean(progress)


def _final_report(trainer: Trainer) -> dict[str, Any]:
  """Restores the best epoch, evaluates it on test, writes test_metrics.json and the plots."""
  config, workdir = trainer.config, trainer.workdir
  checkpoints_ = checkpoints.RunCheckpoints(workdir)
  best = checkpoints_.best_progress()
  latest = checkpoints_.latest_progress()
  source = 'best' if best is not None else 'latest'
  chosen = best if best is not None else latest
  if chosen is None:
    raise RuntimeError(f'no checkpoint in {workdir}: nothing was trained (num_epochs is 0?)')
  # The best checkpoint's progress is as of that epoch; its phase tells which optimiser state it holds.
  state = _replicate(trainer.restore(source, chosen['phase']), trainer.mesh)
  checkpoints_.close()
  _, eval_fn = compile_steps(trainer.mesh, trainer.phases[chosen['phase']], config)
  outputs = evaluate(eval_fn, state, trainer.readers['test'], config.eval_batch_size, keep_images=True)
  result = metrics.from_logits(outputs['label'], outputs['logits'], bootstrap_samples=1000, seed=config.seed)
  result.update({
      'best_epoch': chosen['epoch'],
      'checkpoint': source,
      'monitored_metric': config.early_stopping.metric,
      'split_sizes': {split: reader.num_examples for split, reader in trainer.readers.items()},
      'model': config.model.name,
  })
  if trainer.is_writer:
    _write_report(trainer, latest['history'], chosen['epoch'], outputs, result)
  return result


def _write_report(trainer: Trainer, history: list[dict], best_epoch: int, outputs: dict[str, np.ndarray],
                  result: dict[str, Any]) -> None:
  workdir, config = trainer.workdir, trainer.config
  reporting.write_json(os.path.join(workdir, 'test_metrics.json'), result)
  reporting.write_json(os.path.join(workdir, 'history.json'), history)
  probabilities = metrics.probabilities(outputs['logits'])[:, 1]
  reporting.plot_training_curves(history, best_epoch, os.path.join(workdir, 'training_curves.png'))
  reporting.plot_confusion_matrix(result['confusion_matrix'], os.path.join(workdir, 'confusion_matrix.png'))
  reporting.plot_roc_curve(outputs['label'], probabilities, os.path.join(workdir, 'roc_curve.png'))
  rng = np.random.default_rng(config.seed)
  count = min(config.prediction_grid_size, len(outputs['local_label']))
  chosen = np.sort(rng.choice(len(outputs['local_label']), count, replace=False))
  reporting.plot_prediction_grid(outputs['local_image'][chosen], outputs['local_label'][chosen],
                                 outputs['local_logits'][chosen].argmax(-1), chosen,
                                 os.path.join(workdir, 'prediction_grid.png'))
