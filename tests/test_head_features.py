"""Phase 'head' from cached backbone features: trains as the uncached path, computed once, reused on resume."""

import functools
from pathlib import Path

import jax
import numpy as np
import pytest

from covid_jax import head_features, model_init, steps, train, workdir_checks
from covid_jax.config_checks import ConfigError
from tests import runs

EPOCHS = 3
# Augmentation off and one view: the cached path must then train exactly as the uncached one. Two hidden layers,
# so the head has a dropout layer, whose keys must match too.
EXACT = {'freeze_backbone': True, 'fine_tune.num_epochs': 0, 'num_epochs': EPOCHS, 'augment.flip': False,
         'augment.contrast': 0.0, 'head_features.views': 1, 'model.head.dims': (32, 16)}


class BackboneCalls:
  """Counts the images the feature extraction runs through the backbone (padding included)."""

  def __init__(self, monkeypatch: pytest.MonkeyPatch):
    self.images = 0
    real = steps.compile_features_step

    def counted(mesh, model_name):
      features_fn = real(mesh, model_name)

      def call(state, batch):
        self.images += batch['image'].shape[0]
        return features_fn(state, batch)
      return call
    monkeypatch.setattr(steps, 'compile_features_step', counted)


def _head_phase(config, workdir: Path) -> list[dict]:
  """Trains (or resumes) the run's phases without the final test report; returns the latest checkpoint's history."""
  trainer = train.Trainer(config, str(workdir))
  try:
    train._train(trainer, *train._start_or_resume(trainer))
    return trainer.checkpoints.progress('latest')['history']
  finally:
    trainer.checkpoints.close()


@pytest.fixture(scope='module')
def cached_and_uncached(built_dataset, tmp_path_factory):
  """The same head phase with and without cached features: {cache: (workdir, history, images extracted)}."""
  data_dir, _ = built_dataset
  done = {}
  with pytest.MonkeyPatch.context() as monkeypatch:
    for cache in (True, False):
      calls = BackboneCalls(monkeypatch)
      workdir = tmp_path_factory.mktemp(f'cache_{cache}')
      history = _head_phase(runs.tiny_config(data_dir, **EXACT, **{'head_features.cache': cache}), workdir)
      done[cache] = workdir, history, calls.images
  return done


def _max_relative_error(a: dict, b: dict) -> float:
  errors = jax.tree.map(lambda x, y: float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30)), a, b)
  return max(jax.tree.leaves(errors))


def test_cached_head_phase_trains_as_the_uncached_path(cached_and_uncached):
  (cached, cached_history, cached_images) = cached_and_uncached[True]
  (uncached, uncached_history, uncached_images) = cached_and_uncached[False]
  assert uncached_images == 0 and cached_images > 0
  assert len(cached_history) == len(uncached_history) == EPOCHS
  for ours, theirs in zip(cached_history, uncached_history):
    assert ours['val_accuracy'] == theirs['val_accuracy']
    for key in ('val_loss', 'val_roc_auc', 'train_loss'):
      assert ours[key] == pytest.approx(theirs[key], rel=1e-5), key
  ours, theirs = runs.latest_params(cached), runs.latest_params(uncached)
  assert _max_relative_error(ours['head'], theirs['head']) < 1e-5
  same_backbone = jax.tree.map(np.array_equal, ours['backbone'], theirs['backbone'])
  assert all(jax.tree.leaves(same_backbone))


def test_resume_reuses_the_cache_and_ends_as_the_uninterrupted_run(built_dataset, cached_and_uncached, tmp_path,
                                                                   monkeypatch):
  data_dir, _ = built_dataset
  config = runs.tiny_config(data_dir, **EXACT, **{'head_features.cache': True})
  first = BackboneCalls(monkeypatch)
  with runs.interrupted_at_epoch(2):
    _head_phase(config, tmp_path)
  whole, whole_history, whole_images = cached_and_uncached[True]
  assert first.images == whole_images
  resumed = BackboneCalls(monkeypatch)
  monkeypatch.setattr(head_features, '_MEMORY_FRACTION', 0.0)  # The resumed run memory-maps the cache.
  history = _head_phase(config, tmp_path)
  assert resumed.images == 0
  assert [r['epoch'] for r in history] == list(range(1, EPOCHS + 1))
  drop_times = lambda records: [{k: v for k, v in r.items() if k not in ('seconds', 'peak_host_memory_gib')}
                                for r in records]
  assert drop_times(history) == drop_times(whole_history)
  same = jax.tree.map(np.array_equal, runs.latest_params(whole), runs.latest_params(tmp_path))
  assert all(jax.tree.leaves(same))


def _trainer_and_state(config, workdir: Path):
  trainer = train.Trainer(config, str(workdir))
  trainer.checkpoints.close()
  variables = model_init.initial_variables(trainer.model, config, outline=trainer.outline)
  return trainer, steps.replicate(trainer.new_state(variables, 0), trainer.mesh)


