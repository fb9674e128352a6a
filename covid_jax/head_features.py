"""Phase 'head' from the frozen backbone's pooled features, computed once and kept in the workdir.

In phase 'head' the backbone runs in inference mode and gets no updates, so an
image's pooled features depend on the image alone. `load_or_extract` computes
them once before the phase: K views of every train image (view 0 the image
itself, views 1..K-1 the study's flip and contrast drawn from (seed, view)) and
view 0 of every val image, sharded over devices and processes like an
evaluation. Each process writes its own examples' features under
WORKDIR/head_features/KEY/, where KEY digests everything they depend on: the
backbone's variables, config.model (the head aside), the model's dtype, the
views (with K > 1 also the seed and the augmentation), the data's manifest and
the process layout. A resumed run finds them there; any other run computes them
anew. The op formulations are left out of KEY: they change the features only to
rounding, as they may on resume. Features are read into memory when they fit,
else memory-mapped. `FeatureSplit` then batches them as `SplitReader` batches
images, in the same order, so the head step (`steps.compile_head_steps`) sees
what the full model's head would.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from covid_jax import steps, workdir_checks
from covid_jax.config_checks import ConfigError
from covid_jax.input_pipeline import AXIS, Batch, SplitReader
from covid_jax.state import TrainState

CACHE_DIR = 'head_features'
# Bumped when the files' layout or meaning changes, so older caches are recomputed.
FORMAT_VERSION = 1
# Read the features into memory only while they take less than this share of RAM; else memory-map them.
_MEMORY_FRACTION = 0.25
# Appended to (seed, epoch, process) for the epoch's view choice, apart from the epoch's example order.
_VIEW_CHOICE_STREAM = 1
SPLITS = ('train', 'val')


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether phase 'head' reads cached features: head_features.cache, or freeze_backbone where it is None."""
  views = config.head_features.views
  if isinstance(views, bool) or not isinstance(views, int) or views < 1:
    raise ConfigError(f'invalid config: head_features.views {views!r}: a whole number, at least 1')
  cache = config.head_features.cache
  return config.freeze_backbone if cache is None else cache


