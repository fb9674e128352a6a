"""covid_jax.input_pipeline: exact pixels, full eval coverage, replayable training batches, sharding."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from covid_jax import input_pipeline

ROOT = Path(__file__).resolve().parents[1]


def _non_dividing_batch_size(n: int) -> int:
  """An even batch size that leaves a partial last batch of n examples."""
  return next(b for b in range(10, n, 2) if n % b)


def _pil_resized(path: Path, size: int) -> np.ndarray | None:
  """The source image resized by PIL (antialiased bilinear), RGB float; None for 16-bit sources."""
  image = ImageOps.exif_transpose(Image.open(path))
  if image.mode not in ('L', 'RGB'):
    return None
  return np.asarray(image.convert('RGB').resize((size, size), Image.Resampling.BILINEAR), np.float32)


def _eval_examples(reader: input_pipeline.SplitReader, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  images, labels = [], []
  for batch in reader.eval_batches(batch_size):
    mask = np.asarray(batch['mask'])
    images.append(np.asarray(batch['image'])[mask])
    labels.append(np.asarray(batch['label'])[mask])
  return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize('size', [64, 48])  # The stored size, and a resize in the pipeline.
def test_eval_images_equal_the_source_resized_by_pil(synthetic_source, built_dataset, size):
  data_dir, manifest = built_dataset
  reader = input_pipeline.SplitReader(data_dir, 'val', size)
  images, labels = _eval_examples(reader, 16)
  label_of = {e['path']: e['label'] for e in manifest['examples']}
  compared = 0
  for image, label, path in zip(images, labels, reader.example_paths()):
    assert label == label_of[path]
    want = _pil_resized(synthetic_source.root / path, size)
    if want is not None:
      assert image.shape == (size, size, 3) and image.dtype == np.float32
      assert np.abs(image - want).mean() < 2.0, path
      compared += 1
  assert compared > 20


def test_eval_covers_every_example_once_with_masked_padding(built_dataset):
  data_dir, manifest = built_dataset
  reader = input_pipeline.SplitReader(data_dir, 'val', 32)
  n = sum(manifest['counts']['val'].values())
  batch_size = _non_dividing_batch_size(n)
  assert reader.num_examples == n
  batches = list(reader.eval_batches(batch_size))
  assert len(batches) == -(-n // batch_size)
  assert all(b['image'].shape == (batch_size, 32, 32, 3) for b in batches)
  masks = np.concatenate([np.asarray(b['mask']) for b in batches])
  assert masks.sum() == n and masks[:n].all() and not masks[n:].any()
  paths = reader.example_paths()
  assert sorted(paths) == sorted(e['path'] for e in manifest['examples'] if e['split'] == 'val')
  images, _ = _eval_examples(reader, batch_size)
  direct = [tf.image.resize(tf.io.decode_png(r['image'], channels=3), (32, 32), antialias=True)
            for r in reader._records.as_numpy_iterator()]
  assert np.allclose(images, np.clip(np.round(np.stack(direct)), 0, 255))


def test_training_batches_replay_exactly_for_a_seed_and_epoch(built_dataset):
  data_dir, manifest = built_dataset
  reader = input_pipeline.SplitReader(data_dir, 'train', 32)
  assert reader.steps_per_epoch(16) == sum(manifest['counts']['train'].values()) // 16
  first, again, next_epoch = (list(reader.train_epoch(16, epoch, seed=0)) for epoch in (3, 3, 4))
  assert len(first) == reader.steps_per_epoch(16)
  for a, b in zip(first, again):
    assert np.array_equal(a['image'], b['image']) and np.array_equal(a['label'], b['label'])
  assert not np.array_equal(first[0]['image'], next_epoch[0]['image'])
  images = np.asarray(first[0]['image'])
  assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 255
  assert np.asarray(first[0]['mask']).all()


def test_an_epoch_draws_each_training_example_at_most_once(built_dataset):
  data_dir, _ = built_dataset
  reader = input_pipeline.SplitReader(data_dir, 'train', 32)
  stored = {image.tobytes() for image in _eval_examples(reader, 16)[0]}
  drawn = [image.tobytes() for batch in reader.train_epoch(16, 0, seed=0, flip=False, contrast=0.0)
           for image in np.asarray(batch['image'])]
  assert len(drawn) == reader.steps_per_epoch(16) * 16
  assert len(set(drawn)) == len(drawn) and set(drawn) <= stored


def test_training_order_ignores_tensorflow_and_keras_global_seeds(built_dataset):
  data_dir, _ = built_dataset

  def epoch_images() -> list[np.ndarray]:
    reader = input_pipeline.SplitReader(data_dir, 'train', 32)
    return [np.asarray(b['image']) for b in reader.train_epoch(16, 2, seed=5, flip=False, contrast=0.0)]

  unseeded = epoch_images()
  try:
    tf.random.set_seed(1234)  # As keras.utils.set_random_seed does; a tf.data shuffle would then change order.
    seeded = epoch_images()
  finally:
    tf.random.set_seed(None)
  assert all(np.array_equal(a, b) for a, b in zip(unseeded, seeded, strict=True))


def test_augmentation_is_keras_flip_and_contrast():
  source = np.random.default_rng(0).integers(0, 256, (64, 8, 8, 3)).astype(np.uint8)
  means = source.mean(axis=(1, 2), dtype=np.float32)
  key = jax.random.key(1)
  flipped = np.asarray(input_pipeline.augment(source, means, key, flip=True, contrast=0.0))
  is_flip = [np.array_equal(f, s[:, ::-1]) for f, s in zip(flipped, source)]
  assert all(flip or np.array_equal(f, s) for flip, f, s in zip(is_flip, flipped, source))
  assert flipped.dtype == np.float32 and 10 < sum(is_flip) < 54
  contrasted = np.asarray(input_pipeline.augment(source, means, key, flip=False, contrast=0.2))
  factors = []
  for got, image in zip(contrasted, source.astype(np.float32)):
    # tf.image.adjust_contrast is what keras.layers.RandomContrast applies, before clipping to [0, 255].
    centred = image - image.mean(axis=(0, 1))
    unclipped = (got > 0) & (got < 255)
    factor = float(np.sum(((got - image.mean(axis=(0, 1))) * centred)[unclipped]) / np.sum(centred[unclipped]**2))
    want = np.clip(tf.image.adjust_contrast(image, factor).numpy(), 0, 255)
    assert np.allclose(got, want, atol=0.5)
    factors.append(factor)
  assert 0.8 <= min(factors) < 0.9 and 1.1 < max(factors) <= 1.2


def test_cache_serves_later_epochs_from_memory(built_dataset, tmp_path):
  data_dir, _ = built_dataset
  copy = tmp_path / 'data'
  shutil.copytree(data_dir, copy)
  reader = input_pipeline.SplitReader(copy, 'train', 32, cache=True)
  first = list(reader.train_epoch(16, 0, seed=0))
  for record_file in copy.rglob('*.tfrecord-*'):
    record_file.unlink()
  second = list(reader.train_epoch(16, 1, seed=0))
  assert len(second) == len(first)


def test_missing_manifest_says_how_to_build(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m data_prep.build'):
    input_pipeline.SplitReader(tmp_path, 'train', 32)


def test_batches_shard_over_two_devices(built_dataset, tmp_path):
  data_dir, manifest = built_dataset
  one_device = next(iter(input_pipeline.SplitReader(data_dir, 'val', 32).train_epoch(8, 0, seed=0)))
  batch_size = _non_dividing_batch_size(sum(manifest['counts']['val'].values()))
  script = textwrap.dedent(f"""
      import numpy as np, jax
      from covid_jax import input_pipeline
      assert jax.device_count() == 2
      reader = input_pipeline.SplitReader({str(data_dir)!r}, 'val', 32)
      batches = list(reader.eval_batches({batch_size}))
      for b in batches:
        shards = b['image'].addressable_shards
        assert len(shards) == 2 and {{s.data.shape for s in shards}} == {{({batch_size // 2}, 32, 32, 3)}}
        assert {{s.device for s in shards}} == set(jax.devices())
      print('masked', int(sum(np.asarray(b['mask']).sum() for b in batches)))
      train = next(iter(reader.train_epoch(8, 0, seed=0)))
      assert train['image'].sharding.spec == jax.sharding.PartitionSpec('data')
      np.save({str(tmp_path / 'train.npy')!r}, np.asarray(train['image']))
      try:
        next(reader.eval_batches(7))
      except ValueError as e:
        print('error', e)
  """)
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=2', 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"masked {sum(manifest['counts']['val'].values())}" in result.stdout
  assert 'error batch_size 7 must be divisible by the number of devices (2)' in result.stdout
  assert np.array_equal(np.load(tmp_path / 'train.npy'), np.asarray(one_device['image']))


def test_a_build_naming_foreign_feature_classes_or_folders_is_not_read(built_dataset, tmp_path):
  """TFDS imports the classes a build's features.json names: only data_prep.build's own are read."""
  data_dir, _ = built_dataset
  copy = tmp_path / 'data'
  shutil.copytree(data_dir, copy)
  folder = input_pipeline.dataset_dir(copy)
  features = folder / 'features.json'
  features.write_text(features.read_text().replace('tensorflow_datasets.core.features.text_feature.Text',
                                                   'some_module.Text', 1))
  with pytest.raises(ValueError, match=f"{features} names feature classes .*'some_module.Text'"):
    input_pipeline.SplitReader(str(copy), 'test', 32, input_pipeline.data_mesh())
  manifest = copy / 'manifest.json'
  manifest.write_text(manifest.read_text().replace('"dataset_dir": "covid_xray/', '"dataset_dir": "../covid_xray/'))
  with pytest.raises(ValueError, match='names the dataset folder ../covid_xray/.* which is not inside'):
    input_pipeline.dataset_dir(copy)
