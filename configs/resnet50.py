"""ResNet50 + the study's head, ImageNet weights ported from Keras, the study's protocol.

    python scripts/port_keras_weights.py --model resnet50 --output ported_weights/resnet50
    python -m covid_jax.main --config=configs/resnet50.py --workdir=runs/resnet50

The study reported test accuracy 0.8788 / F1 0.85, with [0, 1] inputs where ResNet50
expects caffe preprocessing; with the right preprocessing expect it to do better.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'resnet50'
  config.init_from = 'ported_weights/resnet50'
  return config