class FeatureSplit:
  """One split's cached features, batched as its `SplitReader` batches images ('features' instead of 'image')."""

  def __init__(self, reader: SplitReader, features: np.ndarray, labels: np.ndarray):
    """`features`: (views, this process's examples, feature size), in the reader's file order."""
    self.reader, self.features, self.labels = reader, features, labels
    self.views = features.shape[0]
    # Every process pads its eval batches to the largest process's share, so all run the same steps.
    self._max_local_examples = int(np.max(multihost_utils.process_allgather(np.int64(len(labels)))))

  def train_epoch(self, batch_size: int, epoch: int, seed: int, flip: bool = True,
                  contrast: float = 0.2) -> Iterator[Batch]:
    """`SplitReader.train_epoch`'s batches of (seed, epoch), each example as the view drawn for it from
    (seed, epoch). `flip` and `contrast` are taken for the same call; the views already hold them."""
    local = batch_size // jax.process_count()
    order = self.reader.epoch_order(seed, epoch)
    views = self._epoch_views(seed, epoch)
    for step in range(self.reader.steps_per_epoch(batch_size)):
      chosen = order[step * local:(step + 1) * local]
      yield self._to_global({'features': np.asarray(self.features[views[chosen], chosen]),
                             'label': self.labels[chosen], 'mask': np.ones(local, bool)})

  def _epoch_views(self, seed: int, epoch: int) -> np.ndarray:
    if self.views == 1:
      return np.zeros(len(self.labels), np.int64)
    rng = np.random.default_rng([seed, epoch, jax.process_index(), _VIEW_CHOICE_STREAM])
    return rng.integers(self.views, size=len(self.labels))

  def eval_batches(self, batch_size: int) -> Iterator[Batch]:
    """View 0 of every example exactly once, in order; the last batch padded with zeros and mask=False."""
    local = batch_size // jax.process_count()
    n = len(self.labels)
    for start in range(0, self._max_local_examples, local):
      batch = {'mask': np.arange(start, start + local) < n}
      for key, values in (('features', self.features[0]), ('label', self.labels)):
        real = np.asarray(values[start:start + local])
        batch[key] = np.pad(real, [(0, local - len(real))] + [(0, 0)] * (real.ndim - 1))
      yield self._to_global(batch)

  def _to_global(self, local_batch: dict[str, np.ndarray]) -> Batch:
    sharding = NamedSharding(self.reader.mesh, PartitionSpec(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def cache_key(config: ml_collections.ConfigDict, model_dtype: Any, train_state: TrainState) -> dict[str, Any]:
  """Everything the cached features depend on, as JSON values (see the module's docstring)."""
  key = {
      'format': FORMAT_VERSION,
      'backbone_sha256': _backbone_digest(train_state),
      'model': {name: value for name, value in config.model.to_dict().items() if name != 'head'},
      'dtype': np.dtype(model_dtype).name,
      'views': config.head_features.views,
      'manifest_sha256': workdir_checks.run_record(config)[workdir_checks.MANIFEST_KEY],
      'process': [jax.process_index(), jax.process_count()],
  }
  if config.head_features.views > 1:
    key.update(seed=config.seed, augment=config.augment.to_dict())
  return json.loads(json.dumps(key))


def _backbone_digest(train_state: TrainState) -> str:
  """sha256 over the backbone's parameters and BN statistics: names, dtypes, shapes and values."""
  digest = hashlib.sha256()
  for collection in (train_state.params, train_state.batch_stats):
    flat = traverse_util.flatten_dict(collection.get('backbone', {}))
    for path in sorted(flat):
      value = np.asarray(flat[path].addressable_data(0))
      digest.update(f'{"/".join(path)} {value.dtype} {value.shape}'.encode())
      digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


def load_or_extract(config: ml_collections.ConfigDict, workdir: str, model_dtype: Any,
                    readers: dict[str, SplitReader], train_state: TrainState,
                    show_progress: bool = True) -> dict[str, FeatureSplit]:
  """The 'train' and 'val' features of phase 'head': from the workdir's cache if it holds this key's, else
  computed from `train_state`'s backbone (with a progress bar) and written there first."""
  key = cache_key(config, model_dtype, train_state)
  name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  root = Path(workdir, CACHE_DIR)
  folder = root / name / f'process_{jax.process_index()}_of_{jax.process_count()}'
  if folder.is_dir():
    logging.info('Phase head reads the backbone\'s features cached in %s.', folder)
  else:
    if jax.process_index() == 0:  # Other keys' caches belong to other settings, which this workdir no longer runs.
      for stale in root.glob('*'):
        if stale.name != name:
          shutil.rmtree(stale, ignore_errors=True)
    _extract_all(config, readers, train_state, folder, key, show_progress)
  return {split: _load(folder, split, readers[split]) for split in SPLITS}


def _extract_all(config: ml_collections.ConfigDict, readers: dict[str, SplitReader], train_state: TrainState,
                 folder: Path, key: dict[str, Any], show_progress: bool) -> None:
  """Runs the backbone over the views of each split into .npy files, then renames their folder into place."""
  partial = folder.with_name(folder.name + '.partial')
  shutil.rmtree(partial, ignore_errors=True)  # An extraction cut short.
  partial.mkdir(parents=True)
  features_fn = steps.compile_features_step(readers['train'].mesh, config.model.name)
  views = {'train': config.head_features.views, 'val': 1}
  total = sum(views[split] * readers[split].num_local_examples for split in SPLITS)
  with tqdm(total=total, desc='head features', unit='image', disable=not show_progress) as bar:
    for split in SPLITS:
      stored = None
      for view in range(views[split]):
        features, labels = extract_view(features_fn, train_state, readers[split], view, config, bar.update)
        if stored is None:  # Written view by view: only one view is held in memory at a time.
          stored = np.lib.format.open_memmap(partial / f'{split}.npy', 'w+', np.float32,
                                             (views[split], *features.shape))
        stored[view] = features
      stored.flush()
      del stored
      np.save(partial / f'{split}_label.npy', labels)
  (partial / 'key.json').write_text(json.dumps(key, indent=1))
  os.replace(partial, folder)


def extract_view(features_fn: Callable, train_state: TrainState, reader: SplitReader, view: int,
                 config: ml_collections.ConfigDict, done: Callable[[int], Any] = lambda n: None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """This process's examples' pooled features (examples, size) as view `view`, and their labels, in file order.

  `features_fn` is `steps.compile_features_step`'s; `done(n)` is told each batch's number of real examples.
  """
  features, labels = [], []
  for batch in reader.view_batches(config.eval_batch_size, view, config.seed, flip=config.augment.flip,
                                   contrast=config.augment.contrast):
    real = steps.host_local(batch['mask'])
    features.append(np.asarray(steps.host_local(features_fn(train_state, batch))[real], np.float32))
    labels.append(steps.host_local(batch['label'])[real])
    done(int(real.sum()))
  return np.concatenate(features), np.concatenate(labels)


def _load(folder: Path, split: str, reader: SplitReader) -> FeatureSplit:
  path = folder / f'{split}.npy'
  fits = path.stat().st_size < _MEMORY_FRACTION * os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  features = np.load(path, mmap_mode=None if fits else 'r')
  labels = np.load(folder / f'{split}_label.npy')
  if features.shape[1] != reader.num_local_examples or len(labels) != reader.num_local_examples:
    raise ValueError(f'{folder} holds features of {features.shape[1]} {split} examples, but {reader.num_local_examples}'
                     f' are this process\'s: delete {folder.parent} to compute them again')
  return FeatureSplit(reader, features, labels)
