"""data_prep.scan: every file and folder under the source is a candidate or a rejection with its reason."""

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.scan import BuildError, scan

ROOT = Path(__file__).resolve().parents[1]
LABELS = {'0': 0, '1': 1}
BASE = [('0/IM-1000-0001.png', 0), ('0/sub/IM-1001-0001.png', 0), ('1/person1_virus_1.png', 1)]
FOLDER_LINK = 'not followed (move the folder in, or link a whole class folder)'


def _png(path: Path, seed: int = 0) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), np.uint8)).save(path, format='PNG')


def _source(root: Path) -> Path:
  for i, (rel, _) in enumerate(BASE):
    _png(root / rel, i)
  return root


def _block(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
  """Makes os.scandir fail on `folder` as chmod 000 does for a user that is not root."""
  real = os.scandir

  def scandir(path='.'):
    if os.fspath(path) == os.fspath(folder):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
    return real(path)

  monkeypatch.setattr(os, 'scandir', scandir)


def test_plain_source(tmp_path):
  src = _source(tmp_path)
  (src / '0' / '.DS_Store').write_bytes(b'x')
  (src / 'README.md').write_text('# data\n')
  (src / '1' / 'notes.txt').write_text('x')
  (src / 'empty' / 'deeper').mkdir(parents=True)
  assert scan(src, LABELS) == (BASE, [
      {'path': '0/.DS_Store', 'reason': 'hidden or system file'},
      {'path': '1/notes.txt', 'reason': 'not an image file extension (.txt)'},
      {'path': 'README.md', 'reason': 'not inside a class folder (0, 1)'},
  ])


def test_listing_order_does_not_matter(tmp_path, monkeypatch):
  src = _source(tmp_path)
  _png(src / '0' / 'IM-1002-0001.png')
  first = scan(src, LABELS)
  real = os.scandir

  class Reversed:
    def __init__(self, path):
      with real(path) as entries:
        self.entries = list(entries)[::-1]

    def __enter__(self):
      return iter(self.entries)

    def __exit__(self, *exc):
      return False

  monkeypatch.setattr(os, 'scandir', Reversed)
  assert scan(src, LABELS) == first


def test_unreadable_folder_is_rejected_not_dropped(tmp_path, monkeypatch):
  src = _source(tmp_path)
  _png(src / '0' / 'locked' / 'IM-1002-0001.png')
  _block(monkeypatch, src / '0' / 'locked')
  assert scan(src, LABELS) == (BASE, [{'path': '0/locked', 'reason': 'unreadable folder: Permission denied'}])


@pytest.mark.skipif(os.geteuid() == 0, reason='root lists any folder, whatever its mode')
def test_unreadable_folder_chmod(tmp_path):
  src = _source(tmp_path)
  _png(src / '0' / 'locked' / 'IM-1002-0001.png')
  (src / '0' / 'locked').chmod(0)
  try:
    assert scan(src, LABELS) == (BASE, [{'path': '0/locked', 'reason': 'unreadable folder: Permission denied'}])
  finally:
    (src / '0' / 'locked').chmod(0o755)


def test_unreadable_class_folder_is_an_error(tmp_path, monkeypatch):
  src = _source(tmp_path)
  _block(monkeypatch, src / '1')
  with pytest.raises(BuildError, match=re.escape(f'class folder {src / "1"}: unreadable folder: Permission denied')):
    scan(src, LABELS)


def test_symlinks_to_files_are_read_and_to_folders_rejected_by_name(tmp_path):
  src, outside = _source(tmp_path / 'src'), tmp_path / 'outside'
  _png(outside / 'IM-5000-0001.png')
  _png(outside / 'batch' / 'IM-5001-0001.png')
  (src / '0' / 'batch').symlink_to(outside / 'batch')
  (src / '0' / 'IM-5000-0001.png').symlink_to(outside / 'IM-5000-0001.png')
  (src / '1' / 'loop').symlink_to(src / '1')
  (src / '1' / 'person9_virus_9.png').symlink_to('missing.png')
  candidates, rejected = scan(src, LABELS)
  assert candidates == [BASE[0], ('0/IM-5000-0001.png', 0), *BASE[1:]]
  assert rejected == [
      {'path': '0/batch', 'reason': f'symbolic link to folder {outside / "batch"}: {FOLDER_LINK}'},
      {'path': '1/loop', 'reason': f'symbolic link to folder {src / "1"}: {FOLDER_LINK}'},
      {'path': '1/person9_virus_9.png',
       'reason': 'symbolic link to missing.png cannot be followed: No such file or directory'},
  ]


def test_symlinked_class_folder_is_followed_but_not_links_inside_it(tmp_path):
  src, disk = tmp_path / 'src', tmp_path / 'disk'
  _png(src / '0' / 'IM-1000-0001.png')
  _png(disk / 'covid' / 'person2_virus_1.png')
  (disk / 'covid' / 'up').symlink_to(disk)
  (src / '1').symlink_to(disk / 'covid')
  assert scan(src, LABELS) == ([('0/IM-1000-0001.png', 0), ('1/person2_virus_1.png', 1)],
                               [{'path': '1/up', 'reason': f'symbolic link to folder {disk}: {FOLDER_LINK}'}])
  (src / '1').unlink()
  (src / '1').symlink_to(disk / 'gone')
  with pytest.raises(BuildError, match=re.escape(f'class folder {src / "1"} is a symbolic link to {disk / "gone"}, '
                                                 'which is not a folder')):
    scan(src, LABELS)


def test_special_files_are_rejected_without_being_opened(tmp_path):
  src = _source(tmp_path)
  os.mkfifo(src / '0' / 'IM-6000-0001.png')
  (src / '1' / 'person6_virus_1.png').symlink_to(src / '0' / 'IM-6000-0001.png')
  (src / '1' / 'person7_virus_1.png').symlink_to('/dev/null')
  assert scan(src, LABELS) == (BASE, [
      {'path': '0/IM-6000-0001.png', 'reason': 'not a regular file (FIFO)'},
      {'path': '1/person6_virus_1.png', 'reason': 'not a regular file (FIFO)'},
      {'path': '1/person7_virus_1.png', 'reason': 'not a regular file (character device)'},
  ])


def test_name_that_is_not_utf8_is_rejected_printably(tmp_path):
  src = _source(tmp_path)
  (src / '0' / os.fsdecode(b'IM-7000-0001\xff.png')).write_bytes((src / BASE[0][0]).read_bytes())
  _png(src / '1' / os.fsdecode(b'\xfe') / 'person8_virus_1.png')
  candidates, rejected = scan(src, LABELS)
  assert candidates == BASE
  assert rejected == [{'path': '0/IM-7000-0001\\xff.png', 'reason': 'name is not valid UTF-8; rename it'},
                      {'path': '1/\\xfe', 'reason': 'name is not valid UTF-8; rename it'}]
  json.dumps(rejected, ensure_ascii=False).encode('utf-8')  # The manifest can hold them.


def test_cli_strict_fails_on_special_files_and_folder_links(tmp_path):
  src = tmp_path / 'src'
  for i in range(3):
    _png(src / '0' / f'IM-{1000 + i}-0001.png', i)
    _png(src / '1' / f'person{i}_virus_1.png', 10 + i)
  os.mkfifo(src / '0' / 'IM-6000-0001.png')
  (src / '1' / 'person6_virus_1.png').symlink_to(src / '0' / 'IM-6000-0001.png')
  (src / '1' / 'more').symlink_to(src / '0')
  result = subprocess.run([sys.executable, '-m', 'data_prep.build', '--source_dir', str(src), '--data_dir',
                           str(tmp_path / 'out'), '--image_size', '32', '--strict'], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert result.returncode == 1, result.stderr
  for line in ('rejected: 0/IM-6000-0001.png: not a regular file (FIFO)',
               'rejected: 1/person6_virus_1.png: not a regular file (FIFO)',
               f'rejected: 1/more: symbolic link to folder {src / "0"}: {FOLDER_LINK}',
               'error: --strict: 3 files or folders rejected; nothing written'):
    assert line in result.stderr, result.stderr
  assert not (tmp_path / 'out').exists()
