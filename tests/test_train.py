"""The training system on a tiny fixture: it learns, freezes, stops, resumes, scales and reports honestly."""

import contextlib
import dataclasses
import gc
import json
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import keras
import ml_collections
import numpy as np
import pytest
from flax import traverse_util
from sklearn import metrics as sk_metrics

from configs import default
from covid_jax import model_init, progress, runtime, state, steps, train
from covid_jax.config_checks import validate_config
from covid_jax.models import conv, depthwise, formulations
from covid_jax.models.head import FIRST_DENSE
from covid_jax.port import keras_models, store
from covid_jax.port.keras_models import keras_backbone
from tests import runs


def test_training_learns_and_reports(trained_run):
  workdir, result, manifest = trained_run
  history = runs.history(workdir)
  assert history[-1]['train_loss'] < history[0]['train_loss']
  # The process's peak host memory, against the kernel's own lifetime peak (ru_maxrss, KiB on Linux): a process
  # that imported JAX and TensorFlow holds well over 0.1 GiB, and the peak so far never falls.
  peaks = [r['peak_host_memory_gib'] for r in history]
  assert 0.1 < peaks[0] and peaks == sorted(peaks)
  assert peaks[-1] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  test_counts = manifest['counts']['test']
  majority = max(test_counts.values()) / sum(test_counts.values())
  assert result['accuracy'] > majority
  assert result['split_sizes'] == {s: sum(manifest['counts'][s].values()) for s in ('train', 'val', 'test')}
  written = json.loads((workdir / 'test_metrics.json').read_text())
  assert written['best_epoch'] == max(history, key=lambda r: r['val_accuracy'])['epoch']
  for name in ('training_curves.png', 'confusion_matrix.png', 'roc_curve.png', 'prediction_grid.png', 'config.json'):
    assert (workdir / name).stat().st_size > 0
  assert any((workdir / 'tensorboard').iterdir())


def test_frozen_backbone_is_bit_identical(built_dataset, tmp_path):
  data_dir, _ = built_dataset
  config = runs.tiny_config(data_dir, num_epochs=1, freeze_backbone=True)
  trainer = train.Trainer(config, str(tmp_path))
  variables = model_init.initial_variables(trainer.model, config)
  train_state = steps.replicate(trainer.new_state(variables, 0), trainer.mesh)
  before = jax.device_get({'params': train_state.params, 'batch_stats': train_state.batch_stats})
  train_fn, _ = trainer.compile_steps(trainer.phases[0])
  train_state, _ = train._train_epoch(trainer, train_fn, train_state, epoch=1)
  after = jax.device_get({'params': train_state.params, 'batch_stats': train_state.batch_stats})
  for collection in ('params', 'batch_stats'):
    same = jax.tree.map(np.array_equal, before[collection]['backbone'], after[collection]['backbone'])
    assert all(jax.tree.leaves(same)), collection
  head_changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before['params']['head'], after['params']['head'])
  assert all(jax.tree.leaves(head_changed))


