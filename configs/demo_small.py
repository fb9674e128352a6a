"""The demo's NASNet at a third of its width: the second model of the CPU-sized demo study.

    python -m covid_jax.study --workdir runs/demo_study --configs configs/demo.py,configs/demo_small.py \
        --seeds 0,1

trains both models with two seeds each on the quickstart's data (`bash scripts/quickstart.sh` builds it)
and compares them the way the study compares VGG16, ResNet50 and NASNetLarge; the README shows the table.
"""

from configs import demo


def get_config():
  config = demo.get_config()
  config.model.nasnet.penultimate_filters = 96
  config.model.nasnet.stem_block_filters = 8
  config.model.head.dims = (32, 16)
  return config
