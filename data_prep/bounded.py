"""Bounded memory for the build: decodes share a pixel budget, and resized images wait on disk.

The build must decode every image before it can split them (patients and
duplicates decide the splits). Held in memory until writing, the resized pixels
grew with the dataset, and every decoding thread held a full-size image and its
float32 resize at once (benchmarks/BENCHMARKS.md, "Data step memory"). Here a
`PixelBudget` caps the pixels being decoded and resized together, and a `Spool`
keeps each resized image as a PNG file until it is written.
"""

import contextlib
import itertools
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path


class PixelBudget:
  """A weighted semaphore over pixels: holders together stay within `limit`; one larger than it runs alone."""

  def __init__(self, limit: int):
    self._limit = limit
    self._held = 0
    self._changed = threading.Condition()

  @contextlib.contextmanager
  def reserve(self, pixels: int) -> Iterator[None]:
    """Waits until `pixels` fit beside the other holders (or none is left), and holds them for the block."""
    with self._changed:
      self._changed.wait_for(lambda: self._held == 0 or self._held + pixels <= self._limit)
      self._held += pixels
    try:
      yield
    finally:
      with self._changed:
        self._held -= pixels
        self._changed.notify_all()


class Spool(dict):
  """Examples to write per split, `{split: [example, ...]}`, whose images are PNG files in a temporary folder.

  The folder (under TMPDIR) goes on `close`, which `build.write` calls however it ends, or when the spool is
  garbage collected or the interpreter exits, so that a plan that is never written leaves nothing behind.
  """

  def __init__(self, splits: Iterable[str]):
    super().__init__({name: [] for name in splits})
    self.folder = Path(tempfile.mkdtemp(prefix='covid_xray-spool-'))
    self._remove = weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)
    self._names = itertools.count()

  def put(self, png: bytes) -> str:
    """Writes one PNG into the folder (thread-safe); returns its path."""
    path = self.folder / f'{next(self._names)}.png'
    path.write_bytes(png)
    return str(path)

  def close(self) -> None:
    """Removes the folder and its files; later calls do nothing."""
    self._remove()