@pytest.mark.parametrize('name', ('vgg16', 'resnet50', 'nasnet'))
def test_fine_tune_unfreezes_trailing_layers_counted_in_keras_order(built_dataset, tmp_path, name):
  """The study's `layers[-N:]` counts in Keras's `model.layers` order (graph depth), not in call order."""
  data_dir, _ = built_dataset
  if name == 'nasnet':
    config = runs.tiny_config(data_dir)
  else:
    config = default.get_config()
    config.data_dir, config.model.name, config.model.image_size = str(data_dir), name, 32
  config.update_from_flattened_dict({'freeze_backbone': True, 'fine_tune.num_epochs': 1,
                                     'fine_tune.unfreeze_layers': 7})
  trainer = train.Trainer(config, str(tmp_path))
  keras_model = keras_backbone(name, (32, 32, 3), **model_init.backbone_args(config))
  weighted = [layer.name for layer in keras_model.layers
              if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
  variables = trainer.outline.variables
  labels = state.param_labels(variables['params'], variables['batch_stats'], trainer.layer_order, trainer.phases[1], 7)
  unfrozen = {layer for layer, tree in labels['backbone'].items() if set(jax.tree.leaves(tree)) == {'train'}}
  assert unfrozen == set(weighted[-7:])
  assert set(jax.tree.leaves(labels['head'])) == {'train'}
  # The outline's head input is the pooled backbone output.
  assert trainer.outline.head_input.shape == (1, keras_model.output_shape[-1])


@pytest.mark.parametrize('separate_update', (True, False), ids=('two programs', 'one program'))
def test_train_step_is_one_sgd_step_on_the_trainable_parameters(built_dataset, tmp_path, separate_update):
  """The step, in both of its forms (see steps.TrainStep), against SGD's first step written out here.

  The fine-tune phase, with 3 trailing VGG16 layers unfrozen: the trainable parameters move by -lr g (the
  momentum starts at zero), g the gradient of the loss written below; every other parameter stays as it was.
  """
  data_dir, _ = built_dataset
  config = default.get_config()
  config.data_dir, config.model.name, config.model.image_size = str(data_dir), 'vgg16', 32
  # A large step, so that the parameters' rounding hides no part of it.
  config.update_from_flattened_dict({'batch_size': 8, 'optimizer': 'sgd', 'fine_tune.learning_rate': 1.0,
                                     'fine_tune.unfreeze_layers': 3, 'model.head.dropout': 0.0,
                                     'model.head.batch_norm': False, 'model.head.l1': 1e-3, 'model.head.l2': 1e-2})
  trainer = train.Trainer(config, str(tmp_path))
  variables = model_init.initial_variables(trainer.model, config, outline=trainer.outline)
  phase = trainer.phases[1]
  train_state = steps.replicate(trainer.new_state(variables, 1), trainer.mesh)
  batch = next(trainer.readers['train'].train_epoch(8, 1, 0, flip=False, contrast=0.0))
  images, labels = np.asarray(batch['image']), np.asarray(batch['label'])

  def loss(params):
    logits, _ = trainer.model.apply({'params': params}, images, train=True,  # No BatchNorm anywhere.
                                    backbone_train=False, frozen_backbone=False, mutable=['batch_stats'])
    smoothing = config.label_smoothing
    targets = jax.nn.one_hot(labels, 2) * (1 - smoothing) + smoothing / 2
    kernel = params['head'][FIRST_DENSE]['kernel']
    return (-(targets * jax.nn.log_softmax(logits)).sum(-1).mean()
            + config.model.head.l1 * jnp.abs(kernel).sum() + config.model.head.l2 * jnp.square(kernel).sum())

  grads = jax.jit(jax.grad(loss))(variables['params'])
  lr = float(state.make_schedule(phase, trainer.steps_per_epoch)(0))
  flat = lambda tree: {'/'.join(path): np.array(leaf) for path, leaf in traverse_util.flatten_dict(tree).items()}
  before, gradient = flat(variables['params']), flat(grads)  # Copied: the step donates the state's arrays.
  train_fn, _ = steps.compile_steps(trainer.mesh, phase, config, separate_update=separate_update)
  after = flat(train_fn(train_state, batch, jax.random.key(0))[0].params)
  unfrozen = {'block5_conv1', 'block5_conv2', 'block5_conv3'}
  trainable = {path for path in before if path.startswith('head/') or path.split('/')[1] in unfrozen}
  for path in before.keys() - trainable:
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  for path in trainable:
    np.testing.assert_allclose(after[path], before[path] - lr * gradient[path], rtol=1e-5,
                               atol=1e-5 * lr * np.abs(gradient[path]).max(), err_msg=path)
  assert sum(not np.array_equal(after[path], before[path]) for path in trainable) > len(trainable) / 2


def test_train_step_is_two_programs_on_a_cpu():
  """Two programs compile side by side on a CPU; elsewhere the step is one program (steps.TrainStep)."""
  config = default.get_config()
  assert model_init.choose_formulations(config, 'cpu').separate_update
  assert not model_init.choose_formulations(config, 'gpu').separate_update
  mesh = jax.make_mesh((1,), ('data',), devices=jax.devices('cpu')[:1])
  assert steps.compile_steps(mesh, state.make_phases(config)[0], config, separate_update=True)[0].separate_update


def test_config_forces_the_accelerator_formulations_on_a_cpu(built_dataset, tmp_path):
  """formulations.backend=accelerator runs the GPU/TPU choices here: the models and the step receive them."""
  data_dir, _ = built_dataset
  trainer = train.Trainer(runs.tiny_config(data_dir, **{'formulations.backend': 'accelerator',
                                                   'formulations.pooling': 'reduce_window'}), str(tmp_path))
  assert trainer.formulations == dataclasses.replace(formulations.ACCELERATOR, pooling='reduce_window')
  assert trainer.model.backbone.formulations == trainer.formulations
  assert not trainer.compile_steps(trainer.phases[0])[0].separate_update


def _ported_tiny_backbone(config: ml_collections.ConfigDict, directory: Path, layer_order: list[str]) -> None:
  """Writes the tiny model's backbone as ported weights whose port_info.json records `layer_order`."""
  outline = model_init.model_outline(model_init.create_model(config), config).variables
  variables = {col: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), tree['backbone'])
               for col, tree in outline.items()}
  store.save_ported(str(directory), variables, {'model': config.model.name, 'layer_order': layer_order})


