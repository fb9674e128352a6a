"""Grad-CAM against Keras's Grad-CAM (tf.GradientTape on the same ported weights), and its overlays."""

import jax
import keras
import numpy as np
import pytest
import tensorflow as tf

from covid_jax import gradcam, models, port
from covid_jax.models.classifier import Classifier
from covid_jax.models.head import Head
from covid_jax.port.keras_models import keras_backbone, keras_module
from tests.keras_reference import randomize_batch_norm

SMALL_NASNET = dict(penultimate_filters=96, num_blocks=1, stem_block_filters=8, filter_multiplier=2,
                    skip_reduction=False)
# (backbone, its arguments, image side): VGG16's map comes from a hooked convolution with Keras's fused ReLU,
# NASNet's from the backbone's output.
CASES = {'vgg16': ('vgg16', {}, 64), 'nasnet': ('nasnet', SMALL_NASNET, 96)}


def _keras_gradcam(backbone: keras.Model, features: keras.KerasTensor, dense: tuple[np.ndarray, np.ndarray],
                   images: np.ndarray) -> np.ndarray:
  """The Keras Grad-CAM recipe: gradient of the COVID log-odds by tf.GradientTape, channel weights, ReLU."""
  pooled = keras.layers.GlobalAveragePooling2D()(backbone.output)
  head = keras.layers.Dense(2)
  logits = head(pooled)
  head.set_weights(list(dense))
  grad_model = keras.Model(backbone.inputs, [features, logits])
  with tf.GradientTape() as tape:
    activations, out = grad_model(tf.constant(images), training=False)
    covid = out[:, 1] - out[:, 0]  # The log-odds of COVID.
  gradients = tape.gradient(covid, activations)
  weights = tf.reduce_mean(gradients, axis=(1, 2))
  return tf.nn.relu(tf.einsum('bhwc,bc->bhw', activations, weights)).numpy()


@pytest.mark.parametrize('case', sorted(CASES))
def test_maps_equal_keras_gradcam(case):
  name, args, side = CASES[case]
  backbone = keras_backbone(name, (side, side, 3), **args)
  randomize_batch_norm(backbone, seed=1)
  rng = np.random.default_rng(0)
  channels = backbone.output_shape[-1]
  dense = (rng.normal(0, 1 / np.sqrt(channels), (channels, 2)).astype(np.float32),
           rng.normal(0, 0.1, 2).astype(np.float32))
  rgb = rng.uniform(0, 255, (3, side, side, 3)).astype(np.float32)
  layer = gradcam.feature_layer(name)
  features = backbone.output if layer == models.get_spec(name).output_layer else backbone.get_layer(layer).output
  want = _keras_gradcam(backbone, features, dense, keras_module(name).preprocess_input(rgb.copy()))

  ported = port.from_keras(backbone, name, **args)
  model = Classifier(backbone=models.create_backbone(name, **args), backbone_name=name,
                     head=Head(dims=(), batch_norm=False), pooling='avg')
  variables = {'params': {'backbone': ported['params'], 'head': {'logits': {'kernel': dense[0], 'bias': dense[1]}}},
               'batch_stats': {'backbone': ported.get('batch_stats', {})}}
  got, _ = gradcam.compiled_maps(model, layer)(variables, rgb)
  assert want.shape == got.shape and want.shape[1] > 1
  assert (want.max(axis=(1, 2)) > 0).all()  # Non-trivial maps.
  scale = np.abs(want).max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(np.asarray(got) / scale, want / scale, rtol=0, atol=1e-4)


def test_unknown_layer_is_named():
  model = Classifier(backbone=models.create_backbone('vgg16'), backbone_name='vgg16',
                     head=Head(dims=(), batch_norm=False))
  variables = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="'block9_conv1' is not a layer of the vgg16 backbone"):
    gradcam.class_activation_maps(model, variables, np.zeros((1, 32, 32, 3), np.float32), 'block9_conv1')


def test_upsample_scales_each_map_to_one_and_keeps_zero_maps():
  maps = np.zeros((2, 2, 2), np.float32)
  maps[0] = [[0, 2], [4, 0]]
  up = gradcam.upsample(maps, 8)
  assert up.shape == (2, 8, 8) and np.isclose(up[0].max(), 1.0) and (up[1] == 0).all()
  assert up[0, -1, 0] > up[0, 0, -1] > up[0, 0, 0]  # The larger value's corner stays the hotter.
