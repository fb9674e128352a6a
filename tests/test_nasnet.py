"""NASNet against keras.applications NASNet: outputs, parameter counts, gradients, BN training, depthwise convs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from covid_jax import models, port
from covid_jax.models import depthwise, formulations, windows
from covid_jax.port.keras_models import keras_backbone
from tests.keras_reference import randomize_batch_norm, relative_error

# The smallest legal NASNet; skip_reduction is given per test.
SMALL = dict(penultimate_filters=96, num_blocks=1, stem_block_filters=8, filter_multiplier=2)
SMALL_SIZES = ((32, 32), (65, 65), (70, 58))
# One of each kind of weight: stem conv, strided and plain separable convs, both adjust paths.
KERNELS = ('stem_conv1', 'adjust_conv_1_stem_2', 'adjust_conv_projection_reduce_2', 'normal_conv_1_3')
SEPARABLES = ('separable_conv_1_reduction_right1_stem_2', 'separable_conv_2_normal_left1_2')
BATCH_NORMS = ('stem_bn1', 'adjust_bn_stem_2', 'separable_conv_1_bn_reduction_left1_reduce_1', 'normal_bn_1_3',
               'separable_conv_2_bn_normal_left5_3')


def _images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
  """Random RGB 0-255 images, preprocessed as NASNet expects them."""
  rgb = np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32)
  return np.asarray(models.preprocess('nasnet', rgb))


def _small_ported(skip_reduction: bool, height: int, width: int):
  args = dict(SMALL, skip_reduction=skip_reduction)
  keras_model = keras_backbone('nasnet', (height, width, 3), **args)
  randomize_batch_norm(keras_model, seed=1)
  return keras_model, port.from_keras(keras_model, 'nasnet', **args)


@pytest.fixture(scope='module')
def small_ported():
  """(Keras model, ported variables) per (skip_reduction, height, width), each built once; do not train them."""
  return functools.cache(_small_ported)


def _flax_count(variables) -> int:
  return sum(leaf.size for leaf in jax.tree.leaves(variables))


# The CPU's formulations (shifted products) at every size; the grouped convolution at the non-square one.
@pytest.mark.parametrize('size, depthwise_formulation', [*((size, 'cpu') for size in SMALL_SIZES),
                                                         ((70, 58), 'grouped')],
                         ids=lambda v: f'{v[0]}x{v[1]}' if isinstance(v, tuple) else v)
@pytest.mark.parametrize('skip_reduction', (True, False))
def test_small_matches_keras(small_ported, skip_reduction, size, depthwise_formulation):
  keras_model, variables = small_ported(skip_reduction, *size)
  x = _images((2, *size, 3))
  chosen = formulations.for_platform('cpu', depthwise=None if depthwise_formulation == 'cpu' else depthwise_formulation)
  backbone = models.create_backbone('nasnet', chosen, **SMALL, skip_reduction=skip_reduction)
  got = jax.jit(backbone.apply)(variables, x)
  want = keras_model(x, training=False).numpy()
  assert got.shape == want.shape
  assert relative_error(got, want) <= 1e-5
  assert _flax_count(variables) == keras_model.count_params()


def _assert_preset_matches_keras(name: str, size: int, batch: int, out_shape: tuple[int, ...]) -> None:
  keras_model = keras_backbone(name, (size, size, 3))
  randomize_batch_norm(keras_model)
  x = _images((batch, size, size, 3))
  variables = port.from_keras(keras_model, name)
  got = jax.jit(models.create_backbone(name).apply)(variables, x)
  want = keras_model(x, training=False).numpy()
  assert got.shape == want.shape == out_shape
  assert relative_error(got, want) <= 1e-5
  assert _flax_count(variables) == keras_model.count_params()


def test_mobile_matches_keras():
  _assert_preset_matches_keras('nasnet_mobile', 224, 2, (2, 7, 7, 1056))


@pytest.mark.slow
def test_large_matches_keras():
  _assert_preset_matches_keras('nasnet_large', 331, 1, (1, 11, 11, 4032))


def test_gradients_match_gradient_tape(small_ported):
  """Through the hand-written backward of the shifted-products depthwise conv (the grouped one is XLA's own)."""
  keras_model, variables = small_ported(False, 65, 65)
  x = _images((2, 65, 65, 3))
  weight = np.random.default_rng(2).normal(size=keras_model.output_shape[1:]).astype(np.float32)

  x_tf = tf.constant(x)
  layers = [keras_model.get_layer(name) for name in KERNELS + SEPARABLES]
  wrt = [layer.kernel for layer in layers[:len(KERNELS)]]
  wrt += [kernel for layer in layers[len(KERNELS):] for kernel in (layer.depthwise_kernel, layer.pointwise_kernel)]
  with tf.GradientTape() as tape:
    tape.watch(x_tf)
    loss = tf.reduce_sum(keras_model(x_tf, training=False) * weight)
  want_x, *want_kernels = tape.gradient(loss, [x_tf, *wrt])

  backbone = models.create_backbone('nasnet', formulations.for_platform('cpu', depthwise='shifted'), **SMALL,
                                    skip_reduction=False)

  def scalar(params, x):
    return jnp.sum(backbone.apply({**variables, 'params': params}, x) * weight)

  got_params, got_x = jax.jit(jax.grad(scalar, argnums=(0, 1)))(variables['params'], x)
  got_kernels = [got_params[name]['kernel'] for name in KERNELS]
  got_kernels += [got_params[name][part]['kernel'] for name in SEPARABLES for part in ('depthwise', 'pointwise')]
  assert relative_error(got_x, want_x) <= 1e-5
  for got, want in zip(got_kernels, want_kernels):
    want = np.asarray(want)
    assert relative_error(got, want.reshape(got.shape)) <= 1e-5, want.shape


def test_training_batch_norm_matches_keras():
  keras_model, variables = _small_ported(False, 65, 65)
  # Training normalises with batch statistics, so the stored ones do not change the output. Zero them: the
  # update is then exactly (1 - momentum) * batch statistic, comparable to float32 precision (with random
  # stored values the 0.03% change would drown in their rounding).
  for layer in keras_model.layers:
    if hasattr(layer, 'moving_mean'):
      layer.moving_mean.assign(tf.zeros_like(layer.moving_mean))
      layer.moving_variance.assign(tf.zeros_like(layer.moving_variance))
  variables = {**variables, 'batch_stats': jax.tree.map(jnp.zeros_like, variables['batch_stats'])}
  x = _images((4, 65, 65, 3))

  backbone = models.create_backbone('nasnet', **SMALL, skip_reduction=False)
  got, updates = jax.jit(functools.partial(backbone.apply, train=True, mutable=["batch_stats"]))(variables, x)
  want = keras_model(x, training=True).numpy()
  assert relative_error(got, want) <= 1e-5
  for name in BATCH_NORMS:
    layer = keras_model.get_layer(name)
    for flax_key, keras_value in (('mean', layer.moving_mean), ('var', layer.moving_variance)):
      assert relative_error(updates['batch_stats'][name][flax_key], keras_value) <= 1e-5, (name, flax_key)


def test_half_precision_keeps_float32_parameters(small_ported):
  keras_model, variables = small_ported(False, 65, 65)
  backbone = models.create_backbone('nasnet', **SMALL, skip_reduction=False, dtype=jnp.bfloat16)
  x = _images((2, 65, 65, 3))
  fresh = jax.eval_shape(backbone.init, jax.random.key(0), x)
  assert {leaf.dtype for leaf in jax.tree.leaves(fresh)} == {jnp.dtype(jnp.float32)}
  got = jax.jit(backbone.apply)(variables, x)
  assert got.dtype == jnp.bfloat16
  # bfloat16 keeps 8 bits of mantissa: a few percent after some 30 layers, not a different function.
  assert relative_error(got, keras_model(x, training=False).numpy()) <= 5e-2


@pytest.mark.parametrize('formulation', formulations.DEPTHWISE)
@pytest.mark.parametrize('multiplier', (1, 2))
# Stride 3 splits the 3x5 kernel's taps unevenly among the phases; stride 4 leaves a row phase without any.
@pytest.mark.parametrize('stride, padding', [(1, 'SAME'), (2, 'SAME'), (1, 'VALID'), (2, 'VALID'),
                                             (2, ((1, 2), (2, 1))), (3, 'SAME'), (4, 'VALID')])
def test_depthwise_conv_and_gradients_match_tensorflow(formulation, multiplier, stride, padding):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 11, 8, 3)).astype(np.float32)
  kernel = rng.normal(size=(3, 5, 3, multiplier)).astype(np.float32)  # TensorFlow's (h, w, C, multiplier).
  tf_padding = padding if isinstance(padding, str) else [[0, 0], *map(list, padding), [0, 0]]
  x_tf, kernel_tf = tf.constant(x), tf.constant(kernel)
  with tf.GradientTape() as tape:
    tape.watch([x_tf, kernel_tf])
    want = tf.nn.depthwise_conv2d(x_tf, kernel_tf, (1, stride, stride, 1), tf_padding)
    weight = rng.normal(size=want.shape).astype(np.float32)
    loss = tf.reduce_sum(want * weight)
  want_dx, want_dkernel = tape.gradient(loss, [x_tf, kernel_tf])

  def conv(x, grouped_kernel):
    return depthwise.depthwise_conv(x, grouped_kernel, (stride, stride), padding, formulation)

  got, vjp = jax.vjp(conv, x, kernel.reshape(3, 5, 1, 3 * multiplier))
  got_dx, got_dkernel = vjp(jnp.asarray(weight))
  assert got.shape == want.shape
  assert relative_error(got, want) <= 1e-6
  assert relative_error(got_dx, want_dx) <= 1e-6
  assert relative_error(got_dkernel.reshape(kernel.shape), want_dkernel) <= 1e-6