def test_fine_tune_takes_the_layer_order_the_port_recorded(built_dataset, tmp_path, monkeypatch):
  """With ported weights, the trailing layers are counted in port_info.json's order; Keras is not built."""
  data_dir, _ = built_dataset
  keras_order = keras_backbone('nasnet', (32, 32, 3), **model_init.backbone_args(runs.tiny_config(data_dir)), seed=None).layers
  recorded = [layer.name for layer in keras_order][::-1]  # Any order the port wrote is the one used.
  config = runs.tiny_config(data_dir, init_from=str(tmp_path / 'ported'), freeze_backbone=True,
                       **{'fine_tune.num_epochs': 1, 'fine_tune.unfreeze_layers': 3})
  _ported_tiny_backbone(config, tmp_path / 'ported', recorded)
  monkeypatch.setattr(keras_models, 'layer_order', lambda *a, **k: pytest.fail('built the Keras model'))
  trainer = train.Trainer(config, str(tmp_path / 'run'))
  assert trainer.layer_order == recorded
  params, stats = trainer.outline.variables['params'], trainer.outline.variables['batch_stats']
  labels = state.param_labels(params, stats, trainer.layer_order, trainer.phases[1], 3)
  unfrozen = {layer for layer, tree in labels['backbone'].items() if set(jax.tree.leaves(tree)) == {'train'}}
  weighted = [name for name in recorded if name in params['backbone'] and name not in stats['backbone']]
  assert unfrozen == set(weighted[-3:])

  _ported_tiny_backbone(config, tmp_path / 'ported', [name for name in recorded if name != 'stem_conv1'])
  with pytest.raises(ValueError, match=r"port_info.json lacks 1 of the nasnet backbone's layers.*stem_conv1"):
    _ = train.Trainer(config, str(tmp_path / 'run')).layer_order


@pytest.mark.parametrize('values,patience,min_delta,stop_epoch,best_epoch', [
    ([0.5, 0.6, 0.6, 0.55, 0.7, 0.6, 0.6, 0.6], 3, 0.0, 8, 5),
    ([0.5, 0.6, 0.61, 0.6, 0.6], 2, 0.05, 4, 2),
    ([0.9, 0.8, 0.7], 2, 0.0, 3, 1),
])
def test_early_stopping_rule(values, patience, min_delta, stop_epoch, best_epoch):
  stopper = progress.EarlyStopping('val_accuracy', patience, min_delta)
  for epoch, value in enumerate(values, start=1):
    stopper.update(value, epoch)
    if stopper.should_stop:
      break
  assert (epoch, stopper.best_epoch) == (stop_epoch, best_epoch)


def test_early_stopping_keeps_the_best_checkpoint(built_dataset, tmp_path, monkeypatch):
  data_dir, _ = built_dataset
  runs.script_val_accuracy(monkeypatch, [0.50, 0.70, 0.65, 0.70, 0.60, 0.69, 0.99])
  config = runs.tiny_config(data_dir, num_epochs=7, **{'early_stopping.patience': 3})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert [r['epoch'] for r in runs.history(tmp_path)] == [1, 2, 3, 4, 5]
  assert result['best_epoch'] == 2 and result['checkpoint'] == 'best'
  assert sorted(p.name for p in (tmp_path / 'checkpoints' / 'best').iterdir() if p.name.isdigit()) == ['2']


