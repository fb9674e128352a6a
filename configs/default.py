"""Every key the training system reads, with the study's protocol as the default.

The defaults reproduce the Keras study (DESIGN §2) except its mistakes: each
backbone gets its own Keras preprocessing, and the data step splits by patient.
Other configs derive from this one; `--config.key=value` overrides any key, and
a mistyped key is an error (the config is locked).
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  # Output of `python -m data_prep.build` (holds manifest.json).
  config.data_dir = 'data/covid_xray'

  config.model = ml_collections.ConfigDict()
  # vgg16 | resnet50 | nasnet_large | nasnet_mobile | nasnet (generic, sized by model.nasnet).
  config.model.name = 'nasnet_large'
  # Input side in pixels; the study resized everything to 224 (NASNetLarge's own default is 331).
  config.model.image_size = 224
  # How the backbone's feature map becomes a vector: avg | max | flatten.
  config.model.pooling = 'avg'
  # The backbone's input: keras (its own Keras preprocess_input) | notebook (the study's scaling: [0, 1] for
  # VGG16, [0, 1/255] for ResNet50 and NASNet, which none of their ImageNet weights expect).
  config.model.preprocessing = 'keras'
  # Generic NASNet builder arguments; None keeps the named preset's value.
  config.model.nasnet = ml_collections.ConfigDict({
      'penultimate_filters': config_dict.placeholder(int),
      'num_blocks': config_dict.placeholder(int),
      'stem_block_filters': config_dict.placeholder(int),
      'skip_reduction': config_dict.placeholder(bool),
      'filter_multiplier': config_dict.placeholder(int),
      # Recompute each cell's activations in the backward pass instead of storing them: a full
      # fine-tune then needs far less memory, for one more forward pass per step and a longer compile.
      'remat': config_dict.placeholder(bool),
      # A block's normal cells after the first as one lax.scan: a shorter compile, a slower step (the
      # scan stacks each cell's activations). NASNetLarge's preset scans, NASNetMobile's runs unrolled.
      'scan_cells': config_dict.placeholder(bool),
  })
  # Backbone BatchNorm momentum; None keeps Keras's (ResNet50 0.99, NASNet 0.9997). Training a
  # backbone from scratch for a few hundred steps needs a faster one: at 0.9997 the moving
  # averages barely leave their initial 0/1, and inference mode predicts one class.
  config.model.bn_momentum = config_dict.placeholder(float)
  # The study's head: BN -> Dense 512 (ReLU, L1L2) -> BN -> Dropout -> Dense 256 (ReLU) -> BN -> Dense 2.
  config.model.head = ml_collections.ConfigDict()
  config.model.head.dims = (512, 256)  # Hidden Dense widths.
  config.model.head.dropout = 0.2  # After the first hidden layer's BN, as in the notebook.
  config.model.head.batch_norm = True  # BN on the pooled features and after each hidden layer.
  config.model.head.l1 = 1e-5  # L1 on the first hidden kernel (Keras L1L2 regulariser).
  config.model.head.l2 = 1e-4  # L2 on the first hidden kernel.

  # Directory written by scripts/port_keras_weights.py; None trains from random initialisation.
  config.init_from = config_dict.placeholder(str)
  # Phase 1 trains the head only: no updates to backbone params, backbone BN in inference mode.
  config.freeze_backbone = True

  # Phase 2 (skipped when num_epochs is 0): unfreeze the trailing backbone layers and train on.
  config.fine_tune = ml_collections.ConfigDict()
  # Trailing layers to unfreeze (BatchNorm stays frozen), counted as layer_rule says; -1 = every backbone layer.
  config.fine_tune.unfreeze_layers = 54
  # weighted: the last unfreeze_layers backbone layers with weights. study: the backbone's weighted layers among
  # the last unfreeze_layers layers of the whole Keras model, weightless and head layers counted, as the study's
  # `model.layers[-54:]` did (13 VGG16 layers, 14 of ResNet50, 12 of NASNetLarge).
  config.fine_tune.layer_rule = 'weighted'
  config.fine_tune.num_epochs = 50
  # The study's ResNet50 and NASNetLarge notebooks fine-tuned at 1e-3 (Adam, plateau schedule); this default is
  # ten times lower, with a cosine decay (configs/notebook/ has the study's).
  config.fine_tune.learning_rate = 1e-4
  config.fine_tune.end_learning_rate = 1e-6  # Where the cosine schedule ends.
  config.fine_tune.warmup_epochs = 0
  # cosine (to end_learning_rate over the phase) | plateau (Keras ReduceLROnPlateau, judged once per epoch: after
  # plateau_patience epochs without plateau_metric improving by more than plateau_min_delta, the rate is multiplied
  # by plateau_factor, not below plateau_min_learning_rate; Keras's cooldown rule: covid_jax/progress.py).
  config.fine_tune.schedule = 'cosine'
  config.fine_tune.plateau_metric = 'val_loss'
  config.fine_tune.plateau_factor = 0.8
  config.fine_tune.plateau_patience = 5
  config.fine_tune.plateau_cooldown = 1
  config.fine_tune.plateau_min_learning_rate = 1e-6
  config.fine_tune.plateau_min_delta = 1e-4  # Keras's default.
  # The fine-tune phase's early stopping; None keeps early_stopping's value. The phase starts afresh when its
  # metric differs from the first phase's, else it goes on from the best value so far.
  config.fine_tune.early_stopping = ml_collections.ConfigDict({
      'metric': config_dict.placeholder(str),
      'patience': config_dict.placeholder(int),
      'min_delta': config_dict.placeholder(float),
  })

  config.batch_size = 128  # Global, over all devices and hosts; must divide by the device count.
  config.eval_batch_size = 128  # Global; the last eval batch is padded and masked, never dropped.
  config.num_epochs = 50  # Phase 1.
  config.optimizer = 'adam'  # adam | adamw | sgd (momentum 0.9).
  config.learning_rate = 1e-3  # Cosine-decayed to end_learning_rate over the phase.
  config.end_learning_rate = 1e-6
  config.warmup_epochs = 0  # Linear warm-up from 0 before the cosine decay.
  config.weight_decay = 0.0  # Decoupled (adamw) or L2-in-gradient (sgd); ignored by adam.
  config.label_smoothing = 0.2

  config.augment = ml_collections.ConfigDict()
  config.augment.flip = True  # Random horizontal flip.
  config.augment.contrast = 0.2  # Random contrast factor in [1 - c, 1 + c]; 0 disables.

  # Phase 'head' from the frozen backbone's pooled features, computed once before it (covid_jax/head_features.py)
  # and kept in the workdir for a resumed run, instead of running the backbone on every batch of every epoch.
  config.head_features = ml_collections.ConfigDict()
  config.head_features.cache = config_dict.placeholder(bool)  # None: True when freeze_backbone.
  # K views per train image: view 0 unaugmented, views 1..K-1 with the flip and contrast above drawn from
  # (seed, view); each epoch takes one view per image, drawn from (seed, epoch). Val uses view 0.
  config.head_features.views = 1

  # auto | float32 | bfloat16 (compute in bf16; parameters, loss and metrics stay float32). auto: bfloat16 on a
  # GPU or TPU (the study trained in mixed precision), float32 on the CPU; a run's config.json holds the choice.
  config.dtype = 'auto'
  # Keep freed host memory for reuse (covid_jax/runtime.py): a CPU train step stops page-faulting its buffers
  # in afresh every step, and resident memory stays at its peak, which the heap's fragmentation can raise:
  # turn it off where a step fills much of the host. XLA compiles somewhat slower meanwhile. Figures:
  # benchmarks/BENCHMARKS.md. None (auto): on the CPU only, since a GPU or TPU step's buffers live on the device.
  config.retain_freed_host_memory = config_dict.placeholder(bool)
  # JAX's persistent compilation cache: a later run of the same steps (same config, shapes and versions)
  # loads them instead of compiling again. '' turns it off; the JAX_COMPILATION_CACHE_DIR environment
  # variable, if set, takes precedence.
  config.compilation_cache_dir = '~/.cache/covid_jax/jax'

  # How ops are formulated (covid_jax/models/formulations.py): the backend's choice unless forced here.
  # Values are the same numbers to rounding; they differ in speed, so forcing one only changes time.
  config.formulations = ml_collections.ConfigDict()
  config.formulations.backend = 'auto'  # auto (the devices' platform) | cpu | accelerator: whose set to start from.
  config.formulations.conv = config_dict.placeholder(str)  # by_size | native | im2col | products
  config.formulations.pointwise = config_dict.placeholder(str)  # by_size | matmul | blocks (1x1 kernel gradient)
  config.formulations.depthwise = config_dict.placeholder(str)  # shifted | grouped
  config.formulations.pooling = config_dict.placeholder(str)  # strided_slices | reduce_window | by_overlap
  config.formulations.separate_update = config_dict.placeholder(bool)  # Train step as two programs.

  config.early_stopping = ml_collections.ConfigDict()
  config.early_stopping.metric = 'val_accuracy'  # val_accuracy | val_roc_auc | val_loss (lower is better).
  config.early_stopping.patience = 15  # Epochs without improvement before a phase stops.
  config.early_stopping.min_delta = 0.0  # Improvement must exceed this.
  # The metric the best checkpoint (the one evaluated on test) is chosen by, over the whole run; None: metric.
  config.early_stopping.checkpoint_metric = config_dict.placeholder(str)

  # The decision threshold on the (calibrated) COVID probability, chosen on val only and applied to test:
  # fixed (0.5, the study) | youden (max sensitivity + specificity - 1) | target_sensitivity (the highest
  # threshold whose val sensitivity reaches threshold.target).
  config.threshold = ml_collections.ConfigDict()
  config.threshold.rule = 'fixed'
  config.threshold.target = 0.95

  config.seed = 0
  config.log_every_steps = 10  # TensorBoard train scalars.
  config.prediction_grid_size = 16  # Test images in the prediction grid plot.
  # Test images in RUN/gradcam_grid.png, with the maps' parameter-randomisation check; 0 = no grid.
  config.gradcam_grid_size = 16
  return config
