"""Config values checked before anything is built, each problem named by its key."""

import jax
import ml_collections

from covid_jax import models
from covid_jax.model_init import DTYPE_SETTINGS, FORMULATION_KEYS
from covid_jax.models import formulations
from covid_jax.models.preprocessing import PREPROCESSINGS
from covid_jax.progress import MONITORED
from covid_jax.state import LAYER_RULES, OPTIMIZERS, SCHEDULES
from covid_jax.thresholds import RULES as THRESHOLD_RULES

POOLINGS = ('avg', 'max', 'flatten')
FORMULATION_BACKENDS = ('auto', 'cpu', 'accelerator')


class ConfigError(ValueError):
  """A config value the run cannot use; the message names each key."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails early, naming the key, on values the run could only trip over later."""
  name = config.model.name
  spec = models.BACKBONES.get(name)
  checks = [
      (spec is not None, f'model.name {name!r}: one of {sorted(models.BACKBONES)}'),
      (config.model.pooling in POOLINGS, f'model.pooling {config.model.pooling!r}: {"|".join(POOLINGS)}'),
      (config.dtype in DTYPE_SETTINGS, f'dtype {config.dtype!r}: one of {DTYPE_SETTINGS}'),
      (config.optimizer in OPTIMIZERS, f'optimizer {config.optimizer!r}: one of {OPTIMIZERS}'),
      (config.early_stopping.metric in MONITORED,
       f'early_stopping.metric {config.early_stopping.metric!r}: one of {sorted(MONITORED)}'),
      (config.model.image_size >= 32, f'model.image_size {config.model.image_size}: at least 32'),
      (config.formulations.backend in FORMULATION_BACKENDS,
       f'formulations.backend {config.formulations.backend!r}: one of {FORMULATION_BACKENDS}'),
  ]
  checks += [(value in allowed, f'{key} {value!r}: one of {allowed}') for key, value, allowed in (
      ('model.preprocessing', config.model.preprocessing, PREPROCESSINGS),
      ('fine_tune.layer_rule', config.fine_tune.layer_rule, LAYER_RULES),
      ('fine_tune.schedule', config.fine_tune.schedule, SCHEDULES),
      ('fine_tune.plateau_metric', config.fine_tune.plateau_metric, tuple(MONITORED)),
      ('threshold.rule', config.threshold.rule, THRESHOLD_RULES))]
  for key, value in (('early_stopping.checkpoint_metric', config.early_stopping.checkpoint_metric),
                     ('fine_tune.early_stopping.metric', config.fine_tune.early_stopping.metric)):
    checks.append((value is None or value in MONITORED, f'{key} {value!r}: one of {sorted(MONITORED)}'))
  checks.append((0 < config.threshold.target <= 1, f'threshold.target {config.threshold.target}: in (0, 1]'))
  checks.append((config.head_features.views >= 1, f'head_features.views {config.head_features.views}: at least 1'))
  devices = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):
    checks.append((config[key] > 0 and config[key] % devices == 0,
                   f'{key} {config[key]} must be a positive multiple of the device count ({devices})'))
  if spec is not None:
    checks += _backbone_checks(config, spec)
  for key in FORMULATION_KEYS:
    value, allowed = config.formulations[key], formulations.ALLOWED[key]
    checks.append((value is None or value in allowed, f'formulations.{key} {value!r}: one of {allowed}'))
  for prefix, phase in (('', config), ('fine_tune.', config.fine_tune)):
    checks.append((phase.num_epochs <= 0 or phase.warmup_epochs < phase.num_epochs,
                   f'{prefix}warmup_epochs {phase.warmup_epochs} must be less than {prefix}num_epochs '
                   f'{phase.num_epochs}: the cosine decay needs steps after the warm-up'))
  problems = [message for ok, message in checks if not ok]
  if problems:
    raise ConfigError('invalid config: ' + '; '.join(problems))


def _backbone_checks(config: ml_collections.ConfigDict, spec: models.BackboneSpec) -> list[tuple[bool, str]]:
  """Keys of backbone groups (e.g. model.nasnet) set for another backbone; a BN momentum without BatchNorm."""
  checks = []
  groups = {row.config_group for row in models.BACKBONES.values() if row.config_group}
  for group in sorted(groups - {spec.config_group}):
    set_keys = [k for k, v in config.model[group].items() if v is not None]
    owners = ', '.join(sorted(n for n, row in models.BACKBONES.items() if row.config_group == group))
    checks.append((not set_keys, f'model.{group}.{",".join(set_keys)} only applies to the backbones '
                                 f'{owners}, not {config.model.name}'))
  checks.append((config.model.bn_momentum is None or spec.has_batch_norm,
                 f'model.bn_momentum: {config.model.name} has no BatchNorm'))
  return checks