def test_test_metrics_agree_with_sklearn_on_fixed_logits(built_dataset, tmp_path, monkeypatch):
  data_dir, manifest = built_dataset
  n = sum(manifest['counts']['test'].values())
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, n)
  logits = rng.normal(size=(n, 2)) + np.stack([1 - labels, labels], 1) * 0.8
  real = steps.split_outputs

  def fixed(eval_fn, train_state, reader, batch_size, keep_images=False):
    outputs = real(eval_fn, train_state, reader, batch_size, keep_images)
    if keep_images:  # The test split.
      outputs.update(label=labels, logits=logits)
    return outputs

  monkeypatch.setattr(steps, 'split_outputs', fixed)
  train.train_and_evaluate(runs.tiny_config(data_dir, num_epochs=1), str(tmp_path))
  written = json.loads((tmp_path / 'test_metrics.json').read_text())
  predicted = logits.argmax(1)
  covid_probability = np.exp(logits[:, 1]) / np.exp(logits).sum(1)
  assert written['accuracy'] == pytest.approx(sk_metrics.accuracy_score(labels, predicted))
  assert written['precision'] == pytest.approx(sk_metrics.precision_score(labels, predicted, pos_label=1))
  assert written['recall'] == pytest.approx(sk_metrics.recall_score(labels, predicted, pos_label=1))
  assert written['specificity'] == pytest.approx(sk_metrics.recall_score(labels, predicted, pos_label=0))
  assert written['f1'] == pytest.approx(sk_metrics.f1_score(labels, predicted, pos_label=1))
  assert written['roc_auc'] == pytest.approx(sk_metrics.roc_auc_score(labels, covid_probability))
  assert written['confusion_matrix'] == sk_metrics.confusion_matrix(labels, predicted, labels=[0, 1]).tolist()
  assert written['per_class']['covid']['support'] == int(labels.sum())
  assert written['per_class']['covid']['recall'] == pytest.approx(written['recall'])


