"""The BatchNorm module against Keras's BatchNormalization: outputs, stored statistics and gradients."""

import functools

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import tensorflow as tf

from covid_jax.models.batch_norm import BatchNorm
from tests.keras_reference import relative_error

MOMENTUM, EPSILON = 0.9, 1e-3
SHAPES = ((6, 5, 4, 7), (6, 7))  # A backbone's feature maps; the head's pooled features.


def _keras_training_step(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, weight: np.ndarray):
  """Keras in training mode on the whole batch: output, updated moving statistics, d(sum(y * weight))."""
  layer = keras.layers.BatchNormalization(momentum=MOMENTUM, epsilon=EPSILON)
  layer.build(x.shape)
  layer.gamma.assign(gamma)
  layer.beta.assign(beta)
  x_tf = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x_tf)
    y = layer(x_tf, training=True)
    loss = tf.reduce_sum(y * weight)
  dx, dgamma, dbeta = tape.gradient(loss, [x_tf, layer.gamma, layer.beta])
  return (y.numpy(), layer.moving_mean.numpy(), layer.moving_variance.numpy(),
          dx.numpy(), dgamma.numpy(), dbeta.numpy())


def _inputs(shape: tuple[int, ...]):
  rng = np.random.default_rng(0)
  x = rng.normal(1.5, 3.0, shape).astype(np.float32)
  gamma = rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32)
  beta = rng.normal(0.0, 0.2, shape[-1]).astype(np.float32)
  return x, gamma, beta, rng.normal(size=shape).astype(np.float32)


def _training_step(module: BatchNorm, params: dict, x: jax.Array, weight: jax.Array):
  """covid_jax's side on one device's batch: output, stored statistics, gradients of sum(y * weight)."""
  stats = {'mean': jnp.zeros(x.shape[-1]), 'var': jnp.ones(x.shape[-1])}

  def loss(params, x):
    y, updates = module.apply({'params': params, 'batch_stats': stats}, x, mutable=['batch_stats'])
    return jnp.sum(y * weight), (y, updates['batch_stats'])

  (_, (y, stats)), (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
  return y, stats['mean'], stats['var'], dx, dparams['scale'], dparams['bias']


@pytest.mark.parametrize('shape', SHAPES)
def test_training_mode_and_its_gradients_match_keras(shape):
  x, gamma, beta, weight = _inputs(shape)
  want = _keras_training_step(x, gamma, beta, weight)
  module = BatchNorm(momentum=MOMENTUM, epsilon=EPSILON)
  got = jax.jit(functools.partial(_training_step, module))({'scale': gamma, 'bias': beta}, x, weight)
  for name, g, w in zip(('y', 'mean', 'var', 'dx', 'dscale', 'dbias'), got, want):
    assert relative_error(g, w) <= 1e-6, name


@pytest.mark.parametrize('shape', SHAPES)
def test_statistics_and_gradients_over_devices_match_keras_on_the_whole_batch(shape):
  """Two devices' halves of the batch (a named vmap axis, as the train step's shard_map names its devices).

  Each device's parameter gradients are its own share, which the train step averages; dx includes the
  other device's share through the shared statistics.
  """
  x, gamma, beta, weight = _inputs(shape)
  want = _keras_training_step(x, gamma, beta, weight)
  module = BatchNorm(momentum=MOMENTUM, epsilon=EPSILON, axis_name='devices')

  def per_device(x, weight):
    y, mean, var, dx, dscale, dbias = _training_step(module, {'scale': gamma, 'bias': beta}, x, weight)
    return y, mean, var, dx, jax.lax.pmean(dscale, 'devices'), jax.lax.pmean(dbias, 'devices')

  halves = [a.reshape(2, shape[0] // 2, *shape[1:]) for a in (x, weight)]
  y, mean, var, dx, dscale, dbias = jax.jit(jax.vmap(per_device, axis_name='devices'))(*halves)
  got = (y.reshape(shape), mean[0], var[0], dx.reshape(shape), 2 * dscale[0], 2 * dbias[0])
  for name, g, w in zip(('y', 'mean', 'var', 'dx', 'dscale', 'dbias'), got, want):
    assert relative_error(g, w) <= 1e-6, name
  assert np.array_equal(mean[0], mean[1]) and np.array_equal(dscale[0], dscale[1])


def test_inference_mode_uses_the_stored_statistics_and_returns_the_computation_dtype():
  x, gamma, beta, _ = _inputs((6, 5, 4, 7))
  rng = np.random.default_rng(1)
  mean, var = rng.normal(size=7).astype(np.float32), rng.uniform(0.5, 2.0, 7).astype(np.float32)
  layer = keras.layers.BatchNormalization(epsilon=EPSILON)
  layer.build(x.shape)
  layer.set_weights([gamma, beta, mean, var])
  want = layer(x, training=False).numpy()
  variables = {'params': {'scale': gamma, 'bias': beta}, 'batch_stats': {'mean': mean, 'var': var}}
  got = BatchNorm(use_running_average=True, epsilon=EPSILON).apply(variables, x)
  assert relative_error(got, want) <= 1e-6
  half = BatchNorm(use_running_average=True, epsilon=EPSILON, dtype=jnp.bfloat16).apply(variables, x)
  assert half.dtype == jnp.bfloat16
