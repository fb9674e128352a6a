"""TFRecords written by `data_prep.build` -> batches of global jax.Arrays sharded over ('data',).

Images arrive as float32 RGB 0-255 (each model applies its own preprocessing).
The host decodes, resizes and keeps uint8 images; the float conversion and the
augmentation run as one jitted pass on the devices. Training batches are
shuffled and augmented with seeds derived from (seed, epoch, step) alone, never
from TensorFlow's or Keras's global seed, so any epoch can be replayed exactly
after a restart or in another process. Evaluation batches cover
every example exactly once, in file order, padded to full batches with mask=False.
Each process reads only its own part of each split and shuffles only that part,
so the training batches depend on the number of processes (not on their devices).
"""

import collections
import functools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Batch = dict[str, jax.Array]
# The mesh's one axis: batches are split along it, and the steps' collectives run over it.
AXIS = 'data'

# Cache decoded images in memory only while they take less than this share of RAM.
_CACHE_MEMORY_FRACTION = 0.25


def data_mesh() -> Mesh:
  """1-D mesh over every device of every process, axis AXIS ('data')."""
  return jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


# The feature classes data_prep's builder writes into features.json. TFDS imports whatever class that file
# names, so a build is read only if it names these.
FEATURE_CLASSES = frozenset(f'tensorflow_datasets.core.features.{name}' for name in (
    'features_dict.FeaturesDict', 'tensor_feature.Tensor', 'class_label_feature.ClassLabel', 'text_feature.Text'))


def dataset_dir(data_dir: str | os.PathLike) -> Path:
  """The TFDS dataset folder named by `data_dir/manifest.json` (written by data_prep.build), checked to be ours.

  The folder must lie inside data_dir, and its features.json may name only FEATURE_CLASSES.
  """
  manifest = Path(data_dir) / 'manifest.json'
  if not manifest.is_file():
    raise FileNotFoundError(f'{manifest} not found: build the dataset first with '
                            f'`python -m data_prep.build --source_dir DIR --data_dir {data_dir}`')
  named = Path(json.loads(manifest.read_text())['dataset_dir'])
  if named.is_absolute() or '..' in named.parts:
    raise ValueError(f'{manifest} names the dataset folder {named}, which is not inside {data_dir}')
  folder = Path(data_dir) / named
  features = folder / 'features.json'
  if features.is_file():
    foreign = sorted(_class_names(json.loads(features.read_text())) - FEATURE_CLASSES)
    if foreign:
      raise ValueError(f'{features} names feature classes that data_prep.build does not write, which TFDS would '
                       f'import: {foreign}. Rebuild the dataset with data_prep.build')
  return folder


def _class_names(tree: Any) -> set[str]:
  """Every 'pythonClassName' value in a JSON tree."""
  if isinstance(tree, dict):
    own = {tree['pythonClassName']} if isinstance(tree.get('pythonClassName'), str) else set()
    return own.union(*(_class_names(value) for value in tree.values()))
  if isinstance(tree, list):
    return set().union(*(_class_names(value) for value in tree))
  return set()


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


# Folded into the seed's key before a view's number: training epochs fold in 1, 2, ..., which never reach it.
_VIEWS_STREAM = 2**31 - 1


@functools.partial(jax.jit, static_argnames=('flip', 'contrast'))
def _augment_each(images: jax.Array, index: jax.Array, key: jax.Array, flip: bool, contrast: float) -> jax.Array:
  """`augment` on float images, each with its own key fold_in(key, index): draws independent of the batching."""
  def one(image, image_key):
    return augment(image[None], image.mean(axis=(0, 1))[None], image_key, flip=flip, contrast=contrast)[0]
  return jax.vmap(one)(images, jax.vmap(jax.random.fold_in, (None, 0))(key, index))


def ahead(batches: Iterable[Batch], size: int = 1) -> Iterator[Batch]:
  """`batches` in their order, `size` batches ahead of the consumer: a batch's host-to-device transfer (and its
  augmentation) is dispatched before the consumer dispatches its step on the batch before, so the transfer runs
  while that step does instead of after it."""
  queue = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def one_batch_ahead(batches_of: Callable[..., Iterator[Batch]]) -> Callable[..., Iterator[Batch]]:
  """Decorates a method that yields batches so that its batches come `ahead` by one."""
  @functools.wraps(batches_of)
  def ahead_by_one(*args, **kwargs) -> Iterator[Batch]:
    return ahead(batches_of(*args, **kwargs))
  return ahead_by_one


