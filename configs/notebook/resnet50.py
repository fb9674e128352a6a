"""The study's ResNet50 notebook, replicated as closely as covid_jax allows: both phases, the notebook's inputs.

    python scripts/port_keras_weights.py --model resnet50 --output ported_weights/resnet50
    python -m data_prep.build --source_dir DATA/DATA --data_dir data/covid_xray_by_image --group_by image
    python -m covid_jax.main --config=configs/notebook/resnet50.py --workdir=runs/notebook/resnet50 \
      --config.data_dir=data/covid_xray_by_image

Phase 1 as in configs/notebook/vgg16.py. Phase 2, the notebook's fine-tune: `for layer in model.layers[-54:]:
if not BatchNormalization: layer.trainable = True` over the whole Keras model (`fine_tune.layer_rule='study'`:
the last 14 weighted ResNet50 layers, from conv4_block5_3_conv), 60 epochs of Adam at 1e-3 with
ReduceLROnPlateau on val_loss (factor 0.8, patience 5, cooldown 1, min 1e-6, Keras's min_delta 1e-4), the best
checkpoint by val_accuracy, early stopping on val_loss with patience 20. ResNet50 gets [0, 1/255] images instead
of caffe preprocessing. The study reported test accuracy 0.8788, F1 0.85; the recommended configs/resnet50.py
fixes its mistakes.

What still differs from the notebook, besides the differences configs/notebook/vgg16.py lists:
- Phase 2 starts from the last epoch of phase 1; the notebook's EarlyStopping(restore_best_weights=True) first
  put back phase 1's best epoch.
- The run keeps one best checkpoint, by val_accuracy over both phases, and evaluates it on test: a phase-2
  epoch must beat phase 1's best to replace it. The notebook's phase-2 ModelCheckpoint started afresh, and its
  EarlyStopping left the best val_loss weights of phase 2 in memory at the end.
- The plateau rule sees the val loss of our eval step (label smoothing 0.2, the head's L1L2 penalty excluded);
  Keras's val_loss adds the regularisation penalty.
"""

from configs.notebook import vgg16


def get_config():
  config = vgg16.get_config()
  config.model.name = 'resnet50'
  config.init_from = 'ported_weights/resnet50'
  config.fine_tune.num_epochs = 60
  config.fine_tune.layer_rule = 'study'
  config.fine_tune.unfreeze_layers = 54
  config.fine_tune.learning_rate = 1e-3
  config.fine_tune.schedule = 'plateau'
  config.fine_tune.plateau_metric = 'val_loss'
  config.fine_tune.plateau_factor = 0.8
  config.fine_tune.plateau_patience = 5
  config.fine_tune.plateau_cooldown = 1
  config.fine_tune.plateau_min_learning_rate = 1e-6
  config.fine_tune.plateau_min_delta = 1e-4
  config.fine_tune.early_stopping.metric = 'val_loss'
  config.fine_tune.early_stopping.patience = 20
  config.fine_tune.early_stopping.min_delta = 0.0
  return config
