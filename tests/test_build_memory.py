"""data_prep.build in bounded memory: decodes share a pixel budget, resized images wait on disk and are removed."""

import gc
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import build_memory
from data_prep import bounded, build, images

# Most bytes an in-flight 8-bit gray image holds per pixel of its budget weight (source + stored pixels): decoding,
# under 4 per source pixel (PIL's image and its bytes, then the array and TensorFlow's input copy); resizing, under
# 6 per stored pixel (TensorFlow's float32 output, the uint8 image, its PNG).
BYTES_PER_PIXEL = 6
MAX_PIXELS = 20_000_000  # plan's budget, 2 x max_pixels = 40M pixels: two 4000 x 4000 decodes at once of the 8 workers.


@pytest.fixture(scope='module')
def tiny_build_kib(tmp_path_factory) -> int:
  """Peak RSS of a build of four 64 x 64 images: importing TensorFlow and TFDS, and the build's own overhead."""
  tmp = tmp_path_factory.mktemp('tiny')
  return build_memory.peak_rss_kib(build_memory.make_source(tmp / 'source', 4, 64), tmp / 'out', 64, 8, MAX_PIXELS,
                                   build_memory.PINNED_MALLOC)


@pytest.mark.parametrize('num_images,side,image_size', [
    (8, 4000, 224),  # Large sources decoded on 8 workers: up to 8 full-size decodes at once before.
    (6, 64, 4000),  # Large stored images: all of them were held until writing, beside 6 float32 resizes.
])
def test_peak_memory_stays_within_the_pixel_budget(tmp_path, tiny_build_kib, num_images, side, image_size):
  source = build_memory.make_source(tmp_path / 'source', num_images, side)
  spool_parent = tmp_path / 'tmp'
  spool_parent.mkdir()
  peak = build_memory.peak_rss_kib(source, tmp_path / 'out', image_size, 8, MAX_PIXELS,
                                   {**build_memory.PINNED_MALLOC, 'TMPDIR': str(spool_parent)})
  bound = tiny_build_kib + 2 * MAX_PIXELS * BYTES_PER_PIXEL / 1024
  assert peak <= bound, f'peak {peak / 1024:.0f} MiB > {bound / 1024:.0f} MiB'
  assert not _spools(spool_parent)


def test_budget_admits_holders_up_to_its_limit_and_a_larger_one_alone():
  budget = bounded.PixelBudget(10)
  held, seen, lock = [], [], threading.Lock()

  def hold(pixels: int) -> None:
    with budget.reserve(pixels):
      with lock:
        held.append(pixels)
        seen.append(sorted(held))
      time.sleep(0.05)
      with lock:
        held.remove(pixels)

  threads = [threading.Thread(target=hold, args=(p,)) for p in (4, 4, 4, 4, 25, 4, 6)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert all(sum(s) <= 10 or s == [25] for s in seen), seen
  assert [25] in seen and max(len(s) for s in seen) == 2


def _tiny_source(root: Path, bad_class_1: bool = False) -> Path:
  build_memory.make_source(root, 4, 64)
  if bad_class_1:
    for path in (root / '1').iterdir():
      path.write_bytes(b'not an image')
  return root


def _plan(source: Path) -> tuple[dict, bounded.Spool]:
  return build.plan(source, {'0': 0, '1': 1}, {'train': 1.0}, 0, 32, progress=False)


def _spools(parent: Path) -> list[Path]:
  return list(parent.glob('covid_xray-spool-*'))  # TFDS leaves its own empty temporary folder beside them.


@pytest.fixture
def spool_parent(tmp_path, monkeypatch) -> Path:
  parent = tmp_path / 'tmp'
  parent.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(parent))
  return parent


def test_spool_is_removed_when_written(tmp_path, spool_parent):
  manifest, to_write = _plan(_tiny_source(tmp_path / 'source'))
  assert len(list(to_write.folder.glob('*.png'))) == 4
  build.write(manifest, to_write, tmp_path / 'out', overwrite=False)
  assert (tmp_path / 'out' / 'manifest.json').is_file() and not _spools(spool_parent)


def test_spool_is_removed_when_the_write_fails(tmp_path, spool_parent):
  manifest, to_write = _plan(_tiny_source(tmp_path / 'source'))
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'other.txt').write_text('x')
  with pytest.raises(build.BuildError, match='pass --overwrite'):
    build.write(manifest, to_write, tmp_path / 'out', overwrite=False)
  assert not _spools(spool_parent)


def test_spool_is_removed_when_the_plan_fails(tmp_path, spool_parent):
  with pytest.raises(build.BuildError, match='no usable image'):
    _plan(_tiny_source(tmp_path / 'source', bad_class_1=True))
  assert not _spools(spool_parent)


def test_spool_is_removed_when_the_plan_is_never_written(tmp_path, spool_parent):
  _, to_write = _plan(_tiny_source(tmp_path / 'source'))
  assert _spools(spool_parent) == [to_write.folder]
  del to_write
  gc.collect()
  assert not _spools(spool_parent)


def test_stored_pixels_and_fingerprints_are_those_of_before():
  """Rounding in blocks of rows, and the channels' mean in integers, compute today's values with less memory."""
  import tensorflow as tf
  rng = np.random.default_rng(0)
  gray = rng.integers(0, 256, (300, 200), np.uint8)
  for size, keep_aspect in ((37, False), (600, False), (600, True)):
    resize = tf.image.resize_with_pad if keep_aspect else lambda x, h, w, **kw: tf.image.resize(x, (h, w), **kw)
    before = np.clip(np.round(resize(gray[..., None], size, size, antialias=True).numpy()), 0, 255).astype(np.uint8)
    assert np.array_equal(images.resize_for_storage(gray, size, keep_aspect), before)
  rgb = rng.integers(0, 256, (90, 70, 3), np.uint8)
  before = images.perceptual_hash(rgb.mean(axis=-1).astype(np.uint8))
  assert np.array_equal(images.perceptual_hash(rgb), before)
