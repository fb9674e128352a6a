"""Both max-pool formulations against TensorFlow's max pool and its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from covid_jax.models.pooling import max_pool


@pytest.mark.parametrize('impl', ['strided_slices', 'reduce_window'])
@pytest.mark.parametrize('shape, window, stride', [((2, 8, 8, 3), 2, 2), ((2, 9, 7, 3), 2, 2),
                                                    ((2, 9, 9, 4), 3, 2), ((1, 12, 10, 2), 3, 2)])
def test_matches_tensorflow_max_pool_and_gradient(shape, window, stride, impl):
  # Distinct values: a tie's gradient is split here and given to one input in TensorFlow.
  x = np.random.default_rng(0).permutation(np.prod(shape)).reshape(shape).astype(np.float32)
  weight = np.random.default_rng(1).normal(size=tf.nn.max_pool2d(x, window, stride, 'VALID').shape)
  x_tf = tf.constant(x)
  with tf.GradientTape() as tape:
    tape.watch(x_tf)
    want = tf.nn.max_pool2d(x_tf, window, stride, 'VALID')
    loss = tf.reduce_sum(want * weight)
  want_grad = tape.gradient(loss, x_tf)
  got_grad = jax.grad(lambda x: jnp.sum(max_pool(x, window, stride, impl) * weight))(x)
  np.testing.assert_array_equal(max_pool(x, window, stride, impl), want.numpy())
  np.testing.assert_allclose(got_grad, want_grad.numpy(), rtol=1e-6)


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="'im2col'"):
    max_pool(jnp.zeros((1, 4, 4, 1)), 2, 2, 'im2col')
