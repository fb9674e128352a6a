"""The data-parallel train and eval steps, how they are compiled, and eval outputs gathered over devices.

Steps are per-device code with the axis name 'data' (gradients, BatchNorm
statistics and metrics are `lax.pmean`-ed), mapped with `jax.shard_map` over the
1-D data mesh inside `jax.jit`. The optimiser update follows the gradients in
the same program, or in a second one where the backend policy says so
(`models.formulations`).
"""

import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from covid_jax import input_pipeline, runtime
from covid_jax.input_pipeline import AXIS
from covid_jax.models.head import FIRST_DENSE
from covid_jax.state import Phase, Trainable, TrainState


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
  """Per-example cross-entropy against Keras-style smoothed targets (y (1 - s) + s / 2)."""
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_gradients(state: TrainState, batch: dict[str, jax.Array], dropout_key: jax.Array, *, phase: Phase,
                    label_smoothing: float, l1: float, l2: float
                    ) -> tuple[dict[tuple[str, ...], jax.Array], Any, dict[str, jax.Array]]:
  """Per device: the trainable parameters' gradients (keyed by path), new BN statistics and metrics, pmean-ed."""
  forward = functools.partial(state.apply_fn, train=True, backbone_train=phase.trainable == Trainable.ALL,
                              frozen_backbone=phase.trainable == Trainable.HEAD)
  return _gradients(forward, state, batch['image'], batch['label'], dropout_key, label_smoothing, l1, l2)


def head_gradients(state: TrainState, batch: dict[str, jax.Array], dropout_key: jax.Array, *,
                   label_smoothing: float, l1: float, l2: float
                   ) -> tuple[dict[tuple[str, ...], jax.Array], Any, dict[str, jax.Array]]:
  """Per device: `train_gradients` of phase 'head' on the backbone's pooled features (batch['features']).

  The frozen backbone in inference mode contributes nothing but these features, so the head, its dropout
  (same keys), BN statistics (synchronised over devices), loss and regulariser are those of the full model.
  """
  forward = functools.partial(state.apply_fn, train=True, method='classify')
  return _gradients(forward, state, batch['features'], batch['label'], dropout_key, label_smoothing, l1, l2)


def _gradients(forward: Callable, state: TrainState, inputs: jax.Array, labels: jax.Array, dropout_key: jax.Array,
               label_smoothing: float, l1: float, l2: float
               ) -> tuple[dict[tuple[str, ...], jax.Array], Any, dict[str, jax.Array]]:
  """Gradients of the smoothed loss plus L1L2 on the first head kernel, by `forward(variables, inputs, ...)`."""
  dropout_key = jax.random.fold_in(dropout_key, lax.axis_index(AXIS))
  params = traverse_util.flatten_dict(state.params)

  def loss_fn(trainable):
    logits, updates = forward(
        {'params': traverse_util.unflatten_dict({**params, **trainable}), 'batch_stats': state.batch_stats},
        inputs, rngs={'dropout': dropout_key}, mutable=['batch_stats'])
    loss = smoothed_cross_entropy(logits, labels, label_smoothing).mean()
    kernel = trainable[('head', FIRST_DENSE, 'kernel')]
    penalty = l1 * jnp.abs(kernel).sum() + l2 * jnp.square(kernel).sum()
    return loss + penalty, (loss, logits, updates.get('batch_stats', {}))

  trainable = {path: params[path] for path in state.trainable}
  (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
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

  As one program, or as two (the gradients, then the optimiser's update) with
  `separate_update`: XLA:CPU compiles a program on about one core, so two
  programs compile side by side, to the same values; on a GPU or TPU each
  program's launch costs the host time for the state's hundreds of arrays, so
  there it is one. Either way it is compiled once, for the first call's shapes,
  which every train batch of a phase shares, and the state is donated.
  """

  def __init__(self, gradients: Callable, replicated: jax.sharding.Sharding, separate_update: bool,
               compiler_options: dict[str, Any] | None = None):
    """`gradients`: `train_gradients` mapped over the mesh; `replicated`: the state's sharding;
    `compiler_options`: XLA options for this step's programs alone (`runtime.compiler_options`)."""
    self.separate_update = separate_update
    self._options = compiler_options
    if separate_update:
      self._gradients = jax.jit(gradients)
      self._update = jax.jit(apply_update, in_shardings=replicated, out_shardings=replicated, donate_argnums=0)
    else:
      self._step = jax.jit(functools.partial(_gradients_then_update, gradients), donate_argnums=0,
                           out_shardings=(replicated, replicated))
    self._compiled = None

  @runtime.tracing()
  def compile(self, state: TrainState, batch: dict[str, Any], dropout_key: Any) -> None:
    """Compiles the step for these arguments (arrays, or `jax.ShapeDtypeStruct`s).

    As two programs, the gradients (the longer to compile) are traced and lowered first, alone (tracing
    holds Python's lock); the update is then traced and compiled on a second thread while XLA compiles them.
    """
    if not self.separate_update:
      self._compiled = self._step.trace(state, batch, dropout_key).lower().compile(self._options)
      return
    params = traverse_util.flatten_dict(state.params)
    grads = {path: jax.ShapeDtypeStruct(params[path].shape, params[path].dtype) for path in state.trainable}
    gradients = self._gradients.trace(state, batch, dropout_key).lower()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      update = pool.submit(lambda: self._update.trace(state, grads, state.batch_stats).lower().compile(self._options))
      self._compiled = gradients.compile(self._options), update.result()

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


def head_eval_step(state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
  """`eval_step` on the backbone's pooled features (batch['features'])."""
  return state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, batch['features'],
                        train=False, method='classify')


def pooled_features_step(state: TrainState, batch: dict[str, jax.Array]) -> jax.Array:
  """The backbone's pooled features of one batch, per device (inference mode): the head's input."""
  return state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, batch['image'],
                        method='pooled_features')


def compile_steps(mesh: jax.sharding.Mesh, phase: Phase, config: ml_collections.ConfigDict,
                  separate_update: bool) -> tuple[TrainStep, Callable]:
  """(train step, eval step) over the mesh, compiled on first call; `separate_update`: see `TrainStep`."""
  gradients = functools.partial(train_gradients, phase=phase, **_loss_settings(config))
  return _mapped_steps(mesh, gradients, eval_step, separate_update, config.model.name)


def compile_head_steps(mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict,
                       separate_update: bool) -> tuple[TrainStep, Callable]:
  """`compile_steps` of phase 'head' on batches of pooled features ('features', 'label') instead of images."""
  return _mapped_steps(mesh, functools.partial(head_gradients, **_loss_settings(config)), head_eval_step,
                       separate_update, config.model.name)


@functools.cache
def compile_features_step(mesh: jax.sharding.Mesh, model_name: str) -> Callable:
  """`pooled_features_step` over the mesh, jitted: `(state, batch of images) -> features`, sharded like the batch.

  One per mesh and backbone, so a later extraction in the process (another run's, a benchmark's) reuses its
  compiled program. It runs the backbone forward as the eval step does, with the eval step's compiler options.
  """
  return jax.jit(_mapped(mesh)(pooled_features_step, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)),
                 compiler_options=_compiler_options(mesh, 'eval_step', model_name))


