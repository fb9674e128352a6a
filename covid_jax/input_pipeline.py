"""TFRecords written by `data_prep.build` -> batches of global jax.Arrays sharded over ('data',).

Images arrive as float32 RGB 0-255 (each model applies its own preprocessing).
The host decodes, resizes and caches uint8 images; the float conversion and the
augmentation run as one jitted pass on the devices. Training batches are
shuffled and augmented with seeds derived from (seed, epoch, step), so any epoch
can be replayed exactly after a restart. Evaluation batches cover
every example exactly once, in file order, padded to full batches with mask=False.
Each process reads only its own part of each split.
"""

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Batch = dict[str, jax.Array]

# Cache decoded images in memory only while they take less than this share of RAM.
_CACHE_MEMORY_FRACTION = 0.25


def data_mesh() -> Mesh:
  """1-D mesh over every device of every process, axis 'data'."""
  return jax.make_mesh((jax.device_count(),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def dataset_dir(data_dir: str | os.PathLike) -> Path:
  """The TFDS dataset folder named by `data_dir/manifest.json` (written by data_prep.build)."""
  manifest = Path(data_dir) / 'manifest.json'
  if not manifest.is_file():
    raise FileNotFoundError(f'{manifest} not found: build the dataset first with '
                            f'`python -m data_prep.build --source_dir DIR --data_dir {data_dir}`')
  return Path(data_dir) / json.loads(manifest.read_text())['dataset_dir']


def _decode(example: dict[str, tf.Tensor], image_size: int) -> dict[str, tf.Tensor]:
  """PNG bytes -> uint8 (image_size, image_size, 3), gray replicated to RGB, plus its per-channel mean."""
  image = tf.io.decode_png(example['image'], channels=3)
  if image.shape[0] != image_size or image.shape[1] != image_size:
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
  image = tf.ensure_shape(image, (image_size, image_size, 3))
  return {'image': image, 'label': tf.cast(example['label'], tf.int32),
          'channel_mean': tf.reduce_mean(tf.cast(image, tf.float32), axis=[0, 1])}


@functools.partial(jax.jit, static_argnames=('flip', 'contrast'))
def augment(images: jax.Array, channel_mean: jax.Array, key: jax.Array, flip: bool, contrast: float) -> jax.Array:
  """The study's RandomFlip('horizontal') and RandomContrast(contrast) per image: uint8 -> float32 0-255.

  Runs where the batch lives (one fused pass on the accelerator) rather than in
  tf.data: the host only ships uint8. Random draws are global, so they do not
  depend on how many devices the batch is split over. `channel_mean` (B, 3) is
  the un-augmented image's mean, which a flip does not change.
  """
  flip_key, contrast_key = jax.random.split(key)
  n = images.shape[0]
  if flip:
    mirrored = jax.random.bernoulli(flip_key, 0.5, (n, 1, 1, 1))
    images = jnp.where(mirrored, images[:, :, ::-1], images)
  images = images.astype(jnp.float32)
  if contrast:
    factor = jax.random.uniform(contrast_key, (n, 1, 1, 1), minval=1.0 - contrast, maxval=1.0 + contrast)
    mean = channel_mean[:, None, None, :]
    images = jnp.clip((images - mean) * factor + mean, 0.0, 255.0)
  return images


@jax.jit
def _to_float(images: jax.Array) -> jax.Array:
  return images.astype(jnp.float32)


class SplitReader:
  """One split of a built dataset, read by this process, decoded and resized once."""

  def __init__(self, data_dir: str | os.PathLike, split: str, image_size: int, mesh: Mesh | None = None,
               cache: bool | None = None):
    """`cache=None` caches in memory when the decoded split fits the budget."""
    self.mesh = mesh or data_mesh()
    self.image_size = image_size
    builder = tfds.builder_from_directory(str(dataset_dir(data_dir)))
    if split not in builder.info.splits:
      raise ValueError(f'split {split!r} not in {data_dir}; it has {sorted(builder.info.splits)}')
    self.num_examples = builder.info.splits[split].num_examples
    process_splits = tfds.even_splits(split, jax.process_count())
    self.num_local_examples = builder.info.splits[process_splits[jax.process_index()]].num_examples
    self._max_local_examples = max(builder.info.splits[s].num_examples for s in process_splits)
    self._records = builder.as_dataset(split=process_splits[jax.process_index()], shuffle_files=False,
                                       read_config=tfds.ReadConfig(try_autocache=False))
    dataset = self._records.map(lambda e: _decode(e, image_size), num_parallel_calls=tf.data.AUTOTUNE,
                                deterministic=True)
    if cache if cache is not None else self._fits_in_memory():
      dataset = dataset.cache()
    self._decoded = dataset

  def example_paths(self) -> list[str]:
    """Source paths (relative, as in manifest.json) of this process's examples, in eval order."""
    return [p.decode() for p in self._records.map(lambda e: e['path']).as_numpy_iterator()]

  def _fits_in_memory(self) -> bool:
    size = self.num_local_examples * self.image_size**2 * 3
    return size < _CACHE_MEMORY_FRACTION * os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')

  def _local_batch_size(self, batch_size: int) -> int:
    devices = self.mesh.devices.size
    if batch_size % devices:
      raise ValueError(f'batch_size {batch_size} must be divisible by the number of devices ({devices})')
    return batch_size // jax.process_count()

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full training batches per epoch (the remainder of each reshuffled epoch is dropped)."""
    return self.num_examples // batch_size

  def train_epoch(self, batch_size: int, epoch: int, seed: int, flip: bool = True,
                  contrast: float = 0.2) -> Iterator[Batch]:
    """Shuffled, augmented full batches for one epoch; the same (seed, epoch) gives the same batches."""
    local = self._local_batch_size(batch_size)
    shuffle_seed = int(np.random.default_rng([seed, epoch, jax.process_index()]).integers(2**31))
    dataset = (self._decoded.shuffle(self.num_local_examples, seed=shuffle_seed, reshuffle_each_iteration=False)
               .batch(local, drop_remainder=True).take(self.steps_per_epoch(batch_size))
               .map(lambda b: {**b, 'mask': tf.ones_like(b['label'], tf.bool)})
               .prefetch(tf.data.AUTOTUNE))
    epoch_key = jax.random.fold_in(jax.random.key(seed), epoch)
    for step, batch in enumerate(self._to_global(dataset)):
      key = jax.random.fold_in(epoch_key, step)
      image = augment(batch.pop('image'), batch.pop('channel_mean'), key, flip=flip, contrast=contrast)
      yield {'image': image, **batch}

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    """Every example exactly once, in order; the last batch padded with zero images and mask=False."""
    local = self._local_batch_size(batch_size)
    steps = -(-self._max_local_examples // local)
    padding = steps * local - self.num_local_examples
    real = self._decoded.map(lambda e: {'image': e['image'], 'label': e['label'], 'mask': True})
    blank = {'image': tf.zeros((self.image_size, self.image_size, 3), tf.uint8), 'label': 0, 'mask': False}
    dataset = real.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding)).batch(local).prefetch(2)
    for batch in self._to_global(dataset):
      yield {**batch, 'image': _to_float(batch['image'])}

  def _to_global(self, dataset: tf.data.Dataset) -> Iterator[Batch]:
    sharding = NamedSharding(self.mesh, PartitionSpec('data'))
    for batch in dataset.as_numpy_iterator():
      yield {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
