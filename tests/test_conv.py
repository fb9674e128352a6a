"""Every formulation of the convolution against Keras Conv2D on TensorFlow, values and gradients."""

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
import tensorflow as tf

from covid_jax.models import conv, formulations


def _keras_conv(x, kernel, bias, strides, pads, weight):
  """Keras's ZeroPadding2D + Conv2D, its output and the gradients of sum(output * weight)."""
  layer = keras.layers.Conv2D(kernel.shape[-1], kernel.shape[:2], strides, 'valid', use_bias=bias is not None)
  padded = keras.layers.ZeroPadding2D(pads)
  x_tf = tf.constant(x)
  layer.build(padded.compute_output_shape(x.shape))
  layer.set_weights([kernel] if bias is None else [kernel, bias])
  with tf.GradientTape() as tape:
    tape.watch(x_tf)
    y = layer(padded(x_tf))
    loss = tf.reduce_sum(y * weight)
  grads = tape.gradient(loss, [x_tf, *layer.trainable_weights])
  return y.numpy(), [g.numpy() for g in grads]


# (batch, height, width, channels in/out, window, stride, padding).
CASES = [(2, 9, 9, 3, 4, 3, 1, 'SAME'), (12, 8, 7, 3, 5, 3, 2, 'VALID'), (9, 11, 10, 2, 4, 7, 2, ((3, 3), (3, 3))),
         (3, 10, 10, 4, 2, 3, 2, 'SAME')]


def _largest_proper_divisor(n):
  return max([d for d in range(1, n) if n % d == 0] or [1])


# The im2col gradient's blocks as chosen for these small shapes (the whole batch at once), and forced to
# a few rows of one image, or to a few whole images.
BLOCKS = {'chosen': None, 'rows': lambda n, out_h: (1, _largest_proper_divisor(out_h)),
          'images': lambda n, out_h: (_largest_proper_divisor(n), out_h)}


@pytest.mark.parametrize('formulation, blocks', [('native', 'chosen'), ('im2col', 'chosen'), ('im2col', 'rows'),
                                                 ('im2col', 'images'), ('products', 'chosen')])
@pytest.mark.parametrize('batch, height, width, c_in, c_out, window, stride, padding', CASES)
def test_matches_keras_conv2d_and_its_gradients(batch, height, width, c_in, c_out, window, stride, padding, formulation,
                                                blocks, monkeypatch):
  if BLOCKS[blocks]:
    monkeypatch.setattr(conv, 'block_shape', lambda n, out_h, *_: BLOCKS[blocks](n, out_h))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, height, width, c_in)).astype(np.float32)
  kernel = rng.normal(size=(window, window, c_in, c_out)).astype(np.float32)
  bias = rng.normal(size=c_out).astype(np.float32)
  module = conv.Conv(c_out, (window, window), stride, padding, formulation=formulation)
  params = {'params': {'kernel': kernel, 'bias': bias}}
  pads = padding if not isinstance(padding, str) else jax.lax.padtype_to_pads(
      (height, width), (window, window), (stride, stride), padding)
  out_shape = jax.eval_shape(module.apply, params, x).shape
  weight = rng.normal(size=out_shape).astype(np.float32)
  want, (want_dx, want_dkernel, want_dbias) = _keras_conv(x, kernel, bias, stride, tuple(map(tuple, pads)), weight)

  def loss(params, x):
    return jnp.sum(module.apply(params, x) * weight)
  got_dparams, got_dx = jax.grad(loss, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(module.apply(params, x), want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_dparams['params']['kernel'], want_dkernel, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_dparams['params']['bias'], want_dbias, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('blocks', ['matmul', 'chosen', 'rows', 'images'])
@pytest.mark.parametrize('batch, size, c_in, c_out, stride, use_bias', [(4, 6, 5, 7, 1, True), (6, 9, 3, 4, 2, False)])
def test_pointwise_conv_matches_keras_1x1_conv2d_and_its_gradients(batch, size, c_in, c_out, stride, use_bias, blocks,
                                                                    monkeypatch):
  # 'matmul': XLA's kernel gradient; the others: by blocks of pixels, as chosen or forced to rows or images.
  # The CPU's 'by_size' takes blocks for these small outputs only from a threshold of 0 bytes.
  if blocks != 'matmul':
    monkeypatch.setattr(conv, 'POINTWISE_BLOCKS_MIN_BYTES', 0)
  if BLOCKS.get(blocks):
    monkeypatch.setattr(conv, 'block_shape', lambda n, out_h, *_: BLOCKS[blocks](n, out_h))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, size, size, c_in)).astype(np.float32)
  kernel = rng.normal(size=(1, 1, c_in, c_out)).astype(np.float32)
  bias = rng.normal(size=c_out).astype(np.float32) if use_bias else None
  module = conv.PointwiseConv(c_out, stride, use_bias, formulations.CPU.pointwise)
  params = {'params': {'kernel': kernel, **({'bias': bias} if use_bias else {})}}
  out_size = (size - 1) // stride + 1
  weight = rng.normal(size=(batch, out_size, out_size, c_out)).astype(np.float32)
  want, want_grads = _keras_conv(x, kernel, bias, stride, ((0, 0), (0, 0)), weight)

  def loss(params, x):
    return jnp.sum(module.apply(params, x) * weight)
  assert ('custom_vjp_call' in str(jax.make_jaxpr(loss)(params, x))) == (blocks != 'matmul')
  got_dparams, got_dx = jax.grad(loss, argnums=(0, 1))(params, x)
  np.testing.assert_allclose(module.apply(params, x), want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_dx, want_grads[0], rtol=1e-5, atol=1e-4)
  for name, want_grad in zip(('kernel', 'bias'), want_grads[1:]):
    np.testing.assert_allclose(got_dparams['params'][name], want_grad, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('batch, want_blocks', [(32, True), (31, False)])
def test_cpu_takes_pointwise_blocks_from_8_mib_of_output(batch, want_blocks):
  # 64 x 64 pixels x 16 float32 outputs: 1/4 MiB per image.
  assert formulations.for_platform('cpu').pointwise == 'by_size' and conv.POINTWISE_BLOCKS_MIN_BYTES == 8 * 2**20
  kernel = jnp.zeros((8, 16))
  x = jax.ShapeDtypeStruct((batch, 64, 64, 8), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda x: conv.pointwise_conv(x, kernel, formulations.CPU.pointwise))(x)
  assert ('custom_vjp_call' in str(jaxpr)) == want_blocks
  # Other backends keep XLA's gradient at any size.
  jaxpr = jax.make_jaxpr(lambda x: conv.pointwise_conv(x, kernel, formulations.for_platform('gpu').pointwise))(x)
  assert 'custom_vjp_call' not in str(jaxpr)


@pytest.mark.parametrize('shape, want', [
    ((8, 224, 224, 64, 64), (1, 8)),  # 8 rows: 1,792 pixels of 2,304 patch bytes fill 4 MiB.
    ((8, 28, 28, 512, 512), (1, 28)),  # 7 rows (196 pixels) would fit; 512 pixels need the whole image.
    ((8, 14, 14, 512, 512), (4, 14)),  # One image holds 196 pixels; 4 images 784.
    ((1, 2, 2, 8, 64), (1, 2)),  # No block holds 64 pixels: the whole batch.
])
def test_blocks_fill_the_cache_budget_with_at_least_c_out_pixels(shape, want):
  n, out_h, out_w, c_in, c_out = shape
  assert conv.PATCH_BLOCK_BYTES == 4 * 2**20
  assert conv.block_shape(n, out_h, out_w, 9 * c_in * 4, c_out) == want


def test_bfloat16_kernel_gradient_is_float32_within_input_rounding():
  # Two chunks of 8 images; only the inputs' rounding to bfloat16 (2^-9 relative) separates it from float32.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 64, 64, 2)).astype(np.float32)
  g = rng.normal(size=(16, 64, 64, 3)).astype(np.float32)
  want = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=(3, 3, 2, 3), out_backprop=g, strides=[1, 1, 1, 1],
                                         padding='SAME').numpy()
  got = conv.im2col_kernel_gradient(jnp.asarray(x, jnp.bfloat16), jnp.asarray(g, jnp.bfloat16), (3, 3), (1, 1),
                                    ((1, 1), (1, 1)))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * np.abs(want).max())