@pytest.mark.parametrize('images_per_block', (1, 2))
@pytest.mark.parametrize('stride', (1, 2))
def test_shifted_kernel_gradient_in_blocks_of_images_matches_tensorflow(images_per_block, stride, monkeypatch):
  batch, height, width, channels, window = 4, 11, 8, 3, (3, 5)
  pads = windows.explicit_pads((height, width), window, (stride, stride), 'SAME')
  padded_pixels = (height + sum(pads[0])) * (width + sum(pads[1]))
  out_pixels = -(-height // stride) * -(-width // stride)
  monkeypatch.setattr(depthwise, 'KERNEL_GRADIENT_BLOCK_BYTES', images_per_block * 4 * channels
                      * (padded_pixels + out_pixels))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
  kernel = rng.normal(size=(*window, channels, 1)).astype(np.float32)  # TensorFlow's (h, w, C, multiplier).
  x_tf, kernel_tf = tf.constant(x), tf.constant(kernel)
  with tf.GradientTape() as tape:
    tape.watch(kernel_tf)
    want = tf.nn.depthwise_conv2d(x_tf, kernel_tf, (1, stride, stride, 1), 'SAME')
    weight = rng.normal(size=want.shape).astype(np.float32)
    loss = tf.reduce_sum(want * weight)
  want_dkernel = tape.gradient(loss, kernel_tf)

  def kernel_gradient(grouped_kernel):
    _, vjp = jax.vjp(lambda k: depthwise.depthwise_conv(x, k, (stride, stride), 'SAME', 'shifted'), grouped_kernel)
    return vjp(jnp.asarray(weight))[0]

  grouped_kernel = kernel.reshape(*window, 1, channels)
  assert f'length={batch // images_per_block}' in str(jax.make_jaxpr(kernel_gradient)(grouped_kernel))
  got_dkernel = kernel_gradient(grouped_kernel)
  assert relative_error(got_dkernel.reshape(kernel.shape), want_dkernel) <= 1e-6


@pytest.mark.parametrize('formulation', formulations.DEPTHWISE)
def test_depthwise_conv_in_bfloat16_returns_bfloat16(formulation):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 3)), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 1)), jnp.bfloat16)  # TensorFlow's (h, w, C, multiplier).
  got = depthwise.depthwise_conv(x, kernel.reshape(3, 3, 1, 3), (1, 1), 'SAME', formulation)
  assert got.dtype == jnp.bfloat16
  want = tf.nn.depthwise_conv2d(np.asarray(x, np.float32), np.asarray(kernel, np.float32), (1, 1, 1, 1), 'SAME')
  assert relative_error(np.asarray(got, np.float32), want) <= 1e-2  # The output's rounding to 8 mantissa bits.


