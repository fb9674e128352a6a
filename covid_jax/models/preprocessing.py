"""What a backbone's input is made from float RGB 0-255 images: Keras's `preprocess_input`, or the study's scaling.

'keras' gives each backbone what its ImageNet weights were trained with. 'notebook'
reproduces the study's notebooks, which decoded images to [0, 1] and fed that to
VGG16 as it was, and through a further Rescaling(1/255), i.e. [0, 1/255], to
ResNet50 and NASNet: no backbone got its own preprocessing.
"""

import jax.numpy as jnp

from covid_jax.models import registry

PREPROCESSINGS = ('keras', 'notebook')
# ImageNet channel means in BGR order, as in keras.applications.imagenet_utils.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# The notebooks' input range per backbone: the upper end of what a 255 pixel became.
_NOTEBOOK_RANGE = {'vgg16': 1.0, 'resnet50': 1 / 255, 'nasnet_large': 1 / 255, 'nasnet_mobile': 1 / 255,
                   'nasnet': 1 / 255}


def caffe(images: jnp.ndarray) -> jnp.ndarray:
  """RGB 0-255 -> BGR minus the ImageNet mean (VGG16, ResNet50)."""
  return images[..., ::-1] - jnp.asarray(_CAFFE_MEAN_BGR, images.dtype)


def tf_mode(images: jnp.ndarray) -> jnp.ndarray:
  """RGB 0-255 -> [-1, 1] (NASNet)."""
  return images / 127.5 - 1.0


_MODES = {'caffe': caffe, 'tf': tf_mode}


def _as_float(images: jnp.ndarray) -> jnp.ndarray:
  return jnp.asarray(images, jnp.result_type(images, jnp.float32))


def preprocess(name: str, images: jnp.ndarray) -> jnp.ndarray:
  """Equals keras.applications.<name>.preprocess_input for float RGB 0-255 `images` (NHWC)."""
  return _MODES[registry.get_spec(name).preprocessing](_as_float(images))


def notebook(name: str, images: jnp.ndarray) -> jnp.ndarray:
  """The study's scaling of RGB 0-255 `images` for backbone `name`: [0, 1] for VGG16, [0, 1/255] otherwise."""
  registry.get_spec(name)  # Names the known backbones when `name` is none of them.
  images = _as_float(images)
  return images * jnp.asarray(_NOTEBOOK_RANGE[name] / 255, images.dtype)


def model_input(preprocessing: str, name: str, images: jnp.ndarray) -> jnp.ndarray:
  """Backbone `name`'s input from RGB 0-255 `images` under config.model.preprocessing (`PREPROCESSINGS`)."""
  if preprocessing not in PREPROCESSINGS:
    raise ValueError(f'model.preprocessing {preprocessing!r}: one of {PREPROCESSINGS}')
  return (preprocess if preprocessing == 'keras' else notebook)(name, images)
