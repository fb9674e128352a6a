"""Both formulations of max and average pooling against TensorFlow's pools and their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from covid_jax.models.pooling import avg_pool, max_pool


def _tensorflow_max_pool(x, window, stride):
  """TensorFlow's VALID max pool of `x`, the gradient of sum(pool * weight), and that seeded random weight."""
  weight = np.random.default_rng(1).normal(size=tf.nn.max_pool2d(x, window, stride, 'VALID').shape)
  x_tf = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x_tf)
    pooled = tf.nn.max_pool2d(x_tf, window, stride, 'VALID')
    loss = tf.reduce_sum(pooled * weight)
  return pooled.numpy(), tape.gradient(loss, x_tf).numpy(), weight


@pytest.mark.parametrize('formulation', ['strided_slices', 'reduce_window'])
@pytest.mark.parametrize('shape, window, stride', [((2, 8, 8, 3), 2, 2), ((2, 9, 7, 3), 2, 2),
                                                    ((2, 9, 9, 4), 3, 2), ((1, 12, 10, 2), 3, 2)])
def test_matches_tensorflow_max_pool_and_gradient(shape, window, stride, formulation):
  # Distinct values: no window ties.
  x = np.random.default_rng(0).permutation(np.prod(shape)).reshape(shape).astype(np.float32)
  want, want_grad, weight = _tensorflow_max_pool(x, window, stride)
  got_grad = jax.grad(lambda x: jnp.sum(max_pool(x, window, stride, formulation) * weight))(x)
  np.testing.assert_array_equal(max_pool(x, window, stride, formulation), want)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6)


@pytest.mark.parametrize('formulation', ['strided_slices', 'reduce_window'])
@pytest.mark.parametrize('shape, window, stride', [((2, 8, 8, 3), 2, 2), ((2, 9, 9, 4), 3, 2)])
def test_ties_route_the_gradient_to_one_input_as_tensorflow_does(shape, window, stride, formulation):
  # After a ReLU most windows tie at zero; each output's cotangent must reach one input, not be split.
  x = np.maximum(np.random.default_rng(0).integers(-3, 3, size=shape), 0).astype(np.float32)
  _, want_grad, weight = _tensorflow_max_pool(x, window, stride)
  got_grad = jax.grad(lambda x: jnp.sum(max_pool(x, window, stride, formulation) * weight))(x)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)


def test_unknown_formulation_is_named():
  with pytest.raises(ValueError, match="'im2col'"):
    max_pool(jnp.zeros((1, 4, 4, 1)), 2, 2, 'im2col')


@pytest.mark.parametrize('formulation', ['strided_slices', 'reduce_window'])
@pytest.mark.parametrize('shape, window, stride, padding', [
    ((2, 8, 8, 3), 3, 1, 'SAME'), ((2, 9, 7, 3), 3, 1, 'SAME'), ((2, 9, 8, 4), 3, 2, 'SAME'),
    ((1, 10, 10, 2), 2, 2, 'SAME'), ((2, 9, 9, 4), 3, 2, 'VALID'), ((1, 12, 10, 2), 3, 2, 'VALID')])
def test_matches_tensorflow_avg_pool_and_gradient(shape, window, stride, padding, formulation):
  """TensorFlow's 'SAME' average, like Keras's AveragePooling2D, leaves the padding out of each count."""
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  weight = np.random.default_rng(1).normal(size=tf.nn.avg_pool2d(x, window, stride, padding).shape)
  x_tf = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x_tf)
    want = tf.nn.avg_pool2d(x_tf, window, stride, padding)
    loss = tf.reduce_sum(want * weight)
  want_grad = tape.gradient(loss, x_tf)
  got_grad = jax.grad(lambda x: jnp.sum(avg_pool(x, window, stride, padding, formulation) * weight))(x)
  np.testing.assert_allclose(avg_pool(x, window, stride, padding, formulation), want.numpy(), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad.numpy(), rtol=1e-6, atol=1e-6)


def test_avg_pool_leaves_explicit_padding_out_of_the_count():
  x = np.arange(1, 10, dtype=np.float32).reshape(1, 3, 3, 1)
  got = avg_pool(x, 3, 3, ((1, 0), (0, 0)))  # One row of zeros on top: the window holds 6 of the 9 pixels.
  np.testing.assert_allclose(got, [[[[np.mean([1, 2, 3, 4, 5, 6])]]]])


@pytest.mark.parametrize('formulation', ['strided_slices', 'reduce_window'])
def test_avg_pool_keeps_bfloat16(formulation):
  x = jnp.ones((1, 5, 5, 2), jnp.bfloat16)
  got = avg_pool(x, 3, 1, 'SAME', formulation)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.ones((1, 5, 5, 2)))
