"""`models.preprocess` against keras.applications' own `preprocess_input` for every backbone."""

import numpy as np
import pytest
from keras.applications import nasnet, resnet50, vgg16

from covid_jax import models

# The Keras module whose preprocess_input goes with each backbone's ImageNet weights.
KERAS_MODULES = {
    'vgg16': vgg16,
    'resnet50': resnet50,
    'nasnet_large': nasnet,
    'nasnet_mobile': nasnet,
    'nasnet': nasnet,
}


def test_every_backbone_has_a_reference():
  assert set(models.BACKBONES) == set(KERAS_MODULES)


@pytest.mark.parametrize('name', sorted(KERAS_MODULES))
@pytest.mark.parametrize('dtype', [np.float32, np.uint8])
def test_preprocess_matches_keras(name, dtype):
  # Distinct ranges per channel, so a missing or doubled RGB -> BGR flip shows.
  rng = np.random.default_rng(0)
  images = np.stack([rng.uniform(lo, hi, (2, 5, 7)) for lo, hi in ((0, 80), (80, 170), (170, 255))], axis=-1)
  images = images.astype(dtype)
  # Keras edits float NumPy input in place: give it a copy.
  want = KERAS_MODULES[name].preprocess_input(images.copy())
  got = models.preprocess(name, images)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
