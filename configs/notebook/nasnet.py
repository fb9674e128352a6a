"""The study's NASNetLarge notebook, replicated as closely as covid_jax allows: both phases, the notebook's inputs.

    python scripts/port_keras_weights.py --model nasnet_large --output ported_weights/nasnet_large
    python -m data_prep.build --source_dir DATA/DATA --data_dir data/covid_xray_by_image --group_by image
    python -m covid_jax.main --config=configs/notebook/nasnet.py --workdir=runs/notebook/nasnet \
      --config.data_dir=data/covid_xray_by_image

The protocol of configs/notebook/resnet50.py on NASNetLarge at 224 px, as in the study: its `model.layers[-54:]`
unfreezes the last 12 weighted layers (the last normal cell). NASNetLarge gets [0, 1/255] images instead of
[-1, 1]. The study reported test accuracy 0.9806, F1 0.98; the recommended configs/nasnet.py fixes its mistakes.
The differences from the notebook that remain are those configs/notebook/vgg16.py and resnet50.py list.
"""

from configs.notebook import resnet50


def get_config():
  config = resnet50.get_config()
  config.model.name = 'nasnet_large'
  config.init_from = 'ported_weights/nasnet_large'
  return config