@pytest.mark.parametrize('batch, want', [(2, 'im2col'), (1, 'native')])
def test_cpu_takes_im2col_for_large_gradients_only(batch, want):
  # 2 * batch * 112 * 112 output pixels * (3 * 3 * 128 inputs) * 128 outputs: 3.7 GFLOP per image.
  assert formulations.for_platform('cpu').conv == 'by_size'
  x, kernel = jax.ShapeDtypeStruct((batch, 112, 112, 128), jnp.float32), jnp.zeros((3, 3, 128, 128))
  jaxpr = jax.make_jaxpr(lambda x: conv.conv2d(x, kernel, formulation=formulations.CPU.conv))(x)
  assert ('custom_vjp_call' in str(jaxpr)) == (want == 'im2col')
  assert conv.resolve('native', 1e15, 9) == 'native'
  assert conv.resolve(formulations.for_platform('gpu').conv, 1e15, 9) == 'native'


@pytest.mark.parametrize('window, c_in, want', [(3, 3, 'products'), (7, 3, 'convolution'), (3, 4, 'convolution'),
                                                (1, 27, 'products')])
def test_cpu_takes_products_up_to_27_per_output_value(window, c_in, want):
  # VGG16's and NASNet's first layers (3x3 over RGB) take them; ResNet50's 7x7 stem (147) does not.
  assert formulations.for_platform('cpu').conv == 'by_size' and conv.PRODUCTS_MAX_TERMS == 27
  kernel = jnp.zeros((window, window, c_in, 8))
  jaxpr = str(jax.make_jaxpr(lambda x: conv.conv2d(x, kernel, (2, 2), 'VALID', formulations.CPU.conv))(
      jnp.zeros((1, 16, 16, c_in))))
  assert ('conv_general_dilated' in jaxpr) == (want == 'convolution')


def test_bfloat16_products_stay_bfloat16_within_input_rounding():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 12, 12, 3)).astype(np.float32)
  kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
  want = tf.nn.conv2d(x, kernel, 2, 'VALID').numpy()
  got = conv.conv2d(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16), (2, 2), 'VALID', 'products')
  assert got.dtype == jnp.bfloat16
  # Inputs and output each rounded to 8 bits (2^-9 relative), the sum taken in float32.
  np.testing.assert_allclose(np.float32(got), want, rtol=0, atol=0.02 * np.abs(want).max())


def test_unknown_formulation_is_named():
  with pytest.raises(ValueError, match="'winograd'"):
    conv.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), formulation='winograd')
