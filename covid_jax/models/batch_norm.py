"""Keras's BatchNormalization, with the training-mode backward pass in closed form.

flax's nn.BatchNorm leaves its backward pass to autodiff, through the two-pass
variance and the cross-device means of both statistics. The closed form is one
pass of three sums (of the cotangent g, of g times the normalised input, and of
the normalised input) and one cross-device mean of them: a smaller program,
which NASNet's many BatchNorms make XLA compile sooner, at no cost in step time
(benchmarks/BENCHMARKS.md). The values agree with Keras's to float32 rounding,
and the variables keep flax's names, so ported weights and checkpoints do not
depend on the choice.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


class BatchNorm(nn.Module):
  """Keras BatchNormalization over the last axis; params {'scale', 'bias'}, batch_stats {'mean', 'var'}.

  Training mode normalises with the batch's mean and two-pass variance (as TensorFlow's moments
  computes them), averaged over `axis_name`'s devices, and moves the stored statistics towards them.
  """

  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-3
  dtype: Any = jnp.float32  # Computation dtype of the output; statistics and parameters stay float32.
  axis_name: str | None = None  # Device axis over which training-mode batch statistics are averaged.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    stored_mean = self.variable('batch_stats', 'mean', jnp.zeros, features, jnp.float32)
    stored_var = self.variable('batch_stats', 'var', jnp.ones, features, jnp.float32)
    scale = self.param('scale', nn.initializers.ones, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    wide = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if self.use_running_average:
      return _affine(wide, stored_mean.value, stored_var.value, scale, bias, self.epsilon).astype(self.dtype)
    # Initialisation traces one device's batch: no axis to average over.
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = normalize(wide, scale, bias, self.epsilon, axis_name)
    if not self.is_initializing():
      # The statistics only feed the stored averages: no gradient flows through them.
      mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
      stored_mean.value = self.momentum * stored_mean.value + (1 - self.momentum) * mean
      stored_var.value = self.momentum * stored_var.value + (1 - self.momentum) * var
    return y.astype(self.dtype)


def _affine(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array, bias: jax.Array,
            epsilon: float) -> jax.Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias, in flax's order of operations."""
  return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


def _mean_over_devices(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Per-feature mean over every axis but the last, averaged over `axis_name`'s devices."""
  mean = jnp.mean(x, tuple(range(x.ndim - 1)))
  return mean if axis_name is None else lax.pmean(mean, axis_name)


def _normalize_fwd(x, scale, bias, epsilon, axis_name):
  mean = _mean_over_devices(x, axis_name)
  var = _mean_over_devices(lax.square(x - mean), axis_name)
  return (_affine(x, mean, var, scale, bias, epsilon), mean, var), (x, mean, var, scale)


def _normalize_bwd(epsilon, axis_name, residuals, cotangents):
  """dx = scale / sigma * (g - mean(g) - (x_hat - mean(x_hat)) * mean(g * x_hat)), means over every device's batch.

  mean(x_hat) is zero but for rounding; subtracting it keeps dx's sum at zero, as autodiff's last step
  does, which keeps float32 gradients closer to float64's where BN on a small batch loses digits anyway.
  Per device, as pmap's autodiff gives it: the parameters' gradients are this device's sums (the train
  step averages them over devices), while dx includes the other devices' share through the statistics.
  The statistics' own cotangents are ignored: `BatchNorm` stops gradients through them.
  """
  x, mean, var, scale = residuals
  g = cotangents[0]
  inv_sigma = lax.rsqrt(var + epsilon)
  x_hat = (x - mean) * inv_sigma
  axes = tuple(range(x.ndim - 1))
  sum_g, sum_g_x_hat, sum_x_hat = jnp.sum(g, axes), jnp.sum(g * x_hat, axes), jnp.sum(x_hat, axes)
  means = jnp.stack([sum_g, sum_g_x_hat, sum_x_hat]) / (x.size // x.shape[-1])
  if axis_name is not None:
    means = lax.pmean(means, axis_name)
  dx = (scale * inv_sigma) * (g - means[0] - (x_hat - means[2]) * means[1])
  return dx, sum_g_x_hat, sum_g


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
              axis_name: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(normalised float32 `x`, batch mean, batch variance); the statistics over every axis but the last."""
  return _normalize_fwd(x, scale, bias, epsilon, axis_name)[0]


normalize.defvjp(_normalize_fwd, _normalize_bwd)
