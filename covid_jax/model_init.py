"""The classifier the config describes, the backend's formulations for it, and its initial variables.

A run's initial variables are random, or take the backbone from ported Keras
weights (`config.init_from`); a given backbone is not drawn at all.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from covid_jax import models, runtime
from covid_jax.models import formulations
from covid_jax.models.classifier import Classifier
from covid_jax.models.head import Head
from covid_jax.port import store
from covid_jax.input_pipeline import AXIS

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# config.dtype's values: a dtype, or 'auto' (the backend's, `runtime.compute_dtype`).
DTYPE_SETTINGS = ('auto', *DTYPES)
# config.formulations keys that force one op's formulation (None keeps the backend's): one per field.
FORMULATION_KEYS = tuple(formulations.ALLOWED)


def choose_formulations(config: ml_collections.ConfigDict, platform: str) -> formulations.Formulations:
  """The op formulations for `platform` ('cpu', 'gpu', 'tpu'), or for config.formulations.backend when set,
  with the ops the config forces."""
  backend = platform if config.formulations.backend == 'auto' else config.formulations.backend
  return formulations.for_platform(backend, **{key: config.formulations[key] for key in FORMULATION_KEYS})


def backbone_args(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Backbone arguments beyond its preset: its config group's keys (e.g. model.nasnet) and a BN momentum, when set."""
  group = models.get_spec(config.model.name).config_group
  args = {k: v for k, v in config.model[group].items() if v is not None} if group else {}
  if config.model.bn_momentum is not None:
    args['bn_momentum'] = config.model.bn_momentum
  return args


def create_model(config: ml_collections.ConfigDict,
                 chosen: formulations.Formulations | None = None) -> Classifier:
  """The classifier; `chosen` formulations, and the dtype where config.dtype is 'auto', default to those of the
  default backend under the config (`covid_jax.main` resolves 'auto' for the run's devices before this)."""
  dtype = DTYPES[runtime.compute_dtype(config.dtype, jax.default_backend())]
  chosen = chosen or choose_formulations(config, jax.default_backend())
  backbone = models.create_backbone(config.model.name, formulations=chosen, dtype=dtype, axis_name=AXIS,
                                    **backbone_args(config))
  head = Head(dims=tuple(config.model.head.dims), dropout=config.model.head.dropout,
              batch_norm=config.model.head.batch_norm, dtype=dtype, axis_name=AXIS)
  return Classifier(backbone=backbone, backbone_name=config.model.name, head=head, pooling=config.model.pooling,
                    preprocessing=config.model.preprocessing, dtype=dtype)


def _dummy_images(config: ml_collections.ConfigDict) -> jax.Array:
  return jnp.zeros((1, config.model.image_size, config.model.image_size, 3), jnp.float32)


def _init(model: Classifier, config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Random initial variables (inference mode, so BN's cross-device axis is not needed yet)."""
  return model.init(jax.random.key(config.seed), _dummy_images(config), train=False)


@dataclasses.dataclass(frozen=True)
class ModelOutline:
  """What one abstract trace of the model's init shows; a run traces the model for it once, not per use."""

  variables: dict[str, Any]  # jax.ShapeDtypeStruct leaves, nested as the variables are.
  head_input: jax.ShapeDtypeStruct  # The pooled features, for initialising the head alone.


@runtime.tracing()
def model_outline(model: Classifier, config: ml_collections.ConfigDict) -> ModelOutline:
  """Variable shapes and the head's input shape, from one `jax.eval_shape` of the init."""
  head_inputs: list[jax.ShapeDtypeStruct] = []

  def record(next_fun, args, kwargs, context):
    if context.module.path == ('head',) and context.method_name == '__call__':
      head_inputs.append(jax.ShapeDtypeStruct(args[0].shape, args[0].dtype))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda: _init(model, config))
  return ModelOutline(variables, head_inputs[0])


def initial_variables(model: Classifier, config: ml_collections.ConfigDict, backbone: dict[str, Any] | None = None,
                      outline: ModelOutline | None = None) -> dict[str, Any]:
  """Random init, with the backbone's variables taken from `backbone` or else from `init_from` when set.

  A given backbone is not drawn or traced at all: only the head is initialised, on features shaped as
  `outline` (traced here if not given) says. Flax derives each module's random stream from its path, so
  the head's values are those of the full init.
  """
  if backbone is None and config.init_from:
    backbone = store.load_ported(config.init_from, config.model.name, **backbone_args(config))
  if backbone is None:
    return runtime.compile_and_run_once(lambda: _init(model, config))
  features = (outline or model_outline(model, config)).head_input

  def head_only():
    return model.init(jax.random.key(config.seed), jnp.zeros((1, *features.shape[1:]), features.dtype),
                      method=lambda classifier, x: classifier.head(x, train=False))
  return with_backbone(runtime.compile_and_run_once(head_only), backbone)


def with_backbone(variables: dict[str, Any], backbone: dict[str, Any]) -> dict[str, Any]:
  """The classifier's `variables` with the backbone's replaced by `backbone` (e.g. ported Keras weights)."""
  return {'params': {**variables['params'], 'backbone': backbone['params']},
          'batch_stats': {**variables.get('batch_stats', {}), 'backbone': backbone.get('batch_stats', {})}}