class _EveryInitializer(nn.Module):
  """One layer per initialiser the models draw from: variance-scaling normals, glorot uniform, zeros, ones."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(64, (3, 3))(x)  # lecun_normal (VGG16, ResNet50).
    x = conv.PointwiseConv(96, kernel_init=nn.initializers.he_normal())(x)  # NASNet's plain convs.
    x = depthwise.DepthwiseConv((5, 5))(x)  # glorot_uniform.
    x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def test_run_once_compilation_draws_what_the_default_compilation_draws():
  module = _EveryInitializer()

  def init():
    return module.init(jax.random.key(3), jnp.zeros((1, 16, 16, 32)))
  jax.tree.map(np.testing.assert_array_equal, runtime.compile_and_run_once(init), jax.jit(init)())


@contextlib.contextmanager
def _full_collections() -> Iterator[list[int]]:
  """Counts full garbage collections in the block, with the collector set to start them early.

  The process's objects are frozen first, so generation 2 starts empty and CPython's rule (a full
  collection once the survivors since the last one reach a quarter of generation 2) can fire.
  """
  gc.collect()
  gc.freeze()
  gc.collect()
  threshold = gc.get_threshold()
  gc.set_threshold(100, 1, 1)
  full: list[int] = []
  count = lambda phase, info: phase == 'stop' and info['generation'] == 2 and full.append(1)
  gc.callbacks.append(count)
  try:
    yield full
  finally:
    gc.callbacks.remove(count)
    gc.set_threshold(*threshold)
    gc.unfreeze()


def test_tracing_a_model_starts_no_full_garbage_collection(built_dataset, tmp_path):
  """The model's outline and the train step's compilation hold full collections back (covid_jax/runtime.py);
  the same functions undecorated start them under the same collector settings."""
  data_dir, _ = built_dataset
  config = runs.tiny_config(data_dir)
  trainer = train.Trainer(config, str(tmp_path))
  variables = model_init.initial_variables(trainer.model, config, outline=trainer.outline)
  train_state = steps.replicate(trainer.new_state(variables, 0), trainer.mesh)
  batch = next(trainer.readers['train'].train_epoch(config.batch_size, 1, 0, flip=False, contrast=0.0))
  traced = {
      'outline': lambda outline: outline(trainer.model, config),
      # A new step each time, so that nothing of the previous trace is reused.
      'train step': lambda compile: compile(trainer.compile_steps(trainer.phases[0])[0],
                                            train_state, batch, jax.random.key(0)),
  }
  undecorated = {'outline': model_init.model_outline.__wrapped__, 'train step': steps.TrainStep.compile.__wrapped__}
  decorated = {'outline': model_init.model_outline, 'train step': steps.TrainStep.compile}
  for name, trace in traced.items():
    with _full_collections() as without_deferral:
      trace(undecorated[name])
    with _full_collections() as with_deferral:
      trace(decorated[name])
    assert without_deferral and not with_deferral, (name, len(without_deferral), len(with_deferral))


def test_given_backbone_replaces_the_random_one_and_leaves_the_head_as_drawn(tmp_path):
  config = runs.tiny_config(tmp_path)
  model = model_init.create_model(config)
  drawn = model_init.initial_variables(model, config)
  ported = jax.tree.map(lambda v: v + 1.0, {col: drawn[col]['backbone'] for col in drawn})
  variables = model_init.initial_variables(model, config, backbone=ported)
  assert jax.tree.structure(variables) == jax.tree.structure(drawn)
  for col in drawn:
    jax.tree.map(np.testing.assert_array_equal, variables[col]['backbone'], ported[col])
    rest = {k: v for k, v in drawn[col].items() if k != 'backbone'}
    jax.tree.map(np.testing.assert_array_equal, {k: variables[col][k] for k in rest}, rest)


def test_invalid_config_values_name_the_key(built_dataset, tmp_path):
  data_dir, _ = built_dataset
  with pytest.raises(ValueError, match='model.pooling'):
    validate_config(runs.tiny_config(data_dir, **{'model.pooling': 'mean'}))
  with pytest.raises(ValueError, match=r"formulations\.depthwise 'shifty': one of \('shifted', 'grouped'\)"):
    validate_config(runs.tiny_config(data_dir, **{'formulations.depthwise': 'shifty'}))
  with pytest.raises(ValueError, match=r"formulations\.backend 'gpu': one of \('auto', 'cpu', 'accelerator'\)"):
    validate_config(runs.tiny_config(data_dir, **{'formulations.backend': 'gpu'}))
  with pytest.raises(ValueError, match=r'model\.nasnet\..*num_blocks.* only applies to the backbones nasnet.*, not resnet50'):
    validate_config(runs.tiny_config(data_dir, **{'model.name': 'resnet50'}))
  with pytest.raises(ValueError, match=r'fine_tune\.warmup_epochs 2 must be less than fine_tune\.num_epochs 2'):
    validate_config(runs.tiny_config(data_dir, **{'fine_tune.num_epochs': 2, 'fine_tune.warmup_epochs': 2}))
  with pytest.raises(ValueError, match=r'config: warmup_epochs 1 must be less than num_epochs 1'):
    validate_config(runs.tiny_config(data_dir, num_epochs=1, warmup_epochs=1))
  for key, value, phrase in (('model.preprocessing', 'caffe', r"model\.preprocessing 'caffe': one of"),
                             ('fine_tune.layer_rule', 'last', r"fine_tune\.layer_rule 'last': one of"),
                             ('fine_tune.schedule', 'step', r"fine_tune\.schedule 'step': one of"),
                             ('fine_tune.plateau_metric', 'loss', r"fine_tune\.plateau_metric 'loss': one of"),
                             ('early_stopping.checkpoint_metric', 'acc', r"checkpoint_metric 'acc': one of"),
                             ('fine_tune.early_stopping.metric', 'auc', r"fine_tune\.early_stopping\.metric 'auc'"),
                             ('threshold.rule', 'youdn', r"threshold\.rule 'youdn': one of"),
                             ('threshold.target', 1.5, r'threshold\.target 1\.5: in \(0, 1\]'),
                             ('head_features.views', 0, r'head_features\.views 0: at least 1')):
    with pytest.raises(ValueError, match=phrase):
      validate_config(runs.tiny_config(data_dir, **{key: value}))


def test_one_and_two_devices_agree_and_steps_go_to_the_compilation_cache(built_dataset, tmp_path):
  data_dir, _ = built_dataset
  overrides = runs.tiny_overrides(data_dir, num_epochs=1, **{'model.head.dropout': 0.0})
  cache = tmp_path / 'cache'
  # The one-device run uses its own configured cache: without the test-wide variable (which would take
  # precedence), and caching even quick compilations.
  own_cache = {'JAX_COMPILATION_CACHE_DIR': None, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0'}
  processes = {}  # The two runs side by side: each compiles on about one core.
  for devices, extra, env_changes in ((1, [f'--config.compilation_cache_dir={cache}'], own_cache), (2, [], None)):
    with (tmp_path / f'{devices}.log').open('w') as log:
      processes[devices] = subprocess.Popen(**runs.main_args(tmp_path / str(devices), *overrides, *extra,
                                                             devices=devices, env_changes=env_changes),
                                            stdout=log, stderr=subprocess.STDOUT)
  for devices, run in processes.items():
    assert run.wait() == 0, (tmp_path / f'{devices}.log').read_text()[-3000:]
  for program in ('train_gradients', 'apply_update', 'eval_step'):
    assert list(cache.glob(f'jit_{program}-*')), program
  one, two = (runs.history(tmp_path / str(d)) for d in (1, 2))
  for a, b in zip(one, two):
    for key in ('train_loss', 'val_loss', 'val_accuracy'):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
  metrics_one, metrics_two = (json.loads((tmp_path / str(d) / 'test_metrics.json').read_text()) for d in (1, 2))
  assert metrics_one['roc_auc'] == pytest.approx(metrics_two['roc_auc'], abs=1e-4)