def test_cpu_depthwise_avoids_grouped_convolution():
  x, kernel = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 1, 4))
  cpu = formulations.for_platform('cpu').depthwise
  jaxpr = str(jax.make_jaxpr(functools.partial(depthwise.depthwise_conv, formulation=cpu))(x, kernel))
  assert 'conv_general_dilated' not in jaxpr


def test_scanned_cells_equal_unrolled_cells():
  """The lax.scan over a block's repeated normal cells computes what the unrolled cells do, in float64.

  Outputs, every BN statistic update (under the Keras names) and every parameter gradient, in training
  mode. Float64 shows the two orderings equal to rounding; in float32, BN on the few values of a small
  batch amplifies rounding differences to 1e-5 relative.
  """
  # The scan does not depend on the depthwise formulation; the grouped one compiles faster.
  args = dict(SMALL, num_blocks=3, skip_reduction=True, dtype=jnp.float64,
              formulations=formulations.for_platform('cpu', depthwise='grouped'))
  scanned, unrolled = (models.create_backbone('nasnet', **args, scan_cells=s) for s in (True, False))
  with jax.enable_x64(True):
    x = jnp.asarray(_images((2, 40, 40, 3)), jnp.float64)
    variables = unrolled.init(jax.random.key(0), x)
    noise = jax.random.key(1)
    variables = jax.tree.map(lambda v: v + 0.1 * jax.random.normal(noise, v.shape, jnp.float64), variables)

    def run(model):
      def loss(params):
        y, updates = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
        return jnp.sum(y * jnp.cos(y)), (y, updates['batch_stats'])
      return jax.grad(loss, has_aux=True)(variables['params'])  # Eager: compiling two float64 models is slower.

    jaxpr = jax.make_jaxpr(lambda v: scanned.apply(v, x))(variables)
    assert 'scan' in str(jaxpr)  # Blocks of 3 cells scan their last 2, the zero-padded second cell included.
    (grads, (y, stats)), (want_grads, (want_y, want_stats)) = run(scanned), run(unrolled)
  assert relative_error(y, want_y) <= 1e-12
  stat_errors = jax.tree.map(relative_error, stats, want_stats)  # Also checks the trees have one structure.
  assert max(jax.tree.leaves(stat_errors)) <= 1e-12
  unchanged = jax.tree.map(np.array_equal, stats, variables['batch_stats'])
  assert not any(jax.tree.leaves(unchanged))  # Every statistic was updated, the scanned cells' included.
  assert max(jax.tree.leaves(jax.tree.map(relative_error, grads, want_grads))) <= 1e-9


