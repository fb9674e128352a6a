"""The study's VGG16 notebook, replicated as closely as covid_jax allows: phase 1 only, the notebook's inputs.

    python scripts/port_keras_weights.py --model vgg16 --output ported_weights/vgg16
    python -m data_prep.build --source_dir DATA/DATA --data_dir data/covid_xray_by_image --group_by image
    python -m covid_jax.main --config=configs/notebook/vgg16.py --workdir=runs/notebook/vgg16 \
      --config.data_dir=data/covid_xray_by_image

The notebook trains the head on the frozen backbone (50 epochs, Adam with cosine decay 1e-3 -> 1e-6, early
stopping on val_accuracy with patience 15 and min_delta 1e-5, the best weights kept); it defines a fine-tune
phase but never runs it, so its reported result (test accuracy 0.9709, F1 0.97) is the frozen phase alone. Its
VGG16 gets [0, 1] images instead of Keras's caffe preprocessing. Built with `--group_by image`, the split is
image-level as the study's was (and leaks patients); the recommended configs/vgg16.py fixes both mistakes.

What still differs from the notebook (configs/notebook/resnet50.py lists the differences of the two-phase runs):
- Mixed precision is bfloat16 here (parameters, loss and metrics float32); the notebook's Keras `mixed_float16`
  computed in float16 with loss scaling.
- The split is seeded and reproducible; the notebook's came from an unsorted glob and an unseeded shuffle, so
  no split equals it. Images are resized once when the data is built (stretched to 224 as the notebook did).
- The random flip is horizontal only; Keras's RandomFlip flips vertically too unless told "horizontal".
"""

from configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'vgg16'
  config.init_from = 'ported_weights/vgg16'
  config.model.preprocessing = 'notebook'  # [0, 1] into VGG16; [0, 1/255] into ResNet50 and NASNet.
  config.dtype = 'bfloat16'
  # Phase 1: the head on the frozen backbone.
  config.freeze_backbone = True
  config.num_epochs = 50
  config.optimizer = 'adam'
  config.learning_rate = 1e-3
  config.end_learning_rate = 1e-6
  config.warmup_epochs = 0
  config.early_stopping.metric = 'val_accuracy'
  config.early_stopping.patience = 15
  config.early_stopping.min_delta = 1e-5
  config.early_stopping.checkpoint_metric = 'val_accuracy'
  config.fine_tune.num_epochs = 0  # Defined in the notebook, never run.
  config.batch_size = 128
  config.label_smoothing = 0.2
  config.augment.flip = True
  config.augment.contrast = 0.2
  config.model.image_size = 224
  return config
