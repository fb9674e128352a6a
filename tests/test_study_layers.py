"""The study's fine-tune rule (`fine_tune.layer_rule='study'`) against Keras running the notebook's own loop.

The notebook builds the backbone on the model's input tensor, puts the head after it, freezes the backbone,
then runs `for layer in model.layers[-54:]: if not BatchNormalization: layer.trainable = True`. The layers
Keras then marks trainable are the truth our rule must reproduce, on the same models built without weights.
"""

import jax
import keras
import pytest

from configs import default
from covid_jax import model_init, models, state
from covid_jax.port import keras_models
from tests import runs

SIZE = 32
KERAS_POOLING = {'avg': keras.layers.GlobalAveragePooling2D, 'max': keras.layers.GlobalMaxPooling2D,
                 'flatten': keras.layers.Flatten}


def notebook_trainable(config) -> list[str]:
  """The backbone layers with weights that Keras marks trainable after the notebook's fine-tune loop, in order."""
  head, spec = config.model.head, models.get_spec(config.model.name)
  inputs = keras.Input((SIZE, SIZE, 3))
  scaled = keras.layers.Rescaling(1 / 255)(inputs)
  sizes = {k: v for k, v in {**spec.defaults, **model_init.backbone_args(config)}.items()
           if k in spec.keras_generic_args}
  builder = getattr(keras_models.keras_module(config.model.name), spec.keras_application)
  base = builder(include_top=False, weights=None, input_tensor=scaled, input_shape=(SIZE, SIZE, 3),
                 **spec.keras_fixed_args, **sizes)
  base.trainable = False
  x = KERAS_POOLING[config.model.pooling]()(base.output)
  norm = (lambda y: keras.layers.BatchNormalization()(y)) if head.batch_norm else (lambda y: y)
  x = norm(x)
  for i, width in enumerate(head.dims):
    x = norm(keras.layers.Dense(width, activation='relu')(x))
    if i < len(head.dims) - 1:
      x = keras.layers.Dropout(head.dropout)(x)
  model = keras.Model(inputs, keras.layers.Dense(2, activation='softmax')(x))
  for layer in model.layers[-config.fine_tune.unfreeze_layers:]:
    if not isinstance(layer, keras.layers.BatchNormalization):
      layer.trainable = True
  backbone = {layer.name for layer in base.layers}
  return [layer.name for layer in model.layers if layer.name in backbone and layer.trainable and layer.weights]


def ours(config) -> set[str]:
  """The backbone layers our fine-tune phase trains, from the layer order a run without ported weights uses."""
  model = model_init.create_model(config)
  variables = model_init.model_outline(model, config).variables
  order = keras_models.layer_order(config.model.name, (SIZE, SIZE, 3), **model_init.backbone_args(config))
  labels = state.phase_labels(model, config, variables, state.make_phases(config)[1], order)
  return {name for name, tree in labels['backbone'].items() if set(jax.tree.leaves(tree)) == {'train'}}


def study_config(name: str, **overrides):
  config = default.get_config() if name != 'nasnet' else runs.tiny_config('unused')
  config.model.name, config.model.image_size = name, SIZE
  config.update_from_flattened_dict({'freeze_backbone': True, 'fine_tune.num_epochs': 1,
                                     'fine_tune.layer_rule': 'study', 'fine_tune.unfreeze_layers': 54, **overrides})
  return config


@pytest.mark.parametrize('name,overrides,expected', [
    ('vgg16', {}, 13),  # All 13 convolutions.
    ('resnet50', {}, 14),  # From conv4_block5_3_conv.
    ('nasnet', {}, None),  # The small generic NASNet standing in for NASNetLarge (12 of its layers, by hand).
    ('resnet50', {'model.pooling': 'max', 'model.head.batch_norm': False, 'model.head.dims': (32, 16, 8),
                  'fine_tune.unfreeze_layers': 30}, None),  # Another head: 7 Keras layers after the backbone.
], ids=('vgg16', 'resnet50', 'small-nasnet', 'resnet50-other-head'))
def test_study_rule_unfreezes_what_the_notebook_loop_marks_trainable(name, overrides, expected):
  config = study_config(name, **overrides)
  truth = notebook_trainable(config)
  assert ours(config) == set(truth)
  assert expected is None or len(truth) == expected
  if (name, overrides) == ('resnet50', {}):
    assert truth[0] == 'conv4_block5_3_conv'


def test_weighted_rule_counts_weighted_backbone_layers_only():
  """The default rule: the last 54 weighted non-BatchNorm ResNet50 layers, four times the study's 14."""
  config = study_config('resnet50', **{'fine_tune.layer_rule': 'weighted'})
  model = keras_models.keras_backbone('resnet50', (SIZE, SIZE, 3), seed=None)
  weighted = [layer.name for layer in model.layers
              if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
  assert ours(config) == set(weighted[-54:])
