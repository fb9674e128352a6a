"""NASNetLarge + the study's head, ImageNet weights ported from Keras, the study's protocol.

    python scripts/port_keras_weights.py --model nasnet_large --output ported_weights/nasnet_large
    python -m covid_jax.main --config=configs/nasnet.py --workdir=runs/nasnet

The study reported test accuracy 0.9806 / F1 0.98 (image-level split, [0, 1] inputs
where NASNet expects [-1, 1]). At 224 px as in the study; NASNetLarge's native
size is 331 (`--config.model.image_size=331`).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'nasnet_large'
  config.init_from = 'ported_weights/nasnet_large'
  return config
