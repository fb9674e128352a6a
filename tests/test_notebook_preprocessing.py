"""config.model.preprocessing='notebook': the study's input scaling, checked by hand, and what the backbone gets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from covid_jax import model_init
from covid_jax.models import create_backbone, preprocessing
from covid_jax.models.classifier import Classifier
from covid_jax.models.head import Head

PIXELS = np.array([[[[0.0, 51.0, 255.0]]]], np.float32)  # One RGB pixel, 0-255.
# By hand: decoded to [0, 1] (x / 255); VGG16 takes that, ResNet50 and NASNet divide by 255 again.
IN_UNIT_RANGE = [0.0, 0.2, 1.0]
BY_255_AGAIN = [0.0, 0.2 / 255, 1 / 255]


@pytest.mark.parametrize('name,want', [
    ('vgg16', IN_UNIT_RANGE), ('resnet50', BY_255_AGAIN), ('nasnet_large', BY_255_AGAIN),
    ('nasnet_mobile', BY_255_AGAIN), ('nasnet', BY_255_AGAIN)])
def test_notebook_scaling_by_hand(name, want):
  got = preprocessing.model_input('notebook', name, PIXELS)
  np.testing.assert_allclose(np.asarray(got).ravel(), want, rtol=1e-6)


def test_unknown_preprocessing_names_the_key():
  with pytest.raises(ValueError, match="model.preprocessing 'caffe'"):
    preprocessing.model_input('caffe', 'vgg16', PIXELS)


# Keras's caffe mode by hand: RGB (0, 51, 255) -> BGR (255, 51, 0) minus the BGR means (103.939, 116.779, 123.68).
@pytest.mark.parametrize('mode,want', [('notebook', BY_255_AGAIN),
                                       ('keras', [255 - 103.939, 51 - 116.779, 0 - 123.68])])
def test_classifier_feeds_the_backbone_the_chosen_scaling(mode, want):
  """What ResNet50 receives: [0, 1/255] for the notebook; caffe's BGR minus the ImageNet mean for Keras's."""
  model = Classifier(backbone=create_backbone('resnet50'), backbone_name='resnet50', head=Head(dims=(4,)),
                     preprocessing=mode)
  images = jnp.broadcast_to(PIXELS, (1, 32, 32, 3))
  seen = []

  def record(next_fun, args, kwargs, context):
    if context.module.name == 'backbone' and context.method_name == '__call__':
      seen.append(np.asarray(args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.init(jax.random.key(0), images)
  np.testing.assert_allclose(seen[0][0, 0, 0], want, rtol=1e-5)


def test_the_config_key_reaches_the_model():
  config = default.get_config()
  config.model.preprocessing = 'notebook'
  assert model_init.create_model(config).preprocessing == 'notebook'
