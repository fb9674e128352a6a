"""VGG16 + the study's head, ImageNet weights ported from Keras, the study's protocol.

    python scripts/port_keras_weights.py --model vgg16 --output ported_weights/vgg16
    python -m covid_jax.main --config=configs/vgg16.py --workdir=runs/vgg16

The study reported test accuracy 0.9709 / F1 0.97 with an image-level split and
mismatched preprocessing; expect lower but honest numbers with patient-level splits.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'vgg16'
  config.init_from = 'ported_weights/vgg16'
  return config