def test_remat_recomputes_the_same_step_in_less_memory():
  """With remat, every cell (scanned or not) is recomputed in the backward pass: same values, fewer temporaries.

  Compared with the model without remat, itself checked against Keras above: outputs, BN statistics and
  every gradient of a train-mode step, and XLA's count of the compiled step's temporary bytes. In float64,
  as for the scan above: recomputed in other fusions, float32 BN on a small batch's few values puts some
  gradients only 1e-2 from float64's (either BatchNorm, flax's own or the closed form).
  """
  args = dict(SMALL, num_blocks=3, skip_reduction=True, dtype=jnp.float64,
              formulations=formulations.for_platform('cpu', depthwise='grouped'))
  plain, remat = (models.create_backbone('nasnet', **args, remat=r) for r in (False, True))
  with jax.enable_x64(True):
    x = jnp.asarray(_images((2, 40, 40, 3)), jnp.float64)
    variables = plain.init(jax.random.key(0), x)
    assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(0), x)) == jax.tree.structure(variables)
    weight = jax.random.normal(jax.random.key(1), jax.eval_shape(plain.apply, variables, x).shape, jnp.float64)

    def compiled_step(model):
      def loss(params):
        y, updates = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
        return jnp.sum(y * weight), updates['batch_stats']  # A cotangent XLA cannot constant-fold.
      return jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(variables['params']).compile()

    steps = [compiled_step(model) for model in (plain, remat)]
    (want, want_grads), (got, got_grads) = (step(variables['params']) for step in steps)
  assert relative_error(got[0], want[0]) <= 1e-12
  assert max(jax.tree.leaves(jax.tree.map(relative_error, got[1], want[1]))) <= 1e-12
  assert max(jax.tree.leaves(jax.tree.map(relative_error, got_grads, want_grads))) <= 1e-9
  plain_bytes, remat_bytes = (step.memory_analysis().temp_size_in_bytes for step in steps)
  assert remat_bytes < 0.9 * plain_bytes