class SplitReader:
  """One split of a built dataset, read by this process, decoded and resized once when it fits in memory."""

  def __init__(self, data_dir: str | os.PathLike, split: str, image_size: int, mesh: Mesh | None = None,
               cache: bool | None = None):
    """`cache=None` keeps the decoded split in memory when it fits the budget; otherwise each pass decodes it."""
    self.mesh = mesh or data_mesh()
    self.image_size = image_size
    builder = tfds.builder_from_directory(str(dataset_dir(data_dir)))
    if split not in builder.info.splits:
      raise ValueError(f'split {split!r} not in {data_dir}; it has {sorted(builder.info.splits)}')
    self.num_examples = builder.info.splits[split].num_examples
    process_splits = tfds.even_splits(split, jax.process_count())
    self.num_local_examples = builder.info.splits[process_splits[jax.process_index()]].num_examples
    self._max_local_examples = max(builder.info.splits[s].num_examples for s in process_splits)
    self._source = f'{data_dir} split {split!r}'
    self._records = builder.as_dataset(split=process_splits[jax.process_index()], shuffle_files=False,
                                       read_config=tfds.ReadConfig(try_autocache=False))
    self._decoded = self._records.map(lambda e: _decode(e, image_size), num_parallel_calls=tf.data.AUTOTUNE,
                                      deterministic=True)
    self._keep_in_memory = cache if cache is not None else self._fits_in_memory()
    self._kept: dict[str, np.ndarray] | None = None

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

  def _examples(self) -> dict[str, np.ndarray]:
    """This process's decoded examples in file order, as host arrays; kept for later passes when they fit.

    A training epoch needs them all at once anyway: a shuffle over the whole
    split cannot yield its first batch before it has read the last example.
    """
    if self._kept is not None:
      return self._kept
    n, size = self.num_local_examples, self.image_size
    examples = {'image': np.empty((n, size, size, 3), np.uint8), 'label': np.empty(n, np.int32),
                'channel_mean': np.empty((n, 3), np.float32)}
    start = 0
    for chunk in self._decoded.batch(256).as_numpy_iterator():
      stop = start + len(chunk['label'])
      if stop <= n:
        for key, array in examples.items():
          array[start:stop] = chunk[key]
      start = stop
    if start != n:
      raise ValueError(f'{self._source}: the records hold {start} examples for this process, but the dataset '
                       f'info says {n}; rebuild the dataset')
    if self._keep_in_memory:
      self._kept = examples
    return examples

  @one_batch_ahead
  def train_epoch(self, batch_size: int, epoch: int, seed: int, flip: bool = True,
                  contrast: float = 0.2) -> Iterator[Batch]:
    """Shuffled, augmented full batches for one epoch; the same (seed, epoch) gives the same batches.

    The order is a NumPy permutation, so no global seed (`tf.random.set_seed`,
    `keras.utils.set_random_seed`) changes it, as it would a tf.data shuffle's.
    """
    local = self._local_batch_size(batch_size)
    examples = self._examples()
    order = self.epoch_order(seed, epoch)
    epoch_key = jax.random.fold_in(jax.random.key(seed), epoch)
    for step in range(self.steps_per_epoch(batch_size)):
      chosen = order[step * local:(step + 1) * local]
      batch = self._to_global({**{k: v[chosen] for k, v in examples.items()}, 'mask': np.ones(local, bool)})
      key = jax.random.fold_in(epoch_key, step)
      image = augment(batch.pop('image'), batch.pop('channel_mean'), key, flip=flip, contrast=contrast)
      yield {'image': image, **batch}

  def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch`'s training batches take this process's examples (file-order indices)."""
    return np.random.default_rng([seed, epoch, jax.process_index()]).permutation(self.num_local_examples)

  def view_batches(self, batch_size: int, view: int, seed: int, flip: bool = True,
                   contrast: float = 0.2) -> Iterator[Batch]:
    """`eval_batches` with every image as its view `view`: view 0 is the image itself, a view v >= 1 the study's
    flip and contrast, drawn for each example from (seed, v, process, example) whatever the batch size."""
    if view == 0:
      yield from self.eval_batches(batch_size)
      return
    local = self._local_batch_size(batch_size)
    view_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _VIEWS_STREAM), view)
    view_key = jax.random.fold_in(view_key, jax.process_index())
    for i, batch in enumerate(self.eval_batches(batch_size)):
      index = self._to_global({'index': np.arange(i * local, (i + 1) * local)})['index']
      yield {**batch, 'image': _augment_each(batch['image'], index, view_key, flip=flip, contrast=contrast)}

  @one_batch_ahead
  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    """Every example exactly once, in order; the last batch padded with zero images and mask=False."""
    local = self._local_batch_size(batch_size)
    examples = self._examples()
    for start in range(0, self._max_local_examples, local):
      batch = {'mask': np.arange(start, start + local) < self.num_local_examples}
      for key in ('image', 'label'):
        real = examples[key][start:start + local]
        batch[key] = np.pad(real, [(0, local - len(real))] + [(0, 0)] * (real.ndim - 1))
      batch = self._to_global(batch)
      yield {**batch, 'image': _to_float(batch['image'])}

  def _to_global(self, local_batch: dict[str, np.ndarray]) -> Batch:
    """This process's part of a batch -> global arrays sharded over the mesh's 'data' axis."""
    sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def split_paths(data_dir: str | os.PathLike, split: str) -> list[str]:
  """Source paths (relative, as in manifest.json) of a whole split in file order: the order of the
  outputs `steps.split_outputs` gathers from every process."""
  records = tfds.builder_from_directory(str(dataset_dir(data_dir))).as_dataset(
      split=split, shuffle_files=False, read_config=tfds.ReadConfig(try_autocache=False))
  return [p.decode() for p in records.map(lambda e: e['path']).as_numpy_iterator()]