def _pooled(trainer, train_state, images: np.ndarray) -> np.ndarray:
  """The backbone's pooled features of `images`, computed directly by the model, on one device."""
  variables = {'params': train_state.params, 'batch_stats': train_state.batch_stats}
  return np.asarray(_apply_pooled(trainer.model, variables, images))


@functools.partial(jax.jit, static_argnums=0)
def _apply_pooled(model, variables, images):
  return model.apply(variables, images, method='pooled_features')


def test_views_are_the_image_or_its_mirror_and_each_epoch_draws_one(built_dataset, tmp_path, monkeypatch):
  """With flip alone, view 1 of an image is its mirror or itself; an epoch's batch row holds one of the two views of
  the image the uncached path puts there (its `train_epoch` batches, unaugmented)."""
  data_dir, _ = built_dataset
  config = runs.tiny_config(data_dir, freeze_backbone=True, **{'augment.flip': True, 'augment.contrast': 0.0,
                                                                'head_features.views': 2})
  trainer, train_state = _trainer_and_state(config, tmp_path)
  calls = BackboneCalls(monkeypatch)
  cached = head_features.load_or_extract(config, str(tmp_path), trainer.model.dtype, trainer.readers, train_state)
  reader = trainer.readers['train']
  assert calls.images >= 2 * reader.num_examples + trainer.readers['val'].num_examples
  chosen_views = []
  for epoch in (1, 2):
    for batch, images in zip(cached['train'].train_epoch(config.batch_size, epoch, config.seed),
                             reader.train_epoch(config.batch_size, epoch, config.seed, flip=False, contrast=0.0)):
      plain = _pooled(trainer, train_state, np.asarray(images['image']))
      mirrored = _pooled(trainer, train_state, np.asarray(images['image'])[:, :, ::-1])
      features = np.asarray(batch['features'])
      assert np.array_equal(np.asarray(batch['label']), np.asarray(images['label']))
      is_plain = np.all(np.isclose(features, plain, rtol=1e-4, atol=1e-5), axis=1)
      is_mirror = np.all(np.isclose(features, mirrored, rtol=1e-4, atol=1e-5), axis=1)
      assert np.all(is_plain | is_mirror)
      chosen_views.append(is_mirror & ~is_plain)
  chosen = np.concatenate(chosen_views)
  # Half the rows take view 1, and half of those views are mirrored.
  assert 0.15 < chosen.mean() < 0.35
  half = len(chosen) // 2
  assert not np.array_equal(chosen[:half], chosen[half:])  # Epochs draw their views apart.


def test_a_changed_setting_recomputes_and_an_unrelated_one_reuses(built_dataset, tmp_path, monkeypatch):
  data_dir, _ = built_dataset
  config = runs.tiny_config(data_dir, freeze_backbone=True)
  trainer, train_state = _trainer_and_state(config, tmp_path)
  calls = BackboneCalls(monkeypatch)
  load = lambda c: head_features.load_or_extract(c, str(tmp_path), trainer.model.dtype, trainer.readers, train_state)
  first = load(config)
  after_first = calls.images
  config.seed, config.learning_rate = config.seed + 1, config.learning_rate / 2  # One view: the seed is unused.
  again = load(config)
  assert calls.images == after_first
  assert np.array_equal(again['val'].features, first['val'].features)
  for views in (2, 3):
    before = calls.images
    config.head_features.views = views
    load(config)
    assert calls.images > before
  assert len(list((tmp_path / head_features.CACHE_DIR).iterdir())) == 1  # The other settings' cache is gone.
  # The view-0 val features are the backbone's pooled features of the val images, in file order.
  val = trainer.readers['val']
  images = np.concatenate([np.asarray(b['image'])[np.asarray(b['mask'])] for b in val.eval_batches(64)])
  np.testing.assert_allclose(first['val'].features[0], _pooled(trainer, train_state, images), rtol=1e-5, atol=1e-6)


def test_cache_defaults_to_freeze_backbone_and_bad_views_name_the_key(built_dataset):
  data_dir, _ = built_dataset
  for freeze in (True, False):
    assert head_features.enabled(runs.tiny_config(data_dir, freeze_backbone=freeze)) is freeze
  assert not head_features.enabled(runs.tiny_config(data_dir, **{'head_features.cache': False}))
  with pytest.raises(ConfigError, match='head_features.views 0'):
    head_features.enabled(runs.tiny_config(data_dir, **{'head_features.views': 0}))


def test_resuming_with_other_head_features_is_refused(built_dataset):
  """The views and the cache decide what phase 'head' trains on: a resumed run may not change them."""
  data_dir, _ = built_dataset
  saved = workdir_checks.run_record(runs.tiny_config(data_dir))
  for key, value in (('head_features.views', 2), ('head_features.cache', False)):
    current = workdir_checks.run_record(runs.tiny_config(data_dir, **{key: value}))
    with pytest.raises(workdir_checks.WorkdirError, match=key):
      workdir_checks.check_same_run(saved, current, where='run')
