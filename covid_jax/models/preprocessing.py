"""Keras `preprocess_input` for each backbone, kept apart from the backbone itself.

The original study fed [0, 1] pixels to every backbone; these functions are what
the ImageNet weights were actually trained with.
"""

import jax.numpy as jnp

from covid_jax.models import registry

# ImageNet channel means in BGR order, as in keras.applications.imagenet_utils.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def caffe(images: jnp.ndarray) -> jnp.ndarray:
  """RGB 0-255 -> BGR minus the ImageNet mean (VGG16, ResNet50)."""
  return images[..., ::-1] - jnp.asarray(_CAFFE_MEAN_BGR, images.dtype)


def tf_mode(images: jnp.ndarray) -> jnp.ndarray:
  """RGB 0-255 -> [-1, 1] (NASNet)."""
  return images / 127.5 - 1.0


_MODES = {'caffe': caffe, 'tf': tf_mode}


def preprocess(name: str, images: jnp.ndarray) -> jnp.ndarray:
  """Equals keras.applications.<name>.preprocess_input for float RGB 0-255 `images` (NHWC)."""
  images = jnp.asarray(images, jnp.result_type(images, jnp.float32))
  return _MODES[registry.get_spec(name).preprocessing](images)