def _loss_settings(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {'label_smoothing': config.label_smoothing, 'l1': config.model.head.l1, 'l2': config.model.head.l2}


def _mapped(mesh: jax.sharding.Mesh) -> Callable:
  # check_vma=False gives pmap's semantics: gradients inside the body are local to the device and
  # are averaged explicitly with pmean (with vma checking, the gradient of a replicated parameter
  # would already be summed over devices).
  return functools.partial(jax.shard_map, mesh=mesh, check_vma=False)


def _compiler_options(mesh: jax.sharding.Mesh, program: str, model_name: str) -> dict[str, Any] | None:
  """The XLA options runtime decides for `program` of `model_name` on the mesh's platform (None: XLA's own)."""
  return runtime.compiler_options(program, mesh.devices.flat[0].platform, model_name)


def _mapped_steps(mesh: jax.sharding.Mesh, gradients: Callable, evaluate: Callable, separate_update: bool,
                  model_name: str) -> tuple[TrainStep, Callable]:
  mapped = _mapped(mesh)
  gradients = mapped(gradients, in_specs=(P(), P(AXIS), P()), out_specs=(P(), P(), P()))
  evaluate = jax.jit(mapped(evaluate, in_specs=(P(), P(AXIS)), out_specs=P(AXIS)),
                     compiler_options=_compiler_options(mesh, 'eval_step', model_name))
  train_step = TrainStep(gradients, jax.sharding.NamedSharding(mesh, P()), separate_update,
                         _compiler_options(mesh, 'train_step', model_name))
  return train_step, evaluate


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """`tree` on every device of `mesh`, as the steps take the state."""
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, P()))


def host_local(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded array, in order."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


def split_outputs(eval_fn: Callable, state: TrainState, reader: input_pipeline.SplitReader, batch_size: int,
                  keep_images: bool = False) -> dict[str, np.ndarray]:
  """Logits and labels of every example of a split (gathered from all processes); padding removed.

  With `keep_images`, also this process's images, logits and labels (`local_*`, for the prediction grid).
  """
  local = {'logits': [], 'label': [], 'mask': [], 'image': []}
  for batch in reader.eval_batches(batch_size):
    logits = eval_fn(state, batch)
    for key, value in (('logits', logits), ('label', batch['label']), ('mask', batch['mask'])):
      local[key].append(host_local(value))
    if keep_images:
      local['image'].append(host_local(batch['image']).astype(np.uint8))
  local_real = np.concatenate(local['mask']).astype(bool)
  result = {k: multihost_utils.process_allgather(np.concatenate(local[k]), tiled=True)
            for k in ('logits', 'label', 'mask')}
  real = result.pop('mask').astype(bool)
  result = {k: v[real] for k, v in result.items()}
  if keep_images:
    for key in ('image', 'logits', 'label'):
      result[f'local_{key}'] = np.concatenate(local[key])[local_real]
  return result
